"""The evaluation run: sweep every scheduler's knob, grade it against the oracle, write results.

Outputs in ``--out``: ``results.json`` (the list of rows other tools read), ``report.json`` (rows
with intervals, class IoU and timelines; stage costs; timings), ``results.md`` (the table) and
the figures ``fig4_curves.png``, ``fig6_intervals.png``, ``fig7_timeline.png``, ``fig8_masks.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from facestream.engines.face import crop_square
from facestream.engines.networks import Networks
from facestream.engines.schedulers import FixedIntervalScheduler, make_scheduler
from facestream.engines.video import overlay
from facestream.training import figures
from facestream.training.evaluation import (
    FIXED_GRID,
    QUANTILES,
    SCHEDULER_NAMES,
    TAU_GRID,
    EvalConfig,
    PairBuilder,
    PairTable,
    PolicyReplay,
    StageCosts,
    Walk,
    cached_pair_table,
    dvsnet_scores,
    measure_costs,
    miou,
    oracle_walk,
    per_class_iou,
    replay,
)
from facestream.training.manifest import Clip
from facestream.training.oracle import Oracle

RESULT_KEYS = ("scheduler", "knob", "eta", "aki", "miou", "fps")


@dataclass(frozen=True)
class SweepOptions:
    schedulers: tuple[str, ...] = SCHEDULER_NAMES
    sweep: bool = True
    policies: tuple[Path, ...] = ()
    chosen_aki: float = 30.0  # the AKI of the interval histogram, timeline and mask figures
    timeline_clip: str | None = None
    config: EvalConfig = field(default_factory=EvalConfig)
    cache: Path | None = None
    progress: bool = True
    starts: int = 1  # watch every clip from this many start frames (PairTable.from_start) ...
    start_step: int = 10  # ... this many frames apart

    def __post_init__(self) -> None:
        if self.starts < 1 or self.start_step < 1:
            raise ValueError(f"starts and start_step must be >= 1, got {self.starts}, {self.start_step}")


@dataclass
class Setting:
    scheduler: str
    knob: float | None
    eta: float | None
    walk: Walk


def knob_grid(
    name: str, tables: Sequence[PairTable], dvsnet: dict[str, np.ndarray] | None
) -> list[float | None]:
    """The values a sweep tries for a scheduler; flow and DVSNet thresholds are quantiles of what
    the pair table holds (their scale depends on the trained networks)."""
    if name == "always":
        return [None]
    if name == "fixed":
        return [float(n) for n in FIXED_GRID]
    if name == "random":
        return [1.0 / n for n in FIXED_GRID]
    if name == "rl":
        return list(TAU_GRID)
    values = cached_values(name, tables, dvsnet or {})
    if values.size == 0:
        return []
    grid = np.unique(np.round(np.quantile(values, QUANTILES), 4))
    return [float(v) for v in (grid if name == "flow" else np.clip(grid, 0.0, 1.0))]


def cached_values(name: str, tables: Sequence[PairTable], dvsnet: dict[str, np.ndarray]) -> np.ndarray:
    """Every computed pair's flow magnitude (``name`` "flow") or DVSNet score, all tables together."""
    source = {t.clip_id: t.magnitude for t in tables} if name == "flow" else dvsnet
    return np.concatenate([source[t.clip_id][:, 1:][t.valid[:, 1:]] for t in tables])


def run_settings(
    tables: Sequence[PairTable], networks: Networks, options: SweepOptions
) -> tuple[list[Setting], dict[str, np.ndarray] | None, list[PolicyReplay]]:
    dvsnet = (
        dvsnet_scores(networks, tables) if networks.has_dvsnet and "dvsnet" in options.schedulers else None
    )
    policies = [PolicyReplay(p, tables) for p in options.policies] if "rl" in options.schedulers else []
    settings: list[Setting] = []
    jobs = [(n, k) for n in options.schedulers for k in _knobs(n, tables, dvsnet, options.sweep)]
    for name, knob in tqdm(jobs, desc="schedulers", disable=not options.progress):
        if name == "dvsnet" and dvsnet is None:
            continue
        for policy in policies if name == "rl" else [None]:
            walk = replay(
                make_scheduler(name, knob),
                tables,
                networks,
                window=options.config.window,
                policy=policy,
                dvsnet=dvsnet,
            )
            settings.append(Setting(name, knob, policy.eta if policy else None, walk))
    return settings, dvsnet, policies


def _knobs(name: str, tables: Sequence[PairTable], dvsnet: Any, sweep: bool) -> list[float | None]:
    if not sweep:
        return [None]
    return knob_grid(name, tables, dvsnet)


FIXED_PHASES = 8  # key grids of the fixed scheduler the comparison reports its spread over


def fixed_phase_rows(
    tables: Sequence[PairTable], networks: Networks, window: int, phases: int = FIXED_PHASES
) -> list[list[dict[str, Any]]]:
    """Per phase k of ``phases``: fixed's sweep (every interval n of FIXED_GRID) with its key grid
    moved by k/phases of an interval (``FixedIntervalScheduler.phase`` = floor(k n / phases)).

    Where the keys of a fixed interval fall against the content is chance, and on a few clips it
    moves the score by points; the spread of these curves tells which differences between
    schedulers are larger than that chance."""
    out = []
    for k in range(phases):
        rows = []
        for n in FIXED_GRID:
            walk = replay(FixedIntervalScheduler(n, k * n // phases), tables, networks, window=window)
            rows.append(
                {"scheduler": "fixed", "aki": walk.frames / walk.keys, "miou": float(miou(walk.confusion))}
            )
        out.append(rows)
    return out


def phase_spread(phase_rows: Sequence[Sequence[dict[str, Any]]], aki: float) -> dict[str, Any] | None:
    """fixed's mIoU at ``aki`` over the key phases: mean, min, max and how many phases reach it."""
    values = [v for v in (at_aki(rows, "fixed", aki) for rows in phase_rows) if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "min": min(values), "max": max(values), "phases": len(values)}


def oracle_settings(
    oracle: Oracle, tables: Sequence[PairTable], settings: Sequence[Setting]
) -> dict[int, Walk]:
    """The oracle's walk at the key count of every setting (equal AKI)."""
    counts = sorted({s.walk.keys for s in settings if oracle.feasible(s.walk.keys)})
    return {n: oracle_walk(oracle, tables, n) for n in counts}


def row(setting: Setting, costs: StageCosts, timeline_clip: str) -> dict[str, Any]:
    walk = setting.walk
    return {
        "scheduler": setting.scheduler,
        "knob": setting.knob,
        "eta": setting.eta,
        "aki": walk.frames / walk.keys,
        "miou": float(miou(walk.confusion)),
        "fps": costs.fps(setting.scheduler, walk),
        "frame_miou": float(np.mean(walk.frame_mious)),
        "keys": walk.keys,
        "frames": walk.frames,
        "forced_keys": walk.forced,
        "class_iou": [None if np.isnan(v) else float(v) for v in per_class_iou(walk.confusion)],
        "intervals": walk.intervals,
        "timeline": {
            "clip": timeline_clip,
            "keys": walk.key_frames.get(timeline_clip, []),
            "frame_miou": walk.frame_miou_by_clip.get(timeline_clip, []),
        },
    }


def add_shares(rows: list[dict[str, Any]], oracle_rows: dict[int, dict[str, Any]]) -> None:
    """``share``: (scheduler - fixed) / (oracle - fixed) in mean per-frame mIoU at equal AKI
    (fixed interpolated in log AKI; the oracle exact at the same key count)."""
    fixed = sorted((r["aki"], r["frame_miou"]) for r in rows if r["scheduler"] == "fixed")
    for r in rows:
        r["oracle_frame_miou"] = oracle_rows[r["keys"]]["frame_miou"] if r["keys"] in oracle_rows else None
        r["share"] = None
        if (
            r["scheduler"] in ("fixed", "always", "oracle")
            or len(fixed) < 2
            or r["oracle_frame_miou"] is None
        ):
            continue
        akis, values = np.log([f[0] for f in fixed]), [f[1] for f in fixed]
        if not akis[0] <= np.log(r["aki"]) <= akis[-1]:
            continue
        base = float(np.interp(np.log(r["aki"]), akis, values))
        gain = r["oracle_frame_miou"] - base
        r["share"] = (r["frame_miou"] - base) / gain if gain > 1e-9 else None


def evaluate(
    clips: Sequence[Clip], networks: Networks, fingerprint: str, options: SweepOptions, out: Path
) -> dict:
    """Build (or load) the pair tables, replay every setting, grade with the oracle, write outputs."""
    out.mkdir(parents=True, exist_ok=True)
    clock: dict[str, float] = {}
    start = time.perf_counter()
    whole = [
        cached_pair_table(c, networks, fingerprint, options.config, options.cache, options.progress)
        for c in clips
    ]
    tables = [t.from_start(k * options.start_step) for k in range(options.starts) for t in whole]
    clock["pair_tables_s"] = time.perf_counter() - start
    start = time.perf_counter()
    costs = measure_costs(networks, correct=options.config.correct)
    settings, _, _ = run_settings(tables, networks, options)
    phases = []
    if "fixed" in options.schedulers and options.sweep:
        phases = fixed_phase_rows(tables, networks, options.config.window)
    clock["replay_s"] = time.perf_counter() - start
    start = time.perf_counter()
    oracle = Oracle([t.frame_miou()[a:b] for t in tables for a, b in t.episodes()])
    timeline_clip = options.timeline_clip or tables[0].clip_id
    oracle_rows = {
        n: row(Setting("oracle", None, None, w), costs, timeline_clip)
        for n, w in oracle_settings(oracle, tables, settings).items()
    }
    clock["oracle_s"] = time.perf_counter() - start
    rows = [row(s, costs, timeline_clip) for s in settings]
    add_shares(rows, oracle_rows)
    shown = {s.walk.keys for s in settings if s.scheduler in ("fixed", "always")}
    rows += [
        {**r, "share": None, "oracle_frame_miou": r["frame_miou"]}
        for n, r in sorted(oracle_rows.items())
        if n in shown
    ]
    report = _write_outputs(rows, phases, costs, clock, tables, clips, networks, options, out)
    return report


COMPARE_AKI = (15.0, 30.0, 60.0)
COMPARED = ("fixed", "random", "flow", "dvsnet", "rl", "oracle")


def best_front(rows: Sequence[dict[str, Any]], scheduler: str) -> list[tuple[float, float]]:
    """The (AKI, mIoU) settings of ``scheduler`` (all knobs, and all eta for rl) that no other
    setting beats with at least as long an AKI: the scheduler's best curve, AKI ascending."""
    points = sorted(((r["aki"], r["miou"]) for r in rows if r["scheduler"] == scheduler), key=lambda p: -p[0])
    front: list[tuple[float, float]] = []
    for aki, value in points:
        if not front or value > front[-1][1]:
            front.append((aki, value))
    return front[::-1]


def at_aki(rows: Sequence[dict[str, Any]], scheduler: str, aki: float) -> float | None:
    """mIoU of ``scheduler`` at ``aki`` on its :func:`best_front` (None outside the AKI range its
    settings reached), interpolated between neighbouring settings linearly in key ratio 1/AKI.

    That is what switching between the two settings achieves: running setting a on a share s of
    the frames and b on the rest keys s/AKI_a + (1-s)/AKI_b of them and scores about
    s mIoU_a + (1-s) mIoU_b. Interpolating linearly in AKI instead credits a scheduler whose
    neighbouring settings lie far apart with a score that neither setting nor any mixture of them
    reaches (on set C, DVSNet's front jumped from AKI 13.5 to 65.4)."""
    front = best_front(rows, scheduler)
    if not front or not front[0][0] <= aki <= front[-1][0]:
        return None
    ratios = [1.0 / p[0] for p in reversed(front)]  # ascending, as np.interp needs
    return float(np.interp(1.0 / aki, ratios, [p[1] for p in reversed(front)]))


def front_curve(front: Sequence[tuple[float, float]], per_segment: int = 16) -> list[tuple[float, float]]:
    """``front`` with points added along each segment as :func:`at_aki` interpolates it (linear in
    1/AKI), for drawing."""
    out = list(front[:1])
    for (a0, m0), (a1, m1) in pairwise(front):
        for s in np.linspace(0.0, 1.0, per_segment + 1)[1:]:
            ratio = (1 - s) / a0 + s / a1
            out.append((1.0 / ratio, (1 - s) * m0 + s * m1))
    return out


def comparison(
    rows: Sequence[dict[str, Any]],
    akis: Sequence[float] = COMPARE_AKI,
    phase_rows: Sequence[Sequence[dict[str, Any]]] = (),
) -> list[dict[str, Any]]:
    """Per AKI: every scheduler's interpolated mIoU, per-frame N, RL's share of the oracle's gain
    over fixed -- the numbers the issue's acceptance is stated in -- and, given
    :func:`fixed_phase_rows`, fixed's spread over its key phases (``fixed_phases``, None where no
    phase reaches the AKI)."""
    always = next((r["miou"] for r in rows if r["scheduler"] == "always"), None)
    out = []
    for aki in akis:
        values = {name: at_aki(rows, name, aki) for name in COMPARED}
        fixed, rl, oracle = values["fixed"], values["rl"], values["oracle"]
        share = None
        if None not in (fixed, rl, oracle) and oracle - fixed > 1e-9:  # type: ignore[operator]
            share = (rl - fixed) / (oracle - fixed)  # type: ignore[operator]
        entry = {"aki": aki, "per_frame": always, **values, "rl_share": share}
        if phase_rows:
            entry["fixed_phases"] = phase_spread(phase_rows, aki)
        out.append(entry)
    return out


def comparison_table(compared: Sequence[dict[str, Any]]) -> str:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f}"

    def band(spread: dict[str, Any] | None) -> str:
        if spread is None:
            return "—"
        return f"{pct(spread['mean'])} ({pct(spread['min'])}–{pct(spread['max'])})"

    phases = any("fixed_phases" in c for c in compared)
    lines = [
        "| AKI | "
        + " | ".join(COMPARED)
        + " | per-frame N | RL share of oracle gain |"
        + (" fixed over its key phases: mean (min–max) |" if phases else ""),
        "|---:|" + "---:|" * (len(COMPARED) + 2 + phases),
    ]
    for c in compared:
        cells = " | ".join(pct(c[name]) for name in COMPARED)
        share = "—" if c["rl_share"] is None else f"{100 * c['rl_share']:.0f} %"
        extra = f" {band(c.get('fixed_phases'))} |" if phases else ""
        lines.append(f"| {c['aki']:g} | {cells} | {pct(c['per_frame'])} | {share} |{extra}")
    return "\n".join(lines)


def _write_outputs(
    rows: list[dict[str, Any]],
    phases: Sequence[Sequence[dict[str, Any]]],
    costs: StageCosts,
    clock: dict[str, float],
    tables: Sequence[PairTable],
    clips: Sequence[Clip],
    networks: Networks,
    options: SweepOptions,
    out: Path,
) -> dict[str, Any]:
    results = [{k: r[k] for k in RESULT_KEYS} for r in rows]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    start = time.perf_counter()
    figures.plot_curves(rows, out / "fig4_curves.png")
    figures.plot_interval_histogram(rows, options.chosen_aki, out / "fig6_intervals.png")
    figures.plot_timeline(rows, options.chosen_aki, out / "fig7_timeline.png")
    panels = mask_panels(rows, tables, clips, networks, options)
    if panels:
        figures.plot_masks(panels, out / "fig8_masks.png")
    figures.write_table(rows, out / "results.md")
    compared = comparison(rows, phase_rows=phases)
    (out / "comparison.md").write_text(
        "mIoU % at equal AKI: each scheduler's best settings (all knobs; all eta for rl), interpolated "
        "linearly in key ratio 1/AKI (switching between two settings); — where its settings did not "
        "reach that AKI."
        + (
            f" The last column: fixed with its key grid moved by k/{FIXED_PHASES} of an interval "
            "(k = 0 is the fixed column), the spread that chance alone gives a scheduler here."
            if phases
            else ""
        )
        + "\n\n"
        + comparison_table(compared)
        + "\n"
    )
    clock["figures_s"] = time.perf_counter() - start
    report = {
        "clips": [{"clip": t.clip_id, "frames": t.frames, "scored": int(t.scored.sum())} for t in tables],
        "config": asdict(options.config),
        "starts": {"count": options.starts, "step": options.start_step},
        "backend": networks.backend,
        "stage_ms": asdict(costs),
        "timings_s": {k: round(v, 2) for k, v in clock.items()},
        "rows": rows,
        "comparison": compared,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


# ----------------------------------------------------------------------------- Fig. 8


def _closest(rows: Sequence[dict[str, Any]], scheduler: str, aki: float) -> dict[str, Any] | None:
    candidates = [r for r in rows if r["scheduler"] == scheduler]
    return min(candidates, key=lambda r: abs(np.log(r["aki"] / aki)), default=None)


def mask_panels(
    rows: Sequence[dict[str, Any]],
    tables: Sequence[PairTable],
    clips: Sequence[Clip],
    networks: Networks,
    options: SweepOptions,
    count: int = 3,
) -> list[dict[str, Any]]:
    """Fig. 8: non-key frames of the timeline clip -- frame, teacher label, per-frame N, and each
    scheduler's warped result (its own key), at the chosen AKI."""
    clip = next((c for c in clips if c.clip_id == rows[0]["timeline"]["clip"]), None)
    if clip is None:
        return []
    chosen = [r for r in (_closest(rows, s, options.chosen_aki) for s in ("fixed", "rl", "oracle")) if r]
    fixed = next((r for r in chosen if r["scheduler"] == "fixed"), None)
    if fixed is None:
        return []
    frames = _panel_frames(fixed["timeline"]["keys"], clip.labelled, count)
    return _render_panels(clip, frames, chosen, networks, options.config)


def _panel_frames(keys: Sequence[int], labelled: Sequence[int], count: int) -> list[int]:
    """Frames far from fixed's keys (where warping matters most), spread over the clip."""
    if not keys:
        return []
    scored = [i for i in labelled if i not in set(keys)]
    gaps = {i: i - max((k for k in keys if k <= i), default=i) for i in scored}
    ordered = sorted(scored, key=lambda i: -gaps[i])
    picks: list[int] = []
    for i in ordered:
        if all(abs(i - p) > 20 for p in picks):
            picks.append(i)
        if len(picks) == count:
            break
    return sorted(picks)


def _render_panels(
    clip: Clip,
    frames: Sequence[int],
    chosen: Sequence[dict[str, Any]],
    networks: Networks,
    config: EvalConfig,
) -> list[dict[str, Any]]:
    builder = PairBuilder(networks, config)
    wanted = set(frames)
    for r in chosen:
        for i in frames:
            wanted.update(range(max(k for k in r["timeline"]["keys"] if k <= i), i + 1))
    cache = {i: rgb for i, rgb in enumerate(clip.frames()) if i in wanted}
    panels = []
    for i in frames:
        gaps = []
        box = clip.box(i)
        assert box is not None
        crop = crop_square(cache[i], box, builder.eval_size)
        label = crop_square(clip.label(i), box, builder.eval_size, nearest=True)
        images = [("frame", crop), ("teacher label", overlay(crop, label))]
        _, own_scores = builder.key(cache[i], box)
        own = builder.predictions(own_scores, [box], box)[0].numpy().astype(np.uint8)
        images.append(("per-frame N", overlay(crop, own)))
        for r in chosen:
            k = max(k for k in r["timeline"]["keys"] if k <= i)
            kbox = clip.box(k)
            assert kbox is not None
            held, scores = builder.key(cache[k], kbox)
            boxes = [kbox]
            for j in range(k + 1, i + 1):  # through every frame since the key: the crop follows the face
                scores, _, boxes, _ = builder.warp(cache[j], [held])
            pred = builder.predictions(scores, boxes, box)[0].numpy().astype(np.uint8)
            images.append((f"{figures.series_label(r)} (AKI {r['aki']:.0f})", overlay(crop, pred)))
            gaps.append(f"{r['scheduler']} {i - k}")
        panels.append({"title": f"frame {i}\nkey back: " + ", ".join(gaps), "images": images})
    return panels
