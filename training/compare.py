"""Which teacher labels better: agreement between two teachers and jitter on still segments.

* **Agreement**: per-frame mIoU between the two teachers' labels on frames where both found a
  face, scored on the first teacher's face crop (so background does not dominate).
* **Jitter**: on *still* pairs of consecutive frames -- the 25% of pairs with the least image
  change inside the face crop, measured on the pixels, not on any teacher -- the per-frame mIoU
  between a teacher's label of frame i and of frame i+1. The face barely moved, so a perfect
  teacher scores near 1; whatever is lost is the teacher's own jitter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from facestream.engines.face import Box, crop_square
from facestream.training.evaluation import NUM_CLASSES, miou
from facestream.training.labelling import LabelledVideo

SIZE = 256
STILL_SHARE = 0.25


def label_miou(a: np.ndarray, b: np.ndarray) -> float:
    """Per-frame mIoU of two (H, W) label maps (classes present in either)."""
    confusion = np.bincount(a.ravel().astype(np.int64) * NUM_CLASSES + b.ravel(), minlength=NUM_CLASSES**2)
    return float(miou(confusion.reshape(NUM_CLASSES, NUM_CLASSES)))


def _crop(label: np.ndarray, box: Box) -> np.ndarray:
    return crop_square(label, box, SIZE, nearest=True)


def frame_motion(video: LabelledVideo) -> dict[int, float]:
    """Mean absolute grey-level change from frame i to i+1 inside frame i's face crop."""
    motion, previous = {}, None
    for i, rgb in enumerate(video.frames()):
        box = video.box(i - 1) if i else None
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if previous is not None and box is not None:
            a, b = crop_square(previous, box, 128), crop_square(grey, box, 128)
            motion[i - 1] = float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
        previous = grey
    return motion


def compare_video(a: LabelledVideo, b: LabelledVideo) -> dict[str, Any]:
    """Agreement and still-segment jitter of two teachers on one video."""
    both = sorted(set(a.labelled) & set(b.labelled))
    agreement = [label_miou(_crop(a.label(i), a.box(i)), _crop(b.label(i), a.box(i))) for i in both]  # type: ignore[arg-type]
    motion = frame_motion(a)
    faces = set(both)
    pairs = [i for i in both if i + 1 in faces and i in motion]
    cut = np.quantile([motion[i] for i in pairs], STILL_SHARE) if pairs else 0.0
    still = [i for i in pairs if motion[i] <= cut]
    jitter = {}
    for name, video in (("a", a), ("b", b)):
        values = [
            label_miou(_crop(video.label(i), a.box(i)), _crop(video.label(i + 1), a.box(i))) for i in still
        ]  # type: ignore[arg-type]
        jitter[name] = float(np.mean(values)) if values else None
    return {
        "clip": a.clip_id,
        "frames": len(a.records),
        "faces_a": len(a.labelled),
        "faces_b": len(b.labelled),
        "agreement_miou": float(np.mean(agreement)) if agreement else None,
        "still_pairs": len(still),
        "still_miou_a": jitter["a"],
        "still_miou_b": jitter["b"],
    }


def compare_teachers(folder_a: Path, folder_b: Path, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Compare every video labelled in both folders; write ``comparison.json`` and a bar chart."""
    names = sorted(
        p.parent.name
        for p in folder_a.glob("*/meta.json")
        if (folder_b / p.parent.name / "meta.json").is_file()
    )
    if not names:
        raise FileNotFoundError(f"no video is labelled in both {folder_a} and {folder_b}")
    rows = [
        compare_video(LabelledVideo(folder_a / n), LabelledVideo(folder_b / n))
        for n in tqdm(names, desc="compare", disable=not progress)
    ]
    teachers = [
        LabelledVideo(folder_a / names[0]).meta["teacher"],
        LabelledVideo(folder_b / names[0]).meta["teacher"],
    ]
    summary = {
        "teacher_a": teachers[0].get("teacher"),
        "teacher_b": teachers[1].get("teacher"),
        "face_rate_a": sum(r["faces_a"] for r in rows) / sum(r["frames"] for r in rows),
        "face_rate_b": sum(r["faces_b"] for r in rows) / sum(r["frames"] for r in rows),
        "agreement_miou": _mean(rows, "agreement_miou"),
        "still_miou_a": _mean(rows, "still_miou_a"),
        "still_miou_b": _mean(rows, "still_miou_b"),
        "videos": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_comparison(summary, out / "comparison.png")
    return summary


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(values)) if values else None


def plot_comparison(summary: dict[str, Any], path: Path) -> Path:
    rows = summary["videos"]
    x = np.arange(len(rows))
    figure = Figure(figsize=(max(6, 0.7 * len(rows) + 2), 4), layout="constrained")
    ax = figure.add_subplot()
    width = 0.27
    for offset, key, name in (
        (-width, "still_miou_a", f"{summary['teacher_a']}: still-frame self-agreement"),
        (0, "still_miou_b", f"{summary['teacher_b']}: still-frame self-agreement"),
        (width, "agreement_miou", "agreement between the teachers"),
    ):
        ax.bar(x + offset, [100 * (r[key] or 0) for r in rows], width, label=name)
    ax.set_xticks(x, [r["clip"] for r in rows], rotation=45, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(50, 100)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Teacher labels: jitter on still frames (higher = steadier) and agreement")
    figure.savefig(path, dpi=120)
    return path
