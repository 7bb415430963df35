"""The ``dlib68`` teacher on real frames (the first frames of lp_d3.mp4) and ``facestream label``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import clip_path

from facestream.cli import main
from facestream.engines.video import open_source
from facestream.training.labelling import FRAMES, LABELS, META, SHEET, LabelledVideo
from facestream.training.labels import BACKGROUND, EYES, INNER_MOUTH, OUTER_MOUTH, SKIN, landmark_crop_box
from facestream.training.teachers import FaceShape

pytest.importorskip("dlib")
if importlib.util.find_spec("face_recognition_models") is None:  # its __init__ needs pkg_resources: no import
    pytest.skip("face_recognition_models is not installed", allow_module_level=True)

from facestream.training.teacher_dlib import PREDICTOR, Dlib68Teacher, predictor_path  # noqa: E402

CLIP = "lp_d3.mp4"
FRAMES_USED = 5


@pytest.fixture(scope="module")
def clip(videos_dir: Path) -> Path:
    return clip_path(videos_dir, CLIP)


@pytest.fixture(scope="module")
def frames(clip: Path) -> list[np.ndarray]:
    with open_source(str(clip), max_frames=FRAMES_USED) as source:
        return [f.rgb for f in source]


@pytest.fixture(scope="module")
def teacher() -> Dlib68Teacher:
    return Dlib68Teacher()


@pytest.fixture(scope="module")
def shapes(teacher: Dlib68Teacher, frames: list[np.ndarray]) -> list[FaceShape | None]:
    return list(teacher.shapes(frames))


def test_a_face_with_68_landmarks_inside_every_frame(frames: list[np.ndarray], shapes: list) -> None:
    assert len(frames) == len(shapes) == FRAMES_USED
    for rgb, shape in zip(frames, shapes, strict=True):
        assert shape is not None
        height, width = rgb.shape[:2]
        assert shape.landmarks.shape == (68, 2)
        assert (shape.landmarks >= 0).all()
        assert (shape.landmarks[:, 0] < width).all() and (shape.landmarks[:, 1] < height).all()
        x0, y0 = shape.landmarks.min(axis=0)
        x1, y1 = shape.landmarks.max(axis=0)
        assert x1 - x0 > width / 4 and y1 - y0 > height / 4  # a close-up face, not a speck


def test_painted_labels_have_the_five_classes_in_place(frames: list[np.ndarray], shapes: list) -> None:
    for rgb, shape in zip(frames, shapes, strict=True):
        label = shape.paint(*rgb.shape[:2])
        assert label.shape == rgb.shape[:2] and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) == {BACKGROUND, SKIN, EYES, OUTER_MOUTH, INNER_MOUTH}
        rows = {c: np.nonzero(label == c)[0] for c in (SKIN, EYES, OUTER_MOUTH, INNER_MOUTH)}
        assert rows[EYES].max() < rows[OUTER_MOUTH].min()  # the eyes lie above the mouth
        ys, xs = np.nonzero(label == OUTER_MOUTH)
        inner_ys, inner_xs = np.nonzero(label == INNER_MOUTH)
        assert xs.min() <= inner_xs.min() and inner_xs.max() <= xs.max()
        assert ys.min() <= inner_ys.min() and inner_ys.max() <= ys.max()
        assert rows[SKIN].size > 10 * (rows[EYES].size + rows[OUTER_MOUTH].size)


def test_crop_box_is_the_recipe_square_around_the_landmarks(shapes: list) -> None:
    for shape in shapes:
        box = shape.crop_box()
        assert box.width == pytest.approx(box.height)
        x0, y0 = shape.landmarks.min(axis=0)
        x1, y1 = shape.landmarks.max(axis=0)
        assert box.x0 <= x0 and box.y0 <= y0 and x1 <= box.x1 and y1 <= box.y1
        assert box.width == pytest.approx(1.3 * ((x1 - x0) + (y1 - y0)) / 2)
        assert box == pytest.approx(landmark_crop_box(shape.landmarks))


def test_a_blank_frame_has_no_face(teacher: Dlib68Teacher) -> None:
    black = np.zeros((512, 512, 3), np.uint8)
    assert teacher.shape(black) is None
    assert list(teacher.shapes([np.zeros((120, 160, 3), np.uint8)])) == [None]


def test_model_file_and_description(teacher: Dlib68Teacher) -> None:
    path = predictor_path()
    assert path.is_file() and path.name == PREDICTOR and path.stat().st_size > 1_000_000
    assert teacher.model == path
    description = teacher.describe()
    assert description["teacher"] == "dlib68" and description["model"].endswith(PREDICTOR)
    assert "research use" in description["licence"]
    json.dumps(description)  # goes into meta.json


def test_label_command_on_the_first_frames(
    clip: Path, shapes: list, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["label", str(clip), "--out", str(tmp_path), "--max-frames", str(FRAMES_USED), "--no-progress"]
    assert main(args) == 0
    folder = tmp_path / clip.stem
    out = capsys.readouterr().out
    assert out.strip() == f"{clip}: {FRAMES_USED}/{FRAMES_USED} frames with a face (100.0%) -> {folder}"

    meta = json.loads((folder / META).read_text())
    assert meta["complete"] is True and meta["frames"] == meta["labelled"] == FRAMES_USED
    assert meta["teacher"]["teacher"] == "dlib68" and "research use" in meta["teacher"]["licence"]
    assert (meta["width"], meta["height"], meta["max_frames"]) == (512, 512, FRAMES_USED)
    assert len((folder / FRAMES).read_text().splitlines()) == FRAMES_USED
    assert sorted(p.name for p in (folder / LABELS).iterdir()) == [f"{i:06d}.png" for i in range(FRAMES_USED)]
    sheet = cv2.imread(str(folder / SHEET))
    assert sheet is not None and sheet.size > 0

    labels = LabelledVideo(folder)
    for index, shape in enumerate(shapes):  # the command's labels are the teacher's
        np.testing.assert_array_equal(labels.label(index), shape.paint(512, 512))
        np.testing.assert_allclose(labels.records[index].landmarks, shape.landmarks, atol=0.006)

    stamp = (folder / FRAMES).stat().st_mtime_ns
    assert main(args) == 0  # done already: skipped
    assert (folder / FRAMES).stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == out


def test_label_command_names_a_missing_video(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.mp4"
    assert main(["label", str(missing), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "nowhere.mp4 is not a video file" in capsys.readouterr().err
