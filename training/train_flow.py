"""Training F (FlowNet2-s) from scratch: DIS distillation, then Deep Feature Flow fine-tuning.

Pairs come from set A: a key frame k and a current frame i = k + g (g uniform in 1..30, as the
paper), both cut with the key's crop box exactly as the engine does (256 crop, area-resized to F's
input). Stage ``distil`` regresses OpenCV DIS flow (medium preset, computed on the 256 crops) with
the end-point error; stage ``dff`` freezes N and trains F (flow and scale) so that N's key scores,
warped to the current frame, match the current frame's teacher labels (cross-entropy), keeping a
small end-point term towards DIS so that the flow stays a flow.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from facestream.engines.dis_flow import create_dis
from facestream.engines.dis_flow import dis_flow as engine_dis_flow
from facestream.engines.face import crop_square
from facestream.engines.weights import FILES, save_network
from facestream.models import DeepLabV3Plus, FlowNet2S, warp
from facestream.models.config import FlowConfig
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

STAGES = ("distil", "dff")


@dataclass(frozen=True)
class FlowTrainConfig:
    manifest: str = "default"
    train_set: str = "A"
    teacher: str = "mediapipe"
    crop_size: int = 256  # N's input: the crop both frames are cut to first
    input_size: int = 128
    warp_size: int = 64
    scale_channels: int = 5
    max_gap: int = 30
    pairs_per_frame: float = 1.0
    distil_steps: int = 800
    dff_steps: int = 300
    dff_pairs: int = 1500  # N_feat is run once on this many key crops for the DFF stage
    batch: int = 16
    lr: float = 1e-3
    dff_lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup: int = 50
    epe_weight: float = 0.05  # DFF stage: end-point error towards DIS, next to the segmentation loss
    bf16: bool = True
    seed: int = 0
    checkpoint_every: int = 50

    @property
    def model(self) -> FlowConfig:
        return FlowConfig(
            input_size=self.input_size, warp_size=self.warp_size, scale_channels=self.scale_channels
        )


@dataclass
class PairSet:
    """Key/current pairs: F inputs, DIS targets, and what the DFF stage needs."""

    current: np.ndarray  # (P, Sf, Sf, 3) uint8
    key: np.ndarray  # (P, Sf, Sf, 3) uint8
    dis: np.ndarray  # (P, 2, h, w) float16, DIS flow current -> key in warp-grid pixels
    key_crop: np.ndarray  # (P, S, S, 3) uint8 at N's input size
    label: np.ndarray  # (P, S, S) uint8 teacher label of the current frame in the key's crop
    gap: np.ndarray  # (P,) int

    def __len__(self) -> int:
        return len(self.gap)

    def subset(self, index: np.ndarray) -> PairSet:
        return PairSet(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})


_DIS: list[cv2.DISOpticalFlow] = []


def dis_flow(current: np.ndarray, key: np.ndarray, size: int) -> np.ndarray:
    """DIS (medium) flow from ``current`` to ``key`` (RGB crops), as (2, size, size) grid pixels:
    the engine's ``--flow dis`` computation, run on the crops F's targets are made from."""
    if not _DIS:
        _DIS.append(create_dis())
    grey = [cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in (current, key)]
    return engine_dis_flow(_DIS[0], grey[0], grey[1], size)


def make_pairs(
    clips: Sequence[Clip], config: FlowTrainConfig, *, seed: int = 0, progress: bool = True
) -> PairSet:
    """Random (key, current) pairs over the clips' labelled frames, gaps 1..max_gap."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("current", "key", "dis", "key_crop", "label", "gap")}
    s, sf = config.crop_size, config.input_size
    for clip in clips:
        labelled = set(clip.labelled)
        window: deque[tuple[int, np.ndarray]] = deque(maxlen=config.max_gap)
        for i, rgb in enumerate(
            tqdm(clip.frames(), desc=f"pairs {clip.clip_id}", disable=not progress, leave=False)
        ):
            if i in labelled:
                count = rng.poisson(config.pairs_per_frame)
                candidates = [(k, im) for k, im in window if k in labelled]
                for _ in range(count if candidates else 0):
                    k, key_rgb = candidates[rng.integers(len(candidates))]
                    box = clip.box(k)
                    assert box is not None
                    key_crop = crop_square(key_rgb, box, s)
                    cur_crop = crop_square(rgb, box, s)
                    out["current"].append(cv2.resize(cur_crop, (sf, sf), interpolation=cv2.INTER_AREA))
                    out["key"].append(cv2.resize(key_crop, (sf, sf), interpolation=cv2.INTER_AREA))
                    out["dis"].append(dis_flow(cur_crop, key_crop, config.warp_size).astype(np.float16))
                    out["key_crop"].append(key_crop)
                    out["label"].append(crop_square(clip.label(i), box, s, nearest=True))
                    out["gap"].append(np.array(i - k))
            window.append((i, rgb))
    if not out["gap"]:
        raise ValueError("no frame pairs: the clips have too few labelled frames")
    return PairSet(**{k: np.stack(v) for k, v in out.items()})


def _inputs(pairs: PairSet, idx: np.ndarray, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cur = torch.from_numpy(pairs.current[idx]).permute(0, 3, 1, 2).float() / 255
    key = torch.from_numpy(pairs.key[idx]).permute(0, 3, 1, 2).float() / 255
    x = torch.cat((cur, key), dim=1)
    target = torch.from_numpy(pairs.dis[idx].astype(np.float32))
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    flipped = target.flip(-1) * torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
    target = torch.where(flip.view(-1, 1, 1, 1), flipped, target)
    return x, target


def _photometric(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The same brightness/contrast change on both frames of each pair."""
    n = x.shape[0]
    gain = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    bias = 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    return (x * gain + bias).clamp(0, 1)


def end_point_error(flow: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (flow.float() - target).pow(2).sum(dim=1).add(1e-6).sqrt().mean()


@torch.no_grad()
def key_features(
    model: DeepLabV3Plus, crops: np.ndarray, *, batch: int = 16, progress: bool = True
) -> np.ndarray:
    """N_feat of every key crop, (P, C, S/4, S/4) float16 (N frozen, computed once)."""
    model.eval()
    out = []
    for start in tqdm(range(0, len(crops), batch), desc="N_feat of keys", disable=not progress, leave=False):
        x = torch.from_numpy(crops[start : start + batch]).permute(0, 3, 1, 2).float() / 255
        with autocast(True):
            out.append(model.features(x).float().numpy().astype(np.float16))
    return np.concatenate(out)


def train_flow(
    config: FlowTrainConfig,
    clips: Sequence[Clip],
    segmentation: DeepLabV3Plus | None,
    out: Path,
    *,
    fresh: bool = False,
    progress: bool = True,
    card: dict[str, Any] | None = None,
) -> Path:
    """Both stages (the DFF stage needs ``segmentation``); writes ``out/flow.safetensors``."""
    open_run(out, config, fresh=fresh)
    seed_everything(config.seed)
    pairs = make_pairs(clips, config, seed=config.seed, progress=progress)
    model = FlowNet2S(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    step, extra, elapsed = resume(out, {"model": model, "optimizer": optimizer}, generator)
    total = config.distil_steps + (config.dff_steps if segmentation is not None else 0)
    features = None
    bar = tqdm(total=total, initial=step, desc="train F", disable=not progress, unit="step")
    while step < total:
        dff = step >= config.distil_steps
        if dff and features is None:
            assert segmentation is not None
            subset = np.random.default_rng(config.seed).permutation(len(pairs))[: config.dff_pairs]
            pairs = pairs.subset(np.sort(subset))
            features = torch.from_numpy(key_features(segmentation, pairs.key_crop, progress=progress))
        t0 = time.perf_counter()
        model.train()
        idx = torch.randint(len(pairs), (config.batch,), generator=generator).numpy()
        flip = torch.rand(config.batch, generator=generator) < 0.5
        x, target = _inputs(pairs, idx, flip)
        x = _photometric(x, generator)
        if dff:
            lr = cosine_lr(step - config.distil_steps, config.dff_steps, config.dff_lr, config.warmup)
        else:
            lr = cosine_lr(step, config.distil_steps, config.lr, config.warmup)
        set_lr(optimizer, lr)
        with autocast(config.bf16):
            result = model(x)
        epe = end_point_error(result.flow, target)
        record: dict[str, Any] = {
            "step": step + 1,
            "stage": "dff" if dff else "distil",
            "epe": float(epe.detach()),
            "lr": lr,
        }
        loss = epe
        if dff:
            assert features is not None
            key = features[idx].float()
            key = torch.where(flip.view(-1, 1, 1, 1), key.flip(-1), key)
            label = torch.from_numpy(pairs.label[idx]).long()
            label = torch.where(flip.view(-1, 1, 1), label.flip(-1), label)
            warped = warp(key, result.flow.float(), result.scale.float())
            logits = F.interpolate(warped, size=label.shape[-2:], mode="bilinear", align_corners=False)
            seg = F.cross_entropy(logits, label)
            loss = seg + config.epe_weight * epe
            record["seg_loss"] = float(seg.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        elapsed += time.perf_counter() - t0
        record["elapsed_s"] = round(elapsed, 1)
        append_log(out, record)
        bar.update(1)
        bar.set_postfix(
            stage=record["stage"], epe=f"{float(epe.detach()):.3f}", loss=f"{float(loss.detach()):.3f}"
        )
        if step % config.checkpoint_every == 0 or step == total:
            save_checkpoint(
                out,
                step,
                {"model": model, "optimizer": optimizer},
                {"generator": generator.get_state(), "elapsed": elapsed},
            )
    bar.close()
    info = {
        "trained": True,
        "network": "F: FlowNet2-s (FlowNetS, channels x3/8) with DFF scale field",
        "train": dataclasses.asdict(config),
        "stages": ["distil"] + (["dff"] if segmentation is not None else []),
        "pairs": len(pairs),  # in the last stage
        "steps": step,
        "train_minutes": round(elapsed / 60, 1),
        "parameters": parameter_count(model),
        "final_epe_vs_dis": round(float(np.mean([r["epe"] for r in read_log(out)[-50:]])), 3),
        **(card or {}),
    }
    path = save_network(model, out / FILES["flow"], info)
    plot_flow_training(out)
    return path


def plot_running_mean(axis: Any, rows: list[dict[str, Any]], key: str, window: int = 20) -> None:
    """``key`` of the log ``rows`` against their step, as a ``window``-step running mean."""
    if not rows:
        return
    values = np.array([r[key] for r in rows])
    if len(values) >= window:
        values = np.convolve(values, np.ones(window) / window, mode="valid")
    axis.plot(np.arange(len(values)) + rows[0]["step"], values, lw=1)


def plot_flow_training(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(out)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for stage, axis, key, title in (
        ("distil", ax[0], "epe", "end-point error vs DIS (warp-grid px)"),
        ("dff", ax[1], "seg_loss", "DFF: CE of warped key scores vs labels"),
    ):
        plot_running_mean(axis, [r for r in log if r.get("stage") == stage and key in r], key)
        axis.set(xlabel="step", title=title)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
