"""Run statistics: per-stage latency summaries and the JSON report of `facestream segment`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np


class StageStats:
    """Collects per-frame stage timings (ms) and summarises them as mean / p50 / p99."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)

    def add(self, timings: dict[str, float]) -> None:
        for stage, ms in timings.items():
            self.samples[stage].append(float(ms))

    def summary(self) -> dict[str, dict[str, float]]:
        return {stage: summarise(values) for stage, values in sorted(self.samples.items())}


def summarise(values: Iterable[float]) -> dict[str, float]:
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p99": 0.0}
    return {
        "count": int(array.size),
        "mean": round(float(array.mean()), 3),
        "p50": round(float(np.percentile(array, 50)), 3),
        "p99": round(float(np.percentile(array, 99)), 3),
    }


def average_key_interval(frames: int, keys: int) -> float | None:
    """AKI = frames / keys (None when there was no key)."""
    return frames / keys if keys else None
