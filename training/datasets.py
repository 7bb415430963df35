"""Reading face videos with landmarks in the 300VW layout: ``NNN/vid.avi`` + ``NNN/annot/*.pts``.

300VW numbers its annotation files from 1 (``000001.pts`` is the first frame); frames are indexed
from 0 here. Frames without an annotation file are yielded with ``landmarks=None``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
