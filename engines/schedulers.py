"""Key schedulers: who decides, frame by frame, whether N runs or the key result is warped.

Every scheduler exposes one knob (``knob`` names the attribute) so that evaluation can sweep it:

=========  ============================  ======================================================
name       knob                          key when
=========  ============================  ======================================================
always     --                            every frame (the per-frame baseline)
fixed      ``interval`` n                the last key is n frames back (DFF)
random     ``rate`` p                    a uniform draw falls below p
flow       ``threshold`` (pixels)        mean flow magnitude to the key exceeds it (DVSNet §)
dvsnet     ``threshold`` (score)         DVSNet's predicted score of the warp falls below it
rl         ``tau``                       pi(a1 | s) > tau (the paper's policy)
=========  ============================  ======================================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from facestream.engines.cues import cue_vector, needs_residuals
from facestream.engines.networks import FlowResult, Networks

WINDOW = 90


class DecisionHistory:
    """The last ``window`` key/non-key decisions and the paper's expert information.

    * KAR (key-all ratio): keys / decisions over the window (0 before any decision).
    * LKD (last key distance): frames from the last key to the current frame, capped at the window.
    * The warp residuals of the last ``window`` decided frames that computed them (each to its own
      key), whose mean the relative cues divide by (:mod:`facestream.engines.cues`).
    """

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.decisions: deque[bool] = deque(maxlen=window)
        self.since_key: int | None = None  # frames since the last key; None before the first
        self.residuals: deque[np.ndarray] = deque(maxlen=window)

    def record(self, key: bool) -> None:
        self.decisions.append(key)
        self.since_key = 0 if key else (None if self.since_key is None else self.since_key + 1)

    @property
    def kar(self) -> float:
        return sum(self.decisions) / len(self.decisions) if self.decisions else 0.0

    @property
    def distance(self) -> int | None:
        """Frames from the last key to the frame now being decided (None before any key)."""
        return None if self.since_key is None else self.since_key + 1

    @property
    def lkd(self) -> int:
        """LKD of the frame now being decided: ``distance`` capped at the window."""
        distance = self.distance
        return self.window if distance is None else min(distance, self.window)

    def expert(self) -> np.ndarray:
        """(1, 2) float32 [KAR, LKD / window], the policy network's expert input."""
        return np.array([[self.kar, self.lkd / self.window]], dtype=np.float32)

    def observe_residual(self, residual: np.ndarray) -> None:
        """Remember a decided frame's (2,) or (1, 2) warp residuals."""
        self.residuals.append(np.asarray(residual, dtype=np.float64).reshape(-1))

    def residual_reference(self) -> np.ndarray:
        """(1, 2) mean of the remembered residuals; NaN before any."""
        if not self.residuals:
            return np.full((1, 2), np.nan)
        return np.mean(self.residuals, axis=0)[None]


@dataclass
class DecisionContext:
    """What a scheduler may look at for the frame being decided.

    ``flow()`` runs F on (current, key) the first time it is called and caches the result, so the
    pipeline reuses it for the warp when the frame turns out non-key. The other questions
    (``flow_magnitude``, ``dvsnet_score``, ``key_probability``) are answered from that flow; the
    offline evaluation replays them from its per-pair cache instead (``training.evaluation``).
    ``_residuals()``, when given, returns the frame's (1, 2) warp residuals, which a policy that
    takes cues (``networks.policy_cues``, :mod:`facestream.engines.cues`) may need; ``residual``
    keeps them once computed, and the caller hands them to the history after the decision
    (:meth:`observe`).
    """

    index: int
    history: DecisionHistory
    networks: Networks
    _flow: Callable[[], FlowResult]
    _residuals: Callable[[], np.ndarray] | None = None
    residual: np.ndarray | None = None

    def flow(self) -> FlowResult:
        return self._flow()

    def flow_magnitude(self) -> float:
        """Mean flow magnitude to the key, in pixels of the segmentation input."""
        seg = self.networks.segmentation_config
        return float(mean_flow_magnitude(self.flow().flow, seg.input_size / seg.feature_size)[0])

    def dvsnet_score(self) -> float:
        return float(self.networks.dvsnet_score(self.flow().conv6)[0])

    def key_probability(self) -> float:
        """pi(a1 | s) for s = (Conv6 features to the key, the history's [KAR, LKD/window] and the
        policy's cues, if it takes any)."""
        expert = self.history.expert()
        if self.networks.policy_cues:
            expert = np.concatenate((expert, self.cues()), axis=1)
        return float(self.networks.key_probability(self.flow().conv6, expert)[0])

    def cues(self, names: tuple[str, ...] | None = None) -> np.ndarray:
        """(1, n) the cues the policy takes (``names``, by default the networks' policy's), in its
        order (:mod:`facestream.engines.cues`)."""
        names = self.networks.policy_cues if names is None else names
        residual = None
        if needs_residuals(names):
            if self._residuals is None:
                raise ValueError(f"this policy takes the cues {names}; this caller has no warp residuals")
            if self.residual is None:
                self.residual = self._residuals()
            residual = self.residual
        return cue_vector(
            names, np.array([self.flow_magnitude()]), residual, self.history.residual_reference()
        )

    def observe(self) -> None:
        """After the decision: give the history this frame's residuals, if they were computed."""
        if self.residual is not None:
            self.history.observe_residual(self.residual)


def mean_flow_magnitude(flow: np.ndarray, stride: float) -> np.ndarray:
    """(B,) mean magnitude of flow fields (B, 2, h, w) given in feature-grid pixels, times
    ``stride`` (input pixels per feature-grid pixel)."""
    return np.sqrt((flow.astype(np.float64) ** 2).sum(axis=1)).mean(axis=(1, 2)) * stride


@dataclass(frozen=True)
class Decision:
    key: bool
    value: float | None = None  # the quantity compared with the knob (probability, score, ...)


class Scheduler(ABC):
    name: str = "?"
    knob: str | None = None
    needs_flow: bool = False
    needs_conv6: bool = False  # reads F's Conv6 features (so DIS flow must still run F)

    @abstractmethod
    def decide(self, ctx: DecisionContext) -> Decision:
        """Key or not, for a frame that has a cached key to warp from."""

    def reset(self) -> None:
        """Forget per-stream state (called when a stream starts over)."""

    @property
    def knob_value(self) -> float | None:
        return None if self.knob is None else float(getattr(self, self.knob))

    def describe(self) -> str:
        return self.name if self.knob is None else f"{self.name}({self.knob}={self.knob_value:g})"


class AlwaysScheduler(Scheduler):
    name = "always"

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision(True)


class FixedIntervalScheduler(Scheduler):
    """A key every ``interval`` frames. ``phase`` p moves the grid: the first decided key of a
    stream comes interval - p frames after its first frame (the evaluation measures how much
    fixed's score depends on where its keys happen to fall)."""

    name, knob = "fixed", "interval"

    def __init__(self, interval: int = 30, phase: int = 0) -> None:
        if int(interval) != interval or interval < 1:
            raise ValueError(f"fixed interval must be a whole number >= 1, got {interval}")
        if int(phase) != phase or not 0 <= phase < interval:
            raise ValueError(f"fixed phase must be a whole number in [0, {interval}), got {phase}")
        self.interval, self.phase = int(interval), int(phase)
        self.reset()

    def reset(self) -> None:
        self._first = True

    def decide(self, ctx: DecisionContext) -> Decision:
        distance = ctx.history.distance
        if distance is None:  # no key yet
            return Decision(True, float(self.interval))
        key = distance >= self.interval - (self.phase if self._first else 0)
        self._first = self._first and not key
        return Decision(key, float(distance))


class RandomScheduler(Scheduler):
    name, knob = "random", "rate"

    def __init__(self, rate: float = 1 / 30, seed: int | None = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"random key rate must be in [0, 1], got {rate}")
        self.rate, self.seed = float(rate), seed
        self.reset()

    def reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def decide(self, ctx: DecisionContext) -> Decision:
        draw = float(self._rng.random())
        return Decision(draw < self.rate, draw)


class FlowMagnitudeScheduler(Scheduler):
    """Key when the mean flow magnitude (pixels of the segmentation input) exceeds the threshold."""

    name, knob, needs_flow = "flow", "threshold", True

    def __init__(self, threshold: float = 8.0) -> None:
        if threshold < 0:
            raise ValueError(f"flow threshold must be >= 0 pixels, got {threshold}")
        self.threshold = float(threshold)

    def decide(self, ctx: DecisionContext) -> Decision:
        magnitude = ctx.flow_magnitude()
        return Decision(magnitude > self.threshold, magnitude)


class DVSNetScheduler(Scheduler):
    name, knob, needs_flow, needs_conv6 = "dvsnet", "threshold", True, True

    # The shipped head predicts the warped frame's mIoU *before* the corrector (it learnt from
    # tables without it), so useful thresholds lie near 0.5-0.65: 0.6 keys about every 30 frames
    # on set B (fixed's default interval) and every 19 on set C; 0.8 keyed every frame.
    def __init__(self, threshold: float = 0.6) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"dvsnet threshold is a score in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def decide(self, ctx: DecisionContext) -> Decision:
        score = ctx.dvsnet_score()
        return Decision(score < self.threshold, score)


class RLScheduler(Scheduler):
    name, knob, needs_flow, needs_conv6 = "rl", "tau", True, True

    def __init__(self, tau: float = 0.5) -> None:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        self.tau = float(tau)

    def decide(self, ctx: DecisionContext) -> Decision:
        prob = ctx.key_probability()
        return Decision(prob > self.tau, prob)


SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        AlwaysScheduler,
        FixedIntervalScheduler,
        RandomScheduler,
        FlowMagnitudeScheduler,
        DVSNetScheduler,
        RLScheduler,
    )
}


def make_scheduler(name: str, knob: float | None = None) -> Scheduler:
    """A scheduler by name, with its knob set when ``knob`` is given."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None
    if knob is None:
        return cls()
    if cls.knob is None:
        raise ValueError(f"scheduler {name!r} has no knob to set")
    return cls(knob)  # type: ignore[call-arg]  # every knob-bearing scheduler takes it first


def check_scheduler(scheduler: Scheduler, networks: Networks) -> None:
    """Fail early, with the fix named, when the weights lack a network the scheduler needs."""
    if isinstance(scheduler, RLScheduler) and not networks.has_policy:
        raise ValueError("the rl scheduler needs policy.safetensors in the weights folder")
    if isinstance(scheduler, DVSNetScheduler) and not networks.has_dvsnet:
        raise ValueError("the dvsnet scheduler needs dvsnet.safetensors in the weights folder")
