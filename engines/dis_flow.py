"""OpenCV DIS optical flow as a drop-in replacement for the learned flow network F.

:class:`DisFlowNetworks` wraps any :class:`Networks` and answers :meth:`~Networks.flow` with
Dense Inverse Search (Kroeger et al., ECCV 2016; ``cv2.DISOpticalFlow``, medium preset) on the
greyscale face crops at N's input size (256² by default; ``size`` sets another) instead of
FlowNet2-s; N_feat, N_task, the warp, the policy, the DVSNet head and the warp corrector are the wrapped
networks'.
DIS predicts no DFF scale field (it is 1 everywhere) and has no Conv6 features: the ``rl`` and
``dvsnet`` schedulers read those from the wrapped F, which then runs as well (``conv6=True``);
otherwise F never runs and Conv6 is zeros.
"""

from __future__ import annotations

import threading
from typing import Any

import cv2
import numpy as np

from facestream.engines.networks import FlowResult, Networks
from facestream.engines.pipeline import resized_chw

FLOWS = ("flownet", "dis")
# The warp flow used unless told otherwise. DIS, because it measures better: on set C with the
# shipped N, warping by DIS loses far fewer mIoU points than the shipped F at every key interval
# (README, "Training"); F still runs for the rl/dvsnet schedulers' Conv6 features.
DEFAULT_FLOW = "dis"
DIS_PRESET = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM


def _grey(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) float RGB in [0, 1] -> (H, W) uint8 greyscale."""
    # Per contiguous plane, then interleaved by OpenCV: numpy's strided (H, W, 3) view is slow.
    planes = [np.clip(plane * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8) for plane in rgb]
    return cv2.cvtColor(cv2.merge(planes), cv2.COLOR_RGB2GRAY)


def create_dis() -> cv2.DISOpticalFlow:
    """A DIS optical flow object with the medium preset (keeps state: one per thread)."""
    return cv2.DISOpticalFlow.create(DIS_PRESET)  # = cv2.DISOpticalFlow_create


def dis_flow(dis: cv2.DISOpticalFlow, current: np.ndarray, key: np.ndarray, grid: int) -> np.ndarray:
    """DIS flow from the (H, W) uint8 grey frame ``current`` to ``key``, as (2, grid, grid)
    float32 in warp-grid pixels, x first (the :class:`FlowResult` convention)."""
    # (H, W, 2): current -> key. Pass no flow array: DIS takes one of the right shape as its
    # initial flow (uninitialised memory there segfaults it).
    field = np.asarray(dis.calc(current, key, None))  # type: ignore[call-overload]
    height, width = current.shape
    if (height, width) != (grid, grid):
        shrink = grid < width and grid < height
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        field = cv2.resize(field, (grid, grid), interpolation=interpolation)
    out = field.transpose(2, 0, 1).astype(np.float32)
    out[0] *= grid / width
    out[1] *= grid / height
    return out


class DisFlowNetworks(Networks):
    """``inner`` with F's flow replaced by OpenCV DIS optical flow (see the module docstring).

    One DIS instance per object, guarded by a lock: ``cv2.DISOpticalFlow`` keeps state between
    calls and is not thread-safe.
    """

    def __init__(self, inner: Networks, *, conv6: bool = True, size: int | None = None) -> None:
        super().__init__(
            inner.segmentation_config,
            inner.flow_config,
            has_policy=inner.has_policy,
            has_dvsnet=inner.has_dvsnet,
            policy_cues=inner.policy_cues,
            correction=inner.correction_config,
        )
        self.inner = inner
        self.conv6 = conv6
        self.correct_precision = inner.correct_precision
        default = inner.segmentation_config.input_size
        self.size = size or default
        if self.size < 16:
            raise ValueError(f"DIS flow input size must be at least 16 pixels, got {self.size}")
        # the size is in the name (caches of pair tables are keyed on it) unless it is the default
        same = self.size == default
        self.backend = f"{inner.backend}+dis" if same else f"{inner.backend}+dis{self.size}"
        self._dis = create_dis()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        # Backend-specific extras (sessions, device, ...) come from the wrapped networks.
        if name == "inner":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def flow_input_size(self) -> int:
        return self.size

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.inner.features(images)

    def conv6_features(self, pairs: np.ndarray) -> np.ndarray:
        """F's Conv6 of (B, 6, S, S) pairs at DIS's size (area-resized to F's input)."""
        return self.inner.conv6_features(_resized(pairs, self.flow_config.input_size))

    def task(self, features: np.ndarray) -> np.ndarray:
        return self.inner.task(features)

    def warp(self, features: np.ndarray, flow: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return self.inner.warp(features, flow, scale)

    def key_probability(self, conv6: np.ndarray, expert: np.ndarray) -> np.ndarray:
        return self.inner.key_probability(conv6, expert)

    def dvsnet_score(self, conv6: np.ndarray) -> np.ndarray:
        return self.inner.dvsnet_score(conv6)

    def _correct(
        self, current: np.ndarray, key: np.ndarray, flow: np.ndarray, scores: np.ndarray
    ) -> np.ndarray:
        return self.inner.correct(current, key, flow, scores)

    def flow(self, pairs: np.ndarray) -> FlowResult:
        """DIS flow from each current frame to its key frame, on the warp grid; scale 1; Conv6
        from the wrapped F when ``conv6`` was asked for, else zeros."""
        if pairs.ndim != 4 or pairs.shape[1] != 6 or pairs.shape[2:] != (self.size, self.size):
            raise ValueError(
                f"expected (B, 6, {self.size}, {self.size}) [current, key] pairs, got {pairs.shape}"
            )
        config = self.flow_config
        batch, grid = pairs.shape[0], config.warp_size
        flow = np.empty((batch, 2, grid, grid), np.float32)
        for b in range(batch):
            current, key = _grey(pairs[b, :3]), _grey(pairs[b, 3:])
            with self._lock:
                flow[b] = dis_flow(self._dis, current, key, grid)
        scale = np.ones((batch, config.scale_channels, grid, grid), np.float32)
        if self.conv6:
            conv6 = self.conv6_features(pairs)  # F's encoder only
        else:
            side = config.conv6_size
            conv6 = np.zeros((batch, config.conv6_channels, side, side), np.float32)
        return FlowResult(flow, scale, conv6)


def _resized(pairs: np.ndarray, size: int) -> np.ndarray:
    """(B, 6, S, S) pairs area-resized to (B, 6, size, size) (F's input for its Conv6)."""
    if pairs.shape[-1] == size:
        return pairs
    return np.stack([resized_chw(pair, size) for pair in pairs])


def add_dis_size_argument(parser: Any) -> None:
    """``--dis-size`` on an argparse parser (segment, serve, evaluate): None means N's input."""
    parser.add_argument(
        "--dis-size",
        type=int,
        help="side of the face crops DIS sees (default: N's input, 256; 128 costs about 3 ms less "
        "per non-key frame and 0.6-1.5 mIoU points)",
    )


def with_flow(networks: Networks, flow: str, *, conv6: bool, dis_size: int | None = None) -> Networks:
    """``networks`` with flow method ``flow``: unchanged for ``flownet`` (F), wrapped in
    :class:`DisFlowNetworks` for ``dis``. ``conv6``: whether DIS must still run F for its Conv6
    features (the ``rl`` and ``dvsnet`` schedulers need them)."""
    if flow == "flownet":
        return networks
    if flow == "dis":
        return DisFlowNetworks(networks, conv6=conv6, size=dis_size)
    raise ValueError(f"unknown flow {flow!r}; choose one of {', '.join(FLOWS)}")
