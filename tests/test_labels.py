"""Labels from 68 landmarks (PAPER-NOTES §7) on a synthetic face whose geometry is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facestream.training.labels import (
    EYES,
    INNER_MOUTH,
    OUTER_MOUTH,
    SKIN,
    PtsError,
    landmark_crop_box,
    natural_cubic_spline,
    paint_label,
    read_pts,
    write_pts,
)


def _arc(cx, cy, rx, ry, start, stop, count):
    angles = np.radians(np.linspace(start, stop, count))
    return np.stack((cx + rx * np.cos(angles), cy + ry * np.sin(angles)), axis=1)


def synthetic_face(cx: float = 100.0, cy: float = 110.0) -> np.ndarray:
    """68 landmarks in iBUG order: jaw (17), brows (5+5), nose (9), eyes (6+6), mouth (12+8)."""
    jaw = _arc(cx, cy - 20, 60, 70, 180, 0, 17)
    jaw[:, 1] = cy - 20 + np.abs(jaw[:, 1] - (cy - 20))  # lower half: the chin is at the bottom
    right_brow = np.stack((np.linspace(cx - 50, cx - 10, 5), np.full(5, cy - 45.0)), axis=1)
    left_brow = np.stack((np.linspace(cx + 10, cx + 50, 5), np.full(5, cy - 45.0)), axis=1)
    nose = np.stack((np.full(9, cx), np.linspace(cy - 30, cy, 9)), axis=1)
    right_eye = np.concatenate(
        (_arc(cx - 30, cy - 30, 12, 6, 180, 360, 4), _arc(cx - 30, cy - 30, 12, 6, 60, 120, 2)[::-1])
    )
    left_eye = np.concatenate(
        (_arc(cx + 30, cy - 30, 12, 6, 180, 360, 4), _arc(cx + 30, cy - 30, 12, 6, 60, 120, 2)[::-1])
    )
    outer = np.concatenate(
        (_arc(cx, cy + 25, 25, 12, 180, 360, 7), _arc(cx, cy + 25, 25, 12, 30, 150, 5)[::-1])
    )
    inner = np.concatenate(
        (_arc(cx, cy + 25, 15, 5, 180, 360, 5), _arc(cx, cy + 25, 15, 5, 45, 135, 3)[::-1])
    )
    points = np.concatenate((jaw, right_brow, left_brow, nose, right_eye, left_eye, outer, inner))
    assert points.shape == (68, 2)
    return points


def test_spline_passes_through_its_knots_at_step_001() -> None:
    knots = np.array([[0.0, 0.0], [10.0, 5.0], [20.0, 0.0], [30.0, 8.0]])
    samples = natural_cubic_spline(knots)
    assert len(samples) == 301  # 3 intervals x 100 steps + the last knot
    np.testing.assert_allclose(samples[::100], knots, atol=1e-9)


def test_two_point_spline_is_a_straight_line() -> None:
    samples = natural_cubic_spline(np.array([[0.0, 0.0], [10.0, 20.0]]))
    np.testing.assert_allclose(samples[:, 1], 2 * samples[:, 0], atol=1e-9)


def test_spline_needs_two_points() -> None:
    with pytest.raises(ValueError, match="at least 2 points"):
        natural_cubic_spline(np.zeros((1, 2)))


def test_label_has_every_class_in_the_right_place() -> None:
    face = synthetic_face()
    label = paint_label(face, 220, 200)
    assert label.dtype == np.uint8 and label.shape == (220, 200)
    assert set(np.unique(label)) == {0, SKIN, EYES, OUTER_MOUTH, INNER_MOUTH}
    assert label[5, 5] == 0  # corner: background
    assert label[110, 100] == SKIN  # between the eyes and the mouth
    assert label[80, 70] == EYES and label[80, 130] == EYES  # eye centres
    assert label[135, 100] == INNER_MOUTH  # mouth centre: inner mouth painted last
    assert label[125, 100] == OUTER_MOUTH  # upper lip, between the outer and inner outlines


def test_paint_order_inner_mouth_overwrites_lips() -> None:
    label = paint_label(synthetic_face(), 220, 200)
    inner = label == INNER_MOUTH
    assert inner.sum() > 50
    ys, xs = np.nonzero(inner)
    assert (label[ys.min() - 3 : ys.max() + 4, xs.min() - 3 : xs.max() + 4] == OUTER_MOUTH).any()


def test_label_needs_68_points() -> None:
    with pytest.raises(ValueError, match="68 landmarks"):
        paint_label(np.zeros((49, 2)), 10, 10)


def test_pts_round_trip(tmp_path: Path) -> None:
    face = synthetic_face()
    path = write_pts(tmp_path / "000001.pts", face)
    text = path.read_text()
    assert text.startswith("version: 1\nn_points: 68\n{\n") and text.rstrip().endswith("}")
    np.testing.assert_allclose(read_pts(path), face, atol=1e-3)


def test_pts_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pts"
    bad.write_text("hello\n")
    with pytest.raises(PtsError, match="not an iBUG"):
        read_pts(bad)
    short = tmp_path / "short.pts"
    short.write_text("version: 1\nn_points: 3\n{\n1 2\n3 4\n}\n")
    with pytest.raises(PtsError, match="header says 3 points, found 2"):
        read_pts(short)


def test_crop_box_is_13_times_the_landmark_box() -> None:
    face = synthetic_face()
    box = landmark_crop_box(face)
    width, height = np.ptp(face[:, 0]), np.ptp(face[:, 1])
    assert box.width == pytest.approx(1.3 * (width + height) / 2)
    assert box.width == pytest.approx(box.height)
    assert (box.x0 + box.x1) / 2 == pytest.approx((face[:, 0].min() + face[:, 0].max()) / 2)
