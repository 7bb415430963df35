"""The 300VW folder reader, on a tiny fixture in the 300VW layout made by the test."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facestream.engines.video import VideoWriter
from facestream.training.datasets import iter_frames, iter_mask_frames, scan_300vw, scan_300vw_mask
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


# ----------------------------------------------------------------------------- 300VW-Mask


def _mask_image(video: int, frame: int, h: int = 12, w: int = 16) -> np.ndarray:
    """A BGR image whose colour encodes (video, frame); lossless PNG so the test can compare exactly."""
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10 * video, 20 * frame, 200
    return image


def _mask_label(frame: int, h: int = 12, w: int = 16) -> np.ndarray:
    label = np.zeros((h, w), np.uint8)
    label[2:10, 3:13] = 1
    label[4, 5:7] = 2
    label[7, 6:10] = 3
    label[7, 7] = 4
    label[0, 0] = frame % 5
    return label


def _make_mask_dataset(root: Path, *, splits: dict[str, list[str]] | None = None) -> None:
    """Videos 001 (frames 1-3), 002 (frames 1-4, no label for 3), 010 (frames 2, 5, as .jpg)."""
    (root / "images_orig").mkdir(parents=True)
    (root / "labels_orig").mkdir()
    frames = {1: [1, 2, 3], 2: [1, 2, 3, 4], 10: [2, 5]}
    for video, numbers in frames.items():
        for n in numbers:
            name = f"{video:03d}_{n:06d}"
            suffix = ".jpg" if video == 10 else ".png"  # the release ships .jpg; .png compares exactly
            assert cv2.imwrite(str(root / "images_orig" / f"{name}{suffix}"), _mask_image(video, n))
            if (video, n) != (2, 3):
                assert cv2.imwrite(str(root / "labels_orig" / f"{name}.png"), _mask_label(n))
    (root / "labels_orig" / "003_000001.png").write_bytes(b"")  # a label without an image: ignored
    (root / "images_orig" / "README.txt").write_text("not a frame")
    (root / "images_orig" / "001_000000.png").write_bytes(b"")  # frame numbers start at 1: ignored
    if splits is None:
        splits = {
            "A": ["001_000001", "001_000003", "010_000005"],
            "B": ["002_000001", "002_000002", "002_000004"],
            "C": ["010_000002"],
        }
    split_dir = root / "data_splits" / "split_2"
    split_dir.mkdir(parents=True)
    for name, entries in splits.items():
        lines = [f"/images_orig/{e}.jpg /labels_orig/{e}.png" for e in entries]
        (split_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")


def test_scan_300vw_mask_pairs_frames_and_reads_splits(tmp_path: Path) -> None:
    _make_mask_dataset(tmp_path)
    data = scan_300vw_mask(tmp_path)
    assert list(data.videos) == ["001", "002", "010"]
    v2 = data.videos["002"]
    assert [f.index for f in v2.frames] == [0, 1, 2, 3]  # 000001 is frame 0
    assert v2.images == [tmp_path / "images_orig" / f"002_{n:06d}.png" for n in (1, 2, 3, 4)]
    assert v2.labels[2] is None and v2.labels[3] == tmp_path / "labels_orig" / "002_000004.png"
    assert data.videos["010"].images == [tmp_path / "images_orig" / f"010_{n:06d}.jpg" for n in (2, 5)]
    assert [f.index for f in data.videos["010"].frames] == [1, 4]
    assert [s.rgb.shape for s in iter_mask_frames(data.videos["010"])] == [(12, 16, 3)] * 2
    assert data.splits == {"A": ["001", "010"], "B": ["002"], "C": ["010"]}
    assert data.split_frames["A"] == [("001", 0), ("001", 2), ("010", 4)]
    a = data.split_videos("A")
    assert [v.video_id for v in a] == ["001", "010"]
    assert [f.index for f in a[0].frames] == [0, 2] and [f.index for f in a[1].frames] == [4]
    with pytest.raises(KeyError, match="have"):
        data.split_videos("D")
    assert scan_300vw_mask(tmp_path, split=None).split_frames == {}


def test_iter_mask_frames_reads_rgb_and_labels(tmp_path: Path) -> None:
    _make_mask_dataset(tmp_path)
    samples = list(iter_mask_frames(scan_300vw_mask(tmp_path).videos["002"]))
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert samples[2].label is None
    first = samples[0]
    assert first.rgb.dtype == np.uint8 and first.rgb.shape == (12, 16, 3)
    np.testing.assert_array_equal(first.rgb, _mask_image(2, 1)[..., ::-1])  # BGR on disk -> RGB
    assert first.label is not None and first.label.dtype == np.uint8
    np.testing.assert_array_equal(first.label, _mask_label(1))
    assert len(list(iter_mask_frames(scan_300vw_mask(tmp_path).videos["002"], max_frames=2))) == 2


def test_iter_mask_frames_decodes_generator_colour_labels(tmp_path: Path) -> None:
    _make_mask_dataset(tmp_path)
    label = _mask_label(1)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 255, 255], [0, 0, 255]], np.uint8)  # RGB
    cv2.imwrite(str(tmp_path / "labels_orig" / "001_000001.png"), colours[label][..., ::-1])
    grey = np.repeat(_mask_label(2)[..., None], 3, axis=2)  # class ids stored in 3 equal channels
    cv2.imwrite(str(tmp_path / "labels_orig" / "001_000002.png"), grey)
    samples = list(iter_mask_frames(scan_300vw_mask(tmp_path).videos["001"]))
    np.testing.assert_array_equal(samples[0].label, label)
    np.testing.assert_array_equal(samples[1].label, _mask_label(2))


def test_iter_mask_frames_rejects_bad_labels(tmp_path: Path) -> None:
    _make_mask_dataset(tmp_path)
    labels = tmp_path / "labels_orig"
    bad_value = _mask_label(1)
    bad_value[0, 1] = 7
    cv2.imwrite(str(labels / "001_000001.png"), bad_value)
    cv2.imwrite(str(labels / "010_000002.png"), np.zeros((12, 15), np.uint8))
    cv2.imwrite(str(labels / "002_000001.png"), np.full((12, 16, 3), (10, 200, 30), np.uint8))
    data = scan_300vw_mask(tmp_path)
    with pytest.raises(ValueError, match=r"values \[7\] outside the class ids 0-4"):
        list(iter_mask_frames(data.videos["001"]))
    with pytest.raises(ValueError, match="is 15x12 but image .* is 16x12"):
        list(iter_mask_frames(data.videos["010"]))
    with pytest.raises(ValueError, match="colours"):
        list(iter_mask_frames(data.videos["002"]))
    cv2.imwrite(str(labels / "001_000001.png"), _mask_label(1))
    (tmp_path / "images_orig" / "001_000002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*001_000002"):
        list(iter_mask_frames(data.videos["001"]))
    (labels / "001_000001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read label .*001_000001"):
        list(iter_mask_frames(data.videos["001"]))


def test_scan_300vw_mask_missing_layout_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images_orig/<video>_<frame:06d>.jpg"):
        scan_300vw_mask(tmp_path)
    (tmp_path / "images_orig").mkdir()
    (tmp_path / "labels_orig").mkdir()
    with pytest.raises(FileNotFoundError, match="no frame images"):
        scan_300vw_mask(tmp_path)
    cv2.imwrite(str(tmp_path / "images_orig" / "001_000001.png"), _mask_image(1, 1))
    with pytest.raises(FileNotFoundError, match=r"split_2/\*\.txt .*data_splits/<split>"):
        scan_300vw_mask(tmp_path)
    assert list(scan_300vw_mask(tmp_path, split=None).videos) == ["001"]


def test_scan_300vw_mask_split_frames_without_files_are_listed(tmp_path: Path) -> None:
    splits = {"A": ["001_000001", "004_000001", "002_000003"], "B": ["002_000001"]}
    _make_mask_dataset(tmp_path, splits=splits)
    with pytest.raises(FileNotFoundError, match="A.txt lists 2 frame.*: 002_000003, 004_000001"):
        scan_300vw_mask(tmp_path)


def test_scan_300vw_mask_rejects_malformed_split_lines(tmp_path: Path) -> None:
    _make_mask_dataset(tmp_path)
    (tmp_path / "data_splits" / "split_2" / "C.txt").write_text(
        "/images_orig/001_000001.jpg /labels_orig/001_000002.png\n"
    )
    with pytest.raises(ValueError, match="C.txt:1: .*naming one frame"):
        scan_300vw_mask(tmp_path)
