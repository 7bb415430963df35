"""Face box, square crop and paste-back geometry; detection on real clips."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from facestream.engines.face import (
    MAX_TRACK_SHIFT,
    Box,
    CropConfig,
    FaceLocator,
    crop_square,
    paste_scores,
    plane_argmax,
    track_box,
)


def test_square_is_scale_times_mean_side_centred() -> None:
    square = Box(10, 20, 110, 80).square(1.3)  # width 100, height 60 -> side 104
    assert square.width == pytest.approx(104) and square.height == pytest.approx(104)
    assert (square.x0 + square.x1) / 2 == pytest.approx(60)
    assert (square.y0 + square.y1) / 2 == pytest.approx(50)


def test_crop_square_takes_the_box_and_pads_outside_with_black() -> None:
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, :, 0] = np.arange(200, dtype=np.uint8)[None, :]  # red = x
    crop = crop_square(frame, Box(-50, 0, 50, 100), 100)  # left half lies outside the frame
    assert crop.shape == (100, 100, 3)
    assert crop[:, :48].max() == 0  # outside: black
    assert crop[50, 60, 0] == 10  # crop x 60 -> frame x 10


def test_paste_scores_puts_classes_where_the_box_is() -> None:
    scores = np.zeros((5, 8, 8), np.float32)
    scores[1] = 1.0  # skin everywhere in the box
    scores[2, :4, :] = 2.0  # eyes in the upper half of the box
    mask = paste_scores(scores, Box(40, 20, 120, 100), (120, 160))
    assert mask.shape == (120, 160) and mask.dtype == np.uint8
    assert mask[:20].max() == 0 and mask[:, :40].max() == 0 and mask[:, 120:].max() == 0
    assert mask[30, 80] == 2 and mask[90, 80] == 1
    rows = np.nonzero((mask == 2).any(axis=1))[0]
    assert rows.min() == 20 and abs(rows.max() - 59) <= 1  # the upper half of 20..100


def test_plane_argmax_is_numpys_argmax_ties_included() -> None:
    rng = np.random.default_rng(0)
    for count in (1, 2, 5):
        planes = [rng.integers(0, 3, (37, 53)).astype(np.float32) for _ in range(count)]  # many ties
        expected = np.argmax(np.stack(planes), axis=0)
        assert np.array_equal(plane_argmax(planes), expected)
        assert plane_argmax(planes).dtype == np.uint8


def _bilinear_reference(scores: np.ndarray, box: Box, frame_hw: tuple[int, int]) -> np.ndarray:
    """(K, H, W) float64 class scores over the frame by the definition: each frame pixel centre
    mapped onto the score grid (align_corners=False), bilinear, grid edges replicated."""
    k, h, w = scores.shape
    height, width = frame_hw
    u = (np.arange(width) + 0.5 - box.x0) * (w / box.width) - 0.5
    v = (np.arange(height) + 0.5 - box.y0) * (h / box.height) - 0.5
    u, v = np.clip(u, 0, w - 1), np.clip(v, 0, h - 1)
    i0, j0 = np.minimum(np.floor(u).astype(int), w - 2), np.minimum(np.floor(v).astype(int), h - 2)
    fu, fv = u - i0, v - j0
    s = scores.astype(np.float64)
    top = s[:, j0][:, :, i0] * (1 - fu) + s[:, j0][:, :, i0 + 1] * fu
    bottom = s[:, j0 + 1][:, :, i0] * (1 - fu) + s[:, j0 + 1][:, :, i0 + 1] * fu
    return top * (1 - fv)[:, None] + bottom * fv[:, None]


@pytest.mark.parametrize("x0, y0", [(23.4, 11.7), (23.6, 11.2), (-7.5, 20.5)])
def test_paste_scores_is_bilinear_upsampling_then_argmax(x0: float, y0: float) -> None:
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((5, 16, 16)).astype(np.float32)
    box = Box(x0, y0, x0 + 120.5, y0 + 120.5)  # fractional corners in a 160 x 150 frame
    mask = paste_scores(scores, box, (150, 160))
    # The box's scale exactly, its corner rounded to the nearest pixel (at most half a pixel off).
    rounded = Box(round(x0), round(y0), round(x0) + box.width, round(y0) + box.height)
    reference = _bilinear_reference(scores, rounded, (150, 160))
    inside = np.zeros((150, 160), bool)
    inside[
        max(int(np.floor(y0)), 0) : int(np.ceil(box.y1)), max(int(np.floor(x0)), 0) : int(np.ceil(box.x1))
    ] = True
    top2 = np.sort(reference, axis=0)[-2:]
    clear = inside & (top2[1] - top2[0] > 1e-4)  # float32 against float64: exact ties aside
    assert clear.sum() > 0.99 * inside.sum()
    assert np.array_equal(mask[clear], reference.argmax(axis=0)[clear])
    assert mask[~inside].max() == 0


def test_paste_scores_box_partly_outside_frame() -> None:
    scores = np.ones((5, 4, 4), np.float32) * np.arange(5, dtype=np.float32)[:, None, None]
    mask = paste_scores(scores, Box(-30, -30, 30, 30), (50, 50))
    assert (mask[:30, :30] == 4).all() and mask[30:].max() == 0 and mask[:, 30:].max() == 0


def test_paste_scores_box_entirely_outside_gives_background() -> None:
    mask = paste_scores(np.ones((5, 4, 4), np.float32), Box(200, 200, 260, 260), (50, 50))
    assert mask.max() == 0


def _mask_with_face(box: Box, shape=(200, 200)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[int(box.y0) : int(box.y1), int(box.x0) : int(box.x1)] = 1
    return mask


def test_mask_box_used_only_when_confident_and_inside_the_square() -> None:
    locator = FaceLocator(CropConfig(mask_confidence=0.75))
    square = Box(20, 20, 180, 180)
    mask = _mask_with_face(Box(60, 50, 140, 150))
    assert locator.from_mask(mask, 0.9, square) == Box(60, 50, 140, 150)
    assert locator.from_mask(mask, 0.5, square) is None  # not confident
    touching = _mask_with_face(Box(20, 50, 140, 150))
    assert locator.from_mask(touching, 0.9, square) is None  # face may extend beyond the square
    assert locator.from_mask(np.zeros((200, 200), np.uint8), 0.9, square) is None  # empty


@pytest.fixture(scope="module")
def locator() -> FaceLocator:
    return FaceLocator()


@pytest.mark.parametrize("name", ["lp_d3.mp4", "lp_s18.mp4", "lp_d13.mp4"])
def test_detector_finds_the_face_on_real_clips(videos_dir: Path, locator: FaceLocator, name: str) -> None:
    with av.open(str(videos_dir / name)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    box = locator.detect(frame)
    assert box is not None
    height, width = frame.shape[:2]
    assert 0 <= box.x0 < box.x1 <= width and 0 <= box.y0 < box.y1 <= height
    assert 0.05 * min(height, width) < box.width < 0.9 * max(height, width)


def test_no_face_in_noise_or_black(locator: FaceLocator) -> None:
    rng = np.random.default_rng(0)
    assert locator.detect(np.zeros((240, 320, 3), np.uint8)) is None
    assert locator.locate(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) is None


def _flow(grid: int, dx: float, dy: float) -> np.ndarray:
    field = np.empty((2, grid, grid), np.float32)
    field[0], field[1] = dx, dy
    return field


def test_track_box_moves_the_square_against_the_face_flow() -> None:
    """Flow (current -> key) of (-2, +1) grid pixels on a 32-pixel grid over a 128-pixel square:
    the face moved (+8, -4) frame pixels since the key, and so does the next square. The median
    ignores a minority of pixels with a different flow; background pixels are not counted."""
    box = Box(100.0, 50.0, 228.0, 178.0)
    flow = _flow(32, -2.0, 1.0)
    flow[:, :5] = 30.0  # an outlier band on face pixels
    scores = np.zeros((5, 32, 32), np.float32)
    scores[1] = 1.0  # skin everywhere ...
    scores[0, :, 28:] = 2.0  # ... but the right border is background
    flow[:, :, 28:] = -40.0  # (its flow must not count)
    moved = track_box(box, box, flow, scores)
    assert moved == pytest.approx(Box(108.0, 46.0, 236.0, 174.0))
    # scores on a coarser grid than the flow are resized onto it
    again = track_box(box, box, _flow(32, -2.0, 1.0), scores[:, ::2, ::2])
    assert again == pytest.approx(Box(108.0, 46.0, 236.0, 174.0))


def test_track_box_holds_without_a_face_and_caps_the_shift() -> None:
    box = Box(0.0, 0.0, 100.0, 100.0)
    background = np.zeros((5, 16, 16), np.float32)
    background[0] = 1.0
    assert track_box(box, box, _flow(16, 5.0, 5.0), background) == box
    skin = np.zeros((5, 16, 16), np.float32)
    skin[1] = 1.0
    far = track_box(box, box, _flow(16, -16.0, 16.0), skin)  # a whole square's width in one frame
    limit = MAX_TRACK_SHIFT * box.width
    assert far == pytest.approx(Box(limit, -limit, 100.0 + limit, 100.0 - limit))


def test_paste_scores_of_a_sub_pixel_box_is_background() -> None:
    mask = paste_scores(np.ones((5, 4, 4), np.float32), Box(10.2, 10.2, 10.7, 10.9), (50, 50))
    assert mask.shape == (50, 50) and mask.max() == 0
