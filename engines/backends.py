"""Choosing and building a backend by name."""

from __future__ import annotations

import logging

from facestream.engines.backend_choice import AUTO, BackendChoice, BackendUnavailable, choose_backend
from facestream.engines.backend_onnxruntime import OrtNetworks
from facestream.engines.backend_tensorrt import TensorRTNetworks
from facestream.engines.backend_torch import TorchNetworks
from facestream.engines.dis_flow import FLOWS, with_flow
from facestream.engines.int8 import Int8Unavailable, check_precision
from facestream.engines.networks import Networks
from facestream.engines.tensorrt_build import cuda_problem
from facestream.engines.weights import WeightsError, WeightSet

LOG = logging.getLogger(__name__)

CPU_BACKENDS = ("onnxruntime", "torch")
GPU_BACKENDS = ("tensorrt", "torch-cuda", "onnxruntime-cuda")
BACKENDS = (*CPU_BACKENDS, *GPU_BACKENDS, AUTO)
DEFAULT_BACKEND = "onnxruntime"
ORT_CUDA_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def create_networks(
    weights: WeightSet,
    backend: str = DEFAULT_BACKEND,
    *,
    threads: int | None = None,
    flow: str = "flownet",
    conv6: bool = True,
    dis_size: int | None = None,
    correct_precision: str = "fp32",
) -> Networks:
    """The networks of ``weights`` on ``backend`` (one of :data:`BACKENDS`).

    ``auto`` takes the fastest backend that starts here (see
    :mod:`~facestream.engines.backend_choice`; :func:`create_chosen_networks` also says which and
    why). A GPU backend named explicitly raises BackendUnavailable (or TensorRTUnavailable)
    where it cannot run.

    ``flow``: ``flownet`` (the learned F; the library default) or ``dis`` (the commands' default,
    :data:`~facestream.engines.dis_flow.DEFAULT_FLOW`) (OpenCV DIS optical flow, see
    :mod:`facestream.engines.dis_flow`); with ``dis``, ``conv6`` says whether F still runs for
    the Conv6 features the ``rl`` and ``dvsnet`` schedulers need.

    ``correct_precision``: the warp corrector's arithmetic on the onnxruntime CPU backend,
    ``fp32`` (the library default: the trained network as it is), ``int8`` or ``auto`` (the
    commands' default); see :mod:`facestream.engines.int8`.
    """
    networks, _ = create_chosen_networks(
        weights,
        backend,
        threads=threads,
        flow=flow,
        conv6=conv6,
        dis_size=dis_size,
        correct_precision=correct_precision,
    )
    return networks


def create_chosen_networks(
    weights: WeightSet,
    backend: str = AUTO,
    *,
    threads: int | None = None,
    flow: str = "flownet",
    conv6: bool = True,
    dis_size: int | None = None,
    correct_precision: str = "fp32",
) -> tuple[Networks, BackendChoice]:
    """:func:`create_networks`, and the :class:`BackendChoice` behind it (for ``auto``: the
    backend that started and why, each one skipped or failed before it and why)."""
    if flow not in FLOWS:  # before the (slow) networks are built
        raise ValueError(f"unknown flow {flow!r}; choose one of {', '.join(FLOWS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_precision(correct_precision)
    if backend == AUTO:
        networks, choice = _create_auto(weights, threads, correct_precision)
    else:
        networks = _create(backend, weights, threads, correct_precision)
        choice = BackendChoice(backend, "asked for")
    return with_flow(networks, flow, conv6=conv6, dis_size=dis_size), choice


def _create_auto(
    weights: WeightSet, threads: int | None, correct_precision: str
) -> tuple[Networks, BackendChoice]:
    """Down the chain until a backend starts; a failure to start is recorded as the reason."""
    failed: dict[str, str] = {}
    while True:
        choice = choose_backend(AUTO, failed=failed)
        try:
            return _create(choice.name, weights, threads, correct_precision), choice
        except (WeightsError, Int8Unavailable):
            raise  # the weights or their calibration, not the backend
        except (RuntimeError, OSError, ImportError) as exc:
            if choice.name in CPU_BACKENDS:
                raise
            failed[choice.name] = f"failed to start: {type(exc).__name__}: {exc}"
            LOG.warning("backend %s %s", choice.name, failed[choice.name])


def _create(backend: str, weights: WeightSet, threads: int | None, correct_precision: str) -> Networks:
    if correct_precision == "int8" and backend != "onnxruntime":
        raise Int8Unavailable(f"the int8 corrector runs on the onnxruntime CPU backend only, not {backend}")
    if backend in ("torch-cuda", "onnxruntime-cuda"):
        problem = cuda_problem()
        if problem:
            raise BackendUnavailable(f"backend {backend} needs a CUDA GPU: {problem}")
    if backend == "onnxruntime":
        return OrtNetworks(weights, threads=threads, correct_precision=correct_precision)
    if backend == "onnxruntime-cuda":
        return _ort_cuda(weights, threads)
    if backend == "torch":
        return TorchNetworks(weights, threads=threads)
    if backend == "torch-cuda":
        return TorchNetworks(weights, device="cuda", threads=threads)
    if backend == "tensorrt":
        return TensorRTNetworks(weights, threads=threads)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _ort_cuda(weights: WeightSet, threads: int | None) -> Networks:
    """ONNX Runtime with its CUDA execution provider (which it would quietly drop for the CPU)."""
    networks = OrtNetworks(weights, threads=threads, providers=ORT_CUDA_PROVIDERS)
    for name, session in networks.sessions.items():
        if "CUDAExecutionProvider" not in session.get_providers():
            raise BackendUnavailable(
                f"backend onnxruntime-cuda: the CUDA execution provider did not start for {name} "
                f"(providers {session.get_providers()}; see onnxruntime's log)"
            )
    networks.backend = "onnxruntime-cuda"
    return networks
