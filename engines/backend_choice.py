"""Choosing the fastest backend this machine can run (``--backend auto``).

The chain, fastest first: ``tensorrt`` (TensorRT engines on a CUDA GPU) -> ``torch-cuda`` (PyTorch
on the GPU, for GPUs without TensorRT) -> ``onnxruntime-cuda`` (ONNX Runtime's CUDA execution
provider, where onnxruntime-gpu is installed) -> ``onnxruntime`` (CPU, always there). Each step
that is skipped says why; :func:`choose_backend` only probes (cheap: imports and
``torch.cuda.is_available()``), and :func:`~facestream.engines.backends.create_chosen_networks`
goes on down the chain when a chosen backend then fails to start (an engine build that fails,
...), recording that reason too. The resulting :class:`BackendChoice` is logged and returned, so
that the service can show it (e.g. on ``/readyz``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnxruntime as ort
import torch

from facestream.engines import tensorrt_build

LOG = logging.getLogger(__name__)

AUTO = "auto"
CHAIN = ("tensorrt", "torch-cuda", "onnxruntime-cuda", "onnxruntime")
CPU_ONLY = ("onnxruntime", "torch")  # never skipped: the CPU backends
KNOWN = (*CHAIN, "torch")


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class BackendChoice:
    """The backend chosen, why, and each backend tried before it with why it was skipped."""

    name: str
    reason: str
    tried: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "reason": self.reason, "tried": [list(step) for step in self.tried]}

    def describe(self) -> str:
        skipped = "; ".join(f"{name}: {why}" for name, why in self.tried)
        return f"backend {self.name} ({self.reason})" + (f"; skipped {skipped}" if skipped else "")


# --------------------------------------------------------------------------- probes
# Module-level functions, looked up at call time, so that tests can replace them.


def cuda_problem() -> str | None:
    """Why torch has no CUDA device, or None."""
    return tensorrt_build.cuda_problem()


def tensorrt_problem() -> str | None:
    """Why ``import tensorrt`` fails (with the import error), or None."""
    return tensorrt_build.tensorrt_problem()


def ort_cuda_problem() -> str | None:
    """Why ONNX Runtime has no CUDA execution provider, or None."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    return None


def gpu_description() -> str:
    return torch.cuda.get_device_name(0)


def backend_problem(name: str) -> str | None:
    """Why backend ``name`` cannot run here (cheap probes only), or None."""
    if name in CPU_ONLY:
        return None
    if name not in KNOWN:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join((*KNOWN, AUTO))}")
    problem = cuda_problem()
    if problem is None and name == "tensorrt":
        problem = tensorrt_problem()
    if problem is None and name == "onnxruntime-cuda":
        problem = ort_cuda_problem()
    return problem


def _reason(name: str) -> str:
    if name == "tensorrt":
        return f"TensorRT on {gpu_description()}"
    if name in ("torch-cuda", "onnxruntime-cuda"):
        return f"CUDA GPU {gpu_description()}"
    return "CPU"


# --------------------------------------------------------------------------- the chooser


def choose_backend(preferred: str = AUTO, *, failed: Mapping[str, str] | None = None) -> BackendChoice:
    """The first backend of :data:`CHAIN` that can run here, starting at ``preferred``.

    ``preferred``: ``auto`` (the whole chain), a backend of the chain (it, else the ones after it),
    or ``torch`` (CPU PyTorch, taken as it is). ``failed``: backends that already failed to start,
    with why; they are skipped. Unknown names raise ValueError. Logs the choice and the reasons.
    """
    failed = dict(failed or {})
    candidates: tuple[str, ...]
    if preferred == AUTO:
        candidates = CHAIN
    elif preferred in CHAIN:
        candidates = CHAIN[CHAIN.index(preferred) :]
    elif preferred == "torch":
        candidates = ("torch",)
    else:
        raise ValueError(f"unknown backend {preferred!r}; choose one of {', '.join((*KNOWN, AUTO))}")
    tried: list[tuple[str, str]] = []
    for name in candidates:
        problem = failed.get(name) or backend_problem(name)
        if problem is None:
            reason = _reason(name)
            if tried:
                reason += f", fallback after {', '.join(skipped for skipped, _ in tried)}"
            choice = BackendChoice(name, reason, tried)
            LOG.info("%s", choice.describe())
            return choice
        tried.append((name, problem))
    steps = "; ".join(f"{name}: {why}" for name, why in tried)
    raise BackendUnavailable(f"no backend can run for {preferred!r}: {steps}")
