"""One inference interface over all networks, whatever runs them.

Every backend takes and returns float32 numpy arrays in NCHW layout, so that the pipeline, the
schedulers and the benchmarks never see which runtime is underneath.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np

from facestream.models.config import CorrectionConfig, FlowConfig, SegmentationConfig


class FlowResult(NamedTuple):
    flow: np.ndarray  # (B, 2, h, w) M_{i->k} in pixels of the feature grid, x first
    scale: np.ndarray  # (B, C, h, w) DFF scale field S_{i->k}
    conv6: np.ndarray  # (B, C6, s, s) FlowNet2-s Conv6 features D_{i->k}


class Networks(ABC):
    """N_feat, N_task, F, W, the key policy and the DVSNet head behind one interface."""

    backend: str = "?"
    correct_precision: str = "fp32"  # the warp corrector's arithmetic (engines.int8: int8 on ORT CPU)

    def __init__(
        self,
        segmentation: SegmentationConfig,
        flow: FlowConfig,
        *,
        has_policy: bool,
        has_dvsnet: bool,
        policy_cues: tuple[str, ...] = (),
        correction: CorrectionConfig | None = None,
    ) -> None:
        if correction is not None and (
            correction.grid_size != segmentation.feature_size
            or correction.num_classes != segmentation.num_classes
        ):
            raise ValueError(
                f"the warp corrector works on {correction.num_classes} classes at "
                f"{correction.grid_size}², N on {segmentation.num_classes} at {segmentation.feature_size}²: "
                "retrain it for these weights"
            )
        if flow.warp_size != segmentation.feature_size:
            raise ValueError(
                f"flow network warps a {flow.warp_size}² grid but N_feat outputs "
                f"{segmentation.feature_size}²: retrain F or pick matching weights"
            )
        if flow.scale_channels not in (1, segmentation.feature_channels):
            raise ValueError(
                f"flow network predicts {flow.scale_channels} scale channels, N_feat has "
                f"{segmentation.feature_channels} feature channels"
            )
        self.segmentation_config = segmentation
        self.flow_config = flow
        self.has_policy = has_policy
        self.has_dvsnet = has_dvsnet
        # The per-frame cues the key policy takes after [KAR, LKD] (PolicyConfig.cues; engines.cues)
        self.policy_cues = tuple(policy_cues)
        # The warp corrector's config, or None when the weights have none (models.correction)
        self.correction_config = correction

    @property
    def has_correction(self) -> bool:
        return self.correction_config is not None

    def correction_precision(self, correct: bool) -> str | None:
        """The corrector's arithmetic where non-key frames go through it (``correct`` and the
        weights have one), else None: what reports and ``/readyz`` show."""
        return self.correct_precision if correct and self.has_correction else None

    @property
    def expert_size(self) -> int:
        """Width of the policy's expert input: KAR, LKD and the cues."""
        return 2 + len(self.policy_cues)

    @property
    def flow_input_size(self) -> int:
        """Side of the frames :meth:`flow` takes (F's input size unless a wrapper says otherwise)."""
        return self.flow_config.input_size

    @abstractmethod
    def features(self, images: np.ndarray) -> np.ndarray:
        """N_feat: (B, 3, S, S) RGB in [0, 1] -> (B, C, S/4, S/4)."""

    def task(self, features: np.ndarray) -> np.ndarray:
        """N_task up to class scores at stride 4: (B, C, S/4, S/4) -> (B, K, S/4, S/4)."""
        if self.segmentation_config.split == "scores":
            return features
        return self._task(features)

    def _task(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} has no N_task for the decoder split")

    @abstractmethod
    def flow(self, pairs: np.ndarray) -> FlowResult:
        """F: (B, 6, Sf, Sf) = [current, key] RGB in [0, 1], Sf = :attr:`flow_input_size`
        -> flow, scale, Conv6."""

    def conv6_features(self, pairs: np.ndarray) -> np.ndarray:
        """F's Conv6 features alone, (B, C6, s6, s6), for when another method supplies the flow:
        the same values as ``flow(pairs).conv6``; backends with an encoder-only graph skip F's
        flow decoder (about half of F)."""
        return self.flow(pairs).conv6

    @abstractmethod
    def warp(self, features: np.ndarray, flow: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """W(f_k, M, S) at the feature grid."""

    @abstractmethod
    def key_probability(self, conv6: np.ndarray, expert: np.ndarray) -> np.ndarray:
        """pi(a1 | s), (B,), from Conv6 features and expert info (B, 2 + len(policy_cues)) =
        [KAR, LKD/window, *cues]."""

    @abstractmethod
    def dvsnet_score(self, conv6: np.ndarray) -> np.ndarray:
        """DVSNet's predicted score of the warped result, (B,) in [0, 1]."""

    def correct(
        self, current: np.ndarray, key: np.ndarray, flow: np.ndarray, scores: np.ndarray
    ) -> np.ndarray:
        """The warp corrector: crops (B, 3, I, I) in [0, 1] (I = ``correction_config.image_size``),
        flow (B, 2, h, w) and warped key scores (B, K, h, w) -> corrected scores (B, K, h, w)."""
        self._require("correction", self.has_correction)
        return self._correct(current, key, flow, scores)

    def _correct(
        self, current: np.ndarray, key: np.ndarray, flow: np.ndarray, scores: np.ndarray
    ) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} cannot run the warp corrector")

    def _require(self, name: str, present: bool) -> None:
        if not present:
            raise RuntimeError(
                f"the weights have no {name} network ({name}.safetensors): train it or choose "
                f"another scheduler"
            )
