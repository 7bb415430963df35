"""The paper's evaluation figures and table from ``facestream evaluate`` rows.

Each row is a plain dict, one per scheduler setting: ``scheduler``, ``knob``,
``eta`` (RL key budget), ``aki``, ``miou`` / ``frame_miou`` (fractions), ``fps``, ``keys``,
``frames``, ``class_iou``, ``intervals`` (key-to-key distances), ``share`` (fraction of the oracle's
gain over fixed at equal AKI) and ``timeline`` (key indices and per-frame mIoU on one clip).

- :func:`plot_curves` - Fig. 4: mIoU against AKI and against FPS.
- :func:`plot_interval_histogram` - Fig. 6: key-interval distributions at one AKI.
- :func:`plot_timeline` - Fig. 7: per-frame mIoU and key frames on one clip.
- :func:`plot_masks` - Fig. 8: a grid of frames and masks.
- :func:`write_table` / :func:`format_table` - the numbers as a Markdown table.

RL rows are split into one series per ``eta`` (``"rl η=0.04"``); ``always`` is the per-frame
baseline and ``oracle`` the dynamic-programming upper bound. Every plot writes one PNG, creating
its folder, and returns its path; missing schedulers, single rows, empty intervals and missing
timelines give sparser figures, never errors.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

Row = Mapping[str, Any]
Panel = Mapping[str, Any]  # {"title": str, "images": [(name, HxWx3 uint8 RGB), ...]}

DPI = 120
SCHEDULER_ORDER = ("always", "fixed", "random", "flow", "dvsnet", "rl", "oracle")
PER_FRAME = "always"
ORACLE = "oracle"
DISPLAY = {PER_FRAME: "per-frame (always)", ORACLE: "oracle (DP)"}
SPECIAL_COLORS = {PER_FRAME: "dimgray", ORACLE: "black"}
TAB_COLORS = ("blue", "orange", "green", "red", "purple", "brown", "pink", "olive", "cyan")  # tab10 less grey
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">")
DASH = "—"
TABLE_HEADER = (
    "scheduler",
    "knob",
    "η",
    "AKI",
    "mIoU %",
    "per-frame mIoU %",
    "FPS",
    "share of oracle gain",
)


# ----------------------------------------------------------------------------- grouping


def series_label(row: Row) -> str:
    """The series a row belongs to: its scheduler, RL split by key budget (``"rl η=0.04"``)."""
    if row["scheduler"] == "rl" and row.get("eta") is not None:
        return f"rl η={row['eta']:g}"
    return str(row["scheduler"])


def _order_key(row: Row) -> tuple[int, str, float]:
    name = str(row["scheduler"])
    rank = SCHEDULER_ORDER.index(name) if name in SCHEDULER_ORDER else len(SCHEDULER_ORDER)
    eta = row.get("eta")
    return rank, name, -math.inf if eta is None else float(eta)


def group_rows(rows: Iterable[Row]) -> dict[str, list[Row]]:
    """Rows by :func:`series_label`, series in :data:`SCHEDULER_ORDER` (unknown ones after), RL by eta."""
    groups: dict[str, list[Row]] = {}
    for row in sorted(rows, key=_order_key):
        groups.setdefault(series_label(row), []).append(row)
    return groups


def _display(label: str) -> str:
    return DISPLAY.get(label, label)


def _styles(labels: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Colour and marker per series; always/oracle fixed, the rest from tab10 in order.

    Pass every series of the rows (not a subset) so a series keeps its colour across figures.
    """
    palette = [f"tab:{name}" for name in TAB_COLORS]
    styles: dict[str, dict[str, Any]] = {}
    ordinary = [label for label in labels if label not in SPECIAL_COLORS]
    for i, label in enumerate(ordinary):
        styles[label] = {"color": palette[i % len(palette)], "marker": MARKERS[i % len(MARKERS)]}
    for label, color in SPECIAL_COLORS.items():
        styles[label] = {"color": color, "marker": "*" if label == PER_FRAME else "x"}
    return styles


def closest_row(rows: Sequence[Row], aki: float) -> Row:
    """The row whose AKI is closest to ``aki`` on a log scale (AKI 5 and 20 are equally far from 10)."""
    if aki <= 0:
        raise ValueError(f"aki must be positive, got {aki}")
    return min(rows, key=lambda r: abs(math.log(max(float(r["aki"]), 1e-9) / aki)))


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


# ----------------------------------------------------------------------------- figures


def _save(figure: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    plt.close(figure)
    return out


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(ax: Axes, **kwargs: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _points(rows: Sequence[Row], x: str, metric: str) -> tuple[list[float], list[float]]:
    """(x, metric in %) of the rows with both values finite, sorted by x."""
    pairs = sorted(
        (float(r[x]), 100.0 * float(r[metric])) for r in rows if _finite(r.get(x)) and _finite(r.get(metric))
    )
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _plot_series(ax: Axes, groups: Mapping[str, list[Row]], x: str, metric: str) -> None:
    """One line per series (x sorted), the oracle dashed black; the per-frame row is left out."""
    styles = _styles(groups)
    for label, rows in groups.items():
        xs, ys = _points(rows, x, metric)
        if label == PER_FRAME or not xs:
            continue
        style = styles[label]
        dashed = label == ORACLE
        ax.plot(
            xs,
            ys,
            linestyle="--" if dashed else "-",
            marker=style["marker"],
            color=style["color"],
            markersize=4 if dashed else 5,
            linewidth=1.6,
            label=_display(label),
        )


def plot_curves(rows: Sequence[Row], path: str | Path, metric: str = "miou") -> Path:
    """Fig. 4: mIoU (%) against AKI (log x) and against FPS, one line per scheduler.

    ``metric`` picks the y value: ``"miou"`` (dataset mIoU, the paper's) or ``"frame_miou"``.
    The per-frame ``always`` row is a dotted horizontal line (AKI panel) and a star (FPS panel).
    """
    figure, (ax_aki, ax_fps) = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained")
    groups = group_rows(rows)
    _plot_series(ax_aki, groups, "aki", metric)
    _plot_series(ax_fps, groups, "fps", metric)
    _plot_per_frame(ax_aki, ax_fps, groups.get(PER_FRAME, []), metric)
    which = "per-frame mean mIoU" if metric == "frame_miou" else "mIoU"
    _log_axis(ax_aki)
    ax_aki.set_xlabel("average key interval, AKI (frames per key, log scale)")
    ax_fps.set_xlabel("throughput (frames per second)")
    for ax, title in ((ax_aki, f"{which} vs. key interval"), (ax_fps, f"{which} vs. speed")):
        ax.set_ylabel(f"{which} (%)")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        _legend(ax, fontsize=8)
        if not ax.lines:
            _no_data(ax, "no rows")
    figure.suptitle("Segmentation accuracy against key frequency and speed (Fig. 4)")
    return _save(figure, path)


def plot_fronts(
    fronts: Mapping[str, Sequence[tuple[float, float]]],
    per_frame: float | None,
    path: str | Path,
    title: str,
    curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> Path:
    """Each scheduler's best (AKI, mIoU %) settings (log AKI) as markers, joined by its entry in
    ``curves`` (the interpolation between them; straight lines without it); per-frame N dotted."""
    figure, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    styles = _styles(fronts)
    for label, points in fronts.items():
        if points:
            xs, ys = zip(*points, strict=True)
            style = styles[label]
            ax.plot(xs, ys, linestyle="none", marker=style["marker"], color=style["color"], markersize=4)
            line = (curves or {}).get(label) or points
            lx, ly = zip(*line, strict=True)
            ax.plot(lx, ly, color=style["color"], label=_display(label))
    if per_frame is not None:
        ax.axhline(per_frame, color=SPECIAL_COLORS[PER_FRAME], linestyle=":", label=_display(PER_FRAME))
    _log_axis(ax)
    ax.set_xlabel("average key interval, AKI (frames per key, log scale)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, fontsize=8)
    return _save(figure, path)


def _log_axis(ax: Axes) -> None:
    """Log x with plain-number ticks at 1, 2, 5 per decade (no 2×10⁰ labels)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _plot_per_frame(ax_aki: Axes, ax_fps: Axes, rows: Sequence[Row], metric: str) -> None:
    rows = [r for r in rows if _finite(r.get(metric))]
    if not rows:
        return
    row = rows[0]
    value = 100.0 * float(row[metric])
    color = SPECIAL_COLORS[PER_FRAME]
    ax_aki.axhline(value, linestyle=":", color=color, linewidth=1.6, label=DISPLAY[PER_FRAME])
    if _finite(row.get("fps")):
        ax_fps.plot([float(row["fps"])], [value], "*", color=color, markersize=14, label=DISPLAY[PER_FRAME])


def _chosen(rows: Sequence[Row], aki: float, keep_per_frame: bool) -> dict[str, Row]:
    """Per series, the row closest to ``aki``; ``always`` kept only when asked."""
    return {
        label: closest_row(group, aki)
        for label, group in group_rows(rows).items()
        if keep_per_frame or label != PER_FRAME
    }


def _intervals(row: Row) -> list[int]:
    """The row's key intervals as ints (None, a list or a numpy array)."""
    value = row.get("intervals")
    return [] if value is None else [int(v) for v in value]


def _interval_bins(chosen: Mapping[str, Row]) -> list[float]:
    """Integer-centred bins up to the longest interval, at most ~60 of them."""
    longest = max((max(_intervals(r), default=1) for r in chosen.values()), default=1)
    step = max(1, math.ceil(longest / 60))
    return [float(edge) for edge in np.arange(0.5, longest + step + 0.5, step)]


def plot_interval_histogram(rows: Sequence[Row], aki: float, path: str | Path) -> Path:
    """Fig. 6: per scheduler (oracle included, per-frame not), the key intervals of its row nearest ``aki``.

    Small multiples on a shared x axis; each title gives the row's achieved AKI, the dotted line
    marks the requested one.
    """
    chosen = _chosen(rows, aki, keep_per_frame=False)
    count = max(1, len(chosen))
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    figure, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(4.3 * ncols, 2.6 * nrows + 0.6),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    flat = list(axes.ravel())
    bins = _interval_bins(chosen)
    styles = _styles(group_rows(rows))  # colours as in the other figures
    for ax, (label, row) in zip(flat, chosen.items(), strict=False):
        _histogram(ax, row, bins, styles[label]["color"], aki)
        ax.set_title(f"{_display(label)}: AKI {float(row['aki']):.1f}", fontsize=10)
    for ax in flat[len(chosen) :]:
        if chosen:
            ax.set_visible(False)
        else:
            _no_data(ax, "no rows")
    for ax in flat[max(0, len(chosen) - ncols) :]:  # the lowest shown in each column
        ax.set_xlabel("key interval (frames)")
        ax.tick_params(labelbottom=True)
    for ax in axes[:, 0]:
        ax.set_ylabel("intervals (count)")
    figure.suptitle(f"Distribution of key intervals at AKI ≈ {aki:g} (Fig. 6)")
    return _save(figure, path)


def _histogram(ax: Axes, row: Row, bins: list[float], color: Any, aki: float) -> None:
    intervals = _intervals(row)
    ax.axvline(aki, linestyle=":", color="gray", linewidth=1)
    ax.grid(True, axis="y", alpha=0.3)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not intervals:
        ax.text(0.5, 0.5, "no key intervals", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    ax.hist(np.clip(intervals, None, bins[-1] - 0.5), bins=bins, color=color, alpha=0.85)


def _timeline_rows(
    rows: Sequence[Row], aki: float, schedulers: Collection[str] | None
) -> tuple[str | None, dict[str, Row]]:
    """The clip most timelines are on and, per series, its row nearest ``aki`` with a timeline there."""
    with_timeline = [r for r in rows if r.get("timeline") and _wanted(r, schedulers)]
    if not with_timeline:
        return None, {}
    clip = Counter(str(r["timeline"]["clip"]) for r in with_timeline).most_common(1)[0][0]
    on_clip = [r for r in with_timeline if str(r["timeline"]["clip"]) == clip]
    return clip, _chosen(on_clip, aki, keep_per_frame=True)


def _wanted(row: Row, schedulers: Collection[str] | None) -> bool:
    """Whether a row is in ``schedulers`` (by scheduler or series label); ``always`` always is."""
    if schedulers is None or row["scheduler"] == PER_FRAME:
        return True
    return row["scheduler"] in schedulers or series_label(row) in schedulers


def plot_timeline(
    rows: Sequence[Row], aki: float, path: str | Path, schedulers: Collection[str] | None = None
) -> Path:
    """Fig. 7: per-frame mIoU on one clip for each scheduler's row nearest ``aki`` (plus ``always``),
    with one strip of key-frame ticks per scheduler underneath. Unscored frames are gaps.

    Only rows with a timeline count; if they are on several clips, the most common clip is drawn.
    ``schedulers`` (scheduler names or series labels such as ``"rl η=0.04"``) thins the lines out.
    """
    clip, chosen = _timeline_rows(rows, aki, schedulers)
    strips = max(1, len(chosen))
    figure, (ax_miou, ax_keys) = plt.subplots(
        2,
        1,
        figsize=(12, 4.2 + 0.32 * strips),
        sharex=True,
        height_ratios=[3.2, 0.3 * strips + 0.4],
        layout="constrained",
    )
    if not chosen:
        _no_data(ax_miou, "no timelines in the rows")
        ax_keys.set_visible(False)
        figure.suptitle("Per-frame mIoU and key frames (Fig. 7)")
        return _save(figure, path)
    styles = _styles(group_rows(rows))  # colours as in the other figures
    _timeline_miou(ax_miou, chosen, styles)
    _timeline_keys(ax_keys, chosen, styles)
    figure.suptitle(f"Per-frame mIoU and key frames on clip {clip}, AKI ≈ {aki:g} (Fig. 7)")
    return _save(figure, path)


def _timeline_miou(ax: Axes, chosen: Mapping[str, Row], styles: Mapping[str, Mapping[str, Any]]) -> None:
    for label, row in chosen.items():
        values = [np.nan if v is None else 100.0 * float(v) for v in row["timeline"]["frame_miou"]]
        special = label in SPECIAL_COLORS
        ax.plot(
            np.arange(len(values)),
            values,
            linestyle={PER_FRAME: ":", ORACLE: "--"}.get(label, "-"),
            color=styles[label]["color"],
            linewidth=1.5 if special else 1.1,
            label=f"{_display(label)} (AKI {float(row['aki']):.1f})",
        )
    ax.set_ylabel("per-frame mIoU (%)")
    ax.grid(True, alpha=0.3)
    ax.figure.legend(fontsize=8, loc="outside right upper")


def _timeline_keys(ax: Axes, chosen: Mapping[str, Row], styles: Mapping[str, Mapping[str, Any]]) -> None:
    labels = list(chosen)
    positions = [np.asarray(chosen[label]["timeline"]["keys"], dtype=float) for label in labels]
    offsets = [float(i) for i in range(len(labels) - 1, -1, -1)]  # first series on top
    ax.eventplot(
        positions,
        lineoffsets=offsets,
        linelengths=0.75,
        linewidths=1.0,
        colors=[styles[label]["color"] for label in labels],
    )
    ax.set_yticks(offsets, [_display(label) for label in labels], fontsize=8)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlabel("frame index")
    ax.set_title("key frames", fontsize=9, loc="left")
    ends = [len(chosen[label]["timeline"]["frame_miou"]) for label in labels]
    ends += [int(keys.max()) + 1 for keys in positions if keys.size]
    ax.set_xlim(-0.5, max(ends, default=1) - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_masks(panels: Sequence[Panel], path: str | Path) -> Path:
    """Fig. 8: a grid of images, one row per panel (row label = its title), one column per image name.

    Names are the column headers, in order of first appearance; a panel without some name leaves
    that cell empty. Images are RGB ``uint8`` (``HxWx3``) or single-channel ``HxW``.
    """
    names = list(dict.fromkeys(name for panel in panels for name, _ in panel["images"]))
    nrows, ncols = max(1, len(panels)), max(1, len(names))
    aspect = _image_aspect(panels)
    figure, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(2.4 * ncols + 0.6, 2.4 * aspect * nrows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    if not names:
        _no_data(axes[0, 0], "no images")
    for r, panel in enumerate(panels):
        images = dict(panel["images"])
        axes[r, 0].set_ylabel(str(panel["title"]), fontsize=10)
        for c, name in enumerate(names):
            if name in images:
                _show(axes[r, c], np.asarray(images[name]))
    for c, name in enumerate(names):
        axes[0, c].set_title(str(name), fontsize=10)
    return _save(figure, path)


def _show(ax: Axes, image: np.ndarray) -> None:
    """RGB as is; single-channel in grey, ``uint8`` on its full 0-255 range, others autoscaled."""
    if image.ndim == 2:
        vmin, vmax = (0, 255) if image.dtype == np.uint8 else (None, None)
        ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")


def _image_aspect(panels: Sequence[Panel]) -> float:
    for panel in panels:
        for _, image in panel["images"]:
            shape = np.shape(image)
            if len(shape) >= 2 and shape[1] > 0:
                return float(shape[0]) / float(shape[1])
    return 1.0


# ----------------------------------------------------------------------------- table


def _number(value: Any, fmt: str, scale: float = 1.0, suffix: str = "") -> str:
    """``value * scale`` formatted, or an em dash when it is None or not finite."""
    if not _finite(value):
        return DASH
    return f"{float(value) * scale:{fmt}}{suffix}"


def _table_row(row: Row) -> list[str]:
    return [
        str(row["scheduler"]),
        _number(row.get("knob"), ".4g"),
        _number(row.get("eta"), "g"),
        _number(row.get("aki"), ".1f"),
        _number(row.get("miou"), ".2f", 100.0),
        _number(row.get("frame_miou"), ".2f", 100.0),
        _number(row.get("fps"), ".1f"),
        _number(row.get("share"), ".1f", 100.0, "%"),
    ]


def format_table(rows: Iterable[Row]) -> str:
    """A Markdown table of the rows, sorted by scheduler (:data:`SCHEDULER_ORDER`), then η, then AKI.

    AKI and FPS to 1 decimal, mIoU in % to 2 decimals, the share of the oracle's gain in %
    (1 decimal); missing values are an em dash.
    """
    ordered = sorted(
        rows, key=lambda r: (*_order_key(r), float(r["aki"]) if _finite(r.get("aki")) else math.inf)
    )
    header = "| " + " | ".join(TABLE_HEADER) + " |"
    rule = "|" + "|".join(["---"] + ["---:"] * (len(TABLE_HEADER) - 1)) + "|"
    return "\n".join([header, rule, *("| " + " | ".join(_table_row(r)) + " |" for r in ordered)])


def write_table(rows: Iterable[Row], path: str | Path) -> Path:
    """Write :func:`format_table` to ``path`` (Markdown, trailing newline) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_table(rows) + "\n", encoding="utf-8")
    return out
