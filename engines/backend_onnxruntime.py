"""The ONNX Runtime backend (CPU default)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from facestream.engines.export import cached_export
from facestream.engines.int8 import int8_correction_graph, plan_precision
from facestream.engines.networks import FlowResult, Networks
from facestream.engines.weights import WeightSet, read_metadata
from facestream.models.config import config_from_json

LOG = logging.getLogger(__name__)


def _config(weights: WeightSet, name: str):
    return config_from_json(read_metadata(weights.paths[name])["config"])


class OrtNetworks(Networks):
    backend = "onnxruntime"

    def __init__(
        self,
        weights: WeightSet,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
        graphs: dict[str, Path] | None = None,
        correct_precision: str = "fp32",
    ) -> None:
        graphs = dict(graphs if graphs is not None else cached_export(weights))
        self.providers = providers or ["CPUExecutionProvider"]
        cpu = self.providers == ["CPUExecutionProvider"]
        chosen, calibration = (
            plan_precision(correct_precision, weights, cpu=cpu) if "correction" in graphs else ("fp32", None)
        )
        if chosen == "int8":
            try:
                graphs["correction"] = int8_correction_graph(weights, graphs["correction"], calibration)
                self.correct_precision = "int8"
            except Exception as exc:  # auto: a calibration that cannot be applied runs float32
                if correct_precision == "int8":
                    raise
                LOG.warning(
                    "int8 corrector unavailable, running it in float32: %s: %s", type(exc).__name__, exc
                )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Up to seven sessions share the cores; idle pools must not spin while another session runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.sessions = {
            name: ort.InferenceSession(str(path), options, providers=self.providers)
            for name, path in graphs.items()
        }
        super().__init__(
            _config(weights, "segmentation"),
            _config(weights, "flow"),
            has_policy="policy" in self.sessions,
            has_dvsnet="dvsnet" in self.sessions,
            policy_cues=_config(weights, "policy").cues if "policy" in self.sessions else (),
            correction=_config(weights, "correction") if "correction" in self.sessions else None,
        )

    def _run(self, name: str, **inputs: np.ndarray) -> list[np.ndarray]:
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        return self.sessions[name].run(None, feed)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._run("segmentation_features", image=images)[0]

    def _task(self, features: np.ndarray) -> np.ndarray:
        return self._run("segmentation_task", features=features)[0]

    def flow(self, pairs: np.ndarray) -> FlowResult:
        return FlowResult(*self._run("flow", pair=pairs))

    def conv6_features(self, pairs: np.ndarray) -> np.ndarray:
        if "flow_conv6" not in self.sessions:  # graphs given by hand, without the encoder graph
            return super().conv6_features(pairs)
        return self._run("flow_conv6", pair=pairs)[0]

    def warp(self, features: np.ndarray, flow: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return self._run("warp", features=features, flow=flow, scale=scale)[0]

    def key_probability(self, conv6: np.ndarray, expert: np.ndarray) -> np.ndarray:
        self._require("policy", self.has_policy)
        return self._run("policy", conv6=conv6, expert=expert)[0]

    def dvsnet_score(self, conv6: np.ndarray) -> np.ndarray:
        self._require("dvsnet", self.has_dvsnet)
        return self._run("dvsnet", conv6=conv6)[0]

    def _correct(
        self, current: np.ndarray, key: np.ndarray, flow: np.ndarray, scores: np.ndarray
    ) -> np.ndarray:
        return self._run("correction", current=current, key=key, flow=flow, scores=scores)[0]
