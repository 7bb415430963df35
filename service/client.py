"""A Python client of ``/ws`` (``facestream client``): streams a video's frames at a set rate and
measures what comes back (round-trip time per frame, processed, dropped, bad frames).

The protocol in brief (README, "WebSocket protocol"): the server first sends a ``hello`` JSON
message; the client sends each frame as one binary message (JPEG, PNG or WebP) and may send
``{"type": "config", ...}`` JSON messages; for every frame the server answers with exactly one of
``result`` (JSON, then the mask as a binary message when its format is png or raw), ``dropped``
or ``error``, each carrying the frame's ``frame_id`` (the count of binary messages before it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import cv2
import numpy as np
import websockets

from facestream.engines.video import open_source

BINARY_FORMATS = ("png", "raw")


@dataclass
class ClientStats:
    """What one client saw."""

    sent: int = 0
    results: int = 0
    keys: int = 0
    faces: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    rtt_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    hello: dict[str, Any] = field(default_factory=dict)
    server_stages: list[dict[str, float]] = field(default_factory=list)  # timings_ms per result

    def summary(self) -> dict[str, Any]:
        rtt = np.asarray(self.rtt_ms)
        pct = (lambda q: round(float(np.percentile(rtt, q)), 2)) if rtt.size else (lambda q: None)
        return {
            "sent": self.sent,
            "results": self.results,
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped),
            "errors": dict(self.errors),
            "keys": self.keys,
            "frames_with_face": self.faces,
            "rtt_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100)},
            "server_total_ms_p50": (
                round(float(np.median([t["total"] for t in self.server_stages])), 2)
                if self.server_stages
                else None
            ),
            "server_stage_ms_mean": self.stage_means(),
            "processed_fps": round(self.results / self.wall_s, 2) if self.wall_s else None,
            "wall_s": round(self.wall_s, 2),
            "backend": self.hello.get("backend"),
        }

    def stage_means(self) -> dict[str, float]:
        """Mean ms per result of each server stage (0 where a result did not run it), and
        ``waiting``: the rest of ``total`` (queues, thread hand-offs, the event loop)."""
        if not self.server_stages:
            return {}
        names = sorted({k for t in self.server_stages for k in t if k != "total"})
        means = {k: float(np.mean([t.get(k, 0.0) for t in self.server_stages])) for k in names}
        total = float(np.mean([t.get("total", 0.0) for t in self.server_stages]))
        means["waiting"] = total - sum(means.values())
        return {k: round(v, 2) for k, v in means.items()}


def encode_frames(
    frames: Sequence[np.ndarray], size: tuple[int, int] | None = None, quality: int = 85
) -> list[bytes]:
    """RGB frames as JPEG bytes (resized to ``size`` = (width, height) when given)."""
    out = []
    for rgb in frames:
        if size is not None and (rgb.shape[1], rgb.shape[0]) != size:
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out.append(buf.tobytes())
    return out


def read_frames(video: str, max_frames: int | None = None) -> list[np.ndarray]:
    with open_source(video, max_frames=max_frames) as source:
        return [frame.rgb for frame in source]


def stream_url(base: str, **params: Any) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{base}{'&' if '?' in base else '?'}{query}" if query else base


async def stream_frames(
    url: str,
    frames: Sequence[bytes],
    *,
    fps: float = 30.0,
    token: str | None = None,
    drain_s: float = 5.0,
    on_result: Callable[[dict[str, Any], bytes | None], None] | None = None,
) -> ClientStats:
    """Send ``frames`` (encoded pictures) at ``fps`` over one connection; collect the answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    stats = ClientStats()
    sent_at: dict[int, float] = {}
    answered: set[int] = set()
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        stats.hello = json.loads(await ws.recv())
        if stats.hello.get("type") != "hello":
            raise RuntimeError(f"unexpected first message: {stats.hello}")
        start = time.perf_counter()
        receiver = asyncio.create_task(_receive(ws, stats, sent_at, answered, on_result))
        for i, data in enumerate(frames):
            delay = start + i / fps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_at[i] = time.perf_counter()
            await ws.send(data)
            stats.sent += 1
        deadline = time.perf_counter() + drain_s
        while len(answered) < len(frames) and time.perf_counter() < deadline and not receiver.done():
            await asyncio.sleep(0.005)
        stats.wall_s = time.perf_counter() - start
        receiver.cancel()
        if receiver.done() and not receiver.cancelled() and receiver.exception() is not None:
            raise RuntimeError(f"connection failed: {receiver.exception()}")
    return stats


async def _receive(ws, stats: ClientStats, sent_at, answered, on_result) -> None:
    while True:
        header = json.loads(await ws.recv())
        kind = header.get("type")
        payload = None
        if kind == "result" and header.get("format") in BINARY_FORMATS:
            payload = await ws.recv()
        frame_id = header.get("frame_id")
        if kind == "result":
            stats.rtt_ms.append((time.perf_counter() - sent_at[frame_id]) * 1e3)
            stats.server_stages.append(header["timings_ms"])
            stats.results += 1
            stats.keys += int(header["key"])
            stats.faces += int(header["face"])
        elif kind == "dropped":
            stats.dropped[header["reason"]] = stats.dropped.get(header["reason"], 0) + 1
        elif kind == "error":
            stats.errors[header["reason"]] = stats.errors.get(header["reason"], 0) + 1
        if frame_id is not None and kind in ("result", "dropped", "error"):
            answered.add(frame_id)
        if on_result is not None and kind == "result":
            on_result(header, payload)


async def run_clients(url: str, frames: Sequence[bytes], clients: int, **kwargs: Any) -> list[ClientStats]:
    """``clients`` concurrent connections, each streaming ``frames``."""
    return list(await asyncio.gather(*(stream_frames(url, frames, **kwargs) for _ in range(clients))))


def mask_writer(folder: Path) -> Callable[[dict[str, Any], bytes | None], None]:
    """An ``on_result`` that saves each PNG mask as ``folder/<frame_id>.png``."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(header: dict[str, Any], payload: bytes | None) -> None:
        if payload is not None and header.get("format") == "png":
            (folder / f"{header['frame_id']:06d}.png").write_bytes(payload)

    return write
