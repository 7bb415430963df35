"""The PyTorch backend (reference implementation; CPU, or CUDA as backend ``torch-cuda``)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from facestream.engines.networks import FlowResult, Networks
from facestream.engines.weights import WeightSet
from facestream.models import warp


class TorchNetworks(Networks):
    """The networks in PyTorch on ``device``; on a CUDA device the backend is ``torch-cuda`` and
    ``fp16=True`` runs them under FP16 autocast (outputs stay float32)."""

    backend = "torch"

    def __init__(
        self, weights: WeightSet, *, device: str = "cpu", threads: int | None = None, fp16: bool = False
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.backend = "torch-cuda"
        self.fp16 = fp16 and self.device.type == "cuda"
        self.segmentation_net = weights.load("segmentation").to(self.device)
        self.flow_net = weights.load("flow").to(self.device)
        self.policy_net: Any = weights.load("policy").to(self.device) if weights.has("policy") else None
        self.dvsnet_net: Any = weights.load("dvsnet").to(self.device) if weights.has("dvsnet") else None
        self.correction_net: Any = (
            weights.load("correction").to(self.device) if weights.has("correction") else None
        )
        super().__init__(
            self.segmentation_net.config,
            self.flow_net.config,
            has_policy=self.policy_net is not None,
            has_dvsnet=self.dvsnet_net is not None,
            policy_cues=self.policy_net.config.cues if self.policy_net is not None else (),
            correction=self.correction_net.config if self.correction_net is not None else None,
        )

    def _in(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    @staticmethod
    def _out(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().float().cpu().numpy()

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.fp16:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> np.ndarray:
        with self._autocast():
            return self._out(self.segmentation_net.features(self._in(images)))

    @torch.inference_mode()
    def _task(self, features: np.ndarray) -> np.ndarray:
        with self._autocast():
            return self._out(self.segmentation_net.task(self._in(features)))

    @torch.inference_mode()
    def flow(self, pairs: np.ndarray) -> FlowResult:
        with self._autocast():
            out = self.flow_net(self._in(pairs))
            return FlowResult(self._out(out.flow), self._out(out.scale), self._out(out.conv6))

    @torch.inference_mode()
    def conv6_features(self, pairs: np.ndarray) -> np.ndarray:
        with self._autocast():
            return self._out(self.flow_net.conv6_features(self._in(pairs)))

    @torch.inference_mode()
    def warp(self, features: np.ndarray, flow: np.ndarray, scale: np.ndarray) -> np.ndarray:
        with self._autocast():
            return self._out(warp(self._in(features), self._in(flow), self._in(scale)))

    @torch.inference_mode()
    def key_probability(self, conv6: np.ndarray, expert: np.ndarray) -> np.ndarray:
        self._require("policy", self.policy_net is not None)
        with self._autocast():
            return self._out(self.policy_net.key_probability(self._in(conv6), self._in(expert)))

    @torch.inference_mode()
    def dvsnet_score(self, conv6: np.ndarray) -> np.ndarray:
        self._require("dvsnet", self.dvsnet_net is not None)
        with self._autocast():
            return self._out(self.dvsnet_net(self._in(conv6)))

    @torch.inference_mode()
    def _correct(
        self, current: np.ndarray, key: np.ndarray, flow: np.ndarray, scores: np.ndarray
    ) -> np.ndarray:
        with self._autocast():
            inputs = (self._in(current), self._in(key), self._in(flow), self._in(scores))
            return self._out(self.correction_net(*inputs))
