"""Shared test helpers for the engine tests: random weights, networks, clip frames, fakes.

A plain module (imported as ``from helpers import ...``; pytest puts tests/ on ``sys.path``).
Weights, ONNX exports and networks are expensive to build on a 2-core machine, so they are made
once per test session and memoised here, keyed by their configuration. The ONNX cache lives in a
session temporary folder (``$FACESTREAM_CACHE`` is set only while a backend is built), never in
the home folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
import websockets.sync.client as ws_client

from facestream.engines.backends import create_networks
from facestream.engines.face import Box
from facestream.engines.networks import FlowResult, Networks
from facestream.engines.weights import FILES, WeightSet, find_weights, write_random_weights
from facestream.models.config import FlowConfig, SegmentationConfig
from facestream.service.bench import free_port, wait_ready

SIZE = 64  # segmentation input side used by the tests (feature grid 16 x 16, flow input 64)
CLIP = "lp_d3.mp4"  # 512 x 512; the Haar detector finds the face on its first 30 frames
OTHER_CLIP = "lp_d18.mp4"  # 480 x 480; likewise

_weights: dict[tuple, WeightSet] = {}
_networks: dict[tuple, Networks] = {}
_frames: dict[tuple, list[np.ndarray]] = {}
_dirs: dict[str, Path] = {}
THREADS = 1  # the machine's 2 cores are shared: 2-thread pools spin and thrash (5-20x slower)

# Every ONNX graph of a full weight set (engines.export.graph_specs), sorted
ALL_GRAPHS = [
    "correction",
    "dvsnet",
    "flow",
    "flow_conv6",
    "policy",
    "segmentation_features",
    "segmentation_task",
    "warp",
]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread inside the block; the previous setting comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _session_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    if name not in _dirs:
        _dirs[name] = factory.mktemp(name)
    return _dirs[name]


def onnx_cache_dir(factory: pytest.TempPathFactory) -> Path:
    """The session's ONNX cache folder (what ``$FACESTREAM_CACHE`` points to in the tests)."""
    return _session_dir(factory, "onnx-cache")


def random_weights(
    factory: pytest.TempPathFactory,
    *,
    split: str = "scores",
    backbone: str = "mobilenet_v2",
    input_size: int = SIZE,
    without: tuple[str, ...] = (),
    policy_cues: tuple[str, ...] = (),
) -> WeightSet:
    """Random weights for a small config (memoised); ``without`` drops optional networks;
    ``policy_cues``: the cues the random policy takes."""
    key = (split, backbone, input_size, tuple(sorted(without)), policy_cues)
    if key not in _weights:
        if without:
            full = random_weights(factory, split=split, backbone=backbone, input_size=input_size)
            directory = factory.mktemp(f"weights-{backbone}-{split}-{input_size}-partial")
            for name, path in full.paths.items():
                if name not in without:
                    (directory / FILES[name]).write_bytes(path.read_bytes())
            _weights[key] = find_weights(directory)
        else:
            directory = factory.mktemp(f"weights-{backbone}-{split}-{input_size}")
            config = SegmentationConfig(backbone=backbone, input_size=input_size, split=split)
            _weights[key] = write_random_weights(directory, config, policy_cues=policy_cues)
    return _weights[key]


def build_networks(
    factory: pytest.TempPathFactory, weights: WeightSet, backend: str, cache: Path | None = None
) -> Networks:
    """``create_networks`` on one thread with ``$FACESTREAM_CACHE`` pointing at a temporary folder.

    (For torch, ``threads`` sets the process-wide thread count: call it under
    :func:`one_torch_thread`.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACESTREAM_CACHE", str(cache or onnx_cache_dir(factory)))
        return create_networks(weights, backend, threads=THREADS)


def networks(factory: pytest.TempPathFactory, backend: str = "onnxruntime", **weight_args) -> Networks:
    """Shared (memoised) networks of :func:`random_weights` on ``backend``; do not mutate."""
    key = (backend, tuple(sorted(weight_args.items())))
    if key not in _networks:
        weights = random_weights(factory, **weight_args)
        _networks[key] = build_networks(factory, weights, backend)
    return _networks[key]


def clip_path(videos_dir: Path, name: str = CLIP) -> Path:
    """``videos_dir / name``; the test is skipped (naming the file) when the clip is missing."""
    path = videos_dir / name
    if not path.is_file():
        pytest.skip(f"clip {path} is missing from the data folder")
    return path


def clip_frames(videos_dir: Path, name: str = CLIP, count: int = 10) -> list[np.ndarray]:
    """The first ``count`` frames of a real clip as (H, W, 3) uint8 RGB (memoised, read-only)."""
    key = (str(videos_dir), name)
    cached = _frames.get(key, [])
    if len(cached) < count:
        cached = []
        with av.open(str(videos_dir / name)) as container:
            for frame in container.decode(video=0):
                image = frame.to_ndarray(format="rgb24")
                image.flags.writeable = False
                cached.append(image)
                if len(cached) >= count:
                    break
        assert len(cached) == count, f"{name} has fewer than {count} frames"
        _frames[key] = cached
    return cached[:count]


def shifted(frame: np.ndarray, dx: int, dy: int = 0) -> np.ndarray:
    """``frame`` translated by (dx, dy) pixels, black where nothing comes in."""
    height, width = frame.shape[:2]
    matrix = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
    return cv2.warpAffine(np.ascontiguousarray(frame), matrix, (width, height))


# --------------------------------------------------------------------------- fake networks


class StubNetworks(Networks):
    """A Networks with no real model behind it: every output is scripted.

    ``key_probabilities`` / ``dvsnet_scores`` are consumed one value per call; ``flow_result``
    is what :meth:`flow` returns. Calls are counted in ``calls`` and their inputs kept in
    ``inputs``.
    """

    backend = "stub"

    def __init__(
        self,
        *,
        input_size: int = SIZE,
        key_probabilities: Iterable[float] = (),
        dvsnet_scores: Iterable[float] = (),
        flow_result: FlowResult | None = None,
        has_policy: bool = True,
        has_dvsnet: bool = True,
    ) -> None:
        segmentation = SegmentationConfig(input_size=input_size)
        flow = FlowConfig(
            input_size=64,
            warp_size=segmentation.feature_size,
            scale_channels=segmentation.feature_channels,
        )
        super().__init__(segmentation, flow, has_policy=has_policy, has_dvsnet=has_dvsnet)
        self.key_probabilities = list(key_probabilities)
        self.dvsnet_scores = list(dvsnet_scores)
        grid = segmentation.feature_size
        self.flow_result = flow_result or FlowResult(
            np.zeros((1, 2, grid, grid), np.float32),
            np.ones((1, segmentation.feature_channels, grid, grid), np.float32),
            np.zeros((1, flow.conv6_channels, flow.conv6_size, flow.conv6_size), np.float32),
        )
        self.calls: Counter[str] = Counter()
        self.inputs: dict[str, list[tuple[np.ndarray, ...]]] = {}

    def _called(self, name: str, *arrays: np.ndarray) -> None:
        self.calls[name] += 1
        self.inputs.setdefault(name, []).append(tuple(np.array(a) for a in arrays))

    def features(self, images: np.ndarray) -> np.ndarray:
        raise AssertionError("StubNetworks.features is not scripted")

    def flow(self, pairs: np.ndarray) -> FlowResult:
        self._called("flow", pairs)
        return self.flow_result

    def warp(self, features: np.ndarray, flow: np.ndarray, scale: np.ndarray) -> np.ndarray:
        raise AssertionError("StubNetworks.warp is not scripted")

    def key_probability(self, conv6: np.ndarray, expert: np.ndarray) -> np.ndarray:
        self._require("policy", self.has_policy)
        self._called("key_probability", conv6, expert)
        return np.array([self.key_probabilities.pop(0)], dtype=np.float32)

    def dvsnet_score(self, conv6: np.ndarray) -> np.ndarray:
        self._require("dvsnet", self.has_dvsnet)
        self._called("dvsnet_score", conv6)
        return np.array([self.dvsnet_scores.pop(0)], dtype=np.float32)


class WrappedNetworks(Networks):
    """Real networks underneath, with call counting and optional overrides.

    * ``flow_fn(pairs, inner) -> FlowResult`` replaces F (e.g. a classical flow estimate);
    * ``key_probability_fn(conv6, expert) -> float`` and ``dvsnet_fn(conv6) -> float`` replace the
      policy and the DVSNet head.

    ``calls`` counts every call by method name; ``log`` lists them in order.
    """

    def __init__(
        self,
        inner: Networks,
        *,
        flow_fn: Callable[[np.ndarray, Networks], FlowResult] | None = None,
        key_probability_fn: Callable[[np.ndarray, np.ndarray], float] | None = None,
        dvsnet_fn: Callable[[np.ndarray], float] | None = None,
    ) -> None:
        super().__init__(
            inner.segmentation_config,
            inner.flow_config,
            has_policy=inner.has_policy,
            has_dvsnet=inner.has_dvsnet,
            policy_cues=inner.policy_cues,
        )
        self.inner = inner
        self.backend = f"wrapped-{inner.backend}"
        self.flow_fn = flow_fn
        self.key_probability_fn = key_probability_fn
        self.dvsnet_fn = dvsnet_fn
        self.calls: Counter[str] = Counter()
        self.log: list[str] = []

    def _called(self, name: str) -> None:
        self.calls[name] += 1
        self.log.append(name)

    def features(self, images: np.ndarray) -> np.ndarray:
        self._called("features")
        return self.inner.features(images)

    def task(self, features: np.ndarray) -> np.ndarray:
        self._called("task")
        return self.inner.task(features)

    def flow(self, pairs: np.ndarray) -> FlowResult:
        self._called("flow")
        return self.flow_fn(pairs, self.inner) if self.flow_fn else self.inner.flow(pairs)

    def conv6_features(self, pairs: np.ndarray) -> np.ndarray:
        self._called("conv6_features")
        return self.flow_fn(pairs, self.inner).conv6 if self.flow_fn else self.inner.conv6_features(pairs)

    def warp(self, features: np.ndarray, flow: np.ndarray, scale: np.ndarray) -> np.ndarray:
        self._called("warp")
        return self.inner.warp(features, flow, scale)

    def key_probability(self, conv6: np.ndarray, expert: np.ndarray) -> np.ndarray:
        self._called("key_probability")
        if self.key_probability_fn is None:
            return self.inner.key_probability(conv6, expert)
        return np.array([self.key_probability_fn(conv6, expert)], dtype=np.float32)

    def dvsnet_score(self, conv6: np.ndarray) -> np.ndarray:
        self._called("dvsnet_score")
        if self.dvsnet_fn is None:
            return self.inner.dvsnet_score(conv6)
        return np.array([self.dvsnet_fn(conv6)], dtype=np.float32)


class AllSkinNetworks(WrappedNetworks):
    """Real networks whose N_task says "skin" everywhere (so the whole crop is face)."""

    def task(self, features: np.ndarray) -> np.ndarray:
        self._called("task")
        scores = np.zeros((features.shape[0], 5, *features.shape[2:]), np.float32)
        scores[:, 1] = 1.0
        return scores


def constant_flow(networks: Networks, dx: float, dy: float, scale: float = 1.0) -> FlowResult:
    """A FlowResult with the same flow (feature-grid pixels, x first) everywhere, batch 1."""
    seg, flow = networks.segmentation_config, networks.flow_config
    grid = seg.feature_size
    field = np.empty((1, 2, grid, grid), np.float32)
    field[:, 0], field[:, 1] = dx, dy
    return FlowResult(
        field,
        np.full((1, flow.scale_channels, grid, grid), scale, np.float32),
        np.zeros((1, flow.conv6_channels, flow.conv6_size, flow.conv6_size), np.float32),
    )


def phase_correlation_flow(pairs: np.ndarray, inner: Networks) -> FlowResult:
    """A cheap real flow estimate for F: one global translation by phase correlation.

    ``pairs`` is (1, 6, Sf, Sf) = [current, key] RGB in [0, 1]. The returned flow says where the
    current frame's pixels lie in the key frame (feature-grid pixels, x first), as F's does.
    """
    current = cv2.cvtColor(np.ascontiguousarray(pairs[0, :3].transpose(1, 2, 0)), cv2.COLOR_RGB2GRAY)
    key = cv2.cvtColor(np.ascontiguousarray(pairs[0, 3:].transpose(1, 2, 0)), cv2.COLOR_RGB2GRAY)
    (dx, dy), _ = cv2.phaseCorrelate(current.astype(np.float64), key.astype(np.float64))
    per_pixel = inner.flow_config.warp_size / pairs.shape[-1]
    return constant_flow(inner, dx * per_pixel, dy * per_pixel)


def keys_of(results: Sequence) -> list[int]:
    """Indices of the key frames in a list of FrameResults."""
    return [i for i, result in enumerate(results) if result.key]


class FakeClip:
    """Real frames, a synthetic face label (ellipse skin, two eyes, a mouth) in a drifting box."""

    def __init__(
        self, frames: list[np.ndarray], unlabelled: tuple[int, ...] = (), clip_id: str = "fake"
    ) -> None:
        self.clip_id, self._frames, self._unlabelled = clip_id, frames, set(unlabelled)

    def frames(self) -> Iterator[np.ndarray]:
        yield from self._frames

    @property
    def labelled(self) -> list[int]:
        return [i for i in range(len(self._frames)) if i not in self._unlabelled]

    def box(self, index: int) -> Box | None:
        return Box(120.0 + 2 * index, 130.0, 120.0 + 2 * index + 260, 390.0)

    def label(self, index: int) -> np.ndarray:
        label = np.zeros(self._frames[index].shape[:2], np.uint8)
        cx = 250 + 2 * index
        cv2.ellipse(label, (cx, 260), (100, 120), 0, 0, 360, 1, -1)
        for dx in (-40, 40):
            cv2.ellipse(label, (cx + dx, 220), (18, 8), 0, 0, 360, 2, -1)
        cv2.ellipse(label, (cx, 320), (40, 16), 0, 0, 360, 3, -1)
        cv2.ellipse(label, (cx, 320), (25, 6), 0, 0, 360, 4, -1)
        return label


def stream_in_background(
    url: str,
    frames: Sequence[bytes],
    stop: threading.Event,
    *,
    interval: float = 0.05,
    corrupt_first: bool = False,
) -> threading.Thread:
    """A WebSocket client of a live service's ``/ws`` sending ``frames`` in a loop, one at a time,
    every ``interval`` seconds until ``stop`` (first a corrupt frame when ``corrupt_first``)."""

    def run() -> None:
        with ws_client.connect(url, max_size=None) as ws:
            ws.recv()
            if corrupt_first:
                ws.send(b"\x89PNG\r\n\x1a\n not really")  # -> facestream_bad_frames_total{reason="corrupt"}
                ws.recv()
            i = 0
            while not stop.is_set():
                ws.send(frames[i % len(frames)])
                header = json.loads(ws.recv())
                if header["type"] == "result" and header["format"] in ("png", "raw"):
                    ws.recv()
                i += 1
                time.sleep(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@contextmanager
def running_service(log: Path, *args: str, timeout: float = 120.0) -> Iterator[str]:
    """A real ``facestream serve`` (shipped weights, one thread) on a free port with ``args``;
    yields its base URL once /readyz says ready, stops it afterwards. Output goes to ``log``."""
    port = free_port()
    command = [sys.executable, "-m", "facestream.cli", "serve", "--port", str(port), "--threads", "1", *args]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, timeout)
        yield base
    finally:
        process.terminate()
        process.wait(10)
