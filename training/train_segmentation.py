"""Training N (DeepLab-V3+) from scratch on teacher labels of set A.

Frames are cut once into context squares around the label's 1.3x crop box (``context`` x its
side) and kept in memory as uint8; every batch is then augmented on the fly in torch (scale,
shift, rotation, horizontal flip, colour, blur, noise) and resampled to the network's input, so
that the crops the network sees vary the way the engine's face tracker crops do at run time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from facestream.engines.face import Box, crop_square
from facestream.engines.weights import FILES, save_network
from facestream.models import DeepLabV3Plus
from facestream.models.config import SegmentationConfig
from facestream.training.evaluation import miou, per_class_iou
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

NUM_CLASSES = 5
CLASS_NAMES = ("background", "skin", "eyes", "outer mouth", "inner mouth")


@dataclass(frozen=True)
class SegTrainConfig:
    manifest: str = "default"
    train_set: str = "A"
    val_set: str = "B"
    teacher: str = "mediapipe"
    backbone: str = "mobilenet_v2"
    input_size: int = 256
    steps: int = 2200
    batch: int = 16
    lr: float = 1.5e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    dice_weight: float = 1.0
    context: float = 1.25  # stored square side over the 1.3x crop box side
    scale: tuple[float, float] = (0.82, 1.2)  # sampled crop side over the crop box side
    shift: float = 0.08  # crop centre offset, fraction of the crop side
    rotation: float = 15.0  # degrees
    bf16: bool = True
    seed: int = 0
    val_every: int = 200
    val_stride: int = 3  # validate on every n-th labelled frame of the validation set
    checkpoint_every: int = 50

    @property
    def model(self) -> SegmentationConfig:
        return SegmentationConfig(backbone=self.backbone, input_size=self.input_size)


@dataclass
class CropSet:
    """Uint8 context crops (N, S, S, 3) and labels (N, S, S) with the clip each came from."""

    images: np.ndarray
    labels: np.ndarray
    clips: list[str]

    def __len__(self) -> int:
        return len(self.images)


def cut_crops(
    clips: Sequence[Clip], size: int, context: float, *, stride: int = 1, progress: bool = True
) -> CropSet:
    """Square crops of side ``context`` x the crop box around every ``stride``-th labelled frame."""
    images, labels, names = [], [], []
    for clip in clips:
        wanted = set(clip.labelled[::stride])
        frames = clip.frames()
        for i, rgb in enumerate(
            tqdm(frames, desc=f"crops {clip.clip_id}", disable=not progress, leave=False)
        ):
            box = clip.box(i)
            if i not in wanted or box is None:
                continue
            square = _grow(box, context)
            images.append(crop_square(rgb, square, size))
            labels.append(crop_square(clip.label(i), square, size, nearest=True))
            names.append(clip.clip_id)
    if not images:
        raise ValueError("no labelled face frames in these clips")
    return CropSet(np.stack(images), np.stack(labels), names)


def _grow(box: Box, factor: float) -> Box:
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    half = box.width * factor / 2
    return Box(cx - half, cy - half, cx + half, cy + half)


class Augmenter:
    """Random crops and photometric changes of a batch of context crops, all in torch."""

    def __init__(self, config: SegTrainConfig, generator: torch.Generator) -> None:
        self.config, self.g = config, generator

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.g)

    def geometry(self, n: int) -> torch.Tensor:
        """affine_grid thetas: output crop -> context square (normalised coordinates)."""
        c = self.config
        side = self._uniform(n, *c.scale) / c.context
        angle = self._uniform(n, -c.rotation, c.rotation) * math.pi / 180
        flip = torch.where(torch.rand(n, generator=self.g) < 0.5, -1.0, 1.0)
        tx, ty = (self._uniform(n, -c.shift, c.shift) * 2 / c.context for _ in range(2))
        cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * flip, -sin, tx
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * flip, cos, ty
        return theta

    def colour(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        u = self._uniform
        grey = images.mean(dim=1, keepdim=True)
        images = grey + (images - grey) * u(n, 0.6, 1.4).view(n, 1, 1, 1)  # saturation
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = mean + (images - mean) * u(n, 0.7, 1.3).view(n, 1, 1, 1)  # contrast
        images = images * u(n, 0.65, 1.35).view(n, 1, 1, 1)  # brightness
        images = images * (1 + 0.08 * (torch.rand(n, 3, 1, 1, generator=self.g) * 2 - 1))  # white balance
        images = images.clamp(0, 1) ** u(n, 0.75, 1.33).view(n, 1, 1, 1)  # gamma
        blur = torch.rand(n, generator=self.g) < 0.3
        if blur.any():
            images[blur] = gaussian_blur(images[blur], float(u(1, 0.6, 1.8)))
        noisy = (torch.rand(n, generator=self.g) < 0.3).view(n, 1, 1, 1)
        noise = torch.randn(images.shape, generator=self.g) * 0.03
        return (images + noise * noisy).clamp(0, 1)

    def __call__(
        self, images: np.ndarray, labels: np.ndarray, size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(labels).float()[:, None]
        grid = F.affine_grid(self.geometry(len(x)), [len(x), 3, size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return self.colour(x), y[:, 0].long()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(2.5 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=c)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="replicate"), vertical, groups=c)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """Cross-entropy plus soft dice (mean over classes present in the batch or predicted)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    if dice_weight <= 0:
        return ce
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    dice = 1 - (2 * inter + 1) / (total + 1)
    return ce + dice_weight * dice.mean()


@torch.no_grad()
def predict_masks(
    model: DeepLabV3Plus, images: np.ndarray, *, batch: int = 16, bf16: bool = True
) -> np.ndarray:
    """(N, S, S, 3) uint8 crops at the model's input size -> (N, S, S) uint8 class ids."""
    model.eval()
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2).float() / 255
        with autocast(bf16):
            scores = model(x)
        out.append(scores.float().max(dim=1).indices.to(torch.uint8).numpy())
    return np.concatenate(out)


def confusion(pred: np.ndarray, label: np.ndarray, classes: int = NUM_CLASSES) -> np.ndarray:
    index = label.astype(np.int64).ravel() * classes + pred.astype(np.int64).ravel()
    return np.bincount(index, minlength=classes * classes).reshape(classes, classes)


def score_crops(model: DeepLabV3Plus, crops: CropSet, *, bf16: bool = True) -> dict[str, Any]:
    """mIoU over all frames, per class and per clip, of ``model`` on exact crop-box crops."""
    pred = predict_masks(model, crops.images, bf16=bf16)
    names = np.array(crops.clips)
    per_clip = {}
    total = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for clip in dict.fromkeys(crops.clips):
        sel = names == clip
        conf = confusion(pred[sel], crops.labels[sel])
        per_clip[clip] = float(miou(conf))
        total += conf
    return {
        "miou": float(miou(total)),
        "per_class": dict(zip(CLASS_NAMES, map(float, per_class_iou(total)), strict=True)),
        "per_clip": per_clip,
        "frames": len(crops),
    }


def exact_crops(clips: Sequence[Clip], size: int, *, stride: int = 1, progress: bool = True) -> CropSet:
    """The engine's view: the 1.3x crop box itself at the network's input size."""
    return cut_crops(clips, size, 1.0, stride=stride, progress=progress)


def train_segmentation(
    config: SegTrainConfig,
    train_clips: Sequence[Clip],
    val_clips: Sequence[Clip],
    out: Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    card: dict[str, Any] | None = None,
) -> Path:
    """Train (or resume training) N; writes ``out/segmentation.safetensors`` and the curve PNG."""
    open_run(out, config, fresh=fresh)
    seed_everything(config.seed)
    size = config.input_size
    context_size = int(round(size * config.context / 16)) * 16
    train = cut_crops(train_clips, context_size, config.context, progress=progress)
    val = exact_crops(val_clips, size, stride=config.val_stride, progress=progress)
    model = DeepLabV3Plus(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    step, extra, elapsed = resume(out, {"model": model, "optimizer": optimizer}, generator)
    augment = Augmenter(config, generator)
    best = float(extra.get("best", -1.0))
    bar = tqdm(total=config.steps, initial=step, desc="train N", disable=not progress, unit="step")
    running: list[float] = []
    while step < config.steps:
        t0 = time.perf_counter()
        model.train()
        idx = torch.randint(len(train), (config.batch,), generator=generator).numpy()
        x, y = augment(train.images[idx], train.labels[idx], size)
        lr = cosine_lr(step, config.steps, config.lr, config.warmup)
        set_lr(optimizer, lr)
        with autocast(config.bf16):
            logits = model(x)
        loss = segmentation_loss(logits, y, config.dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - t0
        running.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(running[-20:]):.3f}", lr=f"{lr:.1e}")
        record: dict[str, Any] = {
            "step": step,
            "loss": float(loss.detach()),
            "lr": lr,
            "elapsed_s": round(elapsed, 1),
        }
        if step % config.val_every == 0 or step == config.steps:
            scores = score_crops(model, val, bf16=config.bf16)
            record["val_miou"] = scores["miou"]
            record["val_per_class"] = scores["per_class"]
            bar.write(f"step {step}: {config.val_set} mIoU {scores['miou']:.4f} ({elapsed / 60:.1f} min)")
            if scores["miou"] > best:
                best = scores["miou"]
                _export(model, out / "best.safetensors", config, step, elapsed, scores, card)
        append_log(out, record)
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint(
                out,
                step,
                {"model": model, "optimizer": optimizer},
                {"generator": generator.get_state(), "elapsed": elapsed, "best": best},
            )
    bar.close()
    final = score_crops(model, val, bf16=config.bf16)
    path = _export(model, out / FILES["segmentation"], config, step, elapsed, final, card)
    plot_training(out)
    return path


def _export(
    model: DeepLabV3Plus,
    path: Path,
    config: SegTrainConfig,
    step: int,
    elapsed: float,
    scores: dict[str, Any],
    card: dict[str, Any] | None,
) -> Path:
    info = {
        "trained": True,
        "network": "N: DeepLab-V3+ " + config.backbone,
        "train": dataclasses.asdict(config),
        "steps": step,
        "train_minutes": round(elapsed / 60, 1),
        "parameters": parameter_count(model),
        f"miou_{config.val_set}": round(scores["miou"], 4),
        **(card or {}),
    }
    return save_network(model, path, info)


def plot_training(out: Path) -> Path:
    """Loss and validation mIoU against training minutes -> ``out/training.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(out)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    minutes = [r["elapsed_s"] / 60 for r in log]
    loss = np.array([r["loss"] for r in log])
    if len(loss) >= 20:
        loss = np.convolve(loss, np.ones(20) / 20, mode="same")
    ax1.plot(minutes, loss, lw=1)
    ax1.set(xlabel="training minutes", ylabel="loss (CE + dice, smoothed)", title="training loss")
    val = [(r["elapsed_s"] / 60, r["val_miou"]) for r in log if "val_miou" in r]
    if val:
        ax2.plot(*zip(*val, strict=True), marker="o")
    ax2.set(xlabel="training minutes", ylabel="mIoU", title="validation mIoU (per frame)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
