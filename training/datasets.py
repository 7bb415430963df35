"""Reading face videos with landmarks in the 300VW layout: ``NNN/vid.avi`` + ``NNN/annot/*.pts``.

300VW numbers its annotation files from 1 (``000001.pts`` is the first frame); frames are indexed
from 0 here. Frames without an annotation file are yielded with ``landmarks=None``.

Also reads the 300VW-Mask release (cropped faces + class-id label PNGs + data splits):
:func:`scan_300vw_mask` and :func:`iter_mask_frames`; its layout is described above them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from facestream.engines.video import open_source
from facestream.training.labels import read_pts

VIDEO_NAMES = ("vid.avi", "vid.mp4")


@dataclass(frozen=True)
class AnnotatedVideo:
    """One 300VW video: its id (folder name), video file and landmark files by 0-based frame."""

    video_id: str
    video: Path
    annotations: dict[int, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class AnnotatedFrame:
    index: int
    rgb: np.ndarray
    landmarks: np.ndarray | None  # (68, 2) x, y in pixels, or None when not annotated


def _frame_index(path: Path) -> int | None:
    """``000001.pts`` -> 0; None for names that are not a frame number."""
    return int(path.stem) - 1 if path.stem.isdigit() and int(path.stem) > 0 else None


def scan_300vw(root: str | Path) -> list[AnnotatedVideo]:
    """Every ``<root>/<id>/vid.avi`` with its ``annot/*.pts``, sorted by id.

    Raises ``FileNotFoundError`` when ``root`` holds no such video, naming the layout expected.
    """
    root = Path(root)
    videos = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        video = next((folder / n for n in VIDEO_NAMES if (folder / n).is_file()), None)
        if video is None:
            continue
        annotations = {
            index: path
            for path in sorted((folder / "annot").glob("*.pts"))
            if (index := _frame_index(path)) is not None
        }
        videos.append(AnnotatedVideo(folder.name, video, annotations))
    if not videos:
        raise FileNotFoundError(f"no 300VW videos under {root} (expected <id>/vid.avi and <id>/annot/*.pts)")
    return videos


def iter_frames(video: AnnotatedVideo, *, max_frames: int | None = None) -> Iterator[AnnotatedFrame]:
    """Decode ``video`` and pair each frame with its landmarks."""
    with open_source(str(video.video), max_frames=max_frames) as source:
        for frame in source:
            path = video.annotations.get(frame.index)
            landmarks = read_pts(path) if path is not None else None
            yield AnnotatedFrame(frame.index, frame.rgb, landmarks)


# ----------------------------------------------------------------------------- 300VW-Mask
#
# The layout of the 300VW-Mask release (Wang et al., IJCV 2019 / CVPR 2020), as described by the
# README of github.com/mapleandfire/300VW-Mask (the dataset archive itself is not in that repo):
#
#   <root>/images_orig/<vid>_<frame:06d>.jpg      cropped face, frame numbers start at 000001
#   <root>/labels_orig/<vid>_<frame:06d>.png      its mask label, same name with .png
#   <root>/data_splits/split_1/{train,val,test}_per10.txt   splits of the IJCV paper
#   <root>/data_splits/split_2/{A,B,C}.txt                  the A/B/C sets of the CVPR paper
#
# Each split line is "/images_orig/<vid>_<frame>.jpg /labels_orig/<vid>_<frame>.png"; frames with
# bad 300VW landmarks are left out of the splits, so a split lists frames, not whole videos.

MASK_IMAGES = "images_orig"
MASK_LABELS = "labels_orig"
MASK_SPLITS = "data_splits"
MASK_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_LABEL_SUFFIX = ".png"
MASK_CLASSES = 5  # background, skin, eyes, outer mouth, inner mouth (labels.BACKGROUND..INNER_MOUTH)
MASK_LAYOUT = (
    f"expected {MASK_IMAGES}/<video>_<frame:06d>.jpg, {MASK_LABELS}/<video>_<frame:06d>.png and "
    f"{MASK_SPLITS}/<split>/*.txt"
)
# RGB colours of the release's MATLAB generator (processing_scripts/do_segmentation.m) -> class id;
# only used when a label PNG is a colour image instead of single-channel class ids.
MASK_GENERATOR_COLOURS: dict[tuple[int, int, int], int] = {
    (0, 0, 0): 0,
    (255, 0, 0): 1,
    (0, 255, 0): 2,
    (0, 255, 255): 3,
    (0, 0, 255): 4,
}


@dataclass(frozen=True)
class MaskFrameFiles:
    """One 300VW-Mask frame: 0-based index (file number - 1), its image and label (None if absent)."""

    index: int
    image: Path
    label: Path | None


@dataclass(frozen=True)
class MaskVideo:
    """The frames of one 300VW video in 300VW-Mask, sorted by index (indices may have gaps)."""

    video_id: str
    frames: tuple[MaskFrameFiles, ...]

    @property
    def images(self) -> list[Path]:
        return [f.image for f in self.frames]

    @property
    def labels(self) -> list[Path | None]:
        return [f.label for f in self.frames]


@dataclass(frozen=True)
class Mask300VW:
    """A scanned 300VW-Mask folder.

    ``videos``: by video id, sorted. ``split_frames``: split name (file stem, e.g. ``"A"``) ->
    the (video id, 0-based frame index) pairs it lists, in file order. ``splits``: split name ->
    the sorted ids of the videos it draws frames from.
    """

    root: Path
    videos: dict[str, MaskVideo]
    split_frames: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    splits: dict[str, list[str]] = field(default_factory=dict)

    def split_videos(self, name: str) -> list[MaskVideo]:
        """The videos of split ``name``, each cut down to the frames that split lists."""
        if name not in self.split_frames:
            raise KeyError(f"no split {name!r}; have {sorted(self.split_frames)}")
        wanted: dict[str, set[int]] = {}
        for video_id, index in self.split_frames[name]:
            wanted.setdefault(video_id, set()).add(index)
        return [
            MaskVideo(vid, tuple(f for f in self.videos[vid].frames if f.index in indices))
            for vid, indices in sorted(wanted.items())
        ]


@dataclass(frozen=True)
class MaskSample:
    index: int
    rgb: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray | None  # (H, W) uint8 class ids 0-4, or None when the frame has no label


def _mask_key(name: str) -> tuple[str, int] | None:
    """``"001_000001"`` -> (``"001"``, 0); None for names that are not ``<video>_<frame number>``."""
    video_id, sep, number = name.rpartition("_")
    if not sep or not video_id or not number.isdigit() or int(number) < 1:
        return None
    return video_id, int(number) - 1


def _mask_files(folder: Path, suffixes: tuple[str, ...]) -> dict[tuple[str, int], Path]:
    files: dict[tuple[str, int], Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes and (key := _mask_key(path.stem)) is not None:
            files.setdefault(key, path)
    return files


def _read_mask_split(path: Path) -> list[tuple[str, int]]:
    """Frames listed by a split file; a line is ``<image path> [<label path>]`` (names are what count)."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        keys = {_mask_key(PurePosixPath(token.replace("\\", "/")).stem) for token in tokens[:2]}
        key = keys.pop() if len(keys) == 1 else None
        if key is None:
            raise ValueError(
                f"{path}:{number}: expected '/{MASK_IMAGES}/<video>_<frame>.jpg "
                f"/{MASK_LABELS}/<video>_<frame>.png' naming one frame, got {line.strip()!r}"
            )
        entries.append(key)
    return entries


def scan_300vw_mask(root: str | Path, *, split: str | None = "split_2") -> Mask300VW:
    """Scan a 300VW-Mask folder: frame images paired by name with their label PNGs, and the splits.

    ``split`` names the folder under ``data_splits/`` whose ``*.txt`` files are read (``"split_2"``:
    A/B/C; ``"split_1"``: train/val/test_per10); None reads no splits. Frames without a label are
    kept with ``label=None``; labels without an image and files not named ``<video>_<frame>`` are
    ignored. Raises ``FileNotFoundError`` when the layout is missing and when a split lists frames
    whose image or label is not there (naming them), ``ValueError`` for a malformed split line.
    """
    root = Path(root)
    images_dir, labels_dir = root / MASK_IMAGES, root / MASK_LABELS
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"no folder {folder} ({MASK_LAYOUT})")
    images = _mask_files(images_dir, MASK_IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no frame images in {images_dir} ({MASK_LAYOUT})")
    labels = _mask_files(labels_dir, (MASK_LABEL_SUFFIX,))
    by_video: dict[str, list[MaskFrameFiles]] = {}
    for (video_id, index), image in sorted(images.items()):
        by_video.setdefault(video_id, []).append(MaskFrameFiles(index, image, labels.get((video_id, index))))
    videos = {vid: MaskVideo(vid, tuple(frames)) for vid, frames in by_video.items()}

    split_frames: dict[str, list[tuple[str, int]]] = {}
    if split is not None:
        split_dir = root / MASK_SPLITS / split
        split_files = sorted(split_dir.glob("*.txt")) if split_dir.is_dir() else []
        if not split_files:
            raise FileNotFoundError(f"no split files {split_dir}/*.txt ({MASK_LAYOUT})")
        for path in split_files:
            entries = _read_mask_split(path)
            missing = sorted({key for key in entries if key not in images or key not in labels})
            if missing:
                names = ", ".join(f"{vid}_{index + 1:06d}" for vid, index in missing[:10])
                more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                raise FileNotFoundError(
                    f"split {split}/{path.name} lists {len(missing)} frame(s) without an image in "
                    f"{images_dir} or a label in {labels_dir}: {names}{more}"
                )
            split_frames[path.stem] = entries
    splits = {name: sorted({vid for vid, _ in entries}) for name, entries in split_frames.items()}
    return Mask300VW(root, videos, split_frames, splits)


def decode_mask_label(raw: np.ndarray, path: Path) -> np.ndarray:
    """A label PNG as read by OpenCV -> (H, W) uint8 class ids 0-4 (ValueError when it is not one)."""
    if raw.ndim == 3 and raw.shape[2] in (3, 4):
        rgb = raw[..., 2::-1]  # BGR(A) -> RGB
        if (rgb == rgb[..., :1]).all():
            raw = rgb[..., 0]  # grey stored as colour
        else:
            colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
            ids = [MASK_GENERATOR_COLOURS.get((int(r), int(g), int(b)), -1) for r, g, b in colours]
            if -1 in ids:
                unknown = [tuple(int(v) for v in c) for c, i in zip(colours, ids, strict=True) if i < 0]
                raise ValueError(
                    f"{path}: colour label with colours {unknown[:5]} outside the 300VW-Mask classes "
                    f"(expected single-channel class ids 0-{MASK_CLASSES - 1})"
                )
            return np.asarray(ids, np.uint8)[inverse.reshape(-1)].reshape(rgb.shape[:2])
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{path}: expected an (H, W) label of class ids, got {raw.dtype} {raw.shape}")
    bad = np.unique(raw[raw >= MASK_CLASSES])
    if bad.size:
        raise ValueError(
            f"{path}: label values {bad[:10].tolist()} outside the class ids 0-{MASK_CLASSES - 1} "
            "(background, skin, eyes, outer mouth, inner mouth)"
        )
    return raw.astype(np.uint8, copy=False)


def iter_mask_frames(video: MaskVideo, *, max_frames: int | None = None) -> Iterator[MaskSample]:
    """Read ``video``'s frames in order: RGB image and (H, W) uint8 label, or None where unlabelled.

    Raises ``ValueError`` for an unreadable image or label, label values outside 0-4, or a label
    whose size differs from its image.
    """
    frames = video.frames if max_frames is None else video.frames[: max(max_frames, 0)]
    for frame in frames:
        bgr = cv2.imread(str(frame.image), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read image {frame.image}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        label = None
        if frame.label is not None:
            raw = cv2.imread(str(frame.label), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise ValueError(f"cannot read label {frame.label}")
            label = decode_mask_label(raw, frame.label)
            if label.shape != rgb.shape[:2]:
                raise ValueError(
                    f"label {frame.label} is {label.shape[1]}x{label.shape[0]} but image {frame.image} "
                    f"is {rgb.shape[1]}x{rgb.shape[0]}"
                )
        yield MaskSample(frame.index, rgb, label)
