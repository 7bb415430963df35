"""Leave-one-subject-out cross-validation of the key schedulers on one set (``facestream crossval``).

Set C has three people. To see how the schedulers trained on set B do on people they never saw
without touching C, each *fold* holds one subject of B out: its DVSNet head and policies learn
from the other subjects (``facestream train dvsnet|policy --manifest FOLD.json``), and are scored
on the held-out clip only. ``crossval evaluate`` replays every fold's schedulers on its held-out
clip and pools the folds per setting (confusion matrices summed), so each setting is one
operating point over all held-out frames, as ``facestream evaluate`` pools the clips of a set:

* fixed n and RL tau are the same knob in every fold (RL: one curve per policy folder name);
* flow and DVSNet thresholds are quantiles of their values pooled over all held-out clips (DVSNet:
  each fold's head scores its own held-out clip), one absolute threshold for every fold.

Folder layout of ``--runs``: ``m-<subject>.json`` (from ``crossval manifests``) and, per subject,
``<subject>/dvsnet/dvsnet.safetensors`` and ``<subject>/<name>/policy.safetensors`` per policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from facestream.engines.backends import create_networks
from facestream.engines.dis_flow import DEFAULT_FLOW
from facestream.engines.networks import Networks
from facestream.engines.schedulers import make_scheduler
from facestream.engines.weights import FILES, WeightsError, find_weights
from facestream.training import figures
from facestream.training.evaluation import (
    FIXED_GRID,
    NUM_CLASSES,
    QUANTILES,
    TAU_GRID,
    EvalConfig,
    PairTable,
    PolicyReplay,
    cached_pair_table,
    dvsnet_scores,
    miou,
    pair_fingerprint,
    replay,
)
from facestream.training.manifest import Manifest, ManifestError, load_manifest, open_clips
from facestream.training.sweep import COMPARE_AKI, at_aki, best_front, cached_values, front_curve

HELD_OUT = "C"  # the set a fold manifest puts its held-out subject in
UNUSED = "A"  # where a fold manifest puts every entry outside the cross-validated set
THRESHOLDED = ("flow", "dvsnet")


def fold_manifests(manifest: Manifest, subset: str = "B") -> dict[str, Manifest]:
    """Per subject of ``subset``: a manifest whose set B holds the other subjects of ``subset``
    and whose set C holds that subject (every other entry goes to set A, which the schedulers'
    training and evaluation do not read)."""
    subjects = sorted({e.subject for e in manifest.videos(subset)})
    if len(subjects) < 2:
        raise ManifestError(f"set {subset} needs at least 2 subjects to cross-validate, has {len(subjects)}")
    folds = {}
    for held in subjects:
        entries = tuple(
            replace(e, set=(HELD_OUT if e.subject == held else "B") if e.set == subset else UNUSED)
            for e in manifest.entries
        )
        folds[held] = Manifest(f"{manifest.name}-cv-{held}", manifest.teacher, entries, manifest.root)
    return folds


@dataclass
class Tally:
    """One setting's result summed over folds."""

    confusion: np.ndarray
    keys: int = 0
    frames: int = 0

    def add(self, confusion: np.ndarray, keys: int, frames: int) -> None:
        self.confusion = self.confusion + confusion
        self.keys += keys
        self.frames += frames


def pool(per_fold: Sequence[dict[str, tuple[np.ndarray, int, int]]]) -> list[dict[str, Any]]:
    """Rows ``{"scheduler", "setting", "aki", "miou"}`` (mIoU in %) of the settings every fold
    ran, each fold's (confusion, keys, frames) summed; the scheduler is the setting's first
    ``/`` part."""
    common = set(per_fold[0]).intersection(*per_fold[1:]) if per_fold else set()
    tallies: dict[str, Tally] = {}
    for fold in per_fold:
        for name in common:
            tallies.setdefault(name, Tally(np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64))).add(*fold[name])
    return [
        {
            "scheduler": name.split("/")[0],
            "setting": name,
            "aki": t.frames / t.keys,
            "miou": 100.0 * float(miou(t.confusion)),
        }
        for name, t in sorted(tallies.items())
        if t.keys
    ]


def pooled_thresholds(values: Sequence[np.ndarray], clip: bool) -> list[float]:
    """The QUANTILES of every fold's values together: ``evaluate``'s grid over a set, without its
    rounding and de-duplication, so that each quantile keeps a setting of its own."""
    grid = np.quantile(np.concatenate(values), QUANTILES)
    return [float(v) for v in (np.clip(grid, 0.0, 1.0) if clip else grid)]


@dataclass
class Fold:
    subject: str
    networks: Networks
    tables: list[PairTable]
    dvsnet: dict[str, np.ndarray]
    policies: dict[str, Path]

    def values(self, name: str) -> np.ndarray:
        return cached_values(name, self.tables, self.dvsnet)


def load_fold(
    runs: Path, subject: str, weights_dir: Path | None, cache: Path, starts: int, start_step: int
) -> Fold:
    """The held-out clip's tables (from ``cache``, built there if missing) and the fold's networks:
    N, F and the corrector from ``weights_dir``, the DVSNet head from the fold's run folder."""
    folder = runs / subject
    head = folder / "dvsnet" / FILES["dvsnet"]
    if not head.is_file():
        raise WeightsError(f"fold {subject} has no DVSNet head at {head}")
    shipped = find_weights(weights_dir)
    weights = replace(shipped, paths={**shipped.paths, "dvsnet": head})
    networks = create_networks(weights, "onnxruntime", threads=2, flow=DEFAULT_FLOW, conv6=True)
    config = EvalConfig(correct=True)
    clips = open_clips(load_manifest(runs / f"m-{subject}.json"), HELD_OUT)
    whole = [
        cached_pair_table(c, networks, pair_fingerprint(weights, config), config, cache, False) for c in clips
    ]
    tables = [t.from_start(k * start_step) for k in range(starts) for t in whole]
    policies = {p.parent.name: p for p in sorted(folder.glob(f"*/{FILES['policy']}"))}
    return Fold(subject, networks, tables, dvsnet_scores(networks, tables), policies)


def fold_settings(fold: Fold, thresholds: dict[str, list[float]]) -> dict[str, tuple[np.ndarray, int, int]]:
    """Every setting replayed on the fold's held-out clip: (confusion, keys, frames) by name."""
    jobs: list[tuple[str, str, float | None, PolicyReplay | None]] = [("always", "always", None, None)]
    jobs += [("fixed", f"fixed/{n}", float(n), None) for n in FIXED_GRID]
    jobs += [
        (name, f"{name}/q{q:g}", v, None)
        for name in THRESHOLDED
        for q, v in zip(QUANTILES, thresholds[name], strict=True)
    ]
    for label, path in fold.policies.items():
        policy = PolicyReplay(path, fold.tables)
        jobs += [("rl", f"rl-{label}/tau{t:g}", float(t), policy) for t in TAU_GRID]
    out = {}
    for name, setting, knob, policy in jobs:
        walk = replay(
            make_scheduler(name, knob), fold.tables, fold.networks, policy=policy, dvsnet=fold.dvsnet
        )
        out[setting] = (walk.confusion, walk.keys, walk.frames)
    return out


def _merged(rows: Sequence[dict[str, Any]], name: str, members: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of ``members`` renamed ``name``: one front over all their settings."""
    return [{**r, "scheduler": name} for r in rows if r["scheduler"] in members]


def summarise(rows: Sequence[dict[str, Any]], groups: dict[str, Sequence[str]]) -> dict[str, Any]:
    """Per scheduler (a group of row schedulers pooled into one front) its mIoU at COMPARE_AKI."""
    out: dict[str, Any] = {}
    for name, members in groups.items():
        merged = _merged(rows, name, members)
        out[name] = {f"{aki:g}": at_aki(merged, name, aki) for aki in COMPARE_AKI}
    out["per_frame"] = next((r["miou"] for r in rows if r["scheduler"] == "always"), None)
    return out


def people_bootstrap(
    per_fold: Sequence[dict[str, tuple[np.ndarray, int, int]]],
    groups: dict[str, Sequence[str]],
    draws: int = 2000,
    seed: int = 0,
    observed: dict[str, Any] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """RL's lead over each baseline (points of mIoU) at COMPARE_AKI when the held-out people are
    drawn again with replacement, ``draws`` times, and pooled as :func:`evaluate_folds` pools
    them (thresholds and trained networks as they are: only the choice of people varies).

    Per baseline and AKI: ``lead`` (all people once), ``low``/``high`` (the 5 and 95 % points of
    the drawn leads), ``rl_ahead`` (the share of draws where RL leads) and ``draws`` (those
    where both fronts reach the AKI). ``observed`` is :func:`summarise` of all people once, where
    the caller has it already."""
    rng = np.random.default_rng(seed)
    baselines = [name for name in ("fixed", *THRESHOLDED) if name in groups]
    leads: dict[str, dict[str, list[float]]] = {b: {f"{a:g}": [] for a in COMPARE_AKI} for b in baselines}
    for _ in range(draws):
        drawn = summarise(pool([per_fold[i] for i in rng.integers(0, len(per_fold), len(per_fold))]), groups)
        for b in baselines:
            for aki, values in leads[b].items():
                if drawn["rl"][aki] is not None and drawn[b][aki] is not None:
                    values.append(drawn["rl"][aki] - drawn[b][aki])
    if observed is None:
        observed = summarise(pool(per_fold), groups)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for b in baselines:
        out[b] = {}
        for aki, values in leads[b].items():
            seen = observed["rl"][aki] is not None and observed[b][aki] is not None
            spread = np.array(values)
            out[b][aki] = {
                "lead": observed["rl"][aki] - observed[b][aki] if seen else None,
                "low": float(np.quantile(spread, 0.05)) if len(spread) else None,
                "high": float(np.quantile(spread, 0.95)) if len(spread) else None,
                "rl_ahead": float(np.mean(spread > 0)) if len(spread) else None,
                "draws": len(spread),
            }
    return out


def evaluate_folds(
    runs: Path,
    weights_dir: Path | None,
    cache: Path,
    starts: int,
    start_step: int,
    rl_names: Sequence[str] = (),
    draws: int = 2000,
) -> dict[str, Any]:
    """Pooled held-out results of every fold in ``runs``; the ``rl`` front is the policies named
    ``rl_names`` (folder names; default all), each policy also has its own (``rl-<name>``)."""
    subjects = sorted(p.name[2:-5] for p in runs.glob("m-*.json"))
    if not subjects:
        raise ManifestError(f"no fold manifests m-*.json in {runs} (run facestream crossval manifests)")
    folds = [load_fold(runs, s, weights_dir, cache, starts, start_step) for s in tqdm(subjects, desc="folds")]
    trained = sorted(set.intersection(*(set(f.policies) for f in folds)))
    if any(n not in trained for n in rl_names):
        raise ValueError(
            f"--rl names {', '.join(rl_names)}; every fold has {', '.join(trained) or 'no policy'}"
        )
    thresholds = {n: pooled_thresholds([f.values(n) for f in folds], clip=n == "dvsnet") for n in THRESHOLDED}
    per_fold = [fold_settings(f, thresholds) for f in tqdm(folds, desc="replay")]
    rows = pool(per_fold)
    policy_groups = sorted({r["scheduler"] for r in rows if r["scheduler"].startswith("rl-")})
    groups: dict[str, Sequence[str]] = {n: (n,) for n in ("fixed", *THRESHOLDED)}
    groups["rl"] = tuple(g for g in policy_groups if not rl_names or g[3:] in rl_names)
    groups.update({g: (g,) for g in policy_groups})
    summary = summarise(rows, groups)
    fronts = {n: best_front(_merged(rows, n, m), n) for n, m in groups.items()}
    by_fold = {f.subject: summarise(pool([s]), groups) for f, s in zip(folds, per_fold, strict=True)}
    bootstrap = people_bootstrap(per_fold, groups, draws, observed=summary) if draws else {}
    return {"subjects": subjects, "starts": starts, "start_step": start_step, "summary": summary,
            "by_fold": by_fold, "fronts": fronts, "thresholds": thresholds, "bootstrap": bootstrap,
            "bootstrap_draws": draws, "rows": rows}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"

    akis = [f"{a:g}" for a in COMPARE_AKI]
    lines = ["| scheduler | " + " | ".join(f"AKI {a}" for a in akis) + " |", "|---|" + "---:|" * len(akis)]
    for name, values in result["summary"].items():
        if name != "per_frame":
            lines.append(f"| {name} | " + " | ".join(pct(values[a]) for a in akis) + " |")
    lines.append(f"| per-frame N | {pct(result['summary']['per_frame'])} | | |")
    if result.get("bootstrap"):
        lines += [
            "",
            bootstrap_table(result["bootstrap"], len(result["subjects"]), result["bootstrap_draws"]),
        ]
    return "\n".join(lines) + "\n"


def bootstrap_table(bootstrap: dict[str, dict[str, dict[str, Any]]], people: int, draws: int) -> str:
    """Markdown: RL's lead over each baseline, its 90 % interval over redrawn people and how often
    RL leads."""

    def cell(entry: dict[str, Any]) -> str:
        if entry["lead"] is None or entry["low"] is None:
            return "—"
        interval = f"{entry['low']:+.2f} … {entry['high']:+.2f}"
        return f"{entry['lead']:+.2f} ({interval}; ahead in {entry['rl_ahead']:.0%})"

    akis = [f"{a:g}" for a in COMPARE_AKI]
    lines = [
        f"RL's lead in mIoU points over each baseline; in brackets the 5–95 % range over {draws} draws "
        f"of {people} people with replacement, and the share of draws where RL leads.",
        "",
        "| RL minus | " + " | ".join(f"AKI {a}" for a in akis) + " |",
        "|---|" + "---:|" * len(akis),
    ]
    lines += [f"| {b} | " + " | ".join(cell(v[a]) for a in akis) + " |" for b, v in bootstrap.items()]
    return "\n".join(lines)


class CrossvalCommand:
    name = "crossval"
    help = "leave-one-subject-out cross-validation of the schedulers (fold manifests, pooled evaluation)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        m = sub.add_parser("manifests", help="write one manifest per held-out subject: RUNS/m-<subject>.json")
        m.add_argument("--manifest", default="default", help="manifest JSON or 'default' (../shared/data)")
        m.add_argument("--set", default="B", help="the set to cross-validate (default B)")
        m.add_argument("--runs", type=Path, default=Path("runs/cv"))
        e = sub.add_parser("evaluate", help="replay every fold on its held-out clip and pool the folds")
        e.add_argument("--runs", type=Path, default=Path("runs/cv"))
        e.add_argument("--weights", type=Path, help="N, F and corrector (default: the shipped weights)")
        e.add_argument("--cache", type=Path, default=Path("runs/pairs-cv"), help="pair-table cache")
        e.add_argument("--starts", type=int, default=8)
        e.add_argument("--start-step", type=int, default=8)
        e.add_argument("--out", type=Path, default=Path("runs/cv/evaluation"))
        e.add_argument("--rl", default="", help="policy folders that make the rl front (default: all)")
        e.add_argument(
            "--bootstrap", type=int, default=2000, help="draws of the held-out people for RL's lead (0: none)"
        )

    def run(self, args: argparse.Namespace) -> int:
        try:
            if args.action == "manifests":
                args.runs.mkdir(parents=True, exist_ok=True)
                for subject, fold in fold_manifests(load_manifest(args.manifest), args.set).items():
                    print(fold.save(args.runs / f"m-{subject}.json"))
                return 0
            names = [n for n in args.rl.split(",") if n]
            result = evaluate_folds(
                args.runs, args.weights, args.cache, args.starts, args.start_step, names, args.bootstrap
            )
        except (ManifestError, WeightsError, OSError, ValueError) as exc:
            print(f"facestream crossval: error: {exc}", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "crossval.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "crossval.md").write_text(markdown(result))
        title = (
            f"Held-out people, pooled over {len(result['subjects'])} folds ({result['starts']} starts each)"
        )
        curves = {n: front_curve(f) for n, f in result["fronts"].items()}
        per_frame = result["summary"]["per_frame"]
        figures.plot_fronts(result["fronts"], per_frame, args.out / "crossval.png", title, curves)
        print(markdown(result))
        return 0
