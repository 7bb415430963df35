"""Choosing and building a backend by name."""

from __future__ import annotations

from facestream.engines.backend_onnxruntime import OrtNetworks
from facestream.engines.backend_torch import TorchNetworks
from facestream.engines.dis_flow import FLOWS, with_flow
from facestream.engines.networks import Networks
from facestream.engines.weights import WeightSet

BACKENDS = ("onnxruntime", "torch")
DEFAULT_BACKEND = "onnxruntime"


def create_networks(
    weights: WeightSet,
    backend: str = DEFAULT_BACKEND,
    *,
    threads: int | None = None,
    flow: str = "flownet",
    conv6: bool = True,
    dis_size: int | None = None,
) -> Networks:
    """The networks of ``weights`` on ``backend`` (``onnxruntime`` or ``torch``).

    ``flow``: ``flownet`` (the learned F; the library default) or ``dis`` (the commands' default,
    :data:`~facestream.engines.dis_flow.DEFAULT_FLOW`) (OpenCV DIS optical flow, see
    :mod:`facestream.engines.dis_flow`); with ``dis``, ``conv6`` says whether F still runs for
    the Conv6 features the ``rl`` and ``dvsnet`` schedulers need.
    """
    if flow not in FLOWS:  # before the (slow) networks are built
        raise ValueError(f"unknown flow {flow!r}; choose one of {', '.join(FLOWS)}")
    if backend == "onnxruntime":
        networks: Networks = OrtNetworks(weights, threads=threads)
    elif backend == "torch":
        networks = TorchNetworks(weights, threads=threads)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return with_flow(networks, flow, conv6=conv6, dis_size=dis_size)
