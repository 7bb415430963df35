"""Frozen model configurations.

Each network is fully described by one of these dataclasses; the dataclass is stored as JSON in
the metadata of the network's safetensors file so that weights load without any other input.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BACKBONES = ("mobilenet_v2", "resnet50")
SPLITS = ("scores", "decoder")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_sizes(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        _check(value > 0, f"{name} must be positive, got {value}")
    _check(all(v > 0 for v in config.fc_sizes), f"fc_sizes must be positive, got {config.fc_sizes}")


@dataclass(frozen=True)
class SegmentationConfig:
    """DeepLab-V3+ (N).

    ``split`` is where N is cut into N_feat and N_task: ``"scores"`` (the paper's choice: N_feat
    ends with the per-pixel class scores at stride 4) or ``"decoder"`` (N_feat ends with the
    256-channel decoder feature map; N_task is the classifier convolution).
    """

    backbone: str = "mobilenet_v2"
    num_classes: int = 5
    input_size: int = 256
    split: str = "scores"
    output_stride: int = 16
    decoder_channels: int = 256

    def __post_init__(self) -> None:
        _check(
            self.backbone in BACKBONES,
            f"backbone must be one of {BACKBONES}, got {self.backbone!r}",
        )
        _check(self.split in SPLITS, f"split must be one of {SPLITS}, got {self.split!r}")
        _check(self.num_classes >= 2, f"num_classes must be >= 2, got {self.num_classes}")
        _check(
            self.input_size > 0 and self.input_size % 16 == 0,
            f"input_size must be a positive multiple of 16, got {self.input_size}",
        )
        _check(
            self.output_stride in (8, 16),
            f"output_stride must be 8 or 16, got {self.output_stride}",
        )

    @property
    def feature_size(self) -> int:
        """Side of N_feat's output (stride 4)."""
        return self.input_size // 4

    @property
    def feature_channels(self) -> int:
        """Channels of N_feat's output, i.e. of the cached key feature that gets warped."""
        return self.num_classes if self.split == "scores" else self.decoder_channels


@dataclass(frozen=True)
class FlowConfig:
    """FlowNet2-s (F): FlowNetS with every channel count multiplied by ``width``.

    As in Deep Feature Flow, the flow network sees the frames at half the segmentation input
    (128 for 256 crops: 4.9 ms instead of 18.6 ms in ONNX Runtime on 2 cores) and its stride-4
    flow is resampled to the stride-4 feature grid of N.

    The network sees both frames at ``input_size`` and returns flow and scale at ``warp_size``
    (the side of the segmentation feature map it warps), with ``scale_channels`` scale channels.
    """

    input_size: int = 128
    warp_size: int = 64
    scale_channels: int = 5
    width: float = 3 / 8
    div_flow: float = 20.0

    def __post_init__(self) -> None:
        _check(
            self.input_size > 0 and self.input_size % 64 == 0,
            f"FlowNet input_size must be a positive multiple of 64, got {self.input_size}",
        )
        _check(self.warp_size > 0, f"warp_size must be positive, got {self.warp_size}")
        _check(self.scale_channels > 0, f"scale_channels must be positive, got {self.scale_channels}")
        _check(0 < self.width <= 1, f"width must be in (0, 1], got {self.width}")

    def channels(self, full: int) -> int:
        """A FlowNetS channel count scaled by ``width``."""
        return max(1, round(full * self.width))

    @property
    def conv6_channels(self) -> int:
        return self.channels(1024)

    @property
    def conv6_size(self) -> int:
        return self.input_size // 64


@dataclass(frozen=True)
class PolicyConfig:
    """The key policy of section 3.2 (Conv0 96 -> FC 1024 -> 1024 -> 128 -> [KAR, LKD] -> FC 2).

    ``window`` is the number of past decisions the expert information covers; LKD enters the
    network divided by ``window`` so that both expert inputs lie in [0, 1].
    """

    in_channels: int = 384
    conv6_size: int = 2
    conv0_channels: int = 96
    fc_sizes: tuple[int, int, int] = (1024, 1024, 128)
    window: int = 90
    # Standardise D per channel ((x - mean) * scale, buffers set from the training data) before
    # Conv0. F's Conv6 activations are small (std ~0.02 on faces), which leaves a fresh trunk
    # blind to them: the policy then learns from its biases and the expert inputs alone.
    normalize_input: bool = False
    # Extra per-frame inputs next to [KAR, LKD] (names from POLICY_CUES; engines.cues computes
    # them): the expert vector becomes [KAR, LKD/window, *cues], the cues standardised inside
    # the network by buffers set from the training data. () is the paper's state.
    cues: tuple[str, ...] = ()
    # Not in the paper: a DVSNet-shaped quality branch on the trunk (FC0 -> ``quality_size`` ->
    # 1, sigmoid: the warped frame's expected mIoU), meant to be copied from a trained DVSNet head
    # with Conv0/FC0 (``--init-trunk``); FC3 then sees [FC2, quality, KAR, LKD, cues]. 0: none.
    quality_size: int = 0
    # Not in the paper: a seed ensemble. ``members`` policies trained alike on one frozen trunk
    # (Conv0/FC0, shared) with their own FC1-FC3; pi(a1 | s) is the mean of theirs. 1: one policy.
    members: int = 1

    def __post_init__(self) -> None:
        _check(len(self.fc_sizes) == 3, f"fc_sizes needs 3 sizes, got {self.fc_sizes}")
        _check(self.members >= 1, f"members must be >= 1, got {self.members}")
        _check(self.quality_size >= 0, f"quality_size must be >= 0, got {self.quality_size}")
        _check(self.window > 0, f"window must be positive, got {self.window}")
        object.__setattr__(self, "cues", check_cues(self.cues))  # JSON round trips give lists
        _check_sizes(self, ("in_channels", "conv6_size", "conv0_channels"))

    @property
    def expert_size(self) -> int:
        """Width of the expert input: KAR, LKD and the cues."""
        return 2 + len(self.cues)

    @property
    def trunk_size(self) -> int:
        """Width of what the trunk hands FC3: FC2's activations and, with a quality branch, its output."""
        return self.fc_sizes[2] + (1 if self.quality_size else 0)


# The policy cues a model may take (engines.cues says what each one measures). The relative ones
# divide a residual by its mean over the stream's previous decided frames.
POLICY_CUES = ("magnitude", "residual_face", "residual_parts", "relative_face", "relative_parts")


def check_cues(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, or ValueError unless they are distinct names from POLICY_CUES."""
    _check(
        all(c in POLICY_CUES for c in names) and len(set(names)) == len(names),
        f"cues must be distinct names from {POLICY_CUES}, got {tuple(names)}",
    )
    return tuple(names)


@dataclass(frozen=True)
class DVSNetConfig:
    """DVSNet's decision network: Conv6 features -> expected score of the warped result."""

    in_channels: int = 384
    conv6_size: int = 2
    conv_channels: int = 96
    fc_sizes: tuple[int, int] = (1024, 256)

    def __post_init__(self) -> None:
        _check(len(self.fc_sizes) == 2, f"fc_sizes needs 2 sizes, got {self.fc_sizes}")
        _check_sizes(self, ("in_channels", "conv6_size", "conv_channels"))


@dataclass(frozen=True)
class CorrectionConfig:
    """The warp corrector (not in the paper): on a non-key frame, residual class scores from the
    current crop, the key crop warped by the same flow and the warped key scores.

    ``image_size``: side of the two crops it sees (N's crop area-resized), twice or four times
    ``grid_size`` (a stem of one or two stride-2 convolutions); ``grid_size``: side of the
    class-score grid it corrects (N's stride-4 grid); ``dilations``: one residual 3x3 block
    per entry at ``width`` channels (1, 2, 4, 8 see about 60 grid pixels: the whole face).
    ``protect``: classes the corrector leaves to the warp: their scores get no residual, and
    neither does any class on a pixel the warp gives to one of them (2 = eyes: a corrector trained
    on set A erased the eyes of narrow-eyed and bespectacled faces, README "The warp corrector").
    ``protect_margin``: grid cells around those pixels that get no residual either. The scores
    are upsampled bilinearly before the argmax, so a residual on the cells next to a protected
    region moves its edge: at 0 the corrector still shrank the eyes of narrow-eyed faces by
    boosting skin around them (README "The eye guard's margin"); at 1 the protected classes'
    mask is the warp's.
    ``protect_grow``: inside that guarded zone the other classes' residuals may still lower
    their scores, never raise them, so a protected region can grow (where the warp missed part
    of an eye) but never shrink; off, the zone gets no residual at all (README "The eye guard").
    """

    num_classes: int = 5
    image_size: int = 128
    grid_size: int = 64
    width: int = 48
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    protect: tuple[int, ...] = ()
    protect_margin: int = 1
    protect_grow: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "dilations", tuple(self.dilations))  # JSON round trips give lists
        object.__setattr__(self, "protect", tuple(self.protect))
        _check(
            all(0 <= c < self.num_classes for c in self.protect)
            and len(set(self.protect)) == len(self.protect),
            f"protect must list distinct class ids below {self.num_classes}, got {self.protect}",
        )
        _check(self.num_classes > 1, f"num_classes must be > 1, got {self.num_classes}")
        _check(self.protect_margin >= 0, f"protect_margin must be >= 0, got {self.protect_margin}")
        _check(self.width > 0, f"width must be positive, got {self.width}")
        _check(all(d > 0 for d in self.dilations), f"dilations must be positive, got {self.dilations}")
        _check(
            self.grid_size > 0 and self.image_size in (2 * self.grid_size, 4 * self.grid_size),
            f"image_size must be 2 or 4 times grid_size (a stem of 1 or 2 stride-2 convolutions), "
            f"got {self.image_size}, {self.grid_size}",
        )


_KINDS: dict[str, type] = {
    "segmentation": SegmentationConfig,
    "flow": FlowConfig,
    "policy": PolicyConfig,
    "dvsnet": DVSNetConfig,
    "correction": CorrectionConfig,
}


def config_to_dict(config: Any) -> dict[str, Any]:
    """``{"kind": ..., **fields}`` for any model config."""
    for kind, cls in _KINDS.items():
        if isinstance(config, cls):
            return {"kind": kind, **dataclasses.asdict(config)}  # type: ignore[call-overload]
    raise TypeError(f"not a model config: {type(config).__name__}")


def config_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`; unknown kinds or fields raise ``ValueError``."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown model config kind {kind!r}; expected one of {sorted(_KINDS)}")
    cls = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown fields for {kind} config: {sorted(unknown)}")
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    return cls(**data)


def config_to_json(config: Any) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True)


def config_from_json(text: str) -> Any:
    return config_from_dict(json.loads(text))
