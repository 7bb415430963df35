"""The 300VW folder reader, on a tiny fixture in the 300VW layout made by the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facestream.engines.video import VideoWriter
from facestream.training.datasets import iter_frames, scan_300vw
from facestream.training.labels import write_pts


def _make_video(folder: Path, frames: int, annotated: list[int]) -> np.ndarray:
    folder.mkdir(parents=True)
    with VideoWriter(folder / "vid.avi", 25, 64, 48) as writer:
        for i in range(frames):
            writer.write(np.full((48, 64, 3), 10 * i, np.uint8))
    (folder / "annot").mkdir()
    points = np.stack((np.arange(68.0), np.arange(68.0) / 2), axis=1)
    for i in annotated:
        write_pts(folder / "annot" / f"{i + 1:06d}.pts", points + i)
    return points


def test_scan_and_iterate_300vw_layout(tmp_path: Path) -> None:
    points = _make_video(tmp_path / "002", 6, annotated=[0, 1, 2, 4])
    _make_video(tmp_path / "001", 3, annotated=[0, 1, 2])
    (tmp_path / "notes").mkdir()  # a folder without a video is ignored
    videos = scan_300vw(tmp_path)
    assert [v.video_id for v in videos] == ["001", "002"]
    assert sorted(videos[1].annotations) == [0, 1, 2, 4]
    frames = list(iter_frames(videos[1]))
    assert [f.index for f in frames] == list(range(6))
    assert frames[3].landmarks is None and frames[5].landmarks is None
    np.testing.assert_allclose(frames[4].landmarks, points + 4, atol=1e-3)
    assert frames[0].rgb.shape == (48, 64, 3)


def test_scan_empty_folder_names_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="vid.avi"):
        scan_300vw(tmp_path)
    with pytest.raises(FileNotFoundError, match="annot"):
        scan_300vw(tmp_path / "missing")
