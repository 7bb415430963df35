"""Where the face is: detection on key frames and the square 1.3x crop (300VW recipe).

The crop is a square of side ``scale`` x the face box's mean side, centred on the box. Parts of
the square outside the frame are filled with black rather than clipped away, so the network always
sees an undistorted square; masks are pasted back only where the square overlaps the frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np


class Box(NamedTuple):
    """An axis-aligned box in frame pixels: [x0, x1) x [y0, y1) (floats)."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def square(self, scale: float) -> Box:
        """The square of side ``scale`` x mean(width, height) centred on this box."""
        side = scale * (self.width + self.height) / 2.0
        cx, cy = (self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0
        return Box(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)

    def as_list(self) -> list[float]:
        return [round(v, 2) for v in self]


@dataclass(frozen=True)
class CropConfig:
    """``scale``: square side over the face box side (1.3 as in 300VW). The Haar detector's box
    is wider and sits higher than the landmark box of the recipe: ``detector_scale`` and
    ``detector_shift`` (fraction of the box height, downwards) map one onto the other."""

    scale: float = 1.3
    detector_scale: float = 0.9
    detector_shift: float = 0.08
    detect_width: int = 320  # Haar runs on the frame scaled to this width: 23 ms vs 45 ms at 480
    min_face: float = 0.06  # smallest face side, as a fraction of the frame's shorter side
    mask_confidence: float = 0.75  # mean max-probability over face pixels to trust the mask box
    min_mask_pixels: int = 64


def crop_square(frame: np.ndarray, box: Box, size: int, *, nearest: bool = False) -> np.ndarray:
    """The square ``box`` of ``frame`` resized to ``size`` x ``size`` (black outside the frame).

    ``nearest`` samples without interpolation: for label maps of class ids.
    """
    side = box.width
    s = size / side
    matrix = np.array([[s, 0.0, -box.x0 * s], [0.0, s, -box.y0 * s]], dtype=np.float64)
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.warpAffine(frame, matrix, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT)


def plane_argmax(planes: list[np.ndarray]) -> np.ndarray:
    """``np.argmax(np.stack(planes), axis=0)`` as uint8 (the first maximum wins) for up to 256
    same-shape float32 planes, by OpenCV's vectorised compare, masked copy and max: several times
    faster than numpy's argmax over a short axis."""
    best = planes[0].copy()
    index = np.zeros(best.shape, np.uint8)
    label = np.empty_like(index)
    for k, plane in enumerate(planes[1:], start=1):
        label.fill(k)
        cv2.copyTo(label, cv2.compare(plane, best, cv2.CMP_GT), index)  # strictly greater only
        cv2.max(best, plane, dst=best)
    return index


PASTE_MARGIN = 2  # label pixels replicated around the resampled box (covers the rounding)


def paste_scores(scores: np.ndarray, box: Box, frame_hw: tuple[int, int]) -> np.ndarray:
    """N_task's resampling and argmax: class scores (K, h, w) over the square ``box`` ->
    a full-frame (H, W) uint8 mask of class ids, background outside the box.

    The scores are resampled bilinearly (pixel centres, align_corners=False, edges replicated) at
    exactly the box's scale, by OpenCV's resize (a tenth of the cost of an affine warp), onto
    frame pixels counted from the box's corner rounded to the nearest pixel: the mask lies at most
    half a pixel from where the fractional box would put it.
    """
    height, width = frame_hw
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0 = max(int(np.floor(box.x0)), 0), max(int(np.floor(box.y0)), 0)
    x1, y1 = min(int(np.ceil(box.x1)), width), min(int(np.ceil(box.y1)), height)
    if x1 <= x0 or y1 <= y0 or box.width < 1 or box.height < 1:
        return mask
    _, h, w = scores.shape
    # With fx/fy (no dsize) OpenCV maps output pixel i to grid coordinate (i + 0.5) / fx - 0.5.
    fx, fy = box.width / w, box.height / h
    resampled = [
        cv2.resize(plane, None, fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR)
        for plane in np.ascontiguousarray(scores, dtype=np.float32)
    ]
    m = PASTE_MARGIN
    labels = cv2.copyMakeBorder(plane_argmax(resampled), m, m, m, m, cv2.BORDER_REPLICATE)
    left, top = round(box.x0) - m, round(box.y0) - m  # frame position of labels[0, 0]
    mask[y0:y1, x0:x1] = labels[y0 - top : y1 - top, x0 - left : x1 - left]
    return mask


MAX_TRACK_SHIFT = 0.5  # the tracked square moves at most this fraction of its side from the key's


def track_box(box: Box, key_box: Box, flow: np.ndarray, scores: np.ndarray, *, min_pixels: int = 16) -> Box:
    """Where the next non-key frame's crop is cut: ``box`` (this frame's crop square) moved with
    the face.

    ``flow`` (2, h, w): this frame's flow to the key frame (x first, in pixels of the h x w warp
    grid over ``box``); ``scores`` (K, h', w'): this frame's warped class scores. A face pixel at
    grid position p of this crop sits at p + flow(p) in the key's crop, so the face moved by
    -median(flow) over its pixels relative to ``box``; the next square is shifted by that much
    (frame-to-frame motion is small, so one frame's lag keeps the face centred). Without enough
    face pixels the square stays. The shift from ``key_box`` is capped at MAX_TRACK_SHIFT x side.
    """
    labels = scores.argmax(axis=0) > 0
    if labels.shape != flow.shape[1:]:
        labels = cv2.resize(labels.astype(np.uint8), flow.shape[:0:-1], interpolation=cv2.INTER_NEAREST) > 0
    if int(labels.sum()) < min_pixels:
        return box
    dx, dy = (float(np.median(flow[c][labels])) * box.width / flow.shape[2 - c] for c in (0, 1))
    limit = MAX_TRACK_SHIFT * key_box.width
    x0 = float(np.clip(box.x0 - dx, key_box.x0 - limit, key_box.x0 + limit))
    y0 = float(np.clip(box.y0 - dy, key_box.y0 - limit, key_box.y0 + limit))
    return Box(x0, y0, x0 + box.width, y0 + box.height)


def _cascade_path() -> Path:
    folder = cv2.data.haarcascades  # type: ignore[attr-defined]
    path = Path(folder) / "haarcascade_frontalface_default.xml"
    if not path.is_file():
        raise FileNotFoundError(f"OpenCV's bundled face detector is missing: {path}")
    return path


class FaceLocator:
    """Finds the face box on key frames: from the previous key's mask when that is confident,
    else with OpenCV's bundled Haar cascade (largest face)."""

    def __init__(self, config: CropConfig | None = None) -> None:
        self.config = config or CropConfig()
        self._cascade = cv2.CascadeClassifier(str(_cascade_path()))

    def detect(self, frame: np.ndarray) -> Box | None:
        """Largest Haar face in an RGB frame, mapped onto the landmark-box convention."""
        cfg = self.config
        height, width = frame.shape[:2]
        factor = min(1.0, cfg.detect_width / max(width, height))
        small = cv2.resize(frame, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        min_side = max(20, int(cfg.min_face * min(small.shape[:2])))
        faces = self._cascade.detectMultiScale(gray, 1.15, 4, minSize=(min_side, min_side))
        if len(faces) == 0:
            return None
        x, y, w, h = (float(v) / factor for v in max(faces, key=lambda f: f[2] * f[3]))
        side = w * cfg.detector_scale
        cx, cy = x + w / 2, y + h / 2 + cfg.detector_shift * h
        return Box(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)

    def from_mask(self, mask: np.ndarray, confidence: float, square: Box) -> Box | None:
        """The face box of the latest mask (bounding box of its non-background pixels), or None
        when the mask is small, not confident, or touches the border of the square it came from
        (the face may then extend beyond it)."""
        cfg = self.config
        if confidence < cfg.mask_confidence:
            return None
        ys, xs = np.nonzero(mask)
        if len(xs) < cfg.min_mask_pixels:
            return None
        box = Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        margin = 0.02 * square.width
        height, width = mask.shape
        inside = (
            box.x0 > max(square.x0, 0) + margin
            and box.y0 > max(square.y0, 0) + margin
            and box.x1 < min(square.x1, width) - margin
            and box.y1 < min(square.y1, height) - margin
        )
        return box if inside else None

    def locate(
        self,
        frame: np.ndarray,
        mask: np.ndarray | None = None,
        confidence: float = 0.0,
        square: Box | None = None,
    ) -> Box | None:
        """The face box for a key frame, or None when there is no face.

        ``mask``/``confidence``/``square``: the latest mask, its confidence and the crop square
        it was computed in; used instead of the detector when trustworthy."""
        box = None
        if mask is not None and square is not None:
            box = self.from_mask(mask, confidence, square)
        return box if box is not None else self.detect(frame)
