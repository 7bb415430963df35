"""The dynamic segmentation pipeline (StreamSegmenter) on real clips with random weights.

What is proven: the ``always`` scheduler is exactly per-frame N; F runs only when needed and at
most once per frame; frames without a face and bad frames do not break the stream; masks and
timings have the documented form; a zero flow with unit scale reproduces the key mask; two
streams sharing one Networks object do not see each other's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import (
    CLIP,
    OTHER_CLIP,
    AllSkinNetworks,
    WrappedNetworks,
    clip_frames,
    constant_flow,
    keys_of,
    networks,
    one_torch_thread,
)

from facestream.engines.face import Box, crop_square, paste_scores
from facestream.engines.networks import FlowResult, Networks
from facestream.engines.pipeline import FrameResult, StreamSegmenter, flow_image, resized_chw, to_chw
from facestream.engines.schedulers import make_scheduler

BACKENDS = ["onnxruntime", "torch"]
NUM_CLASSES = 5


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One torch thread in this module (the 2 cores are shared); restored afterwards."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def frames(videos_dir: Path) -> list[np.ndarray]:
    return clip_frames(videos_dir, CLIP, count=12)


def check_mask(result: FrameResult, frame: np.ndarray) -> None:
    assert result.face and result.mask is not None and result.box is not None
    assert result.mask.shape == frame.shape[:2]
    assert result.mask.dtype == np.uint8
    assert int(result.mask.max()) < NUM_CLASSES


# --------------------------------------------------------------------------- per-frame equivalence


@pytest.mark.parametrize("backend", BACKENDS)
def test_always_reproduces_per_frame_segmentation_exactly(
    tmp_path_factory, frames: list[np.ndarray], backend: str
) -> None:
    nets = networks(tmp_path_factory, backend)
    segmenter = StreamSegmenter(nets, make_scheduler("always"))
    size = nets.segmentation_config.input_size
    for index, frame in enumerate(frames[:10]):
        result = segmenter.step(frame)
        assert result.index == index and result.key
        check_mask(result, frame)
        crop = crop_square(frame, result.box, size)
        scores = nets.task(nets.features(to_chw(crop)[None]))[0]
        expected = paste_scores(scores, result.box, frame.shape[:2])
        assert np.array_equal(result.mask, expected), f"frame {index}"


# --------------------------------------------------------------------------- when F runs


def flow_calls_per_frame(wrapped: WrappedNetworks, segmenter: StreamSegmenter, frames) -> list:
    """(key, number of F calls, number of warps) for each frame."""
    out = []
    for frame in frames:
        before_flow, before_warp = wrapped.calls["flow"], wrapped.calls["warp"]
        result = segmenter.step(frame)
        check_mask(result, frame)
        out.append((result.key, wrapped.calls["flow"] - before_flow, wrapped.calls["warp"] - before_warp))
    return out


def test_fixed_runs_flow_only_on_non_key_frames(tmp_path_factory, frames) -> None:
    wrapped = WrappedNetworks(networks(tmp_path_factory))
    segmenter = StreamSegmenter(wrapped, make_scheduler("fixed", 3))
    per_frame = flow_calls_per_frame(wrapped, segmenter, frames)
    assert [key for key, _, _ in per_frame] == [i % 3 == 0 for i in range(len(frames))]
    for key, flows, warps in per_frame:
        assert (flows, warps) == ((0, 0) if key else (1, 1))
    assert wrapped.calls["features"] == 4


def test_always_never_runs_flow(tmp_path_factory, frames) -> None:
    wrapped = WrappedNetworks(networks(tmp_path_factory))
    segmenter = StreamSegmenter(wrapped, make_scheduler("always"))
    for frame in frames[:4]:
        segmenter.step(frame)
    assert wrapped.calls["flow"] == 0 and wrapped.calls["warp"] == 0


KEY_PATTERN = [False, True, False, False, True, True, False, True, False, False, True]


@pytest.mark.parametrize("name", ["rl", "flow", "dvsnet"])
def test_flow_schedulers_run_flow_once_per_frame(tmp_path_factory, frames, name: str) -> None:
    """F runs exactly once on every frame after the first, key or not, and its result is the
    one the warp uses (the decisions here are scripted through F's output)."""
    inner = networks(tmp_path_factory)
    pattern = iter(KEY_PATTERN)
    state = {"key": False}
    warped_with: list[np.ndarray] = []

    def flow_fn(pairs: np.ndarray, _inner) -> FlowResult:
        state["key"] = next(pattern)
        # flow scheduler: magnitude 40 (key) or 0.4 (non-key) input pixels against threshold 8.
        return constant_flow(inner, 10.0 if state["key"] else 0.1, 0.0)

    wrapped = WrappedNetworks(
        inner,
        flow_fn=flow_fn,
        key_probability_fn=lambda conv6, expert: 0.9 if state["key"] else 0.1,
        dvsnet_fn=lambda conv6: 0.1 if state["key"] else 0.9,
    )
    original_warp = wrapped.warp

    def warp(features, flow, scale):
        warped_with.append(flow)
        return original_warp(features, flow, scale)

    wrapped.warp = warp  # type: ignore[method-assign]
    segmenter = StreamSegmenter(wrapped, make_scheduler(name))
    per_frame = flow_calls_per_frame(wrapped, segmenter, frames)
    assert per_frame[0] == (True, 0, 0)
    assert [key for key, _, _ in per_frame[1:]] == KEY_PATTERN
    assert all(flows == 1 for _, flows, _ in per_frame[1:])
    assert [warps for _, _, warps in per_frame[1:]] == [int(not key) for key in KEY_PATTERN]
    # The warp got the non-key frames' own (memoised) flow: 0.1 grid pixels in x.
    assert len(warped_with) == KEY_PATTERN.count(False)
    assert all(np.all(flow[:, 0] == np.float32(0.1)) for flow in warped_with)


# --------------------------------------------------------------------------- faces and bad frames


def no_face_frames() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "black": np.zeros((240, 320, 3), np.uint8),
        "noise": rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
    }


@pytest.mark.parametrize("kind", ["black", "noise"])
def test_frame_without_face_then_face_becomes_key(tmp_path_factory, frames, kind: str) -> None:
    empty = no_face_frames()[kind]
    segmenter = StreamSegmenter(networks(tmp_path_factory), make_scheduler("fixed", 30))
    first = segmenter.step(empty)  # no face on the very first frame
    assert (first.face, first.mask, first.box, first.key) == (False, None, None, False)
    assert set(first.timings) == {"detect", "total"}
    second = segmenter.step(frames[0])
    assert second.key and second.face
    check_mask(second, frames[0])
    assert not segmenter.step(frames[1]).key


def test_face_lost_mid_stream_forces_the_next_key(tmp_path_factory, frames) -> None:
    """With ``always`` every frame needs the detector; after a faceless frame, the cache is gone
    and the next face frame is a key even under a long fixed interval."""
    empty = no_face_frames()["black"]
    always = StreamSegmenter(networks(tmp_path_factory), make_scheduler("always"))
    results = [always.step(f) for f in (frames[0], empty, frames[1])]
    assert [r.face for r in results] == [True, False, True]
    assert results[1].mask is None and results[2].key

    fixed = StreamSegmenter(networks(tmp_path_factory), make_scheduler("fixed", 3))
    sequence = [frames[0], frames[1], frames[2], empty, frames[3], frames[4]]
    results = [fixed.step(f) for f in sequence]
    assert [(r.key, r.face) for r in results] == [
        (True, True),
        (False, True),
        (False, True),
        (False, False),  # the interval asked for a key, the detector found no face
        (True, True),  # no cache: the next face frame is a key at once
        (False, True),
    ]
    assert [r.index for r in results] == list(range(len(sequence)))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((240, 320, 3), np.float32),
        np.zeros((240, 320), np.uint8),
        np.zeros((240, 320, 4), np.uint8),
        np.zeros((240, 320, 3), np.int64),
    ],
    ids=["float32", "2-D", "4-channel", "int64"],
)
def test_bad_frames_raise_and_the_stream_goes_on(tmp_path_factory, frames, bad: np.ndarray) -> None:
    segmenter = StreamSegmenter(networks(tmp_path_factory), make_scheduler("fixed", 3))
    results = [segmenter.step(frames[0])]
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB frame"):
        segmenter.step(bad)
    results += [segmenter.step(frame) for frame in frames[1:5]]
    for result, frame in zip(results, frames[:5], strict=True):
        check_mask(result, frame)
    # The bad frame took no index and no decision: the key rhythm is unchanged.
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert keys_of(results) == [0, 3]


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 320, 3)])
def test_empty_frames_raise_value_error(tmp_path_factory, frames, shape: tuple[int, ...]) -> None:
    segmenter = StreamSegmenter(networks(tmp_path_factory), make_scheduler("always"))
    segmenter.step(frames[0])
    with pytest.raises(ValueError, match="frame"):
        segmenter.step(np.zeros(shape, np.uint8))


def test_non_contiguous_frames_are_accepted(tmp_path_factory, frames) -> None:
    segmenter = StreamSegmenter(networks(tmp_path_factory), make_scheduler("always"))
    flipped = frames[0][:, ::-1]
    assert not flipped.flags.c_contiguous
    result = segmenter.step(flipped)
    check_mask(result, flipped)


# --------------------------------------------------------------------------- masks and timings


def test_masks_and_timings_of_key_and_non_key_frames(tmp_path_factory, frames) -> None:
    segmenter = StreamSegmenter(networks(tmp_path_factory), make_scheduler("fixed", 4))
    results = [segmenter.step(frame) for frame in frames[:6]]
    assert keys_of(results) == [0, 4]
    for result, frame in zip(results, frames, strict=False):
        check_mask(result, frame)
        timings = result.timings
        assert "total" in timings
        assert all(np.isfinite(v) and v >= -1e-6 for v in timings.values()), timings
        assert sum(v for k, v in timings.items() if k != "total") <= timings["total"] + 1e-3
    assert set(results[0].timings) == {"detect", "crop", "key", "task", "total"}
    assert set(results[4].timings) == {"crop", "policy", "detect", "key", "task", "total"}
    for non_key in (results[1], results[2], results[3], results[5]):
        assert set(non_key.timings) == {"crop", "policy", "flow", "warp", "correct", "task", "total"}
    # Masks use several classes somewhere in the clip (random weights: at least face vs background).
    assert len(np.unique(np.concatenate([r.mask.ravel() for r in results]))) >= 2


# --------------------------------------------------------------------------- warp identity


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_flow_unit_scale_reproduces_the_key_mask(tmp_path_factory, frames, backend: str) -> None:
    inner = networks(tmp_path_factory, backend)
    wrapped = WrappedNetworks(inner, flow_fn=lambda pairs, nets: constant_flow(nets, 0.0, 0.0, 1.0))
    segmenter = StreamSegmenter(wrapped, make_scheduler("fixed", 30))
    key = segmenter.step(frames[0])
    assert key.key
    for _ in range(3):
        same = segmenter.step(frames[0])
        assert not same.key
        assert same.box == key.box
        assert np.array_equal(same.mask, key.mask)
    assert wrapped.calls["warp"] == 3


@pytest.mark.parametrize("track", [True, False])
def test_non_key_crops_follow_the_face(tmp_path_factory, frames, track: bool) -> None:
    """A face flow of (-1, +2) grid pixels per frame (current -> key): each non-key crop is cut
    one frame's motion further along (the first one from the key's square); F sees that crop.
    With ``track=False`` the key's square is held."""
    inner = networks(tmp_path_factory)
    seen: list[np.ndarray] = []

    def flow_fn(pairs: np.ndarray, nets: Networks) -> FlowResult:
        seen.append(pairs.copy())
        return constant_flow(nets, -1.0, 2.0)

    wrapped = AllSkinNetworks(inner, flow_fn=flow_fn)
    segmenter = StreamSegmenter(wrapped, make_scheduler("fixed", 4), track=track)
    results = [segmenter.step(frames[0]) for _ in range(5)]
    assert keys_of(results) == [0, 4]
    key = results[0].box
    step = key.width / inner.segmentation_config.feature_size
    for n, result in enumerate(results[1:4]):
        dx, dy = (n * step, -2 * n * step) if track else (0.0, 0.0)
        assert result.box == pytest.approx(Box(key.x0 + dx, key.y0 + dy, key.x1 + dx, key.y1 + dy))
    assert results[4].box == key  # the next key locates the face anew
    # F's current image for the third non-key frame is the crop of the moved square
    size = inner.segmentation_config.input_size
    expected = flow_image(crop_square(frames[0], results[3].box, size), inner.flow_input_size)
    assert len(seen) == 3 and np.array_equal(seen[2][0, :3], expected)


# --------------------------------------------------------------------------- stream isolation


@pytest.mark.parametrize("scheduler", ["fixed", "rl"])
def test_two_streams_sharing_networks_are_isolated(
    tmp_path_factory, videos_dir: Path, scheduler: str
) -> None:
    nets = networks(tmp_path_factory)
    clips = [clip_frames(videos_dir, CLIP, count=8), clip_frames(videos_dir, OTHER_CLIP, count=8)]
    knob = {"fixed": 3, "rl": None}[scheduler]

    def alone(frames: list[np.ndarray]) -> list[FrameResult]:
        segmenter = StreamSegmenter(nets, make_scheduler(scheduler, knob))
        return [segmenter.step(frame) for frame in frames]

    expected = [alone(frames) for frames in clips]
    segmenters = [StreamSegmenter(nets, make_scheduler(scheduler, knob)) for _ in clips]
    interleaved: list[list[FrameResult]] = [[], []]
    for a, b in zip(*clips, strict=True):
        interleaved[0].append(segmenters[0].step(a))
        interleaved[1].append(segmenters[1].step(b))
    for got, want in zip(interleaved, expected, strict=True):
        assert [(r.index, r.key, r.face, r.box) for r in got] == [
            (r.index, r.key, r.face, r.box) for r in want
        ]
        assert all(np.array_equal(g.mask, w.mask) for g, w in zip(got, want, strict=True))
        assert [r.value for r in got] == pytest.approx([r.value for r in want])
    assert expected[0][0].mask.shape != expected[1][0].mask.shape  # two different clips


def test_a_key_is_forced_when_the_last_one_is_too_old(tmp_path_factory, frames) -> None:
    """A scheduler that never keys (an rl policy settled on "never" for a calm video): the
    pipeline keys anyway once the last key is more than max_key_distance frames back, as the
    evaluation does at its gap limit; the default limit is the 90-frame decision window."""
    inner = networks(tmp_path_factory)
    never = WrappedNetworks(inner, key_probability_fn=lambda conv6, expert: 0.0)
    segmenter = StreamSegmenter(never, make_scheduler("rl", 0.5), max_key_distance=3)
    results = [segmenter.step(frames[0]) for _ in range(9)]
    assert keys_of(results) == [0, 4, 8]
    assert results[4].value is None and results[3].value == 0.0  # forced, not decided
    assert never.calls["key_probability"] == 6
    assert StreamSegmenter(never, make_scheduler("rl", 0.5)).max_key_distance == 90
    with pytest.raises(ValueError, match="max_key_distance"):
        StreamSegmenter(never, make_scheduler("fixed"), max_key_distance=0)


def test_resized_chw_is_an_area_resize_of_each_channel() -> None:
    image = np.random.default_rng(0).random((3, 96, 96)).astype(np.float32)
    small = resized_chw(image, 32)
    whole = cv2.resize(image.transpose(1, 2, 0), (32, 32), interpolation=cv2.INTER_AREA)
    assert small.shape == (3, 32, 32) and small.dtype == np.float32
    np.testing.assert_allclose(small, whole.transpose(2, 0, 1), atol=1e-6)
    assert np.allclose(small[:, 0, 0], image[:, :3, :3].mean(axis=(1, 2)), atol=1e-6)
    assert resized_chw(image, 96) is image
