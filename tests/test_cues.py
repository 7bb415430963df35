"""The key policy's per-frame cues (engines.cues): warp residuals, the cue vector, a policy that
takes them (model, ONNX export, pipeline and offline replay all feed it the same inputs)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    WrappedNetworks,
    build_networks,
    clip_frames,
    constant_flow,
    networks,
    one_torch_thread,
    random_weights,
)

from facestream.engines.cues import (
    CUES,
    RELATIVE_FLOOR,
    cue_vector,
    key_maps,
    relative_residuals,
    warp_residuals,
)
from facestream.engines.networks import FlowResult
from facestream.engines.pipeline import StreamSegmenter
from facestream.engines.schedulers import DecisionContext, DecisionHistory, RLScheduler, mean_flow_magnitude
from facestream.engines.weights import find_weights, load_network, save_network
from facestream.models import KeyPolicy
from facestream.models.config import PolicyConfig

H = 32  # feature grid of the synthetic cases
S = 64  # flow input side (twice the grid)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def face_scores() -> np.ndarray:
    """(5, H, H) scores: skin square 8..24, an 'eye' block 10..13 x 10..13 (class 2)."""
    labels = np.zeros((H, H), np.int64)
    labels[8:24, 8:24] = 1
    labels[10:13, 10:13] = 2
    return np.eye(5, dtype=np.float32)[labels].transpose(2, 0, 1)


def textured(seed: int = 0) -> np.ndarray:
    """(3, S, S) float32 image in [0, 1] with a smooth texture (so shifts are visible)."""
    rng = np.random.default_rng(seed)
    small = rng.random((3, 8, 8)).astype(np.float32)
    return torch.nn.functional.interpolate(torch.from_numpy(small)[None], size=(S, S), mode="bilinear")[
        0
    ].numpy()


def test_key_maps_hold_grey_face_and_dilated_parts() -> None:
    maps = key_maps(textured(), face_scores())
    assert maps.shape == (3, H, H) and maps.dtype == np.float32
    assert maps[1].sum() == 16 * 16
    assert maps[2].sum() == (3 + 4) ** 2  # the 3x3 eye block dilated by 2 cells on each side
    assert 0.0 <= maps[0].min() and maps[0].max() <= 1.0


def test_residuals_are_zero_for_a_still_frame_and_see_a_closed_eye() -> None:
    image = textured()
    maps = key_maps(image, face_scores())
    still = warp_residuals(maps[None], image[None], np.zeros((1, 2, H, H), np.float32))
    np.testing.assert_allclose(still, 0.0, atol=1e-6)
    blink = image.copy()
    blink[:, 20:26, 20:26] = 0.0  # grid cells 10..13: the eye goes dark
    face, parts = warp_residuals(maps[None], blink[None], np.zeros((1, 2, H, H), np.float32))[0]
    assert parts > face > 0.0
    background = image.copy()
    background[:, :8, :] = 1.0  # a change outside the face counts for neither
    np.testing.assert_allclose(
        warp_residuals(maps[None], background[None], np.zeros((1, 2, H, H), np.float32)), 0.0, atol=1e-6
    )


def test_residuals_follow_the_flow() -> None:
    """A frame shifted by 2 grid cells is explained by the matching flow, not by zero flow."""
    image = textured(1)
    maps = key_maps(image, face_scores())
    moved = np.roll(image, shift=4, axis=2)  # 4 input pixels = 2 grid cells to the right
    flow = np.zeros((1, 2, H, H), np.float32)
    flow[:, 0] = -2.0  # current pixel p is found at p - 2 in the key
    matched = warp_residuals(maps[None], moved[None], flow)[0]
    unmatched = warp_residuals(maps[None], moved[None], np.zeros_like(flow))[0]
    assert (matched < 0.25 * unmatched).all()


def test_cue_vector_order_and_errors() -> None:
    magnitude = np.array([1.5, 2.5])
    residual = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
    out = cue_vector(("residual_parts", "magnitude"), magnitude, residual)
    np.testing.assert_allclose(out, [[0.2, 1.5], [0.4, 2.5]])
    assert cue_vector((), magnitude, None).shape == (2, 0)
    with pytest.raises(ValueError, match="residual"):
        cue_vector(("residual_face",), magnitude, None)


class _NoFlowContext(DecisionContext):
    def flow_magnitude(self) -> float:
        return 0.0


def _no_flow() -> FlowResult:
    raise AssertionError("the relative cues need no flow here")


def test_relative_cues_divide_by_the_mean_of_the_streams_earlier_residuals() -> None:
    """DecisionContext.cues(): a relative cue is the frame's residual over the mean of the
    residuals of the earlier decided frames in the window (1 with none), handed on by observe()."""
    history = DecisionHistory(window=2)
    names = ("relative_face", "residual_parts", "relative_parts")

    def decide(residual: list[float]) -> np.ndarray:
        ctx = _NoFlowContext(0, history, None, _no_flow, lambda: np.array([residual], np.float32))  # type: ignore[arg-type]
        cues = ctx.cues(names)
        ctx.observe()
        history.record(False)
        return cues[0]

    np.testing.assert_allclose(decide([0.1, 0.2]), [1.0, 0.2, 1.0])
    np.testing.assert_allclose(decide([0.3, 0.4]), [3.0, 0.4, 2.0])
    np.testing.assert_allclose(decide([0.4, 0.6]), [2.0, 0.6, 2.0])  # mean of 0.1/0.3 and 0.2/0.4
    np.testing.assert_allclose(decide([0.7, 0.5]), [0.7 / 0.35, 0.5, 1.0])  # window 2: 0.1 is out
    np.testing.assert_allclose(history.residual_reference(), [[0.55, 0.55]])
    # a stream whose residuals were all zero (no face left in the warp) divides by the floor
    still = relative_residuals(np.array([[0.0, 0.01]]), np.array([[0.0, 0.0]]))
    np.testing.assert_allclose(still, [[0.0, 0.01 / RELATIVE_FLOOR]])
    with pytest.raises(ValueError, match="reference"):
        cue_vector(("relative_parts",), np.zeros(1), np.zeros((1, 2)))


def test_policy_with_cues_standardises_them_and_round_trips(tmp_path: Path) -> None:
    config = PolicyConfig(in_channels=8, conv6_size=2, cues=("magnitude", "residual_parts"))
    assert config.expert_size == 4
    torch.manual_seed(0)
    policy = KeyPolicy(config)
    assert policy.fc3.in_features == 128 + 4
    cues = torch.tensor([[10.0, 0.1], [30.0, 0.3], [20.0, 0.2]])
    policy.set_cue_statistics(cues)
    conv6 = torch.randn(3, 8, 2, 2)
    expert = torch.cat((torch.tensor([[0.1, 0.2]] * 3), cues), dim=1)
    with torch.no_grad():
        standard = (cues - cues.mean(0)) / cues.std(0)
        manual = policy.fc3(torch.cat((policy.trunk(conv6), expert[:, :2], standard), dim=1))
        torch.testing.assert_close(policy(conv6, expert), manual, rtol=1e-5, atol=1e-5)
        w = policy.fc3.weight
        torch.testing.assert_close(policy.expert_weights(), w[1, 128:130] - w[0, 128:130])
        torch.testing.assert_close(policy.cue_weights(), w[1, 130:] - w[0, 130:])
    with pytest.raises(ValueError, match=r"\(B,4\)"):
        policy(conv6, expert[:, :2])
    path = save_network(policy, tmp_path / "policy.safetensors", {"trained": False})
    loaded = load_network(path)
    assert isinstance(loaded, KeyPolicy) and loaded.config.cues == ("magnitude", "residual_parts")
    torch.testing.assert_close(loaded.cue_mean.float(), policy.cue_mean, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="cues"):
        PolicyConfig(cues=("magnitude", "magnitude"))
    with pytest.raises(ValueError, match="cues"):
        PolicyConfig(cues=("sharpness",))
    with pytest.raises(ValueError, match="no cues"):
        KeyPolicy(PolicyConfig(in_channels=8, conv6_size=2)).set_cue_statistics(cues)


def test_onnx_export_of_a_cue_policy_matches_torch(tmp_path_factory: pytest.TempPathFactory) -> None:
    weights = random_weights(tmp_path_factory, policy_cues=CUES)
    ort_nets = build_networks(tmp_path_factory, weights, "onnxruntime")
    torch_nets = build_networks(tmp_path_factory, weights, "torch")
    assert ort_nets.policy_cues == torch_nets.policy_cues == CUES and ort_nets.expert_size == 7
    six = ort_nets.flow_config
    rng = np.random.default_rng(0)
    conv6 = rng.normal(size=(2, six.conv6_channels, six.conv6_size, six.conv6_size)).astype(np.float32)
    expert = np.array([[0.1, 0.5, 3.0, 0.05, 0.1, 1.0, 2.5], [0.2, 0.1, 9.0, 0.2, 0.3, 0.4, 0.8]], np.float32)
    np.testing.assert_allclose(
        ort_nets.key_probability(conv6, expert), torch_nets.key_probability(conv6, expert), atol=1e-4
    )


def test_pipeline_feeds_a_cue_policy_its_cues(
    tmp_path_factory: pytest.TempPathFactory, videos_dir: Path
) -> None:
    """The rl scheduler's expert input is [KAR, LKD/window, *cues] with the cues of the frame:
    the flow's magnitude and the residuals of the key crop warped by that flow."""
    frame = clip_frames(videos_dir, count=1)[0]
    inner = networks(tmp_path_factory, policy_cues=CUES)
    seen: list[np.ndarray] = []

    def probability(conv6: np.ndarray, expert: np.ndarray) -> float:
        seen.append(expert.copy())
        return 0.0

    shift = (1.5, -0.5)
    wrapped = WrappedNetworks(
        inner, flow_fn=lambda pairs, nets: constant_flow(nets, *shift), key_probability_fn=probability
    )
    segmenter = StreamSegmenter(wrapped, RLScheduler(0.5), track=False)
    for _ in range(4):
        segmenter.step(frame)
    assert len(seen) == 3 and all(e.shape == (1, 7) for e in seen)
    seg = inner.segmentation_config
    stride = seg.input_size / seg.feature_size
    flow = constant_flow(inner, *shift).flow
    expected_magnitude = float(mean_flow_magnitude(flow, stride)[0])
    cache = segmenter._cache
    assert cache is not None
    current = cache.flow_image  # the same still frame: the current crop equals the key crop
    expected = warp_residuals(cache.cue_maps()[None], current[None], flow)[0]
    assert expected[0] > RELATIVE_FLOOR
    for n, e in enumerate(seen):
        assert e[0, 2] == pytest.approx(expected_magnitude, rel=1e-5)
        np.testing.assert_allclose(e[0, 3:5], expected, atol=1e-6)
        # relative cues: no history on the first decision (1), then the same residual over its mean
        relative = relative_residuals(expected[None], expected[None] if n else np.full((1, 2), np.nan))
        np.testing.assert_allclose(e[0, 5:], relative[0], rtol=1e-5)
    assert seen[1][0, 5] == pytest.approx(1.0, rel=1e-5)
    assert len(segmenter.history.residuals) == 3  # every decided frame handed its residuals on
    # a policy without cues is fed the paper's two inputs only
    plain: list[np.ndarray] = []
    wrapped_plain = WrappedNetworks(
        networks(tmp_path_factory), key_probability_fn=lambda c, e: plain.append(e.copy()) or 0.0
    )
    still = StreamSegmenter(wrapped_plain, RLScheduler(0.5))
    for _ in range(2):
        still.step(frame)
    assert plain and plain[0].shape == (1, 2)


def test_onnx_export_of_a_seed_ensemble_matches_torch(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A seed-ensemble policy (PolicyConfig.members) exports to ONNX and runs in the pipeline's
    backends with the mean of its members' pi."""
    base = random_weights(tmp_path_factory, policy_cues=CUES[:3])
    for path in base.paths.values():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    single = load_network(base.paths["policy"])
    torch.manual_seed(2)
    ensemble = KeyPolicy(dataclasses.replace(single.config, members=3))
    save_network(ensemble, tmp_path / "policy.safetensors", {"trained": False})
    weights = find_weights(tmp_path)
    ort_nets = build_networks(tmp_path_factory, weights, "onnxruntime", cache=tmp_path / "cache")
    with one_torch_thread():
        torch_nets = build_networks(tmp_path_factory, weights, "torch")
    six = ort_nets.flow_config
    rng = np.random.default_rng(0)
    conv6 = rng.normal(size=(3, six.conv6_channels, six.conv6_size, six.conv6_size)).astype(np.float32)
    expert = rng.uniform(0, 1, (3, 5)).astype(np.float32)
    got = ort_nets.key_probability(conv6, expert)
    np.testing.assert_allclose(got, torch_nets.key_probability(conv6, expert), atol=1e-4)
    with torch.no_grad():
        logits = ensemble.member_logits(ensemble.trunk(torch.from_numpy(conv6)), torch.from_numpy(expert))
    np.testing.assert_allclose(got, torch.softmax(logits, dim=2)[..., 1].mean(dim=0).numpy(), atol=1e-4)
