"""The service as users run it: a ``facestream serve`` process with the shipped weights, real
WebSocket clients over TCP, and Debian's Prometheus scraping ``/metrics``."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import websockets.sync.client as ws_client
from fastapi.testclient import TestClient
from helpers import CLIP, clip_frames, running_service, stream_in_background
from rtsp_server import RtspTestServer, missing_peers

from facestream.cli import main
from facestream.service.app import create_app
from facestream.service.bench import free_port
from facestream.service.client import encode_frames
from facestream.service.settings import ServiceSettings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``facestream serve`` on a free port (shipped weights, fixed scheduler every 5)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_service(log, "--scheduler", "fixed", "--knob", "5") as base:
        yield base


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_websocket_round_trip_over_tcp(server: str, videos_dir: Path) -> None:
    frames = encode_frames(clip_frames(videos_dir, CLIP, 8), (640, 480))
    url = server.replace("http", "ws") + "/ws?name=tcp&format=png"
    with ws_client.connect(url, max_size=None) as ws:
        hello = json.loads(ws.recv())
        assert hello["type"] == "hello" and hello["backend"] == "onnxruntime+dis"
        for i, data in enumerate(frames):
            ws.send(data)
            header = json.loads(ws.recv())
            assert header["type"] == "result" and header["frame_id"] == i and header["face"]
            mask = cv2.imdecode(np.frombuffer(ws.recv(), np.uint8), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (480, 640)
            assert (mask == 1).mean() > 0.03  # the trained model finds skin on a real face
        ws.send(b"\x89PNG\r\n\x1a\n not really")
        error = json.loads(ws.recv())
        assert error["type"] == "error" and error["reason"] == "corrupt"


def test_prometheus_scrapes_the_key_ratio(server: str, videos_dir: Path, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Debian package prometheus is not installed (run .ci/install-peers)")
    target = urllib.parse.urlparse(server).netloc
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: facestream\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    prometheus = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop = threading.Event()
    frames = encode_frames(clip_frames(videos_dir, CLIP, 20), (640, 480))
    streamer = stream_in_background(server.replace("http", "ws") + "/ws?name=prom", frames, stop)
    api = f"http://127.0.0.1:{port}/api/v1/query?query="
    try:
        deadline, value, frames_total = time.time() + 60, None, None
        while time.time() < deadline and (value is None or frames_total is None or frames_total < 10):
            time.sleep(1)
            try:
                ratio = _get(api + urllib.parse.quote('facestream_key_ratio{stream="prom"}'))["data"][
                    "result"
                ]
                total = _get(api + urllib.parse.quote('sum(facestream_frames_total{stream="prom"})'))["data"]
            except OSError:
                continue  # Prometheus is still starting
            value = float(ratio[0]["value"][1]) if ratio else None
            frames_total = float(total["result"][0]["value"][1]) if total["result"] else None
        service_view = [s for s in _get(server + "/streams")["streams"] if s["name"] == "prom"]
    finally:
        stop.set()
        streamer.join(10)
        prometheus.terminate()
        prometheus.wait(10)
    assert value is not None, "Prometheus never scraped facestream_key_ratio"
    assert frames_total is not None and frames_total >= 10
    # fixed interval 5: one key in five decisions (the first frame is a key too)
    assert 0.15 <= value <= 0.35
    assert abs(service_view[0]["key_ratio"] - 0.2) < 0.1


def test_rtsp_camera_survives_a_server_restart(server: str, videos_dir: Path) -> None:
    """POST a real RTSP camera (GStreamer's RTSP server), watch it, stop and restart the server
    mid-stream: the stream goes reconnecting, then running again, and results keep coming."""
    reason = missing_peers()
    if reason:
        pytest.skip(reason)
    with RtspTestServer(videos_dir / "lp_d18.mp4") as camera:
        body = json.dumps({"url": camera.url, "name": "lobby", "scheduler": "fixed", "knob": 10}).encode()
        request = urllib.request.Request(
            server + "/streams", body, {"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            stream = json.loads(response.read())
        assert stream["state"] in ("starting", "running")
        watch = server.replace("http", "ws") + f"/streams/{stream['id']}/ws?format=none"
        states: list[str] = []
        with ws_client.connect(watch, max_size=None) as ws:
            assert json.loads(ws.recv())["type"] == "hello"

            def results(count: int, timeout: float = 60) -> int:
                seen, deadline = 0, time.time() + timeout
                while seen < count and time.time() < deadline:
                    message = json.loads(ws.recv(timeout=timeout))
                    if message["type"] == "state":
                        states.append(message["state"])
                    seen += message["type"] == "result"
                return seen

            assert results(10) == 10
            camera.stop()
            deadline = time.time() + 30
            while "reconnecting" not in states and time.time() < deadline:
                message = json.loads(ws.recv(timeout=30))
                if message["type"] == "state":
                    states.append(message["state"])
            assert "reconnecting" in states
            camera.start()
            assert results(10) == 10
            assert states[-1] == "running"
        info = _get(server + f"/streams/{stream['id']}")
        assert info["state"] == "running" and info["reconnects"] >= 1 and info["frames"] >= 20
        delete = urllib.request.Request(server + f"/streams/{stream['id']}", method="DELETE")
        with urllib.request.urlopen(delete, timeout=30) as response:
            assert json.loads(response.read())["state"] == "stopped"


def test_facestream_client_reports_round_trips(server: str, videos_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "client.json"
    masks = tmp_path / "masks"
    url = server.replace("http", "ws") + "/ws"
    args = ["client", str(videos_dir / CLIP), "--url", url, "--frames", "15", "--fps", "10"]
    assert main([*args, "--size", "320x240", "--report", str(report), "--masks", str(masks)]) == 0
    summary = json.loads(report.read_text())["clients"][0]
    assert summary["sent"] == 15 and summary["results"] + summary["dropped"] == 15
    assert summary["results"] >= 10 and summary["rtt_ms"]["p50"] > 0
    saved = sorted(masks.glob("*.png"))
    assert len(saved) == summary["frames_with_face"] > 0
    assert cv2.imread(str(saved[0]), cv2.IMREAD_UNCHANGED).shape == (240, 320)


def test_readyz_names_the_chosen_backend_and_why() -> None:
    """backend=auto with the shipped weights: no GPU here, so ONNX Runtime on the CPU, and /readyz
    says why each faster backend was skipped."""
    with TestClient(create_app(ServiceSettings(backend="auto", threads=1))) as client:
        assert client.app.state.service.ready.wait(120)
        ready = client.get("/readyz").json()
    choice = ready["backend_choice"]
    assert ready["backend"].startswith(choice["name"])
    tried = dict(choice["tried"])
    if choice["name"] == "onnxruntime":  # a CPU machine: every GPU backend skipped, with a reason
        assert {"tensorrt", "torch-cuda"} <= set(tried) and all(tried.values())
