"""Streams: per-stream state (segmenter, latest-frame slot, statistics) and their subscribers.

A stream is either a WebSocket client's webcam (``kind="ws"``) or a camera the service reads
(``kind="camera"``). Its state is its own: a bad frame, a scheduler change or a slow reader of one
stream never touches another.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facestream.engines.pipeline import StreamSegmenter
from facestream.engines.schedulers import Scheduler
from facestream.service.metrics import ServiceMetrics

FPS_WINDOW_S = 2.0


@dataclass
class Job:
    """One decoded frame waiting for the worker."""

    frame_id: int
    rgb: np.ndarray
    received: float  # time.perf_counter() when the bytes arrived
    decode_ms: float = 0.0


@dataclass
class Message:
    """What a subscriber is sent: a JSON header, then (optionally) one binary payload."""

    header: dict[str, Any]
    payload: bytes | None = None


class Subscriber:
    """An asyncio reader of a stream's messages, fed from the worker thread.

    Holds at most ``size`` messages; when the reader falls behind, the oldest result is dropped
    (and counted) so that what it reads next is recent.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mask_format: str,
        size: int = 4,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self.loop = loop
        self.mask_format = mask_format
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=size)
        self.dropped = 0
        self.on_drop = on_drop

    def publish(self, message: Message) -> None:
        """Thread-safe: hand ``message`` to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self._put, message)
        except RuntimeError:  # the loop is closed: the reader is gone
            pass

    def _put(self, message: Message) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
        self.queue.put_nowait(message)

    async def next(self) -> Message:
        return await self.queue.get()


@dataclass
class StreamStats:
    frames: int = 0
    keys: int = 0
    faces: int = 0
    bad: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    recent: deque[float] = field(default_factory=deque)  # perf_counter of recent results

    def tick(self, now: float) -> float:
        """Record a result at ``now``; the frame rate over the last :data:`FPS_WINDOW_S`."""
        self.recent.append(now)
        while self.recent and now - self.recent[0] > FPS_WINDOW_S:
            self.recent.popleft()
        if len(self.recent) < 2:
            return 0.0
        return (len(self.recent) - 1) / max(self.recent[-1] - self.recent[0], 1e-6)


_ids = itertools.count(1)


class StreamSession:
    """One stream: its segmenter, the latest-frame slot the worker reads, stats, subscribers."""

    def __init__(
        self,
        kind: str,
        name: str | None,
        segmenter: StreamSegmenter,
        metrics: ServiceMetrics,
        *,
        mask_format: str = "png",
        max_fps: float | None = None,
    ) -> None:
        number = next(_ids)
        self.id = f"{kind}-{number}"
        self.kind = kind
        self.name = name or self.id
        self.segmenter = segmenter
        self.metrics = metrics
        self.mask_format = mask_format
        self.max_fps = max_fps
        self.created = time.time()
        self.stats = StreamStats()
        self.fps = 0.0
        self.lock = threading.Lock()
        self.pending: Job | None = None
        self.queued = False
        self.closed = False
        self.subscribers: list[Subscriber] = []
        self.state = "running"
        self.error: str | None = None
        self._replacement: StreamSegmenter | None = None
        self._last_accepted = -1e9

    # ------------------------------------------------------------------ configuration

    @property
    def scheduler(self) -> Scheduler:
        return (self._replacement or self.segmenter).scheduler

    def replace_segmenter(self, segmenter: StreamSegmenter) -> None:
        """Swap in a new segmenter (a scheduler change); the worker takes it before its next frame,
        so the key cache starts afresh with a key frame."""
        self._replacement = segmenter

    def take_replacement(self) -> None:
        """Called by the worker thread before it steps this stream."""
        replacement, self._replacement = self._replacement, None
        if replacement is not None:
            self.segmenter = replacement

    # ------------------------------------------------------------------ frames

    def admit(self, now: float) -> bool:
        """False when the frame comes sooner than the stream's ``max_fps`` allows (the caller
        counts the drop)."""
        if self.max_fps and now - self._last_accepted < 1.0 / self.max_fps:
            return False
        self._last_accepted = now
        return True

    def drop(self, reason: str, frame_id: int | None = None) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
        self.metrics.dropped.labels(stream=self.name, reason=reason).inc()
        if frame_id is not None:
            self.publish(Message({"type": "dropped", "frame_id": frame_id, "reason": reason}))

    def bad_frame(self, frame_id: int, reason: str, message: str) -> None:
        self.stats.bad += 1
        self.metrics.bad.labels(reason=reason).inc()
        self.publish(Message({"type": "error", "frame_id": frame_id, "reason": reason, "message": message}))

    def publish(self, message: Message) -> None:
        for subscriber in list(self.subscribers):
            subscriber.publish(message)

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)
            if subscriber.dropped:
                self.stats.dropped["slow_client"] = (
                    self.stats.dropped.get("slow_client", 0) + subscriber.dropped
                )
                self.metrics.dropped.labels(stream=self.name, reason="slow_client").inc(subscriber.dropped)

    @property
    def key_ratio(self) -> float:
        return self.segmenter.history.kar

    def describe(self) -> dict[str, Any]:
        scheduler = self.scheduler
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "error": self.error,
            "scheduler": scheduler.name,
            "knob": {scheduler.knob: scheduler.knob_value} if scheduler.knob else None,
            "mask_format": self.mask_format,
            "max_fps": self.max_fps,
            "frames": self.stats.frames,
            "keys": self.stats.keys,
            "frames_with_face": self.stats.faces,
            "bad_frames": self.stats.bad,
            "dropped": dict(self.stats.dropped),
            "key_ratio": round(self.key_ratio, 4),
            "fps": round(self.fps, 2),
            "subscribers": len(self.subscribers),
        }
