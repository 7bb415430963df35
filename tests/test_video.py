"""Tests of facestream.engines.video: sources, errors, writers, masks and overlays.

The real clips come from the ``videos_dir`` fixture (tests/conftest.py): ``$FACESTREAM_DATA/videos``
or ``<repo>/../shared/data/videos``; tests that need them are skipped where the folder is absent.
Network tests only ever contact 127.0.0.1.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import av.error
import numpy as np
import pytest
from helpers import clip_path

from facestream.engines import video
from facestream.engines.video import (
    MAX_CONSECUTIVE_DECODE_ERRORS,
    PALETTE,
    VIDEO_CODEC,
    MaskWriter,
    VideoSource,
    VideoSourceError,
    VideoWriter,
    open_source,
    overlay,
    read_mask,
)

CLIP = "lp_d18.mp4"  # 480x480, 30 fps, 216 frames
CLIP_FRAMES = 216


@pytest.fixture(scope="module")
def clip(videos_dir: Path) -> Path:
    return clip_path(videos_dir, CLIP)


def _colour_frames(count: int, height: int, width: int) -> list[np.ndarray]:
    """``count`` flat frames, each a different colour."""
    return [
        np.full((height, width, 3), (20 + 20 * i, 200 - 15 * i, 60 + 10 * i), np.uint8) for i in range(count)
    ]


def _write_clip(path: Path, frames: list[np.ndarray], codec: str | None = None) -> None:
    height, width = frames[0].shape[:2]
    with VideoWriter(path, 30.0, width, height, codec=codec) as writer:
        for rgb in frames:
            writer.write(rgb)


def _unused_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- reading


def test_reads_clip_frames_with_max_frames(clip: Path) -> None:
    with open_source(str(clip), max_frames=20) as source:
        assert (source.width, source.height) == (480, 480)
        assert source.fps == pytest.approx(30.0, abs=0.01)
        assert source.frame_count == CLIP_FRAMES
        assert source.spec == str(clip)
        frames = list(source)
    assert [frame.index for frame in frames] == list(range(20))
    for frame in frames:
        assert frame.rgb.shape == (480, 480, 3)
        assert frame.rgb.dtype == np.uint8
        assert frame.rgb.flags.c_contiguous
    times = [frame.pts_s for frame in frames]
    assert times[0] == pytest.approx(0.0, abs=1e-6)
    assert times[1] == pytest.approx(1 / 30, abs=1e-3)
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    assert source.decode_errors == 0


def test_max_frames_zero_yields_nothing(clip: Path) -> None:
    with open_source(str(clip), max_frames=0) as source:
        assert list(source) == []


def test_close_is_idempotent(clip: Path) -> None:
    source = open_source(str(clip), max_frames=1)
    assert len(list(source)) == 1
    source.close()
    source.close()


def test_missing_file_raises_naming_the_spec(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.mp4")
    with pytest.raises(VideoSourceError, match="nope.mp4"):
        open_source(missing)


def test_non_video_file_raises_with_cause(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoSourceError, match="notes.mp4") as info:
        open_source(str(text))
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value.__cause__, av.error.FFmpegError)


def test_audio_only_file_raises_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(VideoSourceError, match="no video stream"):
        open_source(str(path))


def test_unreachable_rtsp_fails_quickly() -> None:
    url = f"rtsp://127.0.0.1:{_unused_local_port()}/stream"
    started = time.monotonic()
    with pytest.raises(VideoSourceError, match="RTSP stream") as info:
        open_source(url, timeout_s=2.0)
    assert time.monotonic() - started < 2.5
    assert url in str(info.value)


def test_unreachable_http_url_raises() -> None:
    url = f"http://127.0.0.1:{_unused_local_port()}/clip.mp4"
    with pytest.raises(VideoSourceError, match="video URL"):
        open_source(url, timeout_s=2.0)


@pytest.fixture
def silent_tcp_port() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in accepted:
        conn.close()


def test_silent_rtsp_server_times_out(silent_tcp_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(VideoSourceError, match="RTSP stream"):
        open_source(f"rtsp://127.0.0.1:{silent_tcp_port}/stream", timeout_s=1.0)
    assert time.monotonic() - started < 4.0


def test_missing_webcam_raises() -> None:
    if Path("/dev/video97").exists():
        pytest.skip("/dev/video97 exists on this machine")
    with pytest.raises(VideoSourceError, match=r"webcam '97' \(/dev/video97\)"):
        open_source("97", timeout_s=1.0)


def test_bad_arguments_raise_value_error(clip: Path) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        open_source(str(clip), timeout_s=0)
    with pytest.raises(ValueError, match="max_frames"):
        open_source(str(clip), max_frames=-1)


# ----------------------------------------------------------------------------- corrupt input


def test_corrupt_bytes_mid_stream_are_skipped(clip: Path, tmp_path: Path) -> None:
    data = bytearray(clip.read_bytes())
    rng = np.random.default_rng(0)
    for start in range(len(data) // 4, len(data) // 2, 8000):  # inside mdat; moov is at the end
        data[start : start + 1500] = rng.integers(0, 256, 1500, dtype=np.uint8).tobytes()
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(data))
    with open_source(str(corrupt)) as source:
        frames = list(source)
    assert CLIP_FRAMES // 2 < len(frames) <= CLIP_FRAMES
    assert [frame.index for frame in frames] == list(range(len(frames)))
    assert all(frame.rgb.shape == (480, 480, 3) for frame in frames)


def test_truncated_stream_yields_frames_then_ends(clip: Path, tmp_path: Path) -> None:
    transport_stream = tmp_path / "clip.ts"  # MPEG-TS has no index at the end to lose
    with av.open(str(clip)) as src, av.open(str(transport_stream), "w") as dst:
        out_stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out_stream
                dst.mux(packet)
    data = transport_stream.read_bytes()
    truncated = tmp_path / "truncated.ts"
    truncated.write_bytes(data[: len(data) // 2])
    with open_source(str(truncated)) as source:
        frames = list(source)
    assert 0 < len(frames) < CLIP_FRAMES


def test_truncated_mp4_without_index_fails_at_open(clip: Path, tmp_path: Path) -> None:
    data = clip.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoSourceError, match="truncated.mp4"):
        open_source(str(truncated))


class _FakeFrame:
    time = None

    def to_ndarray(self, format: str) -> np.ndarray:
        return np.zeros((2, 2, 3), np.uint8)


class _FakePacket:
    def __init__(self, ok: bool) -> None:
        self.ok = ok

    def decode(self) -> list[_FakeFrame]:
        if not self.ok:
            raise av.error.InvalidDataError(1094995529, "Invalid data found")
        return [_FakeFrame()]


def _source_of_packets(
    clip: Path, monkeypatch: pytest.MonkeyPatch, packets: list[_FakePacket]
) -> VideoSource:
    source = open_source(str(clip))
    monkeypatch.setattr(source, "_packets", lambda: iter(packets))
    return source


def test_bad_packets_are_counted_and_skipped(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packets = [_FakePacket(ok=i % 3 != 1) for i in range(9)]
    with _source_of_packets(clip, monkeypatch, packets) as source:
        frames = list(source)
    assert len(frames) == 6
    assert [frame.index for frame in frames] == list(range(6))
    assert source.decode_errors == 3


def test_too_many_consecutive_decode_errors_raise(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packets = [_FakePacket(ok=True)] + [_FakePacket(ok=False)] * (MAX_CONSECUTIVE_DECODE_ERRORS + 5)
    with _source_of_packets(clip, monkeypatch, packets) as source:
        frames = source.__iter__()
        assert next(frames).index == 0
        with pytest.raises(VideoSourceError, match="consecutive decode errors") as info:
            next(frames)
    assert source.decode_errors == MAX_CONSECUTIVE_DECODE_ERRORS
    assert isinstance(info.value.__cause__, av.error.InvalidDataError)


# ----------------------------------------------------------------------------- writing


CODECS = sorted({VIDEO_CODEC, "mpeg4"})


@pytest.mark.parametrize("codec", CODECS)
def test_video_writer_round_trip(tmp_path: Path, codec: str) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"PyAV has no {codec} encoder")
    frames = _colour_frames(10, 48, 64)
    path = tmp_path / "out.mp4"
    _write_clip(path, frames, codec=codec)
    with open_source(str(path)) as source:
        assert (source.width, source.height) == (64, 48)
        assert source.fps == pytest.approx(30.0, abs=0.01)
        decoded = list(source)
    assert len(decoded) == 10
    for written, frame in zip(frames, decoded, strict=True):
        error = np.abs(frame.rgb.astype(int) - written.astype(int)).mean(axis=(0, 1))
        assert error.max() < 8, f"frame {frame.index}: mean colour error {error}"


def test_video_writer_pads_odd_sizes(tmp_path: Path) -> None:
    frames = _colour_frames(4, 47, 63)
    path = tmp_path / "odd.mp4"
    with VideoWriter(path, 25.0, 63, 47) as writer:
        assert (writer.encoded_width, writer.encoded_height) == (64, 48)
        for rgb in frames:
            writer.write(rgb)
        assert writer.frames_written == 4
    with open_source(str(path)) as source:
        assert (source.width, source.height) == (64, 48)
        decoded = list(source)
    assert len(decoded) == 4
    for written, frame in zip(frames, decoded, strict=True):
        error = np.abs(frame.rgb[:47, :63].astype(int) - written.astype(int)).mean()
        assert error < 8


def test_video_writer_rejects_bad_frames(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "bad.mp4", 30.0, 64, 48) as writer:
        with pytest.raises(ValueError, match=r"\(48, 64, 3\)"):
            writer.write(np.zeros((64, 48, 3), np.uint8))
        with pytest.raises(ValueError, match=r"\(H,W,3\)"):
            writer.write(np.zeros((48, 64), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((48, 64, 3), np.float32))
        writer.write(np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="closed"):
        writer.write(np.zeros((48, 64, 3), np.uint8))


def test_video_writer_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fps"):
        VideoWriter(tmp_path / "a.mp4", 0, 64, 48)
    with pytest.raises(ValueError, match="width and height"):
        VideoWriter(tmp_path / "a.mp4", 30, 0, 48)
    with pytest.raises(ValueError, match="codec"):
        VideoWriter(tmp_path / "a.mp4", 30, 64, 48, codec="vp9")
    with pytest.raises(ValueError, match="not a folder"):
        VideoWriter(tmp_path, 30, 64, 48)  # an existing folder
    with pytest.raises(ValueError, match="not a folder"):
        VideoWriter(tmp_path / "masks", 30, 64, 48)  # no extension
    with pytest.raises(ValueError, match="use .mp4 or .mkv"):
        VideoWriter(tmp_path / "a.notacontainer", 30, 64, 48)


# ----------------------------------------------------------------------------- masks


def test_mask_writer_round_trip_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 5, size=(37, 53), dtype=np.uint8)
    mask[0, :3] = (255, 254, 7)  # any uint8 value survives
    writer = MaskWriter(tmp_path / "masks" / "clip")
    path = writer.write(7, mask)
    assert path == tmp_path / "masks" / "clip" / "000007.png"
    loaded = read_mask(path)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, mask)


def test_mask_writer_rejects_bad_masks(tmp_path: Path) -> None:
    writer = MaskWriter(tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        writer.write(0, np.zeros((4, 4), np.int64))
    with pytest.raises(ValueError, match=r"\(H,W\)"):
        writer.write(0, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="index"):
        writer.write(-1, np.zeros((4, 4), np.uint8))


def test_read_mask_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_mask(tmp_path / "missing.png")


# ----------------------------------------------------------------------------- overlay


def test_palette_has_distinct_class_colours() -> None:
    assert PALETTE.shape == (5, 3)
    assert PALETTE.dtype == np.uint8
    assert PALETTE[0].tolist() == [0, 0, 0]
    distances = np.abs(PALETTE[:, None].astype(int) - PALETTE[None].astype(int)).sum(-1)
    assert distances[~np.eye(5, dtype=bool)].min() > 150


def test_overlay_colours_face_pixels_only() -> None:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    for class_id in range(1, 5):
        mask[class_id * 4 : class_id * 4 + 3, 5:25] = class_id
    blended = overlay(rgb, mask, alpha=0.5)
    background = mask == 0
    np.testing.assert_array_equal(blended[background], rgb[background])
    expected = (rgb[~background].astype(float) + PALETTE[mask[~background]]) / 2
    assert np.abs(blended[~background] - expected).max() <= 0.5 + 1e-9
    solid = overlay(rgb, mask, alpha=1.0)
    np.testing.assert_array_equal(solid[~background], PALETTE[mask[~background]])
    assert rgb.dtype == np.uint8 and blended.shape == rgb.shape


def test_overlay_without_mask_returns_a_copy() -> None:
    rgb = np.full((4, 4, 3), 9, np.uint8)
    out = overlay(rgb, None)
    np.testing.assert_array_equal(out, rgb)
    assert out is not rgb and not np.shares_memory(out, rgb)


def test_overlay_validates_shapes() -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    with pytest.raises(ValueError, match="does not match"):
        overlay(rgb, np.zeros((6, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(H,W,3\)"):
        overlay(np.zeros((4, 6), np.uint8), np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError, match="class ids"):
        overlay(rgb, np.full((4, 6), 5, np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        overlay(rgb, np.zeros((4, 6), np.uint8), alpha=1.5)


def test_module_exposes_codec_choice() -> None:
    assert video.VIDEO_CODEC in {"libx264", "mpeg4"}
    assert (video.VIDEO_CODEC == "libx264") == ("libx264" in av.codecs_available)
