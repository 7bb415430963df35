"""A real RTSP server for the integration tests: GStreamer's gst-rtsp-server serving a looped clip.

The server is ``deploy/rtsp-source/rtsp_source.py`` (also the compose stack's test camera), run
by the *system* Python (``/usr/bin/python3``, where Debian's ``python3-gi`` lives; the project venv
cannot import ``gi``)::

      /usr/bin/python3 deploy/rtsp-source/rtsp_source.py --host 127.0.0.1 --port 8554 --clip clip.mp4
      /usr/bin/python3 deploy/rtsp-source/rtsp_source.py --check    # exit 1 and name what is missing

It serves the clip's H.264 access units, looped, without re-encoding, and prints ``READY <port>``
once it listens. This file holds :class:`RtspTestServer`, a stdlib-only helper for the tests
(start on a free port, wait until ready, stop, restart on the same port), imported as
``from rtsp_server import RtspTestServer``.

The Debian packages it needs are listed in :data:`PACKAGES`; ``.ci/install-peers`` installs them.
"""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "rtsp-source" / "rtsp_source.py"
SYSTEM_PYTHON = "/usr/bin/python3"
INSTALL_COMMAND = ".ci/install-peers"
DEFAULT_PATH = "/face"

# What the server needs -> the Debian package that provides it.
PACKAGES = {
    "python3-gi": "PyGObject for the system python3 (import gi)",
    "gir1.2-gst-rtsp-server-1.0": "gst-rtsp-server and its GObject introspection data",
    "gstreamer1.0-plugins-base": "appsrc, appsink",
    "gstreamer1.0-plugins-good": "qtdemux, rtph264pay",
    "gstreamer1.0-plugins-bad": "h264parse",
}


# ================================================================ helper for the tests (any Python)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def missing_peers(python: str = SYSTEM_PYTHON) -> str | None:
    """Why the RTSP server cannot run here (naming the Debian packages and the install command),
    or None when it can."""
    install = f"run `{INSTALL_COMMAND}` (apt-get install -y --no-install-recommends {' '.join(PACKAGES)})"
    if not Path(python).exists():
        return f"{python} not found (Debian package python3); {install}"
    check = subprocess.run(
        [python, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    if check.returncode == 0:
        return None
    problems = (check.stdout + check.stderr).strip().replace("\n", "; ")
    return f"the RTSP test server cannot run: {problems}; {install}"


class RtspTestServer:
    """The RTSP server script as a subprocess of the system Python, serving ``clip`` looped.

    ``start()`` picks a free port the first time and keeps it, so ``stop(); start()`` (or
    ``restart()``) brings the server back at the same URL. Use as a context manager or call
    ``stop()``; the server's log is in ``log_text()``.
    """

    def __init__(
        self,
        clip: Path,
        *,
        port: int | None = None,
        path: str = DEFAULT_PATH,
        python: str = SYSTEM_PYTHON,
        ready_timeout: float = 30.0,
    ) -> None:
        self.clip = Path(clip)
        self.port = port
        self.path = path if path.startswith("/") else f"/{path}"
        self.python = python
        self.ready_timeout = ready_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="rtsp-server-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has no port until start()")
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> str:
        """Start the server and wait until it listens; return its URL."""
        if self.running:
            raise RuntimeError(f"the RTSP server is already running at {self.url}")
        if self.port is None:
            self.port = free_port()
        command = [self.python, str(SCRIPT), "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--clip", str(self.clip)]
        self._process = subprocess.Popen(
            [*command, "--path", self.path], stdout=subprocess.PIPE, stderr=self._log, start_new_session=True
        )
        self._wait_ready()
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL); its clients' connections drop. Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGCONT)  # a paused server only acts on SIGTERM once resumed
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if process.stdout is not None:
            process.stdout.close()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): its connections stay open but no data flows."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def _signal(self, number: int) -> None:
        if not self.running:
            raise RuntimeError("the RTSP server is not running")
        assert self._process is not None
        self._process.send_signal(number)

    def restart(self) -> str:
        """Stop, then start on the same port."""
        self.stop()
        return self.start()

    def log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def close(self) -> None:
        """Stop the server and delete its log."""
        self.stop()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> RtspTestServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _wait_ready(self) -> None:
        """Wait for the script's ``READY`` line, then for the port to accept a connection."""
        assert self._process is not None and self._process.stdout is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"no READY line within {self.ready_timeout:g} s")
            readable, _, _ = select.select([self._process.stdout], [], [], remaining)
            if not readable:
                continue
            line = self._process.stdout.readline()
            if not line:
                self._fail(f"it exited with code {self._process.wait()}")
            if line.startswith(b"READY"):
                break
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port or 0), timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self._fail("its port does not accept connections")
                time.sleep(0.05)

    def _fail(self, why: str) -> None:
        self.stop()
        raise RuntimeError(f"RTSP test server on port {self.port}: {why}. Its log:\n{self.log_text()}")
