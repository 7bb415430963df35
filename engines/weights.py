"""Network weights on disk: one safetensors file per network, its config in the metadata.

A weights directory holds ``segmentation.safetensors`` and ``flow.safetensors`` (required) and
``policy.safetensors`` / ``dvsnet.safetensors`` (needed by the ``rl`` / ``dvsnet`` schedulers) and
``correction.safetensors`` (the warp corrector of non-key frames; used when present).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from facestream.models import DeepLabV3Plus, DVSNetHead, FlowNet2S, KeyPolicy, WarpCorrector
from facestream.models.config import (
    CorrectionConfig,
    DVSNetConfig,
    FlowConfig,
    PolicyConfig,
    SegmentationConfig,
    config_from_json,
    config_to_json,
)

FILES = {
    "segmentation": "segmentation.safetensors",
    "flow": "flow.safetensors",
    "policy": "policy.safetensors",
    "dvsnet": "dvsnet.safetensors",
    "correction": "correction.safetensors",
}
REQUIRED = ("segmentation", "flow")
FORMAT = "facestream-weights-1"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "models" / "weights"
TRAIN_HINT = (
    "Pass --weights DIR (a folder with segmentation.safetensors and flow.safetensors), "
    "set FACESTREAM_WEIGHTS, or train them with `facestream train ...` (pip install 'facestream[train]')."
)

_MODULES: dict[type, type[nn.Module]] = {
    SegmentationConfig: DeepLabV3Plus,
    FlowConfig: FlowNet2S,
    PolicyConfig: KeyPolicy,
    DVSNetConfig: DVSNetHead,
    CorrectionConfig: WarpCorrector,
}


class WeightsError(RuntimeError):
    """Weights are missing, unreadable or do not fit the network they claim to be."""


def build_network(config: Any) -> nn.Module:
    """A freshly initialised network for a model config."""
    try:
        return _MODULES[type(config)](config)
    except KeyError:
        raise TypeError(f"no network for config {type(config).__name__}") from None


def save_network(
    module: nn.Module, path: str | Path, card: dict[str, Any] | None = None, *, half: bool = False
) -> Path:
    """Write ``module``'s weights and config (and an optional model card dict) as safetensors.

    ``half`` stores floating-point tensors as float16 (half the size; loading casts them back to
    the network's float32 parameters)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "config": config_to_json(module.config)}
    if card is not None:
        metadata["card"] = json.dumps(card, sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise WeightsError(f"{path} is not a facestream weights file (no config in its metadata)")
    return metadata


def load_network(path: str | Path) -> nn.Module:
    """Build the network described in ``path``'s metadata and load its weights (eval mode)."""
    metadata = read_metadata(path)
    module = build_network(config_from_json(metadata["config"]))
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights in {path} do not fit their network: {exc}") from exc
    return module.eval()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightSet:
    """The weight files found in one directory, by network name."""

    directory: Path
    paths: dict[str, Path]

    def has(self, name: str) -> bool:
        return name in self.paths

    def hashes(self) -> dict[str, str]:
        return {name: file_sha256(path) for name, path in sorted(self.paths.items())}

    def fingerprint(self, names: tuple[str, ...] | None = None) -> str:
        """One short hash over all files, or over the networks ``names`` (cache keys)."""
        hashes = self.hashes()
        if names is not None:
            hashes = {name: hashes[name] for name in names if name in hashes}
        joined = json.dumps(hashes, sort_keys=True).encode()
        return hashlib.sha256(joined).hexdigest()[:16]

    def load(self, name: str) -> nn.Module:
        if name not in self.paths:
            raise WeightsError(f"no {FILES[name]} in {self.directory}. {TRAIN_HINT}")
        return load_network(self.paths[name])


def resolve_weights_dir(directory: str | Path | None = None) -> Path:
    """``directory``, else ``$FACESTREAM_WEIGHTS``, else the weights shipped with the package."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get("FACESTREAM_WEIGHTS")
    return Path(env) if env else DEFAULT_DIR


def find_weights(directory: str | Path | None = None) -> WeightSet:
    """The weights to run with; raises :class:`WeightsError` naming the fix when none are found."""
    root = resolve_weights_dir(directory)
    if not root.is_dir():
        raise WeightsError(f"weights folder {root} does not exist. {TRAIN_HINT}")
    paths = {name: root / f for name, f in FILES.items() if (root / f).is_file()}
    missing = [FILES[name] for name in REQUIRED if name not in paths]
    if missing:
        raise WeightsError(f"no trained weights in {root} (missing {', '.join(missing)}). {TRAIN_HINT}")
    for path in paths.values():
        read_metadata(path)
    return WeightSet(root, paths)


def write_random_weights(
    directory: str | Path,
    segmentation: SegmentationConfig | None = None,
    flow: FlowConfig | None = None,
    *,
    seed: int = 0,
    policy_cues: tuple[str, ...] = (),
) -> WeightSet:
    """Randomly initialised weights for all five networks -- for tests and speed benchmarks only.
    ``policy_cues``: the cues the random policy takes (PolicyConfig.cues).

    Every file's model card says ``"trained": false`` so that nobody mistakes them for a model.
    """
    segmentation = segmentation or SegmentationConfig()
    flow = flow or FlowConfig(
        input_size=max(64, segmentation.input_size // 128 * 64),
        warp_size=segmentation.feature_size,
        scale_channels=segmentation.feature_channels,
    )
    six = (flow.conv6_channels, flow.conv6_size)
    configs = {
        "segmentation": segmentation,
        "flow": flow,
        "policy": PolicyConfig(in_channels=six[0], conv6_size=six[1], cues=policy_cues),
        "dvsnet": DVSNetConfig(in_channels=six[0], conv6_size=six[1]),
        "correction": CorrectionConfig(
            num_classes=segmentation.num_classes,
            image_size=2 * segmentation.feature_size,
            grid_size=segmentation.feature_size,
            protect=(2,) if segmentation.num_classes > 2 else (),  # as shipped: eyes left to the warp
        ),
    }
    torch.manual_seed(seed)
    card = {"trained": False, "note": "random initialisation for tests and speed benchmarks"}
    for name, config in configs.items():
        network = build_network(config)
        if isinstance(network, WarpCorrector):  # its head starts at zero (identity): perturb it
            nn.init.normal_(network.head.weight, std=0.1)
        save_network(network, Path(directory) / FILES[name], card)
    return find_weights(directory)
