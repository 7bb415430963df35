"""The warp corrector (not in the paper): the network, its backends, the pipeline, the evaluation
and its training, on tiny inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SIZE, FakeClip, clip_frames, networks, one_torch_thread, random_weights

from facestream.engines.pipeline import StreamSegmenter
from facestream.engines.schedulers import make_scheduler
from facestream.engines.weights import load_network, read_metadata
from facestream.models import CorrectionConfig, WarpCorrector
from facestream.models.config import config_from_json, config_to_json
from facestream.models.correction import warp_image
from facestream.models.warp import warp
from facestream.training.evaluation import (
    PAIR_NETWORKS,
    EvalConfig,
    PairBuilder,
    pair_fingerprint,
)
from facestream.training.runs import read_log
from facestream.training.train_correction import (
    CorrectionTrainConfig,
    affine_pair,
    batch_inputs,
    concat_pairs,
    make_correction_pairs,
    random_affine,
    split_clips,
    train_correction,
)

GRID = SIZE // 4


def _inputs(batch: int = 2, grid: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    crops = torch.rand(batch, 3, 2 * grid, 2 * grid, generator=g)
    key = torch.rand(batch, 3, 2 * grid, 2 * grid, generator=g)
    flow = 2 * torch.randn(batch, 2, grid, grid, generator=g)
    scores = torch.randn(batch, 5, grid, grid, generator=g)
    return crops, key, flow, scores


def test_untrained_corrector_returns_the_warped_scores() -> None:
    """Its last layer starts at zero: training starts from the paper's pipeline."""
    model = WarpCorrector(CorrectionConfig(image_size=32, grid_size=16)).eval()
    current, key, flow, scores = _inputs()
    assert torch.equal(model(current, key, flow, scores), scores)


def test_corrector_learns_a_residual_and_checks_shapes() -> None:
    model = WarpCorrector(CorrectionConfig(image_size=32, grid_size=16, width=8, dilations=(1, 2)))
    current, key, flow, scores = _inputs()
    target = torch.zeros(2, 16, 16, dtype=torch.long)  # everything background
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(current, key, flow, scores), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="crops"):
        model(current[:, :, :16, :16], key, flow, scores)
    with pytest.raises(ValueError, match="scores"):
        model(current, key, flow, scores[:, :3])


def test_full_resolution_corrector_has_a_two_step_stem(tmp_path_factory, videos_dir: Path) -> None:
    """image_size = 4 x grid: N's own crops, brought down to the score grid by two stride-2 convs."""
    config = CorrectionConfig(image_size=64, grid_size=16, width=8)
    model = WarpCorrector(config).eval()
    current, key, flow, scores = _inputs()
    big = [torch.nn.functional.interpolate(t, size=(64, 64)) for t in (current, key)]
    assert torch.equal(model(*big, flow, scores), scores)  # untrained: the warped scores
    torch.nn.init.normal_(model.head.weight)
    assert not torch.allclose(model(*big, flow, scores), scores)
    with pytest.raises(ValueError, match="crops"):
        model(current, key, flow, scores)  # 32² crops for a 64² corrector
    nets = networks(tmp_path_factory)
    clip = FakeClip(clip_frames(videos_dir, count=4))
    data = make_correction_pairs([clip], nets, per_frame=1, max_gap=2, progress=False, image_factor=4)
    assert data.images.shape[1:] == (4 * GRID, 4 * GRID, 3) and data.labels.shape[1:] == (2 * GRID, 2 * GRID)
    assert CorrectionTrainConfig(image_factor=4).model(GRID).image_size == 4 * GRID


def test_training_on_several_sets_holds_out_named_clips(tmp_path_factory, videos_dir: Path) -> None:
    def clip(name: str) -> FakeClip:
        return FakeClip(clip_frames(videos_dir, count=3), clip_id=name)

    sets = {"A": [clip("a1"), clip("a2")], "B": [clip("b1"), clip("b2")]}
    train, val = split_clips(CorrectionTrainConfig(), sets.__getitem__)
    assert [[c.clip_id for c in s] for s in train] == [["a1", "a2"]] and [c.clip_id for c in val] == [
        "b1",
        "b2",
    ]
    config = CorrectionTrainConfig(train_set="A,B", val_clips=("b2",))
    train, val = split_clips(config, sets.__getitem__)
    assert [[c.clip_id for c in s] for s in train] == [["a1", "a2"], ["b1"]] and [c.clip_id for c in val] == [
        "b2"
    ]
    with pytest.raises(ValueError, match="both a training and the validation set"):
        split_clips(CorrectionTrainConfig(train_set="A,B"), sets.__getitem__)
    with pytest.raises(ValueError, match="not in set"):
        split_clips(CorrectionTrainConfig(val_clips=("b2",)), sets.__getitem__)
    nets = networks(tmp_path_factory)
    one = make_correction_pairs([sets["A"][0]], nets, per_frame=1, max_gap=2, progress=False)
    two = make_correction_pairs([sets["B"][0]], nets, per_frame=2, max_gap=2, progress=False)
    both = concat_pairs([one, two])
    assert len(both) == len(one) + len(two) and len(both.images) == len(one.images) + len(two.images)
    np.testing.assert_array_equal(both.pairs[len(one) :], two.pairs + len(one.images))
    k, t = both.pairs[-1]
    np.testing.assert_array_equal(both.images[t], two.images[two.pairs[-1, 1]])
    np.testing.assert_array_equal(both.scores[k], two.scores[two.pairs[-1, 0]])


def test_protected_classes_are_left_to_the_warp() -> None:
    model = WarpCorrector(CorrectionConfig(image_size=32, grid_size=16, protect=(2,))).eval()
    torch.nn.init.normal_(model.head.weight)
    current, key, flow, scores = _inputs()
    with torch.no_grad():
        residual = model(current, key, flow, scores) - scores
    assert float(residual[:, 2].abs().max()) == 0.0  # no residual on the eye scores
    eyes = scores.argmax(dim=1) == 2
    on_eyes = residual.permute(0, 2, 3, 1)[eyes]
    assert bool(eyes.any()) and float(on_eyes.max()) == 0.0  # other classes only lose there
    assert float(on_eyes.min()) < -0.1
    assert float(residual.abs().max()) > 0.1  # elsewhere it corrects
    frozen = WarpCorrector(CorrectionConfig(image_size=32, grid_size=16, protect=(2,), protect_grow=False))
    frozen.load_state_dict(model.state_dict())
    with torch.no_grad():
        residual = frozen.eval()(current, key, flow, scores) - scores
    assert float(residual.permute(0, 2, 3, 1)[eyes].abs().max()) == 0.0


def test_guard_margin_keeps_the_upsampled_mask_of_a_protected_class() -> None:
    """A thin eye on the score grid: with margin 0 a residual that boosts skin on the cells next
    to it shrinks the eye once the scores are upsampled (what erased narrow eyes); with the
    default margin of 1 the upsampled eye mask is exactly the warp's."""
    grid = 16
    scores = torch.zeros(1, 5, grid, grid)
    scores[:, 1] = 2.0  # skin everywhere
    scores[:, 2, 7, 4:12] = 4.0  # a one-cell-tall eye
    current, key, flow, _ = _inputs(1, grid)
    flow = torch.zeros_like(flow)
    masks = {}
    for margin in (0, 1):
        model = WarpCorrector(
            CorrectionConfig(image_size=32, grid_size=grid, protect=(2,), protect_margin=margin)
        )
        torch.nn.init.zeros_(model.head.weight)
        assert model.head.bias is not None
        with torch.no_grad():
            model.head.bias[1] = 3.0  # the corrector boosts skin wherever it may
            corrected = model.eval()(current, key, flow, warp(scores, flow))
        up = torch.nn.functional.interpolate(corrected, size=(128, 128), mode="bilinear", align_corners=False)
        masks[margin] = up.argmax(dim=1) == 2
    up = torch.nn.functional.interpolate(scores, size=(128, 128), mode="bilinear", align_corners=False)
    warped_eye = up.argmax(dim=1) == 2
    assert int(masks[0].sum()) < int(warped_eye.sum())  # margin 0: the eye shrinks
    assert torch.equal(masks[1], warped_eye)  # margin 1: the warp's eye, pixel for pixel
    assert CorrectionConfig().protect_margin == 1
    with pytest.raises(ValueError, match="protect_margin"):
        CorrectionConfig(protect_margin=-1)


def test_guard_lets_a_protected_class_grow_but_never_shrink() -> None:
    """``protect_grow``: in the guarded zone other classes may lose score, never gain it. A corrector
    that lowers skin grows the thin eye into the margin; one that boosts skin leaves it the warp's;
    with random residuals the upsampled eye always contains the warp's. Without ``protect_grow`` the
    zone is frozen."""
    grid = 16
    scores = torch.zeros(1, 5, grid, grid)
    scores[:, 1] = 2.0
    scores[:, 2, 7, 4:12] = 4.0  # a one-cell-tall eye
    scores[:, 2, 6, 4:12] = 1.5  # and eye evidence just above it, where skin still wins
    current, key, flow, _ = _inputs(1, grid)
    flow = torch.zeros_like(flow)

    def eye(corrected: torch.Tensor) -> torch.Tensor:
        up = torch.nn.functional.interpolate(corrected, size=(128, 128), mode="bilinear", align_corners=False)
        return up.argmax(dim=1) == 2

    warped_eye = eye(scores)

    def corrected(skin_bias: float, grow: bool) -> torch.Tensor:
        config = CorrectionConfig(image_size=32, grid_size=grid, protect=(2,), protect_grow=grow)
        model = WarpCorrector(config)
        torch.nn.init.zeros_(model.head.weight)
        assert model.head.bias is not None
        with torch.no_grad():
            model.head.bias[1] = skin_bias
            return model.eval()(current, key, flow, scores)

    grown = eye(corrected(-1.0, grow=True))
    assert bool((grown & ~warped_eye).any()) and not bool((warped_eye & ~grown).any())
    assert torch.equal(eye(corrected(-1.0, grow=False)), warped_eye)  # frozen zone
    assert torch.equal(eye(corrected(3.0, grow=True)), warped_eye)  # boosting skin: no effect
    assert CorrectionConfig().protect_grow
    torch.manual_seed(0)
    for _ in range(5):
        model = WarpCorrector(CorrectionConfig(image_size=32, grid_size=grid, protect=(2,)))
        torch.nn.init.normal_(model.head.weight, std=0.5)
        with torch.no_grad():
            eye_now = eye(model.eval()(current, key, flow, scores))
        assert not bool((warped_eye & ~eye_now).any())


def test_correction_config_checks_and_round_trips() -> None:
    config = CorrectionConfig(image_size=64, grid_size=32, width=16, dilations=(1, 3), protect=(2,))
    assert config_from_json(config_to_json(config)) == config
    with pytest.raises(ValueError, match="2 or 4 times grid_size"):
        CorrectionConfig(image_size=64, grid_size=64)
    with pytest.raises(ValueError, match="2 or 4 times grid_size"):
        CorrectionConfig(image_size=48, grid_size=16)
    with pytest.raises(ValueError, match="dilations"):
        CorrectionConfig(dilations=(1, 0))
    with pytest.raises(ValueError, match="protect"):
        CorrectionConfig(protect=(5,))


def test_image_warp_with_zero_flow_is_the_identity_and_follows_a_shift() -> None:
    image = torch.rand(1, 3, 32, 32)
    assert torch.allclose(warp_image(image, torch.zeros(1, 2, 16, 16)), image, atol=1e-5)
    shift = torch.zeros(1, 2, 16, 16)
    shift[:, 0] = 1.0  # one grid pixel = two image pixels to the right in the key
    warped = warp_image(image, shift)
    assert torch.allclose(warped[..., :-2], image[..., 2:], atol=1e-5)


def test_backends_agree_on_the_corrector(tmp_path_factory) -> None:
    with one_torch_thread():
        torch_nets = networks(tmp_path_factory, "torch")
        ort_nets = networks(tmp_path_factory, "onnxruntime")
        assert torch_nets.has_correction and ort_nets.has_correction
        config = torch_nets.correction_config
        assert config is not None and config.grid_size == GRID and config.protect == (2,)
        current, key, flow, scores = (t.numpy() for t in _inputs(grid=GRID))
        out_t = torch_nets.correct(current, key, flow, scores)
        out_o = ort_nets.correct(current, key, flow, scores)
    assert out_t.shape == scores.shape
    assert not np.allclose(out_t, scores, atol=1e-3)  # the random test corrector changes something
    assert np.abs(out_t - out_o).max() < 1e-3


def test_weights_without_a_corrector_run_the_papers_pipeline(tmp_path_factory) -> None:
    nets = networks(tmp_path_factory, without=("correction",))
    assert not nets.has_correction
    with pytest.raises(RuntimeError, match="correction"):
        nets.correct(*(t.numpy() for t in _inputs(grid=GRID)))
    assert not StreamSegmenter(nets, make_scheduler("fixed", 4)).correct


@pytest.fixture(scope="module")
def frames(videos_dir: Path) -> list[np.ndarray]:
    return clip_frames(videos_dir, count=6)


def test_pipeline_corrects_non_key_frames_only_when_asked(tmp_path_factory, frames) -> None:
    nets = networks(tmp_path_factory)
    runs = {}
    for correct in (True, False):
        segmenter = StreamSegmenter(nets, make_scheduler("fixed", 4), correct=correct)
        assert segmenter.correct is correct
        runs[correct] = [segmenter.step(frame) for frame in frames]
    on, off = runs[True], runs[False]
    for a, b in zip(on, off, strict=True):
        assert a.key == b.key
        assert ("correct" in a.timings) == (not a.key)
        assert "correct" not in b.timings
    assert np.array_equal(on[0].mask, off[0].mask)  # key frames: N alone
    assert any(not np.array_equal(a.mask, b.mask) for a, b in zip(on[1:4], off[1:4], strict=True))


def test_pair_tables_use_the_corrector_and_key_their_cache_on_it(tmp_path_factory, frames) -> None:
    nets = networks(tmp_path_factory)
    weights = random_weights(tmp_path_factory)
    assert pair_fingerprint(weights, EvalConfig(correct=False)) == weights.fingerprint(PAIR_NETWORKS)
    assert pair_fingerprint(weights, EvalConfig()) != weights.fingerprint(PAIR_NETWORKS)
    box = FakeClip(frames).box(0)
    assert box is not None
    warped = {}
    for correct in (True, False):
        builder = PairBuilder(nets, EvalConfig(correct=correct))
        key, _ = builder.key(frames[0], box)
        warped[correct] = builder.warp(frames[1], [key])[0]
    assert warped[True].shape == warped[False].shape
    assert not np.allclose(warped[True], warped[False], atol=1e-3)


def test_affine_augmentation_moves_frames_flow_and_scores_consistently() -> None:
    """Warping the transformed key scores by the transformed flow gives the transformed warped
    scores (away from the border, where sampling clamps), and labels stay class indices."""
    g = torch.Generator().manual_seed(3)
    grid = 32
    yy, xx = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    # smooth key scores and a smooth, non-trivial flow (a rotation-like swirl plus a shift)
    key_scores = torch.stack([torch.sin(xx / 5 + c) * torch.cos(yy / 7 - c) for c in range(5)])[None]
    flow = torch.stack([3.0 + 0.1 * (yy - grid / 2), -2.0 - 0.08 * (xx - grid / 2)])[None]
    warped = warp(key_scores, flow)
    current = torch.rand(1, 3, 2 * grid, 2 * grid, generator=g)
    key = torch.rand(1, 3, 2 * grid, 2 * grid, generator=g)
    label = torch.randint(0, 5, (1, 2 * grid, 2 * grid), generator=g)
    assert not torch.allclose(random_affine(1, 1.0, g)[:, :, :2], torch.eye(2))
    angle = torch.tensor(0.5)  # a stronger map than training draws, so that errors show
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.tensor([[[0.8 * cos, -0.7 * sin, 0.05], [0.8 * sin, 0.7 * cos, -0.04]]])
    # the key scores seen through the same map, warped by the moved flow
    _, _, moved, warped_t, label_t = affine_pair(theta, current, key, flow, warped, label)
    _, _, _, key_t, _ = affine_pair(theta, current, key, flow, key_scores, label)
    rewarped = warp(key_t, moved)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    error = (rewarped[inner] - warped_t[inner]).abs()
    assert error.mean() < 0.02 and error.max() < 0.1, (error.mean(), error.max())
    assert not torch.allclose(moved, flow, atol=0.1)  # the flow did change
    assert label_t.dtype == torch.long and set(label_t.unique().tolist()) <= set(range(5))
    # strength 0 is the identity
    same = affine_pair(random_affine(1, 0.0, g), current, key, flow, warped, label)
    assert torch.allclose(same[2], flow, atol=1e-4) and torch.equal(same[4], label)


def test_train_correction_learns_validates_and_resumes(tmp_path_factory, videos_dir: Path, tmp_path) -> None:
    nets = networks(tmp_path_factory)
    clip = FakeClip(clip_frames(videos_dir, count=10), unlabelled=(6,))
    data = make_correction_pairs([clip], nets, per_frame=3, max_gap=4, progress=False)
    assert data.images.shape[1:] == (2 * GRID, 2 * GRID, 3) and data.scores.shape[1:] == (5, GRID, GRID)
    gaps = data.pairs[:, 1] - data.pairs[:, 0]
    assert gaps.min() >= 1 and gaps.max() <= 4
    assert not any(k < 6 < t for k, t in data.pairs)  # an unlabelled frame ends a run
    current, key, flow, scores, label = batch_inputs(data, np.arange(3), torch.tensor([True, False, True]))
    assert current.shape == (3, 3, 2 * GRID, 2 * GRID) and label.shape == (3, 2 * GRID, 2 * GRID)
    config = CorrectionTrainConfig(
        steps=8, batch=4, warmup=2, val_every=4, checkpoint_every=4, width=8, affine=1.0
    )
    with one_torch_thread():
        train_correction(config, data, data, tmp_path, progress=False)
        config_more = CorrectionTrainConfig(
            steps=8, batch=4, warmup=2, val_every=4, checkpoint_every=4, width=8, affine=1.0
        )
        path = train_correction(config_more, data, data, tmp_path, progress=False)  # resumes: done
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(0, 9))
    assert log[0]["val_miou_warped"] == log[0]["val_miou_corrected"]  # untrained: unchanged
    assert "val_miou_corrected" in log[4] and "val_miou_corrected" in log[8]
    model = load_network(path)
    assert isinstance(model, WarpCorrector) and model.config.grid_size == GRID
    # trained with the guard's margin at 0 (as shipped), saved with the margin it runs with
    assert config.train_protect_margin == 0 and model.config.protect_margin == config.protect_margin == 1
    assert config.model(GRID, training=True).protect_margin == 0
    assert model.config.protect_grow and not config.model(GRID, training=True).protect_grow
    card = read_metadata(path)["card"]
    assert '"val_miou_corrected"' in card and '"trained": true' in card
    assert (tmp_path / "training.png").is_file()


def test_evaluation_fps_model_times_the_corrector_only_when_it_runs(tmp_path_factory, monkeypatch) -> None:
    from facestream.training.evaluation import measure_costs

    nets = networks(tmp_path_factory)
    calls = []
    real = nets._correct
    monkeypatch.setattr(nets, "_correct", lambda *a: calls.append(1) or real(*a))
    measure_costs(nets, repeats=2)
    assert not calls
    measure_costs(nets, repeats=2, correct=True)
    assert calls
