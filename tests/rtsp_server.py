"""A real RTSP server for the integration tests: GStreamer's gst-rtsp-server serving a looped clip.

Two parts in one file:

* a script for the *system* Python (``/usr/bin/python3``, where Debian's ``python3-gi`` lives; the
  project venv cannot import ``gi``)::

      /usr/bin/python3 tests/rtsp_server.py --port 8554 --clip clip.mp4 [--path /face]
      /usr/bin/python3 tests/rtsp_server.py --check    # exit 1 and name what is missing

  It reads the clip's H.264 access units once (``filesrc ! qtdemux ! h264parse ! appsink``) and
  serves them at ``rtsp://127.0.0.1:PORT/PATH``, each client from the first frame, looped forever
  at the clip's frame rate with the clip's own timestamps (B-frames kept), without re-encoding:
  ``appsrc ! h264parse ! clocksync ! rtph264pay``. It prints ``READY <port>`` on stdout once the
  port listens.
* :class:`RtspTestServer`, a stdlib-only helper for the tests (start on a free port, wait until
  ready, stop, restart on the same port), imported as ``from rtsp_server import RtspTestServer``.

The Debian packages it needs are listed in :data:`PACKAGES`; ``.ci/install-peers`` installs them.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
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
ELEMENTS = {
    "appsrc": "gstreamer1.0-plugins-base",
    "appsink": "gstreamer1.0-plugins-base",
    "clocksync": "libgstreamer1.0-0",  # GStreamer core, a dependency of the packages above
    "qtdemux": "gstreamer1.0-plugins-good",
    "rtph264pay": "gstreamer1.0-plugins-good",
    "h264parse": "gstreamer1.0-plugins-bad",
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
        command = [self.python, str(SCRIPT), "--port", str(self.port), "--clip", str(self.clip)]
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


# ================================================================ the server (system python3 + gi)


def _import_gst() -> tuple[Any, Any, Any]:
    """Gst, GstRtspServer and GLib from the system's PyGObject (not importable in the venv)."""
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    return Gst, GstRtspServer, GLib


def check() -> int:
    """Print each missing piece with its Debian package; 0 when nothing is missing."""
    try:
        Gst, _, _ = _import_gst()
    except ImportError as exc:
        print(f"python3-gi missing ({exc})")
        return 1
    except ValueError as exc:  # gi.require_version: the typelib is not installed
        print(f"gir1.2-gst-rtsp-server-1.0 missing ({exc})")
        return 1
    missing = [name for name in ELEMENTS if Gst.ElementFactory.find(name) is None]
    for name in missing:
        print(f"{ELEMENTS[name]} missing (no {name} element)")
    return 1 if missing else 0


def read_access_units(Gst: Any, clip: Path) -> tuple[Any, list[tuple[bytes, int, int, int, bool]]]:
    """The clip's H.264 caps and access units (data, pts, dts, duration in ns, is a delta unit)."""
    pipeline = Gst.parse_launch(
        "filesrc name=file ! qtdemux ! h264parse config-interval=-1 "
        "! video/x-h264,stream-format=byte-stream,alignment=au ! appsink name=sink sync=false"
    )
    pipeline.get_by_name("file").set_property("location", str(clip))
    sink = pipeline.get_by_name("sink")
    pipeline.set_state(Gst.State.PLAYING)
    caps, units = None, []
    while (sample := sink.emit("try-pull-sample", 10 * Gst.SECOND)) is not None:  # None: EOS or stuck
        caps = sample.get_caps()
        buffer = sample.get_buffer()
        delta = buffer.has_flags(Gst.BufferFlags.DELTA_UNIT)
        units.append(
            (buffer.extract_dup(0, buffer.get_size()), buffer.pts, buffer.dts, buffer.duration, delta)
        )
    error = pipeline.get_bus().pop_filtered(Gst.MessageType.ERROR)
    pipeline.set_state(Gst.State.NULL)
    if error is not None or not units:
        raise SystemExit(f"cannot read H.264 from {clip}: {error.parse_error() if error else 'no frames'}")
    return caps, units


class LoopFeeder:
    """Pushes the access units into one client's appsrc, looped, timestamps shifted per loop."""

    def __init__(self, Gst: Any, units: list[tuple[bytes, int, int, int, bool]], frame_ns: int) -> None:
        self.Gst, self.units, self.index = Gst, units, 0
        times = [t for _, pts, dts, _, _ in units for t in (pts, dts) if t != Gst.CLOCK_TIME_NONE]
        self.base = min(times)
        self.loop_ns = len(units) * frame_ns

    def need_data(self, appsrc: Any, _length: int) -> None:
        loop, position = divmod(self.index, len(self.units))
        data, pts, dts, duration, delta = self.units[position]
        buffer = self.Gst.Buffer.new_wrapped(data)
        shift = loop * self.loop_ns - self.base
        buffer.pts = pts + shift
        buffer.dts = dts + shift if dts != self.Gst.CLOCK_TIME_NONE else pts + shift
        buffer.duration = duration
        if delta:
            buffer.set_flags(self.Gst.BufferFlags.DELTA_UNIT)
        self.index += 1
        appsrc.emit("push-buffer", buffer)


def serve(port: int, clip: Path, path: str) -> int:
    """Serve ``clip`` looped at rtsp://127.0.0.1:port/path until SIGTERM/SIGINT."""
    Gst, GstRtspServer, GLib = _import_gst()
    caps, units = read_access_units(Gst, clip)
    has_rate, numerator, denominator = caps.get_structure(0).get_fraction("framerate")
    frame_ns = Gst.SECOND * denominator // numerator if has_rate and numerator else units[0][3]

    def configure(_factory: Any, media: Any) -> None:
        appsrc = media.get_element().get_by_name("src")
        appsrc.set_property("caps", caps)
        appsrc.connect("need-data", LoopFeeder(Gst, units, frame_ns).need_data)

    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        "( appsrc name=src format=time ! h264parse config-interval=-1 ! clocksync "
        "! rtph264pay name=pay0 pt=96 config-interval=-1 )"
    )
    factory.set_shared(False)  # each client gets its own pipeline, from the first (key) frame
    factory.connect("media-configure", configure)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    server.get_mount_points().add_factory(path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{port}", file=sys.stderr)
        return 2
    loop = GLib.MainLoop()
    for number in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, number, loop.quit)
    print(f"READY {port}", flush=True)
    print(f"serving {clip} ({len(units)} frames) at rtsp://127.0.0.1:{port}{path}", file=sys.stderr)
    loop.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, help="TCP port to listen on (127.0.0.1)")
    parser.add_argument("--clip", type=Path, help="an MP4 with an H.264 video track")
    parser.add_argument("--path", default=DEFAULT_PATH, help=f"mount point (default {DEFAULT_PATH})")
    parser.add_argument("--check", action="store_true", help="only check that the needed packages exist")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    if args.port is None or args.clip is None:
        parser.error("--port and --clip are required (or --check)")
    if not args.clip.is_file():
        parser.error(f"--clip {args.clip} is not a file")
    return serve(args.port, args.clip.resolve(), args.path)


if __name__ == "__main__":
    os.environ.setdefault("GST_DEBUG", "1")  # errors only, on stderr
    os.environ.setdefault("GST_DEBUG_NO_COLOR", "1")
    sys.exit(main())
