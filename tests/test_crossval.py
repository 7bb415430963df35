"""Leave-one-subject-out cross-validation: fold manifests, pooling over folds, the threshold grid."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import FakeClip, clip_frames, networks, random_weights

from facestream.cli import main
from facestream.engines.networks import Networks
from facestream.engines.schedulers import make_scheduler
from facestream.training import figures
from facestream.training.crossval import (
    Fold,
    bootstrap_table,
    fold_manifests,
    fold_settings,
    people_bootstrap,
    pool,
    pooled_thresholds,
    summarise,
)
from facestream.training.evaluation import (
    QUANTILES,
    EvalConfig,
    PairTable,
    build_pair_table,
    dvsnet_scores,
    replay,
)
from facestream.training.manifest import load_manifest

SIZE = 64


def test_each_fold_holds_one_subject_out(data_dir: Path) -> None:
    manifest = load_manifest("default")
    b = {e.subject for e in manifest.videos("B")}
    folds = fold_manifests(manifest, "B")
    assert set(folds) == b
    for held, fold in folds.items():
        assert [e.subject for e in fold.videos("C")] == [held]
        assert {e.subject for e in fold.videos("B")} == b - {held}
        assert {e.subject for e in fold.videos("A")} == {e.subject for e in manifest.entries} - b
        assert len(fold.entries) == len(manifest.entries)


def test_a_set_of_one_subject_cannot_be_cross_validated(data_dir: Path) -> None:
    manifest = load_manifest("default")
    single = type(manifest)(manifest.name, manifest.teacher, manifest.entries[:8], manifest.root)
    with pytest.raises(ValueError, match="at least 2 subjects"):
        fold_manifests(single, "B")  # the first 8 entries hold one B clip


def test_crossval_manifests_command_writes_one_per_subject(data_dir: Path, tmp_path: Path) -> None:
    assert main(["crossval", "manifests", "--runs", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.glob("m-*.json"))
    subjects = sorted(e.subject for e in load_manifest("default").videos("B"))
    assert written == [f"m-{s}.json" for s in subjects]
    fold = load_manifest(tmp_path / written[0])
    assert [e.subject for e in fold.videos("C")] == [subjects[0]]


def test_pool_sums_confusions_keys_and_frames_over_folds() -> None:
    a = np.diag([10, 0, 0, 0, 0]).astype(np.int64)
    b = np.zeros((5, 5), np.int64)
    b[0, 1] = 10  # 10 pixels of class 0 called class 1
    fold1 = {"fixed/2": (a, 5, 10), "only-here": (a, 1, 1)}
    fold2 = {"fixed/2": (b, 3, 20)}
    rows = pool([fold1, fold2])
    assert [r["setting"] for r in rows] == ["fixed/2"]  # settings not in every fold are dropped
    (r,) = rows
    assert r["scheduler"] == "fixed"
    assert r["aki"] == pytest.approx(30 / 8)
    # pooled: class 0 IoU 10 / 20, class 1 IoU 0 / 10, the other classes absent (not averaged)
    assert r["miou"] == pytest.approx(100 * (0.5 + 0.0) / 2)


def _person(fixed_errors: int, rl_errors: int, frames: int = 900) -> dict[str, tuple[np.ndarray, int, int]]:
    """One held-out person: fixed and rl at AKI 10 and 90; each setting's mIoU is 100 / (100 + errors)."""

    def setting(errors: int, aki: int) -> tuple[np.ndarray, int, int]:
        confusion = np.zeros((5, 5), np.int64)
        confusion[0, 0] = confusion[1, 1] = 100
        confusion[0, 1] = errors  # class 0 and class 1 IoU both 100 / (100 + errors)
        return confusion, frames // aki, frames

    return {
        "fixed/10": setting(fixed_errors, 10),
        "fixed/90": setting(fixed_errors + 10, 90),
        "rl/tau0.5": setting(rl_errors, 10),
        "rl/tau0.9": setting(rl_errors + 10, 90),
    }


def test_people_bootstrap_reads_rls_lead_over_redrawn_people() -> None:
    groups = {"fixed": ("fixed",), "rl": ("rl",)}
    # RL better for every person: it leads in every draw
    always = people_bootstrap([_person(20, 10), _person(30, 5), _person(25, 15)], groups, draws=200)
    for entry in always["fixed"].values():
        assert entry["lead"] > 0 and entry["low"] > 0 and entry["rl_ahead"] == 1.0 and entry["draws"] == 200
    # the same person three times: every draw pools the same rows, so the interval is the lead
    same = people_bootstrap([_person(20, 10)] * 3, groups, draws=50)["fixed"]["30"]
    assert same["low"] == pytest.approx(same["lead"]) and same["high"] == pytest.approx(same["lead"])
    # RL ahead for one person, far behind for another: draws disagree
    mixed = people_bootstrap([_person(20, 10), _person(10, 60)], groups, draws=400)["fixed"]["30"]
    assert 0.0 < mixed["rl_ahead"] < 1.0 and mixed["low"] < 0 < mixed["high"]
    both = summarise(pool([_person(20, 10), _person(10, 60)]), groups)
    assert mixed["lead"] == pytest.approx(both["rl"]["30"] - both["fixed"]["30"])
    table = bootstrap_table({"fixed": {"15": mixed, "30": mixed, "60": mixed}}, 2, 400)
    assert "| fixed |" in table and "400 draws of 2 people" in table and f"{mixed['lead']:+.2f}" in table


def test_thresholds_are_quantiles_of_every_fold_together() -> None:
    low, high = np.linspace(0, 1, 101), np.linspace(1, 3, 101)
    grid = pooled_thresholds([low, high], clip=False)
    assert grid == pytest.approx(list(np.quantile(np.concatenate([low, high]), QUANTILES)))
    assert max(pooled_thresholds([low, high], clip=True)) == 1.0


def test_summary_reads_each_front_at_the_compared_aki() -> None:
    rows = [
        {"scheduler": "always", "setting": "always", "aki": 1.0, "miou": 80.0},
        {"scheduler": "rl-a", "setting": "rl-a/tau0.5", "aki": 10.0, "miou": 79.0},
        {"scheduler": "rl-a", "setting": "rl-a/tau0.9", "aki": 70.0, "miou": 73.0},
        {"scheduler": "rl-b", "setting": "rl-b/tau0.9", "aki": 20.0, "miou": 78.0},
    ]
    summary = summarise(rows, {"rl": ("rl-a", "rl-b"), "rl-a": ("rl-a",)})
    assert summary["per_frame"] == 80.0
    # linear in 1/AKI: 1/30 lies (1/10 - 1/30) / (1/10 - 1/70) = 7/9 of the way from rl-a's first setting
    assert summary["rl-a"]["30"] == pytest.approx(79.0 - 6.0 * 7 / 9)
    assert summary["rl"]["30"] == pytest.approx(78.0 - 5.0 * 7 / 15)  # rl-b's point joins the front
    assert summary["rl-a"]["15"] == pytest.approx(79.0 - 6.0 * 7 / 18)


@pytest.fixture(scope="module")
def fold(videos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Fold:
    nets: Networks = networks(tmp_path_factory, input_size=SIZE)
    clip = FakeClip(clip_frames(videos_dir, count=12))
    table: PairTable = build_pair_table(clip, nets, EvalConfig(max_gap=4, batch=3), progress=False)
    policy = random_weights(tmp_path_factory, input_size=SIZE).paths["policy"]
    return Fold("fake", nets, [table], dvsnet_scores(nets, [table]), {"eta0.04": policy})


def test_fold_settings_replay_each_scheduler_on_the_held_out_tables(fold: Fold) -> None:
    thresholds = {n: pooled_thresholds([fold.values(n)], clip=n == "dvsnet") for n in ("flow", "dvsnet")}
    settings = fold_settings(fold, thresholds)
    assert {"always", "fixed/5", "flow/q0.5", "dvsnet/q0.5", "rl-eta0.04/tau0.5"} <= set(settings)
    confusion, keys, frames = settings["fixed/5"]
    walk = replay(make_scheduler("fixed", 5.0), fold.tables, fold.networks)
    assert (keys, frames) == (walk.keys, walk.frames)
    assert np.array_equal(confusion, walk.confusion)
    median = thresholds["dvsnet"][list(QUANTILES).index(0.5)]
    walk = replay(make_scheduler("dvsnet", median), fold.tables, fold.networks, dvsnet=fold.dvsnet)
    assert settings["dvsnet/q0.5"][1] == walk.keys
    assert settings["always"][1] == settings["always"][2]  # a key on every frame


def test_fronts_figure_is_written(tmp_path: Path) -> None:
    fronts = {"fixed": [(2.0, 79.0), (30.0, 77.0)], "rl": [(1.5, 79.4), (60.0, 76.0)], "flow": []}
    path = figures.plot_fronts(fronts, 79.5, tmp_path / "cv.png", "held out")
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 100 and image.std() > 0
