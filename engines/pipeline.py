"""The dynamic segmentation pipeline: one :class:`StreamSegmenter` per video stream.

For every frame: ask the scheduler (which may run F on the face crop), then either run N_feat
(key: the face box is located anew and the cache refreshed) or warp the cached key features by F's
flow (non-key). F runs only when the scheduler or the warp needs it, and at most once per frame.

Whatever the scheduler says, a frame whose last key is more than ``max_key_distance`` frames back
(90: the decision window, and the evaluation's gap limit) is a key: a learnt policy that has settled into
"never key" on a calm video cannot leave a stream on one stale key frame.

With weights that include the warp corrector (``correction.safetensors``; not in the paper) and
``correct=True`` (the default), every non-key frame's warped scores go through it, with the
current crop and the key crop warped by the same flow (:mod:`facestream.models.correction`).

Non-key crops are cut from the key's square moved with the face (``track``, the default): after
each non-key frame the square shifts by the face's median flow (:func:`track_box`), so a face that
moves fast stays inside the crop. With ``track=False`` the key's square is held until the next key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from facestream.engines.cues import key_maps, warp_residuals
from facestream.engines.face import Box, FaceLocator, crop_square, paste_scores, track_box
from facestream.engines.networks import FlowResult, Networks
from facestream.engines.schedulers import (
    WINDOW,
    DecisionContext,
    DecisionHistory,
    Scheduler,
    check_scheduler,
)


@dataclass
class FrameResult:
    """The outcome of one frame.

    ``mask``: (H, W) uint8 class ids in full-frame coordinates, or None when no face was found.
    ``timings``: milliseconds per stage (crop, detect, flow, policy, key, warp, correct, task, total).
    ``value``: what the scheduler compared with its knob (probability, score, magnitude, ...).
    """

    index: int
    key: bool
    face: bool
    mask: np.ndarray | None
    box: Box | None
    timings: dict[str, float]
    value: float | None = None


@dataclass
class _KeyCache:
    box: Box
    crop_box: Box  # where the next non-key crop is cut (the key's square, moved with the face)
    features: np.ndarray  # (1, C, S/4, S/4) f_k
    flow_image: np.ndarray  # (3, Sf, Sf) I_k at the flow network's input size, [0, 1]
    scores: np.ndarray | None = None  # (K, S/4, S/4) the key's class scores
    maps: np.ndarray | None = None  # engines.cues.key_maps of the key, made when a cue needs them
    small: np.ndarray | None = None  # (3, I, I) the key crop at the warp corrector's input size

    def cue_maps(self) -> np.ndarray:
        if self.maps is None:
            assert self.scores is not None
            self.maps = key_maps(self.flow_image, self.scores)
        return self.maps


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + (time.perf_counter() - start) * 1e3


def to_chw(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 in [0, 1]."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) * (1.0 / 255.0)


def flow_image(crop: np.ndarray, size: int) -> np.ndarray:
    """A (S, S, 3) uint8 face crop as F's input: (3, size, size) float32 in [0, 1] (area-resized)."""
    if crop.shape[0] != size:
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    return to_chw(crop)


def resized_chw(image: np.ndarray, size: int) -> np.ndarray:
    """(C, S, S) float32 image area-resized to (C, size, size) (unchanged when S == size)."""
    if image.shape[-1] == size:
        return image
    # Plane by plane: contiguous single-channel resizes are several times faster than one
    # resize of the strided (S, S, 3) view.
    return np.stack([cv2.resize(plane, (size, size), interpolation=cv2.INTER_AREA) for plane in image])


def add_correct_argument(parser: Any) -> None:
    """``--no-correct``: leave the warp corrector out of non-key frames (``args.correct``)."""
    parser.add_argument(
        "--no-correct",
        dest="correct",
        action="store_false",
        help="do not run the warp corrector on non-key frames (the paper's pipeline; it runs by "
        "default when the weights have correction.safetensors)",
    )


def mask_confidence(scores: np.ndarray) -> float:
    """Mean max-softmax probability over the face (non-background) pixels of (K, h, w) scores."""
    shifted = scores - scores.max(axis=0, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=0, keepdims=True)
    face = probs.argmax(axis=0) > 0
    return float(probs.max(axis=0)[face].mean()) if face.any() else 0.0


@dataclass
class KeyRequest:
    """A key frame of one stream waiting for N_feat (see :meth:`StreamSegmenter.begin`)."""

    segmenter: StreamSegmenter
    frame: np.ndarray
    crop: np.ndarray  # (S, S, 3) uint8, the face square N_feat sees
    square: Box
    index: int
    timer: _Timer
    value: float | None
    start: float

    @property
    def image(self) -> np.ndarray:
        """N_feat's input: (1, 3, S, S) float32 in [0, 1]."""
        return to_chw(self.crop)[None]

    def complete(self, features: np.ndarray, key_ms: float = 0.0) -> FrameResult:
        """Finish the frame with its N_feat output (1, C, S/4, S/4)."""
        return self.segmenter._complete_key(self, features, key_ms)


def run_key_batch(requests: Sequence[KeyRequest], networks: Networks) -> list[FrameResult]:
    """N_feat once for the key frames of several streams (one batch on ``networks``, whose
    N_feat every request's segmenter shares); each frame's ``key`` time is the batch's."""
    if not requests:
        return []
    start = time.perf_counter()
    features = networks.features(np.concatenate([r.image for r in requests]))
    key_ms = (time.perf_counter() - start) * 1e3
    return [r.complete(features[i : i + 1], key_ms) for i, r in enumerate(requests)]


class StreamSegmenter:
    """Per-stream state (key cache, face box, last 90 decisions) around shared networks."""

    def __init__(
        self,
        networks: Networks,
        scheduler: Scheduler,
        locator: FaceLocator | None = None,
        *,
        window: int = WINDOW,
        track: bool = True,
        max_key_distance: int | None = WINDOW,
        correct: bool = True,
    ) -> None:
        check_scheduler(scheduler, networks)
        if max_key_distance is not None and max_key_distance < 1:
            raise ValueError(f"max_key_distance must be >= 1 frame (or None), got {max_key_distance}")
        self.max_key_distance = max_key_distance
        self.networks = networks
        self.scheduler = scheduler
        self.locator = locator or FaceLocator()
        self.window = window
        self.track = track
        # the warp corrector runs on non-key frames when the weights have one and it is wanted
        self.correct = correct and networks.has_correction
        self.reset()

    def reset(self) -> None:
        self.history = DecisionHistory(self.window)
        self.scheduler.reset()
        self._cache: _KeyCache | None = None
        self._last_mask: np.ndarray | None = None
        self._last_square: Box | None = None
        self._last_confidence = 0.0
        self.index = 0

    @property
    def input_size(self) -> int:
        return self.networks.segmentation_config.input_size

    def step(self, frame: np.ndarray) -> FrameResult:
        """Segment one (H, W, 3) uint8 RGB frame."""
        out = self.begin(frame)
        if isinstance(out, KeyRequest):
            return run_key_batch([out], self.networks)[0]
        return out

    def begin(self, frame: np.ndarray) -> FrameResult | KeyRequest:
        """Everything of :meth:`step` up to N_feat: the result of a non-key frame, or the
        :class:`KeyRequest` of a key frame, to be completed (alone or batched with other streams'
        key frames by :func:`run_key_batch`) before this stream's next frame."""
        if not isinstance(frame, np.ndarray):
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {type(frame).__name__}")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8 or 0 in frame.shape:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {frame.shape} {frame.dtype}")
        timer = _Timer()
        start = time.perf_counter()
        try:
            out = self._step(np.ascontiguousarray(frame), timer, start)
        finally:
            self.index += 1
        if isinstance(out, FrameResult):
            out.timings["total"] = (time.perf_counter() - start) * 1e3
        return out

    def _step(self, frame: np.ndarray, timer: _Timer, start: float) -> FrameResult | KeyRequest:
        index = self.index
        if self._cache is None:
            return self._key(frame, timer, None, start)
        cache = self._cache
        flow_memo: list[FlowResult] = []
        current: list[np.ndarray] = []  # the current crop as flow input

        def flow() -> FlowResult:
            """F on (current crop, key crop), computed once, and only when someone asks."""
            if not flow_memo:
                with timer.stage("crop"):
                    crop = crop_square(frame, cache.crop_box, self.input_size)
                    current.append(self._flow_image(crop))
                with timer.stage("flow"):
                    pair = np.concatenate((current[0], cache.flow_image))[None]
                    flow_memo.append(self.networks.flow(pair))
            return flow_memo[0]

        def residuals() -> np.ndarray:
            """The warp residuals of this frame (engines.cues), from the flow and the key's cache."""
            field = flow().flow  # runs F first (it also cuts the current crop)
            return warp_residuals(cache.cue_maps()[None], current[0][None], field)

        distance = self.history.distance
        if self.max_key_distance is not None and distance is not None and distance > self.max_key_distance:
            return self._key(frame, timer, None, start)  # forced: the key is too old
        ctx = DecisionContext(index, self.history, self.networks, flow, residuals)
        with timer.stage("policy"):
            decision = self.scheduler.decide(ctx)
        ctx.observe()
        timer.timings["policy"] -= timer.timings.get("flow", 0.0) + timer.timings.get("crop", 0.0)
        if decision.key:
            return self._key(frame, timer, decision.value, start)
        return self._nonkey(frame, flow(), current[0], cache, timer, decision.value)

    def _flow_image(self, crop: np.ndarray) -> np.ndarray:
        return flow_image(crop, self.networks.flow_input_size)

    def _key(
        self, frame: np.ndarray, timer: _Timer, value: float | None, start: float
    ) -> FrameResult | KeyRequest:
        with timer.stage("detect"):
            square = self._locate(frame)
        if square is None:
            return self._no_face(timer, value)
        with timer.stage("crop"):
            crop = crop_square(frame, square, self.input_size)
        return KeyRequest(self, frame, crop, square, self.index, timer, value, start)

    def _complete_key(self, request: KeyRequest, features: np.ndarray, key_ms: float) -> FrameResult:
        request.timer.timings["key"] = request.timer.timings.get("key", 0.0) + key_ms
        self._cache = _KeyCache(request.square, request.square, features, self._flow_image(request.crop))
        self.history.record(True)
        result, scores = self._finish(
            request.frame, features, request.square, True, request.timer, request.value
        )
        self._cache.scores = scores
        result.index = request.index
        result.timings["total"] = (time.perf_counter() - request.start) * 1e3
        return result

    def _nonkey(
        self,
        frame: np.ndarray,
        flow: FlowResult,
        current: np.ndarray,
        cache: _KeyCache,
        timer: _Timer,
        value: float | None,
    ) -> FrameResult:
        with timer.stage("warp"):
            features = self.networks.warp(cache.features, flow.flow, flow.scale)
        self.history.record(False)
        box = cache.crop_box

        def correct(scores: np.ndarray) -> np.ndarray:
            with timer.stage("correct"):
                config = self.networks.correction_config
                assert config is not None
                if cache.small is None:
                    cache.small = resized_chw(cache.flow_image, config.image_size)
                small = resized_chw(current, config.image_size)
                return self.networks.correct(small[None], cache.small[None], flow.flow, scores[None])[0]

        result, scores = self._finish(
            frame, features, box, False, timer, value, correct if self.correct else None
        )
        if self.track:
            with timer.stage("warp"):  # moving the crop with the face is part of the warp
                cache.crop_box = track_box(box, cache.box, flow.flow[0], scores)
        return result

    def _finish(
        self,
        frame: np.ndarray,
        features: np.ndarray,
        box: Box,
        key: bool,
        timer: _Timer,
        value: float | None,
        correct: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> tuple[FrameResult, np.ndarray]:
        """The frame's result, and its (K, h, w) class scores over ``box`` (after ``correct``,
        the warp corrector of a non-key frame, when given)."""
        with timer.stage("task"):
            scores = self.networks.task(features)[0]
        if correct is not None:
            scores = correct(scores)
        with timer.stage("task"):
            mask = paste_scores(scores, box, frame.shape[:2])
            self._last_mask, self._last_confidence = mask, mask_confidence(scores)
            self._last_square = box
        return FrameResult(self.index, key, True, mask, box, timer.timings, value), scores

    def _locate(self, frame: np.ndarray) -> Box | None:
        scale = self.locator.config.scale
        face = self.locator.locate(frame, self._last_mask, self._last_confidence, self._last_square)
        return None if face is None else face.square(scale)

    def _no_face(self, timer: _Timer, value: float | None) -> FrameResult:
        """No face on a frame that needed a key: report it and look again on the next frame."""
        self._cache = None
        self._last_mask = self._last_square = None
        self.history.record(False)
        return FrameResult(self.index, False, False, None, None, timer.timings, value)
