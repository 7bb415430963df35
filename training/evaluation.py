"""`facestream evaluate`: every key scheduler on a test set, measured as in §4 of the paper.

How it works, and why it is fast enough for a full sweep on two cores:

1. **Pair table** (per clip, cached on disk): for every scored frame ``i`` and every gap
   ``g = 0 .. G`` to an earlier scored frame ``k = i - g`` of the same episode, the confusion
   matrix of frame ``i``'s result when ``k`` is its key (``g = 0``: N on frame ``i`` itself;
   ``g > 0``: ``k``'s scores warped by F's flow and scale, then through the warp corrector when
   the weights have one and ``EvalConfig.correct``: exactly the pipeline's non-key path),
   plus what schedulers look at for that pair: F's Conv6 features and the mean flow magnitude.
   The face crop of a key is the teacher's 1.3x square of that key frame (the paper crops faces
   by their landmarks); its non-key frames are cut from that square moved with the face by the
   pipeline's own rule (``track_box``, one tracked square per key and gap), or held (``track=False``).
2. **Replay**: each scheduler setting walks the episodes frame by frame with the engine's own
   scheduler classes; their questions (flow magnitude, DVSNet score, policy probability) are
   answered from the table. A walk that would exceed the gap limit ``G`` gets a forced key
   (counted in ``forced_keys``).
3. **Oracle**: the DP of :mod:`facestream.training.oracle` on the per-frame mIoU table gives,
   for every key count, the placement with the best mean per-frame mIoU -- the upper bound that
   grades every scheduler at equal AKI.

mIoU: per-class IoU from one confusion matrix accumulated over all scored frames, averaged over
the 5 classes (``miou``); per-frame mIoU averages the classes present in the frame's label or
result (``frame_miou`` is its mean). Scoring happens on the label's own face crop of each frame at
``eval_size``². Every episode (a run of consecutive frames with a face) starts with a key.

FPS is modelled from stage latencies measured on this machine with the same backend (one frame
at a time): key = N_feat + N_task, non-key = F + warp + N_task, plus F and the decision network
on every decision of schedulers that look at the flow. Decoding, face detection and drawing are
left out (``facestream bench`` measures the whole pipeline).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from facestream.engines.bench import time_ms
from facestream.engines.cues import RELATIVE_CUES, RESIDUAL_CUES, cue_vector, key_maps, warp_residuals
from facestream.engines.face import Box, crop_square, track_box
from facestream.engines.networks import FlowResult, Networks
from facestream.engines.pipeline import flow_image, resized_chw, to_chw
from facestream.engines.schedulers import (
    WINDOW,
    DecisionContext,
    DecisionHistory,
    Scheduler,
    mean_flow_magnitude,
)
from facestream.engines.weights import WeightSet, load_network, read_metadata
from facestream.models import KeyPolicy
from facestream.models.config import config_to_json
from facestream.training.manifest import Clip
from facestream.training.oracle import Oracle

NUM_CLASSES = 5
PAIR_NETWORKS = ("segmentation", "flow")  # what a pair table depends on (its cache key's weights)
CORRECTION = "correction"  # ... and the warp corrector, where it is used (pair_fingerprint)
# Bumped when the pair table gains or changes a column, so that older cached tables are rebuilt
# (2: the warp residuals).
TABLE_FORMAT = 2
SCHEDULER_NAMES = ("always", "fixed", "random", "flow", "dvsnet", "rl")
FIXED_GRID = (2, 3, 5, 10, 15, 20, 30, 45, 60, 90)
# the flow and DVSNet thresholds: dense in the tails, where the long-AKI settings lie (a grid
# reaching only the 2 % or 99 % quantile stopped short of AKI 60 on set C), and every gap halved
# (with 25 quantiles DVSNet's settings on set C jumped from AKI 13.5 to 33.0)
_QUANTILE_STEPS = (
    *(0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05),
    *(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    *(0.95, 0.97, 0.98, 0.985, 0.99, 0.995, 0.998, 0.999),
)
QUANTILES = tuple(sorted({*_QUANTILE_STEPS, *(round((a + b) / 2, 6) for a, b in pairwise(_QUANTILE_STEPS))}))
TAU_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


@dataclass(frozen=True)
class EvalConfig:
    """``max_gap``: the longest key-to-frame distance in the pair table (and the forced-key limit).
    ``eval_size``: side of the grid frames are scored on (default: N's input size).
    ``batch``: frame pairs per F call. ``track``: non-key crops follow the face as in the
    pipeline (False: the key's square is held). ``correct``: warped frames go through the warp
    corrector, as in the pipeline, when the networks have one."""

    max_gap: int = 90
    eval_size: int | None = None
    batch: int = 16
    window: int = WINDOW
    track: bool = True
    correct: bool = True

    def __post_init__(self) -> None:
        if self.max_gap < 1 or self.batch < 1:
            raise ValueError(f"max_gap and batch must be >= 1, got {self.max_gap}, {self.batch}")


# ----------------------------------------------------------------------------- metrics


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
    """(..., K, K) confusion (rows: label, columns: prediction) -> (..., K) IoU, NaN where a class
    is in neither label nor prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(axis=-1) + confusion.sum(axis=-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def miou(confusion: np.ndarray) -> np.ndarray | float:
    """Mean IoU over the classes present (label or prediction) of (..., K, K) confusions."""
    iou = per_class_iou(confusion)
    present = ~np.isnan(iou)
    total = np.where(present, iou, 0.0).sum(axis=-1)
    count = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return float(result) if np.ndim(result) == 0 else result


# ----------------------------------------------------------------------------- pair table

PAIR_COLUMNS = ("valid", "confusion", "magnitude", "conv6", "agreement", "residual")  # (T, G+1, ...)


@dataclass
class PairTable:
    """Per clip: everything the schedulers and the oracle need, indexed ``[frame i, gap g]``."""

    clip_id: str
    scored: np.ndarray  # (T,) bool: frames with a face and a label
    valid: np.ndarray  # (T, G+1) bool: pair computed (both frames scored, same episode)
    confusion: np.ndarray  # (T, G+1, K, K) int64
    magnitude: np.ndarray  # (T, G+1) float32, mean flow magnitude in N-input pixels
    conv6: np.ndarray  # (T, G+1, C6, s, s) float16
    agreement: np.ndarray  # (T, G+1) float32 pixel accuracy of the warped mask vs the frame's own key mask
    residual: np.ndarray  # (T, G+1, 2) float32 warp residuals (engines.cues.RESIDUAL_CUES), 0 at g = 0

    @property
    def frames(self) -> int:
        return len(self.scored)

    @property
    def max_gap(self) -> int:
        return self.valid.shape[1] - 1

    def episodes(self) -> list[tuple[int, int]]:
        """Maximal runs [start, stop) of consecutive scored frames."""
        runs, start = [], None
        for i, scored in enumerate([*self.scored.tolist(), False]):
            if scored and start is None:
                start = i
            elif not scored and start is not None:
                runs.append((start, i))
                start = None
        return runs

    def subsample(self, stride: int, offset: int = 0) -> PairTable:
        """The table of the clip played ``stride`` times faster (frames offset, offset+stride, ...):
        its gap g is this table's gap stride x g, so gaps go up to max_gap // stride. (The crops
        of the faster clip are the ones the pipeline tracked at the original frame rate.)"""
        if stride < 1 or not 0 <= offset < stride:
            raise ValueError(f"need stride >= 1 and 0 <= offset < stride, got {stride}, {offset}")
        frames = slice(offset, None, stride)
        gaps = slice(0, self.max_gap + 1, stride)
        return PairTable(
            f"{self.clip_id}@{stride}x{offset}" if stride > 1 else self.clip_id,
            self.scored[frames],
            *(getattr(self, name)[frames, gaps] for name in PAIR_COLUMNS),
        )

    def from_start(self, offset: int) -> PairTable:
        """The table of the clip watched from ``offset`` frames into each of its episodes (the
        frames before are not scored and no key may lie there): a scheduler's key grid starts
        there, so the tables of several offsets give every scheduler several starts, as
        :func:`training.sweep.fixed_phase_rows` gives fixed several key phases. Episodes no
        longer than ``offset`` drop out; the arrays are shared, not copied."""
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if offset == 0:
            return self
        scored = self.scored.copy()
        first = np.zeros(self.frames, dtype=np.int64)  # each frame's new episode start
        for start, stop in self.episodes():
            scored[start : min(start + offset, stop)] = False
            first[start:stop] = start + offset
        gaps = np.arange(self.max_gap + 1)
        valid = self.valid & (np.arange(self.frames)[:, None] - gaps[None, :] >= first[:, None])
        return PairTable(
            f"{self.clip_id}+{offset}",
            scored,
            valid,
            *(getattr(self, name) for name in PAIR_COLUMNS[1:]),
        )

    def frame_miou(self) -> np.ndarray:
        """(T, G+1) per-frame mIoU, -inf where the pair is missing."""
        values = np.asarray(miou(self.confusion), dtype=np.float64)
        return np.where(self.valid & ~np.isnan(values), values, -np.inf)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, clip_id=self.clip_id, **{k: v for k, v in asdict(self).items() if k != "clip_id"})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PairTable:
        with np.load(path) as data:
            return cls(str(data["clip_id"]), data["scored"], *(data[k] for k in PAIR_COLUMNS))

    def cues(self, names: Sequence[str]) -> np.ndarray:
        """(T, G+1, len(names)) the policy cues of every pair, in the order named (the
        pipeline's :func:`engines.cues.cue_vector` over every pair). The relative cues depend on
        the decisions before a frame, not on the pair alone, so they cannot be asked for here."""
        pairs = self.valid.size
        flat = cue_vector(tuple(names), self.magnitude.reshape(pairs), self.residual.reshape(pairs, -1))
        return flat.reshape(*self.valid.shape, len(names))


@dataclass
class _Key:
    box: Box
    features: np.ndarray  # (1, C, h, w)
    flow_image: np.ndarray  # (3, Sf, Sf)
    crop_box: Box  # where this key's next non-key frame is cropped (moved with the face)
    maps: np.ndarray  # (3, h, w) engines.cues.key_maps
    small: np.ndarray | None  # (3, I, I) the key crop at the warp corrector's input, if it runs


class PairBuilder:
    """Runs N, F, the warp and N_task over a clip's frame pairs (the pipeline's arithmetic)."""

    def __init__(self, networks: Networks, config: EvalConfig) -> None:
        self.networks, self.config = networks, config
        seg = networks.segmentation_config
        self.size = seg.input_size
        self.flow_size = networks.flow_input_size
        self.eval_size = config.eval_size or seg.input_size
        self.stride = seg.input_size / seg.feature_size
        self.correction = networks.correction_config if config.correct else None

    def key(self, rgb: np.ndarray, box: Box) -> tuple[_Key, np.ndarray]:
        """A key frame's cache entry and its (1, K, h, w) class scores."""
        crop = crop_square(rgb, box, self.size)
        features = self.networks.features(to_chw(crop)[None])
        scores = self.networks.task(features)
        image = flow_image(crop, self.flow_size)
        small = None if self.correction is None else resized_chw(image, self.correction.image_size)
        return _Key(box, features, image, box, key_maps(image, scores[0]), small), scores

    def warp(
        self, rgb: np.ndarray, keys: Sequence[_Key]
    ) -> tuple[np.ndarray, FlowResult, list[Box], np.ndarray]:
        """Class scores (B, K, h, w) of frame ``rgb`` warped from each key, over the squares the
        crops were cut from (returned), and the warp residuals (B, 2) (:mod:`engines.cues`); then
        each key's square moves on with the face."""
        boxes = [k.crop_box for k in keys]
        current = np.stack([flow_image(crop_square(rgb, b, self.size), self.flow_size) for b in boxes])
        key_images = np.stack([k.flow_image for k in keys])
        flow = self.networks.flow(np.concatenate((current, key_images), axis=1))
        features = np.concatenate([k.features for k in keys])
        scores = self.networks.task(self.networks.warp(features, flow.flow, flow.scale))
        if self.correction is not None:
            side = self.correction.image_size
            small = np.stack([resized_chw(c, side) for c in current])
            keys_small = np.stack([_small(k) for k in keys])
            scores = self.networks.correct(small, keys_small, flow.flow, scores)
        residual = warp_residuals(np.stack([k.maps for k in keys]), current, flow.flow)
        if self.config.track:
            for b, key in enumerate(keys):
                key.crop_box = track_box(boxes[b], key.box, flow.flow[b], scores[b])
        return scores, flow, boxes, residual

    def predictions(self, scores: np.ndarray, key_boxes: Sequence[Box], box: Box) -> torch.Tensor:
        """(B, R, R) class ids on frame box ``box``'s eval grid from scores over each key's box."""
        theta = torch.tensor([_affine(kb, box) for kb in key_boxes], dtype=torch.float32)
        size = (len(key_boxes), scores.shape[1], self.eval_size, self.eval_size)
        grid = F.affine_grid(theta, list(size), align_corners=False)
        sampled = F.grid_sample(
            torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)),
            grid,
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )
        pred = sampled.max(dim=1).indices  # 8x faster than argmax(dim=1) on CPU, same result
        pred[~(grid.abs() <= 1).all(dim=-1)] = 0  # outside the key's crop: background (as pasted)
        return pred

    def label_grid(self, label: np.ndarray, box: Box) -> torch.Tensor:
        return torch.from_numpy(crop_square(label, box, self.eval_size, nearest=True).astype(np.int64))


def _small(key: _Key) -> np.ndarray:
    """The key crop at the corrector's input; :meth:`PairBuilder.key` makes it whenever it runs."""
    if key.small is None:
        raise RuntimeError("key made without the warp corrector's crop")
    return key.small


def _affine(key_box: Box, box: Box) -> list[list[float]]:
    """affine_grid theta mapping ``box``'s normalised grid onto ``key_box``'s (align_corners=False)."""
    sx, sy = box.width / key_box.width, box.height / key_box.height
    tx = (box.width + 2 * (box.x0 - key_box.x0)) / key_box.width - 1
    ty = (box.height + 2 * (box.y0 - key_box.y0)) / key_box.height - 1
    return [[sx, 0.0, tx], [0.0, sy, ty]]


def confusions(pred: torch.Tensor, label: torch.Tensor, classes: int = NUM_CLASSES) -> np.ndarray:
    """(B, R, R) predictions vs one (R, R) label -> (B, K, K) int64 confusion matrices."""
    batch = pred.shape[0]
    index = label.flatten()[None, :] * classes + pred.flatten(1)
    index = index + torch.arange(batch)[:, None] * classes * classes
    counts = torch.bincount(index.flatten(), minlength=batch * classes * classes)
    return counts.view(batch, classes, classes).numpy().astype(np.int64)


def build_pair_table(
    clip: Clip, networks: Networks, config: EvalConfig, *, progress: bool = True
) -> PairTable:
    """The pair table of one clip (the expensive part of an evaluation)."""
    builder = PairBuilder(networks, config)
    frames = list(_scored_frames(clip))
    count = len(frames)
    gaps = config.max_gap + 1
    six = networks.flow_config
    table = PairTable(
        clip.clip_id,
        np.array([f[1] is not None for f in frames], dtype=bool),
        np.zeros((count, gaps), dtype=bool),
        np.zeros((count, gaps, NUM_CLASSES, NUM_CLASSES), dtype=np.int64),
        np.zeros((count, gaps), dtype=np.float32),
        np.zeros((count, gaps, six.conv6_channels, six.conv6_size, six.conv6_size), dtype=np.float16),
        np.zeros((count, gaps), dtype=np.float32),
        np.zeros((count, gaps, len(RESIDUAL_CUES)), dtype=np.float32),
    )
    window: OrderedDict[int, _Key] = OrderedDict()
    for i, (rgb, box, label) in enumerate(tqdm(frames, desc=f"pairs {clip.clip_id}", disable=not progress)):
        if box is None or label is None:
            window.clear()  # an unscored frame ends the episode
            continue
        _add_frame(table, builder, window, i, rgb, box, builder.label_grid(label, box))
        while window and next(iter(window)) <= i - config.max_gap:
            window.popitem(last=False)
    return table


def _scored_frames(clip: Clip) -> Iterator[tuple[np.ndarray, Box | None, np.ndarray | None]]:
    labelled = set(clip.labelled)
    for i, rgb in enumerate(clip.frames()):
        yield (rgb, clip.box(i), clip.label(i)) if i in labelled else (rgb, None, None)


def _add_frame(
    table: PairTable,
    builder: PairBuilder,
    window: OrderedDict[int, _Key],
    i: int,
    rgb: np.ndarray,
    box: Box,
    label: torch.Tensor,
) -> None:
    key, scores = builder.key(rgb, box)
    own = builder.predictions(scores, [box], box)
    table.confusion[i, 0] = confusions(own, label)[0]
    table.valid[i, 0] = True
    table.agreement[i, 0] = 1.0
    ks = list(window)
    for start in range(0, len(ks), builder.config.batch):
        chunk = ks[start : start + builder.config.batch]
        keys = [window[k] for k in chunk]
        scores, flow, boxes, residual = builder.warp(rgb, keys)
        gaps = [i - k for k in chunk]
        pred = builder.predictions(scores, boxes, box)
        table.confusion[i, gaps] = confusions(pred, label)
        table.agreement[i, gaps] = (pred == own).float().mean(dim=(1, 2)).numpy()
        table.valid[i, gaps] = True
        table.magnitude[i, gaps] = mean_flow_magnitude(flow.flow, builder.stride)
        table.conv6[i, gaps] = flow.conv6.astype(np.float16)
        table.residual[i, gaps] = residual
    window[i] = key


def clip_identity(clip: Clip) -> str:
    """What the cached table depends on from the clip: its labels' metadata (less where the video
    lies, so that a copy of the data elsewhere reuses it), or its frame list."""
    meta = getattr(clip, "meta", None)
    if meta is None:
        return f"{clip.clip_id}:{clip.labelled}"
    return json.dumps({k: v for k, v in meta.items() if k != "video"}, sort_keys=True)


def pair_fingerprint(weights: WeightSet, config: EvalConfig) -> str:
    """The cache key of the weights a pair table depends on: N and F, and the warp corrector
    when ``config.correct`` (and the weights have one)."""
    names = PAIR_NETWORKS + ((CORRECTION,) if config.correct else ())
    return weights.fingerprint(names)


def cached_pair_table(
    clip: Clip, networks: Networks, fingerprint: str, config: EvalConfig, cache: Path | None, progress: bool
) -> PairTable:
    """The pair table from ``cache`` when its inputs (labels, weights, config) are unchanged."""
    if cache is None:
        return build_pair_table(clip, networks, config, progress=progress)
    conv6 = getattr(networks, "conv6", True)  # DIS flow without F leaves Conv6 empty
    # `correct` is left out: whether the corrector ran is in the fingerprint (pair_fingerprint),
    # so tables made without one keep their names
    settings = {k: v for k, v in asdict(config).items() if k != "correct"}
    parts: list[Any] = [clip_identity(clip), fingerprint, settings, networks.backend, conv6, TABLE_FORMAT]
    if config.correct and networks.has_correction:  # its guard lives in the config, not the weights
        parts.append(config_to_json(networks.correction_config))
    key = json.dumps(parts)
    path = cache / f"{clip.clip_id}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        return PairTable.load(path)
    table = build_pair_table(clip, networks, config, progress=progress)
    table.save(path)
    return table


# ----------------------------------------------------------------------------- replay


class PolicyReplay:
    """A trained key policy answered from cached Conv6 features (and cues): the trunk runs once
    per pair, FC3 per decision (``pi(a1) = sigmoid(a + w_KAR * KAR + w_LKD * LKD/window +
    sum_r w_r * r)``, where ``a`` holds the trunk's and the per-pair cues' part and ``r`` runs
    over the relative cues, which depend on the decisions so far). For a seed ensemble
    (``PolicyConfig.members`` > 1), ``a`` and the weights are per member and pi(a1) is the mean
    of the members' sigmoids."""

    def __init__(self, path: Path, tables: Sequence[PairTable]) -> None:
        self.path = path
        policy = load_network(path)
        if not isinstance(policy, KeyPolicy):
            raise ValueError(f"{path} is not a key policy")
        card = json.loads(read_metadata(path).get("card", "{}"))
        self.eta: float | None = card.get("eta")
        self.cues = policy.config.cues
        self.members = policy.config.members
        members = range(self.members)
        self._w_expert = torch.stack([policy.expert_weights(m) for m in members]).double().numpy()
        self._relative = [n for n, c in enumerate(self.cues) if c in RELATIVE_CUES]
        self._w_relative = np.zeros((self.members, 0))
        if self._relative:  # FC3 sees (cue - mean) * scale, so a raw cue's weight is w * scale
            scale = policy.cue_scale.double().numpy()[self._relative]
            weights = torch.stack([policy.cue_weights(m) for m in members]).double().numpy()
            self._w_relative = weights[:, self._relative] * scale
        if self.members == 1:  # scalars per decision: the replay's inner loop
            self._w_expert, self._w_relative = self._w_expert[0], self._w_relative[0]
        self.base = once_per_source(tables, lambda t: self._base(policy, t))

    @torch.inference_mode()
    def _base(self, policy: KeyPolicy, table: PairTable) -> np.ndarray:
        """Key minus non-key logit of every valid pair at KAR = LKD = 0 and relative cues 0
        (T, G+1), or (T, G+1, members) for an ensemble."""
        base = np.zeros((*table.valid.shape, self.members), dtype=np.float64)
        index = np.nonzero(table.valid[:, 1:])
        conv6 = table.conv6[:, 1:][index]
        static = [n for n in range(len(self.cues)) if n not in self._relative]
        cues = np.zeros((len(conv6), len(self.cues)), np.float32)
        cues[:, static] = table.cues([self.cues[n] for n in static])[:, 1:][index]
        for start in range(0, len(conv6), 512):
            stop = start + 512
            trunk = policy.trunk(torch.from_numpy(conv6[start:stop].astype(np.float32)))
            expert = np.concatenate((np.zeros((len(trunk), 2), np.float32), cues[start:stop]), axis=1)
            logits = policy.member_logits(trunk, torch.from_numpy(expert)).double()
            rows = (index[0][start:stop], index[1][start:stop] + 1)
            base[rows] = (logits[..., 1] - logits[..., 0]).T.numpy()
        return base[..., 0] if self.members == 1 else base

    @property
    def takes_relative(self) -> bool:
        return bool(self._relative)

    def probability(self, clip_id: str, i: int, gap: int, expert: np.ndarray) -> float:
        """pi(a1) from the (1, 2 + len(cues)) expert row [KAR, LKD/window, *cues] (only the
        relative cues are read from the cue part: the others are in ``base``)."""
        logit = self.base[clip_id][i, gap] + self._w_expert @ expert[0, :2].astype(np.float64)
        if self._relative:
            logit = logit + self._w_relative @ expert[0, [2 + n for n in self._relative]].astype(np.float64)
        chance = np.exp(-np.logaddexp(0.0, -logit))  # sigmoid, without overflow
        return float(chance) if self.members == 1 else float(chance.mean())


@dataclass
class ReplayContext(DecisionContext):
    """A decision context answered from the pair table (no network runs during the replay)."""

    table: PairTable | None = None
    gap: int = 0
    policy: PolicyReplay | None = None
    dvsnet: np.ndarray | None = None

    def flow(self) -> FlowResult:
        raise RuntimeError("the evaluation replays cached pairs: flow fields are not kept")

    def flow_magnitude(self) -> float:
        assert self.table is not None
        return float(self.table.magnitude[self.index, self.gap])

    def dvsnet_score(self) -> float:
        if self.dvsnet is None:
            raise ValueError("the dvsnet scheduler needs dvsnet.safetensors in the weights folder")
        return float(self.dvsnet[self.index, self.gap])

    def key_probability(self) -> float:
        if self.policy is None or self.table is None:
            raise ValueError("the rl scheduler needs a policy (policy.safetensors or --policy)")
        expert = self.history.expert()
        if self.policy.takes_relative:
            expert = np.concatenate((expert, self.cues(self.policy.cues)), axis=1)
        return self.policy.probability(self.table.clip_id, self.index, self.gap, expert)


def _pair_residual(table: PairTable, i: int, gap: int) -> Callable[[], np.ndarray]:
    """The cached (1, 2) warp residuals of frame ``i`` to its key ``gap`` frames back."""
    return lambda: table.residual[i, gap][None]


def _no_flow() -> FlowResult:
    raise RuntimeError("the evaluation replays cached pairs: flow fields are not kept")


@dataclass
class Walk:
    """One scheduler setting over the whole set."""

    confusion: np.ndarray = field(default_factory=lambda: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64))
    frame_mious: list[float] = field(default_factory=list)
    keys: int = 0
    forced: int = 0
    decisions: int = 0  # decisions taken (frames after an episode's first)
    intervals: list[int] = field(default_factory=list)
    key_frames: dict[str, list[int]] = field(default_factory=dict)
    frame_miou_by_clip: dict[str, list[float | None]] = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return len(self.frame_mious)

    def score(self, table: PairTable, i: int, gap: int) -> None:
        confusion = table.confusion[i, gap]
        self.confusion += confusion
        value = miou(confusion)
        self.frame_mious.append(float(value))
        self.frame_miou_by_clip[table.clip_id][i] = float(value)

    def key(self, table: PairTable, i: int, last: int | None) -> None:
        self.keys += 1
        self.key_frames[table.clip_id].append(i)
        if last is not None:
            self.intervals.append(i - last)

    def start_clip(self, table: PairTable) -> None:
        self.key_frames[table.clip_id] = []
        self.frame_miou_by_clip[table.clip_id] = [None] * table.frames


def replay(
    scheduler: Scheduler,
    tables: Sequence[PairTable],
    networks: Networks,
    *,
    window: int = WINDOW,
    policy: PolicyReplay | None = None,
    dvsnet: dict[str, np.ndarray] | None = None,
) -> Walk:
    """Run ``scheduler`` over every episode of ``tables`` (each episode starts with a key)."""
    walk = Walk()
    for table in tables:
        walk.start_clip(table)
        scores = None if dvsnet is None else dvsnet[table.clip_id]
        for start, stop in table.episodes():
            scheduler.reset()
            history = DecisionHistory(window)
            last = start
            walk.key(table, start, None)
            history.record(True)
            walk.score(table, start, 0)
            for i in range(start + 1, stop):
                gap = i - last
                walk.decisions += 1
                if gap > table.max_gap:
                    key, walk.forced = True, walk.forced + 1
                else:
                    ctx = ReplayContext(
                        i,
                        history,
                        networks,
                        _no_flow,
                        _pair_residual(table, i, gap),
                        table=table,
                        gap=gap,
                        policy=policy,
                        dvsnet=scores,
                    )
                    key = scheduler.decide(ctx).key
                    ctx.observe()
                if key:
                    walk.key(table, i, last)
                    last, gap = i, 0
                history.record(key)
                walk.score(table, i, gap)
    return walk


def oracle_walk(oracle: Oracle, tables: Sequence[PairTable], keys: int) -> Walk:
    """The oracle's placement with ``keys`` keys, scored like any other walk."""
    placement = oracle.placement(keys)
    walk, episode = Walk(), 0
    for table in tables:
        walk.start_clip(table)
        for start, stop in table.episodes():
            positions = {start + p for p in placement.keys[episode]}
            episode += 1
            last: int | None = None
            for i in range(start, stop):
                if i in positions:
                    walk.key(table, i, last)
                    last = i
                else:
                    walk.decisions += 1
                assert last is not None
                walk.score(table, i, i - last)
    return walk


# ----------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class StageCosts:
    """Median milliseconds per frame of each stage (batch 1, this machine, this backend)."""

    key: float  # N_feat + N_task
    flow: float
    warp: float  # warp + N_task (+ the warp corrector, where it runs)
    policy: float
    dvsnet: float

    def fps(self, scheduler: str, walk: Walk) -> float:
        decide = {"flow": 0.0, "dvsnet": self.dvsnet, "rl": self.policy}
        nonkeys = walk.frames - walk.keys
        total = walk.keys * self.key + nonkeys * (self.flow + self.warp)
        if scheduler in decide:
            keys_after_decision = walk.keys - (walk.frames - walk.decisions)
            total += keys_after_decision * self.flow + walk.decisions * decide[scheduler]
        return 1000.0 * walk.frames / total if total > 0 else 0.0


def measure_costs(networks: Networks, repeats: int = 15, *, correct: bool = False) -> StageCosts:
    """Median latency of each stage on random inputs of the right shapes; ``correct``: the
    non-key warp includes the warp corrector (when the networks have one)."""
    seg = networks.segmentation_config
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, seg.input_size, seg.input_size), dtype=np.float32)
    side = networks.flow_input_size
    pair = rng.random((1, 6, side, side), dtype=np.float32)
    features = networks.features(image)
    flow = networks.flow(pair)
    expert = np.zeros((1, networks.expert_size), dtype=np.float32)
    expert[0, :2] = (0.1, 0.5)

    def timed(fn: Callable[[], object]) -> float:
        return float(time_ms(fn, repeats)["median_ms"])

    correction = networks.correction_config if correct else None

    def warp() -> object:
        scores = networks.task(networks.warp(features, flow.flow, flow.scale))
        if correction is None:
            return scores
        crops = resized_chw(pair[0, :3], correction.image_size)[None]
        return networks.correct(crops, crops, flow.flow, scores)

    return StageCosts(
        key=timed(lambda: networks.task(networks.features(image))),
        flow=timed(lambda: networks.flow(pair)),
        warp=timed(warp),
        policy=timed(lambda: networks.key_probability(flow.conv6, expert)) if networks.has_policy else 0.0,
        dvsnet=timed(lambda: networks.dvsnet_score(flow.conv6)) if networks.has_dvsnet else 0.0,
    )


def dvsnet_scores(networks: Networks, tables: Sequence[PairTable]) -> dict[str, np.ndarray]:
    """DVSNet's predicted score for every computed pair, per clip."""

    def scores(table: PairTable) -> np.ndarray:
        values = np.ones(table.valid.shape, dtype=np.float32)
        index = np.nonzero(table.valid[:, 1:])
        conv6 = table.conv6[:, 1:][index].astype(np.float32)
        out = [networks.dvsnet_score(conv6[s : s + 256]) for s in range(0, len(conv6), 256)]
        values[index[0], index[1] + 1] = np.concatenate(out) if out else []
        return values

    return once_per_source(tables, scores)


def once_per_source(
    tables: Sequence[PairTable], compute: Callable[[PairTable], np.ndarray]
) -> dict[str, np.ndarray]:
    """``compute`` per clip id, run once per set of tables that share their pair arrays (the
    :meth:`PairTable.from_start` tables of one clip): on the one with the most pairs, when its
    pairs include every other's; the others get the same array, indexed like theirs."""
    groups: dict[int, list[PairTable]] = {}
    for table in tables:
        groups.setdefault(id(table.conv6), []).append(table)
    out: dict[str, np.ndarray] = {}
    for group in groups.values():
        full = max(group, key=lambda t: int(t.valid.sum()))
        shared = None
        for table in group:
            if table is not full and not np.all(full.valid[table.valid]):
                out[table.clip_id] = compute(table)
                continue
            shared = compute(full) if shared is None else shared
            out[table.clip_id] = shared
    return out
