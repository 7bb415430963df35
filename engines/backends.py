"""Choosing and building a backend by name."""

from __future__ import annotations

from facestream.engines.backend_onnxruntime import OrtNetworks
from facestream.engines.backend_torch import TorchNetworks
from facestream.engines.networks import Networks
from facestream.engines.weights import WeightSet

BACKENDS = ("onnxruntime", "torch")
DEFAULT_BACKEND = "onnxruntime"


def create_networks(
    weights: WeightSet, backend: str = DEFAULT_BACKEND, *, threads: int | None = None
) -> Networks:
    """The networks of ``weights`` on ``backend`` (``onnxruntime`` or ``torch``)."""
    if backend == "onnxruntime":
        return OrtNetworks(weights, threads=threads)
    if backend == "torch":
        return TorchNetworks(weights, threads=threads)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
