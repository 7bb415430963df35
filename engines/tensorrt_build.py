"""ONNX -> TensorRT engines (``facestream build-engines``) and their cache.

The engines are built from the ONNX graphs of :func:`~facestream.engines.export.cached_export`
(opset 17, dynamic batch axis): one optimisation profile sets every input to batch
1 (min) .. :data:`OPT_BATCH` (opt) .. ``max_batch`` (max). They are cached under

    ``$FACESTREAM_CACHE/trt/<key>/<graph>.plan``  (else ``~/.cache/facestream/trt/...``)

where ``<key>`` hashes the GPU name, the TensorRT version, the ONNX files' SHA-256, the precision
and the maximum batch (:class:`EngineKey`): a new GPU, TensorRT or weight set builds anew.

FP16: TensorRT 10 takes the FP32 graphs with ``BuilderFlag.FP16`` (weak typing). TensorRT 11
removed weak typing (every network is strongly typed, precision comes from the graph), so there
the graphs are exported once more with FP16 weights and compute between FP32 inputs and outputs
(:func:`export_fp16_onnx`). The warp and warp-corrector engines are FP32 in both cases
(:data:`FP32_GRAPHS`: the warp's index arithmetic does not export in FP16, sampling positions want
FP32, and both are small or memory-bound anyway). Engine inputs and outputs are FP32 in every case.

``tensorrt`` is imported lazily (:func:`import_tensorrt`): this module imports without it, and
using it raises :class:`TensorRTUnavailable` naming the fix.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from facestream.engines.export import GraphSpec, cache_root, cached_export, export_graph, graph_specs
from facestream.engines.weights import WeightSet, file_sha256

LOG = logging.getLogger(__name__)

ENGINE_FORMAT = "facestream-trt-1"  # bump when the way engines are built changes
PRECISIONS = ("fp16", "fp32")
DEFAULT_MAX_BATCH = 8
OPT_BATCH = 1  # the streaming service runs one frame per call; batches up to max_batch still work
FP32_GRAPHS = frozenset({"warp", "correction"})  # FP32 engines even when the others are FP16
INSTALL_HINT = "pip install 'facestream[gpu]' (TensorRT and pycuda; needs an NVIDIA CUDA GPU and driver)"

Progress = Callable[[str], None]


class TensorRTError(RuntimeError):
    """Base of the TensorRT errors."""


class TensorRTUnavailable(TensorRTError):
    """TensorRT cannot be imported, or there is no CUDA GPU to run it on."""


class EngineBuildError(TensorRTError):
    """Parsing a graph or building its engine failed; the message names the graph."""

    def __init__(self, graph: str, detail: str) -> None:
        super().__init__(f"TensorRT engine for graph {graph!r}: {detail}")
        self.graph = graph


# --------------------------------------------------------------------------- availability


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module; raises :class:`TensorRTUnavailable` naming the fix."""
    try:
        return importlib.import_module("tensorrt")
    except Exception as exc:  # a broken install raises more than ImportError (OSError, ...)
        raise TensorRTUnavailable(
            f"TensorRT cannot be imported ({type(exc).__name__}: {exc}); install it with {INSTALL_HINT}"
        ) from exc


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot be used here (the import error), or None."""
    try:
        import_tensorrt()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


def cuda_problem() -> str | None:
    """Why there is no CUDA GPU for torch (and so for these engines), or None."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def require_gpu() -> ModuleType:
    """``tensorrt`` when it and a CUDA GPU are there; else :class:`TensorRTUnavailable`."""
    gpu = cuda_problem()
    try:
        trt = import_tensorrt()
    except TensorRTUnavailable as exc:
        if gpu:
            raise TensorRTUnavailable(f"{exc}; and there is no CUDA GPU here: {gpu}") from exc.__cause__
        raise
    if gpu:
        raise TensorRTUnavailable(f"TensorRT engines need an NVIDIA CUDA GPU: {gpu}")
    return trt


@functools.cache
def trt_logger() -> Any:
    """One TensorRT logger per process (TensorRT keeps the first one it is given), forwarding
    to :mod:`logging` and remembering the last errors for :class:`EngineBuildError`."""
    trt = import_tensorrt()
    levels = {
        trt.ILogger.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.ERROR: logging.ERROR,
        trt.ILogger.WARNING: logging.WARNING,
        trt.ILogger.INFO: logging.DEBUG,  # TensorRT's INFO is chatty
        trt.ILogger.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):  # type: ignore[name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                self.errors = [*self.errors[-9:], msg]
            LOG.log(level, "TensorRT: %s", msg)

    return _Logger()


# --------------------------------------------------------------------------- cache key


@dataclass(frozen=True)
class EngineKey:
    """What an engine depends on; :meth:`digest` names its cache folder."""

    gpu: str  # torch.cuda.get_device_name()
    tensorrt: str  # tensorrt.__version__
    onnx: str  # :func:`onnx_digest` of the graphs
    precision: str  # fp16 | fp32
    max_batch: int

    def digest(self) -> str:
        data = {"format": ENGINE_FORMAT, "opt_batch": OPT_BATCH, **asdict(self)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def onnx_digest(graphs: dict[str, Path]) -> str:
    """SHA-256 over the ONNX files (by graph name)."""
    hashes = {name: file_sha256(path) for name, path in sorted(graphs.items())}
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def engine_cache_root() -> Path:
    """``$FACESTREAM_CACHE/trt`` (else ``$XDG_CACHE_HOME`` or ``~/.cache``, ``/facestream/trt``)."""
    return cache_root().parent / "trt"


def has_fast_fp16(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability has fast native FP16 (sm_53, 60, 62, 70+)."""
    return capability >= (7, 0) or capability in {(5, 3), (6, 0), (6, 2)}


def resolve_precision(requested: str, capability: tuple[int, int]) -> str:
    """``requested``, except FP16 on a GPU without fast FP16, which builds FP32."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp16" and not has_fast_fp16(capability):
        LOG.warning("GPU of compute capability %d.%d has no fast FP16: building FP32", *capability)
        return "fp32"
    return requested


# --------------------------------------------------------------------------- FP16 graphs


class _HalfCompute(nn.Module):
    """``net`` in FP16 between FP32 inputs and outputs (for strongly typed TensorRT)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.half()

    def forward(self, *inputs: torch.Tensor) -> Any:
        out = self.net(*(x.half() for x in inputs))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def export_fp16_onnx(weights: WeightSet, out_dir: Path, names: Iterable[str]) -> dict[str, Path]:
    """The graphs ``names`` (except :data:`FP32_GRAPHS`) exported with FP16 weights and compute and
    FP32 inputs/outputs into ``out_dir``; same names, inputs and dynamic batch axis as the FP32
    export."""
    wanted = set(names) - FP32_GRAPHS
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for spec in graph_specs(weights):
        if spec.name in wanted:
            half = GraphSpec(spec.name, _HalfCompute(spec.module), spec.inputs, spec.outputs)
            paths[spec.name] = export_graph(half, out_dir / f"{spec.name}.onnx")
    return paths


# --------------------------------------------------------------------------- building


def parser_errors(parser: Any) -> list[str]:
    """Each ONNX parser error as ``node N (name, Op): description``."""
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        where = f"node {error.node()}"
        name = getattr(error, "node_name", lambda: "")()
        operator = getattr(error, "node_operator", lambda: "")()
        if name or operator:
            where += f" ({', '.join(part for part in (name, operator) if part)})"
        lines.append(f"{where}: {error.desc()}")
    return lines


def _profile(builder: Any, network: Any, graph: str, max_batch: int) -> Any:
    """One optimisation profile: every input at batch 1 / OPT_BATCH / max_batch."""
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        if shape[0] != -1 or any(d < 0 for d in shape[1:]):
            raise EngineBuildError(
                graph,
                f"input {tensor.name!r} has shape {shape}; expected a dynamic batch axis only "
                "(re-export with facestream export)",
            )
        rest = shape[1:]
        profile.set_shape(tensor.name, (1, *rest), (min(OPT_BATCH, max_batch), *rest), (max_batch, *rest))
    return profile


def build_engine(
    trt: ModuleType,
    onnx_path: Path,
    plan_path: Path,
    *,
    graph: str,
    fp16: bool,
    max_batch: int,
    workspace_bytes: int | None = None,
) -> Path:
    """Parse ``onnx_path``, build its engine and write it to ``plan_path`` (atomically).

    ``fp16`` uses ``BuilderFlag.FP16`` where TensorRT still has it (10.x); on TensorRT without it
    (11+) the graph itself must be FP16 (:func:`export_fp16_onnx`) and the network is created
    strongly typed. Raises :class:`EngineBuildError` naming the graph and each parser error.
    """
    logger = trt_logger()
    builder = trt.Builder(logger)
    weak_fp16 = fp16 and hasattr(trt.BuilderFlag, "FP16")
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 1 << int(strong) if fp16 and not weak_fp16 and strong is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser) or ["(the parser gave no details)"]
        raise EngineBuildError(graph, f"cannot parse {onnx_path}:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    config.add_optimization_profile(_profile(builder, network, graph, max_batch))
    logger.errors = []
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        log = "\n  ".join(logger.errors) or "(see the TensorRT log above)"
        raise EngineBuildError(graph, f"build_serialized_network failed for {onnx_path}:\n  {log}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(serialized)
    os.replace(tmp, plan_path)
    return plan_path


@dataclass(frozen=True)
class EngineSet:
    """Built engines: ``plans`` maps each graph name to its ``.plan`` file in ``directory``."""

    directory: Path
    plans: dict[str, Path]
    key: EngineKey


def gpu_name(device: int = 0) -> str:
    return torch.cuda.get_device_name(device)


def build_engines(
    weights: WeightSet,
    *,
    out: str | Path | None = None,
    precision: str = "fp16",
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_gb: float | None = None,
    progress: Progress | None = None,
) -> EngineSet:
    """TensorRT engines of every graph of ``weights``, built once and cached (see the module
    docstring); ``out`` replaces the cache root. ``precision`` ``fp16`` falls back to FP32 on GPUs
    without fast FP16. Raises :class:`TensorRTUnavailable` without TensorRT or a GPU and
    :class:`EngineBuildError` when a graph does not parse or build."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    trt = require_gpu()
    say = progress or (lambda message: LOG.info("%s", message))
    graphs = cached_export(weights, progress=lambda name: say(f"exporting {name} to ONNX ..."))
    chosen = resolve_precision(precision, torch.cuda.get_device_capability())
    key = EngineKey(gpu_name(), str(trt.__version__), onnx_digest(graphs), chosen, max_batch)
    directory = Path(out) if out is not None else engine_cache_root()
    directory = directory / key.digest()
    plans = {name: directory / f"{name}.plan" for name in graphs}
    missing = [name for name, plan in plans.items() if not plan.is_file()]
    sources = dict(graphs)
    if chosen == "fp16" and missing and not hasattr(trt.BuilderFlag, "FP16"):
        say("exporting FP16 graphs for strongly typed TensorRT ...")
        sources.update(export_fp16_onnx(weights, directory / "onnx-fp16", missing))
    workspace = int(workspace_gb * 2**30) if workspace_gb else None
    for name in graphs:
        if name not in missing:
            say(f"{name}: cached ({plans[name]})")
            continue
        say(f"{name}: building {chosen} engine, batch 1..{max_batch} ...")
        start = time.perf_counter()
        fp16 = chosen == "fp16" and name not in FP32_GRAPHS
        build_engine(
            trt,
            sources[name],
            plans[name],
            graph=name,
            fp16=fp16,
            max_batch=max_batch,
            workspace_bytes=workspace,
        )
        say(f"{name}: built in {time.perf_counter() - start:.0f} s")
    manifest = {"format": ENGINE_FORMAT, **asdict(key), "graphs": sorted(plans)}
    (directory / "engines.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return EngineSet(directory, plans, key)
