"""The evaluation figures and table (training/figures.py) on synthetic rows: every plot writes a
readable PNG, the table formats its numbers as documented, and sparse inputs do not crash."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from facestream.training import figures

CLIP_FRAMES = 60


def _timeline(keys: list[int], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    scores: list[float | None] = [float(v) for v in rng.uniform(0.6, 0.8, CLIP_FRAMES)]
    scores[7] = None  # an unscored frame
    return {"clip": "300VW/114", "keys": keys, "frame_miou": scores}


def make_row(
    scheduler: str, aki: float, knob: float | None = None, eta: float | None = None, **extra: Any
) -> dict[str, Any]:
    """One evaluation row; its intervals and timeline keys follow a fixed interval of round(aki)."""
    step = max(1, round(aki))
    keys = list(range(0, CLIP_FRAMES, step))
    row: dict[str, Any] = {
        "scheduler": scheduler,
        "knob": knob,
        "eta": eta,
        "aki": aki,
        "miou": 0.80 - 0.01 * aki,
        "frame_miou": 0.79 - 0.01 * aki,
        "fps": 25.0 + 10.0 * aki,
        "keys": len(keys),
        "frames": CLIP_FRAMES,
        "class_iou": [0.95, 0.85, 0.6, 0.7, 0.5],
        "intervals": [step] * (len(keys) - 1) + [1, step + 3],
        "share": None,
        "timeline": _timeline(keys, seed=int(aki * 10)),
    }
    row.update(extra)
    return row


def make_rows() -> list[dict[str, Any]]:
    rows = [make_row("always", 1.0)]
    rows += [make_row("fixed", float(n), knob=float(n)) for n in (2, 5, 10, 20)]
    rows += [make_row("random", 1 / p, knob=p, share=-0.25) for p in (0.5, 0.2, 0.1)]
    rows += [make_row("flow", a, knob=t, share=0.4) for a, t in ((2.7, 0.01), (9.6, 0.0567))]
    rows += [make_row("rl", a, knob=tau, eta=0.04, share=0.83) for a, tau in ((4.8, 0.3), (11.2, 0.5))]
    rows += [make_row("rl", a, knob=tau, eta=0.1, share=0.91) for a, tau in ((3.1, 0.3), (8.9, 0.5))]
    rows += [make_row("oracle", a) for a in (2.0, 5.0, 10.0, 20.0)]
    return rows


def assert_png(path: Path, min_side: int = 300) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cv2 cannot read {path}"
    height, width = image.shape[:2]
    assert min_side <= height <= 4000 and min_side <= width <= 4000, (height, width)
    assert image.std() > 0, "blank image"
    return height, width


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return make_rows()


def test_series_split_rl_by_eta(rows: list[dict[str, Any]]) -> None:
    groups = figures.group_rows(rows)
    assert list(groups) == ["always", "fixed", "random", "flow", "rl η=0.04", "rl η=0.1", "oracle"]
    assert [r["aki"] for r in groups["rl η=0.1"]] == [3.1, 8.9]


def test_closest_row_on_log_scale(rows: list[dict[str, Any]]) -> None:
    fixed = [r for r in rows if r["scheduler"] == "fixed"]
    assert figures.closest_row(fixed, 9.0)["aki"] == 10.0
    assert figures.closest_row(fixed, 3.3)["aki"] == 5.0  # |log 5/3.3| < |log 2/3.3|
    with pytest.raises(ValueError):
        figures.closest_row(fixed, 0.0)


def test_plot_curves(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    path = figures.plot_curves(rows, tmp_path / "sub" / "curves.png")
    assert path == tmp_path / "sub" / "curves.png"
    height, width = assert_png(path)
    assert width > height  # two panels side by side


def test_plot_curves_frame_miou(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    assert_png(figures.plot_curves(rows, tmp_path / "curves.png", metric="frame_miou"))


def test_plot_interval_histogram(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    assert_png(figures.plot_interval_histogram(rows, 10.0, tmp_path / "hist.png"))


def test_plot_timeline(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    assert_png(figures.plot_timeline(rows, 10.0, tmp_path / "timeline.png"))
    few = figures.plot_timeline(rows, 10.0, tmp_path / "few.png", schedulers=["fixed", "rl η=0.04"])
    assert_png(few)


def test_plot_masks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    panels = [
        {
            "title": f"frame {i}",
            "images": [
                (name, rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for name in ("input", "fixed", "rl")
            ],
        }
        for i in range(2)
    ]
    panels.append({"title": "gray, partial", "images": [("rl", np.full((48, 64), 128, np.uint8))]})
    height, width = assert_png(figures.plot_masks(panels, tmp_path / "masks.png"), min_side=200)
    assert width > height  # 3 columns of 4:3 images, 3 rows


def test_format_table(rows: list[dict[str, Any]]) -> None:
    table = figures.format_table(rows)
    lines = table.splitlines()
    assert lines[0] == (
        "| scheduler | knob | η | AKI | mIoU % | per-frame mIoU % | FPS | share of oracle gain |"
    )
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert len(body) == len(rows)
    schedulers = [cells[0] for cells in body]
    assert schedulers == sorted(schedulers, key=figures.SCHEDULER_ORDER.index)
    assert set(schedulers) == {"always", "fixed", "random", "flow", "rl", "oracle"}
    by_key = {(cells[0], cells[2], cells[3]): cells for cells in body}
    assert by_key["fixed", "—", "10.0"] == ["fixed", "10", "—", "10.0", "70.00", "69.00", "125.0", "—"]
    assert by_key["rl", "0.04", "4.8"] == ["rl", "0.3", "0.04", "4.8", "75.20", "74.20", "73.0", "83.0%"]
    assert by_key["random", "—", "2.0"][-1] == "-25.0%"
    assert by_key["flow", "—", "9.6"][1] == "0.0567"
    rl = [(cells[2], float(cells[3])) for cells in body if cells[0] == "rl"]
    assert rl == sorted(rl, key=lambda x: (float(x[0]), x[1]))  # by eta, then AKI
    for cells in body:
        assert re.fullmatch(r"\d+\.\d", cells[3]) and re.fullmatch(r"\d+\.\d\d", cells[4]), cells


def test_write_table(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    path = figures.write_table(rows, tmp_path / "out" / "table.md")
    assert path.read_text(encoding="utf-8") == figures.format_table(rows) + "\n"


def test_sparse_rows_do_not_crash(tmp_path: Path) -> None:
    single = [make_row("fixed", 10.0, knob=10.0, timeline=None, intervals=[])]
    odd = [
        make_row("flow", 5.0, knob=0.1, timeline=None, fps=float("nan")),
        make_row("oracle", 5.0, timeline=None, intervals=[]),
        make_row("always", 1.0, timeline=None, share=None),
    ]
    arrays = [  # numpy arrays instead of lists, a key past the scored frames, no keys at all
        make_row("rl", 7.0, knob=0.5, eta=0.04, intervals=np.array([5, 9])),
        make_row("fixed", 5.0, knob=5.0, timeline={"clip": "c", "keys": [], "frame_miou": []}),
    ]
    scores = np.array([0.5, np.nan, 0.7])
    arrays[0]["timeline"] = {"clip": "c", "keys": np.array([0, 4]), "frame_miou": scores}
    for case, rows in (("single", single), ("odd", odd), ("arrays", arrays), ("empty", [])):
        assert_png(figures.plot_curves(rows, tmp_path / f"{case}_curves.png"), min_side=100)
        assert_png(figures.plot_interval_histogram(rows, 10.0, tmp_path / f"{case}_hist.png"), min_side=100)
        assert_png(figures.plot_timeline(rows, 10.0, tmp_path / f"{case}_timeline.png"), min_side=100)
        figures.write_table(rows, tmp_path / f"{case}.md")
    assert "| flow | 0.1 | — | 5.0 | 75.00 | 74.00 | — | — |" in figures.format_table(odd)
    assert_png(figures.plot_masks([], tmp_path / "no_masks.png"), min_side=50)
