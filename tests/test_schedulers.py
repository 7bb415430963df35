"""Key schedulers: the decision history (KAR, LKD), each scheduler's rule on scripted inputs,
and key counts over real clips with the pipeline.

Scripted networks (helpers.StubNetworks) make each rule testable at its exact threshold; the
pipeline runs use random weights at a 64 x 64 input on the first frames of real clips.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    StubNetworks,
    WrappedNetworks,
    build_networks,
    clip_frames,
    constant_flow,
    keys_of,
    networks,
    one_torch_thread,
    phase_correlation_flow,
    random_weights,
    shifted,
)

from facestream.engines.networks import FlowResult
from facestream.engines.pipeline import StreamSegmenter
from facestream.engines.schedulers import (
    SCHEDULERS,
    WINDOW,
    AlwaysScheduler,
    DecisionContext,
    DecisionHistory,
    DVSNetScheduler,
    FixedIntervalScheduler,
    FlowMagnitudeScheduler,
    RandomScheduler,
    RLScheduler,
    Scheduler,
    check_scheduler,
    make_scheduler,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One torch thread in this module (the 2 cores are shared); restored afterwards."""
    with one_torch_thread():
        yield


def context(networks, history: DecisionHistory | None = None, index: int = 1) -> DecisionContext:
    """A DecisionContext whose flow() is the networks' flow on a dummy pair, memoised."""
    memo: list[FlowResult] = []

    def flow() -> FlowResult:
        if not memo:
            memo.append(networks.flow(np.zeros((1, 6, 64, 64), np.float32)))
        return memo[0]

    return DecisionContext(index, history or DecisionHistory(), networks, flow)


# --------------------------------------------------------------------------- decision history


def brute_force(decisions: list[bool], window: int) -> tuple[float, int]:
    """(KAR, LKD) for the frame decided after ``decisions``, straight from the definitions."""
    recent = decisions[-window:]
    kar = sum(recent) / len(recent) if recent else 0.0
    keys = [i for i, key in enumerate(decisions) if key]
    lkd = window if not keys else min(len(decisions) - keys[-1], window)
    return kar, lkd


def decision_pattern(count: int = 200) -> list[bool]:
    """Keys at irregular gaps, a burst of keys, and a 120-frame gap (longer than the window)."""
    rng = np.random.default_rng(7)
    pattern = [False] * 5 + [bool(x) for x in rng.random(55) < 0.2] + [True] * 10
    pattern += [False] * 120
    pattern += [bool(x) for x in rng.random(count - len(pattern)) < 0.5]
    return pattern[:count]


@pytest.mark.parametrize("window", [WINDOW, 7])
def test_history_matches_brute_force_at_every_step(window: int) -> None:
    pattern = decision_pattern(200)
    assert len(pattern) == 200 and any(pattern)
    history = DecisionHistory(window)
    for step in range(len(pattern) + 1):
        kar, lkd = brute_force(pattern[:step], window)
        assert history.kar == pytest.approx(kar, abs=1e-12), f"KAR at step {step}"
        assert history.lkd == lkd, f"LKD at step {step}"
        expert = history.expert()
        assert expert.shape == (1, 2) and expert.dtype == np.float32
        np.testing.assert_array_equal(expert, np.array([[kar, lkd / window]], np.float32))
        if step < len(pattern):
            history.record(pattern[step])


def test_history_window_is_90_by_default() -> None:
    assert WINDOW == 90
    history = DecisionHistory()
    assert history.window == 90
    np.testing.assert_array_equal(history.expert(), [[0.0, 1.0]])  # nothing decided yet
    history.record(True)
    assert history.kar == 1.0 and history.lkd == 1
    for _ in range(89):
        history.record(False)
    assert history.kar == pytest.approx(1 / 90)
    assert history.lkd == 90
    history.record(False)  # the key leaves the window
    assert history.kar == 0.0 and history.lkd == 90
    np.testing.assert_array_equal(history.expert(), [[0.0, 1.0]])


def test_lkd_counts_frames_from_the_last_key_to_the_current_frame() -> None:
    history = DecisionHistory()
    for key, expected_lkd in [(True, 1), (False, 2), (False, 3), (True, 1), (False, 2)]:
        history.record(key)
        assert history.lkd == expected_lkd


# --------------------------------------------------------------------------- scripted rules


def test_rl_keys_iff_probability_exceeds_tau() -> None:
    tau = 0.5
    above, below = (
        float(np.nextafter(np.float32(tau), np.float32(1))),
        float(np.nextafter(np.float32(tau), np.float32(0))),
    )
    script = [tau, above, below, 0.0, 1.0, 0.9, 0.1]
    stub = StubNetworks(key_probabilities=script)
    scheduler = RLScheduler(tau)
    history = DecisionHistory()
    history.record(True)
    history.record(False)
    decisions = [scheduler.decide(context(stub, history)) for _ in script]
    assert (
        [d.key for d in decisions]
        == [p > tau for p in script]
        == [False, True, False, False, True, True, False]
    )
    assert [d.value for d in decisions] == pytest.approx(script)
    # The policy saw the flow's Conv6 features and the history's expert information.
    for conv6, expert in stub.inputs["key_probability"]:
        np.testing.assert_array_equal(conv6, stub.flow_result.conv6)
        np.testing.assert_array_equal(expert, history.expert())
    assert stub.calls["flow"] == len(script)


@pytest.mark.parametrize(
    ("tau", "probability", "key"),
    [(0.0, 0.0, False), (0.0, 1e-6, True), (1.0, 1.0, False), (0.3, 0.31, True)],
)
def test_rl_tau_edges(tau: float, probability: float, key: bool) -> None:
    decision = RLScheduler(tau).decide(context(StubNetworks(key_probabilities=[probability])))
    assert decision.key is key


def test_dvsnet_keys_iff_score_below_threshold() -> None:
    threshold = 0.8
    below = float(np.nextafter(np.float32(threshold), np.float32(0)))
    above = float(np.nextafter(np.float32(threshold), np.float32(1)))
    script = [float(np.float32(threshold)), below, above, 0.0, 1.0]
    stub = StubNetworks(dvsnet_scores=script)
    scheduler = DVSNetScheduler(float(np.float32(threshold)))
    decisions = [scheduler.decide(context(stub)) for _ in script]
    assert [d.key for d in decisions] == [False, True, False, True, False]
    assert [d.value for d in decisions] == pytest.approx(script)
    for (conv6,) in stub.inputs["dvsnet_score"]:
        np.testing.assert_array_equal(conv6, stub.flow_result.conv6)


def test_random_rate_zero_never_one_always() -> None:
    stub = StubNetworks()
    never, always = RandomScheduler(0.0, seed=1), RandomScheduler(1.0, seed=1)
    assert not any(never.decide(context(stub)).key for _ in range(500))
    assert all(always.decide(context(stub)).key for _ in range(500))
    assert stub.calls["flow"] == 0  # the random scheduler never needs F


def test_random_is_reproducible_and_reset_restarts() -> None:
    stub = StubNetworks()

    def run(scheduler: Scheduler, count: int = 300) -> list[tuple[bool, float | None]]:
        return [(d.key, d.value) for d in (scheduler.decide(context(stub)) for _ in range(count))]

    first = RandomScheduler(0.3, seed=5)
    sequence = run(first)
    assert run(RandomScheduler(0.3, seed=5)) == sequence
    assert run(RandomScheduler(0.3, seed=6)) != sequence
    first.reset()
    assert run(first) == sequence
    rate = sum(key for key, _ in sequence) / len(sequence)
    assert 0.2 < rate < 0.4
    assert all((value < 0.3) == key for key, value in sequence)


def test_flow_magnitude_in_pixels_of_the_segmentation_input() -> None:
    """A (3, 4) flow on the 16 x 16 feature grid is 5 grid pixels = 20 pixels of the 64 input."""
    stub = StubNetworks(input_size=64)
    stub.flow_result = constant_flow(stub, 3.0, 4.0)
    assert FlowMagnitudeScheduler(20.0).decide(context(stub)).key is False  # not strictly above
    decision = FlowMagnitudeScheduler(19.99).decide(context(stub))
    assert decision.key is True
    assert decision.value == pytest.approx(20.0, rel=1e-6)

    big = StubNetworks(input_size=128)  # 32 x 32 grid: still 4 input pixels per grid pixel
    big.flow_result = constant_flow(big, 0.0, -1.5)
    assert FlowMagnitudeScheduler(5.0).decide(context(big)).value == pytest.approx(6.0)


def test_flow_magnitude_is_the_mean_of_per_pixel_magnitudes() -> None:
    stub = StubNetworks(input_size=64)
    flow = np.zeros((1, 2, 16, 16), np.float32)
    flow[0, 0, :8] = 2.0  # half of the grid moves 2 grid pixels, the other half stands still
    stub.flow_result = FlowResult(flow, stub.flow_result.scale, stub.flow_result.conv6)
    decision = FlowMagnitudeScheduler(3.0).decide(context(stub))
    assert decision.value == pytest.approx(4.0)  # mean 1 grid pixel x 4
    assert decision.key is True
    assert FlowMagnitudeScheduler(4.0).decide(context(stub)).key is False


def test_fixed_interval_rule() -> None:
    history = DecisionHistory()
    scheduler = FixedIntervalScheduler(3)
    stub = StubNetworks()
    assert scheduler.decide(context(stub, history)).key  # no key yet
    keys = []
    for _ in range(12):
        decision = scheduler.decide(context(stub, history))
        keys.append(decision.key)
        history.record(decision.key)
    assert keys == [True, False, False] * 4
    assert stub.calls["flow"] == 0


def test_fixed_interval_phase_moves_the_first_decided_key_only() -> None:
    scheduler = FixedIntervalScheduler(3, phase=1)
    stub = StubNetworks()
    for _ in range(2):  # reset() starts the phase over
        history = DecisionHistory()
        assert scheduler.decide(context(stub, history)).key  # the stream's first key
        history.record(True)
        keys = []
        for _ in range(12):
            decision = scheduler.decide(context(stub, history))
            keys.append(decision.key)
            history.record(decision.key)
        assert keys == [False, True] + [False, False, True] * 3 + [False]
        scheduler.reset()
    with pytest.raises(ValueError, match=r"phase must be a whole number in \[0, 3\), got 3"):
        FixedIntervalScheduler(3, phase=3)


# --------------------------------------------------------------------------- pipeline key counts


@pytest.mark.parametrize("interval", [1, 3, 7])
def test_fixed_interval_key_count_over_a_clip(tmp_path_factory, videos_dir: Path, interval: int) -> None:
    frames = clip_frames(videos_dir, count=20)
    segmenter = StreamSegmenter(networks(tmp_path_factory), FixedIntervalScheduler(interval))
    results = [segmenter.step(frame) for frame in frames]
    assert all(result.face for result in results), "the Haar detector lost the face"
    assert sum(result.key for result in results) == math.ceil(len(frames) / interval)
    assert keys_of(results) == list(range(0, len(frames), interval))


def test_rl_keys_follow_the_scripted_policy_in_the_pipeline(tmp_path_factory, videos_dir: Path) -> None:
    """pi(a1|s) > tau decides, with the expert input the pipeline's history gives at each frame."""
    frames = clip_frames(videos_dir, count=12)
    script = iter([0.2, 0.5, 0.51, 0.1, 0.9, 0.4, 0.5, 0.3, 0.7, 0.2, 0.6])
    experts: list[np.ndarray] = []

    def probability(conv6: np.ndarray, expert: np.ndarray) -> float:
        experts.append(expert.copy())
        return next(script)

    wrapped = WrappedNetworks(networks(tmp_path_factory), key_probability_fn=probability)
    segmenter = StreamSegmenter(wrapped, RLScheduler(0.5))
    results = [segmenter.step(frame) for frame in frames]
    assert keys_of(results) == [0, 3, 5, 9, 11]
    decisions = [result.key for result in results]
    for frame, expert in enumerate(experts, start=1):
        kar, lkd = brute_force(decisions[:frame], WINDOW)
        np.testing.assert_allclose(expert, [[kar, lkd / WINDOW]], rtol=1e-6)


def flow_networks(tmp_path_factory) -> WrappedNetworks:
    """Real random networks with F replaced by phase correlation (random F estimates nothing)."""
    return WrappedNetworks(networks(tmp_path_factory), flow_fn=phase_correlation_flow)


def test_flow_scheduler_is_quiet_on_a_still_clip(tmp_path_factory, videos_dir: Path) -> None:
    frame = clip_frames(videos_dir, count=1)[0]
    wrapped = flow_networks(tmp_path_factory)
    segmenter = StreamSegmenter(wrapped, FlowMagnitudeScheduler(2.0))
    results = [segmenter.step(frame) for _ in range(30)]
    assert keys_of(results) == [0]
    assert all(result.value == pytest.approx(0.0, abs=0.05) for result in results[1:])
    assert wrapped.calls["flow"] == 29


def test_flow_scheduler_keys_at_a_synthetic_jump(tmp_path_factory, videos_dir: Path) -> None:
    """The face jumps 40 frame pixels (~6 pixels of the 64 crop) at frame 15, then holds still."""
    frame = clip_frames(videos_dir, count=1)[0]
    jumped = shifted(frame, 40, 0)
    wrapped = flow_networks(tmp_path_factory)
    segmenter = StreamSegmenter(wrapped, FlowMagnitudeScheduler(2.0))
    results = [segmenter.step(frame if i < 15 else jumped) for i in range(30)]
    assert all(result.face for result in results)
    assert keys_of(results) == [0, 15]
    crop_side = results[0].box.width
    expected = 40 * 64 / crop_side  # frame pixels -> pixels of the segmentation input
    assert results[15].value == pytest.approx(expected, rel=0.25)
    assert results[15].box.x0 > results[14].box.x0 + 20  # the face was located anew


# --------------------------------------------------------------------------- factory and checks


def test_make_scheduler_unknown_name_lists_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"unknown scheduler 'dff'; choose one of always, fixed, random, flow, dvsnet, rl"
    ):
        make_scheduler("dff")
    assert sorted(SCHEDULERS) == ["always", "dvsnet", "fixed", "flow", "random", "rl"]


@pytest.mark.parametrize(
    ("name", "knob", "attribute", "described"),
    [
        ("fixed", 5, "interval", "fixed(interval=5)"),
        ("random", 0.25, "rate", "random(rate=0.25)"),
        ("flow", 3.5, "threshold", "flow(threshold=3.5)"),
        ("dvsnet", 0.7, "threshold", "dvsnet(threshold=0.7)"),
        ("rl", 0.3, "tau", "rl(tau=0.3)"),
    ],
)
def test_make_scheduler_sets_the_knob(name: str, knob: float, attribute: str, described: str) -> None:
    scheduler = make_scheduler(name, knob)
    assert type(scheduler) is SCHEDULERS[name]
    assert scheduler.name == name and scheduler.knob == attribute
    assert getattr(scheduler, attribute) == knob
    assert scheduler.knob_value == knob
    assert scheduler.describe() == described


def test_make_scheduler_defaults_and_always() -> None:
    assert make_scheduler("always").describe() == "always"
    assert isinstance(make_scheduler("always"), AlwaysScheduler)
    assert make_scheduler("always").knob_value is None
    assert make_scheduler("fixed").describe() == "fixed(interval=30)"
    assert make_scheduler("rl").describe() == "rl(tau=0.5)"
    with pytest.raises(ValueError, match="scheduler 'always' has no knob"):
        make_scheduler("always", 3)


@pytest.mark.parametrize(
    ("name", "knob", "message"),
    [
        ("fixed", 0, "fixed interval must be a whole number >= 1, got 0"),
        ("random", 1.5, r"random key rate must be in \[0, 1\], got 1.5"),
        ("flow", -1, "flow threshold must be >= 0 pixels, got -1"),
        ("fixed", 2.5, "fixed interval must be a whole number >= 1, got 2.5"),
        ("dvsnet", 1.2, r"dvsnet threshold is a score in \[0, 1\], got 1.2"),
        ("rl", 1.5, r"tau must be in \[0, 1\], got 1.5"),
    ],
)
def test_make_scheduler_rejects_bad_knobs(name: str, knob: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_scheduler(name, knob)


def test_check_scheduler_names_the_missing_weights(tmp_path_factory) -> None:
    weights = random_weights(tmp_path_factory, without=("policy", "dvsnet"))
    nets = build_networks(tmp_path_factory, weights, "torch")
    with pytest.raises(ValueError, match="rl scheduler needs policy.safetensors"):
        check_scheduler(RLScheduler(), nets)
    with pytest.raises(ValueError, match="dvsnet scheduler needs dvsnet.safetensors"):
        check_scheduler(DVSNetScheduler(), nets)
    with pytest.raises(ValueError, match="policy.safetensors"):
        StreamSegmenter(nets, RLScheduler())
    for name in ("always", "fixed", "random", "flow"):
        check_scheduler(make_scheduler(name), nets)
    # Only one of the two missing: the other scheduler is fine.
    check_scheduler(RLScheduler(), StubNetworks(has_dvsnet=False))
    with pytest.raises(ValueError, match="dvsnet.safetensors"):
        check_scheduler(DVSNetScheduler(), StubNetworks(has_dvsnet=False))
