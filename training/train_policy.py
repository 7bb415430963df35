"""Training the RL key policy (paper section 3.2) and the DVSNet baseline head on set B.

Both learn from the evaluation's pair tables (:mod:`facestream.training.evaluation`): for every
scored frame i and gap g <= 90 the table holds F's Conv6 features D_{i->i-g}, the frame's
confusion matrix with the key g frames back (g = 0: the frame is itself a key) and the pixel
agreement of that warped mask with the frame's own key mask. So N and F are frozen and run once;
an episode is then pure table look-ups, and 2,400 episodes train in minutes on 2 cores.

Policy training follows the paper:

* state: Conv6 features to the last key plus expert information [KAR, LKD/90] over the last 90
  decisions (the engine's :class:`DecisionHistory` definition, so the deployed policy sees the
  same inputs);
* reward (Eq. 1): 0 for non-key, U(key) - U(warp) for key, U = per-frame mIoU against the teacher
  labels; Eq. 2 (``reward="eq2"``, no labels): 1 - pixel agreement of the warped mask with the key
  mask; ``reward="frame"`` (not in the paper): every frame earns its own mIoU, key or warped, so
  with gamma = 1 a key is credited with what it does for the frames after it (Eq. 1 credits only
  the key frame itself, which rewards waiting until the warp has degraded);
* "stop immediately": when the keys taken in the last 90 decisions exceed eta x 90 the episode
  ends at once, so one model per eta learns a different key frequency;
* REINFORCE with K trials per episode (the trials' mean return-to-go is the baseline), mini-batch
  of 8 episodes, entropy bonus lambda1 = 0.14, epsilon-greedy guard 0.98, RMSProp lr 1e-3,
  gamma = 1, 270-frame episodes from random start frames (shorter where clips are).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from facestream.engines.cues import cue_vector
from facestream.engines.weights import file_sha256, load_network, read_metadata, save_network
from facestream.models import DVSNetHead, KeyPolicy
from facestream.models.config import DVSNetConfig, PolicyConfig, check_cues
from facestream.training.evaluation import PairTable
from facestream.training.runs import (
    append_log,
    open_run,
    parameter_count,
    read_log,
    resume,
    save_checkpoint,
    seed_everything,
)

REWARDS = ("eq1", "eq2", "frame")
ETAS = (0.04, 0.06, 0.14)


@dataclass(frozen=True)
class PolicyTrainConfig:
    eta: float = 0.04
    episodes: int = 2400
    batch_episodes: int = 8
    trials: int = 32
    episode_len: int = 270
    entropy: float = 0.14
    epsilon: float = 0.98
    lr: float = 1e-3
    gamma: float = 1.0
    window: int = 90
    reward: str = "eq1"
    reward_scale: float = 10.0  # reward units per mIoU (chosen on set B among 1, 10, 100)
    # Every key costs this much mIoU (times reward_scale), the Lagrange multiplier of the key
    # budget instead of (or next to) the KAR stop limit; with ``eta = 1`` the limit never stops an
    # episode. Needs ``reward="frame"``, whose frames earn their own mIoU: a key then pays off only
    # through the frames after it. Keys forced by the longest gap earn their frame and pay too
    # (credited to the trajectory's previous decision), so waiting for a free key does not pay.
    key_cost: float = 0.0
    grad_decisions: int = 4096  # decisions sampled (uniformly, rescaled) for each gradient step
    advantage_norm: bool = False  # divide the advantages by their std (keeps lambda1 in proportion)
    # RMSProp's mean-square accumulator starts at this value. TensorFlow's RMSProp (the paper's
    # framework) starts it at 1.0, so early steps are about lr x gradient; torch starts it at 0,
    # which makes the first step lr / sqrt(1 - alpha) = 10 x lr on every weight in the sign of its
    # gradient -- enough to saturate the policy in one update. 0 (the default, and how the
    # shipped policies were trained) gives torch's behaviour; 1.0 and alpha 0.9 TensorFlow's.
    rmsprop_init: float = 0.0
    rmsprop_alpha: float = 0.99  # torch's default decay (TensorFlow's is 0.9)
    normalize_input: bool = False  # standardise Conv6 per channel (PolicyConfig.normalize_input)
    # Start Conv0 and FC0 from a trained DVSNet head (same shapes), whose features already predict
    # the warped frame's quality; ``freeze_trunk`` keeps them fixed (REINFORCE trains FC1-FC3).
    init_trunk: str | None = None
    freeze_trunk: bool = False
    # Also copy the DVSNet head's FC1 and output layer into a quality branch whose output (the
    # warped frame's predicted mIoU) FC3 sees next to FC2 (PolicyConfig.quality_size; not in the
    # paper). Needs ``init_trunk``; ``freeze_trunk`` keeps the branch fixed too.
    quality: bool = False
    # Per-frame cues next to [KAR, LKD] in the state (PolicyConfig.cues; engines.cues): () is the
    # paper's state.
    cues: tuple[str, ...] = ()
    # Frame-rate augmentation: also learn from every table played 2x, 3x, ... faster (each offset;
    # PairTable.subsample), so that the policy sees faster motion than the training clips have.
    strides: tuple[int, ...] = (1,)
    seed: int = 0
    checkpoint_every: int = 10  # updates

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if not 0 < self.eta <= 1:
            raise ValueError(f"eta is a key-all ratio in (0, 1] (1: no limit), got {self.eta}")
        if self.key_cost < 0:
            raise ValueError(f"key_cost must be >= 0, got {self.key_cost}")
        if self.key_cost and self.reward != "frame":
            raise ValueError("key_cost needs reward='frame' (a key's value is in the frames after it)")
        object.__setattr__(self, "cues", check_cues(self.cues))
        if self.quality and not self.init_trunk:
            raise ValueError("quality needs init_trunk: the branch is copied from a trained DVSNet head")
        object.__setattr__(self, "strides", tuple(self.strides))
        if not self.strides or min(self.strides) < 1 or len(set(self.strides)) != len(self.strides):
            raise ValueError(f"strides must be distinct whole numbers >= 1, got {self.strides}")


@dataclass
class _Table:
    """One clip's table in the form the simulation reads."""

    conv6: torch.Tensor  # (T, G+1, C, s, s) float16
    valid: np.ndarray  # (T, G+1)
    key_reward: np.ndarray  # (T, G+1) reward of a key at frame i with the last key g back
    skip_reward: np.ndarray  # (T, G+1) reward of a non-key at frame i with the last key g back
    runs: list[tuple[int, int]]
    magnitude: np.ndarray  # (T, G+1) float32
    residual: np.ndarray  # (T, G+1, 2) float32


def _prepare(
    tables: Sequence[PairTable], reward: str, scale: float = 1.0, key_cost: float = 0.0
) -> list[_Table]:
    prepared = []
    for t in tables:
        skip = np.zeros(t.valid.shape)
        if reward == "eq1":
            u = t.frame_miou()
            gain = np.where(t.valid, u[:, :1] - u, 0.0)
        elif reward == "eq2":
            gain = np.where(t.valid, 1.0 - t.agreement, 0.0)
        else:  # "frame": every frame earns its own mIoU, whichever mask it gets
            u = np.where(t.valid, t.frame_miou(), 0.0)
            gain = np.repeat(u[:, :1], u.shape[1], axis=1)
            skip = u.copy()
            skip[:, 0] = 0.0
        gain[:, 0] = 0.0
        runs = [(a, b) for a, b in t.episodes() if b - a >= 2]
        prepared.append(
            _Table(
                torch.from_numpy(t.conv6),
                t.valid,
                ((gain - key_cost) * scale).astype(np.float64),
                (skip * scale).astype(np.float64),
                runs,
                t.magnitude,
                t.residual,
            )
        )
    if not any(p.runs for p in prepared):
        raise ValueError("no episodes of two or more scored frames in these pair tables")
    return prepared


@dataclass
class _Rollout:
    """The decisions of one update: per decision its episode, trial, step, state and action."""

    episode: list[int] = dataclasses.field(default_factory=list)
    trial: list[int] = dataclasses.field(default_factory=list)
    step: list[int] = dataclasses.field(default_factory=list)
    pair: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (table, frame, gap)
    expert: list[tuple[float, ...]] = dataclasses.field(default_factory=list)  # [KAR, LKD, *cues]
    action: list[int] = dataclasses.field(default_factory=list)
    reward: list[float] = dataclasses.field(default_factory=list)


class PolicyTrainer:
    def __init__(self, config: PolicyTrainConfig, tables: Sequence[PairTable], policy: KeyPolicy) -> None:
        self.config, self.policy = config, policy
        self.tables = _prepare(tables, config.reward, config.reward_scale, config.key_cost)
        lengths = np.array([sum(b - a for a, b in t.runs) for t in self.tables], dtype=np.float64)
        self.table_weights = lengths / lengths.sum()
        self.rng = np.random.default_rng(config.seed)

    def sample_episode(self) -> tuple[int, int, int]:
        """(table, start frame, length): a random start inside a random run of scored frames."""
        ti = int(self.rng.choice(len(self.tables), p=self.table_weights))
        runs = self.tables[ti].runs
        sizes = np.array([b - a for a, b in runs], dtype=np.float64)
        a, b = runs[int(self.rng.choice(len(runs), p=sizes / sizes.sum()))]
        start = int(self.rng.integers(a, b - 1))
        return ti, start, min(self.config.episode_len, b - start)

    @torch.no_grad()
    def _probabilities(self, pairs: list[tuple[int, int, int]], expert: np.ndarray) -> np.ndarray:
        unique = sorted(set(pairs))
        where = {p: n for n, p in enumerate(unique)}
        conv6 = torch.stack([self.tables[t].conv6[f, g] for t, f, g in unique]).float()
        trunk = self.policy.trunk(conv6)[[where[p] for p in pairs]]
        logits = self.policy.head(trunk, torch.from_numpy(expert))
        return torch.softmax(logits, dim=1)[:, 1].double().numpy()

    def rollout(self, episodes: Sequence[tuple[int, int, int]]) -> tuple[_Rollout, np.ndarray, np.ndarray]:
        """K trials of every episode; returns the decisions, per-trajectory return and length."""
        c = self.config
        k = c.trials
        n = len(episodes) * k
        ep_of = np.repeat(np.arange(len(episodes)), k)
        spec = np.array(episodes, dtype=np.int64).reshape(-1, 3)[ep_of]
        table_of, start_of, length_of = spec[:, 0], spec[:, 1].copy(), spec[:, 2]
        max_gaps = np.array([t.valid.shape[1] - 1 for t in self.tables])
        history = np.zeros((n, c.window), dtype=bool)  # ring buffer of the last decisions (key?)
        filled = np.ones(n, dtype=np.int64)  # the episode's first frame is a key, as in the engine
        history[:, 0] = True
        policy_keys = np.zeros((n, c.window), dtype=bool)  # keys after the first (for the budget)
        # the residuals of the last decided frames (DecisionHistory.residuals, for relative cues)
        seen = np.zeros((n, c.window, 2))
        seen_count = np.zeros(n, dtype=np.int64)
        head = np.ones(n, dtype=np.int64)
        last_key = start_of.copy()
        alive = np.ones(n, dtype=bool)
        returns = np.zeros(n)
        steps = np.ones(n, dtype=np.int64)
        last_decision = np.full(n, -1)  # each trajectory's latest entry in ``out``
        out = _Rollout()
        for t in range(1, int(length_of.max())):
            alive &= t < length_of
            if not alive.any():
                break
            frame = start_of + t
            gap = frame - last_key
            idx = np.nonzero(alive)[0]
            over_gap = gap[idx] > max_gaps[table_of[idx]]  # each table's own longest gap
            forced = idx[over_gap]
            decide = idx[~over_gap]
            keys = np.zeros(n, dtype=bool)
            keys[forced] = True
            # a forced key's frame earns and pays like a chosen one (under the frame reward a key
            # earns the same at every gap; column 0 is the episode's first frame, no decision)
            if c.reward == "frame":
                for j in forced:
                    if last_decision[j] >= 0:
                        gain = float(self.tables[table_of[j]].key_reward[frame[j], 1])
                        out.reward[last_decision[j]] += gain
                        returns[j] += gain
            if len(decide):
                kar = history[decide].sum(axis=1) / np.minimum(filled[decide], c.window)
                lkd = np.minimum(gap[decide], c.window) / c.window
                pairs = [(int(table_of[j]), int(frame[j]), int(gap[j])) for j in decide]
                cue_rows = np.zeros((len(decide), 0), np.float32)
                if c.cues:
                    magnitude = np.array([self.tables[t].magnitude[f, g] for t, f, g in pairs])
                    residual = np.array([self.tables[t].residual[f, g] for t, f, g in pairs])
                    counts = np.minimum(seen_count[decide], c.window)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        reference = seen[decide].sum(axis=1) / counts[:, None]  # NaN: none seen yet
                    cue_rows = cue_vector(c.cues, magnitude, residual, reference)
                    seen[decide, seen_count[decide] % c.window] = residual
                    seen_count[decide] += 1
                expert = np.concatenate((np.stack((kar, lkd), axis=1).astype(np.float32), cue_rows), axis=1)
                prob = self._probabilities(pairs, expert)
                guarded = np.clip(prob, 1 - c.epsilon, c.epsilon)
                action = self.rng.random(len(decide)) < guarded
                keys[decide] = action
                for m, j in enumerate(decide):
                    table = self.tables[table_of[j]]
                    gain = (table.key_reward if action[m] else table.skip_reward)[frame[j], gap[j]]
                    returns[j] += gain
                    out.episode.append(int(ep_of[j]))
                    out.trial.append(int(j))
                    out.step.append(t)
                    out.pair.append(pairs[m])
                    out.expert.append(tuple(float(v) for v in expert[m]))
                    out.action.append(int(action[m]))
                    out.reward.append(float(gain))
                    last_decision[j] = len(out.reward) - 1
            slot = head[idx] % c.window
            history[idx, slot] = keys[idx]
            policy_keys[idx, slot] = keys[idx]
            head[idx] += 1
            filled[idx] += 1
            last_key[keys] = frame[keys]
            steps[idx] += 1
            # "stop immediately exceeding the limitation": the key budget of the last 90 decisions
            over = policy_keys[idx].sum(axis=1) > c.eta * c.window
            alive[idx[over]] = False
        return out, returns, steps

    def update(
        self, optimizer: torch.optim.Optimizer, episodes: Sequence[tuple[int, int, int]]
    ) -> dict[str, Any]:
        c = self.config
        roll, returns, steps = self.rollout(episodes)
        if not roll.action:
            return {"return": 0.0, "length": float(steps.mean()), "keys": 0.0}
        trial = np.array(roll.trial)
        step = np.array(roll.step)
        reward = np.array(roll.reward)
        # return-to-go with gamma, per trajectory (decisions are in time order per trajectory)
        togo = np.zeros_like(reward)
        order = np.lexsort((-step, trial))
        running: dict[int, float] = {}
        for m in order:
            j = trial[m]
            running[j] = reward[m] + c.gamma * running.get(j, 0.0)
            togo[m] = running[j]
        # baseline: mean return-to-go of the episode's trials that reached the same step
        episode = np.array(roll.episode)
        key = episode * 100000 + step
        _, inverse = np.unique(key, return_inverse=True)
        baseline = np.bincount(inverse, weights=togo) / np.bincount(inverse)
        advantage_all = togo - baseline[inverse]
        if c.advantage_norm:
            advantage_all = advantage_all / (advantage_all.std() + 1e-8)
        # An unbiased estimate of the summed policy gradient from a uniform sample of the decisions
        # (the trunk's backward pass over every decision of 256 trajectories is the slow part).
        count = len(roll.action)
        pick = np.arange(count)
        if count > c.grad_decisions:
            pick = self.rng.choice(count, size=c.grad_decisions, replace=False)
        weight = count / len(pick)
        pairs = [roll.pair[m] for m in pick]
        advantage = torch.from_numpy(advantage_all[pick]).float()
        unique = sorted(set(pairs))
        where = {p: n for n, p in enumerate(unique)}
        conv6 = torch.stack([self.tables[t].conv6[f, g] for t, f, g in unique]).float()
        trunk = self.policy.trunk(conv6)[[where[p] for p in pairs]]
        logits = self.policy.head(trunk, torch.tensor([roll.expert[m] for m in pick], dtype=torch.float32))
        logp = F.log_softmax(logits, dim=1)
        action = torch.tensor([roll.action[m] for m in pick])
        chosen = logp.gather(1, action[:, None])[:, 0]
        entropy = -(logp.exp() * logp).sum(dim=1)
        trajectories = len(episodes) * c.trials
        loss = -weight * ((chosen * advantage).sum() + c.entropy * entropy.sum()) / trajectories
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decisions = len(roll.action)
        weights = self.policy.expert_weights()
        return {
            "return": float(returns.mean()),
            "length": float(steps.mean()),
            "kar": float(np.sum(roll.action) / decisions),
            "entropy": float(entropy.mean().detach()),
            "w_kar": float(weights[0]),
            "w_lkd": float(weights[1]),
            "loss": float(loss.detach()),
        }


def rmsprop(policy: nn.Module, config: PolicyTrainConfig) -> torch.optim.RMSprop:
    """RMSProp over the trainable parameters, its accumulator started at ``config.rmsprop_init``."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.RMSprop(params, lr=config.lr, alpha=config.rmsprop_alpha)
    if config.rmsprop_init:
        for p in params:
            optimizer.state[p] = {
                "step": torch.zeros(()),
                "square_avg": torch.full_like(p, config.rmsprop_init),
            }
    return optimizer


def load_dvsnet_head(path: str | Path) -> DVSNetHead:
    """The trained DVSNet head in ``path``, or ValueError if the file holds another network."""
    head = load_network(Path(path))
    if not isinstance(head, DVSNetHead):
        raise ValueError(f"{path} is not a DVSNet head")
    return head


def init_trunk_from_dvsnet(policy: KeyPolicy, path: str | Path, freeze: bool = False) -> None:
    """Copy a trained DVSNet head's Conv and FC0 into the policy's Conv0 and FC0 (and its FC1 and
    output layer into the policy's quality branch, when it has one)."""
    head = load_dvsnet_head(path)
    pairs = [(head.conv, policy.conv0), (head.fc0, policy.fc0)]
    if policy.config.quality_size:
        pairs += [(head.fc1, policy.quality_fc), (head.out, policy.quality_out)]
    for source, target in pairs:
        if source.weight.shape != target.weight.shape:
            raise ValueError(
                f"{path}: {tuple(source.weight.shape)} does not fit the policy's {tuple(target.weight.shape)}"
            )
        target.load_state_dict({k: v.float() for k, v in source.state_dict().items()})
        target.requires_grad_(not freeze)


def policy_config_for(
    tables: Sequence[PairTable],
    window: int = 90,
    normalize_input: bool = False,
    cues: Sequence[str] = (),
    quality_size: int = 0,
) -> PolicyConfig:
    shape = tables[0].conv6.shape
    return PolicyConfig(
        in_channels=shape[2],
        conv6_size=shape[3],
        window=window,
        normalize_input=normalize_input,
        cues=tuple(cues),
        quality_size=quality_size,
    )


def cue_sample(tables: Sequence[PairTable], cues: Sequence[str]) -> torch.Tensor:
    """The cues (N, len(cues)) of every valid pair with gap >= 1 (for their standardisation).

    A relative cue is taken against the mean residual of its clip's pairs: its reference in a
    rollout depends on the decisions, which are not known before training."""
    rows = []
    for t in tables:
        valid = t.valid[:, 1:]
        residual = t.residual[:, 1:][valid]
        reference = np.broadcast_to(residual.mean(axis=0, dtype=np.float64), residual.shape)
        rows.append(cue_vector(tuple(cues), t.magnitude[:, 1:][valid], residual, reference))
    return torch.from_numpy(np.concatenate(rows))


def conv6_sample(tables: Sequence[PairTable], count: int = 20000, seed: int = 0) -> torch.Tensor:
    """Up to ``count`` Conv6 features (N, C, s, s) of valid pairs (gap >= 1), drawn uniformly."""
    rng = np.random.default_rng(seed)
    where = [
        (n, f, g) for n, t in enumerate(tables) for f, g in zip(*np.nonzero(t.valid[:, 1:]), strict=True)
    ]
    picks = rng.choice(len(where), size=min(count, len(where)), replace=False)
    return torch.from_numpy(
        np.stack([tables[where[i][0]].conv6[where[i][1], where[i][2] + 1] for i in picks])
    )


def faster(tables: Sequence[PairTable], strides: Sequence[int]) -> list[PairTable]:
    """Every table at each stride (all offsets): the clips played 1x, 2x, ... faster."""
    return [t.subsample(s, o) for s in strides for t in tables for o in range(s)]


def train_policy(
    config: PolicyTrainConfig,
    tables: Sequence[PairTable],
    out: Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    card: dict[str, Any] | None = None,
) -> Path:
    """REINFORCE over the pair tables; writes ``out/policy.safetensors`` and the Fig. 3 plot."""
    open_run(out, config, fresh=fresh)
    seed_everything(config.seed)
    tables = faster(tables, config.strides)
    quality_size = 0
    if config.quality:
        assert config.init_trunk is not None  # __post_init__
        quality_size = load_dvsnet_head(config.init_trunk).config.fc_sizes[1]
    policy = KeyPolicy(
        policy_config_for(tables, config.window, config.normalize_input, config.cues, quality_size)
    )
    if config.normalize_input:
        policy.set_input_statistics(conv6_sample(tables))
    if config.cues:
        policy.set_cue_statistics(cue_sample(tables, config.cues))
    if config.init_trunk:
        init_trunk_from_dvsnet(policy, config.init_trunk, config.freeze_trunk)
    optimizer = rmsprop(policy, config)
    trainer = PolicyTrainer(config, tables, policy)
    update, extra, elapsed = resume(out, {"policy": policy, "optimizer": optimizer})
    if "rng" in extra:
        trainer.rng.bit_generator.state = extra["rng"]
    updates = -(-config.episodes // config.batch_episodes)
    bar = tqdm(
        total=updates, initial=update, desc=f"train RL eta={config.eta:g}", disable=not progress, unit="upd"
    )
    while update < updates:
        t0 = time.perf_counter()
        episodes = [trainer.sample_episode() for _ in range(config.batch_episodes)]
        stats = trainer.update(optimizer, episodes)
        update += 1
        elapsed += time.perf_counter() - t0
        append_log(
            out,
            {
                "step": update,
                "episodes": update * config.batch_episodes,
                **stats,
                "elapsed_s": round(elapsed, 1),
            },
        )
        bar.update(1)
        bar.set_postfix(
            ret=f"{stats['return']:.3f}", kar=f"{stats.get('kar', 0):.3f}", len=f"{stats['length']:.0f}"
        )
        if update % config.checkpoint_every == 0 or update == updates:
            save_checkpoint(
                out,
                update,
                {"policy": policy, "optimizer": optimizer},
                {"rng": trainer.rng.bit_generator.state, "elapsed": elapsed},
            )
    bar.close()
    info = {
        "trained": True,
        "network": "RL key policy (paper section 3.2)",
        "eta": config.eta,
        "train": dataclasses.asdict(config),
        "updates": update,
        "train_minutes": round(elapsed / 60, 1),
        "parameters": parameter_count(policy),
        "final_return": round(float(np.mean([r["return"] for r in read_log(out)[-20:]])), 4),
        **(card or {}),
    }
    path = save_network(policy, out / "policy.safetensors", info)
    plot_policy_training([out])
    return path


SHARED = ("conv0.", "fc0.", "quality_", "conv6_", "cue_")  # state-dict keys every member holds alike


@dataclass(frozen=True)
class EnsembleConfig:
    """What ``facestream train policy-ensemble`` records in its run folder."""

    members: tuple[str, ...]


def ensemble_policies(paths: Sequence[Path], out: Path) -> Path:
    """One seed-ensemble policy (``PolicyConfig.members`` = len(paths)) from trained policies
    that share a frozen trunk (``--init-trunk X --freeze-trunk``, the same data): pi(a1 | s) is
    the mean of theirs. Writes ``out/policy.safetensors`` with a card naming the members."""
    if len(paths) < 2:
        raise ValueError("an ensemble needs at least two member policies")
    files = [p / "policy.safetensors" if p.is_dir() else p for p in paths]
    policies = []
    for path in files:
        policy = load_network(path)
        if not isinstance(policy, KeyPolicy) or policy.config.members != 1:
            raise ValueError(f"{path} is not a single key policy")
        policies.append(policy)
    first = policies[0]
    cards = [json.loads(read_metadata(p).get("card", "{}")) for p in files]
    reference = first.state_dict()
    for path, policy, card in zip(files[1:], policies[1:], cards[1:], strict=True):
        if policy.config != first.config:
            raise ValueError(f"{path}: its config differs from {files[0]}'s")
        if card.get("eta") != cards[0].get("eta"):
            raise ValueError(f"{path}: eta {card.get('eta')} differs from {files[0]}'s {cards[0].get('eta')}")
        state = policy.state_dict()
        differs = [k for k in reference if k.startswith(SHARED) and not torch.equal(state[k], reference[k])]
        if differs:
            raise ValueError(
                f"{path}: {', '.join(differs)} differ from {files[0]}'s (members must share one frozen trunk "
                "and be trained on the same data)"
            )
    open_run(out, EnsembleConfig(tuple(str(p) for p in files)), fresh=True)
    ensemble = KeyPolicy(dataclasses.replace(first.config, members=len(policies)))
    state = dict(reference)
    for n, policy in enumerate(policies[1:]):
        state.update(
            {
                f"others.{n}.{layer}.{k}": v
                for layer in ("fc1", "fc2", "fc3")
                for k, v in getattr(policy, layer).state_dict().items()
            }
        )
    ensemble.load_state_dict(state, strict=True)
    seeds = [card.get("train", {}).get("seed") for card in cards]
    info = {
        **{k: v for k, v in cards[0].items() if k in ("data", "eta", "trained")},
        "network": f"RL key policy (paper section 3.2), seed ensemble of {len(policies)} (mean of their pi)",
        "members": [
            {
                "file": str(path),
                "sha256": file_sha256(path),
                "seed": seed,
                "train_minutes": card.get("train_minutes"),
            }
            for path, seed, card in zip(files, seeds, cards, strict=True)
        ],
        "train": {**cards[0].get("train", {}), "seed": seeds},
        "train_minutes": round(sum(float(c.get("train_minutes") or 0) for c in cards), 1),
        "parameters": parameter_count(ensemble),
    }
    return save_network(ensemble.eval(), out / "policy.safetensors", info)


def plot_policy_training(runs: Sequence[Path], path: Path | None = None) -> Path:
    """The paper's Fig. 3: average return, and FC3's KAR and LKD weights, over training episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for run in runs:
        log = read_log(run)
        if not log:
            continue
        import json

        eta = json.loads((run / "config.json").read_text())["config"]["eta"]
        x = np.array([r["episodes"] for r in log])
        for axis, key in zip(axes, ("return", "w_kar", "w_lkd"), strict=True):
            values = np.array([r.get(key, np.nan) for r in log], dtype=float)
            if key == "return" and len(values) >= 10:
                values = np.convolve(values, np.ones(10) / 10, mode="same")
            axis.plot(x, values, label=f"η = {eta:g}", lw=1.2)
    titles = (
        "average return (smoothed)",
        "FC3 weight on KAR (key - non-key)",
        "FC3 weight on LKD (key - non-key)",
    )
    for axis, title in zip(axes, titles, strict=True):
        axis.set(xlabel="training episodes", title=title)
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = path or runs[0] / "fig3_training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- DVSNet


@dataclass(frozen=True)
class DVSNetTrainConfig:
    epochs: int = 6
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    holdout: float = 0.15  # share of pairs (by frame) kept out to report the fit


def dvsnet_samples(tables: Sequence[PairTable]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Conv6 features, target score (the warped frame's mIoU) and frame id of every pair g >= 1."""
    feats, targets, frames = [], [], []
    for n, t in enumerate(tables):
        u = t.frame_miou()
        index = np.nonzero(t.valid[:, 1:] & np.isfinite(u[:, 1:]))
        feats.append(t.conv6[:, 1:][index])
        targets.append(u[:, 1:][index].astype(np.float32))
        frames.append(n * 1_000_000 + index[0])
    return np.concatenate(feats), np.concatenate(targets), np.concatenate(frames)


def train_dvsnet(
    config: DVSNetTrainConfig,
    tables: Sequence[PairTable],
    out: Path,
    *,
    progress: bool = True,
    card: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, float]]:
    """Regress the warped result's per-frame mIoU from Conv6 features (MSE); writes dvsnet.safetensors."""
    open_run(out, config, fresh=True)
    seed_everything(config.seed)
    feats, targets, frames = dvsnet_samples(tables)
    unique = np.unique(frames)
    rng = np.random.default_rng(config.seed)
    held = set(rng.choice(unique, size=max(1, int(len(unique) * config.holdout)), replace=False).tolist())
    test = np.array([f in held for f in frames])
    shape = tables[0].conv6.shape
    head = DVSNetHead(DVSNetConfig(in_channels=shape[2], conv6_size=shape[3]))
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    x_train, y_train = torch.from_numpy(feats[~test]), torch.from_numpy(targets[~test])
    steps = config.epochs * -(-len(x_train) // config.batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="train DVSNet", disable=not progress, unit="step")
    step = 0
    for epoch in range(config.epochs):
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), config.batch):
            sel = order[i : i + config.batch]
            loss = F.mse_loss(head(x_train[sel].float()), y_train[sel])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % 50 == 0:
                append_log(out, {"step": step, "epoch": epoch, "loss": float(loss.detach())})
    bar.close()
    with torch.no_grad():
        pred = torch.cat(
            [
                head(torch.from_numpy(feats[test][i : i + 2048]).float())
                for i in range(0, int(test.sum()), 2048)
            ]
        )
    truth = targets[test]
    fit = {
        "holdout_pairs": int(test.sum()),
        "holdout_mae": float(np.abs(pred.numpy() - truth).mean()),
        "holdout_pearson": float(np.corrcoef(pred.numpy(), truth)[0, 1]),
        "train_minutes": round((time.perf_counter() - start) / 60, 2),
    }
    info = {
        "trained": True,
        "network": "DVSNet decision head (Conv6 -> expected mIoU of the warped frame)",
        "train": dataclasses.asdict(config),
        "parameters": parameter_count(head),
        **{k: round(v, 4) for k, v in fit.items()},
        **(card or {}),
    }
    return save_network(head, out / "dvsnet.safetensors", info), fit
