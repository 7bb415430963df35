"""`facestream segment`: run the dynamic pipeline over a video file, webcam or RTSP stream."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from facestream import __version__
from facestream.engines.backends import create_networks
from facestream.engines.dis_flow import DEFAULT_FLOW
from facestream.engines.int8 import build_precision
from facestream.engines.pipeline import FrameResult, StreamSegmenter
from facestream.engines.report import StageStats, average_key_interval
from facestream.engines.schedulers import make_scheduler
from facestream.engines.video import MaskWriter, VideoWriter, open_source, overlay
from facestream.engines.weights import find_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentOptions:
    source: str
    scheduler: str = "fixed"
    knob: float | None = None
    backend: str = "onnxruntime"
    size: int | None = None
    weights: str | None = None
    out: Path | None = None
    masks: Path | None = None
    report: Path | None = None
    max_frames: int | None = None
    threads: int | None = None
    progress: bool = True
    flow: str = DEFAULT_FLOW
    dis_size: int | None = None  # side of the face crops DIS sees (None: N's input)
    correct: bool = True  # the warp corrector on non-key frames, when the weights have one
    correct_precision: str = "auto"  # its arithmetic on onnxruntime (engines.int8)


class _Outputs:
    """The overlay video and the mask PNGs, opened lazily on the first frame."""

    def __init__(self, options: SegmentOptions, fps: float) -> None:
        self.options, self.fps = options, fps
        self.video: VideoWriter | None = None
        self.masks = MaskWriter(options.masks) if options.masks else None

    def write(self, index: int, rgb, result: FrameResult) -> None:
        mask = result.mask if result.mask is not None else _blank(rgb)
        if self.masks is not None:
            self.masks.write(index, mask)
        if self.options.out is not None:
            if self.video is None:
                height, width = rgb.shape[:2]
                self.video = VideoWriter(self.options.out, self.fps, width, height)
            self.video.write(overlay(rgb, result.mask))

    def close(self) -> None:
        if self.video is not None:
            self.video.close()


def _blank(rgb: np.ndarray) -> np.ndarray:
    return np.zeros(rgb.shape[:2], dtype=np.uint8)


def check_size(size: int | None, trained: int) -> None:
    if size is not None and size != trained:
        raise ValueError(
            f"--size {size} does not match the weights, which were built for {trained}x{trained} "
            f"crops: pass --size {trained} or weights trained at {size}"
        )


def run_segment(options: SegmentOptions) -> dict[str, Any]:
    """Segment every frame of ``options.source``; returns (and optionally writes) the report."""
    weights = find_weights(options.weights)
    scheduler = make_scheduler(options.scheduler, options.knob)
    networks = create_networks(
        weights,
        options.backend,
        threads=options.threads,
        flow=options.flow,
        conv6=scheduler.needs_conv6,
        dis_size=options.dis_size,
        correct_precision=build_precision(options.correct_precision, options.correct),
    )
    check_size(options.size, networks.segmentation_config.input_size)
    segmenter = StreamSegmenter(networks, scheduler, correct=options.correct)
    source = open_source(options.source, max_frames=options.max_frames)
    outputs = _Outputs(options, source.fps)
    stats, counts = StageStats(), {"frames": 0, "keys": 0, "faces": 0, "bad": 0}
    started = time.perf_counter()
    try:
        _loop(source, segmenter, outputs, stats, counts, options.progress)
    finally:
        outputs.close()
        source.close()
    wall = time.perf_counter() - started
    report = _report(options, weights, networks, scheduler, source, stats, counts, wall)
    if options.report is not None:
        options.report.parent.mkdir(parents=True, exist_ok=True)
        options.report.write_text(json.dumps(report, indent=2))
    return report


def _loop(source, segmenter, outputs, stats, counts, progress: bool) -> None:
    bar = tqdm(total=source.frame_count, unit="frame", disable=not progress, dynamic_ncols=True)
    decode_start = time.perf_counter()
    for frame in source:
        decode_ms = (time.perf_counter() - decode_start) * 1e3
        try:
            result = segmenter.step(frame.rgb)
        except ValueError as exc:  # one bad frame never ends the stream
            counts["bad"] += 1
            log.warning("frame %d skipped: %s", frame.index, exc)
            decode_start = time.perf_counter()
            continue
        encode_start = time.perf_counter()
        outputs.write(frame.index, frame.rgb, result)
        timings = dict(result.timings, decode=decode_ms, encode=(time.perf_counter() - encode_start) * 1e3)
        stats.add(timings)
        counts["frames"] += 1
        counts["keys"] += int(result.key)
        counts["faces"] += int(result.face)
        bar.update(1)
        bar.set_postfix(keys=counts["keys"], ms=f"{result.timings['total']:.0f}")
        decode_start = time.perf_counter()
    bar.close()


def _report(options, weights, networks, scheduler, source, stats, counts, wall) -> dict[str, Any]:
    summary = stats.summary()
    total_ms = summary.get("total", {}).get("mean", 0.0)
    frames = counts["frames"]
    return {
        "facestream": __version__,
        "input": {
            "spec": options.source,
            "fps": source.fps,
            "width": source.width,
            "height": source.height,
        },
        "frames": frames,
        "keys": counts["keys"],
        "frames_with_face": counts["faces"],
        "bad_frames": counts["bad"] + getattr(source, "decode_errors", 0),
        "aki": average_key_interval(frames, counts["keys"]),
        "fps": round(1e3 / total_ms, 2) if total_ms else None,
        "wall_fps": round(frames / wall, 2) if wall > 0 else None,
        "scheduler": {
            "name": scheduler.name,
            "knob": scheduler.knob,
            "value": scheduler.knob_value,
        },
        "backend": networks.backend,
        "input_size": networks.segmentation_config.input_size,
        "segmentation": {
            "backbone": networks.segmentation_config.backbone,
            "split": networks.segmentation_config.split,
        },
        "flow": options.flow,
        "correction": options.correct and networks.has_correction,
        "correction_precision": networks.correction_precision(options.correct),
        "flow_input_size": networks.flow_input_size,
        "weights": {"dir": str(weights.directory), "sha256": weights.hashes()},
        "stages_ms": summary,
        "outputs": {
            "overlay": str(options.out) if options.out else None,
            "masks": str(options.masks) if options.masks else None,
        },
    }
