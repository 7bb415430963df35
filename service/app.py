"""The composition root: ``create_app(settings)`` builds the FastAPI app and its collaborators.

Routes: ``/`` (browser page), ``/ws`` (a client's own frames), ``/streams`` (cameras the service
reads, ``/streams/{id}/ws`` to watch one), ``/metrics``, ``/healthz``, ``/readyz``, ``/docs``.
Errors become HTTP status codes and WebSocket close codes here, at the edge, and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from facestream import __version__
from facestream.engines.schedulers import make_scheduler
from facestream.service.codec import BadFrame, decode_frame
from facestream.service.engine import ServiceEngine
from facestream.service.metrics import ServiceMetrics
from facestream.service.rtsp import RtspOptions, RtspSource, StreamState
from facestream.service.sessions import Job, Message, StreamSession, Subscriber
from facestream.service.settings import MASK_FORMATS, ServiceSettings
from facestream.service.worker import InferenceWorker

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

# WebSocket close codes (1000-2999 are the protocol's, 4000-4999 this application's).
CLOSE_UNAUTHORIZED = 4401  # missing or wrong bearer token
CLOSE_BAD_REQUEST = 4400  # bad query parameter (scheduler, knob, format, ...)
CLOSE_NOT_FOUND = 4404  # no such stream
CLOSE_CONFLICT = 4409  # stream name in use
CLOSE_TRY_AGAIN = 1013  # not ready yet, or the stream limit is reached
CLOSE_STREAM_ENDED = 1001  # the camera stream was deleted

EngineLoader = Callable[[ServiceSettings], ServiceEngine]


def load_engine(settings: ServiceSettings) -> ServiceEngine:
    engine = ServiceEngine.load(
        settings.weights,
        settings.backend,
        settings.flow,
        settings.threads,
        dis_size=settings.dis_size,
        correct=settings.correct,
        correct_precision=settings.correct_precision,
    )
    engine.warm_up()
    return engine


class Camera:
    """A camera stream: its session and the reader feeding it."""

    def __init__(self, session: StreamSession, url: str, source: RtspSource) -> None:
        self.session, self.url, self.source = session, url, source


class Service:
    """Everything the routes share: settings, metrics, the worker, the engine, the streams."""

    def __init__(self, settings: ServiceSettings, loader: EngineLoader) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.worker = InferenceWorker(self.metrics)
        self.engine: ServiceEngine | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.streams: dict[str, StreamSession] = {}
        self.cameras: dict[str, Camera] = {}
        self._loader = loader
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self.worker.start()
        threading.Thread(target=self._load, name="facestream-load", daemon=True).start()

    def _load(self) -> None:
        try:
            self.engine = self._loader(self.settings)
        except Exception as exc:  # reported by /readyz; the process stays up to say why
            log.exception("loading the networks failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.ready.set()

    def stop(self) -> None:
        for camera in list(self.cameras.values()):
            self.close_camera(camera)
        self.worker.stop()

    # ------------------------------------------------------------------ streams

    def open_stream(
        self,
        kind: str,
        name: str | None,
        scheduler: str | None,
        knob: float | None,
        mask_format: str | None,
        max_fps: float | None,
    ) -> StreamSession:
        """A new stream; ValueError (bad request), LookupError (name taken) or OverflowError
        (limit reached) otherwise."""
        s = self.settings
        if self.engine is None:
            raise RuntimeError("not ready")
        fmt = mask_format or s.mask_format
        if fmt not in MASK_FORMATS:
            raise ValueError(f"format must be one of {', '.join(MASK_FORMATS)}, got {fmt!r}")
        if max_fps is not None and max_fps < 0:
            raise ValueError(f"max_fps must be positive, got {max_fps}")
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", name):
            raise ValueError("name: 1-64 letters, digits or _ . : -")
        segmenter = self.engine.segmenter(_scheduler(scheduler or s.scheduler, knob, s, scheduler))
        session = StreamSession(
            kind, name, segmenter, self.metrics, mask_format=fmt, max_fps=max_fps or s.max_fps
        )
        with self._lock:
            if len(self.streams) >= s.max_streams:
                raise OverflowError(f"too many streams (limit {s.max_streams})")
            if any(other.name == session.name for other in self.streams.values()):
                raise LookupError(f"a stream named {session.name!r} is open")
            self.streams[session.id] = session
        self.metrics.active.set(len(self.streams))
        return session

    def close_stream(self, session: StreamSession) -> None:
        with session.lock:
            session.closed = True
            session.pending = None
        with self._lock:
            self.streams.pop(session.id, None)
        self.metrics.active.set(len(self.streams))
        self.metrics.stream_closed(session.name)

    def reconfigure(self, session: StreamSession, control: dict[str, Any], subscriber: Subscriber) -> None:
        """Apply a client's ``{"type": "config", ...}`` message; ValueError when it is bad."""
        unknown = set(control) - {"type", "scheduler", "knob", "mask_format", "max_fps"}
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        fmt = control.get("mask_format", subscriber.mask_format)
        if fmt not in MASK_FORMATS:
            raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {fmt!r}")
        max_fps = control.get("max_fps", session.max_fps)
        if max_fps is not None and (not isinstance(max_fps, int | float) or max_fps < 0):
            raise ValueError(f"max_fps must be a positive number or null, got {max_fps!r}")
        if "scheduler" in control or "knob" in control:
            name = control.get("scheduler", session.scheduler.name)
            scheduler = make_scheduler(name, _number(control.get("knob")))
            assert self.engine is not None
            session.replace_segmenter(self.engine.segmenter(scheduler))
        subscriber.mask_format = session.mask_format = fmt
        session.max_fps = max_fps or None

    def open_camera(self, request: CameraRequest) -> Camera:
        session = self.open_stream(
            "camera", request.name, request.scheduler, request.knob, request.mask_format, request.max_fps
        )
        s = self.settings
        options = RtspOptions(
            transport=s.rtsp_transport,
            open_timeout_s=s.rtsp_open_timeout_s,
            read_timeout_s=s.rtsp_read_timeout_s,
            backoff_max_s=s.rtsp_backoff_max_s,
            max_retries=s.rtsp_max_retries,
        )
        worker = self.worker

        def on_frame(rgb: Any, index: int) -> None:
            now = time.perf_counter()
            if session.admit(now):
                worker.submit(session, Job(index, rgb, now))
            else:
                session.drop("max_fps")

        def on_state(state: StreamState, error: str | None) -> None:
            session.state, session.error = state.value, error
            if state is StreamState.RECONNECTING:
                self.metrics.reconnects.labels(stream=session.name).inc()
            session.publish(Message({"type": "state", "state": state.value, "error": error}))

        session.state = StreamState.STARTING.value
        try:
            source = RtspSource(request.url, on_frame, options=options, on_state=on_state, name=session.name)
        except ValueError:
            self.close_stream(session)
            raise
        camera = Camera(session, request.url, source)
        self.cameras[session.id] = camera
        source.start()
        return camera

    def close_camera(self, camera: Camera) -> None:
        camera.source.stop()
        self.cameras.pop(camera.session.id, None)
        camera.session.state = StreamState.STOPPED.value
        camera.session.publish(Message({"type": "state", "state": "stopped", "error": None}))
        self.close_stream(camera.session)

    def describe_camera(self, camera: Camera) -> dict[str, Any]:
        source = camera.source
        return {
            **camera.session.describe(),
            "url": mask_credentials(camera.url),
            "reconnects": source.reconnects,
            "decode_errors": source.decode_errors,
        }

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self.engine is not None and self.ready.is_set():
            return True, {"ready": True, **self.engine.describe(), "queue_depth": self.worker.queue_depth}
        reason = self.load_error or "loading and warming up the networks"
        return False, {"ready": False, "reason": reason}


class CameraRequest(BaseModel):
    """``POST /streams``: a camera for the service to read and segment."""

    url: str = Field(..., description="rtsp:// (or rtsps, rtmp, http(s), file) URL of the camera")
    name: str | None = Field(None, description="stream label in metrics (default: its id)")
    scheduler: str | None = Field(None, description="key scheduler (default: the service's)")
    knob: float | None = Field(None, description="the scheduler's knob (tau, interval, threshold)")
    mask_format: str | None = Field(None, description="png, rle, raw or none")
    max_fps: float | None = Field(None, description="frame-rate cap for this camera")


def mask_credentials(url: str) -> str:
    """``rtsp://user:secret@host/x`` -> ``rtsp://user:***@host/x``."""
    return re.sub(r"(//[^/:@]+):[^/@]*@", r"\1:***@", url)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"knob must be a number, got {value!r}")
    return float(value)


def _scheduler(name: str, knob: float | None, settings: ServiceSettings, asked: str | None) -> Any:
    """The stream's scheduler: the asked one, or the service default with its default knob."""
    if asked is None and knob is None:
        knob = settings.knob
    return make_scheduler(name, knob)


def _bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


def _query_float(value: str | None, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


# ---------------------------------------------------------------------- the app


def create_app(settings: ServiceSettings | None = None, *, loader: EngineLoader | None = None) -> FastAPI:
    """The service. ``loader`` builds the networks (default: the settings' weights, warmed up);
    tests inject tiny ones."""
    settings = settings or ServiceSettings()
    service = Service(settings, loader or load_engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.stop()

    app = FastAPI(
        title="facestream",
        version=__version__,
        description="Real-time face video segmentation: DeepLab-V3+ on key frames, flow-warped "
        "between them, key frames chosen by a reinforcement-learned policy.",
        lifespan=lifespan,
    )
    app.state.service = service

    def require_token(request: Request) -> None:
        if settings.token is not None:
            if _bearer(request.headers.get("authorization")) != settings.token.get_secret_value():
                raise HTTPException(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    def ws_authorized(websocket: WebSocket) -> bool:
        if settings.token is None:
            return True
        given = _bearer(websocket.headers.get("authorization")) or websocket.query_params.get("token")
        return given == settings.token.get_secret_value()

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return JSONResponse({"detail": "the browser page is not installed"}, 404)
        return FileResponse(page)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        """Alive (the process answers); see /readyz for whether it can segment."""
        return {"status": "alive", "version": __version__}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Ready when the weights are loaded and the networks warm; names the backend."""
        ok, body = service.readiness()
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics", tags=["health"])
    async def metrics() -> Response:
        """Prometheus metrics (facestream_*)."""
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/streams", tags=["streams"], dependencies=[Depends(require_token)])
    async def list_streams() -> dict[str, Any]:
        """Every open stream (WebSocket clients and cameras) with its statistics."""
        cameras = [service.describe_camera(c) for c in list(service.cameras.values())]
        others = [s.describe() for s in list(service.streams.values()) if s.id not in service.cameras]
        return {"streams": cameras + others}

    @app.post("/streams", tags=["streams"], status_code=201, dependencies=[Depends(require_token)])
    async def add_camera(request: CameraRequest) -> dict[str, Any]:
        """Start reading and segmenting a camera; watch it on ``/streams/{id}/ws``."""
        if not service.ready.is_set():
            raise HTTPException(503, service.readiness()[1]["reason"])
        try:
            camera = await asyncio.to_thread(service.open_camera, request)
        except OverflowError as exc:
            raise HTTPException(429, str(exc)) from None
        except LookupError as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return service.describe_camera(camera)

    @app.get("/streams/{stream_id}", tags=["streams"], dependencies=[Depends(require_token)])
    async def get_stream(stream_id: str) -> dict[str, Any]:
        if stream_id in service.cameras:
            return service.describe_camera(service.cameras[stream_id])
        if stream_id in service.streams:
            return service.streams[stream_id].describe()
        raise HTTPException(404, f"no stream {stream_id!r}")

    @app.delete("/streams/{stream_id}", tags=["streams"], dependencies=[Depends(require_token)])
    async def delete_camera(stream_id: str) -> dict[str, Any]:
        """Stop a camera stream (its watchers are told, then closed)."""
        camera = service.cameras.get(stream_id)
        if camera is None:
            raise HTTPException(404, f"no camera stream {stream_id!r}")
        await asyncio.to_thread(service.close_camera, camera)
        return {**service.describe_camera(camera), "state": "stopped"}

    @app.websocket("/ws")
    async def client_stream(websocket: WebSocket) -> None:
        """Send frames (binary JPEG/PNG/WebP) and config messages; receive masks. See README."""
        await websocket.accept()
        session = await _open_ws_stream(websocket)
        if session is None:
            return
        q = websocket.query_params
        subscriber = _subscriber(session, q.get("format") or session.mask_format)
        await _send_hello(websocket, session, subscriber)
        sender = asyncio.create_task(_pump(websocket, subscriber))
        try:
            await _receive_frames(websocket, session, subscriber)
        finally:
            sender.cancel()
            session.unsubscribe(subscriber)
            service.close_stream(session)

    @app.websocket("/streams/{stream_id}/ws")
    async def watch_camera(websocket: WebSocket, stream_id: str) -> None:
        """Results of a camera stream (``?format=png|rle|raw|none``)."""
        await websocket.accept()
        if not ws_authorized(websocket):
            await websocket.close(CLOSE_UNAUTHORIZED, "missing or wrong bearer token")
            return
        camera = service.cameras.get(stream_id)
        if camera is None:
            await websocket.close(CLOSE_NOT_FOUND, f"no camera stream {stream_id!r}")
            return
        fmt = websocket.query_params.get("format") or camera.session.mask_format
        if fmt not in MASK_FORMATS:
            await websocket.close(CLOSE_BAD_REQUEST, f"format must be one of {', '.join(MASK_FORMATS)}")
            return
        subscriber = _subscriber(camera.session, fmt)
        await _send_hello(websocket, camera.session, subscriber)
        sender = asyncio.create_task(_pump(websocket, subscriber, until_stopped=True))
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        finally:
            sender.cancel()
            camera.session.unsubscribe(subscriber)

    def _subscriber(session: StreamSession, fmt: str) -> Subscriber:
        subscriber = Subscriber(
            asyncio.get_running_loop(),
            fmt,
            settings.subscriber_queue,
            on_drop=lambda: session.drop("slow_client"),
        )
        session.subscribe(subscriber)
        return subscriber

    async def _open_ws_stream(websocket: WebSocket) -> StreamSession | None:
        if not ws_authorized(websocket):
            await websocket.close(CLOSE_UNAUTHORIZED, "missing or wrong bearer token")
            return None
        if not service.ready.is_set():
            await websocket.close(CLOSE_TRY_AGAIN, f"not ready: {service.readiness()[1]['reason']}"[:120])
            return None
        q = websocket.query_params
        try:
            return service.open_stream(
                "ws",
                q.get("name") or None,
                q.get("scheduler") or None,
                _query_float(q.get("knob"), "knob"),
                q.get("format") or None,
                _query_float(q.get("max_fps"), "max_fps"),
            )
        except OverflowError as exc:
            await websocket.close(CLOSE_TRY_AGAIN, str(exc))
        except LookupError as exc:
            await websocket.close(CLOSE_CONFLICT, str(exc)[:120])
        except ValueError as exc:
            await websocket.close(CLOSE_BAD_REQUEST, str(exc)[:120])
        return None

    async def _send_hello(websocket: WebSocket, session: StreamSession, subscriber: Subscriber) -> None:
        assert service.engine is not None
        await websocket.send_json(
            {
                "type": "hello",
                "stream": session.id,
                "name": session.name,
                "backend": service.engine.backend,
                "schedulers": service.engine.schedulers(),
                "scheduler": session.describe()["scheduler"],
                "knob": session.describe()["knob"],
                "mask_format": subscriber.mask_format,
                "mask_formats": list(MASK_FORMATS),
                "classes": ["background", "skin", "eyes", "lips", "inner_mouth"],
                "limits": {
                    "max_frame_bytes": settings.max_frame_bytes,
                    "max_pixels": settings.max_pixels,
                    "max_fps": session.max_fps,
                },
            }
        )

    async def _pump(websocket: WebSocket, subscriber: Subscriber, until_stopped: bool = False) -> None:
        """Send the subscriber's messages: a JSON header, then the binary mask when there is one."""
        try:
            while True:
                message = await subscriber.next()
                await websocket.send_json(message.header)
                if message.payload is not None:
                    await websocket.send_bytes(message.payload)
                if until_stopped and message.header.get("type") == "state":
                    if message.header.get("state") in ("stopped", "failed"):
                        await websocket.close(CLOSE_STREAM_ENDED, f"camera stream {message.header['state']}")
                        return
        except (WebSocketDisconnect, RuntimeError):
            return

    async def _receive_frames(websocket: WebSocket, session: StreamSession, subscriber: Subscriber) -> None:
        frame_id = 0
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is not None:
                await _frame(session, frame_id, data)
                frame_id += 1
            elif message.get("text") is not None:
                _control(session, subscriber, message["text"])

    async def _frame(session: StreamSession, frame_id: int, data: bytes) -> None:
        received = time.perf_counter()
        if not session.admit(received):
            session.drop("max_fps", frame_id)
            return
        try:
            rgb = await asyncio.to_thread(
                decode_frame, data, max_bytes=settings.max_frame_bytes, max_pixels=settings.max_pixels
            )
        except BadFrame as exc:
            session.bad_frame(frame_id, exc.reason, str(exc))
            return
        decode_ms = (time.perf_counter() - received) * 1e3
        service.worker.submit(session, Job(frame_id, rgb, received, decode_ms))

    def _control(session: StreamSession, subscriber: Subscriber, text: str) -> None:
        try:
            control = json.loads(text)
            if not isinstance(control, dict) or control.get("type") != "config":
                raise ValueError('control messages are JSON objects {"type": "config", ...}')
            service.reconfigure(session, control, subscriber)
        except (ValueError, json.JSONDecodeError) as exc:
            session.metrics.bad.labels(reason="bad_control").inc()
            subscriber.publish(Message({"type": "error", "reason": "bad_control", "message": str(exc)}))
            return
        subscriber.publish(Message({"type": "config", **session.describe()}))

    return app
