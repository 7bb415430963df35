"""Speed benchmark: per-stage costs, I/O costs and end-to-end FPS of every key scheduler.

Everything is measured on this machine with randomly initialised weights (speed does not depend
on training); nothing in the report is hard-coded. :func:`run_benchmark` writes ``bench.json``
and ``bench.png`` and returns the same dict; :func:`format_tables` turns it into markdown.

Times are milliseconds. Stage costs are the median and 90th percentile of ``repeats`` calls after
:data:`WARMUP` untimed calls. FPS = frames / sum of the pipeline's per-frame ``total`` times, on
frames decoded into memory beforehand (decoding is reported separately). Learned schedulers
(flow, dvsnet, rl) cannot be trained here, so their knob is calibrated to each target AKI from
the values they report over the clip (see :func:`_calibrate`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import onnxruntime as ort
import torch

from facestream.engines.backend_onnxruntime import OrtNetworks
from facestream.engines.backends import BACKENDS, create_networks
from facestream.engines.dis_flow import DEFAULT_FLOW, FLOWS, with_flow
from facestream.engines.export import cached_export
from facestream.engines.face import Box, FaceLocator, crop_square
from facestream.engines.int8 import write_timing_calibration
from facestream.engines.networks import Networks
from facestream.engines.pipeline import FrameResult, StreamSegmenter, to_chw
from facestream.engines.schedulers import Decision, DecisionContext, Scheduler, make_scheduler
from facestream.engines.video import MASK_PNG, open_source
from facestream.engines.weights import WeightSet, save_network, write_random_weights
from facestream.models.config import BACKBONES, SegmentationConfig

try:  # optional dependency (pip install 'facestream[bench]'); only the plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError:  # pragma: no cover - depends on the environment
    Figure = None  # type: ignore[assignment,misc]

WARMUP = 3
AKIS = (1, 10, 30, 120)
DYNAMIC = ("flow", "dvsnet", "rl")
SCHEDULERS = ("fixed", "random", *DYNAMIC)
NET_STAGES = ("flow", "warp", "correct", "policy", "dvsnet")
NONKEY_STAGES = ("crop", "flow", "warp", "correct", "task")
KEY_ABOVE = {"flow": True, "dvsnet": False, "rl": True}  # key when value > knob, else value < knob
KNOB_RANGE = {"flow": (0.0, np.inf), "dvsnet": (-np.inf, np.inf), "rl": (0.0, 1.0)}
TARGET_NONKEY_MS = 15.0  # ONNX Runtime non-key frame at 256², 2 threads
TARGET_AKI = 30
TARGET_SPEEDUP = 5.0  # dynamic / per-frame throughput at TARGET_AKI with ResNet-50
JPEG_QUALITY = 90
CALIBRATION_TRIES = 5  # timed runs per learned scheduler and AKI, at most
CALIBRATION_TOLERANCE = 0.15  # accepted miss of the wanted key count (at least one key)
STAGE_LABELS = {
    "key:mobilenet_v2": "N_feat MobileNet-V2",
    "key:resnet50": "N_feat ResNet-50",
    "flow": "FlowNet2-s",
    "conv6": "F's Conv6 alone (rl/dvsnet beside DIS)",
    "warp": "warp",
    "correct": "warp corrector (int8 on onnxruntime)",
    "correct_fp32": "warp corrector, float32",
    "policy": "RL policy",
    "dvsnet": "DVSNet head",
    "nonkey": "non-key frame",
}
FLOW_LABELS = {"flownet": "FlowNet2-s", "dis": "DIS (OpenCV)"}

Say = Callable[[str], None]
Stats = dict[str, float]
NetworksFor = Callable[[Scheduler], Networks]  # the networks a scheduler's pipeline runs on


@dataclass(frozen=True)
class BenchSettings:
    """The arguments of :func:`run_benchmark` (see there)."""

    clip: Path
    sizes: tuple[int, ...]
    backends: tuple[str, ...]
    threads: int
    repeats: int
    pipeline_frames: int
    key_backbone: str
    pipeline_size: int
    pipeline_backend: str
    akis: tuple[int, ...]
    flow: str = DEFAULT_FLOW

    def __post_init__(self) -> None:
        if not Path(self.clip).is_file():
            raise FileNotFoundError(f"benchmark clip {self.clip} does not exist")
        if not self.sizes or not self.backends:
            raise ValueError(f"need a size and a backend, got {self.sizes}, {self.backends}")
        unknown = sorted(set(self.backends) - set(BACKENDS) | {self.pipeline_backend} - set(BACKENDS))
        if unknown:
            raise ValueError(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
        for size in (*self.sizes, self.pipeline_size):
            SegmentationConfig(input_size=size)  # raises naming the size when it cannot work
        if self.threads < 1 or self.repeats < 1 or self.pipeline_frames < 2:
            raise ValueError(
                "need threads >= 1, repeats >= 1, pipeline_frames >= 2; got "
                f"{self.threads}, {self.repeats}, {self.pipeline_frames}"
            )
        if self.key_backbone not in BACKBONES:
            raise ValueError(f"key_backbone must be one of {BACKBONES}, got {self.key_backbone!r}")
        if not self.akis or min(self.akis) < 1:
            raise ValueError(f"target AKIs must be >= 1, got {self.akis}")
        if self.flow not in FLOWS:
            raise ValueError(f"unknown flow {self.flow!r}; choose one of {', '.join(FLOWS)}")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


# ----------------------------------------------------------------------------- entry points


def run_benchmark(
    *,
    clip: Path,
    out_dir: Path,
    sizes: Sequence[int] = (256, 512),
    backends: Sequence[str] = ("torch", "onnxruntime"),
    threads: int = 2,
    repeats: int = 20,
    pipeline_frames: int = 300,
    key_backbone: str = "resnet50",
    progress: bool = True,
    pipeline_size: int = 256,
    pipeline_backend: str = "onnxruntime",
    akis: Sequence[int] = AKIS,
    flow: str = DEFAULT_FLOW,
) -> dict[str, Any]:
    """Measure everything, write ``out_dir/bench.json`` and ``out_dir/bench.png``, return the dict.

    ``backends`` × ``sizes``: per-stage costs (N_feat with both backbones; FlowNet2-s, warp, policy
    and DVSNet head, and the pipeline's non-key frame with ``key_backbone``). End-to-end FPS: the
    first ``pipeline_frames`` frames of ``clip`` (fewer if the clip is shorter) through the
    pipeline with ``key_backbone`` at ``pipeline_size`` on ``pipeline_backend``, for every
    scheduler at every target AKI in ``akis``. ``threads`` bounds torch, OpenCV and ONNX Runtime.
    ``flow``: ``flownet`` (F) or ``dis`` (OpenCV DIS optical flow; the rl/dvsnet schedulers then
    run F as well for its Conv6 features, the others do not).
    """
    settings = BenchSettings(
        clip=Path(clip),
        sizes=tuple(sizes),
        backends=tuple(backends),
        threads=threads,
        repeats=repeats,
        pipeline_frames=pipeline_frames,
        key_backbone=key_backbone,
        pipeline_size=pipeline_size,
        pipeline_backend=pipeline_backend,
        akis=tuple(akis),
        flow=flow,
    )
    say = _printer(progress)
    with _thread_limits(threads), tempfile.TemporaryDirectory(prefix="facestream-bench-") as tmp:
        result = _measure_all(settings, _NetworkFactory(Path(tmp), threads, flow), say)
    return _write_outputs(result, Path(out_dir), say)


def format_tables(result: dict[str, Any]) -> str:
    """Markdown for a README: targets, stage costs, I/O, non-key frame, FPS per scheduler × AKI."""
    parts = (
        _targets_markdown(result),
        _stage_markdown(result),
        _io_markdown(result),
        _nonkey_markdown(result),
        _pipeline_markdown(result),
    )
    return "\n\n".join(parts) + "\n"


def _measure_all(settings: BenchSettings, factory: _NetworkFactory, say: Say) -> dict[str, Any]:
    frames, decode_ms = _decode_frames(settings.clip, settings.pipeline_frames)
    say(f"decoded {len(frames)} frames of {settings.clip}: {np.median(decode_ms):.2f} ms/frame")
    result = _header(settings, frames)
    result["io"] = _io_costs(frames[0], decode_ms, settings.repeats, say)
    result["stages"], result["nonkey"] = _stage_tables(settings, factory, frames, say)
    key = (settings.pipeline_backend, settings.pipeline_size, settings.key_backbone)
    result["pipeline"] = _pipeline_table(
        lambda scheduler: factory.get(*key, conv6=scheduler.needs_conv6), frames, settings.akis, say
    )
    result["targets"] = _targets(result, settings)
    return result


# ----------------------------------------------------------------------------- setup


def _printer(progress: bool) -> Say:
    """A function that prints one progress line to stderr (or nothing), with elapsed seconds."""
    start = time.perf_counter()

    def say(message: str) -> None:
        if progress:
            elapsed = time.perf_counter() - start
            print(f"[bench {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


@contextmanager
def _thread_limits(threads: int) -> Iterator[None]:
    """torch and OpenCV use ``threads`` threads for the benchmark; restored afterwards."""
    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


class _NetworkFactory:
    """Random-weight networks per (backend, size, backbone), built on first use and kept.

    Weights are written once per (size, backbone) under ``directory`` (seed 0, so the ONNX export
    cache keyed by their hash is reused across runs); ONNX Runtime gets ``threads`` intra-op
    threads, torch is limited by :func:`_thread_limits`. With ``flow`` ``dis``, each network
    comes wrapped twice (F run for Conv6 or not), around the same backend networks.
    """

    def __init__(self, directory: Path, threads: int, flow: str = DEFAULT_FLOW) -> None:
        self.directory = directory
        self.threads = threads
        self.flow = flow
        self._weights: dict[tuple[int, str], WeightSet] = {}
        self._networks: dict[tuple[str, int, str], Networks] = {}
        self._flows: dict[tuple[str, int, str, bool], Networks] = {}

    def weights(self, size: int, backbone: str) -> WeightSet:
        if (size, backbone) not in self._weights:
            config = SegmentationConfig(backbone=backbone, input_size=size)
            folder = self.directory / f"{backbone}-{size}"
            weights = write_random_weights(folder, config)
            _cut_expert_feedback(weights)
            # the commands' default corrector on onnxruntime is int8 (shipped ranges): time that
            write_timing_calibration(weights, cached_export(weights)["correction"])
            self._weights[size, backbone] = weights
        return self._weights[size, backbone]

    def get(self, backend: str, size: int, backbone: str, *, conv6: bool = False) -> Networks:
        """The networks with the benchmark's flow; ``conv6``: a scheduler reads F's Conv6."""
        key = (backend, size, backbone)
        if key not in self._networks:
            weights = self.weights(size, backbone)
            self._networks[key] = create_networks(
                weights, backend, threads=self.threads, correct_precision="auto"
            )
        if (*key, conv6) not in self._flows:
            self._flows[(*key, conv6)] = with_flow(self._networks[key], self.flow, conv6=conv6)
        return self._flows[(*key, conv6)]

    def release(self, keep: tuple[str, int, str]) -> None:
        """Forget every network but ``keep`` (frees memory between measurements)."""
        self._networks = {k: v for k, v in self._networks.items() if k == keep}
        self._flows = {k: v for k, v in self._flows.items() if k[:3] == keep}


def _cut_expert_feedback(weights: WeightSet) -> None:
    """Zero the random policy's weights on [KAR, LKD].

    An untrained policy whose key probability grows with KAR keys every frame once it keys at all,
    so no tau reaches AKI 10-120. Speed does not depend on weight values, so the benchmark removes
    that feedback and calibrates tau on the Conv6-driven output like the other thresholds.
    """
    policy = weights.load("policy")
    with torch.no_grad():
        at = policy.config.trunk_size  # FC3's inputs: [FC2 (+ quality) (at), KAR, LKD, cues...]
        policy.fc3.weight[:, at : at + 2] = 0.0
    save_network(policy, weights.paths["policy"], {"trained": False, "note": "bench: expert inputs cut"})


def _header(settings: BenchSettings, frames: list[np.ndarray]) -> dict[str, Any]:
    height, width = frames[0].shape[:2]
    clip = {"path": str(settings.clip), "width": width, "height": height, "frames": len(frames)}
    return {"machine": _machine_info(settings.threads), "settings": settings.to_json(), "clip": clip}


def _machine_info(threads: int) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "opencv": cv2.__version__,
        "av": av.__version__,
        "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def cpu_model() -> str:
    """The first ``model name`` of /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else (platform.processor() or "unknown")


# ----------------------------------------------------------------------------- timing


def _stats(samples_ms: Sequence[float]) -> Stats:
    if len(samples_ms) == 0:
        raise ValueError("no samples to summarise")
    values = np.asarray(samples_ms, dtype=np.float64)
    return {
        "median_ms": float(np.median(values)),
        "p90_ms": float(np.percentile(values, 90)),
        "mean_ms": float(values.mean()),
        "n": int(values.size),
    }


def time_ms(call: Callable[[], object], repeats: int, warmup: int = WARMUP) -> Stats:
    """Median/p90/mean milliseconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return _stats(samples)


# ----------------------------------------------------------------------------- decode and encode


def _decode_frames(clip: Path, count: int) -> tuple[list[np.ndarray], list[float]]:
    """The first ``count`` RGB frames of ``clip`` and the ms each took to decode (PyAV)."""
    frames: list[np.ndarray] = []
    times: list[float] = []
    with open_source(str(clip), max_frames=count) as source:
        iterator = iter(source)
        while True:
            start = time.perf_counter()
            frame = next(iterator, None)
            if frame is None:
                break
            times.append((time.perf_counter() - start) * 1e3)
            frames.append(frame.rgb)
    if len(frames) < 2:
        raise ValueError(f"{clip} has {len(frames)} decodable frames; the benchmark needs 2")
    return frames, times


def _io_costs(frame: np.ndarray, decode_ms: list[float], repeats: int, say: Say) -> dict[str, Any]:
    mask = _face_mask(frame.shape[:2])
    bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    jpeg = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    costs = {
        "decode": _stats(decode_ms),
        "encode_png_mask": time_ms(lambda: cv2.imencode(".png", mask, MASK_PNG), repeats),
        "encode_jpeg_frame": time_ms(lambda: cv2.imencode(".jpg", bgr, jpeg), repeats),
    }
    for name, stats in costs.items():
        say(f"{name}: {stats['median_ms']:.2f} ms (p90 {stats['p90_ms']:.2f})")
    return costs


def _face_mask(frame_hw: tuple[int, int]) -> np.ndarray:
    """A full-frame (H, W) uint8 mask shaped like a face (skin, eyes, lips, inner mouth)."""
    height, width = frame_hw
    mask = np.zeros((height, width), np.uint8)
    cx, cy, r = width // 2, height // 2, min(height, width) // 4
    cv2.ellipse(mask, (cx, cy), (int(0.8 * r), r), 0, 0, 360, 1, -1)
    for dx in (-r // 3, r // 3):
        cv2.ellipse(mask, (cx + dx, cy - r // 4), (r // 6, r // 12), 0, 0, 360, 2, -1)
    cv2.ellipse(mask, (cx, cy + r // 2), (r // 3, r // 8), 0, 0, 360, 3, -1)
    cv2.ellipse(mask, (cx, cy + r // 2), (r // 5, r // 20), 0, 0, 360, 4, -1)
    return mask


# ----------------------------------------------------------------------------- stage costs


def _stage_tables(
    settings: BenchSettings, factory: _NetworkFactory, frames: list[np.ndarray], say: Say
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of per-stage costs and of non-key frame costs, for every backend × size."""
    keep = (settings.pipeline_backend, settings.pipeline_size, settings.key_backbone)
    stages: list[dict[str, Any]] = []
    nonkey: list[dict[str, Any]] = []
    for backend in settings.backends:
        for size in settings.sizes:
            where = {"backend": backend, "size": size}
            for backbone in BACKBONES:
                networks = factory.get(backend, size, backbone)
                stats = time_ms(_key_call(networks, frames[0]), settings.repeats)
                stages.append(_row(where, "key", stats, say, backbone=backbone))
            networks = factory.get(backend, size, settings.key_backbone)
            for stage, call in _network_calls(networks, frames[0], frames[1]).items():
                stages.append(_row(where, stage, time_ms(call, settings.repeats), say))
            if networks.correct_precision == "int8":  # and the float32 graph it replaces
                plain = OrtNetworks(factory.weights(size, settings.key_backbone), threads=factory.threads)
                call = _network_calls(plain, frames[0], frames[1])["correct"]
                stages.append(_row(where, "correct_fp32", time_ms(call, settings.repeats), say))
            nonkey.append(_nonkey_row(where, networks, frames, settings.repeats, say))
            factory.release(keep)
    return stages, nonkey


def _row(where: dict, stage: str, stats: Stats, say: Say, backbone: str | None = None) -> dict:
    name = stage if backbone is None else f"{stage}:{backbone}"
    say(
        f"{where['backend']} {where['size']}² {name}: {stats['median_ms']:.2f} ms (p90 {stats['p90_ms']:.2f})"
    )
    return {**where, "stage": stage, "backbone": backbone, **stats}


def _square(frame: np.ndarray, size: int) -> np.ndarray:
    """The centre square of an (H, W, 3) frame resized to ``size`` × ``size``."""
    height, width = frame.shape[:2]
    side = min(height, width)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return crop_square(frame, Box(x0, y0, x0 + side, y0 + side), size)


def _key_call(networks: Networks, frame: np.ndarray) -> Callable[[], object]:
    image = to_chw(_square(frame, networks.segmentation_config.input_size))[None]
    return lambda: networks.features(image)


def _network_calls(
    networks: Networks, current: np.ndarray, key: np.ndarray
) -> dict[str, Callable[[], object]]:
    """Calls of F, W, the policy and the DVSNet head on realistic inputs, by stage name."""
    size = networks.segmentation_config.input_size
    features = networks.features(to_chw(_square(key, size))[None])
    small = networks.flow_input_size
    pair = np.concatenate((to_chw(_square(current, small)), to_chw(_square(key, small))))[None]
    flow = networks.flow(pair)
    expert = np.zeros((1, networks.expert_size), dtype=np.float32)
    expert[0, :2] = (1 / 30, 10 / 90)
    calls = {
        "flow": lambda: networks.flow(pair),
        "conv6": lambda: networks.conv6_features(pair),
        "warp": lambda: networks.warp(features, flow.flow, flow.scale),
        "policy": lambda: networks.key_probability(flow.conv6, expert),
        "dvsnet": lambda: networks.dvsnet_score(flow.conv6),
    }
    correction = networks.correction_config
    if correction is not None:
        side = correction.image_size
        crops = (to_chw(_square(current, side))[None], to_chw(_square(key, side))[None])
        scores = networks.task(features)
        calls["correct"] = lambda: networks.correct(*crops, flow.flow, scores)
    return calls


def _nonkey_row(
    where: dict, networks: Networks, frames: list[np.ndarray], repeats: int, say: Say
) -> dict[str, Any]:
    """The pipeline's non-key frame: crop + flow + warp + task from StreamSegmenter's timings."""
    count = 1 + WARMUP + repeats
    clip = [frames[i % len(frames)] for i in range(count)]
    results = _run(networks, make_scheduler("fixed", count + 1), clip, FaceLocator())
    timings = [r.timings for r in results if r.face and not r.key][WARMUP:]
    if not timings:
        raise RuntimeError("no face found on the clip's first frames: cannot time non-key frames")
    sums = _stats([sum(t.get(stage, 0.0) for stage in NONKEY_STAGES) for t in timings])
    parts = {s: float(np.median([t.get(s, 0.0) for t in timings])) for s in NONKEY_STAGES}
    say(
        f"{where['backend']} {where['size']}² non-key frame: {sums['median_ms']:.2f} ms "
        f"(p90 {sums['p90_ms']:.2f})"
    )
    total = _stats([t["total"] for t in timings])
    return {
        **where,
        "backbone": networks.segmentation_config.backbone,
        **sums,
        "parts_median_ms": parts,
        "frame_total": total,
    }


# ----------------------------------------------------------------------------- pipeline FPS


def _run(
    networks: Networks, scheduler: Scheduler, frames: list[np.ndarray], locator: FaceLocator
) -> list[FrameResult]:
    # No forced keys: the benchmark times each scheduler at the AKI it is set up for (up to 120).
    segmenter = StreamSegmenter(networks, scheduler, locator, max_key_distance=None)
    return [segmenter.step(frame) for frame in frames]


def _summary(results: list[FrameResult]) -> dict[str, Any]:
    """Frames, keys, achieved AKI (frames / keys), FPS (frames / sum of total ms) and the median
    ms per stage over key frames."""
    total_ms = sum(r.timings["total"] for r in results)
    keys = [r.timings for r in results if r.key]
    stages = sorted({stage for timings in keys for stage in timings})
    return {
        "frames": len(results),
        "keys": len(keys),
        "no_face": sum(not r.face for r in results),
        "achieved_aki": len(results) / len(keys) if keys else None,
        "mean_ms": total_ms / len(results),
        "fps": 1e3 * len(results) / total_ms,
        "key_frame_median_ms": {s: float(np.median([t.get(s, 0.0) for t in keys])) for s in stages},
    }


def _pipeline_table(
    networks: NetworksFor, frames: list[np.ndarray], akis: Sequence[int], say: Say
) -> dict[str, Any]:
    """End-to-end FPS of every scheduler at every target AKI, and speed-up over ``always``.

    ``networks(scheduler)``: the networks that scheduler runs on (they differ only in whether
    DIS flow also runs F for its Conv6 features). The per-frame baseline (``always``) runs first
    and last; the faster of the two is the baseline, so that a load spike during one of them
    cannot inflate the speed-ups.
    """
    locator = FaceLocator()
    probe, fixed = _ValueProbe(2), make_scheduler("fixed", 2)
    _run(networks(probe), probe, frames[: WARMUP + 2], locator)  # warm every network
    if networks(fixed) is not networks(probe):  # DIS without F: its own DIS instance
        _run(networks(fixed), fixed, frames[: WARMUP + 2], locator)
    first = _timed_run(networks, "always", 1, None, frames, locator, say)
    runs = _scheduler_runs(networks, frames, akis, locator, say)
    last = _timed_run(networks, "always", 1, None, frames, locator, say)
    baseline = max(first, last, key=lambda run: run["fps"])
    runs.insert(0, baseline)
    for run in runs:
        run["speedup"] = run["fps"] / baseline["fps"]
    plain = networks(make_scheduler("always"))
    seg = plain.segmentation_config
    where = {"backend": plain.backend, "size": seg.input_size, "backbone": seg.backbone}
    fps = {"baseline_fps": baseline["fps"], "baseline_runs_fps": [first["fps"], last["fps"]]}
    return {**where, "frames": len(frames), **fps, "runs": runs}


def _scheduler_runs(
    networks: NetworksFor, frames: list[np.ndarray], akis: Sequence[int], locator: FaceLocator, say: Say
) -> list[dict[str, Any]]:
    """One timed run per scheduler and target AKI (learned schedulers calibrated first)."""
    runs = []
    for aki in akis:
        values = _probe_values(networks, frames, aki, locator)
        for name in SCHEDULERS:
            if name in DYNAMIC:
                runs.append(_calibrated_run(networks, name, aki, values[name], frames, locator, say))
            else:
                runs.append(_timed_run(networks, name, aki, None, frames, locator, say))
    return runs


def _scheduler(name: str, aki: int, knob: float | None) -> Scheduler:
    """``name`` set up for a target AKI: fixed interval n = AKI, random rate 1/AKI (seeded),
    learned schedulers at their calibrated ``knob``."""
    if name == "fixed":
        return make_scheduler("fixed", aki)
    if name == "random":
        return make_scheduler("random", 1.0 / aki)
    return make_scheduler(name, knob)


def _timed_run(
    networks: NetworksFor,
    name: str,
    aki: int,
    knob: float | None,
    frames: list[np.ndarray],
    locator: FaceLocator,
    say: Say,
) -> dict[str, Any]:
    scheduler = _scheduler(name, aki, knob)
    summary = _summary(_run(networks(scheduler), scheduler, frames, locator))
    achieved = summary["achieved_aki"]
    say(
        f"pipeline {scheduler.describe()} target AKI {aki}: {summary['fps']:.2f} FPS, "
        f"achieved AKI {achieved if achieved is None else round(achieved, 2)}"
    )
    knob_info = {"knob": scheduler.knob, "knob_value": scheduler.knob_value}
    return {"scheduler": name, "target_aki": aki, **knob_info, **summary}


class _ValueProbe(Scheduler):
    """Keys at a fixed interval and records, per frame, the value each learned scheduler compares
    with its knob (flow magnitude, DVSNet score, key probability) in that very context."""

    name, needs_flow, needs_conv6 = "probe", True, True

    def __init__(self, interval: int) -> None:
        self.fixed = make_scheduler("fixed", interval)
        self.candidates = {name: make_scheduler(name) for name in DYNAMIC}
        self.values: dict[str, list[float]] = {name: [] for name in DYNAMIC}

    def decide(self, ctx: DecisionContext) -> Decision:
        for name, scheduler in self.candidates.items():
            value = scheduler.decide(ctx).value
            if value is not None:
                self.values[name].append(value)
        return self.fixed.decide(ctx)


def _probe_values(
    networks: NetworksFor, frames: list[np.ndarray], aki: int, locator: FaceLocator
) -> dict[str, list[float]]:
    """Each learned scheduler's decision values over ``frames`` in a fixed-interval pass with
    interval ``aki`` (so that KAR and LKD look as they will at that AKI)."""
    probe = _ValueProbe(aki)
    _run(networks(probe), probe, frames, locator)
    return probe.values


def _calibrated_run(
    networks: NetworksFor,
    name: str,
    aki: int,
    values: list[float],
    frames: list[np.ndarray],
    locator: FaceLocator,
    say: Say,
) -> dict[str, Any]:
    """The timed run of learned scheduler ``name`` whose key count comes closest to
    ``frames / aki``.

    The first knob is the quantile of the probe ``values`` that keys the wanted share of frames.
    The scheduler's own keys change KAR, LKD and the key frame, so that is only a first guess:
    while a run misses by more than :data:`CALIBRATION_TOLERANCE`, the knob is bisected between
    the last knobs that gave too many and too few keys (at first: the knobs that key all and none
    of the probe values), for at most :data:`CALIBRATION_TRIES` runs.
    """
    wanted = len(frames) / aki
    many, few = _threshold(values, 1.0, name), _threshold(values, 0.0, name)
    knob = _threshold(values, _key_rate(len(frames), aki), name)
    runs: list[dict[str, Any]] = []
    while len(runs) < CALIBRATION_TRIES:
        run = _timed_run(networks, name, aki, knob, frames, locator, say)
        runs.append(run)
        if abs(run["keys"] - wanted) <= max(1.0, CALIBRATION_TOLERANCE * wanted):
            break
        many, few = (knob, few) if run["keys"] > wanted else (many, knob)
        knob = (many + few) / 2
    best = min(runs, key=lambda r: abs(r["keys"] - wanted))
    return {**best, "calibration_runs": len(runs)}


def _key_rate(frames: int, aki: int) -> float:
    """Share of the decided frames (all but the first, always key) that must be keys."""
    return float(np.clip((frames / aki - 1.0) / (frames - 1.0), 0.0, 1.0))


def _threshold(values: Sequence[float], rate: float, name: str) -> float:
    """The knob for which scheduler ``name`` keys a share ``rate`` of ``values``."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    if ordered.size == 0:
        raise RuntimeError(f"no decision values of the {name} scheduler to calibrate with")
    count = int(np.clip(round(rate * ordered.size), 0, ordered.size))
    if KEY_ABOVE[name]:  # key when value > knob: the count largest values exceed it
        rest = ordered.size - count - 1
        knob = ordered[rest] if rest >= 0 else np.nextafter(ordered[0], -np.inf)
    else:  # key when value < knob: the count smallest values are below it
        knob = ordered[count] if count < ordered.size else np.nextafter(ordered[-1], np.inf)
    low, high = KNOB_RANGE[name]
    return float(np.clip(knob, low, high))


# ----------------------------------------------------------------------------- targets and output


def _targets(result: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
    """The project's two speed targets, checked where this run measured them.

    A scheduler's speed-up counts towards the AKI target only when its run hit that AKI (within
    the calibration tolerance); otherwise ``met`` is None.
    """
    nonkey = [r for r in result["nonkey"] if (r["backend"], r["size"]) == ("onnxruntime", 256)]
    at_target = [r for r in result["pipeline"]["runs"] if r["target_aki"] == TARGET_AKI]
    return {
        "nonkey_ort_256": {
            "median_ms": nonkey[0]["median_ms"] if nonkey else None,
            "target_ms": TARGET_NONKEY_MS,
            "met": bool(nonkey[0]["median_ms"] <= TARGET_NONKEY_MS) if nonkey else None,
        },
        "speedup_at_aki": {
            "aki": TARGET_AKI,
            "backbone": settings.key_backbone,
            "target": TARGET_SPEEDUP,
            "runs": {run["scheduler"]: _speedup_verdict(run) for run in at_target},
        },
    }


def _on_target(run: dict[str, Any]) -> bool:
    """Whether a run's key count is within the calibration tolerance of frames / target AKI."""
    wanted = run["frames"] / run["target_aki"]
    return abs(run["keys"] - wanted) <= max(1.0, CALIBRATION_TOLERANCE * wanted)


def _speedup_verdict(run: dict[str, Any]) -> dict[str, Any]:
    met = bool(run["speedup"] >= TARGET_SPEEDUP) if _on_target(run) else None
    return {"speedup": run["speedup"], "achieved_aki": run["achieved_aki"], "met": met}


def _write_outputs(result: dict[str, Any], out_dir: Path, say: Say) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    result["files"] = {"json": str(out_dir / "bench.json"), "png": str(out_dir / "bench.png")}
    _plot(result, out_dir / "bench.png")
    (out_dir / "bench.json").write_text(json.dumps(_rounded(result), indent=2) + "\n")
    say(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
    return result


def _rounded(value: Any) -> Any:
    """``value`` with floats rounded to 4 decimals, for a readable JSON file."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _stage_labels(result: dict[str, Any]) -> dict[str, str]:
    """:data:`STAGE_LABELS` with the flow stage named after the run's flow method."""
    flow = result["settings"].get("flow", DEFAULT_FLOW)
    return {**STAGE_LABELS, "flow": FLOW_LABELS.get(flow, flow)}


def _stage_lookup(result: dict[str, Any]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Stage rows by (backend, size, label key of :data:`STAGE_LABELS`), non-key frame included."""
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    for row in result["stages"]:
        name = row["stage"] if row["backbone"] is None else f"{row['stage']}:{row['backbone']}"
        rows[row["backend"], row["size"], name] = row
    for row in result["nonkey"]:
        rows[row["backend"], row["size"], "nonkey"] = row
    return rows


def _plot(result: dict[str, Any], path: Path) -> None:
    if Figure is None:
        raise RuntimeError("the benchmark plot needs matplotlib: pip install 'facestream[bench]'")
    sizes = result["settings"]["sizes"]
    figure = Figure(figsize=(6.5 * (len(sizes) + 1), 4.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(sizes) + 1, squeeze=False)[0]
    for ax, size in zip(axes, sizes, strict=False):
        _plot_stages(ax, result, size)
    _plot_fps(axes[-1], result["pipeline"])
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _plot_stages(ax: Any, result: dict[str, Any], size: int) -> None:
    lookup = _stage_lookup(result)
    backends = result["settings"]["backends"]
    labels = _stage_labels(result)
    positions = np.arange(len(labels))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        rows = [lookup.get((backend, size, key)) for key in labels]
        medians = [row["median_ms"] if row else np.nan for row in rows]
        ax.bar(positions + (i - (len(backends) - 1) / 2) * width, medians, width, label=backend)
    ax.set_xticks(positions, list(labels.values()), rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("median ms per call")
    ax.set_title(f"per-stage cost at {size}², {result['machine']['threads']} threads")
    ax.legend()


def _plot_fps(ax: Any, pipeline: dict[str, Any]) -> None:
    for name in SCHEDULERS:
        runs = [r for r in pipeline["runs"] if r["scheduler"] == name and r["achieved_aki"]]
        runs.sort(key=lambda r: r["achieved_aki"])
        ax.plot([r["achieved_aki"] for r in runs], [r["fps"] for r in runs], "o-", label=name)
    ax.axhline(pipeline["baseline_fps"], color="k", linestyle="--", label="per-frame (always)")
    ax.set_xscale("log")
    ax.set_xlabel("achieved AKI (frames / keys)")
    ax.set_ylabel("FPS")
    what = f"{pipeline['backbone']} {pipeline['size']}² on {pipeline['backend']}"
    ax.set_title(f"end-to-end FPS, {what}")
    ax.legend()


# ----------------------------------------------------------------------------- markdown


def _ms(stats: dict[str, Any] | None) -> str:
    return "–" if stats is None else f"{stats['median_ms']:.2f} ({stats['p90_ms']:.2f})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _targets_markdown(result: dict[str, Any]) -> str:
    targets, machine = result["targets"], result["machine"]
    nonkey, speed = targets["nonkey_ort_256"], targets["speedup_at_aki"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['threads']} threads, torch "
        f"{machine['torch']}, onnxruntime {machine['onnxruntime']}, {machine['date']}."
    ]
    if nonkey["median_ms"] is not None:
        lines.append(
            f"- ONNX Runtime non-key frame at 256²: **{nonkey['median_ms']:.2f} ms** "
            f"(target ≤ {nonkey['target_ms']:g} ms: {'met' if nonkey['met'] else 'missed'})"
        )
    verdicts = {True: "met", False: "missed", None: "not comparable: the run missed the AKI"}
    for name, run in speed["runs"].items():
        achieved = "no keys" if run["achieved_aki"] is None else f"{run['achieved_aki']:.1f}"
        lines.append(
            f"- {name} at target AKI {speed['aki']} (achieved {achieved}, {speed['backbone']}): "
            f"**{run['speedup']:.2f}×** the per-frame FPS "
            f"(target ≥ {speed['target']:g}×: {verdicts[run['met']]})"
        )
    return "\n".join(lines)


def _stage_markdown(result: dict[str, Any]) -> str:
    lookup = _stage_lookup(result)
    settings = result["settings"]
    columns = [(b, s) for s in settings["sizes"] for b in settings["backends"]]
    header = ["stage, ms median (p90)", *(f"{b} {s}²" for b, s in columns)]
    rows = [
        [label, *(_ms(lookup.get((b, s, key))) for b, s in columns)]
        for key, label in _stage_labels(result).items()
    ]
    return _table(header, rows)


def _io_markdown(result: dict[str, Any]) -> str:
    clip = result["clip"]
    labels = {
        "decode": f"PyAV decode to RGB ({clip['width']}×{clip['height']})",
        "encode_png_mask": "PNG encode of the full-frame mask",
        "encode_jpeg_frame": f"JPEG encode of the frame (quality {JPEG_QUALITY})",
    }
    rows = [[labels[k], _ms(v)] for k, v in result["io"].items()]
    return _table(["per frame", "ms median (p90)"], rows)


def _nonkey_markdown(result: dict[str, Any]) -> str:
    header = ["backend", "size", *NONKEY_STAGES, "non-key median (p90)", "frame total median"]
    rows = [
        [
            r["backend"],
            f"{r['size']}²",
            *(f"{r['parts_median_ms'][s]:.2f}" for s in NONKEY_STAGES),
            _ms(r),
            f"{r['frame_total']['median_ms']:.2f}",
        ]
        for r in result["nonkey"]
    ]
    return _table(header, rows)


def _pipeline_markdown(result: dict[str, Any]) -> str:
    pipeline = result["pipeline"]
    akis = result["settings"]["akis"]
    cells: dict[tuple[str, int], str] = {}
    for run in pipeline["runs"]:
        achieved = run["achieved_aki"]
        aki = "no keys" if achieved is None else f"AKI {achieved:.1f}"
        cells[run["scheduler"], run["target_aki"]] = f"{run['fps']:.1f} FPS, {run['speedup']:.2f}× ({aki})"
    rows = [[name, *(cells.get((name, a), "") for a in akis)] for name in ("always", *SCHEDULERS)]
    title = (
        f"End-to-end, {pipeline['backbone']} at {pipeline['size']}² on {pipeline['backend']}, "
        f"{pipeline['frames']} frames; cell: FPS, speed-up over always (achieved AKI)"
    )
    header = ["scheduler", *(f"target AKI {a}" for a in akis)]
    parts = (title, _table(header, rows), _key_frame_text(pipeline), _knob_markdown(pipeline, akis))
    return "\n\n".join(parts)


def _key_frame_text(pipeline: dict[str, Any]) -> str:
    """One line: the per-frame baseline's key frame, median ms per stage."""
    parts = pipeline["runs"][0]["key_frame_median_ms"]
    stages = ", ".join(f"{stage} {ms:.1f}" for stage, ms in parts.items() if stage != "total")
    return f"Key frame of the per-frame baseline, median ms: {stages}; total {parts['total']:.1f}."


def _knob_markdown(pipeline: dict[str, Any], akis: Sequence[int]) -> str:
    """The calibrated knob of each learned scheduler per target AKI, with the runs it took."""
    cells = {
        (r["scheduler"], r["target_aki"]): f"{r['knob']}={r['knob_value']:.4g} ({r['calibration_runs']} runs)"
        for r in pipeline["runs"]
        if r["scheduler"] in DYNAMIC
    }
    rows = [[name, *(cells.get((name, a), "") for a in akis)] for name in DYNAMIC]
    return _table(["calibrated knob", *(f"target AKI {a}" for a in akis)], rows)
