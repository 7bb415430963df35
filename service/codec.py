"""Frames in (JPEG, PNG or WebP bytes -> RGB) and masks out (PNG, run-length, raw).

Image dimensions are read from the header before anything is decoded, so that an oversized
picture is refused without allocating it.
"""

from __future__ import annotations

import struct
from typing import Any

import cv2
import numpy as np

from facestream.engines.video import MASK_PNG

BAD_FRAME_REASONS = ("empty", "too_large", "not_image", "corrupt", "too_many_pixels")


class BadFrame(ValueError):
    """A frame that cannot be segmented; ``reason`` is one of :data:`BAD_FRAME_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def image_format(data: bytes) -> str | None:
    """``jpeg``, ``png`` or ``webp`` from the magic bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header, or None when the header is unreadable."""
    try:
        if fmt == "png":
            return struct.unpack(">II", data[16:24]) if data[12:16] == b"IHDR" else None
        if fmt == "jpeg":
            return _jpeg_size(data)
        return _webp_size(data)
    except struct.error:
        return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def decode_frame(data: bytes, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """An (H, W, 3) uint8 RGB frame from image bytes; raises :class:`BadFrame` naming the problem."""
    if not data:
        raise BadFrame("empty", "empty frame: send the JPEG, PNG or WebP bytes of one picture")
    if len(data) > max_bytes:
        raise BadFrame("too_large", f"frame of {len(data)} bytes is over the limit of {max_bytes} bytes")
    fmt = image_format(data)
    if fmt is None:
        raise BadFrame("not_image", f"not a JPEG, PNG or WebP picture (starts with {data[:8].hex()})")
    size = image_size(data, fmt)
    if size is None or min(size) < 1:
        raise BadFrame("corrupt", f"corrupt {fmt.upper()}: unreadable header")
    if size[0] * size[1] > max_pixels:
        raise BadFrame(
            "too_many_pixels", f"{size[0]}x{size[1]} {fmt.upper()} is over the limit of {max_pixels} pixels"
        )
    if fmt == "jpeg" and b"\xff\xd9" not in data[-64:]:
        raise BadFrame("corrupt", "corrupt JPEG: truncated (no end-of-image marker)")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.ndim != 3 or (bgr.shape[1], bgr.shape[0]) != tuple(size):
        raise BadFrame("corrupt", f"corrupt {fmt.upper()}: the picture does not decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_mask(mask: np.ndarray, fmt: str) -> tuple[bytes | None, dict[str, Any]]:
    """The (H, W) uint8 class-id mask as ``fmt``: (binary payload or None, extra metadata).

    ``png``: a greyscale PNG whose pixel values are the class ids; ``raw``: H*W bytes, row-major;
    ``rle``: row-major runs in the metadata (``{"values": [...], "counts": [...]}``); ``none``.
    """
    if fmt == "png":
        ok, buf = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 1, *MASK_PNG])
        if not ok:
            raise RuntimeError("PNG encoding of the mask failed")
        return buf.tobytes(), {}
    if fmt == "raw":
        return np.ascontiguousarray(mask, dtype=np.uint8).tobytes(), {}
    if fmt == "rle":
        return None, {"rle": run_length(mask)}
    if fmt == "none":
        return None, {}
    raise ValueError(f"unknown mask format {fmt!r}")


def run_length(mask: np.ndarray) -> dict[str, list[int]]:
    flat = np.ascontiguousarray(mask).reshape(-1)
    if flat.size == 0:
        return {"values": [], "counts": []}
    starts = np.flatnonzero(np.concatenate(([True], flat[1:] != flat[:-1])))
    counts = np.diff(np.append(starts, flat.size))
    return {"values": flat[starts].astype(int).tolist(), "counts": counts.astype(int).tolist()}


def decode_run_length(rle: dict[str, list[int]], height: int, width: int) -> np.ndarray:
    """The inverse of :func:`run_length`."""
    mask = np.repeat(np.asarray(rle["values"], np.uint8), np.asarray(rle["counts"], np.int64))
    if mask.size != height * width:
        raise ValueError(f"run-length covers {mask.size} pixels, expected {height}x{width}")
    return mask.reshape(height, width)
