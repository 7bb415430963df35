"""Training the warp corrector (:mod:`facestream.models.correction`; not in the paper).

Data: for every labelled frame ``t`` of the training set (A), up to ``pairs_per_frame`` earlier
labelled frames ``k`` of the same run at gaps 1..``max_gap`` become (key, current) pairs. Each
frame is cut once at its teacher square; the shipped N gives the key's class scores and DIS (the
default warp flow, the engine's own :func:`~facestream.engines.dis_flow.dis_flow`) the flow from
the current crop to the key crop, both computed once. Every step then warps the key scores and the
key crop by that flow, as the pipeline does, and trains the corrector against the current frame's
teacher label (cross-entropy + soft Dice at 128², bf16 autocast, horizontal flips, the same
brightness/contrast change on both crops; optionally the same random rotation/scale/aspect/shift
of the whole pair, :func:`affine_pair`). N and the flow stay fixed.

Training on several sets (``train_set="A,B"``) needs ``val_clips``: those clips leave the
training data and become the validation data. Pairs are drawn per set (:func:`concat_pairs`).

Validation: the same pairs on set B (fewer per frame), or on ``val_clips``: mIoU of the warped
scores and of the corrected ones, against the labels, at the start and every ``val_every`` steps
(``log.jsonl``, ``training.png``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from facestream.engines.dis_flow import create_dis, dis_flow
from facestream.engines.face import crop_square
from facestream.engines.networks import Networks
from facestream.engines.weights import FILES, save_network
from facestream.models import WarpCorrector, warp
from facestream.models.config import CorrectionConfig
from facestream.training.evaluation import NUM_CLASSES, confusions, miou, per_class_iou
from facestream.training.manifest import Clip
from facestream.training.runs import (
    append_log,
    autocast,
    cosine_lr,
    open_run,
    parameter_count,
    read_log,
    resume,
    save_checkpoint,
    seed_everything,
    set_lr,
)
from facestream.training.train_flow import plot_running_mean


@dataclass(frozen=True)
class CorrectionTrainConfig:
    manifest: str = "default"
    train_set: str = "A"  # one set, or several joined by commas ("A,B")
    val_set: str = "B"
    # clips of the training sets held out for validation instead of val_set (when training on B too)
    val_clips: tuple[str, ...] = ()
    teacher: str = "mediapipe"
    steps: int = 2500
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    max_gap: int = 60  # key-to-current distances 1..max_gap frames
    pairs_per_frame: int = 10
    val_pairs_per_frame: int = 2
    dice_weight: float = 1.0
    # 48: set-B validation 77.9 against 77.1 at 32 (2,500 steps each), 5.1 against 3.2 ms on ORT;
    # 64 (1,500 steps) was no better on set B at step 1,000 (76.3) and was stopped there
    width: int = 48
    # the crops it sees, in multiples of the score grid: 2 (128², half N's input) or 4 (N's 256²)
    image_factor: int = 2
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    protect: tuple[int, ...] = (2,)  # classes left to the warp (CorrectionConfig.protect): eyes
    # grid cells around them left alone too (CorrectionConfig.protect_margin): the margin the
    # network is saved with and runs with, and the one it trains with. The shipped corrector trained
    # before the margin existed (0) and runs with 1: set-B validation 77.0, against 75.9 for one
    # trained with 1 throughout (README "The eye guard's margin")
    protect_margin: int = 1
    train_protect_margin: int = 0
    # in that zone, other classes' residuals may still be negative (CorrectionConfig.protect_grow):
    # eyes may grow, never shrink. Run-time only, as the shipped corrector: set-B validation 77.4
    # against 77.0 with the zone frozen (README "The eye guard")
    protect_grow: bool = True
    train_protect_grow: bool = False
    bf16: bool = True
    seed: int = 0
    val_every: int = 500
    checkpoint_every: int = 100
    # strength of random similarity-plus-aspect warps of each pair (both frames, flow, scores and
    # label alike), for faces framed, sized and shaped unlike set A's. Off: at 1.0 (2,500 steps)
    # the validation pairs reached 76.8 mIoU against 77.1 without it
    affine: float = 0.0

    def model(self, grid_size: int, *, training: bool = False) -> CorrectionConfig:
        """The network's config: as saved and run, or (``training``) as it trains."""
        margin = self.train_protect_margin if training else self.protect_margin
        grow = self.train_protect_grow if training else self.protect_grow
        return CorrectionConfig(
            num_classes=NUM_CLASSES,
            image_size=self.image_factor * grid_size,
            grid_size=grid_size,
            width=self.width,
            dilations=self.dilations,
            protect=self.protect,
            protect_margin=margin,
            protect_grow=grow,
        )


@dataclass
class CorrectionPairs:
    """Frames (crops, labels, N's scores) and (key, current) pairs with their DIS flow."""

    images: np.ndarray  # (N, I, I, 3) uint8 crops at the corrector's input size
    labels: np.ndarray  # (N, L, L) uint8 teacher labels at twice the score grid
    scores: np.ndarray  # (N, K, G, G) float32 N's class scores of each frame
    pairs: np.ndarray  # (P, 2) int64 [key frame, current frame] indices into the arrays above
    flows: np.ndarray  # (P, 2, G, G) float16 DIS flow current -> key, grid pixels

    def __len__(self) -> int:
        return len(self.pairs)


def make_correction_pairs(
    clips: Sequence[Clip],
    networks: Networks,
    *,
    per_frame: int,
    max_gap: int,
    seed: int = 0,
    progress: bool = True,
    image_factor: int = 2,
) -> CorrectionPairs:
    """Every labelled frame cut at its teacher square; ``per_frame`` random earlier frames of the
    same run of labelled frames (gap <= ``max_gap``) as its keys. Crops at ``image_factor`` times
    the score grid, labels at twice it."""
    size = networks.segmentation_config.input_size
    grid = networks.segmentation_config.feature_size
    side, image_side = 2 * grid, image_factor * grid
    rng = np.random.default_rng(seed)
    dis = create_dis()
    images, labels, scores, greys, runs = [], [], [], [], []
    run = 0
    for clip in clips:
        labelled = set(clip.labelled)
        previous = None
        for i, rgb in enumerate(
            tqdm(clip.frames(), desc=f"frames {clip.clip_id}", disable=not progress, leave=False)
        ):
            box = clip.box(i) if i in labelled else None
            if box is None:
                continue
            if previous is None or i != previous + 1:
                run += 1  # a gap in the labelled frames starts a new run
            previous = i
            crop = crop_square(rgb, box, size)
            label = crop_square(clip.label(i), box, side, nearest=True)
            images.append(
                crop
                if image_side == size
                else cv2.resize(crop, (image_side,) * 2, interpolation=cv2.INTER_AREA)
            )
            labels.append(label)
            greys.append(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY))
            runs.append(run)
            x = np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32)[None] / 255.0
            scores.append(networks.task(networks.features(x))[0])
    if not images:
        raise ValueError("no labelled frames with a face in these clips")
    pairs, flows = [], []
    for t in tqdm(range(len(images)), desc="DIS pairs", disable=not progress, leave=False):
        keys = [k for k in range(max(0, t - max_gap), t) if runs[k] == runs[t]]
        if not keys:
            continue
        for k in rng.choice(keys, size=min(per_frame, len(keys)), replace=False):
            pairs.append((int(k), t))
            flows.append(dis_flow(dis, greys[t], greys[int(k)], grid).astype(np.float16))
    if not pairs:
        raise ValueError("no frame pairs: the clips have too few consecutive labelled frames")
    return CorrectionPairs(
        np.stack(images),
        np.stack(labels).astype(np.uint8),
        np.stack(scores).astype(np.float32),
        np.asarray(pairs, dtype=np.int64),
        np.stack(flows),
    )


def concat_pairs(parts: Sequence[CorrectionPairs]) -> CorrectionPairs:
    """One pair set from several (frame indices of each part shifted past the previous ones)."""
    if len(parts) == 1:  # the default, one training set: no copy of its (large) arrays
        return parts[0]
    offsets = np.cumsum([0] + [len(p.images) for p in parts[:-1]])
    return CorrectionPairs(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.pairs + o for p, o in zip(parts, offsets, strict=True)]),
        np.concatenate([p.flows for p in parts]),
    )


def split_clips(
    config: CorrectionTrainConfig, open_set: Callable[[str], list[Clip]]
) -> tuple[list[list[Clip]], list[Clip]]:
    """(training clips by set, validation clips) of ``config``; ``open_set`` opens one set."""
    sets = [s.strip() for s in config.train_set.split(",") if s.strip()]
    if not sets:
        raise ValueError("no training set named")
    held = set(config.val_clips)
    if not held and config.val_set in sets:
        raise ValueError(
            f"set {config.val_set} is both a training and the validation set: "
            "name the clips to hold out for validation (val_clips)"
        )
    opened = [open_set(s) for s in sets]
    train = [[c for c in clips if c.clip_id not in held] for clips in opened]
    if not held:
        return train, open_set(config.val_set)
    val = [c for clips in opened for c in clips if c.clip_id in held]
    missing = held - {c.clip_id for c in val}
    if missing:
        raise ValueError(f"validation clips not in set(s) {config.train_set}: {', '.join(sorted(missing))}")
    return train, val


def batch_inputs(
    data: CorrectionPairs, idx: np.ndarray, flip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(current, key, flow, warped key scores, label) of pairs ``idx``, mirrored where ``flip``."""
    key_i, cur_i = data.pairs[idx, 0], data.pairs[idx, 1]
    current = torch.from_numpy(data.images[cur_i]).permute(0, 3, 1, 2).float() / 255
    key = torch.from_numpy(data.images[key_i]).permute(0, 3, 1, 2).float() / 255
    flow = torch.from_numpy(data.flows[idx].astype(np.float32))
    scores = torch.from_numpy(data.scores[key_i])
    label = torch.from_numpy(data.labels[cur_i]).long()
    if flip is not None and bool(flip.any()):
        f4 = flip.view(-1, 1, 1, 1)
        current = torch.where(f4, current.flip(-1), current)
        key = torch.where(f4, key.flip(-1), key)
        scores = torch.where(f4, scores.flip(-1), scores)
        mirrored = flow.flip(-1) * torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
        flow = torch.where(f4, mirrored, flow)
        label = torch.where(flip.view(-1, 1, 1), label.flip(-1), label)
    return current, key, flow, warp(scores, flow), label


def random_affine(batch: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """(B, 2, 3) ``theta`` of :func:`torch.nn.functional.affine_grid` (output -> input, normalised
    coordinates): rotation up to 10°, scale 0.9-1.15, aspect up to ±12 %, shift up to 6 % of the
    crop, each times ``strength``."""

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator)

    angle = torch.deg2rad(uniform(-10, 10) * strength)
    scale = 1 + uniform(-0.1, 0.15) * strength
    aspect = 1 + uniform(-0.12, 0.12) * strength
    sx, sy = 1 / (scale * aspect.sqrt()), aspect.sqrt() / scale  # input units per output unit
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    theta[:, :, 2] = 0.12 * strength * (torch.rand(batch, 2, generator=generator) - 0.5)
    return theta


def affine_pair(
    theta: torch.Tensor,
    current: torch.Tensor,
    key: torch.Tensor,
    flow: torch.Tensor,
    warped: torch.Tensor,
    label: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pair seen through the same affine map ``x = A y`` (``theta``) in both frames.

    The new frames are the old ones sampled at ``A y``; the flow becomes ``M^-1 flow(A y)``
    (``M`` the linear part: both crops and grids are square, so grid-pixel units carry over),
    which makes the warped key scores simply the old ones sampled at ``A y`` too."""

    def sample(x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)

    inverse = torch.linalg.inv(theta[:, :, :2])
    moved = torch.einsum("bij,bjhw->bihw", inverse, sample(flow))
    label = sample(label[:, None].float(), "nearest")[:, 0].round().long()
    return sample(current), sample(key), moved, sample(warped), label


def dice_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the classes (batch-pooled)."""
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(label, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


def _upsampled(scores: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(scores.float(), size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def validate(model: WarpCorrector, data: CorrectionPairs, *, batch: int = 64) -> dict[str, Any]:
    """mIoU of the warped and the corrected scores over every pair of ``data`` (labels' grid)."""
    model.eval()
    side = data.labels.shape[-1]
    warped_c = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    fixed_c = np.zeros_like(warped_c)
    for start in range(0, len(data), batch):
        idx = np.arange(start, min(start + batch, len(data)))
        current, key, flow, scores, label = batch_inputs(data, idx)
        corrected = model(current, key, flow, scores)
        for conf, out in ((warped_c, scores), (fixed_c, corrected)):
            pred = _upsampled(out, side).argmax(dim=1)
            for b in range(len(idx)):
                conf += confusions(pred[b : b + 1], label[b])[0]
    return {
        "val_miou_warped": float(miou(warped_c)),
        "val_miou_corrected": float(miou(fixed_c)),
        "val_class_iou_warped": [round(float(v), 4) for v in per_class_iou(warped_c)],
        "val_class_iou_corrected": [round(float(v), 4) for v in per_class_iou(fixed_c)],
    }


def train_correction(
    config: CorrectionTrainConfig,
    train: CorrectionPairs,
    val: CorrectionPairs | None,
    out: Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    card: dict[str, Any] | None = None,
) -> Path:
    """Train the corrector on ``train`` (validating on ``val``); writes ``out/correction.safetensors``."""
    open_run(out, config, fresh=fresh)
    seed_everything(config.seed)
    grid = train.scores.shape[-1]
    model = WarpCorrector(config.model(grid, training=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    step, extra, elapsed = resume(out, {"model": model, "optimizer": optimizer}, generator)
    if step == 0 and val is not None:
        append_log(out, {"step": 0, **validate(model, val)})
    side = train.labels.shape[-1]
    bar = tqdm(total=config.steps, initial=step, desc="train corrector", disable=not progress, unit="step")
    while step < config.steps:
        t0 = time.perf_counter()
        model.train()
        idx = torch.randint(len(train), (config.batch,), generator=generator).numpy()
        flip = torch.rand(config.batch, generator=generator) < 0.5
        current, key, flow, scores, label = batch_inputs(train, idx, flip)
        if config.affine > 0:
            theta = random_affine(config.batch, config.affine, generator)
            current, key, flow, scores, label = affine_pair(theta, current, key, flow, scores, label)
        gain = 0.75 + 0.5 * torch.rand(config.batch, 1, 1, 1, generator=generator)
        bias = 0.1 * (torch.rand(config.batch, 1, 1, 1, generator=generator) - 0.5)
        current = (current * gain + bias).clamp(0, 1)
        key = (key * gain + bias).clamp(0, 1)
        lr = cosine_lr(step, config.steps, config.lr, config.warmup)
        set_lr(optimizer, lr)
        with autocast(config.bf16):
            corrected = model(current, key, flow, scores)
        logits = _upsampled(corrected, side)
        ce = F.cross_entropy(logits, label)
        loss = ce + config.dice_weight * dice_loss(logits, label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - t0
        record: dict[str, Any] = {"step": step, "loss": float(loss.detach()), "ce": float(ce.detach())}
        record["lr"] = lr
        if val is not None and (step % config.val_every == 0 or step == config.steps):
            record.update(validate(model, val))
        record["elapsed_s"] = round(elapsed, 1)
        append_log(out, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint(
                out,
                step,
                {"model": model, "optimizer": optimizer},
                {"generator": generator.get_state(), "elapsed": elapsed},
            )
    bar.close()
    log = read_log(out)
    last_val: dict[str, Any] = next((r for r in reversed(log) if "val_miou_corrected" in r), {})
    if model.config != config.model(grid):  # saved with the run-time guard: the card measures that
        model.config = config.model(grid)
        if val is not None:
            last_val = validate(model, val)
    info = {
        "trained": True,
        "network": "warp corrector: residual class scores for warped non-key frames (not in the paper)",
        "train": dataclasses.asdict(config),
        "pairs": len(train),
        "val_pairs": len(val) if val is not None else 0,
        "steps": step,
        "train_minutes": round(elapsed / 60, 1),
        "parameters": parameter_count(model),
        **{k: v for k, v in last_val.items() if k.startswith("val_")},
        **(card or {}),
    }
    path = save_network(model, out / FILES["correction"], info)
    plot_correction_training(out)
    return path


def plot_correction_training(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(out)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    plot_running_mean(ax[0], [r for r in log if "loss" in r], "loss")
    ax[0].set(xlabel="step", title="training loss (CE + Dice), 20-step mean")
    val = [r for r in log if "val_miou_corrected" in r]
    if val:
        steps = [r["step"] for r in val]
        ax[1].plot(steps, [100 * r["val_miou_warped"] for r in val], "o--", label="warped (no corrector)")
        ax[1].plot(steps, [100 * r["val_miou_corrected"] for r in val], "o-", label="corrected")
        ax[1].legend()
    ax[1].set(xlabel="step", ylabel="mIoU %", title="validation pairs (gaps 1-max_gap)")
    for axis in ax:
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
