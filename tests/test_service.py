"""The streaming service on tiny random networks: settings, frame codec, WebSocket protocol,
bad input, isolation between streams, latest-frame-wins, metrics, health, access control."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import OTHER_CLIP, clip_frames, networks, random_weights
from starlette.websockets import WebSocketDisconnect

from facestream.cli import main
from facestream.engines.dis_flow import DisFlowNetworks
from facestream.engines.pipeline import KeyRequest, run_key_batch
from facestream.engines.schedulers import make_scheduler
from facestream.service.app import CLOSE_BAD_REQUEST, CLOSE_TRY_AGAIN, CLOSE_UNAUTHORIZED, create_app
from facestream.service.client import ClientStats
from facestream.service.codec import (
    BadFrame,
    decode_frame,
    decode_run_length,
    encode_mask,
    image_size,
    run_length,
)
from facestream.service.engine import ServiceEngine
from facestream.service.metrics import ServiceMetrics
from facestream.service.sessions import Job, StreamSession, Subscriber
from facestream.service.settings import ServiceSettings, SettingsError, load_settings
from facestream.service.worker import InferenceWorker

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1000 * 1000}


def jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height (no image data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


# ---------------------------------------------------------------------------- settings


def test_settings_precedence_file_env_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "service.toml"
    config.write_text('port = 9001\nscheduler = "fixed"\nknob = 12\nmax_streams = 3\n')
    monkeypatch.setenv("FACESTREAM_MAX_STREAMS", "5")
    settings = load_settings(config, port=9100)
    assert (settings.port, settings.knob, settings.max_streams) == (9100, 12.0, 5)
    json_config = tmp_path / "service.json"
    json_config.write_text(json.dumps({"mask_format": "rle"}))
    assert load_settings(json_config).mask_format == "rle"


@pytest.mark.parametrize(
    "text, problem",
    [
        ('scheduler = "magic"', "scheduler must be one of"),
        ('scheduler = "fixed"\nknob = 0.5', "interval"),
        ("port = 70000", "port"),
        ("dis_size = 8", "dis_size"),
        ('correct_precision = "int4"', "correct_precision must be one of"),
        ('colour = "red"', "colour"),
        ("port = ", "not valid TOML"),
    ],
)
def test_bad_settings_name_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    with pytest.raises(SettingsError, match=problem):
        load_settings(config)


def test_settings_mask_the_token() -> None:
    assert ServiceSettings(token="s3cret").public()["token"] == "***"


# ---------------------------------------------------------------------------- codec


def test_decode_frame_formats(videos_dir: Path) -> None:
    rgb = clip_frames(videos_dir, count=1)[0]
    for ext in (".png", ".webp"):
        ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_WEBP_QUALITY, 101])
        assert ok
        data = buf.tobytes()
        assert image_size(data, ext[1:]) == (rgb.shape[1], rgb.shape[0])
        decoded = decode_frame(data, **LIMITS)
        assert decoded.shape == rgb.shape and np.abs(decoded.astype(int) - rgb).max() <= 2
    decoded = decode_frame(jpeg(rgb), **LIMITS)
    assert decoded.shape == rgb.shape and np.abs(decoded.astype(float) - rgb).mean() < 4


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda good: b"", "empty"),
        (lambda good: b"GIF89a" + b"\0" * 100, "not_image"),
        (lambda good: b"hello, this is text", "not_image"),
        (lambda good: good[: len(good) // 2], "corrupt"),  # truncated JPEG
        (lambda good: good[:2] + b"\xff\xc0" + b"\x00" * 8, "corrupt"),  # header of zeros
        (lambda good: png_header_only(20000, 20000), "too_many_pixels"),
        (lambda good: png_header_only(64, 64), "corrupt"),  # a header, no pixels
        (lambda good: good + b"\0" * (1 << 20), "too_large"),
    ],
)
def test_bad_frames_get_a_reason(videos_dir: Path, make, reason: str) -> None:
    good = jpeg(clip_frames(videos_dir, count=1)[0])
    with pytest.raises(BadFrame) as caught:
        decode_frame(make(good), **LIMITS)
    assert caught.value.reason == reason
    assert str(caught.value)


def test_mask_encodings_round_trip() -> None:
    mask = np.random.default_rng(0).integers(0, 5, (37, 53)).astype(np.uint8)
    mask[:10] = 0
    png, _ = encode_mask(mask, "png")
    assert png is not None
    assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), mask)
    raw, _ = encode_mask(mask, "raw")
    assert raw is not None and np.array_equal(np.frombuffer(raw, np.uint8).reshape(mask.shape), mask)
    payload, extra = encode_mask(mask, "rle")
    assert payload is None and np.array_equal(decode_run_length(extra["rle"], 37, 53), mask)
    assert run_length(np.zeros((4, 4), np.uint8)) == {"values": [0], "counts": [16]}
    assert encode_mask(mask, "none") == (None, {})


def test_png_masks_are_run_length_coded_without_row_filters() -> None:
    """A face mask is long runs of a few class ids: unfiltered run-length deflate keeps it exact
    and smaller than OpenCV's default adaptive filters at the same level."""
    mask = np.zeros((480, 640), np.uint8)
    cv2.ellipse(mask, (320, 240), (120, 160), 0, 0, 360, 1, -1)
    for x in (270, 370):
        cv2.ellipse(mask, (x, 200), (25, 10), 0, 0, 360, 2, -1)
    cv2.ellipse(mask, (320, 320), (50, 20), 0, 0, 360, 3, -1)
    cv2.ellipse(mask, (320, 320), (30, 8), 0, 0, 360, 4, -1)
    png, _ = encode_mask(mask, "png")
    assert png is not None
    assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), mask)
    filtered = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1]
    assert len(png) < len(filtered)


# ---------------------------------------------------------------------------- worker


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> ServiceEngine:
    inner = networks(tmp_path_factory)
    weights = random_weights(tmp_path_factory)
    return ServiceEngine.around(weights, DisFlowNetworks(inner, conv6=True), "dis")


def test_latest_frame_wins(engine: ServiceEngine, videos_dir: Path) -> None:
    """Frames that arrive while the stream's previous frame waits replace it; drops are counted."""
    metrics = ServiceMetrics()
    worker = InferenceWorker(metrics)
    session = StreamSession("ws", "t", engine.segmenter(make_scheduler("fixed", 5)), metrics)
    frames = clip_frames(videos_dir, count=4)
    for i, rgb in enumerate(frames):  # the worker is not started yet: nothing is taken
        worker.submit(session, Job(i, rgb, time.perf_counter()))
    assert session.pending is not None and session.pending.frame_id == 3
    assert session.stats.dropped == {"busy": 3}
    assert worker.queue_depth == 1  # the stream is queued once
    worker.start()
    try:
        deadline = time.time() + 30
        while session.stats.frames < 1 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop()
    assert session.stats.frames == 1
    text = metrics.render()[0].decode()
    assert 'facestream_dropped_frames_total{reason="busy",stream="t"} 3.0' in text
    assert 'facestream_frames_total{kind="key",stream="t"} 1.0' in text


# ---------------------------------------------------------------------------- the app


@pytest.fixture
def make_client(engine: ServiceEngine) -> Iterator:
    clients = []

    def make(**settings) -> TestClient:
        app = create_app(ServiceSettings(**settings), loader=lambda s: engine)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        assert app.state.service.ready.wait(30)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def receive(ws) -> tuple[dict, bytes | None]:
    """One server message: the JSON header and, for results with a binary mask, the payload."""
    header = ws.receive_json()
    payload = None
    if header["type"] == "result" and header.get("format") in ("png", "raw"):
        payload = ws.receive_bytes()
    return header, payload


def results_until(ws, count: int) -> list[tuple[dict, bytes | None]]:
    out = []
    while len([h for h, _ in out if h["type"] in ("result", "error", "dropped")]) < count:
        out.append(receive(ws))
    return out


def test_health_ready_and_metrics(make_client) -> None:
    client = make_client()
    assert client.get("/healthz").json()["status"] == "alive"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["backend"].endswith("+dis")
    assert "rl" in ready.json()["schedulers"]
    assert "facestream_active_streams 0.0" in client.get("/metrics").text
    assert client.get("/docs").status_code == 200


def test_not_ready_until_loaded(engine: ServiceEngine) -> None:
    gate = threading.Event()

    def slow(settings: ServiceSettings) -> ServiceEngine:
        gate.wait(10)
        return engine

    with TestClient(create_app(ServiceSettings(), loader=slow)) as client:
        assert client.get("/healthz").status_code == 200
        body = client.get("/readyz")
        assert body.status_code == 503 and "loading" in body.json()["reason"]
        with client.websocket_connect("/ws") as ws, pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == CLOSE_TRY_AGAIN
        gate.set()
        assert client.app.state.service.ready.wait(10)
        assert client.get("/readyz").status_code == 200


def test_failed_load_is_reported(engine: ServiceEngine) -> None:
    def broken(settings: ServiceSettings) -> ServiceEngine:
        raise FileNotFoundError("no weights in /nowhere")

    with TestClient(create_app(ServiceSettings(), loader=broken)) as client:
        deadline = time.time() + 10
        while client.get("/readyz").json().get("reason", "").startswith("loading") and time.time() < deadline:
            time.sleep(0.02)
        assert "no weights in /nowhere" in client.get("/readyz").json()["reason"]


def test_websocket_round_trip(make_client, videos_dir: Path) -> None:
    client = make_client(scheduler="fixed", knob=3)
    frames = clip_frames(videos_dir, count=6)
    with client.websocket_connect("/ws?name=cam1") as ws:
        hello = ws.receive_json()
        assert hello["type"] == "hello" and hello["name"] == "cam1" and hello["scheduler"] == "fixed"
        for i, rgb in enumerate(frames):
            ws.send_bytes(jpeg(rgb))
            header, payload = receive(ws)  # one at a time: nothing is dropped
            assert header["type"] == "result" and header["frame_id"] == i
            assert (header["width"], header["height"]) == (rgb.shape[1], rgb.shape[0])
            assert header["key"] == (i % 3 == 0) or not header["face"]
            assert {"decode", "total", "encode"} <= set(header["timings_ms"])
            mask = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
            assert mask.shape == rgb.shape[:2] and mask.max() <= 4
        metrics = client.get("/metrics").text
        assert 'facestream_frames_total{kind="key",stream="cam1"} 2.0' in metrics
        assert 'facestream_frames_total{kind="nonkey",stream="cam1"} 4.0' in metrics
        assert 'facestream_key_ratio{stream="cam1"}' in metrics
        assert "facestream_active_streams 1.0" in metrics
        assert 'facestream_stage_seconds_count{stage="total"} 6.0' in metrics
        assert client.get("/streams").json()["streams"][0]["frames"] == 6
    assert 'facestream_key_ratio{stream="cam1"}' not in client.get("/metrics").text


def test_bad_frames_keep_the_connection(make_client, videos_dir: Path) -> None:
    client = make_client(max_frame_bytes=200_000)
    good = jpeg(clip_frames(videos_dir, count=1)[0])
    bad = {
        "empty": b"",
        "not_image": b"definitely not a picture",
        "corrupt": good[: len(good) // 3],
        "too_large": good + b"\0" * 200_000,
    }
    with client.websocket_connect("/ws") as ws:
        ws.receive_json()
        for i, (reason, data) in enumerate(bad.items()):
            ws.send_bytes(data)
            header, _ = receive(ws)
            assert header == {"type": "error", "frame_id": i, "reason": reason, "message": header["message"]}
            assert len(header["message"]) > 10
        ws.send_bytes(good)
        header, payload = receive(ws)
        assert header["type"] == "result" and header["frame_id"] == len(bad) and payload
    metrics = client.get("/metrics").text
    for reason in bad:
        assert f'facestream_bad_frames_total{{reason="{reason}"}} 1.0' in metrics


def test_one_clients_bad_frames_never_touch_another(make_client, videos_dir: Path) -> None:
    client = make_client(scheduler="fixed", knob=4)
    frames = clip_frames(videos_dir, count=5)
    with client.websocket_connect("/ws?name=a") as a, client.websocket_connect("/ws?name=b") as b:
        a.receive_json(), b.receive_json()
        for i, rgb in enumerate(frames):
            a.send_bytes(b"\xff\xd8\xff garbage")
            b.send_bytes(jpeg(rgb))
            assert receive(a)[0]["reason"] == "corrupt"
            header, _ = receive(b)
            assert header["type"] == "result" and header["frame_id"] == i
            assert header["key"] == (i % 4 == 0) or not header["face"]
        streams = {s["name"]: s for s in client.get("/streams").json()["streams"]}
        assert streams["a"]["bad_frames"] == 5 and streams["a"]["frames"] == 0
        assert streams["b"]["bad_frames"] == 0 and streams["b"]["frames"] == 5


def test_control_messages(make_client, videos_dir: Path) -> None:
    client = make_client(scheduler="fixed", knob=30)
    frames = clip_frames(videos_dir, count=4)
    with client.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_text(json.dumps({"type": "config", "scheduler": "always", "mask_format": "rle"}))
        config = ws.receive_json()
        assert config["type"] == "config" and config["scheduler"] == "always"
        for rgb in frames[:2]:
            ws.send_bytes(jpeg(rgb))
            header, payload = receive(ws)
            assert payload is None and header["key"] in (True, False)
            if header["face"]:
                assert header["key"] and header["format"] == "rle"
                mask = decode_run_length(header["rle"], header["height"], header["width"])
                assert mask.shape == rgb.shape[:2]
        for text in (
            "not json",
            "[1, 2]",
            '{"type": "config", "scheduler": "magic"}',
            '{"type": "config", "x": 1}',
        ):
            ws.send_text(text)
            error = ws.receive_json()
            assert error["type"] == "error" and error["reason"] == "bad_control" and error["message"]
        ws.send_bytes(jpeg(frames[2]))
        assert receive(ws)[0]["type"] == "result"  # still streaming


def test_max_fps_drops_and_reports(make_client, videos_dir: Path) -> None:
    client = make_client()
    rgb = clip_frames(videos_dir, count=1)[0]
    with client.websocket_connect("/ws?max_fps=0.5&format=none") as ws:
        ws.receive_json()
        for _ in range(3):
            ws.send_bytes(jpeg(rgb))
        messages = [receive(ws)[0] for _ in range(3)]
    kinds = sorted(m["type"] for m in messages)
    assert kinds == ["dropped", "dropped", "result"]
    assert all(m["reason"] == "max_fps" for m in messages if m["type"] == "dropped")


def test_access_control_and_limits(make_client, videos_dir: Path) -> None:
    client = make_client(token="s3cret", max_streams=1)
    assert client.get("/streams").status_code == 401
    assert client.get("/streams", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes need no token
    with client.websocket_connect("/ws") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_json()
    assert closed.value.code == CLOSE_UNAUTHORIZED
    with client.websocket_connect("/ws?token=s3cret") as first:
        assert first.receive_json()["type"] == "hello"
        with (
            client.websocket_connect("/ws?token=s3cret") as second,
            pytest.raises(WebSocketDisconnect) as full,
        ):
            second.receive_json()
        assert full.value.code == CLOSE_TRY_AGAIN and "too many streams" in full.value.reason
    with (
        client.websocket_connect("/ws?token=s3cret&scheduler=magic") as ws,
        pytest.raises(WebSocketDisconnect) as bad,
    ):
        ws.receive_json()
    assert bad.value.code == CLOSE_BAD_REQUEST and "scheduler" in bad.value.reason


def test_subscriber_drops_oldest_when_slow() -> None:
    import asyncio

    loop = asyncio.new_event_loop()
    drops = []
    subscriber = Subscriber(loop, "png", size=2, on_drop=lambda: drops.append(1))
    for i in range(5):
        subscriber._put(type("M", (), {"header": {"i": i}})())  # type: ignore[arg-type]
    assert subscriber.queue.qsize() == 2 and len(drops) == 3
    assert [subscriber.queue.get_nowait().header["i"] for _ in range(2)] == [3, 4]
    loop.close()


# ---------------------------------------------------------------------------- cameras


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_camera_stream_life_cycle(make_client, videos_dir: Path) -> None:
    """POST /streams reads a source (here a local clip), WS /streams/{id}/ws watches it, DELETE stops."""
    client = make_client(scheduler="fixed", knob=5, rtsp_backoff_max_s=1.0)
    created = client.post(
        "/streams", json={"url": str(videos_dir / "lp_d3.mp4"), "name": "door", "max_fps": 50}
    )
    assert created.status_code == 201, created.text
    stream = created.json()
    assert stream["kind"] == "camera" and stream["name"] == "door"
    with client.websocket_connect(f"/streams/{stream['id']}/ws?format=rle") as ws:
        assert ws.receive_json()["type"] == "hello"
        results = []
        while len(results) < 3:
            message = ws.receive_json()
            if message["type"] == "result":
                results.append(message)
        assert all(r["format"] in ("rle", "none") for r in results)
        listed = client.get(f"/streams/{stream['id']}").json()
        assert listed["state"] == "running" and listed["frames"] >= 3
        assert client.delete(f"/streams/{stream['id']}").json()["state"] == "stopped"
        while (message := ws.receive_json())["type"] != "state":
            pass
        assert message["state"] == "stopped"
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()
    assert client.get(f"/streams/{stream['id']}").status_code == 404
    assert client.delete(f"/streams/{stream['id']}").status_code == 404


def test_camera_requests_are_checked(make_client) -> None:
    client = make_client(max_streams=1)
    assert client.post("/streams", json={"url": "ftp://example.com/x"}).status_code == 422
    assert client.post("/streams", json={"url": "rtsp://cam/x", "scheduler": "magic"}).status_code == 422
    assert client.post("/streams", json={"nothing": 1}).status_code == 422
    with (
        client.websocket_connect("/streams/camera-999/ws") as ws,
        pytest.raises(WebSocketDisconnect) as closed,
    ):
        ws.receive_json()
    assert closed.value.code == 4404
    dead = client.post("/streams", json={"url": "rtsp://user:pw@127.0.0.1:1/none", "name": "dead"})
    assert dead.status_code == 201 and dead.json()["url"] == "rtsp://user:***@127.0.0.1:1/none"
    assert client.post("/streams", json={"url": "rtsp://127.0.0.1:1/other"}).status_code == 429
    assert _wait(lambda: client.get("/streams").json()["streams"][0]["state"] == "reconnecting", 20)
    stream = client.get("/streams").json()["streams"][0]
    assert "pw" not in json.dumps(stream) and stream["error"]
    assert 'facestream_camera_reconnects_total{stream="dead"}' in client.get("/metrics").text


# ---------------------------------------------------------------------------- command line


def test_serve_validate_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """--validate-config: the effective settings (file < env < arguments, token masked) and the
    weights folder, or every problem and exit code 2."""
    config = tmp_path / "serve.toml"
    config.write_text('[facestream]\nport = 9123\nscheduler = "rl"\nknob = 0.3\ntoken = "abc"\n')
    assert main(["serve", "--config", str(config), "--validate-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["port"] == 9123 and shown["knob"] == 0.3 and shown["token"] == "***"
    assert shown["weights_found"]
    monkeypatch.setenv("FACESTREAM_MAX_STREAMS", "0")
    assert main(["serve", "--config", str(config), "--validate-config"]) == 2
    assert "max_streams" in capsys.readouterr().err
    monkeypatch.delenv("FACESTREAM_MAX_STREAMS")
    assert main(["serve", "--weights", str(tmp_path / "nowhere"), "--validate-config"]) == 2
    assert "nowhere" in capsys.readouterr().err


# ---------------------------------------------------------------------------- key-frame batching


def test_key_frames_of_several_streams_batch_to_the_same_result(
    engine: ServiceEngine, videos_dir: Path
) -> None:
    clips = [clip_frames(videos_dir, count=3), clip_frames(videos_dir, OTHER_CLIP, count=3)]
    alone = [engine.segmenter(make_scheduler("fixed", 2)) for _ in range(2)]
    together = [engine.segmenter(make_scheduler("fixed", 2)) for _ in range(2)]
    for i in range(3):
        expected = [s.step(frames[i]) for s, frames in zip(alone, clips, strict=True)]
        begun = [s.begin(frames[i]) for s, frames in zip(together, clips, strict=True)]
        requests = [b for b in begun if isinstance(b, KeyRequest)]
        assert len(requests) in (0, 2)  # both streams key on the same frames
        batched = run_key_batch(requests, engine.with_conv6) if requests else begun
        for want, got in zip(expected, batched, strict=True):
            assert (want.index, want.key, want.face) == (got.index, got.key, got.face)
            np.testing.assert_array_equal(want.mask, got.mask)
            assert got.timings["total"] >= got.timings.get("key", 0.0)


def test_worker_batches_key_frames_that_arrive_together(engine: ServiceEngine, videos_dir: Path) -> None:
    metrics = ServiceMetrics()
    worker = InferenceWorker(metrics, max_batch=4)
    sessions = [
        StreamSession("ws", f"s{i}", engine.segmenter(make_scheduler("always")), metrics) for i in range(3)
    ]
    rgb = clip_frames(videos_dir, count=1)[0]
    for session in sessions:  # queued before the worker starts: one round of three key frames
        worker.submit(session, Job(0, rgb, time.perf_counter()))
    bad = StreamSession("ws", "bad", engine.segmenter(make_scheduler("always")), metrics)
    worker.submit(bad, Job(0, np.zeros((0, 5, 3), np.uint8), time.perf_counter()))
    worker.start()
    try:
        assert _wait(lambda: all(s.stats.frames == 1 for s in sessions) and bad.stats.bad == 1, 30)
    finally:
        worker.stop()
    assert worker.key_batches == {3: 1}
    assert all(s.stats.keys == 1 for s in sessions) and bad.stats.frames == 0


def test_engine_dis_size_applies_to_both_views(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``FACESTREAM_DIS_SIZE``: the networks with and without F's Conv6 both run DIS at that side."""
    weights = random_weights(tmp_path_factory)
    engine = ServiceEngine.load(str(weights.directory), "torch", "dis", 1, dis_size=48)
    assert engine.with_conv6.flow_input_size == engine.without_conv6.flow_input_size == 48
    assert engine.backend.endswith("+dis48")
    default = ServiceEngine.load(str(weights.directory), "torch", "dis", 1)
    size = default.with_conv6.segmentation_config.input_size
    assert default.with_conv6.flow_input_size == default.without_conv6.flow_input_size == size


def test_engine_serves_a_policy_that_takes_cues(
    tmp_path_factory: pytest.TempPathFactory, videos_dir: Path
) -> None:
    """Weights whose policy takes cues (PolicyConfig.cues): the warm-up feeds it the wider expert
    input, and an rl stream runs through the shared networks."""
    weights = random_weights(tmp_path_factory, policy_cues=("magnitude", "residual_parts"))
    engine = ServiceEngine.load(str(weights.directory), "onnxruntime", "dis", 1)
    engine.warm_up()
    assert engine.with_conv6.policy_cues == ("magnitude", "residual_parts")
    segmenter = engine.segmenter(make_scheduler("rl", 0.5))
    results = [segmenter.step(frame) for frame in clip_frames(videos_dir, count=4)]
    assert all(r.face for r in results) and all(r.value is not None for r in results[1:] if not r.key)


def test_client_splits_the_server_time_into_stages_and_waiting() -> None:
    stats = ClientStats(
        server_stages=[
            {"decode": 2.0, "flow": 8.0, "correct": 4.0, "encode": 1.0, "total": 20.0},
            {"decode": 2.0, "key": 90.0, "detect": 20.0, "encode": 1.0, "total": 120.0},
        ]
    )
    means = stats.stage_means()
    assert means == {
        "correct": 2.0,
        "decode": 2.0,
        "detect": 10.0,
        "encode": 1.0,
        "flow": 4.0,
        "key": 45.0,
        "waiting": 6.0,  # 70 ms total on average, 64 of it in the stages
    }
    assert ClientStats().stage_means() == {} and ClientStats().summary()["server_stage_ms_mean"] == {}
