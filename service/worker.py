"""One inference worker per device: a thread that serves every stream through a job queue.

Streams hand it frames through their latest-frame slot (:meth:`InferenceWorker.submit`): while
a stream's frame waits, a newer one replaces it and the older is counted as dropped ("busy"), so
a slow machine shows fewer frames, never a growing delay. The queue holds streams that have a
frame waiting, each at most once, served in arrival order; the worker is the only thread that
runs the networks. Streams that are ready together (up to ``max_batch``) are served as one round:
each runs up to its key network, and the key frames of the round go through N_feat as one batch
(on a GPU one launch instead of several; on a CPU it changes little).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

from facestream.engines.pipeline import FrameResult, KeyRequest, run_key_batch
from facestream.service.codec import encode_mask
from facestream.service.metrics import ServiceMetrics
from facestream.service.sessions import Job, Message, StreamSession

log = logging.getLogger(__name__)


class InferenceWorker:
    def __init__(self, metrics: ServiceMetrics, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.metrics = metrics
        self.max_batch = max_batch
        self.key_batches: Counter[int] = Counter()  # batch size -> rounds
        self._ready: queue.Queue[StreamSession | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="facestream-worker", daemon=True)
        self.processed = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._ready.put(None)
            self._thread.join(timeout)

    def submit(self, session: StreamSession, job: Job) -> None:
        """Thread-safe: make ``job`` the stream's next frame (replacing, and dropping, a waiting one)."""
        with session.lock:
            if session.closed:
                return
            replaced, session.pending = session.pending, job
            enqueue = not session.queued
            session.queued = True
        if replaced is not None:
            session.drop("busy", replaced.frame_id)
        if enqueue:
            self._ready.put(session)

    @property
    def queue_depth(self) -> int:
        return self._ready.qsize()

    def _run(self) -> None:
        while True:
            first = self._ready.get()
            if first is None:
                return
            round_ = [first]
            while len(round_) < self.max_batch:
                try:
                    more = self._ready.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # stop after this round
                    self._ready.put(None)
                    break
                round_.append(more)
            self._serve(round_)

    def _serve(self, sessions: list[StreamSession]) -> None:
        """One round: each stream's waiting frame up to N_feat, the key frames batched, then the
        results published. A failure of one stream's frame never touches the others."""
        keys: dict[int, list[tuple[StreamSession, Job, KeyRequest]]] = {}
        for session in sessions:
            with session.lock:
                job, session.pending = session.pending, None
                session.queued = False
            if job is None or session.closed:
                continue
            out = self._guarded(session, job, partial(self._begin, session, job))
            if isinstance(out, KeyRequest):
                owner = id(getattr(session.segmenter.networks, "inner", session.segmenter.networks))
                keys.setdefault(owner, []).append((session, job, out))
            elif out is not None:
                self._guarded(session, job, partial(self._publish, session, job, out))
        for group in keys.values():
            self.key_batches[len(group)] += 1
            requests = [request for _, _, request in group]
            try:
                results = run_key_batch(requests, requests[0].segmenter.networks)
            except Exception as exc:
                log.exception("key network failed on a batch of %d", len(group))
                for session, job, _ in group:
                    session.bad_frame(job.frame_id, "pipeline", f"segmentation failed: {exc}")
                continue
            for (session, job, _), result in zip(group, results, strict=True):
                self._guarded(session, job, partial(self._publish, session, job, result))

    def _guarded(self, session: StreamSession, job: Job, work: Callable[[], object]) -> object:
        """``work()``; a bad frame (ValueError) or a failure is reported to this stream only."""
        try:
            return work()
        except ValueError as exc:
            session.bad_frame(job.frame_id, "pipeline", str(exc))
        except Exception as exc:  # one stream's failure never stops the worker
            log.exception("stream %s frame %d failed", session.name, job.frame_id)
            session.bad_frame(job.frame_id, "pipeline", f"segmentation failed: {exc}")
        return None

    @staticmethod
    def _begin(session: StreamSession, job: Job) -> FrameResult | KeyRequest:
        session.take_replacement()
        return session.segmenter.begin(job.rgb)

    def _publish(self, session: StreamSession, job: Job, result: FrameResult) -> None:
        height, width = job.rgb.shape[:2]
        mask = result.mask
        timings = dict(result.timings, decode=job.decode_ms)
        payloads = {}
        encode_start = time.perf_counter()
        for fmt in {s.mask_format for s in session.subscribers}:
            payloads[fmt] = encode_mask(mask, fmt) if mask is not None else (None, {})
        timings["encode"] = (time.perf_counter() - encode_start) * 1e3
        now = time.perf_counter()
        timings["total"] = (now - job.received) * 1e3
        self._account(session, result.key, result.face, timings, now)
        header = {
            "type": "result",
            "frame_id": job.frame_id,
            "key": result.key,
            "face": result.face,
            "width": width,
            "height": height,
            "box": [round(v, 1) for v in result.box] if result.box is not None else None,
            "value": result.value,
            "timings_ms": {k: round(v, 2) for k, v in timings.items()},
            "key_ratio": round(session.key_ratio, 4),
            "fps": round(session.fps, 2),
            "frames": session.stats.frames,
            "dropped": sum(session.stats.dropped.values()),
        }
        for subscriber in list(session.subscribers):
            payload, extra = payloads.get(subscriber.mask_format, (None, {}))
            fmt = subscriber.mask_format if mask is not None else "none"
            subscriber.publish(Message({**header, "format": fmt, **extra}, payload))
        self.processed += 1

    def _account(self, session: StreamSession, key: bool, face: bool, timings: dict, now: float) -> None:
        stats = session.stats
        stats.frames += 1
        stats.keys += int(key)
        stats.faces += int(face)
        session.fps = stats.tick(now)
        self.metrics.frame(session.name, key, timings)
        self.metrics.stream_rates(session.name, session.key_ratio, session.fps)
