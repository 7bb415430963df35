"""`facestream label`'s labeller: folders, records, label PNGs, sheet and resuming -- with a fake teacher
on a small synthetic video (each frame a flat grey whose level says its number)."""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_labels import synthetic_face

from facestream.engines.video import VideoWriter
from facestream.training.labelling import (
    FRAMES,
    LABELS,
    META,
    SHEET,
    SHEET_TILE,
    LabelledVideo,
    label_video,
    make_teacher,
    sheet_indices,
    video_identity,
)
from facestream.training.teachers import FaceShape, Teacher, TeacherError, shape_from_68

WIDTH, HEIGHT, COUNT = 96, 80, 12
NO_FACE = frozenset({3, 4, 9})
BASE, STEP = 20, 15  # frame i is flat grey BASE + STEP * i


def make_video(path: Path, count: int = COUNT) -> Path:
    with VideoWriter(path, 25, WIDTH, HEIGHT) as writer:
        for i in range(count):
            writer.write(np.full((HEIGHT, WIDTH, 3), BASE + STEP * i, np.uint8))
    return path


def frame_number(rgb: np.ndarray) -> int:
    return int(round((float(rgb.mean()) - BASE) / STEP))


def face_shape(number: int) -> FaceShape:
    """A 68-point face of about 48 x 40 px, moving one pixel right per frame."""
    return shape_from_68(synthetic_face(0.0, 0.0) * 0.4 + (48.0 + number, 38.0))


class Interrupted(RuntimeError):
    pass


class FakeTeacher(Teacher):
    """Faces on every frame but ``no_face``; raises Interrupted when asked for frame ``fail_at``."""

    name = "fake"

    def __init__(self, no_face: Iterable[int] = NO_FACE, fail_at: int | None = None, version: int = 1):
        self.no_face, self.fail_at, self.version = frozenset(no_face), fail_at, version
        self.seen: list[int] = []

    def describe(self) -> dict[str, Any]:
        return {"teacher": self.name, "version": self.version}

    def shapes(self, frames: Iterable[np.ndarray]) -> Iterator[FaceShape | None]:
        for rgb in frames:
            number = frame_number(rgb)
            if number == self.fail_at:
                raise Interrupted(f"stopped at frame {number}")
            self.seen.append(number)
            yield None if number in self.no_face else face_shape(number)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def folder_state(folder: Path) -> tuple[dict[str, Any], str, dict[str, bytes], bool]:
    """Everything a label folder holds but the sheet's pixels: meta, records, label PNG bytes."""
    meta = json.loads((folder / META).read_text())
    pngs = {p.name: p.read_bytes() for p in sorted((folder / LABELS).glob("*.png"))}
    return meta, (folder / FRAMES).read_text(), pngs, (folder / SHEET).is_file()


# ----------------------------------------------------------------------------- one run


def test_label_video_writes_meta_records_labels_and_sheet(video: Path, tmp_path: Path) -> None:
    teacher = FakeTeacher()
    labels = label_video(video, tmp_path / "clip", teacher, progress=False)
    assert teacher.seen == list(range(COUNT))
    faces = [i for i in range(COUNT) if i not in NO_FACE]

    meta = json.loads((tmp_path / "clip" / META).read_text())
    assert meta["complete"] is True and labels.complete
    assert (meta["frames"], meta["labelled"]) == (COUNT, len(faces))
    assert (meta["width"], meta["height"]) == (WIDTH, HEIGHT) and meta["fps"] == pytest.approx(25)
    assert meta["teacher"] == {"teacher": "fake", "version": 1}
    assert meta["video"] == str(video.resolve()) and labels.video == video.resolve()

    lines = (tmp_path / "clip" / FRAMES).read_text().splitlines()
    assert len(lines) == COUNT
    for i, line in enumerate(lines):
        record = json.loads(line)
        assert record["index"] == i and record["face"] is (i not in NO_FACE)
        if i in NO_FACE:
            assert record["box"] is None and record["landmarks"] is None
            continue
        shape = face_shape(i)
        np.testing.assert_allclose(record["box"], shape.crop_box(), atol=0.006)
        np.testing.assert_allclose(record["landmarks"], shape.landmarks, atol=0.006)

    assert labels.labelled == faces and len(labels.records) == COUNT
    assert sorted(p.name for p in (tmp_path / "clip" / LABELS).iterdir()) == [f"{i:06d}.png" for i in faces]
    for i in faces:
        label = labels.label(i)
        assert label.dtype == np.uint8 and label.shape == (HEIGHT, WIDTH)
        np.testing.assert_array_equal(label, face_shape(i).paint(HEIGHT, WIDTH))
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3, 4}
        assert labels.box(i) == pytest.approx(face_shape(i).crop_box(), abs=0.006)
    assert labels.box(min(NO_FACE)) is None and labels.box(COUNT) is None

    sheet = cv2.imread(str(tmp_path / "clip" / SHEET))
    assert sheet is not None
    assert sheet.shape == (math.ceil(len(faces) / 4) * SHEET_TILE, 4 * 2 * SHEET_TILE, 3)

    frames = list(labels.frames())
    assert [frame_number(f) for f in frames] == list(range(COUNT))
    assert labels.clip_id == "clip"


def test_max_frames_labels_only_the_first_frames(video: Path, tmp_path: Path) -> None:
    teacher = FakeTeacher()
    labels = label_video(video, tmp_path / "clip", teacher, max_frames=5, progress=False)
    assert teacher.seen == [0, 1, 2, 3, 4]
    assert len(labels.records) == 5 and labels.labelled == [0, 1, 2]
    assert labels.meta["max_frames"] == 5 and labels.meta["frames"] == 5
    assert len(list(labels.frames())) == 5


def test_no_face_anywhere_gives_no_labels_and_no_sheet(video: Path, tmp_path: Path) -> None:
    labels = label_video(
        video, tmp_path / "clip", FakeTeacher(no_face=range(COUNT)), max_frames=4, progress=False
    )
    assert labels.complete and labels.labelled == [] and labels.meta["labelled"] == 0
    assert list((tmp_path / "clip" / LABELS).iterdir()) == []
    assert not (tmp_path / "clip" / SHEET).exists()


# ----------------------------------------------------------------------------- resuming


def test_interrupted_run_resumes_where_the_records_stop(video: Path, tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        label_video(video, tmp_path / "resumed", FakeTeacher(fail_at=7), progress=False)
    partial = LabelledVideo(tmp_path / "resumed")
    assert not partial.complete and partial.meta["complete"] is False
    assert [r.index for r in partial.records] == list(range(7))
    assert not (tmp_path / "resumed" / SHEET).exists()

    teacher = FakeTeacher()
    resumed = label_video(video, tmp_path / "resumed", teacher, progress=False)
    assert teacher.seen == list(range(7, COUNT))  # only the frames without a record
    assert resumed.complete

    label_video(video, tmp_path / "whole", FakeTeacher(), progress=False)
    assert folder_state(tmp_path / "resumed") == folder_state(tmp_path / "whole")


def test_a_torn_last_record_is_dropped_and_relabelled(video: Path, tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        label_video(video, tmp_path / "torn", FakeTeacher(fail_at=6), progress=False)
    frames_path = tmp_path / "torn" / FRAMES
    with frames_path.open("a") as log:
        log.write('{"index": 6, "face": tr')  # the write the interruption cut short
    assert [r.index for r in LabelledVideo(tmp_path / "torn").records] == list(range(6))

    teacher = FakeTeacher()
    label_video(video, tmp_path / "torn", teacher, progress=False)
    assert teacher.seen == list(range(6, COUNT))
    assert all(json.loads(line)["index"] == i for i, line in enumerate(frames_path.read_text().splitlines()))

    label_video(video, tmp_path / "whole", FakeTeacher(), progress=False)
    assert folder_state(tmp_path / "torn") == folder_state(tmp_path / "whole")


def test_a_complete_folder_is_skipped(video: Path, tmp_path: Path) -> None:
    label_video(video, tmp_path / "clip", FakeTeacher(), progress=False)
    before = folder_state(tmp_path / "clip")
    teacher = FakeTeacher()
    labels = label_video(video, tmp_path / "clip", teacher, progress=False)
    assert teacher.seen == []
    assert labels.complete and folder_state(tmp_path / "clip") == before


def test_labels_follow_the_videos_content_not_its_time(video: Path, tmp_path: Path) -> None:
    """The labels follow the video's content, not its modification time (a fresh copy of the data
    gets new times, which must not throw away the labels and the pair tables built on them)."""
    copy = tmp_path / "clip.mp4"
    copy.write_bytes(video.read_bytes())
    label_video(copy, tmp_path / "clip", FakeTeacher(), progress=False)
    before = folder_state(tmp_path / "clip")
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    teacher = FakeTeacher()
    label_video(copy, tmp_path / "clip", teacher, progress=False)
    assert teacher.seen == [] and folder_state(tmp_path / "clip") == before
    other = tmp_path / "other.mp4"
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    other.write_bytes(bytes(data))
    os.utime(other, (1_000_000_000, 1_000_000_000))
    a, b = video_identity(copy), video_identity(other)
    assert a["video_bytes"] == b["video_bytes"] and a["video_sha256"] != b["video_sha256"]


def test_a_changed_teacher_relabels_from_scratch(video: Path, tmp_path: Path) -> None:
    label_video(video, tmp_path / "clip", FakeTeacher(), progress=False)
    assert LabelledVideo(tmp_path / "clip").label_path(0).is_file()

    teacher = FakeTeacher(no_face={0}, version=2)
    labels = label_video(video, tmp_path / "clip", teacher, progress=False)
    assert teacher.seen == list(range(COUNT))
    assert labels.meta["teacher"] == {"teacher": "fake", "version": 2}
    assert labels.labelled == list(range(1, COUNT)) and labels.meta["labelled"] == COUNT - 1
    assert not labels.label_path(0).exists()  # the old label of frame 0 is gone
    assert all(labels.label_path(i).is_file() for i in NO_FACE)

    teacher = FakeTeacher(no_face={0}, version=2)
    label_video(video, tmp_path / "clip", teacher, max_frames=3, progress=False)  # max_frames counts too
    assert teacher.seen == [0, 1, 2]


def test_an_interrupted_run_of_another_teacher_is_not_resumed(video: Path, tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        label_video(video, tmp_path / "clip", FakeTeacher(fail_at=5), progress=False)
    teacher = FakeTeacher(version=2)
    label_video(video, tmp_path / "clip", teacher, progress=False)
    assert teacher.seen == list(range(COUNT))


def test_two_labellers_of_one_folder_label_it_once(video: Path, tmp_path: Path) -> None:
    """Two processes (here: threads) asked for the same labels: the second waits for the first's
    lock, then finds the folder complete, instead of both writing the same files."""
    teachers = [FakeTeacher(), FakeTeacher()]
    threads = [
        threading.Thread(target=label_video, args=(video, tmp_path / "clip", t), kwargs={"progress": False})
        for t in teachers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(len(t.seen) for t in teachers) == [0, COUNT]
    assert LabelledVideo(tmp_path / "clip").complete


# ----------------------------------------------------------------------------- odds and ends


def test_sheet_indices_spread_over_the_labelled_frames() -> None:
    picks = sheet_indices(list(range(100)), 12)
    assert len(picks) == 12 and picks[0] == 0 and picks[-1] == 99 and picks == sorted(set(picks))
    gaps = np.diff(picks)
    assert gaps.min() >= 8 and gaps.max() <= 10
    assert sheet_indices([5, 7, 40], 12) == [5, 7, 40]
    labelled = [2 * i + 1 for i in range(30)]
    odd = sheet_indices(labelled, 4)
    assert odd == [1, 21, 39, 59] and set(odd) <= set(labelled)
    assert sheet_indices([], 12) == [] and sheet_indices([3], 12) == [3]


def test_labelled_video_rejects_a_folder_without_meta(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a label folder"):
        LabelledVideo(tmp_path)


def test_make_teacher_rejects_unknown_names() -> None:
    with pytest.raises(TeacherError, match="unknown teacher 'nope'"):
        make_teacher("nope")
