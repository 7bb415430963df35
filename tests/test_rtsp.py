"""Tests of facestream.service.rtsp: option and URL checks, the reader thread, back-off, recovery.

The unit tests read local files (a real face clip and tiny MJPEG clips written here) and contact
only 127.0.0.1. The ``integration`` tests run a real RTSP server (GStreamer's gst-rtsp-server, see
tests/rtsp_server.py) as a subprocess of the system python3; they are skipped, naming the Debian
packages and ``.ci/install-peers``, where those are not installed.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from helpers import clip_path
from rtsp_server import RtspTestServer, free_port, missing_peers

from facestream.service import rtsp
from facestream.service.rtsp import RtspOptions, RtspSource, StreamState, redact_url, validate_url

CLIP = "lp_d18.mp4"  # 480 x 480, 30 fps, 216 frames, H.264 High with B-frames
CLIP_SHAPE = (480, 480, 3)
TINY_FRAMES = 10  # frames in the tiny MJPEG clip; frame i is grey level 20 * i
CORRUPT_FRAME = 4  # the frame whose JPEG data the corrupt copy zeroes


# --------------------------------------------------------------------------- helpers


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


class Recorder:
    """Callbacks for an RtspSource: keeps frames, indices and state changes (with times).

    ``stop_after`` frames in, ``on_frame`` calls ``source.stop()`` from the reader thread;
    ``raise_on`` lists frame indices on which ``on_frame`` raises.
    """

    def __init__(self, *, stop_after: int | None = None, raise_on: tuple[int, ...] = ()) -> None:
        self.source: RtspSource | None = None
        self.stop_after = stop_after
        self.raise_on = raise_on
        self.frames: list[np.ndarray] = []
        self.indices: list[int] = []
        self.states: list[tuple[StreamState, str | None, float]] = []

    def on_frame(self, rgb: np.ndarray, index: int) -> None:
        self.indices.append(index)
        if index in self.raise_on:
            raise RuntimeError(f"on_frame fails on frame {index}")
        self.frames.append(rgb)
        if self.stop_after is not None and len(self.indices) >= self.stop_after:
            assert self.source is not None
            self.source.stop()

    def on_state(self, state: StreamState, error: str | None) -> None:
        self.states.append((state, error, time.monotonic()))

    @property
    def state_names(self) -> list[StreamState]:
        return [state for state, _, _ in self.states]


@pytest.fixture
def make_source() -> Iterator[Callable[..., tuple[RtspSource, Recorder]]]:
    """Build RtspSources wired to a Recorder; every one is stopped at the end of the test."""
    made: list[RtspSource] = []

    def make(url: str, recorder: Recorder | None = None, **options: object) -> tuple[RtspSource, Recorder]:
        recorder = recorder or Recorder()
        source = RtspSource(
            url,
            recorder.on_frame,
            options=RtspOptions(**options),
            on_state=recorder.on_state,
        )
        recorder.source = source
        made.append(source)
        return source, recorder

    yield make
    for source in made:
        source.stop(timeout=10.0)


def reader_alive(source: RtspSource) -> bool:
    return any(thread.name == f"rtsp:{source.name}" for thread in threading.enumerate())


def first_frame(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


@pytest.fixture(scope="module")
def clip(videos_dir: Path) -> Path:
    return clip_path(videos_dir, CLIP)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-frame 64 x 48 MJPEG clip in Matroska; frame i is flat grey 20 * i."""
    path = tmp_path_factory.mktemp("rtsp") / "tiny.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(TINY_FRAMES):
            image = np.full((48, 64, 3), 20 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def corrupt_clip(tiny_clip: Path) -> Path:
    """The tiny clip with the JPEG data of frame CORRUPT_FRAME zeroed (its markers kept)."""
    data = bytearray(tiny_clip.read_bytes())
    with av.open(str(tiny_clip)) as container:
        packets = [bytes(p) for p in container.demux(video=0) if p.size]
    jpeg = packets[CORRUPT_FRAME]
    offset = data.find(jpeg)
    assert offset > 0 and data.count(jpeg) == 1, "cannot locate the packet to corrupt"
    data[offset + 2 : offset + len(jpeg) - 2] = bytes(len(jpeg) - 4)
    path = tiny_clip.with_name("corrupt.mkv")
    path.write_bytes(data)
    return path


def grey_level(rgb: np.ndarray) -> int:
    return int(round(float(rgb.mean()) / 20.0))


# --------------------------------------------------------------------------- options and URLs


def test_options_defaults() -> None:
    options = RtspOptions()
    assert (options.transport, options.open_timeout_s, options.read_timeout_s) == ("tcp", 5.0, 5.0)
    assert (options.backoff_initial_s, options.backoff_max_s, options.max_retries) == (0.5, 10.0, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"transport": "carrier-pigeon"}, "transport"),
        ({"open_timeout_s": -1.0}, "open_timeout_s"),
        ({"open_timeout_s": 0}, "open_timeout_s"),
        ({"read_timeout_s": -0.5}, "read_timeout_s"),
        ({"read_timeout_s": "5"}, "read_timeout_s"),
        ({"backoff_initial_s": 0.0}, "backoff_initial_s"),
        ({"backoff_max_s": -2.0}, "backoff_max_s"),
        ({"backoff_initial_s": 2.0, "backoff_max_s": 1.0}, "backoff_max_s"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
    ],
)
def test_invalid_options_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RtspOptions(**kwargs)  # type: ignore[arg-type]


def test_backoff_doubles_from_initial_and_is_capped() -> None:
    options = RtspOptions(backoff_initial_s=0.5, backoff_max_s=3.0)
    assert [options.backoff_delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert options.backoff_delay(10_000) == 3.0
    with pytest.raises(ValueError):
        options.backoff_delay(-1)


@pytest.mark.parametrize(
    "url",
    [
        "rtsp://127.0.0.1:8554/face",
        "rtsps://user:secret@camera.local:322/stream1",
        "rtmp://example.com/live/key",
        "http://127.0.0.1:8080/video.mjpg",
        "HTTPS://example.com/clip.mp4",
    ],
)
def test_stream_urls_are_accepted(url: str) -> None:
    assert validate_url(url) == url


def test_local_files_are_accepted(tiny_clip: Path) -> None:
    assert validate_url(str(tiny_clip)) == str(tiny_clip)
    assert validate_url(f"file:{tiny_clip}") == f"file:{tiny_clip}"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "non-empty string"),
        ("   ", "non-empty string"),
        (None, "non-empty string"),
        (554, "non-empty string"),
        ("ftp://example.com/clip.mp4", "scheme 'ftp' is not one of"),
        ("rtsp://", "has no host"),
        ("rtsp:///path-only", "has no host"),
        ("/no/such/clip.mp4", "neither a stream URL"),
        ("file:/no/such/clip.mp4", "no such file"),
        ("x" * 5000, "neither a stream URL"),
    ],
)
def test_bad_urls_raise(url: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_url(url)
    with pytest.raises(ValueError, match=message):
        RtspSource(url, lambda rgb, index: None)  # type: ignore[arg-type]


def test_passwords_are_redacted() -> None:
    assert redact_url("rtsp://admin:hunter2@10.0.0.5:554/s1") == "rtsp://admin:***@10.0.0.5:554/s1"
    assert redact_url("rtsp://10.0.0.5/s1") == "rtsp://10.0.0.5/s1"
    source = RtspSource("rtsp://admin:hunter2@10.0.0.5/s1", lambda rgb, index: None)
    assert "hunter2" not in source.name


def test_on_frame_must_be_callable() -> None:
    with pytest.raises(ValueError, match="on_frame must be callable"):
        RtspSource("rtsp://127.0.0.1/x", None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- reading local files


def test_reads_rgb_frames_of_a_real_clip(make_source, clip: Path) -> None:
    source, recorder = make_source(str(clip), Recorder(stop_after=12))
    source.start()
    assert wait_until(lambda: source.state is StreamState.STOPPED, 20), (source.state, source.error)
    assert wait_until(lambda: not reader_alive(source), 5)
    assert source.frames == 12 and recorder.indices == list(range(12))
    assert all(f.shape == CLIP_SHAPE and f.dtype == np.uint8 for f in recorder.frames)
    np.testing.assert_array_equal(recorder.frames[0], first_frame(clip))
    assert recorder.state_names == [StreamState.STARTING, StreamState.RUNNING, StreamState.STOPPED]
    assert (source.reconnects, source.decode_errors, source.error) == (0, 0, None)


def test_end_of_file_reconnects_and_replays(make_source, tiny_clip: Path) -> None:
    source, recorder = make_source(str(tiny_clip), Recorder(stop_after=25), backoff_initial_s=0.05)
    source.start()
    assert wait_until(lambda: source.state is StreamState.STOPPED, 20), (source.state, source.error)
    assert recorder.indices == list(range(25))
    levels = [grey_level(f) for f in recorder.frames]
    assert levels == [i % TINY_FRAMES for i in range(25)]  # played three times, from the start each time
    assert source.reconnects == 2
    one_pass = [StreamState.RUNNING, StreamState.RECONNECTING]
    expected = [StreamState.STARTING, *one_pass, *one_pass, StreamState.RUNNING, StreamState.STOPPED]
    assert recorder.state_names == expected
    reconnect_errors = [error for state, error, _ in recorder.states if state is StreamState.RECONNECTING]
    assert all(error and "end of stream" in error for error in reconnect_errors)
    assert source.error is not None and "end of stream" in source.error


def test_corrupt_packet_is_counted_and_skipped(make_source, corrupt_clip: Path) -> None:
    good = TINY_FRAMES - 1
    source, recorder = make_source(str(corrupt_clip), Recorder(stop_after=good))
    source.start()
    assert wait_until(lambda: source.state is StreamState.STOPPED, 20), (source.state, source.error)
    assert source.decode_errors == 1
    assert [grey_level(f) for f in recorder.frames] == [i for i in range(TINY_FRAMES) if i != CORRUPT_FRAME]
    assert StreamState.RECONNECTING not in recorder.state_names  # skipped, not a reconnect


def test_on_frame_exception_does_not_kill_the_reader(
    make_source, tiny_clip: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder(stop_after=8, raise_on=(0, 1, 2))
    source, _ = make_source(str(tiny_clip), recorder)
    with caplog.at_level(logging.ERROR, logger=rtsp.__name__):
        source.start()
        assert wait_until(lambda: source.state is StreamState.STOPPED, 20), (source.state, source.error)
    assert recorder.indices == list(range(8)) and source.frames == 8
    assert [grey_level(f) for f in recorder.frames] == list(range(3, 8))
    raised = [r for r in caplog.records if "on_frame raised" in r.getMessage()]
    assert len(raised) == 3 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in raised)
    assert StreamState.FAILED not in recorder.state_names


# --------------------------------------------------------------------------- dead cameras


def test_unreachable_camera_fails_after_max_retries_with_backoff(
    make_source, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened_at: list[float] = []
    real_open = av.open

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        opened_at.append(time.monotonic())
        return real_open(*args, **kwargs)

    monkeypatch.setattr(rtsp.av, "open", recording_open)
    url = f"rtsp://127.0.0.1:{free_port()}/none"  # nothing listens: connection refused
    options = {"open_timeout_s": 2.0, "backoff_initial_s": 0.1, "backoff_max_s": 1.0, "max_retries": 2}
    source, recorder = make_source(url, **options)
    source.start()
    assert wait_until(lambda: source.state is StreamState.FAILED, 15), (source.state, source.error)
    assert wait_until(lambda: not reader_alive(source), 5), "the thread goes on after FAILED"
    assert recorder.state_names == [StreamState.STARTING, StreamState.RECONNECTING, StreamState.FAILED]
    assert len(opened_at) == 3  # the first open and max_retries = 2 retries
    gaps = np.diff(opened_at)
    assert gaps[0] >= 0.1 - 0.005 and gaps[1] >= 0.2 - 0.005, gaps  # 0.1 s, then doubled
    assert gaps[1] > gaps[0] * 1.5, gaps
    assert source.error is not None
    assert "Connection refused" in source.error and "gave up after 3 failed opens" in source.error
    assert recorder.states[-1][1] == source.error
    assert (source.frames, source.reconnects) == (0, 0)


def test_silent_server_times_out_the_open(make_source) -> None:
    with socket.socket() as listener:  # accepts the TCP connection, never answers the RTSP request
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"rtsp://127.0.0.1:{listener.getsockname()[1]}/silent"
        source, recorder = make_source(url, open_timeout_s=0.3, max_retries=0)
        started = time.monotonic()
        source.start()
        assert wait_until(lambda: source.state is StreamState.FAILED, 10), (source.state, source.error)
    assert time.monotonic() - started >= 0.3
    assert source.error is not None and "no answer within 0.3 s" in source.error
    assert recorder.state_names == [StreamState.STARTING, StreamState.FAILED]


def test_stop_during_backoff_returns_quickly(make_source) -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/none"
    source, recorder = make_source(url, backoff_initial_s=30.0, backoff_max_s=60.0)
    source.start()
    assert wait_until(lambda: source.state is StreamState.RECONNECTING, 10), (source.state, source.error)
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 1.0
    assert source.state is StreamState.STOPPED and not reader_alive(source)
    source.stop()  # idempotent: no second STOPPED
    assert recorder.state_names == [StreamState.STARTING, StreamState.RECONNECTING, StreamState.STOPPED]


def test_start_and_stop_lifecycle(tiny_clip: Path) -> None:
    never_started = RtspSource(str(tiny_clip), lambda rgb, index: None)
    assert never_started.state is StreamState.STARTING
    never_started.stop()
    assert never_started.state is StreamState.STOPPED
    with pytest.raises(RuntimeError, match="already started or stopped"):
        never_started.start()
    source = RtspSource(str(tiny_clip), lambda rgb, index: None)
    source.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            source.start()
    finally:
        source.stop()
    assert source.state is StreamState.STOPPED and not reader_alive(source)


# --------------------------------------------------------------------------- a real RTSP server


@functools.cache
def _rtsp_server_missing() -> str | None:
    return missing_peers()


def test_missing_rtsp_server_names_the_install_step() -> None:
    reason = missing_peers(python="/nonexistent/python3")
    assert reason is not None
    assert ".ci/install-peers" in reason and "gir1.2-gst-rtsp-server-1.0" in reason and "python3-gi" in reason


@pytest.fixture
def server(clip: Path) -> Iterator[RtspTestServer]:
    """GStreamer's RTSP server serving the real clip, looped, on a free port of 127.0.0.1."""
    reason = _rtsp_server_missing()
    if reason:
        pytest.skip(reason)
    with RtspTestServer(clip) as running:
        yield running


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_frames_arrive_from_a_real_rtsp_server(
    make_source, server: RtspTestServer, clip: Path, transport: str
) -> None:
    source, recorder = make_source(server.url, transport=transport, open_timeout_s=10.0)
    source.start()
    assert wait_until(lambda: source.frames >= 30, 30), (source.state, source.error, server.log_text())
    assert source.state is StreamState.RUNNING
    assert all(f.shape == CLIP_SHAPE and f.dtype == np.uint8 for f in recorder.frames[:30])
    assert np.abs(recorder.frames[0].astype(int) - first_frame(clip)).mean() < 1.0  # the clip's frame 0
    source.stop()
    assert source.state is StreamState.STOPPED and not reader_alive(source)
    assert recorder.state_names == [StreamState.STARTING, StreamState.RUNNING, StreamState.STOPPED]
    assert source.decode_errors == 0


@pytest.mark.integration
def test_reconnects_when_the_server_comes_back(make_source, server: RtspTestServer) -> None:
    options = {"open_timeout_s": 5.0, "read_timeout_s": 3.0, "backoff_initial_s": 0.2, "backoff_max_s": 1.0}
    source, recorder = make_source(server.url, **options)
    source.start()
    assert wait_until(lambda: source.frames >= 10, 30), (source.state, source.error, server.log_text())

    server.stop()
    assert wait_until(lambda: source.state is StreamState.RECONNECTING, 10), (source.state, source.error)
    time.sleep(1.0)  # some failed reopens while the server is down
    assert source.state is StreamState.RECONNECTING
    assert source.error is not None and "Connection refused" in source.error  # a reopen failed
    frames_while_down = source.frames

    server.start()  # same port, same URL
    assert wait_until(lambda: source.frames >= frames_while_down + 10, 30), (source.state, source.error)
    assert source.state is StreamState.RUNNING and source.reconnects >= 1
    names = recorder.state_names
    running, reconnecting = StreamState.RUNNING, StreamState.RECONNECTING
    assert names[:4] == [StreamState.STARTING, running, reconnecting, running], names
    assert recorder.indices == list(range(len(recorder.indices)))  # the index runs on across the gap
    source.stop()
    assert source.state is StreamState.STOPPED and not reader_alive(source)


@pytest.mark.integration
def test_stalled_server_counts_as_a_dead_camera(make_source, server: RtspTestServer) -> None:
    options = {"open_timeout_s": 2.0, "read_timeout_s": 1.0, "backoff_initial_s": 0.2, "backoff_max_s": 0.5}
    source, recorder = make_source(server.url, **options)
    source.start()
    assert wait_until(lambda: source.frames >= 10, 30), (source.state, source.error, server.log_text())

    server.pause()  # SIGSTOP: the TCP connection stays open, no data comes
    try:
        assert wait_until(lambda: source.state is StreamState.RECONNECTING, 10), (source.state, source.error)
    finally:
        server.resume()
    stall = next(error for state, error, _ in recorder.states if state is StreamState.RECONNECTING)
    assert stall is not None and "no answer within 1 s" in stall
    before = source.frames
    assert wait_until(lambda: source.frames >= before + 10, 30), (source.state, source.error)
    assert source.state is StreamState.RUNNING and source.reconnects >= 1
