"""`facestream compare-teachers`: agreement between two label folders and still-frame jitter."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
from test_labelling import FakeTeacher, face_shape, frame_number, make_video

from facestream.cli import main
from facestream.training.compare import compare_teachers, label_miou
from facestream.training.labelling import label_video
from facestream.training.teachers import FaceShape, shape_from_68


class JitteryTeacher(FakeTeacher):
    """The same faces, each displaced by a random 2-4 px: a teacher with landmark jitter."""

    name = "jittery"

    def shapes(self, frames: Iterable[np.ndarray]) -> Iterator[FaceShape | None]:
        rng = np.random.default_rng(0)
        for rgb in frames:
            number = frame_number(rgb)
            shape = None if number in self.no_face else face_shape(number)
            if shape is not None:
                offset = rng.uniform(2, 4, 2) * rng.choice([-1, 1], 2)
                shape = shape_from_68(shape.landmarks + offset)
            yield shape


def test_label_miou() -> None:
    a = np.zeros((8, 8), np.uint8)
    a[2:6, 2:6] = 1
    assert label_miou(a, a) == 1.0
    b = np.zeros_like(a)
    b[2:6, 2:4] = 1  # skin: IoU 8/16; background: 48/56
    assert label_miou(a, b) == pytest.approx((8 / 16 + 48 / 56) / 2)


def test_a_jittery_teacher_is_less_steady(tmp_path: Path) -> None:
    video = make_video(tmp_path / "clip.mp4")
    label_video(video, tmp_path / "steady" / "clip", FakeTeacher(), progress=False)
    label_video(video, tmp_path / "jittery" / "clip", JitteryTeacher(), progress=False)
    summary = compare_teachers(tmp_path / "steady", tmp_path / "jittery", tmp_path / "out", progress=False)
    assert summary["teacher_a"] == "fake" and summary["teacher_b"] == "jittery"
    assert summary["still_miou_a"] > summary["still_miou_b"] + 0.05
    assert 0.3 < summary["agreement_miou"] < 0.95
    row = summary["videos"][0]
    assert row["faces_a"] == row["faces_b"] == 9  # 12 frames, 3 without a face
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["videos"][0]["clip"] == "clip"
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0


def test_command_needs_videos_labelled_in_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert main(["compare-teachers", str(tmp_path / "a"), str(tmp_path / "b"), "--no-progress"]) == 2
    assert "no video is labelled in both" in capsys.readouterr().err
