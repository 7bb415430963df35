"""`facestream label`: teacher labels for any face video, resumable, with an overlay sheet.

One folder per video (``<out>/<video stem>/``)::

    meta.json        video, size, fps, frame count, teacher (name, model, licence), counts, done
    frames.jsonl     one record per frame: index, face (bool), crop box [x0, y0, x1, y1] (the
                     recipe's 1.3x square, frame pixels), landmarks [[x, y], ...] (teacher points)
    labels/NNNNNN.png  (H, W) uint8 class ids 0-4 at the frame's size (faces only)
    sheet.png        the labels over a dozen frames, cropped to the face, for a human to check

Frames without a face have ``face: false`` and no PNG: they are excluded from training and
scoring. An interrupted run resumes where ``frames.jsonl`` stops; a finished one is skipped
unless the teacher or the video changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from facestream.engines.face import Box, crop_square
from facestream.engines.video import VideoFrame, open_source, overlay, read_mask
from facestream.training.teachers import FaceShape, Teacher, TeacherError

META, FRAMES, LABELS, SHEET = "meta.json", "frames.jsonl", "labels", "sheet.png"
SHEET_TILES, SHEET_TILE = 12, 224


def make_teacher(name: str) -> Teacher:
    """A teacher by name (``dlib68`` or ``mediapipe``); TeacherError names the install step."""
    if name == "dlib68":
        try:
            from facestream.training.teacher_dlib import Dlib68Teacher  # optional: the train extra
        except ImportError as exc:
            raise TeacherError(f"dlib68 needs dlib: pip install 'facestream[train]' ({exc})") from exc
        return Dlib68Teacher()
    if name == "mediapipe":
        from facestream.training.teacher_mediapipe import MediaPipeTeacher

        return MediaPipeTeacher()
    raise TeacherError(f"unknown teacher {name!r}: choose dlib68 or mediapipe")


@dataclass(frozen=True)
class FrameRecord:
    index: int
    face: bool
    box: Box | None = None
    landmarks: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "face": self.face,
            "box": None if self.box is None else self.box.as_list(),
            "landmarks": None if self.landmarks is None else np.round(self.landmarks, 2).tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FrameRecord:
        box = None if data.get("box") is None else Box(*data["box"])
        points = None if data.get("landmarks") is None else np.asarray(data["landmarks"], dtype=np.float64)
        return cls(int(data["index"]), bool(data["face"]), box, points)


class LabelledVideo:
    """A label folder written by :func:`label_video` (read side)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a label folder (no {META}): run facestream label")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.records = _read_records(self.folder / FRAMES)

    @property
    def clip_id(self) -> str:
        return self.folder.name

    @property
    def video(self) -> Path:
        return Path(self.meta["video"])

    def frames(self) -> Iterator[np.ndarray]:
        """The video's RGB frames in order (as many as were labelled)."""
        with open_source(str(self.video), max_frames=len(self.records)) as source:
            yield from (f.rgb for f in source)

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def labelled(self) -> list[int]:
        """Indices of the frames with a face (the ones that are trained on and scored)."""
        return [r.index for r in self.records if r.face]

    def label_path(self, index: int) -> Path:
        return self.folder / LABELS / f"{index:06d}.png"

    def label(self, index: int) -> np.ndarray:
        """(H, W) uint8 class ids of a labelled frame."""
        return read_mask(self.label_path(index))

    def box(self, index: int) -> Box | None:
        return self.records[index].box if index < len(self.records) else None


def _read_records(path: Path) -> list[FrameRecord]:
    """Records in frame order; a torn last line (an interrupted write) is dropped."""
    records: list[FrameRecord] = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = FrameRecord.from_json(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        if record.index != len(records):
            break
        records.append(record)
    return records


def video_identity(video: Path) -> dict[str, Any]:
    """What identifies a video for resuming: absolute path, size and a hash of the content.

    Not the modification time: a copy of the same clips (a fresh checkout of the data, a CI
    machine) gets new times, and labels and pair tables depend on the frames alone."""
    digest = hashlib.sha256()
    with video.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {
        "video": str(video.resolve()),
        "video_bytes": video.stat().st_size,
        "video_sha256": digest.hexdigest(),
    }


Annotator = Callable[[Iterator[VideoFrame]], Iterator[tuple[np.ndarray, FaceShape | None]]]
"""Decoded frames in, (RGB frame, its face or None) out, one per frame, in order."""


def teacher_annotator(teacher: Teacher) -> Annotator:
    def annotate(frames: Iterator[VideoFrame]) -> Iterator[tuple[np.ndarray, FaceShape | None]]:
        return _paired((f.rgb for f in frames), teacher)

    return annotate


def label_video(
    video: str | Path,
    out: str | Path,
    teacher: Teacher,
    *,
    max_frames: int | None = None,
    progress: bool = True,
) -> LabelledVideo:
    """Label every frame of ``video`` into ``out`` (the video's own folder); resumes, skips when done."""
    return write_labels(
        video, out, teacher_annotator(teacher), teacher.describe(), max_frames=max_frames, progress=progress
    )


def write_labels(
    video: str | Path,
    out: str | Path,
    annotate: Annotator,
    source: dict[str, Any],
    *,
    max_frames: int | None = None,
    progress: bool = True,
) -> LabelledVideo:
    """Labels of ``video`` from any annotator (a teacher, a dataset's own landmarks) into ``out``.

    ``source`` describes where the faces come from (it goes into meta.json as ``teacher``).
    """
    video, out = Path(video), Path(out)
    identity = {**video_identity(video), "teacher": source, "max_frames": max_frames}
    with _exclusive(out):  # a second labeller of the same folder waits, then finds it done
        return _write_labels(video, out, identity, annotate, max_frames, progress)


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_labels(
    video: Path,
    out: Path,
    identity: dict[str, Any],
    annotate: Annotator,
    max_frames: int | None,
    progress: bool,
) -> LabelledVideo:
    records = _resume(out, identity)
    if records is None:
        return LabelledVideo(out)
    (out / LABELS).mkdir(parents=True, exist_ok=True)
    with open_source(str(video), max_frames=max_frames) as frames:
        meta = {**identity, "width": frames.width, "height": frames.height, "fps": frames.fps}
        _write_meta(out, {**meta, "complete": False})
        total = max_frames or frames.frame_count
        bar = tqdm(
            total=total, initial=len(records), desc=f"label {video.name}", disable=not progress, unit="f"
        )
        todo = (f for f in frames if f.index >= len(records))
        with (out / FRAMES).open("a") as log, bar:
            for rgb, shape in annotate(todo):
                record = _save_frame(out, len(records), rgb, shape)
                log.write(json.dumps(record.to_json()) + "\n")
                log.flush()
                records.append(record)
                bar.update(1)
    counts = {"frames": len(records), "labelled": sum(r.face for r in records)}
    _write_meta(out, {**meta, **counts, "complete": True})
    write_sheet(video, LabelledVideo(out), out / SHEET)
    return LabelledVideo(out)


def _paired(frames: Iterator[np.ndarray], teacher: Teacher) -> Iterator[tuple[np.ndarray, FaceShape | None]]:
    """(frame, its face) in order: the teacher consumes the frames one at a time."""
    held: list[np.ndarray] = []

    def feed() -> Iterator[np.ndarray]:
        for rgb in frames:
            held.append(rgb)
            yield rgb

    for shape in teacher.shapes(feed()):
        yield held.pop(0), shape


def _resume(out: Path, identity: dict[str, Any]) -> list[FrameRecord] | None:
    """Records to continue from ([] to start afresh), or None when the folder is already complete."""
    meta_path = out / META
    if not meta_path.is_file():
        return []
    meta = json.loads(meta_path.read_text())
    same = all(meta.get(k) == v for k, v in identity.items())
    if not same:
        for stale in (out / FRAMES, out / SHEET):
            stale.unlink(missing_ok=True)
        for png in (out / LABELS).glob("*.png"):
            png.unlink()
        return []
    if meta.get("complete"):
        return None
    records = _read_records(out / FRAMES)
    with (out / FRAMES).open("w") as log:  # drop a torn last line
        log.writelines(json.dumps(r.to_json()) + "\n" for r in records)
    return records


def _save_frame(out: Path, index: int, rgb: np.ndarray, shape: FaceShape | None) -> FrameRecord:
    if shape is None:
        return FrameRecord(index, False)
    height, width = rgb.shape[:2]
    label = shape.paint(height, width)
    if not cv2.imwrite(str(out / LABELS / f"{index:06d}.png"), label):
        raise OSError(f"cannot write {out / LABELS / f'{index:06d}.png'}")
    return FrameRecord(index, True, shape.crop_box(), shape.landmarks)


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / META)


def sheet_indices(labelled: Sequence[int], tiles: int = SHEET_TILES) -> list[int]:
    """Up to ``tiles`` labelled frame indices spread evenly over the video."""
    if not labelled:
        return []
    picks = np.linspace(0, len(labelled) - 1, min(tiles, len(labelled))).round().astype(int)
    return [labelled[i] for i in sorted(set(picks.tolist()))]


def write_sheet(video: Path, labels: LabelledVideo, path: Path, tiles: int = SHEET_TILES) -> Path | None:
    """A grid of face crops: each the frame and its label side by side (index in the corner)."""
    wanted = set(sheet_indices(labels.labelled, tiles))
    if not wanted:
        return None
    images = []
    with open_source(str(video), max_frames=max(wanted) + 1) as source:
        for frame in source:
            if frame.index in wanted:
                images.append(_sheet_tile(frame.index, frame.rgb, labels))
    columns = 4
    rows = math.ceil(len(images) / columns)
    blank = np.zeros_like(images[0])
    grid = [images[r * columns : (r + 1) * columns] for r in range(rows)]
    grid[-1] += [blank] * (columns - len(grid[-1]))
    sheet = np.concatenate([np.concatenate(row, axis=1) for row in grid], axis=0)
    cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return path


def _sheet_tile(index: int, rgb: np.ndarray, labels: LabelledVideo) -> np.ndarray:
    box = labels.box(index)
    if box is None:
        raise ValueError(f"frame {index} has no face box")
    face = crop_square(rgb, box, SHEET_TILE)
    mask = crop_square(labels.label(index), box, SHEET_TILE, nearest=True)
    tile = np.concatenate((face, overlay(face, mask)), axis=1)
    cv2.putText(tile, str(index), (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
    return tile
