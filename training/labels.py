"""Segmentation labels from 68 facial landmarks (the 300VW-Mask recipe, PAPER-NOTES §7).

Landmarks are the iBUG 68-point scheme; the numbers below are 1-based as in ``.pts`` files.
Every part's outline is a chain of cubic-spline runs through its landmarks, sampled at parameter
steps of 0.01 between consecutive landmarks; the closed polygon is filled. Paint order (later
overwrites earlier): skin, eyes, outer mouth, inner mouth.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from facestream.engines.face import Box

BACKGROUND, SKIN, EYES, OUTER_MOUTH, INNER_MOUTH = range(5)

# Each part: (class id, list of polygons; a polygon is a list of spline runs of 1-based landmarks).
PARTS: tuple[tuple[int, tuple[tuple[tuple[int, ...], ...], ...]], ...] = (
    (SKIN, ((tuple(range(1, 18)), tuple(range(27, 22, -1)), tuple(range(22, 17, -1))),)),
    (
        EYES,
        (
            ((37, 38, 39, 40), (40, 41, 42, 37)),
            ((43, 44, 45, 46), (46, 47, 48, 43)),
        ),
    ),
    (OUTER_MOUTH, (((49, 50, 51, 52), (52, 53, 54, 55), (55, 56, 57, 58, 59, 60, 49)),)),
    (INNER_MOUTH, (((61, 62, 63, 64, 65), (65, 66, 67, 68, 61)),)),
)
SPLINE_STEP = 0.01
CROP_SCALE = 1.3


class PtsError(ValueError):
    """A ``.pts`` file that does not hold a valid landmark set."""


def read_pts(path: str | Path) -> np.ndarray:
    """An iBUG ``.pts`` file -> (N, 2) float64 landmarks (x, y), 0-based pixel coordinates as written."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        count = int(next(line for line in lines if line.startswith("n_points")).split(":")[1])
        start = lines.index("{") + 1
        end = lines.index("}")
    except (StopIteration, ValueError, IndexError) as exc:
        raise PtsError(f"{path}: not an iBUG .pts file (need 'n_points:' and a {{ }} block)") from exc
    points = np.array([[float(v) for v in line.split()[:2]] for line in lines[start:end]])
    if points.shape != (count, 2):
        raise PtsError(f"{path}: header says {count} points, found {len(points)}")
    return points


def write_pts(path: str | Path, points: np.ndarray) -> Path:
    """Write (N, 2) landmarks as an iBUG ``.pts`` file (version 1)."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"landmarks must be (N, 2), got {points.shape}")
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
    path = Path(path)
    path.write_text(f"version: 1\nn_points: {len(points)}\n{{\n{body}\n}}\n")
    return path


def natural_cubic_spline(points: np.ndarray, step: float = SPLINE_STEP) -> np.ndarray:
    """Sample the natural cubic spline through ``points`` (K, 2), parameter t = 0..K-1, at ``step``.

    Returns (M, 2) samples from the first to the last point inclusive; K = 2 gives a straight line.
    """
    points = np.asarray(points, dtype=np.float64)
    k = len(points)
    if k < 2:
        raise ValueError(f"a spline needs at least 2 points, got {k}")
    t = np.arange(0.0, k - 1 + step / 2, step)
    t[-1] = k - 1
    second = _second_derivatives(points)  # (K, 2)
    i = np.minimum(np.floor(t).astype(int), k - 2)
    u = (t - i)[:, None]
    p0, p1, m0, m1 = points[i], points[i + 1], second[i], second[i + 1]
    return (1 - u) * p0 + u * p1 + ((1 - u) ** 3 - (1 - u)) * m0 / 6 + (u**3 - u) * m1 / 6


def _second_derivatives(points: np.ndarray) -> np.ndarray:
    """Natural-spline second derivatives at unit-spaced knots (zero at both ends)."""
    k = len(points)
    second = np.zeros_like(points)
    if k < 3:
        return second
    n = k - 2
    system = np.diag(np.full(n, 4.0)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)
    rhs = 6.0 * (points[2:] - 2 * points[1:-1] + points[:-2])
    second[1:-1] = np.linalg.solve(system, rhs)
    return second


def outline(landmarks: np.ndarray, runs: Sequence[Sequence[int]]) -> np.ndarray:
    """The closed outline (M, 2) of one polygon: its spline runs chained in order."""
    return np.concatenate([natural_cubic_spline(landmarks[np.asarray(run) - 1]) for run in runs])


def paint_polygons(polygons: Iterable[tuple[int, np.ndarray]], height: int, width: int) -> np.ndarray:
    """(H, W) uint8 label: closed outlines (class id, (M, 2) sub-pixel x, y) filled in order on
    background 0; later polygons overwrite earlier ones."""
    label = np.zeros((height, width), dtype=np.uint8)
    shift = 4  # sub-pixel polygon vertices for cv2.fillPoly
    for class_id, points in polygons:
        vertices = np.round(np.asarray(points, dtype=np.float64) * (1 << shift)).astype(np.int32)
        cv2.fillPoly(label, [vertices], int(class_id), lineType=cv2.LINE_8, shift=shift)
    return label


def part_outlines(landmarks: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The recipe's (class id, closed outline) list for 68 landmarks, in paint order."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (68, 2):
        raise ValueError(f"need 68 landmarks (x, y), got {landmarks.shape}")
    return [(class_id, outline(landmarks, runs)) for class_id, polygons in PARTS for runs in polygons]


def paint_label(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 label of class ids 0-4 drawn from 68 landmarks (x, y) in pixel coordinates."""
    return paint_polygons(part_outlines(landmarks), height, width)


def landmark_crop_box(landmarks: np.ndarray, scale: float = CROP_SCALE) -> Box:
    """The recipe's face crop: a square of ``scale`` x mean(box width, height) on the landmark box."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    x0, y0 = landmarks.min(axis=0)
    x1, y1 = landmarks.max(axis=0)
    return Box(float(x0), float(y0), float(x1), float(y1)).square(scale)
