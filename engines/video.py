"""Video input and output: decode files, webcams and RTSP streams to RGB frames; write mp4 clips,
per-frame class-id masks and colour overlays.

Sources (:func:`open_source`):

- a file path or an ``http(s)://`` URL;
- a webcam index, a string of digits such as ``"0"`` -> ``/dev/video0`` through Video4Linux2;
- an ``rtsp://`` / ``rtsps://`` URL, pulled over TCP with a socket timeout.

Masks are ``(H,W)`` uint8 class ids: 0 background, 1 skin, 2 eyes, 3 outer mouth, 4 inner mouth.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import av
import av.error
import cv2
import numpy as np

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0
MAX_CONSECUTIVE_DECODE_ERRORS = 50
WEBCAM_DEVICE = "/dev/video{index}"
RTSP_SCHEMES = ("rtsp://", "rtsps://")

PALETTE = np.array(
    [
        (0, 0, 0),  # 0 background
        (255, 160, 64),  # 1 skin: orange
        (0, 128, 255),  # 2 eyes: blue
        (230, 0, 160),  # 3 outer mouth: magenta
        (0, 220, 0),  # 4 inner mouth: green
    ],
    dtype=np.uint8,
)
"""RGB colour of each class id, shape (5, 3) uint8; row ``k`` colours class ``k``."""
PALETTE.setflags(write=False)
NUM_CLASSES = len(PALETTE)
# PNG options for class-id masks: no row filter and run-length deflate. Masks are long runs of a
# few values, so filtering buys nothing: this encodes a 640x480 mask in about a quarter of the
# time of OpenCV's default filters, and about a third of the bytes (README, "Service benchmark").
MASK_PNG = [
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_NONE,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
]


class _Closing:
    """Context-manager support for objects with a ``close()``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class VideoSourceError(ValueError):
    """A video source cannot be opened or read (missing, unreachable, not a video, corrupt)."""


@dataclass(frozen=True)
class VideoFrame:
    """One decoded frame.

    ``index`` counts the frames this source yielded, from 0; ``rgb`` is (H,W,3) uint8
    C-contiguous; ``pts_s`` is the presentation time in seconds, None when the stream has none.
    """

    index: int
    rgb: np.ndarray
    pts_s: float | None


# ----------------------------------------------------------------------------- sources


def open_source(spec: str, *, timeout_s: float = 10.0, max_frames: int | None = None) -> VideoSource:
    """Open a file path, http(s) URL, webcam index (``"0"``) or ``rtsp(s)://`` URL.

    ``timeout_s`` bounds connecting to and reading from network sources; ``max_frames`` stops
    iteration after that many frames. Raises :class:`VideoSourceError` naming ``spec`` when the
    source is missing, unreachable or has no video stream.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0 or None, got {max_frames}")
    plan = _plan_open(spec, timeout_s)
    try:
        container = av.open(plan.url, **plan.av_kwargs)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoSourceError(f"cannot open {plan.what}: {exc}") from exc
    return VideoSource(container, spec, threaded=plan.threaded, max_frames=max_frames)


class _OpenPlan(NamedTuple):
    url: str
    av_kwargs: dict[str, Any]
    what: str
    """``spec`` in words for error messages, e.g. ``webcam '0' (/dev/video0)``."""
    threaded: bool


def _plan_open(spec: str, timeout_s: float) -> _OpenPlan:
    """How to open ``spec`` with ``av.open``: URL, keyword arguments, a description."""
    if spec.isdigit():
        device = WEBCAM_DEVICE.format(index=int(spec))
        kwargs: dict[str, Any] = {"format": "v4l2", "timeout": timeout_s}
        return _OpenPlan(device, kwargs, f"webcam {spec!r} ({device})", threaded=False)
    if spec.lower().startswith(RTSP_SCHEMES):
        # FFmpeg's RTSP demuxer: "timeout" is the socket I/O timeout in microseconds.
        options = {"rtsp_transport": "tcp", "timeout": str(int(timeout_s * 1e6))}
        kwargs = {"options": options, "timeout": timeout_s}
        return _OpenPlan(spec, kwargs, f"RTSP stream {spec!r}", threaded=False)
    if "://" in spec:
        return _OpenPlan(spec, {"timeout": timeout_s}, f"video URL {spec!r}", threaded=True)
    if not Path(spec).is_file():
        raise VideoSourceError(f"video file {spec!r} does not exist or is not a file")
    return _OpenPlan(spec, {}, f"video file {spec!r}", threaded=True)


class VideoSource(_Closing):
    """Decoded RGB frames of one opened container; a single-pass iterable of :class:`VideoFrame`.

    A packet that fails to decode with ``InvalidDataError`` is skipped and counted in
    ``decode_errors``; :data:`MAX_CONSECUTIVE_DECODE_ERRORS` failures in a row raise
    :class:`VideoSourceError`. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        container: av.container.InputContainer,
        spec: str,
        *,
        threaded: bool = False,
        max_frames: int | None = None,
    ) -> None:
        if not container.streams.video:
            container.close()
            raise VideoSourceError(f"{spec!r} has no video stream")
        self.spec = spec
        self.max_frames = max_frames
        self.decode_errors = 0
        self._container = container
        self._stream = container.streams.video[0]
        if threaded:
            self._stream.thread_type = "AUTO"
        self.fps = _stream_fps(self._stream)
        self.width: int = self._stream.codec_context.width
        self.height: int = self._stream.codec_context.height
        self.frame_count: int | None = self._stream.frames or None
        self._next_index = 0
        self._closed = False

    def __iter__(self) -> Iterator[VideoFrame]:
        if self._reached_max_frames():
            return
        for frame in self._decoded():
            yield self._to_video_frame(frame)
            if self._reached_max_frames():
                return

    def _reached_max_frames(self) -> bool:
        return self.max_frames is not None and self._next_index >= self.max_frames

    def _to_video_frame(self, frame: av.VideoFrame) -> VideoFrame:
        rgb = np.ascontiguousarray(frame.to_ndarray(format="rgb24"))
        video_frame = VideoFrame(self._next_index, rgb, frame.time)
        self._next_index += 1
        return video_frame

    def _decoded(self) -> Iterator[av.VideoFrame]:
        """Frames of every packet, skipping packets that fail to decode."""
        consecutive = 0
        for packet in self._packets():
            try:
                frames = packet.decode()
            except av.error.InvalidDataError as exc:
                consecutive = self._count_decode_error(exc, consecutive)
                continue
            consecutive = 0
            yield from frames

    def _packets(self) -> Iterator[av.Packet]:
        """Demuxed packets of the video stream; resumes demuxing after a corrupt read.

        Other read failures (a dropped connection, a read timeout) raise VideoSourceError.
        """
        consecutive = 0
        packets = self._container.demux(self._stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.InvalidDataError as exc:
                consecutive = self._count_decode_error(exc, consecutive)
                packets = self._container.demux(self._stream)
                continue
            except (av.error.FFmpegError, OSError) as exc:
                raise VideoSourceError(f"reading {self.spec!r} failed: {exc}") from exc
            consecutive = 0
            yield packet

    def _count_decode_error(self, exc: Exception, consecutive: int) -> int:
        """Count one skipped packet; raise once too many failed in a row."""
        self.decode_errors += 1
        consecutive += 1
        log.warning("%s: skipping undecodable data (%s)", self.spec, exc)
        if consecutive >= MAX_CONSECUTIVE_DECODE_ERRORS:
            raise VideoSourceError(
                f"{self.spec!r}: {consecutive} consecutive decode errors, giving up"
            ) from exc
        return consecutive

    def close(self) -> None:
        """Release the container; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._container.close()

    def __repr__(self) -> str:
        return (
            f"VideoSource({self.spec!r}, {self.width}x{self.height}, fps={self.fps:.3g}, "
            f"frame_count={self.frame_count})"
        )


def _stream_fps(stream: av.VideoStream) -> float:
    """Average (else guessed) frame rate of ``stream``; :data:`DEFAULT_FPS` when unknown."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    return DEFAULT_FPS


# ----------------------------------------------------------------------------- writers


def _pick_codec() -> str:
    """``libx264`` when this PyAV build has the encoder, else ``mpeg4``."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


VIDEO_CODEC = _pick_codec()
CODEC_OPTIONS = {
    "libx264": {"crf": "18", "preset": "veryfast"},
    "mpeg4": {"qscale": "3"},
}


class VideoWriter(_Closing):
    """Write RGB uint8 frames to an mp4, yuv420p, ``codec`` (default :data:`VIDEO_CODEC`).

    ``width``/``height`` are the size of the frames passed to :meth:`write`. yuv420p needs even
    sizes, so an odd side is padded by one pixel (a copy of the last row/column) in the file:
    the encoded size is ``encoded_width`` x ``encoded_height``.
    """

    def __init__(
        self, path: str | Path, fps: float, width: int, height: int, *, codec: str | None = None
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be > 0, got {width}x{height}")
        self.path = Path(path)
        self.fps = float(fps)
        self.width, self.height = int(width), int(height)
        self.encoded_width = self.width + self.width % 2
        self.encoded_height = self.height + self.height % 2
        self.codec = codec or VIDEO_CODEC
        if self.codec not in CODEC_OPTIONS:
            raise ValueError(f"codec must be one of {sorted(CODEC_OPTIONS)}, got {self.codec!r}")
        self.frames_written = 0
        if self.path.is_dir() or not self.path.suffix:
            raise ValueError(f"video output {path} must be a file name such as out.mp4, not a folder")
        try:
            self._container = av.open(str(self.path), mode="w")
        except (av.FFmpegError, ValueError) as error:
            raise ValueError(f"cannot write a video to {path} (use .mp4 or .mkv): {error}") from error
        try:
            self._stream = self._add_stream()
        except Exception:
            self._container.close()
            raise
        self._closed = False

    def _add_stream(self) -> av.VideoStream:
        rate = Fraction(self.fps).limit_denominator(1001)
        stream = self._container.add_stream(self.codec, rate=rate, options=CODEC_OPTIONS[self.codec])
        if not isinstance(stream, av.VideoStream):
            raise TypeError(f"codec {self.codec!r} did not give a video stream")
        stream.width, stream.height = self.encoded_width, self.encoded_height
        stream.pix_fmt = "yuv420p"
        return stream

    def write(self, rgb: np.ndarray) -> None:
        """Encode one (height, width, 3) uint8 RGB frame."""
        if self._closed:
            raise ValueError(f"VideoWriter({self.path}) is closed")
        _check_rgb(rgb, (self.height, self.width))
        frame = av.VideoFrame.from_ndarray(self._pad_even(rgb), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = self.frames_written
        self._container.mux(self._stream.encode(frame))
        self.frames_written += 1

    def _pad_even(self, rgb: np.ndarray) -> np.ndarray:
        pad_rows = self.encoded_height - self.height
        pad_cols = self.encoded_width - self.width
        if pad_rows or pad_cols:
            rgb = np.pad(rgb, ((0, pad_rows), (0, pad_cols), (0, 0)), mode="edge")
        return np.ascontiguousarray(rgb)

    def close(self) -> None:
        """Flush the encoder and finish the file; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()


class MaskWriter:
    """Save (H,W) uint8 class-id masks as lossless PNGs ``<directory>/<index:06d>.png``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path_for(self, index: int) -> Path:
        """Where the mask of frame ``index`` is saved."""
        return self.directory / f"{index:06d}.png"

    def write(self, index: int, mask: np.ndarray) -> Path:
        """Save ``mask`` of frame ``index``; returns the file written."""
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")
        if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.ndim != 2:
            got = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask)
            raise ValueError(f"expected an (H,W) uint8 mask of class ids, got {got}")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(index)
        if not cv2.imwrite(str(path), np.ascontiguousarray(mask), MASK_PNG):
            raise OSError(f"cv2.imwrite could not write mask PNG {path}")
        return path


def read_mask(path: str | Path) -> np.ndarray:
    """Load a mask PNG written by :class:`MaskWriter`: (H,W) uint8 class ids, exactly as saved."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise FileNotFoundError(f"cannot read mask PNG {path}: missing or not an image")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"{path} is not a single-channel uint8 mask: {mask.dtype} {mask.shape}")
    return mask


# ----------------------------------------------------------------------------- overlay


def overlay(rgb: np.ndarray, mask: np.ndarray | None, alpha: float = 0.5) -> np.ndarray:
    """Blend :data:`PALETTE` colours over the non-background pixels of ``rgb``.

    ``rgb`` is (H,W,3) uint8, ``mask`` (H,W) integer class ids in ``[0, 5)`` or None (then a
    copy of ``rgb`` is returned). ``alpha`` is the weight of the class colour. Background
    pixels (class 0) are returned unchanged. Returns a new (H,W,3) uint8 array.
    """
    _check_rgb(rgb, None)
    out = rgb.copy()
    if mask is None:
        return out
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_mask(mask, rgb.shape[:2])
    face = mask > 0
    colours = PALETTE[mask[face]].astype(np.float32)
    blended = (1.0 - alpha) * rgb[face].astype(np.float32) + alpha * colours
    out[face] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def _check_rgb(rgb: np.ndarray, size: tuple[int, int] | None) -> None:
    """Raise ValueError unless ``rgb`` is (H,W,3) uint8, of (H,W) == ``size`` when given."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        kind = getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(f"expected a uint8 numpy RGB image, got {kind}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H,W,3), got {rgb.shape}")
    if size is not None and rgb.shape[:2] != size:
        raise ValueError(f"expected an RGB image of shape {(*size, 3)}, got {rgb.shape}")


def _check_mask(mask: np.ndarray, size: tuple[int, int]) -> None:
    """Raise ValueError unless ``mask`` is (H,W) integer class ids in ``[0, NUM_CLASSES)``."""
    if not isinstance(mask, np.ndarray) or not np.issubdtype(mask.dtype, np.integer):
        kind = getattr(mask, "dtype", type(mask).__name__)
        raise ValueError(f"expected an integer numpy mask of class ids, got {kind}")
    if mask.ndim != 2:
        raise ValueError(f"expected a mask of shape (H,W), got {mask.shape}")
    if mask.shape != size:
        raise ValueError(f"mask shape {mask.shape} does not match the image size {size}")
    if mask.size and (mask.min() < 0 or mask.max() >= NUM_CLASSES):
        raise ValueError(f"mask class ids must be in [0, {NUM_CLASSES}), got {mask.min()}..{mask.max()}")
