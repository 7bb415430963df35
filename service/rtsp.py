"""Camera ingestion: read one stream URL (RTSP or anything FFmpeg opens) in a daemon thread.

:class:`RtspSource` opens the URL with PyAV, decodes its first video stream and hands each frame
to a callback as an (H, W, 3) uint8 RGB array. The reader never dies on one bad frame: a corrupt
packet is counted in :attr:`RtspSource.decode_errors` and skipped. A dead camera (end of stream,
read error, a read that stalls longer than ``read_timeout_s``) closes the container and reopens it
after an exponential back-off; ``max_retries`` consecutive failed opens end in
:attr:`StreamState.FAILED`.

States::

    STARTING --open ok--> RUNNING --EOF / read error / stall--> RECONNECTING --open ok--> RUNNING
    STARTING or RECONNECTING --open failed, retries left--> RECONNECTING (sleep, back-off doubles)
    STARTING or RECONNECTING --open failed, no retries left--> FAILED (the thread ends)
    any --stop()--> STOPPED

This module stands alone: it imports only numpy, av and the standard library.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import av
import av.error
import numpy as np

logger = logging.getLogger(__name__)

NETWORK_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "http", "https"})
RTSP_SCHEMES = frozenset({"rtsp", "rtsps"})
RTSP_TRANSPORTS = frozenset({"tcp", "udp", "udp_multicast", "http", "https"})
MAX_DEMUX_ERRORS_IN_A_ROW = 50  # corrupt packets in a row the demuxer may report before a reopen

FrameCallback = Callable[[np.ndarray, int], None]


class StreamState(enum.StrEnum):
    """Where an :class:`RtspSource` is in its life."""

    STARTING = "starting"
    RUNNING = "running"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"
    FAILED = "failed"


StateCallback = Callable[[StreamState, "str | None"], None]


@dataclass(frozen=True)
class RtspOptions:
    """How an :class:`RtspSource` connects, detects a dead camera and retries."""

    transport: str = "tcp"
    """``rtsp_transport`` for rtsp:// and rtsps:// URLs: tcp, udp, udp_multicast, http or https."""
    open_timeout_s: float = 5.0
    """Seconds an open (connect, handshake, stream probing) may take."""
    read_timeout_s: float = 5.0
    """Seconds a read may stall before the camera counts as dead (closed and reopened)."""
    backoff_initial_s: float = 0.5
    """Sleep before the first reopen after a drop or a failed open; it doubles on each failure."""
    backoff_max_s: float = 10.0
    """Cap of the back-off sleep."""
    max_retries: int | None = None
    """Reopens tried after a failed open before giving up (FAILED): the source fails on failed open
    number ``max_retries + 1`` in a row; 0 fails on the first. None retries forever."""

    def __post_init__(self) -> None:
        if self.transport not in RTSP_TRANSPORTS:
            raise ValueError(f"transport must be one of {sorted(RTSP_TRANSPORTS)}, got {self.transport!r}")
        for name in ("open_timeout_s", "read_timeout_s", "backoff_initial_s", "backoff_max_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= "
                f"backoff_initial_s ({self.backoff_initial_s})"
            )
        retries = self.max_retries
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
            raise ValueError(f"max_retries must be None or an int >= 0, got {retries!r}")

    def backoff_delay(self, sleeps: int) -> float:
        """Seconds of sleep number ``sleeps`` (0-based) since the last successful open:
        ``backoff_initial_s * 2**sleeps``, capped at ``backoff_max_s``."""
        if sleeps < 0:
            raise ValueError(f"sleeps must be >= 0, got {sleeps}")
        return min(self.backoff_initial_s * 2.0 ** min(sleeps, 64), self.backoff_max_s)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs, errors and thread names)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def validate_url(url: object) -> str:
    """Check that ``url`` is something :class:`RtspSource` can read; return it.

    Accepted: a URL with scheme rtsp, rtsps, rtmp, http or https and a host; ``file:<path>`` of an
    existing file; the path of an existing local file. Raises ValueError otherwise.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"camera URL must be a non-empty string, got {url!r}")
    if _is_file(url):
        return url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in NETWORK_SCHEMES:
        if not parts.hostname:
            raise ValueError(f"camera URL {redact_url(url)!r} has no host")
        return url
    if scheme == "file":
        if not _is_file(url[len("file:") :]):
            raise ValueError(f"camera URL {url!r}: no such file")
        return url
    if scheme:
        supported = ", ".join(sorted(NETWORK_SCHEMES | {"file"}))
        raise ValueError(f"camera URL {redact_url(url)!r}: scheme {scheme!r} is not one of {supported}")
    raise ValueError(f"camera URL {url!r} is neither a stream URL (rtsp://...) nor an existing file")


def _is_file(path: str) -> bool:
    """Whether ``path`` names an existing local file (False for names the OS rejects)."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _describe(exc: BaseException, what: str, timeout_s: float, elapsed_s: float) -> str:
    """A human-readable one-line reason for ``exc``, raised after ``elapsed_s`` seconds.

    PyAV's timeout interrupts FFmpeg, which reports 'Immediate exit requested' or, from inside
    the RTSP demuxer, often a generic error: both are told as a timeout.
    """
    reason = getattr(exc, "strerror", None) or str(exc)  # strerror leaves out the URL (and password)
    if isinstance(exc, av.error.ExitError):
        return f"{what}: no answer within {timeout_s:g} s"
    if elapsed_s >= timeout_s:
        return f"{what}: no answer within {timeout_s:g} s ({reason})"
    return f"{what}: {reason}"


class _ReadError(Exception):
    """The stream ended or broke; the message says why."""


class RtspSource:
    """Read one camera in a daemon thread and hand each decoded frame to ``on_frame``.

    ``on_frame(rgb, index)`` receives an (H, W, 3) uint8 RGB array and the frame's running index
    (0, 1, 2, ... across reconnects). It runs on the reader thread: keep it short (hand the frame
    to a queue); an exception it raises is logged and the reader goes on. ``on_state(state,
    error)`` is called on each state change, with the reason for RECONNECTING/FAILED, else None.
    Both callbacks may call :meth:`stop`.
    """

    def __init__(
        self,
        url: str,
        on_frame: FrameCallback,
        *,
        options: RtspOptions = RtspOptions(),  # noqa: B008 (frozen, so sharing the default is safe)
        on_state: StateCallback | None = None,
        name: str = "",
    ) -> None:
        self._url = validate_url(url)
        if not callable(on_frame):
            raise ValueError(f"on_frame must be callable, got {on_frame!r}")
        self._on_frame = on_frame
        self._on_state = on_state
        self._options = options
        self._name = name or redact_url(url)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = StreamState.STARTING
        self._error: str | None = None
        self._frames = 0
        self._reconnects = 0
        self._decode_errors = 0

    # ----------------------------------------------------------------------------- public API

    @property
    def name(self) -> str:
        """The name given, or the URL without its password."""
        return self._name

    @property
    def state(self) -> StreamState:
        return self._state

    @property
    def error(self) -> str | None:
        """The last error (why the source reconnected or failed); kept after a recovery."""
        return self._error

    @property
    def frames(self) -> int:
        """Frames handed to ``on_frame`` (those whose callback raised included)."""
        return self._frames

    @property
    def reconnects(self) -> int:
        """Successful reopens after the stream had been running and dropped."""
        return self._reconnects

    @property
    def decode_errors(self) -> int:
        """Corrupt packets or frames skipped."""
        return self._decode_errors

    def start(self) -> None:
        """Start the reader thread (state STARTING). A source starts once; stop() is final."""
        with self._lock:
            if self._thread is not None or self._stop_event.is_set():
                raise RuntimeError(f"RtspSource {self._name!r} was already started or stopped")
            self._thread = threading.Thread(target=self._run, name=f"rtsp:{self._name}", daemon=True)
        logger.info("stream %s: starting", self._name)
        self._notify(StreamState.STARTING, None)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading: wake a back-off sleep, end the thread, close the container. Idempotent.

        Waits up to ``timeout`` seconds for the thread; a read blocked on the network notices the
        stop within ``read_timeout_s``. Called from ``on_frame``/``on_state`` (the reader thread)
        it returns at once and the reader closes the container when the callback returns.
        """
        self._stop_event.set()
        thread = self._thread
        if thread is threading.current_thread():
            return  # the reader sets STOPPED once the callback returns
        if thread is not None and thread.ident is not None:  # None: start() has not started it yet
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("stream %s: reader thread still busy %.1f s after stop()", self._name, timeout)
        self._set_state(StreamState.STOPPED, None)

    # ----------------------------------------------------------------------------- state

    def _set_state(self, state: StreamState, error: str | None) -> None:
        """Move to ``state``; after stop() only STOPPED is taken, and STOPPED is final."""
        with self._lock:
            if self._state is StreamState.STOPPED:
                return
            if self._stop_event.is_set() and state is not StreamState.STOPPED:
                return
            if error is not None:
                self._error = error
            changed = state is not self._state
            self._state = state
        if changed:
            self._log_state(state, error)
            self._notify(state, error)

    def _log_state(self, state: StreamState, error: str | None) -> None:
        if error is None:
            logger.info("stream %s: %s", self._name, state.value)
        else:
            logger.warning("stream %s: %s (%s)", self._name, state.value, error)

    def _notify(self, state: StreamState, error: str | None) -> None:
        if self._on_state is None:
            return
        try:
            self._on_state(state, error)
        except Exception:
            logger.exception("stream %s: on_state callback raised", self._name)

    # ----------------------------------------------------------------------------- reader thread

    def _run(self) -> None:
        """Open, read until the stream drops, back off, reopen; until stop() or FAILED."""
        failed_opens = 0
        sleeps = 0
        has_run = False
        try:
            while not self._stop_event.is_set():
                container = self._open_or_none()
                if container is None:
                    failed_opens += 1
                    if self._out_of_retries(failed_opens):
                        return
                else:
                    failed_opens = sleeps = 0
                    self._reconnects += has_run
                    has_run = True
                    self._set_state(StreamState.RUNNING, None)
                    self._read_until_drop(container)
                if self._stop_event.is_set():
                    break
                delay = self._options.backoff_delay(sleeps)
                logger.info("stream %s: reopening in %.3g s (%s)", self._name, delay, self._error)
                if self._stop_event.wait(delay):
                    break
                sleeps += 1
        except Exception as exc:  # a bug here must not leave a silent dead thread
            logger.exception("stream %s: reader thread crashed", self._name)
            self._set_state(StreamState.FAILED, f"reader crashed: {type(exc).__name__}: {exc}")
            return
        self._set_state(StreamState.STOPPED, None)

    def _out_of_retries(self, failed_opens: int) -> bool:
        """After a failed open: FAILED (True) when no retry is left, else RECONNECTING (False)."""
        retries = self._options.max_retries
        if retries is not None and failed_opens > retries:
            opens = f"{failed_opens} failed open{'s' if failed_opens > 1 else ''}"
            self._set_state(StreamState.FAILED, f"{self._error} (gave up after {opens})")
            return True
        self._set_state(StreamState.RECONNECTING, self._error)
        return False

    def _open_or_none(self) -> av.container.InputContainer | None:
        """Open the URL; on failure record the reason in ``error`` and return None."""
        timeouts = (self._options.open_timeout_s, self._options.read_timeout_s)
        started = time.monotonic()
        try:
            container = av.open(self._url, mode="r", options=self._av_options(), timeout=timeouts)
        except (av.error.FFmpegError, OSError) as exc:
            elapsed = time.monotonic() - started
            self._error = _describe(exc, f"cannot open {self._name}", timeouts[0], elapsed)
            return None
        if not container.streams.video:
            container.close()
            self._error = f"cannot open {self._name}: it has no video stream"
            return None
        return container

    def _av_options(self) -> dict[str, str]:
        if urlsplit(self._url).scheme.lower() in RTSP_SCHEMES:
            return {"rtsp_transport": self._options.transport}
        return {}

    def _read_until_drop(self, container: av.container.InputContainer) -> None:
        """Deliver frames until stop() or the stream drops (then RECONNECTING); close the container."""
        frames = self._decoded_frames(container)
        try:
            for frame in frames:
                self._deliver(frame)
                if self._stop_event.is_set():
                    return
            reason = f"{self._name}: end of stream"
        except _ReadError as exc:
            reason = str(exc)
        finally:
            frames.close()
            self._close(container)
        self._set_state(StreamState.RECONNECTING, reason)

    def _decoded_frames(self, container: av.container.InputContainer) -> Generator[av.VideoFrame, None, None]:
        """The video frames of ``container``; corrupt packets are counted and skipped."""
        for packet in self._packets(container):
            try:
                frames = packet.decode()
            except (av.error.FFmpegError, ValueError) as exc:
                self._decode_error(exc)
                continue
            yield from frames
            if self._stop_event.is_set():
                return

    def _packets(self, container: av.container.InputContainer) -> Iterator[av.Packet]:
        """Demux the first video stream; raise _ReadError when a read fails or stalls."""
        stream = container.streams.video[0]
        corrupt_in_a_row = 0
        while True:
            read_since = time.monotonic()
            try:
                for packet in container.demux(stream):
                    corrupt_in_a_row = 0
                    yield packet
                    read_since = time.monotonic()
                return
            except (av.error.FFmpegError, OSError) as exc:
                elapsed = time.monotonic() - read_since
                timed_out = elapsed >= self._options.read_timeout_s  # FFmpeg may call it invalid data
                if not isinstance(exc, av.error.InvalidDataError) or timed_out:
                    what = f"{self._name}: read failed"
                    raise _ReadError(_describe(exc, what, self._options.read_timeout_s, elapsed)) from exc
                corrupt_in_a_row += 1
                self._decode_error(exc)
                if corrupt_in_a_row >= MAX_DEMUX_ERRORS_IN_A_ROW:
                    raise _ReadError(f"{self._name}: {corrupt_in_a_row} corrupt packets in a row") from exc

    def _deliver(self, frame: av.VideoFrame) -> None:
        """Convert to RGB and call on_frame; a conversion error counts as a decode error."""
        try:
            rgb = frame.to_ndarray(format="rgb24")
        except (av.error.FFmpegError, ValueError) as exc:
            self._decode_error(exc)
            return
        index = self._frames
        self._frames += 1
        try:
            self._on_frame(rgb, index)
        except Exception:
            logger.exception("stream %s: on_frame raised on frame %d", self._name, index)

    def _decode_error(self, exc: BaseException) -> None:
        self._decode_errors += 1
        logger.warning("stream %s: skipped a corrupt packet (%s)", self._name, exc)

    def _close(self, container: av.container.InputContainer) -> None:
        try:
            container.close()
        except Exception:
            logger.exception("stream %s: closing the container failed", self._name)
