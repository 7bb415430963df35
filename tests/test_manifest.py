"""Manifests: the default split of the shared clips, JSON round trips and checks, subject splits, and
opening clips of every kind (teacher-labelled videos, 300VW, 300VW-Mask) on tiny fixtures."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_labels import synthetic_face

from facestream.engines.face import Box
from facestream.engines.video import VideoWriter
from facestream.training import manifest as manifest_module
from facestream.training.labelling import LabelledVideo
from facestream.training.labels import landmark_crop_box, paint_label, read_pts, write_pts
from facestream.training.manifest import (
    DEFAULT_SPLIT,
    SETS,
    Entry,
    Manifest,
    ManifestError,
    MaskClip,
    check_manifest,
    label_300vw,
    labels_cache,
    load_manifest,
    manifest_from_300vw,
    manifest_from_300vw_mask,
    manifest_from_videos,
    open_clips,
    split_subjects,
)
from facestream.training.teachers import FaceShape, Teacher, shape_from_68

WIDTH, HEIGHT = 96, 80


def tiny_video(path: Path, frames: int = 2, width: int = 16, height: int = 16, level: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, 25, width, height) as writer:
        for i in range(frames):
            writer.write(np.full((height, width, 3), level + 10 * i, np.uint8))
    return path


def face_points(shift: float) -> np.ndarray:
    """68 plausible landmarks (the synthetic face at 0.4x) inside a WIDTH x HEIGHT frame."""
    return synthetic_face(0.0, 0.0) * 0.4 + (45.0 + shift, 38.0 + shift / 2)


# ----------------------------------------------------------------------------- the default manifest


def test_default_manifest_splits_the_shared_clips_by_subject(data_dir: Path) -> None:
    manifest = load_manifest("default", data_dir=data_dir)
    assert manifest.teacher == "mediapipe" and len(manifest.entries) == 15
    clips = {p.stem for p in (data_dir / "videos").glob("*.mp4")}
    assert {e.id for e in manifest.entries} == clips
    assert all(e.kind == "video" and manifest.resolve(e).is_file() for e in manifest.entries)
    subjects = {s: {e.subject for e in manifest.videos(s)} for s in SETS}
    assert all(subjects[s] for s in SETS)
    assert not (
        subjects["A"] & subjects["B"] or subjects["A"] & subjects["C"] or subjects["B"] & subjects["C"]
    )
    assert subjects["A"] | subjects["B"] | subjects["C"] == {e.subject for e in manifest.entries}
    assert {s: tuple(e.id for e in manifest.videos(s)) for s in SETS} == DEFAULT_SPLIT
    with pytest.raises(ValueError, match="unknown set 'D'"):
        manifest.videos("D")


def test_default_manifest_follows_facestream_data(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FACESTREAM_DATA", str(data_dir))
    assert len(load_manifest("default").entries) == 15
    monkeypatch.setenv("FACESTREAM_DATA", str(tmp_path))
    with pytest.raises(ManifestError, match="shared clips"):
        load_manifest("default")


# ----------------------------------------------------------------------------- JSON and checks


def _manifest(*entries: Entry, root: Path = Path("/")) -> Manifest:
    return Manifest("test", "dlib68", entries, root)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    entries = (
        Entry("a", "alice", "A", "video", "clips/a.mp4"),
        Entry("b", "bob", "B", "video", str(tmp_path / "b.mp4")),
        Entry("c", "carol", "C", "300vw", "vw/003"),
    )
    (tmp_path / "sub").mkdir()
    path = Manifest("mine", "mediapipe", entries, tmp_path).save(tmp_path / "sub" / "m.json")
    loaded = load_manifest(path)
    assert (loaded.name, loaded.teacher, loaded.entries) == ("mine", "mediapipe", entries)
    assert loaded.root == tmp_path / "sub"
    assert loaded.resolve(entries[0]) == (tmp_path / "sub" / "clips" / "a.mp4").resolve()
    assert loaded.resolve(entries[1]) == tmp_path / "b.mp4"
    assert [e.id for e in loaded.videos("B")] == ["b"]

    (tmp_path / "bare.json").write_text(json.dumps({"videos": [{**vars(entries[0])}]}))
    bare = load_manifest(tmp_path / "bare.json")
    assert (bare.name, bare.teacher) == ("bare", "mediapipe")


def test_check_manifest_rejects_what_breaks_the_protocol() -> None:
    good = (Entry("a", "s1", "A", "video", "a.mp4"), Entry("b", "s2", "B", "300vw", "b"))
    check_manifest(_manifest(*good))
    with pytest.raises(ManifestError, match=r"subject s1 is in sets \['A', 'C'\]"):
        check_manifest(_manifest(*good, Entry("c", "s1", "C", "video", "c.mp4")))
    with pytest.raises(ManifestError, match="c: unknown set 'D'"):
        check_manifest(_manifest(*good, Entry("c", "s3", "D", "video", "c.mp4")))
    with pytest.raises(ManifestError, match="c: unknown kind 'youtube'"):
        check_manifest(_manifest(*good, Entry("c", "s3", "C", "youtube", "c.mp4")))
    with pytest.raises(ManifestError, match="a: listed twice"):
        check_manifest(_manifest(*good, Entry("a", "s3", "C", "video", "other.mp4")))


def test_load_manifest_rejects_broken_files(tmp_path: Path) -> None:
    cases = {
        "truncated.json": '{"name": "x", "videos": [',
        "no_videos.json": '{"name": "x"}',
        "missing_keys.json": '{"videos": [{"id": "a", "set": "A"}]}',
        "unknown_key.json": '{"videos": [{"id": "a", "subject": "a", "set": "A", "kind": "video", '
        '"path": "a.mp4", "fps": 25}]}',
        "not_an_object.json": '{"videos": ["a.mp4"]}',
        "a_list.json": '["a.mp4"]',
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ManifestError, match="cannot read manifest"):
            load_manifest(tmp_path / name)
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path / "missing.json")
    bad = {"videos": [{"id": "a", "subject": "a", "set": "E", "kind": "video", "path": "a.mp4"}]}
    (tmp_path / "bad_set.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="unknown set 'E'"):
        load_manifest(tmp_path / "bad_set.json")


# ----------------------------------------------------------------------------- subject splits


def test_split_subjects_is_deterministic_and_disjoint() -> None:
    subjects = [f"s{i:02d}" for i in range(20)]
    split = split_subjects(subjects + subjects[:5], (0.5, 0.3, 0.2), seed=3)  # repeats count once
    assert split == split_subjects(list(reversed(subjects)), (0.5, 0.3, 0.2), seed=3)
    assert set(split) == set(subjects) and set(split.values()) == set(SETS)
    assert [sum(v == s for v in split.values()) for s in SETS] == [10, 6, 4]
    assert split != split_subjects(subjects, (0.5, 0.3, 0.2), seed=4)

    many = split_subjects([f"p{i}" for i in range(200)], (51, 51, 12))
    counts = [sum(v == s for v in many.values()) for s in SETS]
    assert counts[0] == counts[1] and abs(counts[2] - 200 * 12 / 114) <= 1


@pytest.mark.parametrize(
    "fractions", [(0.45, 0.45, 0.1), (51, 51, 12), (0.9, 0.05, 0.05), (1, 0, 0), (0, 0, 1)]
)
def test_split_subjects_fills_every_set_from_three_subjects(fractions: tuple[float, float, float]) -> None:
    for n in range(3, 12):
        split = split_subjects([f"s{i}" for i in range(n)], fractions, seed=n)
        assert len(split) == n
        assert set(split.values()) == set(SETS), (n, split)


def test_split_subjects_rejects_bad_fractions() -> None:
    for fractions in ((0.5, 0.5), (1, -1, 1), (0, 0, 0)):
        with pytest.raises(ValueError, match="three non-negative fractions"):
            split_subjects(["a", "b", "c"], fractions)


# ----------------------------------------------------------------------------- manifests from folders


def test_manifest_from_videos(tmp_path: Path) -> None:
    names = ["d_one", "a_two", "c_three", "b_four"]
    for name in names:
        tiny_video(tmp_path / "clips" / f"{name}.mp4")
    (tmp_path / "clips" / "notes.txt").write_text("not a video")
    extra = tiny_video(tmp_path / "elsewhere" / "e_five.mp4")

    manifest = manifest_from_videos([tmp_path / "clips", extra])
    assert [e.id for e in manifest.entries] == sorted([*names, "e_five"])
    assert all(e.kind == "video" and e.subject == e.id for e in manifest.entries)
    assert all(Path(e.path).is_absolute() and Path(e.path).is_file() for e in manifest.entries)
    assert all(manifest.videos(s) for s in SETS)
    assert manifest == manifest_from_videos([tmp_path / "clips", extra])  # deterministic
    check_manifest(manifest)
    saved = load_manifest(manifest.save(tmp_path / "m.json"))
    assert saved.entries == manifest.entries

    with pytest.raises(ManifestError, match="does not exist"):
        manifest_from_videos([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no videos"):
        manifest_from_videos([tmp_path / "empty"])


# ----------------------------------------------------------------------------- 300VW


def make_300vw(root: Path, video_id: str, frames: int, annotated: Iterable[int]) -> dict[int, Path]:
    """``root/<id>/vid.avi`` (flat grey frames) + ``annot/NNNNNN.pts`` for the ``annotated`` frames."""
    folder = root / video_id
    (folder / "annot").mkdir(parents=True)
    with VideoWriter(folder / "vid.avi", 25, WIDTH, HEIGHT) as writer:
        for i in range(frames):
            writer.write(np.full((HEIGHT, WIDTH, 3), 40 + 10 * i, np.uint8))
    return {i: write_pts(folder / "annot" / f"{i + 1:06d}.pts", face_points(i)) for i in annotated}


def test_manifest_from_300vw_and_its_clips(tmp_path: Path) -> None:
    root = tmp_path / "300VW"
    pts = {vid: make_300vw(root, vid, 6, [0, 1, 2, 4]) for vid in ("001", "002", "003")}
    manifest = manifest_from_300vw(root)
    assert [e.id for e in manifest.entries] == ["001", "002", "003"]
    assert all(e.kind == "300vw" and manifest.resolve(e) == root / e.id for e in manifest.entries)
    assert sorted(e.set for e in manifest.entries) == ["A", "B", "C"]
    check_manifest(manifest)

    labels_dir = tmp_path / "labels"
    for subset in SETS:
        (clip,) = open_clips(manifest, subset, labels_dir=labels_dir, progress=False)
        assert isinstance(clip, LabelledVideo) and clip.complete
        assert clip.folder == labels_dir / "300vw" / clip.clip_id  # the cache stays inside labels_dir
        assert clip.meta["teacher"]["teacher"] == "300vw-landmarks"
        assert clip.labelled == [0, 1, 2, 4] and len(clip.records) == 6
        frames = list(clip.frames())
        assert len(frames) == 6 and frames[0].shape == (HEIGHT, WIDTH, 3)
        for index, path in pts[clip.clip_id].items():
            landmarks = read_pts(path)
            np.testing.assert_array_equal(clip.label(index), paint_label(landmarks, HEIGHT, WIDTH))
            assert clip.box(index) == pytest.approx(landmark_crop_box(landmarks), abs=0.006)
        assert clip.box(3) is None and not clip.label_path(3).exists()

    (clip,) = open_clips(manifest, "A", labels_dir=tmp_path / "short", max_frames=2, progress=False)
    assert clip.labelled == [0, 1] and len(list(clip.frames())) == 2


def test_a_300vw_manifest_saved_elsewhere_still_finds_its_videos(tmp_path: Path, monkeypatch) -> None:
    make_300vw(tmp_path / "data" / "300VW", "001", 2, [0])
    monkeypatch.chdir(tmp_path / "data")
    manifest = manifest_from_300vw("300VW")  # a relative root, as typed on the command line
    (tmp_path / "manifests").mkdir()
    loaded = load_manifest(manifest.save(tmp_path / "manifests" / "vw.json"))
    monkeypatch.chdir(tmp_path)
    assert loaded.resolve(loaded.entries[0]) == tmp_path / "data" / "300VW" / "001"


def test_label_300vw_rejects_other_folders(tmp_path: Path) -> None:
    make_300vw(tmp_path / "vw", "001", 2, [0])
    (tmp_path / "vw" / "notes").mkdir()
    with pytest.raises(ManifestError, match="not a 300VW video folder"):
        label_300vw(tmp_path / "vw" / "notes", tmp_path / "out")


# ----------------------------------------------------------------------------- teacher-labelled videos


class FakeTeacher(Teacher):
    name = "fake"
    calls = 0

    def shapes(self, frames: Iterable[np.ndarray]) -> Iterator[FaceShape | None]:
        FakeTeacher.calls += 1
        for i, _ in enumerate(frames):
            yield shape_from_68(synthetic_face(0.0, 0.0) * 0.05 + (8.0, 8.0)) if i % 2 == 0 else None

    def describe(self) -> dict[str, Any]:
        return {"teacher": self.name}


def test_open_clips_labels_videos_once_into_the_cache(tmp_path: Path, monkeypatch) -> None:
    made: list[str] = []

    def make_teacher(name: str) -> Teacher:
        made.append(name)
        return FakeTeacher()

    monkeypatch.setattr(manifest_module, "make_teacher", make_teacher)
    entries = tuple(
        Entry(f"v{i}", f"v{i}", s, "video", str(tiny_video(tmp_path / f"v{i}.mp4", frames=3)))
        for i, s in enumerate(SETS)
    )
    manifest = Manifest("videos", "fake", entries, tmp_path)
    FakeTeacher.calls = 0
    (clip,) = open_clips(manifest, "B", labels_dir=tmp_path / "labels", progress=False)
    assert made == ["fake"] and FakeTeacher.calls == 1
    assert clip.clip_id == "v1" and clip.labelled == [0, 2]
    assert clip.folder == tmp_path / "labels" / "fake" / "v1"
    (again,) = open_clips(manifest, "B", labels_dir=tmp_path / "labels", progress=False)
    assert FakeTeacher.calls == 1 and again.folder == clip.folder  # cached: the teacher is not asked

    monkeypatch.setenv("FACESTREAM_CACHE", str(tmp_path / "cache"))
    assert labels_cache("fake") == tmp_path / "cache" / "labels" / "fake"
    (cached,) = open_clips(manifest, "C", progress=False)
    assert cached.folder == labels_cache("fake") / "v2"

    empty = Manifest("empty", "fake", entries[:1], tmp_path)
    with pytest.raises(ManifestError, match="no videos in set B"):
        open_clips(empty, "B", labels_dir=tmp_path / "labels", progress=False)


# ----------------------------------------------------------------------------- 300VW-Mask


def mask_image(video: int, number: int, size: int = 16) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 30 * video, 20 * number, 200
    return image


def mask_label(number: int, size: int = 16) -> np.ndarray:
    label = np.zeros((size, size), np.uint8)
    label[2:14, 3:13] = 1
    label[5, 4:7] = label[5, 9:12] = 2
    label[10, 5:11] = 3
    label[10, 7:9] = 4
    label[0, 0] = number % 5
    return label


def make_mask_release(root: Path, splits: dict[str, list[tuple[int, int]]]) -> None:
    """Videos 001 (frames 1-6) and 002 (frames 1-4); ``splits``: set -> (video, frame number)."""
    (root / "images_orig").mkdir(parents=True)
    (root / "labels_orig").mkdir()
    for video, count in ((1, 6), (2, 4)):
        for n in range(1, count + 1):
            name = f"{video:03d}_{n:06d}"
            assert cv2.imwrite(str(root / "images_orig" / f"{name}.png"), mask_image(video, n))
            assert cv2.imwrite(str(root / "labels_orig" / f"{name}.png"), mask_label(n))
    (root / "data_splits" / "split_2").mkdir(parents=True)
    for subset, frames in splits.items():
        lines = [f"/images_orig/{v:03d}_{n:06d}.jpg /labels_orig/{v:03d}_{n:06d}.png" for v, n in frames]
        (root / "data_splits" / "split_2" / f"{subset}.txt").write_text("\n".join(lines) + "\n")


def test_300vw_mask_clips_fill_gaps_with_black_frames(tmp_path: Path) -> None:
    root = tmp_path / "mask"
    make_mask_release(root, {"A": [(1, 1), (1, 2), (1, 4), (1, 6)], "B": [(2, 3), (2, 4)], "C": []})
    manifest = manifest_from_300vw_mask(root)
    assert [(e.id, e.set, e.kind) for e in manifest.entries] == [
        ("001", "A", "300vw-mask"),
        ("002", "B", "300vw-mask"),
    ]
    assert manifest.resolve(manifest.entries[0]) == root.resolve()

    (clip,) = open_clips(manifest, "A", labels_dir=tmp_path / "labels", progress=False)
    assert isinstance(clip, MaskClip) and clip.clip_id == "001"
    assert clip.labelled == [0, 1, 3, 5]
    frames = list(clip.frames())
    assert len(frames) == 6
    for position, number in ((0, 1), (1, 2), (3, 4), (5, 6)):
        np.testing.assert_array_equal(frames[position], mask_image(1, number)[..., ::-1])
        np.testing.assert_array_equal(clip.label(position), mask_label(number))
        assert clip.box(position) == Box(0.0, 0.0, 16.0, 16.0)  # the image is the face crop
    for gap in (2, 4):
        assert frames[gap].shape == (16, 16, 3) and not frames[gap].any()
    assert not (tmp_path / "labels").exists()  # nothing to label or cache

    (late,) = open_clips(manifest, "B", progress=False)  # frames 3 and 4 of 002 -> 0 and 1
    assert late.labelled == [0, 1] and len(list(late.frames())) == 2
    np.testing.assert_array_equal(late.label(0), mask_label(3))

    (short,) = open_clips(manifest, "A", max_frames=4, progress=False)
    assert short.labelled == [0, 1, 3] and len(list(short.frames())) == 4
    with pytest.raises(ManifestError, match="no videos in set C"):
        open_clips(manifest, "C", progress=False)

    loaded = load_manifest(manifest.save(tmp_path / "mask.json"))
    assert loaded.entries == manifest.entries
