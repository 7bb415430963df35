"""GPU speed benchmark (``make bench-gpu``): per-stage FPS of the GPU backends.

``python -m facestream.engines.bench_gpu --out bench/gpu`` measures, with random weights at 512²
(ResNet-50 N_feat) and batch 1 and 8, every network stage on

- ``tensorrt``: FP16 TensorRT engines (when TensorRT is installed; else the reason is recorded),
- ``torch-cuda``: PyTorch on the GPU under FP16 autocast,

and, when :mod:`facestream.engines.cuda_warp` exists and works, the custom warp kernel against
torch's ``grid_sample`` warp (:func:`facestream.models.warp`) on device tensors. It writes
``gpu.json`` and ``gpu.png`` (the plot needs matplotlib). Without a CUDA GPU it exits with
status 2 and says so.

Stage times are per :class:`~facestream.engines.networks.Networks` call with numpy in and out,
so host<->device copies are included, as the pipeline sees them: the median and 90th percentile
of ``--repeats`` calls after :data:`WARMUP` calls; FPS = batch / median time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facestream.engines.backend_tensorrt import TensorRTNetworks
from facestream.engines.backend_torch import TorchNetworks
from facestream.engines.networks import Networks
from facestream.engines.tensorrt_build import TensorRTError, cuda_problem
from facestream.engines.weights import WeightSet, write_random_weights
from facestream.models import warp
from facestream.models.config import SegmentationConfig

try:  # optional dependency (pip install 'facestream[bench]'); only the plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - depends on the environment
    Figure = None  # type: ignore[assignment,misc]

WARMUP = 5
STAGES = ("features", "task", "flow", "warp", "policy", "dvsnet")
NO_GPU_MESSAGE = (
    "facestream bench-gpu: no CUDA GPU here ({problem}); this benchmark needs an NVIDIA GPU "
    "(TensorRT: pip install 'facestream[gpu]'). The CPU benchmark is `make bench`."
)


def _stats(times_ms: Sequence[float], batch: int) -> dict[str, float]:
    median = float(np.median(times_ms))
    return {
        "median_ms": round(median, 3),
        "p90_ms": round(float(np.percentile(times_ms, 90)), 3),
        "fps": round(batch * 1000.0 / median, 1),
    }


def _time(call: Callable[[], object], repeats: int, *, synchronize: bool = False) -> list[float]:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if synchronize:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def stage_calls(networks: Networks, batch: int) -> dict[str, Callable[[], object]]:
    """One zero-argument call per stage of ``networks`` on random inputs of ``batch`` rows."""
    rng = np.random.default_rng(0)
    seg, flow_cfg = networks.segmentation_config, networks.flow_config
    grid, six = seg.feature_size, flow_cfg.conv6_size

    def rand(*shape: int) -> np.ndarray:
        return rng.uniform(0.0, 1.0, (batch, *shape)).astype(np.float32)

    images, pairs = rand(3, seg.input_size, seg.input_size), rand(6, flow_cfg.input_size, flow_cfg.input_size)
    features, flow = rand(seg.feature_channels, grid, grid), rand(2, grid, grid) * 4 - 2
    scale, conv6 = rand(flow_cfg.scale_channels, grid, grid), rand(flow_cfg.conv6_channels, six, six)
    calls: dict[str, Callable[[], object]] = {
        "features": lambda: networks.features(images),
        "flow": lambda: networks.flow(pairs),
        "warp": lambda: networks.warp(features, flow, scale),
    }
    if seg.split != "scores":
        calls["task"] = lambda: networks.task(features)
    if networks.has_policy:
        calls["policy"] = lambda: networks.key_probability(conv6, rand(2))
    if networks.has_dvsnet:
        calls["dvsnet"] = lambda: networks.dvsnet_score(conv6)
    return {stage: calls[stage] for stage in STAGES if stage in calls}


def bench_networks(networks: Networks, batches: Sequence[int], repeats: int) -> dict[str, Any]:
    """{batch: {stage: stats}} for ``networks``."""
    return {
        str(batch): {
            stage: _stats(_time(call, repeats), batch) for stage, call in stage_calls(networks, batch).items()
        }
        for batch in batches
    }


def _make_backend(name: str, weights: WeightSet, max_batch: int) -> tuple[Networks, dict[str, Any]]:
    if name == "tensorrt":
        trt = TensorRTNetworks(weights, precision="fp16", max_batch=max_batch)
        return trt, {"precision": trt.precision, "warp": trt.warp_note}
    return TorchNetworks(weights, device="cuda", fp16=True), {"precision": "fp16 autocast"}


def bench_warp_kernel(
    weights_config: SegmentationConfig, batches: Sequence[int], repeats: int
) -> dict[str, Any]:
    """The custom CUDA warp kernel against torch's grid_sample warp on device tensors."""
    try:
        kernel = importlib.import_module("facestream.engines.cuda_warp").CudaWarp()
    except Exception as exc:  # the kernel is optional (pycuda, nvcc)
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    call = kernel.warp
    result: dict[str, Any] = {}
    for batch in batches:
        try:
            result[str(batch)] = _kernel_row(call, weights_config, batch, repeats)
        except Exception as exc:
            return {"skipped": f"CudaWarp failed: {type(exc).__name__}: {exc}"}
    return result


@torch.inference_mode()
def _kernel_row(
    call: Callable[..., torch.Tensor], config: SegmentationConfig, batch: int, repeats: int
) -> dict:
    grid, channels = config.feature_size, config.feature_channels
    generator = torch.Generator(device="cuda").manual_seed(0)
    features = torch.rand(batch, channels, grid, grid, device="cuda", generator=generator)
    flow = torch.rand(batch, 2, grid, grid, device="cuda", generator=generator) * 6 - 3
    scale = torch.rand(batch, channels, grid, grid, device="cuda", generator=generator) + 0.5
    diff = float((call(features, flow, scale) - warp(features, flow, scale)).abs().max())
    return {
        "cuda_warp": _stats(_time(lambda: call(features, flow, scale), repeats, synchronize=True), batch),
        "grid_sample": _stats(_time(lambda: warp(features, flow, scale), repeats, synchronize=True), batch),
        "max_abs_diff": diff,
    }


def run_bench_gpu(
    out_dir: Path,
    *,
    size: int = 512,
    backbone: str = "resnet50",
    batches: Sequence[int] = (1, 8),
    repeats: int = 30,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure, write ``gpu.json`` (and ``gpu.png`` with matplotlib) into ``out_dir``, return the dict."""
    config = SegmentationConfig(backbone=backbone, input_size=size)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": {"size": size, "backbone": backbone, "batches": list(batches), "repeats": repeats},
        "backends": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        weights = write_random_weights(folder, config)  # seeded: the engine cache is reused
        for name in ("tensorrt", "torch-cuda"):
            say(f"bench-gpu: {name} ...")
            try:
                networks, info = _make_backend(name, weights, max(batches))
            except (TensorRTError, RuntimeError) as exc:
                result["backends"][name] = {"skipped": f"{type(exc).__name__}: {exc}"}
                say(f"bench-gpu: {name} skipped: {exc}")
                continue
            result["backends"][name] = {**info, "stages": bench_networks(networks, batches, repeats)}
            del networks
            torch.cuda.empty_cache()
    say("bench-gpu: warp kernel ...")
    result["warp_kernel"] = bench_warp_kernel(config, batches, repeats)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps(result, indent=2))
    if Figure is not None:
        plot(result, out_dir / "gpu.png")
    else:
        say("bench-gpu: no matplotlib, no gpu.png (pip install 'facestream[bench]')")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """FPS per stage (log scale), one panel per batch size, a bar per backend (and warp kernel)."""
    batches = [str(b) for b in result["settings"]["batches"]]
    figure = Figure(figsize=(7 * len(batches), 4.8))
    FigureCanvasAgg(figure)
    for ax, batch in zip(figure.subplots(1, len(batches), squeeze=False)[0], batches, strict=True):
        series = {
            name: data["stages"][batch] for name, data in result["backends"].items() if "stages" in data
        }
        kernel = result.get("warp_kernel", {}).get(batch)
        if kernel:
            series["warp: cuda_warp"] = {"warp": kernel["cuda_warp"]}
            series["warp: grid_sample"] = {"warp": kernel["grid_sample"]}
        positions = np.arange(len(STAGES))
        width = 0.8 / max(len(series), 1)
        for i, (name, stages) in enumerate(series.items()):
            fps = [stages[s]["fps"] if s in stages else np.nan for s in STAGES]
            ax.bar(positions + (i - (len(series) - 1) / 2) * width, fps, width, label=name)
        ax.set_xticks(positions, list(STAGES))
        ax.set_yscale("log")
        ax.set_ylabel("FPS (frames per second)")
        ax.set_title(f"{result['device']}, {result['settings']['size']}², batch {batch}")
        ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def summary(result: dict[str, Any]) -> str:
    """One line per backend and batch: the FPS of each stage (or why the backend was skipped)."""
    lines = []
    for name, data in result["backends"].items():
        if "skipped" in data:
            lines.append(f"{name}: skipped ({data['skipped']})")
        for batch, stages in data.get("stages", {}).items():
            fps = ", ".join(f"{stage} {row['fps']:g}" for stage, row in stages.items())
            lines.append(f"{name} batch {batch} FPS: {fps}")
    kernel = result.get("warp_kernel", {})
    if "skipped" in kernel:
        lines.append(f"warp kernel: skipped ({kernel['skipped']})")
    for batch, row in kernel.items():
        if isinstance(row, dict):
            lines.append(
                f"warp batch {batch} FPS: cuda_warp {row['cuda_warp']['fps']:g}, "
                f"grid_sample {row['grid_sample']['fps']:g} (max abs diff {row['max_abs_diff']:.2g})"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facestream.engines.bench_gpu", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/gpu"), help="output folder")
    parser.add_argument("--size", type=int, default=512, help="segmentation input side (default 512)")
    parser.add_argument("--backbone", choices=["mobilenet_v2", "resnet50"], default="resnet50")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(NO_GPU_MESSAGE.format(problem=problem), file=sys.stderr)
        return 2
    result = run_bench_gpu(
        args.out, size=args.size, backbone=args.backbone, batches=args.batches, repeats=args.repeats
    )
    print(summary(result))
    print(f"wrote {args.out / 'gpu.json'}" + (f" and {args.out / 'gpu.png'}" if Figure is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
