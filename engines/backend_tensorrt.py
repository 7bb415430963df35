"""The TensorRT backend (NVIDIA GPUs): the engines of :mod:`~facestream.engines.tensorrt_build`,
run with ``execute_async_v3``.

Buffers and streams
    Device buffers are torch CUDA tensors (torch is always installed, so this backend needs no
    pycuda). A call copies its numpy inputs into tensors from torch's caching allocator, binds
    their ``data_ptr()`` with ``set_tensor_address``, allocates the outputs at the shapes the
    execution context infers and enqueues the engine with ``execute_async_v3`` on that engine's
    own CUDA stream (``torch.cuda.Stream``); the outputs are copied back on the same stream.
    Every engine has its own execution context, stream and lock, so F and N_feat run on separate
    streams: :meth:`TensorRTNetworks.features_and_flow` enqueues both before it waits for either,
    and on a key frame that needs both they overlap on the GPU.

Key-frame features on the GPU
    :meth:`TensorRTNetworks.features_device` returns N_feat's output as a CUDA tensor, and
    ``warp``/``task``/:meth:`~TensorRTNetworks.warp_device` take CUDA tensors as well as numpy
    arrays: a pipeline can keep the key frame's (B, C, S/4, S/4) features on the device between
    frames instead of copying them out and back in. The :class:`Networks` interface itself still
    returns numpy.

Warp
    The ``warp`` ONNX graph's engine by default. ``warp="cuda_warp"`` switches to
    :class:`facestream.engines.cuda_warp.CudaWarp` (the custom kernel, needs pycuda and nvcc) when
    it imports, runs and agrees with the engine on a probe input; otherwise the engine stays and
    :attr:`TensorRTNetworks.warp_note` says why.

``import facestream.engines.backend_tensorrt`` works without TensorRT; constructing
:class:`TensorRTNetworks` raises :class:`TensorRTUnavailable` naming the fix.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facestream.engines.networks import FlowResult, Networks
from facestream.engines.tensorrt_build import (
    DEFAULT_MAX_BATCH,
    EngineBuildError,
    EngineSet,
    Progress,
    TensorRTUnavailable,
    build_engines,
    require_gpu,
    trt_logger,
)
from facestream.engines.weights import WeightSet, read_metadata
from facestream.models.config import config_from_json

__all__ = ["TensorRTNetworks", "TensorRTUnavailable", "WARPS"]

LOG = logging.getLogger(__name__)
WARPS = ("engine", "cuda_warp")
KERNEL_TOLERANCE = 1e-3  # max abs difference to the warp engine for CudaWarp to be used

Array = np.ndarray | torch.Tensor


def _config(weights: WeightSet, name: str) -> Any:
    return config_from_json(read_metadata(weights.paths[name])["config"])


class _Engine:
    """One deserialised engine with its execution context, CUDA stream and lock.

    The lock is held from binding the inputs until the outputs are ready: an execution context
    runs one inference at a time.
    """

    def __init__(self, trt: Any, runtime: Any, plan: Path, graph: str, device: torch.device) -> None:
        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise EngineBuildError(
                graph, f"cannot deserialise {plan}; rebuild it with facestream build-engines"
            )
        context = engine.create_execution_context()
        if context is None:
            raise EngineBuildError(graph, "cannot create an execution context (out of GPU memory?)")
        self.graph, self.engine, self.context, self.device = graph, engine, context, device
        self.stream = torch.cuda.Stream(device)
        self.lock = threading.Lock()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.np_dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.dtypes = {n: torch.from_numpy(np.empty(0, dt)).dtype for n, dt in self.np_dtypes.items()}
        # [min, opt, max] shapes of optimisation profile 0 per input
        self.ranges = {n: [tuple(s) for s in engine.get_tensor_profile_shape(n, 0)] for n in self.inputs}
        self._in_flight: list[torch.Tensor] = []

    def _bind_input(self, name: str, value: Array) -> torch.Tensor:
        shape = tuple(value.shape)
        low, _, high = self.ranges[name]
        if len(shape) != len(high) or not all(a <= s <= b for a, s, b in zip(low, shape, high, strict=True)):
            raise ValueError(
                f"TensorRT {self.graph}: input {name!r} of shape {shape} is outside the engine's range "
                f"{low} .. {high} (larger batches: facestream build-engines --max-batch)"
            )
        if isinstance(value, torch.Tensor):
            tensor = value.to(self.device, self.dtypes[name]).contiguous()
        else:
            array = np.ascontiguousarray(value, dtype=self.np_dtypes[name])
            array = array if array.flags.writeable else array.copy()
            tensor = torch.from_numpy(array).to(self.device, non_blocking=True)
        if not self.context.set_input_shape(name, shape):
            raise ValueError(f"TensorRT {self.graph}: set_input_shape({name!r}, {shape}) was refused")
        self.context.set_tensor_address(name, tensor.data_ptr())
        return tensor

    def enqueue(self, inputs: Mapping[str, Array]) -> dict[str, torch.Tensor]:
        """Bind ``inputs``, allocate the outputs and enqueue the engine on :attr:`stream`.

        The caller holds :attr:`lock` until the outputs are read (:meth:`fetch`) or the stream is
        synchronised. Work queued on the caller's current stream (e.g. a tensor it just made)
        comes first.
        """
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._in_flight = [self._bind_input(name, inputs[name]) for name in self.inputs]
            outputs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT {self.graph}: execute_async_v3 failed (see the TensorRT log)")
        return outputs

    def fetch(self, outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Copy ``outputs`` to the host on :attr:`stream` (after the engine); waits for them."""
        with torch.cuda.stream(self.stream):
            host = {name: tensor.cpu().numpy() for name, tensor in outputs.items()}
        self._in_flight = []
        return host

    def run(self, **inputs: Array) -> dict[str, np.ndarray]:
        with self.lock:
            return self.fetch(self.enqueue(inputs))

    def run_device(self, **inputs: Array) -> dict[str, torch.Tensor]:
        """Outputs as CUDA tensors, complete (the stream is synchronised) when this returns."""
        with self.lock:
            outputs = self.enqueue(inputs)
            self.stream.synchronize()
            self._in_flight = []
        return outputs


class TensorRTNetworks(Networks):
    """The networks as TensorRT engines on one CUDA GPU (see the module docstring).

    ``engines``: prebuilt engines; by default :func:`build_engines` builds them (minutes the first
    time, then cached) at ``precision`` (fp16 where the GPU supports it) for batches up to
    ``max_batch``. ``threads`` is accepted for the common backend signature and unused.
    """

    backend = "tensorrt"

    def __init__(
        self,
        weights: WeightSet,
        *,
        threads: int | None = None,
        precision: str = "fp16",
        max_batch: int = DEFAULT_MAX_BATCH,
        engines: EngineSet | None = None,
        warp: str = "engine",
        device: int = 0,
        progress: Progress | None = None,
    ) -> None:
        if warp not in WARPS:
            raise ValueError(f"warp must be one of {', '.join(WARPS)}, got {warp!r}")
        trt = require_gpu()
        if engines is None:
            engines = build_engines(weights, precision=precision, max_batch=max_batch, progress=progress)
        self.engine_set = engines
        self.precision = engines.key.precision
        self.device = torch.device("cuda", device)
        with torch.cuda.device(self.device):
            torch.cuda.init()  # TensorRT then shares torch's (primary) CUDA context
            self._runtime = trt.Runtime(trt_logger())  # outlives the engines it deserialised
            self.engines = {
                name: _Engine(trt, self._runtime, plan, name, self.device)
                for name, plan in engines.plans.items()
            }
        super().__init__(
            _config(weights, "segmentation"),
            _config(weights, "flow"),
            has_policy="policy" in self.engines,
            has_dvsnet="dvsnet" in self.engines,
            policy_cues=_config(weights, "policy").cues if "policy" in self.engines else (),
            correction=_config(weights, "correction") if "correction" in self.engines else None,
        )
        self.warp_impl = "engine"
        self.warp_note = "TensorRT warp engine"
        self._kernel: Callable[..., torch.Tensor] | None = None
        if warp == "cuda_warp":
            self._use_cuda_warp()

    # ----------------------------------------------------------------- the Networks interface

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.engines["segmentation_features"].run(image=images)["features"]

    def _task(self, features: Array) -> np.ndarray:
        return self.engines["segmentation_task"].run(features=features)["scores"]

    def flow(self, pairs: np.ndarray) -> FlowResult:
        out = self.engines["flow"].run(pair=pairs)
        return FlowResult(out["flow"], out["scale"], out["conv6"])

    def conv6_features(self, pairs: np.ndarray) -> np.ndarray:
        if "flow_conv6" not in self.engines:
            return super().conv6_features(pairs)
        return self.engines["flow_conv6"].run(pair=pairs)["conv6"]

    def warp(self, features: Array, flow: Array, scale: Array) -> np.ndarray:
        if self._kernel is None:
            return self.engines["warp"].run(features=features, flow=flow, scale=scale)["warped"]
        return self.warp_device(features, flow, scale).cpu().numpy()

    def key_probability(self, conv6: np.ndarray, expert: np.ndarray) -> np.ndarray:
        self._require("policy", self.has_policy)
        return self.engines["policy"].run(conv6=conv6, expert=expert)["key_probability"]

    def dvsnet_score(self, conv6: np.ndarray) -> np.ndarray:
        self._require("dvsnet", self.has_dvsnet)
        return self.engines["dvsnet"].run(conv6=conv6)["score"]

    def _correct(self, current: np.ndarray, key: np.ndarray, flow: Array, scores: Array) -> np.ndarray:
        out = self.engines["correction"].run(current=current, key=key, flow=flow, scores=scores)
        return out["corrected"]

    # ----------------------------------------------------------------- GPU extras

    def features_and_flow(self, images: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, FlowResult]:
        """N_feat(images) and F(pairs) at once: both are enqueued on their own streams before
        either is waited for, so they overlap on the GPU (a key frame that needs both)."""
        key, flow = self.engines["segmentation_features"], self.engines["flow"]
        with key.lock, flow.lock:  # the only place taking two locks, always in this order
            key_out = key.enqueue({"image": images})
            flow_out = flow.enqueue({"pair": pairs})
            features = key.fetch(key_out)["features"]
            out = flow.fetch(flow_out)
        return features, FlowResult(out["flow"], out["scale"], out["conv6"])

    def features_device(self, images: Array) -> torch.Tensor:
        """N_feat's (B, C, S/4, S/4) output as a CUDA float32 tensor (the key-frame cache on the
        GPU); complete when this returns."""
        return self.engines["segmentation_features"].run_device(image=images)["features"]

    def warp_device(self, features: Array, flow: Array, scale: Array) -> torch.Tensor:
        """W(f_k, M, S) as a CUDA tensor; ``features`` may stay on the GPU (:meth:`features_device`)."""
        engine = self.engines["warp"]
        if self._kernel is None:
            return engine.run_device(features=features, flow=flow, scale=scale)["warped"]
        with engine.lock:
            engine.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(engine.stream):
                args = [
                    torch.as_tensor(x, dtype=torch.float32, device=self.device)
                    for x in (features, flow, scale)
                ]
                warped = self._kernel(*(arg.contiguous() for arg in args))
            engine.stream.synchronize()
        return warped

    def _use_cuda_warp(self) -> None:
        """Use ``facestream.engines.cuda_warp.CudaWarp`` for the warp if it imports, runs and agrees
        with the warp engine; otherwise keep the engine and say why in :attr:`warp_note`.

        ``CudaWarp(device=...).warp(features, flow, scale)`` takes torch CUDA tensors and enqueues
        on torch's current stream (here the warp engine's stream, which is then synchronised).
        """
        seg, flow_config = self.segmentation_config, self.flow_config
        grid, generator = seg.feature_size, torch.Generator(device=self.device).manual_seed(0)

        def probe(*shape: int, low: float, high: float) -> torch.Tensor:
            rand = torch.rand(shape, generator=generator, device=self.device)
            return rand * (high - low) + low

        try:
            module = importlib.import_module("facestream.engines.cuda_warp")
            kernel = module.CudaWarp(device=self.device.index or 0)
            call = kernel.warp
            features = probe(1, seg.feature_channels, grid, grid, low=-2, high=2)
            flow = probe(1, 2, grid, grid, low=-3, high=3)
            scale = probe(1, flow_config.scale_channels, grid, grid, low=0.5, high=1.5)
            expected = self.warp_device(features, flow, scale)
            diff = float((call(features, flow, scale) - expected).abs().max())
            if not diff <= KERNEL_TOLERANCE:
                raise RuntimeError(f"it differs from the warp engine by {diff:.3g}")
        except Exception as exc:  # an optional extra: any failure keeps the engine
            self.warp_note = f"CudaWarp not used ({type(exc).__name__}: {exc}); TensorRT warp engine"
            LOG.warning("%s", self.warp_note)
            return
        self._kernel, self.warp_impl = call, "cuda_warp"
        self.warp_note = f"CudaWarp kernel (max abs difference to the warp engine {diff:.2g})"
        LOG.info("warp: %s", self.warp_note)
