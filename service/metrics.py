"""Prometheus metrics of the service (the only module that imports ``prometheus_client``).

Each app owns its registry, so that several apps (tests) never share counters.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

STAGES = ("decode", "detect", "crop", "flow", "policy", "key", "warp", "correct", "task", "encode", "total")
"""Stages timed per frame: ``decode`` (image bytes -> RGB), the pipeline's stages (``detect``
and ``crop`` of the face box, ``flow`` F or DIS, ``policy`` the scheduler, ``key`` N_feat,
``warp``, ``task`` N_task), ``encode`` (mask -> PNG/RLE) and ``total`` (received -> result)."""

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.2, 0.5, 1.0, 2.0)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        self.frames = Counter("facestream_frames", "Frames segmented", ["stream", "kind"], registry=registry)
        self.key_ratio = Gauge(
            "facestream_key_ratio", "Key frames among the last 90 decisions", ["stream"], registry=registry
        )
        self.fps = Gauge(
            "facestream_fps", "Frames segmented per second (last 2 s)", ["stream"], registry=registry
        )
        self.stage = Histogram(
            "facestream_stage_seconds",
            "Time per frame and stage",
            ["stage"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.dropped = Counter(
            "facestream_dropped_frames",
            "Frames dropped (busy: replaced by a newer frame; max_fps: over the stream's cap; "
            "slow_client: a result the reader did not take in time)",
            ["stream", "reason"],
            registry=registry,
        )
        self.active = Gauge(
            "facestream_active_streams", "Open streams (WebSocket and camera)", registry=registry
        )
        self.bad = Counter(
            "facestream_bad_frames", "Frames rejected as bad input", ["reason"], registry=registry
        )
        self.reconnects = Counter(
            "facestream_camera_reconnects", "Camera reconnect attempts", ["stream"], registry=registry
        )

    def frame(self, stream: str, key: bool, timings_ms: Mapping[str, float]) -> None:
        self.frames.labels(stream=stream, kind="key" if key else "nonkey").inc()
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.stage.labels(stage=stage).observe(ms / 1e3)

    def stream_rates(self, stream: str, key_ratio: float, fps: float) -> None:
        self.key_ratio.labels(stream=stream).set(key_ratio)
        self.fps.labels(stream=stream).set(fps)

    def stream_closed(self, stream: str) -> None:
        """Drop the stream's gauges (its counters stay, so that rates over its life still work)."""
        for gauge in (self.key_ratio, self.fps):
            try:
                gauge.remove(stream)
            except KeyError:
                pass

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
