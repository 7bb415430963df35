"""The evaluation harness: metrics, pair tables, replayed schedulers, the oracle bound, the command."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import (
    AllSkinNetworks,
    FakeClip,
    build_networks,
    clip_frames,
    constant_flow,
    networks,
    random_weights,
)

from facestream.cli import main
from facestream.engines.cues import CUES, RELATIVE_FLOOR
from facestream.engines.face import Box
from facestream.engines.networks import FlowResult, Networks
from facestream.engines.schedulers import make_scheduler
from facestream.engines.weights import load_network, save_network
from facestream.models import KeyPolicy
from facestream.models.config import PolicyConfig
from facestream.training.evaluation import (
    FIXED_GRID,
    EvalConfig,
    PairBuilder,
    PairTable,
    PolicyReplay,
    build_pair_table,
    cached_pair_table,
    confusions,
    dvsnet_scores,
    miou,
    once_per_source,
    oracle_walk,
    per_class_iou,
    replay,
)
from facestream.training.manifest import MirroredClip, ReversedClip
from facestream.training.oracle import Oracle
from facestream.training.sweep import (
    at_aki,
    best_front,
    comparison,
    comparison_table,
    fixed_phase_rows,
    front_curve,
)

SIZE = 64


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> Networks:
    return networks(tmp_path_factory, input_size=SIZE)


@pytest.fixture(scope="module")
def clip(videos_dir: Path) -> FakeClip:
    return FakeClip(clip_frames(videos_dir, count=14), unlabelled=(9,))


@pytest.fixture(scope="module")
def table(clip: FakeClip, nets: Networks) -> PairTable:
    return build_pair_table(clip, nets, EvalConfig(max_gap=4, batch=3), progress=False)


def test_iou_and_miou_from_confusion() -> None:
    confusion = np.zeros((5, 5), np.int64)
    confusion[0, 0], confusion[1, 1], confusion[1, 0], confusion[2, 1] = 50, 30, 10, 10
    iou = per_class_iou(confusion)
    assert iou[0] == pytest.approx(50 / 60) and iou[1] == pytest.approx(30 / 50) and iou[2] == 0.0
    assert np.isnan(iou[3]) and np.isnan(iou[4])  # in neither label nor prediction: not averaged
    assert miou(confusion) == pytest.approx((50 / 60 + 30 / 50 + 0.0) / 3)
    assert np.allclose(miou(np.stack([confusion, confusion])), miou(confusion))


def test_confusions_count_pixels_per_pair() -> None:
    label = torch.tensor([[0, 1], [2, 4]])
    pred = torch.stack([label, torch.zeros_like(label)])
    matrices = confusions(pred, label)
    assert matrices.shape == (2, 5, 5)
    assert np.array_equal(np.diag(matrices[0]), [1, 1, 1, 0, 1]) and matrices[0].sum() == 4
    assert np.array_equal(matrices[1][:, 0], [1, 1, 1, 0, 1])


def test_predictions_resample_between_boxes(nets: Networks) -> None:
    """Scores over a key box shifted right by half its width land on the right half only."""
    builder = PairBuilder(nets, EvalConfig(eval_size=32))
    scores = np.zeros((1, 5, 16, 16), np.float32)
    scores[:, 1] = 1.0  # skin everywhere in the key's crop
    box = Box(0.0, 0.0, 100.0, 100.0)
    key_box = Box(50.0, 0.0, 150.0, 100.0)
    pred = builder.predictions(scores, [key_box], box)[0]
    assert (pred[:, :15] == 0).all() and (pred[:, 17:] == 1).all()
    same = builder.predictions(scores, [box], box)[0]
    assert (same == 1).all()


@pytest.mark.parametrize("track", [True, False])
def test_pair_builder_moves_each_keys_crop_like_the_pipeline(
    nets: Networks, clip: FakeClip, track: bool
) -> None:
    """Each key's non-key crops follow the face by the pipeline's rule (one square per key), so
    a table's gap-g entry is what the pipeline computes g frames after that key."""
    flows = {0: (-1.0, 2.0), 1: (3.0, 0.0)}  # per key: the constant flow F reports
    calls: list[int] = []

    def flow_fn(pairs: np.ndarray, inner: Networks) -> FlowResult:
        result = [constant_flow(inner, *flows[b % 2]) for b in range(len(pairs))]
        calls.append(len(pairs))
        return FlowResult(*(np.concatenate(parts) for parts in zip(*result, strict=True)))

    builder = PairBuilder(AllSkinNetworks(nets, flow_fn=flow_fn), EvalConfig(track=track))
    rgb = next(iter(clip.frames()))
    boxes = [Box(10.0, 20.0, 74.0, 84.0), Box(0.0, 0.0, 40.0, 40.0)]
    keys = [builder.key(rgb, b)[0] for b in boxes]
    for n in range(3):
        _, _, cut, _ = builder.warp(rgb, keys)
        for (dx, dy), box, got in zip(flows.values(), boxes, cut, strict=True):
            step = box.width / nets.segmentation_config.feature_size
            sx, sy = (-dx * step * n, -dy * step * n) if track else (0.0, 0.0)
            assert got == pytest.approx(Box(box.x0 + sx, box.y0 + sy, box.x1 + sx, box.y1 + sy))
    assert calls == [2, 2, 2]


def test_pair_table_layout(table: PairTable, clip: FakeClip, nets: Networks) -> None:
    assert table.frames == 14 and not table.scored[9]
    assert table.episodes() == [(0, 9), (10, 14)]
    pixels = SIZE * SIZE
    for i in range(14):
        for gap in range(5):
            k = i - gap
            expected = table.scored[i] and k >= 0 and all(table.scored[k : i + 1])
            assert table.valid[i, gap] == expected, (i, gap)
            if expected:
                assert table.confusion[i, gap].sum() == pixels
    # the key row scores N on the frame itself: its label's class counts are exact
    box = clip.box(3)
    assert box is not None
    label = PairBuilder(nets, EvalConfig()).label_grid(clip.label(3), box)
    assert np.array_equal(table.confusion[3, 0].sum(axis=1), np.bincount(label.flatten(), minlength=5))


def test_batching_does_not_change_the_table(clip: FakeClip, nets: Networks, table: PairTable) -> None:
    one = build_pair_table(clip, nets, EvalConfig(max_gap=4, batch=1), progress=False)
    assert np.array_equal(one.valid, table.valid)
    assert np.abs(one.confusion - table.confusion).max() <= 2  # float noise flips a pixel at most
    assert np.allclose(one.magnitude, table.magnitude, atol=1e-3)


def test_cache_round_trip(clip: FakeClip, nets: Networks, table: PairTable, tmp_path: Path) -> None:
    config = EvalConfig(max_gap=4, batch=3)
    first = cached_pair_table(clip, nets, "fp", config, tmp_path, progress=False)
    (path,) = tmp_path.glob("*.npz")
    mtime = path.stat().st_mtime_ns
    second = cached_pair_table(clip, nets, "fp", config, tmp_path, progress=False)
    assert path.stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert np.array_equal(first.confusion, second.confusion) and second.clip_id == "fake"
    cached_pair_table(clip, nets, "other-weights", config, tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_fixed_and_always_replays(table: PairTable, nets: Networks) -> None:
    always = replay(make_scheduler("always"), [table], nets)
    assert always.keys == always.frames == 13
    assert np.array_equal(always.confusion, table.confusion[table.scored, 0].sum(axis=0))
    fixed = replay(make_scheduler("fixed", 3), [table], nets)
    assert fixed.key_frames["fake"] == [0, 3, 6, 10, 13]  # each episode starts with a key
    assert fixed.intervals == [3, 3, 3]  # intervals are counted within an episode
    assert fixed.forced == 0


def test_forced_key_at_the_gap_limit(table: PairTable, nets: Networks) -> None:
    walk = replay(make_scheduler("fixed", 30), [table], nets)
    assert walk.key_frames["fake"] == [0, 5, 10]  # max_gap 4: frame 5 would be 5 back
    assert walk.forced == 1


def test_flow_scheduler_reads_cached_magnitudes(table: PairTable, nets: Networks) -> None:
    threshold = float(np.median(table.magnitude[table.valid[:, 1:].nonzero()[0], 1]))
    walk = replay(make_scheduler("flow", threshold), [table], nets)
    for i in walk.key_frames["fake"]:
        if i not in (0, 10):  # not an episode start
            last = max(k for k in walk.key_frames["fake"] if k < i)
            gap = i - last
            assert gap > 4 or table.magnitude[i, gap] > threshold


def test_policy_replay_matches_the_network(
    table: PairTable, nets: Networks, tmp_path_factory: pytest.TempPathFactory
) -> None:
    weights = random_weights(tmp_path_factory, input_size=SIZE)
    policy = PolicyReplay(weights.paths["policy"], [table])
    expert = np.array([[0.25, 0.5]], np.float32)
    for i, gap in [(3, 1), (7, 4), (12, 2)]:
        conv6 = table.conv6[i, gap][None].astype(np.float32)
        expected = float(nets.key_probability(conv6, expert)[0])
        assert policy.probability("fake", i, gap, expert) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    "extra",
    [{"quality_size": 6}, {"members": 3}, {"members": 2, "cues": (CUES[0], CUES[4])}],
    ids=["quality", "ensemble", "ensemble-cues"],
)
def test_policy_replay_matches_other_policy_shapes(table: PairTable, tmp_path: Path, extra: dict) -> None:
    """The replay's per-decision shortcut (trunk once, FC3 linear in the expert row) gives the
    network's own pi for a policy with a quality branch (FC3's expert weights sit after it) and
    for seed ensembles (the mean of the members' sigmoids)."""
    torch.manual_seed(1)
    six = table.conv6.shape[2:]
    config = PolicyConfig(in_channels=six[0], conv6_size=six[1], fc_sizes=(32, 32, 8), **extra)
    policy = KeyPolicy(config).eval()
    with torch.no_grad():  # logits far from 0 on some inputs: the members must disagree somewhere
        for layer in (policy.fc3, *(m.fc3 for m in policy.others)):
            layer.weight.mul_(8.0)
    path = save_network(policy, tmp_path / "policy.safetensors", {"eta": 0.06})
    policy = load_network(path)
    replay_ = PolicyReplay(path, [table])
    assert replay_.members == config.members and replay_.eta == 0.06
    rng = np.random.default_rng(0)
    seen = []
    for i, gap in [(3, 1), (7, 4), (12, 2), (5, 3)]:
        expert = rng.uniform(0, 1, (1, config.expert_size)).astype(np.float32)
        if config.cues:  # the static cue as the table has it (the replay takes those from there)
            expert[0, 2] = table.cues(config.cues[:1])[i, gap, 0]
        with torch.no_grad():
            want = float(
                policy.key_probability(
                    torch.from_numpy(table.conv6[i, gap][None].astype(np.float32)), torch.from_numpy(expert)
                )[0]
            )
        seen.append(want)
        assert replay_.probability("fake", i, gap, expert) == pytest.approx(want, abs=1e-5)
    assert max(seen) - min(seen) > 0.05


def test_policy_replay_folds_in_the_cues(table: PairTable, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A policy with cues: the replay adds the table's cues of each pair, as the pipeline would;
    the relative cues, which depend on the decisions so far, come with each decision."""
    weights = random_weights(tmp_path_factory, input_size=SIZE, policy_cues=CUES)
    nets = build_networks(tmp_path_factory, weights, "onnxruntime")
    policy = PolicyReplay(weights.paths["policy"], [table])
    assert policy.cues == CUES and policy.takes_relative
    static = CUES[:3]
    assert (table.residual[:, 1:][table.valid[:, 1:]] > 0).any()  # the builder filled them in
    expert = np.array([[0.25, 0.5]], np.float32)
    for (i, gap), relative in zip(
        [(3, 1), (7, 4), (12, 2)], [(1.0, 1.0), (2.5, 0.3), (0.0, 4.0)], strict=True
    ):
        conv6 = table.conv6[i, gap][None].astype(np.float32)
        full = np.concatenate((expert, table.cues(static)[i, gap][None], [relative]), axis=1)
        assert full[0, 2] == table.magnitude[i, gap] and full[0, 4] == table.residual[i, gap, 1]
        expected = float(nets.key_probability(conv6, full)[0])
        assert policy.probability("fake", i, gap, full) == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="reference"):
        table.cues(CUES)  # the relative cues are not a property of a pair


def test_replay_feeds_a_relative_cue_policy_the_streams_reference(
    table: PairTable, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The rl replay of a policy with relative cues: each decision's expert row holds the pair's
    residuals over the mean of those of the episode's earlier decisions (DecisionHistory)."""
    weights = random_weights(tmp_path_factory, input_size=SIZE, policy_cues=("relative_parts",))
    policy = PolicyReplay(weights.paths["policy"], [table])
    rows: list[tuple[int, int, np.ndarray]] = []
    probability = policy.probability

    def spy(clip_id: str, i: int, gap: int, expert: np.ndarray) -> float:
        rows.append((i, gap, expert.copy()))
        return probability(clip_id, i, gap, expert)

    policy.probability = spy  # type: ignore[method-assign]
    nets = build_networks(tmp_path_factory, weights, "onnxruntime")
    walk = replay(make_scheduler("rl", 0.5), [table], nets, policy=policy)
    assert rows and walk.decisions >= len(rows)
    firsts = {start + 1 for start, _ in table.episodes()}
    earlier: list[float] = []
    for i, gap, expert in rows:
        if i in firsts:
            earlier = []
        residual = float(table.residual[i, gap, 1])
        reference = np.mean(earlier[-90:]) if earlier else np.nan
        want = 1.0 if not earlier else residual / max(reference, RELATIVE_FLOOR)
        assert expert.shape == (1, 3) and expert[0, 2] == pytest.approx(want, rel=1e-5)
        earlier.append(residual)


def test_oracle_is_never_below_any_scheduler(
    table: PairTable, nets: Networks, tmp_path_factory: pytest.TempPathFactory
) -> None:
    policy = PolicyReplay(random_weights(tmp_path_factory, input_size=SIZE).paths["policy"], [table])
    oracle = Oracle([table.frame_miou()[a:b] for a, b in table.episodes()])
    walks = [replay(make_scheduler("fixed", n), [table], nets) for n in (1, 2, 3, 4)]
    walks += [replay(make_scheduler("random", r), [table], nets) for r in (0.2, 0.5)]
    walks += [replay(make_scheduler("rl", t), [table], nets, policy=policy) for t in (0.3, 0.5, 0.7)]
    for walk in walks:
        best = oracle_walk(oracle, [table], walk.keys)
        assert best.keys == walk.keys and best.frames == walk.frames
        assert np.mean(best.frame_mious) >= np.mean(walk.frame_mious) - 1e-9


def test_evaluate_command_end_to_end(
    videos_dir: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    """CI-sized `facestream evaluate`: two short real clips, teacher labels on the fly, tiny models."""
    weights = random_weights(tmp_path_factory, input_size=SIZE)
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--videos",
        str(videos_dir / "lp_d12.mp4"),
        str(videos_dir / "st_w1.mp4"),
        "--max-frames",
        "16",
        "--weights",
        str(weights.directory),
        "--labels",
        str(tmp_path / "labels"),
        "--teacher",
        "dlib68",
        "--sweep",
        "--max-gap",
        "8",
        "--aki",
        "4",
        "--threads",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] > 20
    results = json.loads((out / "results.json").read_text())
    assert {r["scheduler"] for r in results} == {
        "always",
        "fixed",
        "random",
        "flow",
        "dvsnet",
        "rl",
        "oracle",
    }
    for r in results:
        assert set(r) == {"scheduler", "knob", "eta", "aki", "miou", "fps"}
        assert 0.0 <= r["miou"] <= 1.0 and r["aki"] >= 1.0 and r["fps"] > 0
    report = json.loads((out / "report.json").read_text())
    by_keys = {r["keys"]: r for r in report["rows"] if r["scheduler"] == "oracle"}
    for r in report["rows"]:
        if r["oracle_frame_miou"] is not None:
            assert r["oracle_frame_miou"] >= r["frame_miou"] - 1e-9
    assert by_keys  # oracle rows at the fixed settings' key counts
    for name in ("fig4_curves.png", "fig6_intervals.png", "fig7_timeline.png", "fig8_masks.png"):
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape[0] > 100, name
    assert "| oracle |" in (out / "results.md").read_text()
    assert "fixed over its key phases" in (out / "comparison.md").read_text()
    assert len(list((out / "cache").glob("*.npz"))) == 2
    assert main(args) == 0  # a rerun reads the cached labels and pair tables
    assert main([*args, "--starts", "3", "--start-step", "4"]) == 0  # every clip from 3 start frames
    report = json.loads((out / "report.json").read_text())
    assert report["starts"] == {"count": 3, "step": 4}
    assert [c["clip"] for c in report["clips"]][2:] == ["lp_d12+4", "st_w1+4", "lp_d12+8", "st_w1+8"]
    assert len(list((out / "cache").glob("*.npz"))) == 2  # the same tables, watched from later


def test_comparison_interpolates_each_schedulers_best_curve() -> None:
    rows = [
        {"scheduler": "always", "aki": 1.0, "miou": 0.8},
        {"scheduler": "fixed", "aki": 10.0, "miou": 0.7},
        {"scheduler": "fixed", "aki": 30.0, "miou": 0.6},
        {"scheduler": "rl", "aki": 20.0, "miou": 0.62},  # beaten by a longer-AKI rl setting
        {"scheduler": "rl", "aki": 25.0, "miou": 0.68},
        {"scheduler": "rl", "aki": 40.0, "miou": 0.64},
        {"scheduler": "oracle", "aki": 10.0, "miou": 0.75},
        {"scheduler": "oracle", "aki": 30.0, "miou": 0.72},
    ]
    assert best_front(rows, "rl") == [(25.0, 0.68), (40.0, 0.64)]
    # linear in key ratio: 1/20 lies 3/4 of the way from 1/10 to 1/30, 1/30 lies 4/9 of the way
    # from 1/25 to 1/40 (linear in AKI would give 1/2 and 1/3)
    assert at_aki(rows, "fixed", 20.0) == pytest.approx(0.7 - 0.1 * 3 / 4)
    assert at_aki(rows, "rl", 30.0) == pytest.approx(0.68 - 0.04 * 4 / 9)
    assert at_aki(rows, "rl", 25.0) == 0.68 and at_aki(rows, "fixed", 30.0) == pytest.approx(0.6)
    curve = front_curve(best_front(rows, "fixed"), per_segment=4)
    assert curve[0] == (10.0, 0.7) and curve[-1] == pytest.approx((30.0, 0.6)) and len(curve) == 5
    assert all(at_aki(rows, "fixed", a) == pytest.approx(m) for a, m in curve)
    assert at_aki(rows, "rl", 15.0) is None and at_aki(rows, "dvsnet", 20.0) is None
    [c] = comparison(rows, [30.0])
    assert c["per_frame"] == 0.8 and c["rl_share"] == pytest.approx((c["rl"] - 0.6) / (0.72 - 0.6))
    assert "| 30 |" in comparison_table([c]) and "—" in comparison_table([c])
    assert "fixed_phases" not in c and "key phases" not in comparison_table([c])
    # fixed's spread over key phases: each phase's curve interpolated at the AKI
    phases = [
        [{"scheduler": "fixed", "aki": 10.0, "miou": 0.7}, {"scheduler": "fixed", "aki": 40.0, "miou": 0.6}],
        [{"scheduler": "fixed", "aki": 10.0, "miou": 0.7}, {"scheduler": "fixed", "aki": 30.0, "miou": 0.66}],
        [{"scheduler": "fixed", "aki": 10.0, "miou": 0.7}, {"scheduler": "fixed", "aki": 20.0, "miou": 0.65}],
    ]
    [c] = comparison(rows, [30.0], phase_rows=phases)
    spread = c["fixed_phases"]
    assert spread["phases"] == 2  # the third never reaches AKI 30
    assert spread["min"] == pytest.approx(0.7 - 0.1 * 8 / 9) and spread["max"] == pytest.approx(0.66)
    assert "| 30 |" in comparison_table([c]) and "63.6 (61.1–66.0)" in comparison_table([c])


def test_fixed_phase_rows_start_with_the_fixed_sweep(table: PairTable, nets: Networks) -> None:
    phases = fixed_phase_rows([table], nets, window=90, phases=3)
    assert len(phases) == 3 and all(len(p) == len(FIXED_GRID) for p in phases)
    for n, row in zip(FIXED_GRID, phases[0], strict=True):
        walk = replay(make_scheduler("fixed", n), [table], nets)
        assert row["miou"] == pytest.approx(miou(walk.confusion)) and row["aki"] == walk.frames / walk.keys
    moved = {n: row["aki"] for n, row in zip(FIXED_GRID, phases[2], strict=True)}
    assert moved[5] < phases[0][FIXED_GRID.index(5)]["aki"]  # the first key came earlier: more keys


def test_reversed_clip_plays_the_clip_backwards(clip: FakeClip, table: PairTable, nets: Networks) -> None:
    """ReversedClip (train policy --reverse): frame i is frame T-1-i with its label and square, so
    its pair table scores the same frames as keys, and its own cache entry."""
    back = ReversedClip(clip)
    frames = list(clip.frames())
    last = len(frames) - 1
    assert back.clip_id == "fake@rev" and back.meta is None
    assert all(a is b for a, b in zip(back.frames(), frames[::-1], strict=True))
    assert back.labelled == [i for i in range(last + 1) if i != last - 9]
    assert back.box(0) == clip.box(last) and (back.label(2) == clip.label(last - 2)).all()
    reversed_table = build_pair_table(back, nets, EvalConfig(max_gap=4, batch=3), progress=False)
    assert (reversed_table.scored == table.scored[::-1]).all()
    np.testing.assert_array_equal(reversed_table.confusion[:, 0], table.confusion[::-1, 0])
    assert reversed_table.valid[:, 1:].sum() == table.valid[:, 1:].sum()
    assert (
        reversed_table.valid[6, 1] and not reversed_table.valid[5, 1]
    )  # frame 4 (9 of the clip) is unscored


def test_mirrored_clip_flips_frames_labels_and_squares(
    clip: FakeClip, table: PairTable, nets: Networks
) -> None:
    """MirroredClip (train policy --mirror): every frame, label and face square flipped left to
    right, so the square still sits on the flipped face; twice mirrored is the clip itself; its
    pair table scores the same pairs, under its own cache key."""
    mirror = MirroredClip(clip)
    frames = list(clip.frames())
    width = frames[0].shape[1]
    assert mirror.clip_id == "fake@mirror" and mirror.meta is None and mirror.labelled == clip.labelled
    assert all((m == f[:, ::-1]).all() for m, f in zip(mirror.frames(), frames, strict=True))
    for i in (0, 7):
        label, box = mirror.label(i), mirror.box(i)
        assert box is not None and (label == clip.label(i)[:, ::-1]).all()
        assert box == Box(width - clip.box(i).x1, clip.box(i).y0, width - clip.box(i).x0, clip.box(i).y1)
        face = np.nonzero(label == 1)[1]  # the skin ellipse's columns: centred in the square
        assert (face.min() + face.max() + 1) / 2 == pytest.approx((box.x0 + box.x1) / 2, abs=1.0)
    twice = MirroredClip(MirroredClip(clip))
    assert all((t == f).all() for t, f in zip(twice.frames(), frames, strict=True))
    assert twice.box(3) == clip.box(3) and (twice.label(3) == clip.label(3)).all()
    both = MirroredClip(ReversedClip(clip))
    assert both.clip_id == "fake@rev@mirror" and (both.label(0) == clip.label(len(frames) - 1)[:, ::-1]).all()
    mirrored_table = build_pair_table(mirror, nets, EvalConfig(max_gap=4, batch=3), progress=False)
    assert (mirrored_table.scored == table.scored).all() and (mirrored_table.valid == table.valid).all()
    # the flipped square cuts the flipped label: every class covers the same pixels of each crop
    counts, mirrored_counts = table.confusion[:, 0].sum(axis=2), mirrored_table.confusion[:, 0].sum(axis=2)
    np.testing.assert_allclose(mirrored_counts, counts, rtol=0.02, atol=2)


def test_table_from_a_later_start_keys_and_scores_only_from_there(table: PairTable, nets: Networks) -> None:
    """Episodes [0, 9) and [10, 14) (frame 9 has no label) watched from 2 frames in: [2, 9) and
    [12, 14); no pair reaches back before a start, and every scheduler's first key moves there."""
    assert table.episodes() == [(0, 9), (10, 14)]
    late = table.from_start(2)
    assert late.clip_id == "fake+2" and late.episodes() == [(2, 9), (12, 14)]
    assert late.confusion is table.confusion and late.conv6 is table.conv6  # shared, not copied
    for i in range(table.frames):
        for g in range(table.max_gap + 1):
            start = 2 if i < 9 else 12
            assert late.valid[i, g] == (table.valid[i, g] and i - g >= start), (i, g)
    walk = replay(make_scheduler("fixed", 3), [late], nets)
    assert walk.key_frames["fake+2"] == [2, 5, 8, 12] and walk.frames == 7 + 2
    pairs = [(2, 0), (3, 1), (4, 2), (5, 0), (6, 1), (7, 2), (8, 0), (12, 0), (13, 1)]
    assert walk.frame_mious == [pytest.approx(miou(table.confusion[i, g])) for i, g in pairs]
    assert table.from_start(4).episodes() == [(4, 9)]  # the 4-frame episode drops out
    assert table.from_start(0) is table
    with pytest.raises(ValueError, match="offset"):
        table.from_start(-1)


def test_tables_from_later_starts_share_one_run_of_the_networks(
    table: PairTable, nets: Networks, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """DVSNet scores and policy logits are computed once per clip, not once per start, and are
    what each start's own computation gives on its pairs."""
    late = table.from_start(2)
    calls: list[str] = []

    def count(t: PairTable) -> np.ndarray:
        calls.append(t.clip_id)
        return np.where(t.valid, 1.0, 0.0)

    shared = once_per_source([late, table, table.from_start(4)], count)
    assert calls == ["fake"] and shared["fake+2"] is shared["fake"] and shared["fake+4"] is shared["fake"]
    other = replace(table, clip_id="other", conv6=table.conv6.copy())
    assert once_per_source([table, other], count).keys() == {"fake", "other"}
    assert calls[1:] == ["fake", "other"]
    odd = replace(table, clip_id="odd", valid=np.zeros_like(table.valid))  # same arrays, ...
    odd.valid[9, 0] = True  # ... but a pair the clip's table lacks: computed on its own
    assert once_per_source([table, odd], count)["odd"][9, 0] == 1.0 and calls[3:] == ["fake", "odd"]
    scores = dvsnet_scores(nets, [table, late])
    alone = dvsnet_scores(nets, [late])["fake+2"]
    assert scores["fake+2"] is scores["fake"]
    assert np.allclose(scores["fake+2"][late.valid], alone[late.valid], atol=1e-6)
    policy = PolicyReplay(random_weights(tmp_path_factory, input_size=SIZE).paths["policy"], [table, late])
    assert policy.base["fake+2"] is policy.base["fake"]


def test_subsampled_table_is_the_clip_played_faster(table: PairTable) -> None:
    fast = table.subsample(2, 1)
    assert fast.clip_id == "fake@2x1" and fast.frames == len(range(1, table.frames, 2))
    assert fast.max_gap == table.max_gap // 2
    for i, g in [(0, 0), (2, 1), (4, 2), (5, 1)]:
        assert fast.valid[i, g] == table.valid[1 + 2 * i, 2 * g]
        assert np.array_equal(fast.confusion[i, g], table.confusion[1 + 2 * i, 2 * g])
        assert np.array_equal(fast.residual[i, g], table.residual[1 + 2 * i, 2 * g])
        assert np.array_equal(fast.conv6[i, g], table.conv6[1 + 2 * i, 2 * g])
    assert table.subsample(1) is not table and np.array_equal(table.subsample(1).valid, table.valid)
    with pytest.raises(ValueError, match="offset"):
        table.subsample(2, 2)
