"""Offline training: run folders, N, F, the DVSNet head and the RL policy on tiny inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import FakeClip, clip_frames, one_torch_thread

from facestream.cli import main
from facestream.engines.cues import RELATIVE_FLOOR
from facestream.engines.weights import (
    find_weights,
    load_network,
    read_metadata,
    save_network,
    write_random_weights,
)
from facestream.models import DeepLabV3Plus, DVSNetHead, FlowNet2S, KeyPolicy
from facestream.models.config import DVSNetConfig, PolicyConfig, SegmentationConfig
from facestream.training.evaluation import PAIR_NETWORKS, PairTable
from facestream.training.runs import RunError, cosine_lr, open_run, read_log
from facestream.training.ship import ship_weights
from facestream.training.train_flow import FlowTrainConfig, dis_flow, make_pairs, train_flow
from facestream.training.train_policy import (
    DVSNetTrainConfig,
    PolicyTrainConfig,
    PolicyTrainer,
    ensemble_policies,
    faster,
    init_trunk_from_dvsnet,
    policy_config_for,
    rmsprop,
    train_dvsnet,
    train_policy,
)
from facestream.training.train_segmentation import (
    Augmenter,
    SegTrainConfig,
    cut_crops,
    score_crops,
    segmentation_loss,
    train_segmentation,
)


@pytest.fixture(scope="module")
def clip(videos_dir: Path) -> FakeClip:
    return FakeClip(clip_frames(videos_dir, count=12), unlabelled=(5,))


@dataclass(frozen=True)
class _Cfg:
    a: int = 1


def test_run_folder_refuses_another_config(tmp_path: Path) -> None:
    open_run(tmp_path, _Cfg(1))
    open_run(tmp_path, _Cfg(1))  # same config: resume
    with pytest.raises(RunError, match="another config"):
        open_run(tmp_path, _Cfg(2))
    open_run(tmp_path, _Cfg(2), fresh=True)
    assert json.loads((tmp_path / "config.json").read_text())["config"] == {"a": 2}


def test_cosine_schedule() -> None:
    assert cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, 10) == pytest.approx(0.0)


def test_crops_and_identity_augmentation_keep_labels_aligned(clip: FakeClip) -> None:
    config = SegTrainConfig(input_size=64, context=1.25, scale=(1.0, 1.0), shift=0.0, rotation=0.0)
    crops = cut_crops([clip], 80, config.context, progress=False)
    assert len(crops) == len(clip.labelled) and crops.images.shape[1:] == (80, 80, 3)
    # no geometric change except a possible flip: the central 64/80 of the context crop
    x, y = Augmenter(config, torch.Generator().manual_seed(0))(crops.images, crops.labels, 64)
    assert x.shape == (len(crops), 3, 64, 64) and y.shape == (len(crops), 64, 64)
    centre = crops.labels[:, 8:72, 8:72]
    flipped = centre[:, :, ::-1]
    for i in range(len(crops)):
        agree = max((y[i].numpy() == centre[i]).mean(), (y[i].numpy() == flipped[i]).mean())
        assert agree > 0.97


def test_loss_prefers_the_right_answer() -> None:
    target = torch.randint(0, 5, (2, 8, 8))
    right = torch.nn.functional.one_hot(target, 5).permute(0, 3, 1, 2).float() * 8
    wrong = right.roll(1, dims=1)
    assert segmentation_loss(right, target, 1.0) < 0.1 < segmentation_loss(wrong, target, 1.0)


def test_train_segmentation_learns_and_resumes(clip: FakeClip, tmp_path: Path) -> None:
    config = SegTrainConfig(
        input_size=64,
        steps=80,
        batch=4,
        lr=3e-3,
        warmup=2,
        val_every=40,
        val_stride=1,
        checkpoint_every=10,
        rotation=0.0,
        bf16=False,
    )
    with one_torch_thread():
        path = train_segmentation(config, [clip], [clip], tmp_path, progress=False)
        model = load_network(path)
        assert isinstance(model, DeepLabV3Plus)
        crops = cut_crops([clip], 64, 1.0, progress=False)
        learnt = score_crops(model, crops, bf16=False)["miou"]
        untrained = score_crops(DeepLabV3Plus(SegmentationConfig(input_size=64)).eval(), crops, bf16=False)[
            "miou"
        ]
    assert learnt > untrained + 0.2
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 81))
    assert sum("val_miou" in r for r in log) == 2
    assert (tmp_path / "training.png").stat().st_size > 0
    card = json.loads(read_metadata(path)["card"])
    assert card["trained"] is True and card["steps"] == 80
    # resuming a finished run trains no further step and rewrites the same log
    with one_torch_thread():
        train_segmentation(config, [clip], [clip], tmp_path, progress=False)
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 81))


def test_dis_flow_finds_a_translation() -> None:
    rng = np.random.default_rng(0)
    texture = cv2_blur((rng.random((160, 160, 3)) * 255).astype(np.uint8))
    key = texture[16:144, 16:144]
    current = texture[16 + 2 : 144 + 2, 16 + 4 : 144 + 4]  # current pixel p is key pixel p + (4, 2)
    flow = dis_flow(current, key, 32)  # grid of 32: vectors divided by 4
    inner = flow[:, 8:24, 8:24]
    assert np.median(inner[0]) == pytest.approx(1.0, abs=0.2)
    assert np.median(inner[1]) == pytest.approx(0.5, abs=0.2)


def cv2_blur(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (0, 0), 2.0)


def test_train_flow_both_stages(clip: FakeClip, tmp_path: Path) -> None:
    config = FlowTrainConfig(
        crop_size=64,
        input_size=64,
        warp_size=16,
        scale_channels=5,
        max_gap=4,
        pairs_per_frame=2.0,
        distil_steps=12,
        dff_steps=6,
        dff_pairs=10,
        batch=4,
        warmup=2,
        checkpoint_every=5,
        bf16=False,
    )
    pairs = make_pairs([clip], config, progress=False)
    assert len(pairs) > 5 and pairs.dis.shape[1:] == (2, 16, 16)
    assert 1 <= pairs.gap.min() and pairs.gap.max() <= 4
    seg = DeepLabV3Plus(SegmentationConfig(input_size=64))
    with one_torch_thread():
        train_flow(config, [clip], None, tmp_path, progress=False)  # distillation only
        assert {r["stage"] for r in read_log(tmp_path)} == {"distil"}
        path = train_flow(config, [clip], seg, tmp_path, progress=False)  # resumes into DFF
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 19))
    assert [r["stage"] for r in log].count("dff") == 6 and all("seg_loss" in r for r in log[12:])
    assert isinstance(load_network(path), FlowNet2S)


def _tables(seed: int = 0, frames: int = 120, gaps: int = 30, flag: str = "conv6") -> list[PairTable]:
    """Synthetic tables: warping decays with the gap, and much faster on 'moving' frames, which
    Conv6 channel 0 flags -- a policy that reads it can place keys where they pay. ``flag="cue"``:
    the parts residual flags them instead and Conv6 is noise."""
    rng = np.random.default_rng(seed)
    tables = []
    for n in range(2):
        moving = rng.random(frames) < 0.15
        g = np.arange(gaps + 1)[None, :]
        u = 0.9 - 0.002 * g - 0.3 * moving[:, None] * (g > 0)
        conf = np.zeros((frames, gaps + 1, 5, 5), dtype=np.int64)
        for c in range(5):  # per-frame mIoU == u exactly: diagonal share u, rest on background
            conf[:, :, c, c] = np.round(1000 * u).astype(np.int64)
            conf[:, :, c, 0] += 1000 - np.round(1000 * u).astype(np.int64) if c else 0
        valid = np.ones((frames, gaps + 1), dtype=bool)
        valid[np.arange(frames)[:, None] < g] = False
        conv6 = rng.normal(0, 0.1, (frames, gaps + 1, 8, 2, 2)).astype(np.float16)
        residual = rng.normal(0.05, 0.01, (frames, gaps + 1, 2)).astype(np.float32)
        if flag == "conv6":
            conv6[:, :, 0] += (moving[:, None] * 3.0)[..., None, None].astype(np.float16)
        else:
            residual[:, :, 1] += 0.2 * moving[:, None] * (g > 0)
        tables.append(
            PairTable(
                f"t{n}",
                np.ones(frames, bool),
                valid,
                conf,
                np.zeros((frames, gaps + 1), np.float32),
                conv6,
                np.ones((frames, gaps + 1), np.float32),
                residual,
            )
        )
    return tables


def test_rollouts_respect_the_key_budget() -> None:
    tables = _tables()
    config = PolicyTrainConfig(eta=0.05, trials=4, batch_episodes=2, episode_len=100, window=40)
    policy = KeyPolicy(policy_config_for(tables, 40))
    with torch.no_grad():
        policy.fc3.bias[:] = torch.tensor([-3.0, 3.0])  # nearly always "key"
        policy.fc3.weight.zero_()
    trainer = PolicyTrainer(config, tables, policy)
    roll, returns, steps = trainer.rollout([trainer.sample_episode() for _ in range(2)])
    # the budget is 0.05 x 40 = 2 keys: every trajectory stops right after its third key
    keys = np.bincount(roll.trial, weights=roll.action, minlength=len(steps))
    assert (keys == 3).all()
    last = {t: s for t, s in zip(roll.trial, roll.step, strict=True)}
    key_steps = [s for t, s, a in zip(roll.trial, roll.step, roll.action, strict=True) if a]
    assert max(key_steps) <= max(last.values()) and steps.max() < 10
    assert len(roll.action) == steps.sum() - len(steps)
    assert (returns >= 0).all()


@pytest.mark.parametrize("key_cost", [0.0, 0.1])
@pytest.mark.parametrize("bias", [(-3.0, 3.0), (3.0, -3.0)])
def test_frame_reward_pays_every_frame_its_miou(bias: tuple[float, float], key_cost: float) -> None:
    """reward="frame": a key earns the frame's own mIoU less the key cost, a non-key the warped mIoU
    at its gap; a key forced by the longest gap earns and pays the same, credited to the decision
    before it."""
    tables = _tables(gaps=12)
    config = PolicyTrainConfig(
        eta=1.0,
        trials=4,
        batch_episodes=2,
        episode_len=50,
        reward="frame",
        reward_scale=1,
        key_cost=key_cost,
    )
    policy = KeyPolicy(policy_config_for(tables, config.window))
    with torch.no_grad():
        policy.fc3.bias[:] = torch.tensor(bias)
        policy.fc3.weight.zero_()
    trainer = PolicyTrainer(config, tables, policy)
    roll, returns, steps = trainer.rollout([trainer.sample_episode() for _ in range(2)])
    u = [t.frame_miou() for t in tables]
    forced_credit = np.zeros(len(roll.action))
    forced_total = 0
    for j in range(len(steps)):
        mine = [m for m, trial in enumerate(roll.trial) if trial == j]
        table, frame, _ = roll.pair[mine[0]]
        start = frame - roll.step[mine[0]]
        decided = {roll.step[m] for m in mine}
        for t in range(1, int(steps[j])):
            if t not in decided:  # forced: credited to the trajectory's latest decision
                before = max(m for m in mine if roll.step[m] < t)
                forced_credit[before] += u[table][start + t, 0] - key_cost
                forced_total += 1
    for m, ((table, frame, gap), action) in enumerate(zip(roll.pair, roll.action, strict=True)):
        own = u[table][frame, 0] - key_cost if action else u[table][frame, gap]
        assert roll.reward[m] == pytest.approx(own + forced_credit[m])
    assert np.bincount(roll.trial, weights=roll.reward) == pytest.approx(returns)
    assert np.mean(roll.action) > 0.9 if bias[1] > 0 else np.mean(roll.action) < 0.1
    assert forced_total == 0 if bias[1] > 0 else forced_total > 0  # never keying: gap 12 forces


def test_key_cost_needs_the_frame_reward() -> None:
    with pytest.raises(ValueError, match="frame"):
        PolicyTrainConfig(key_cost=0.1)
    with pytest.raises(ValueError, match="key_cost"):
        PolicyTrainConfig(reward="frame", key_cost=-1)
    with pytest.raises(ValueError, match="eta"):
        PolicyTrainConfig(eta=1.5)


def test_rmsprop_starts_like_tensorflow() -> None:
    """The accumulator starts at 1 (TensorFlow's RMSProp): the first step is ~lr x gradient, not
    torch's 10 x lr on every weight (which saturates a fresh policy in one update)."""
    steps = {}
    for init in (1.0, 0.0):
        torch.manual_seed(0)
        policy = KeyPolicy(PolicyConfig(in_channels=8, conv6_size=2))
        optimizer = rmsprop(policy, PolicyTrainConfig(rmsprop_init=init))
        before = policy.fc0.weight.detach().clone()
        policy(torch.randn(4, 8, 2, 2), torch.zeros(4, 2)).sum().backward()
        optimizer.step()
        steps[init] = float((policy.fc0.weight.detach() - before).abs().max())
    assert steps[1.0] < 1e-4 < 3e-3 < steps[0.0]


def test_policy_input_standardisation(tmp_path: Path) -> None:
    """normalize_input: Conv6 is standardised per channel with statistics from the training data,
    so the policy answers the same for features at any scale; the statistics ship with it."""
    torch.manual_seed(0)
    conv6 = 0.02 * torch.randn(500, 8, 2, 2) + 0.005
    expert = torch.zeros(3, 2)
    policy = KeyPolicy(PolicyConfig(in_channels=8, conv6_size=2, normalize_input=True))
    policy.set_input_statistics(conv6)
    scaled = KeyPolicy(PolicyConfig(in_channels=8, conv6_size=2, normalize_input=True))
    scaled.load_state_dict(policy.state_dict())
    scaled.set_input_statistics(conv6 * 50)
    with torch.no_grad():
        np.testing.assert_allclose(
            policy.key_probability(conv6[:3], expert),
            scaled.key_probability(conv6[:3] * 50, expert),
            atol=1e-5,
        )
    path = save_network(policy, tmp_path / "policy.safetensors", {"trained": False})
    loaded = load_network(path)
    assert isinstance(loaded, KeyPolicy) and loaded.config.normalize_input
    torch.testing.assert_close(loaded.conv6_scale.float(), policy.conv6_scale, rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="normalize_input"):
        KeyPolicy(PolicyConfig(in_channels=8, conv6_size=2)).set_input_statistics(conv6)


def test_policy_trunk_from_a_dvsnet_head(tmp_path: Path) -> None:
    head = DVSNetHead(DVSNetConfig(in_channels=8, conv6_size=2))
    path = save_network(head, tmp_path / "dvsnet.safetensors", {"trained": False})
    policy = KeyPolicy(PolicyConfig(in_channels=8, conv6_size=2))
    init_trunk_from_dvsnet(policy, path, freeze=True)
    torch.testing.assert_close(policy.fc0.weight, head.fc0.weight.half().float(), rtol=1e-3, atol=1e-3)
    assert not policy.conv0.weight.requires_grad and policy.fc1.weight.requires_grad
    trainable = {
        id(p) for group in rmsprop(policy, PolicyTrainConfig()).param_groups for p in group["params"]
    }
    assert id(policy.fc0.weight) not in trainable and id(policy.fc3.weight) in trainable
    with pytest.raises(ValueError, match="does not fit"):
        init_trunk_from_dvsnet(KeyPolicy(PolicyConfig(in_channels=16, conv6_size=2)), path)


def test_policy_quality_branch_is_the_dvsnet_head(tmp_path: Path) -> None:
    """With ``quality_size`` the trunk's last output is the copied DVSNet head's prediction, FC3
    sees it, it round-trips through the weight file and stays frozen with the trunk."""
    torch.manual_seed(0)
    config = DVSNetConfig(in_channels=8, conv6_size=2, fc_sizes=(32, 16))
    head = DVSNetHead(config).eval()
    path = save_network(head, tmp_path / "dvsnet.safetensors", {"trained": False})
    head = load_network(path).float().eval()  # the float16 file's values
    policy = KeyPolicy(PolicyConfig(in_channels=8, conv6_size=2, fc_sizes=(32, 32, 8), quality_size=16))
    assert policy.config.trunk_size == 9 and policy.fc3.in_features == 9 + 2
    init_trunk_from_dvsnet(policy, path, freeze=True)
    conv6 = torch.randn(5, 8, 2, 2)
    with torch.no_grad():
        trunk = policy.eval().trunk(conv6)
        assert trunk.shape == (5, 9)
        torch.testing.assert_close(trunk[:, -1], head(conv6))
        before = policy(conv6, torch.zeros(5, 2))
        policy.fc3.weight[:, 8] += 1.0  # FC3's weight on the quality input moves the logits
        assert not torch.allclose(before, policy(conv6, torch.zeros(5, 2)))
    assert not policy.quality_fc.weight.requires_grad and not policy.quality_out.weight.requires_grad
    loaded = load_network(save_network(policy, tmp_path / "policy.safetensors", {"trained": False}))
    assert isinstance(loaded, KeyPolicy) and loaded.config.quality_size == 16
    with pytest.raises(ValueError, match="init_trunk"):
        PolicyTrainConfig(quality=True)


def _small_reinforce(**changes: Any) -> PolicyTrainConfig:
    """A REINFORCE run that the synthetic tables teach in seconds."""
    return PolicyTrainConfig(
        **{
            "eta": 0.1,
            "episodes": 240,
            "trials": 8,
            "batch_episodes": 8,
            "episode_len": 60,
            "window": 30,
            "lr": 3e-4,
            "rmsprop_init": 0.0,  # torch's RMSProp: big first steps, which this tiny problem learns from fast
            "entropy": 0.01,
            "checkpoint_every": 10,
            **changes,
        }
    )


def test_reinforce_learns_to_key_moving_frames(tmp_path: Path) -> None:
    tables = _tables()
    config = _small_reinforce()
    with one_torch_thread():
        path = train_policy(config, tables, tmp_path, progress=False)
    log = read_log(tmp_path)
    first = np.mean([r["return"] for r in log[:5]])
    last = np.mean([r["return"] for r in log[-5:]])
    assert last > first
    policy = load_network(path)
    assert isinstance(policy, KeyPolicy)
    expert = torch.tensor([[0.0, 0.3]])
    moving = torch.zeros(1, 8, 2, 2)
    moving[:, 0] = 3.0
    with torch.no_grad():
        assert policy.key_probability(moving, expert) > policy.key_probability(
            torch.zeros(1, 8, 2, 2), expert
        )
    assert (tmp_path / "fig3_training.png").stat().st_size > 0


def test_dvsnet_head_fits_the_warp_score(tmp_path: Path) -> None:
    with one_torch_thread():
        path, fit = train_dvsnet(DVSNetTrainConfig(epochs=3, batch=128), _tables(), tmp_path, progress=False)
    assert isinstance(load_network(path), DVSNetHead)
    assert fit["holdout_pearson"] > 0.8


def test_shipping_halves_the_files_and_writes_cards(tmp_path: Path) -> None:
    small = SegmentationConfig(input_size=64)
    weights = write_random_weights(tmp_path / "runs", small, seed=1)
    sources = {name: weights.paths[name] for name in ("segmentation", "flow", "policy")}
    metrics = {"segmentation": {"miou_C": 0.8}}
    commands = {"flow": "facestream train flow"}
    written = ship_weights(sources, tmp_path / "shipped", metrics=metrics, commands=commands)
    for name, path in written.items():
        assert path.stat().st_size < 0.6 * sources[name].stat().st_size
        original, shipped = load_network(sources[name]), load_network(path)
        for (key, a), b in zip(original.state_dict().items(), shipped.state_dict().values(), strict=True):
            assert b.dtype == a.dtype, key  # loading casts float16 back
            assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3), key
    card = (tmp_path / "shipped" / "segmentation.md").read_text()
    assert "miou_C | 0.8" in card and "sha256" in card
    assert "facestream train flow" in (tmp_path / "shipped" / "flow.md").read_text()
    # shipping again gives the same bytes (pair-table caches are keyed on the hashes)
    before = {n: p.read_bytes() for n, p in written.items()}
    again = ship_weights(
        sources, tmp_path / "shipped", metrics={"segmentation": {"miou_C": 0.9}}, commands=commands
    )
    assert {n: p.read_bytes() for n, p in again.items()} == before


def test_pair_tables_are_keyed_on_n_and_f_only(tmp_path: Path) -> None:
    weights = write_random_weights(tmp_path, SegmentationConfig(input_size=64), seed=2)
    before = weights.fingerprint(PAIR_NETWORKS), weights.fingerprint()
    write_random_weights(tmp_path / "other", SegmentationConfig(input_size=64), seed=3)
    (tmp_path / "policy.safetensors").write_bytes((tmp_path / "other" / "policy.safetensors").read_bytes())
    after = find_weights(tmp_path)
    assert after.fingerprint(PAIR_NETWORKS) == before[0] and after.fingerprint() != before[1]


def test_reinforce_learns_from_a_cue(tmp_path: Path) -> None:
    """With Conv6 blind to the moving frames and the parts residual flagging them, a policy that
    takes that cue learns to key on it; its decisions were fed the table's cue of each pair."""
    tables = _tables(flag="cue")
    config = _small_reinforce(cues=("residual_parts",))
    policy = KeyPolicy(policy_config_for(tables, 30, cues=config.cues))
    trainer = PolicyTrainer(config, tables, policy)
    roll, _, _ = trainer.rollout([trainer.sample_episode() for _ in range(2)])
    for (table, frame, gap), expert in zip(roll.pair, roll.expert, strict=True):
        assert len(expert) == 3 and expert[2] == pytest.approx(tables[table].residual[frame, gap, 1])
    with one_torch_thread():
        path = train_policy(config, tables, tmp_path, progress=False)
    policy = load_network(path)
    assert isinstance(policy, KeyPolicy) and policy.config.cues == ("residual_parts",)
    assert float(policy.cue_mean[0]) == pytest.approx(0.08, abs=0.02)  # statistics of the tables
    conv6 = torch.zeros(2, 8, 2, 2)
    expert = torch.tensor([[0.0, 0.3, 0.05], [0.0, 0.3, 0.25]])
    with torch.no_grad():
        calm, moving = policy.key_probability(conv6, expert).tolist()
    assert moving > calm


def test_seed_ensemble_of_policies_on_one_frozen_trunk(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``facestream train policy-ensemble``: members trained alike on one frozen trunk become one
    file whose pi is the mean of theirs; members on other trunks, etas or alone are refused."""
    tables = _tables(flag="cue")
    head = DVSNetHead(DVSNetConfig(in_channels=8, conv6_size=2))
    trunk = save_network(head, tmp_path / "dvsnet.safetensors", {"trained": False})
    runs = {}
    with one_torch_thread():
        for name, changes in {
            "s0": {"seed": 0},
            "s1": {"seed": 1},
            "eta": {"seed": 2, "eta": 0.2},
            "own": {"seed": 3, "freeze_trunk": False},
        }.items():
            settings = {"freeze_trunk": True, **changes}
            config = _small_reinforce(
                episodes=16, cues=("residual_parts",), init_trunk=str(trunk), **settings
            )
            runs[name] = train_policy(config, tables, tmp_path / name, progress=False)
    assert (
        main(
            [
                "train",
                "policy-ensemble",
                "--member",
                str(tmp_path / "s0"),
                "--member",
                str(runs["s1"]),
                "--out",
                str(tmp_path / "ens"),
            ]
        )
        == 0
    )
    assert "2 members" in capsys.readouterr().out
    ensemble = load_network(tmp_path / "ens" / "policy.safetensors")
    members = [load_network(runs[n]) for n in ("s0", "s1")]
    assert isinstance(ensemble, KeyPolicy) and ensemble.config.members == 2 and len(ensemble.others) == 1
    conv6, expert = torch.randn(6, 8, 2, 2), torch.rand(6, 3)
    with torch.no_grad():
        single = [m.key_probability(conv6, expert) for m in members]
        assert not torch.allclose(single[0], single[1], atol=1e-3)
        torch.testing.assert_close(ensemble.key_probability(conv6, expert), (single[0] + single[1]) / 2)
    card = json.loads(read_metadata(tmp_path / "ens" / "policy.safetensors")["card"])
    assert card["eta"] == 0.1 and [m["seed"] for m in card["members"]] == [0, 1]
    assert card["train"]["seed"] == [0, 1] and "ensemble of 2" in card["network"]
    for other, match in (("eta", "eta"), ("own", "differ")):
        with pytest.raises(ValueError, match=match):
            ensemble_policies([runs["s0"], runs[other]], tmp_path / f"bad-{other}")
    with pytest.raises(ValueError, match="at least two"):
        ensemble_policies([runs["s0"]], tmp_path / "bad")
    with pytest.raises(ValueError, match="single"):
        ensemble_policies([tmp_path / "ens", runs["s0"]], tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad-eta").exists()  # nothing written


def test_rollouts_feed_relative_cues_against_each_trajectorys_earlier_residuals() -> None:
    """The trainer's relative cue is DecisionHistory's: the pair's residual over the mean of the
    residuals of the trajectory's earlier decisions (last ``window``), 1 on its first decision."""
    tables = _tables(flag="cue")
    config = _small_reinforce(cues=("residual_parts", "relative_parts"), window=8)
    policy = KeyPolicy(policy_config_for(tables, 8, cues=config.cues))
    with torch.no_grad():  # rarely a key, so that the budget leaves long trajectories
        policy.fc3.bias[:] = torch.tensor([3.0, -3.0])
        policy.fc3.weight.zero_()
    trainer = PolicyTrainer(config, tables, policy)
    roll, _, _ = trainer.rollout([trainer.sample_episode() for _ in range(2)])
    earlier: dict[int, list[float]] = {}
    for trial, (table, frame, gap), expert in zip(roll.trial, roll.pair, roll.expert, strict=True):
        seen = earlier.setdefault(trial, [])
        residual = float(tables[table].residual[frame, gap, 1])
        assert expert[2] == pytest.approx(residual)
        want = residual / max(float(np.mean(seen[-8:])), RELATIVE_FLOOR) if seen else 1.0
        assert expert[3] == pytest.approx(want, rel=1e-5)
        seen.append(residual)
    assert max(len(v) for v in earlier.values()) > 8  # the window did slide


def test_frame_rate_augmentation_forces_keys_at_each_tables_own_gap_limit() -> None:
    """strides=(1, 3): the 3x tables (gaps up to 10 here) sit beside the 1x ones (up to 30); a
    policy that never keys is forced to at each table's own limit."""
    tables = faster(_tables(), (1, 3))
    assert len(tables) == 2 + 2 * 3 and {t.max_gap for t in tables} == {30, 10}
    config = PolicyTrainConfig(eta=0.5, trials=2, batch_episodes=8, episode_len=40, strides=(1, 3))
    policy = KeyPolicy(policy_config_for(tables, config.window))
    with torch.no_grad():
        policy.fc3.bias[:] = torch.tensor([30.0, -30.0])  # never "key" (the guard still explores)
        policy.fc3.weight.zero_()
    trainer = PolicyTrainer(config, tables, policy)
    roll, _, _ = trainer.rollout([trainer.sample_episode() for _ in range(8)])
    for table, _, gap in roll.pair:
        assert 1 <= gap <= tables[table].max_gap
    assert max(g for t, _, g in roll.pair if tables[t].max_gap == 10) == 10
    with pytest.raises(ValueError, match="strides"):
        PolicyTrainConfig(strides=(0,))
