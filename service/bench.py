"""``facestream bench-service``: the service as users run it (a ``facestream serve`` process),
streamed by 1 and 4 concurrent ``/ws`` clients; round-trip percentiles, processed and dropped
frames -> ``bench/service.json`` and ``bench/service.png``."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from facestream import __version__
from facestream.service.client import encode_frames, read_frames, run_clients, stream_url


@dataclass(frozen=True)
class ServiceBenchOptions:
    clip: str
    frames: int = 300
    fps: float = 30.0
    size: tuple[int, int] = (640, 480)
    clients: tuple[int, ...] = (1, 4)
    scheduler: str = "fixed"
    knob: float | None = None
    threads: int | None = None
    weights: str | None = None
    out: Path = Path("bench")
    ready_timeout_s: float = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(base: str, server: subprocess.Popen, timeout: float) -> dict[str, Any]:
    """Poll ``/readyz`` until it says ready; RuntimeError when the server dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the service exited with code {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the service was not ready within {timeout:.0f} s")


def start_server(options: ServiceBenchOptions, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "facestream.cli", "serve", "--port", str(port)]
    for flag, value in (("--threads", options.threads), ("--weights", options.weights)):
        if value is not None:
            command += [flag, str(value)]
    env = {**os.environ, "FACESTREAM_LOG_LEVEL": "warning", "FACESTREAM_MAX_STREAMS": "64"}
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def run_service_bench(options: ServiceBenchOptions) -> dict[str, Any]:
    options.out.mkdir(parents=True, exist_ok=True)
    frames = encode_frames(read_frames(options.clip, options.frames), options.size)
    port = free_port()
    server = start_server(options, port, options.out / "service-server.log")
    try:
        ready = wait_ready(f"http://127.0.0.1:{port}", server, options.ready_timeout_s)
        url = stream_url(
            f"ws://127.0.0.1:{port}/ws", scheduler=options.scheduler, knob=options.knob, format="png"
        )
        runs = []
        for count in options.clients:
            stats = asyncio.run(run_clients(url, frames, count, fps=options.fps))
            runs.append({"clients": count, "per_client": [s.summary() for s in stats]})
    finally:
        server.terminate()
        server.wait(10)
    report = {
        "facestream": __version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "options": {**asdict(options), "out": str(options.out)},
        "server": ready,
        "frame_bytes_mean": round(sum(map(len, frames)) / len(frames)),
        "runs": runs,
    }
    (options.out / "service.json").write_text(json.dumps(report, indent=2))
    plot_service_bench(report, options.out / "service.png")
    return report


def plot_service_bench(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels, p50, p99, processed, dropped = [], [], [], [], []
    for run in report["runs"]:
        for i, client in enumerate(run["per_client"]):
            labels.append(f"{run['clients']} cl. #{i}")
            p50.append(client["rtt_ms"]["p50"] or 0)
            p99.append(client["rtt_ms"]["p99"] or 0)
            processed.append(client["results"])
            dropped.append(client["dropped"])
    x = range(len(labels))
    left.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    left.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    left.set_xticks(list(x), labels, rotation=30)
    left.set_ylabel("round trip (ms)")
    left.legend()
    left.set_title("round-trip time per client")
    right.bar(list(x), processed, label="processed")
    right.bar(list(x), dropped, bottom=processed, label="dropped")
    right.set_xticks(list(x), labels, rotation=30)
    right.set_ylabel("frames")
    right.legend()
    opts = report["options"]
    right.set_title(f"{opts['frames']} frames at {opts['fps']:g} FPS, {opts['size'][0]}x{opts['size'][1]}")
    fig.suptitle(
        f"facestream service on {report['machine']['cpus']} CPUs ({report['server'].get('backend')})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
