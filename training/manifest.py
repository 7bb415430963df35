"""Datasets as manifests: which videos, split by subject into sets A, B and C, like the paper.

* A trains N and F, B trains and validates the key schedulers, C is the test set (§4.1).
* A manifest is a JSON file::

    {"name": "...", "teacher": "dlib68",
     "videos": [{"id": "lp_d3", "subject": "lp_d3", "set": "A", "kind": "video", "path": "..."}, ...]}

  ``kind`` is ``video`` (any face video, labelled by the teacher and cached), ``300vw`` (a 300VW
  folder ``<id>/vid.avi`` + ``annot/*.pts``: labels painted from its landmarks) or ``300vw-mask``
  (a 300VW-Mask release: ``path`` is its root and ``id`` the video id; the set's frames are the
  ones its ``data_splits/split_2/<set>.txt`` lists). Relative paths are relative to the manifest.
* ``default`` is the built-in manifest over ``../shared/data/videos`` (each clip is one person).

Every entry opens as a :class:`Clip`: consecutive frames, the labelled ones, their labels and
crop boxes -- what training and evaluation consume, whatever the source.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from tqdm import tqdm

from facestream.engines.face import Box
from facestream.engines.video import VideoFrame
from facestream.training.datasets import (
    MaskVideo,
    decode_mask_label,
    iter_mask_frames,
    scan_300vw,
    scan_300vw_mask,
)
from facestream.training.labelling import LabelledVideo, label_video, make_teacher, write_labels
from facestream.training.labels import read_pts
from facestream.training.teachers import FaceShape, shape_from_68

SETS = ("A", "B", "C")
KINDS = ("video", "300vw", "300vw-mask")
# The teacher whose labels train and grade the networks. MediaPipe and dlib68 are equally steady
# on still frames of the shared clips (self-agreement 0.905 vs 0.900 mIoU) and agree at 0.79;
# MediaPipe wins on licence (Apache-2.0 vs dlib's research-only 68-point model) and speed
# (4.5 vs ~40 ms a frame). See README, "Teachers".
DEFAULT_TEACHER = "mediapipe"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")

# The shared clips, one person each, split by hand so that every set mixes framing, lighting and
# motion: A 2,377 frames (train N, F), B 1,041 (train schedulers), C 558 (test).
DEFAULT_SPLIT = {
    "A": ("lp_d10", "lp_d11", "lp_d13", "lp_d14", "lp_d3", "lp_s18", "lp_s32"),
    "B": ("lp_d0", "lp_d18", "lp_d19", "lp_s20", "st_w0"),
    "C": ("lp_d12", "lp_d20", "st_w1"),
}


class Clip(Protocol):
    """A labelled video as training and evaluation see it (frame indices from 0, consecutive)."""

    clip_id: str

    def frames(self) -> Iterator[np.ndarray]:
        """(H, W, 3) uint8 RGB frames in order."""
        ...

    @property
    def labelled(self) -> list[int]:
        """Indices of the frames that have a face and a label."""
        ...

    def label(self, index: int) -> np.ndarray:
        """(H, W) uint8 class ids of a labelled frame."""
        ...

    def box(self, index: int) -> Box | None:
        """The recipe's square face crop of a labelled frame (frame pixels)."""
        ...


@dataclass(frozen=True)
class Entry:
    id: str
    subject: str
    set: str
    kind: str
    path: str


@dataclass(frozen=True)
class Manifest:
    name: str
    teacher: str
    entries: tuple[Entry, ...]
    root: Path  # folder that relative paths start from

    def videos(self, subset: str) -> list[Entry]:
        if subset not in SETS:
            raise ValueError(f"unknown set {subset!r}: choose one of {', '.join(SETS)}")
        return [e for e in self.entries if e.set == subset]

    def resolve(self, entry: Entry) -> Path:
        path = Path(entry.path)
        return path if path.is_absolute() else (self.root / path).resolve()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {"name": self.name, "teacher": self.teacher, "videos": [asdict(e) for e in self.entries]}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path


class ManifestError(ValueError):
    """A manifest that cannot be used, with what is wrong in it."""


def load_manifest(spec: str | Path, *, data_dir: str | Path | None = None) -> Manifest:
    """A manifest from a JSON file, or ``"default"`` (the shared clips in ``data_dir``)."""
    if str(spec) == "default":
        return default_manifest(data_dir)
    path = Path(spec)
    try:
        data = json.loads(path.read_text())
        entries = tuple(Entry(**{k: str(v) for k, v in item.items()}) for item in data["videos"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    manifest = Manifest(
        str(data.get("name", path.stem)), str(data.get("teacher", DEFAULT_TEACHER)), entries, path.parent
    )
    check_manifest(manifest)
    return manifest


def check_manifest(manifest: Manifest) -> None:
    """Sets and kinds known, ids unique, and no subject in two sets (subject-independent splits)."""
    problems = [f"{e.id}: unknown set {e.set!r}" for e in manifest.entries if e.set not in SETS]
    problems += [f"{e.id}: unknown kind {e.kind!r}" for e in manifest.entries if e.kind not in KINDS]
    ids = [(e.kind, e.id) for e in manifest.entries]
    problems += [
        f"{i[1]}: listed twice" for i in sorted(set(ids)) if ids.count(i) > 1 and i[0] != "300vw-mask"
    ]
    sets_of: dict[str, set[str]] = {}
    for e in manifest.entries:
        sets_of.setdefault(e.subject, set()).add(e.set)
    problems += [f"subject {s} is in sets {sorted(v)}" for s, v in sorted(sets_of.items()) if len(v) > 1]
    if problems:
        raise ManifestError(f"manifest {manifest.name}: " + "; ".join(problems))


def shared_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir``, else ``$FACESTREAM_DATA``, else ``../shared/data`` beside the repository."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("FACESTREAM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def default_manifest(data_dir: str | Path | None = None) -> Manifest:
    videos = shared_data_dir(data_dir) / "videos"
    if not videos.is_dir():
        raise ManifestError(f"the default manifest needs the shared clips in {videos} (or FACESTREAM_DATA)")
    entries = tuple(
        Entry(name, name, subset, "video", str(videos / f"{name}.mp4"))
        for subset, names in DEFAULT_SPLIT.items()
        for name in names
    )
    manifest = Manifest("shared-clips", DEFAULT_TEACHER, entries, videos)
    check_manifest(manifest)
    return manifest


def split_subjects(subjects: Sequence[str], fractions: Sequence[float], seed: int = 0) -> dict[str, str]:
    """Subject -> set, shuffled with ``seed`` and cut by ``fractions`` of A, B, C (each set >= 1
    subject when there are at least three)."""
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"need three non-negative fractions for A, B, C, got {list(fractions)}")
    unique = sorted(set(subjects))
    random.Random(seed).shuffle(unique)
    total = sum(fractions)
    n = len(unique)
    counts = [int(round(n * f / total)) for f in fractions[:2]]
    if n >= 3:
        counts[0] = min(max(1, counts[0]), n - 2)
        counts[1] = min(max(1, counts[1]), n - counts[0] - 1)
    cuts = [counts[0], counts[0] + counts[1]]
    return {s: SETS[0] if i < cuts[0] else SETS[1] if i < cuts[1] else SETS[2] for i, s in enumerate(unique)}


def manifest_from_videos(
    paths: Sequence[str | Path], *, fractions: Sequence[float] = (0.45, 0.45, 0.1), seed: int = 0
) -> Manifest:
    """One entry per video file (folders are searched for videos); every video is its own subject
    -- edit ``subject`` in the JSON where one person appears in several videos."""
    files = sorted({p.resolve() for p in _video_files(paths)})
    if not files:
        raise ManifestError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {', '.join(map(str, paths))}")
    sets = split_subjects([f.stem for f in files], fractions, seed)
    entries = tuple(Entry(f.stem, f.stem, sets[f.stem], "video", str(f)) for f in files)
    return Manifest("videos", DEFAULT_TEACHER, entries, Path.cwd())


def _video_files(paths: Sequence[str | Path]) -> Iterator[Path]:
    for path in map(Path, paths):
        if path.is_dir():
            yield from (p for p in sorted(path.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES)
        elif path.is_file():
            yield path
        else:
            raise ManifestError(f"{path} does not exist")


def manifest_from_300vw(
    root: str | Path, *, fractions: Sequence[float] = (51, 51, 12), seed: int = 0
) -> Manifest:
    """Every video of a 300VW folder, split by video id (51/51/12 as the paper's A/B/C)."""
    videos = scan_300vw(root)
    sets = split_subjects([v.video_id for v in videos], fractions, seed)
    entries = tuple(
        Entry(v.video_id, v.video_id, sets[v.video_id], "300vw", str(v.video.parent.resolve()))
        for v in videos
    )
    return Manifest("300vw", "300vw-landmarks", entries, Path.cwd())


def manifest_from_300vw_mask(root: str | Path) -> Manifest:
    """The 300VW-Mask release with its own A/B/C frame lists (``data_splits/split_2``)."""
    release = scan_300vw_mask(root)
    entries = tuple(
        Entry(vid, vid, subset, "300vw-mask", str(Path(root).resolve()))
        for subset in SETS
        for vid in release.splits.get(subset, [])
    )
    return Manifest("300vw-mask", "300vw-mask", entries, Path.cwd())


# ----------------------------------------------------------------------------- clips


def labels_cache(teacher: str) -> Path:
    """Where teacher labels of manifest videos are cached: ``$FACESTREAM_CACHE/labels/<teacher>``."""
    base = os.environ.get("FACESTREAM_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "facestream"
    return root / "labels" / teacher


def open_clips(
    manifest: Manifest,
    subset: str,
    *,
    teacher: str | None = None,
    labels_dir: str | Path | None = None,
    max_frames: int | None = None,
    progress: bool = True,
) -> list[Clip]:
    """The clips of one set, labelled (and cached) as needed.

    Labels go under ``labels_dir`` (default: the parent of :func:`labels_cache`): teacher labels in
    ``<teacher>/<id>``, 300VW labels in ``300vw/<id>``.
    """
    entries = manifest.videos(subset)
    if not entries:
        raise ManifestError(f"manifest {manifest.name} has no videos in set {subset}")
    teacher = teacher or manifest.teacher
    folder = Path(labels_dir) if labels_dir else labels_cache(teacher).parent
    clips: list[Clip] = []
    for entry in tqdm(entries, desc=f"set {subset}", disable=not progress or len(entries) < 2, unit="clip"):
        clips.append(_open_clip(manifest, entry, teacher, folder, max_frames, progress))
    return clips


def _open_clip(
    manifest: Manifest, entry: Entry, teacher: str, folder: Path, max_frames: int | None, progress: bool
) -> Clip:
    path = manifest.resolve(entry)
    if entry.kind == "video":
        with make_teacher(teacher) as labeller:
            return label_video(
                path, folder / teacher / entry.id, labeller, max_frames=max_frames, progress=progress
            )
    if entry.kind == "300vw":
        return label_300vw(path, folder / "300vw" / entry.id, max_frames=max_frames, progress=progress)
    release = scan_300vw_mask(path)
    video = next((v for v in release.split_videos(entry.set) if v.video_id == entry.id), None)
    if video is None:
        raise ManifestError(f"{entry.id} has no frames in split {entry.set} of {path}")
    return MaskClip(video, max_frames=max_frames)


def label_300vw(
    folder: Path, out: Path, *, max_frames: int | None = None, progress: bool = True
) -> LabelledVideo:
    """Labels painted from a 300VW video's own ``.pts`` landmarks (frames without them: no face)."""
    video = next((v for v in scan_300vw(folder.parent) if v.video.parent == folder), None)
    if video is None:
        raise ManifestError(f"{folder} is not a 300VW video folder (<id>/vid.avi + annot/*.pts)")

    def annotate(frames: Iterator[VideoFrame]) -> Iterator[tuple[np.ndarray, FaceShape | None]]:
        for frame in frames:
            path = video.annotations.get(frame.index)
            yield frame.rgb, None if path is None else shape_from_68(read_pts(path))

    source = {"teacher": "300vw-landmarks", "annotations": str(folder / "annot")}
    return write_labels(video.video, out, annotate, source, max_frames=max_frames, progress=progress)


class ReversedClip:
    """A clip played backwards (``<id>@rev``): frame i is the clip's frame T-1-i, with its label
    and face square. A talking face moves the same way in either direction, so the scheduler
    training sets can learn from twice the video (``facestream train policy --reverse``)."""

    def __init__(self, clip: Clip) -> None:
        self.clip_id = f"{clip.clip_id}@rev"
        self._clip = clip
        self._frames: list[np.ndarray] | None = None
        meta = getattr(clip, "meta", None)
        self.meta = None if meta is None else {**meta, "reversed": True}  # the pair-table cache key

    def _all(self) -> list[np.ndarray]:
        if self._frames is None:
            self._frames = list(self._clip.frames())
        return self._frames

    def frames(self) -> Iterator[np.ndarray]:
        return reversed(self._all())

    @property
    def labelled(self) -> list[int]:
        last = len(self._all()) - 1
        return sorted(last - i for i in self._clip.labelled)

    def label(self, index: int) -> np.ndarray:
        return self._clip.label(len(self._all()) - 1 - index)

    def box(self, index: int) -> Box | None:
        return self._clip.box(len(self._all()) - 1 - index)


class MirroredClip:
    """A clip mirrored left to right (``<id>@mirror``): frames, labels and face squares flipped
    horizontally. The classes have no left and right, and a mirrored face moves as a face does, so
    the scheduler training sets can learn from twice the video again
    (``facestream train policy --mirror``)."""

    def __init__(self, clip: Clip) -> None:
        self.clip_id = f"{clip.clip_id}@mirror"
        self._clip = clip
        self._width: int | None = None
        meta = getattr(clip, "meta", None)
        self.meta = None if meta is None else {**meta, "mirrored": True}  # the pair-table cache key

    def frames(self) -> Iterator[np.ndarray]:
        for rgb in self._clip.frames():
            yield np.ascontiguousarray(rgb[:, ::-1])

    @property
    def labelled(self) -> list[int]:
        return self._clip.labelled

    def label(self, index: int) -> np.ndarray:
        return np.ascontiguousarray(self._clip.label(index)[:, ::-1])

    def box(self, index: int) -> Box | None:
        box = self._clip.box(index)
        if box is None:
            return None
        if self._width is None:  # the frame width (a clip's frames share it), from a label
            self._width = self._clip.label(index).shape[1]
        return Box(self._width - box.x1, box.y0, self._width - box.x0, box.y1)


class MaskClip:
    """A 300VW-Mask video: its images are already face crops, so the crop box is the whole image.

    Frame numbers missing from the split (bad landmarks) become unlabelled black frames, which
    breaks episodes there as the paper's protocol does.
    """

    def __init__(self, video: MaskVideo, *, max_frames: int | None = None) -> None:
        self.clip_id = video.video_id
        first = video.frames[0].index
        self._files = {f.index - first: f for f in video.frames if f.label is not None}
        self._count = video.frames[-1].index - first + 1
        if max_frames is not None:
            self._count = min(self._count, max_frames)
        self._video = video

    @property
    def labelled(self) -> list[int]:
        return sorted(i for i in self._files if i < self._count)

    def frames(self) -> Iterator[np.ndarray]:
        first = self._video.frames[0].index
        blank: np.ndarray | None = None
        expected = 0
        for sample in iter_mask_frames(self._video):
            position = sample.index - first
            if position >= self._count:
                return
            blank = np.zeros_like(sample.rgb)
            for _ in range(expected, position):  # frames the split leaves out
                yield blank
            yield sample.rgb
            expected = position + 1

    def label(self, index: int) -> np.ndarray:
        path = self._files[index].label
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None or path is None:
            raise ValueError(f"cannot read label {path}")
        return decode_mask_label(raw, path)

    def box(self, index: int) -> Box | None:
        """The whole image (300VW-Mask images are face crops already), as a square."""
        raw = cv2.imread(str(self._files[index].image), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise ValueError(f"cannot read image {self._files[index].image}")
        height, width = raw.shape[:2]
        return Box(0.0, 0.0, float(width), float(height)).square(1.0)
