"""OpenCV DIS optical flow as the flow F (facestream.engines.dis_flow, ``--flow dis``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from helpers import WrappedNetworks, networks, one_torch_thread, random_weights

from facestream.engines import segment as segment_module
from facestream.engines.backends import create_networks
from facestream.engines.dis_flow import DEFAULT_FLOW, FLOWS, DisFlowNetworks, _grey, with_flow
from facestream.engines.networks import FlowResult, Networks
from facestream.engines.segment import SegmentOptions, run_segment
from facestream.models import warp
from facestream.models.config import FlowConfig, SegmentationConfig

INPUT, GRID = 128, 64  # the default flow input and warp grid
SHIFT = (3, 2)  # (dx, dy) of the current frame against the key, input pixels
MARGIN = 12  # warp-grid pixels left out at each border (roll seam, DIS border effects)


class _FlowOnly(Networks):
    """The default configs (F sees 128², warps 64²) and nothing else: what DIS flow needs."""

    backend = "none"

    def __init__(self) -> None:
        segmentation = SegmentationConfig(input_size=256)
        flow = FlowConfig(input_size=INPUT, warp_size=segmentation.feature_size)
        super().__init__(segmentation, flow, has_policy=False, has_dvsnet=False)

    def features(self, images: np.ndarray) -> np.ndarray:
        raise AssertionError("not used")

    def flow(self, pairs: np.ndarray) -> FlowResult:
        raise AssertionError("F must not run when conv6=False")

    def warp(self, features: np.ndarray, flow: np.ndarray, scale: np.ndarray) -> np.ndarray:
        raise AssertionError("not used")

    def key_probability(self, conv6: np.ndarray, expert: np.ndarray) -> np.ndarray:
        raise AssertionError("not used")

    def dvsnet_score(self, conv6: np.ndarray) -> np.ndarray:
        raise AssertionError("not used")


def _texture(size: int = INPUT, seed: int = 0) -> np.ndarray:
    """(3, size, size) float32 RGB in [0, 1]: smooth random texture, periodic (so it rolls)."""
    rng = np.random.default_rng(seed)
    noise = np.tile(rng.random((size, size, 3)).astype(np.float32), (3, 3, 1))
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.5)[size : 2 * size, size : 2 * size]
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return np.ascontiguousarray(smooth.transpose(2, 0, 1))


def _rolled(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``image`` moved by (dx, dy): rolled(p) = image(p - (dx, dy))."""
    return np.roll(image, (dy, dx), axis=(1, 2))


def _on_grid(image: np.ndarray) -> np.ndarray:
    """(3, S, S) -> (3, GRID, GRID), area-resized like the flow is."""
    hwc = cv2.resize(image.transpose(1, 2, 0), (GRID, GRID), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def _interior(array: np.ndarray) -> np.ndarray:
    return array[..., MARGIN:-MARGIN, MARGIN:-MARGIN]


def _warp(key: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """W(I_k, M) of one (3, GRID, GRID) image with the torch reference warp."""
    with torch.inference_mode():
        out = warp(torch.from_numpy(key[None]), torch.from_numpy(flow[None]))
    return out[0].numpy()


def test_dis_recovers_a_known_shift_with_the_warp_sign_convention() -> None:
    key = _texture()
    dx, dy = SHIFT
    current = _rolled(key, dx, dy)  # current(p) = key(p - shift): M_{i->k} = -shift
    other = _rolled(key, -2, 1)
    dis = DisFlowNetworks(_FlowOnly(), conv6=False, size=INPUT)
    result = dis.flow(np.stack((np.concatenate((current, key)), np.concatenate((other, key)))))

    assert result.flow.shape == (2, 2, GRID, GRID) and result.flow.dtype == np.float32
    per_pixel = GRID / INPUT
    for b, (sx, sy) in enumerate((SHIFT, (-2, 1))):
        flow_x, flow_y = _interior(result.flow[b])
        assert np.median(flow_x) == pytest.approx(-sx * per_pixel, abs=0.1)
        assert np.median(flow_y) == pytest.approx(-sy * per_pixel, abs=0.1)
        assert np.mean(np.abs(flow_x + sx * per_pixel)) < 0.25
        assert np.mean(np.abs(flow_y + sy * per_pixel)) < 0.25

    # Sign convention: warping the key by the flow gives the current frame, the opposite sign
    # (or no flow) does not.
    key_grid, current_grid = _on_grid(key), _on_grid(current)
    error = np.abs(_interior(_warp(key_grid, result.flow[0]) - current_grid)).mean()
    flipped = np.abs(_interior(_warp(key_grid, -result.flow[0]) - current_grid)).mean()
    unwarped = np.abs(_interior(key_grid - current_grid)).mean()
    assert error < 0.2 * unwarped, (error, unwarped)
    assert flipped > unwarped > 10 * error, (flipped, unwarped, error)


def test_dis_flow_is_zero_for_identical_frames_and_scale_is_one() -> None:
    image = _texture(seed=1)
    result = DisFlowNetworks(_FlowOnly(), conv6=False, size=INPUT).flow(np.concatenate((image, image))[None])
    assert np.abs(result.flow).max() < 0.05
    config = _FlowOnly().flow_config
    assert result.scale.shape == (1, config.scale_channels, GRID, GRID)
    assert np.all(result.scale == 1.0)
    side = config.conv6_size
    assert result.conv6.shape == (1, config.conv6_channels, side, side)
    assert not result.conv6.any()


def test_dis_rejects_pairs_that_are_not_pairs() -> None:
    with pytest.raises(ValueError, match="6"):
        DisFlowNetworks(_FlowOnly(), conv6=False, size=INPUT).flow(np.zeros((1, 3, INPUT, INPUT), np.float32))


@pytest.fixture(scope="module")
def inner(tmp_path_factory: pytest.TempPathFactory) -> Networks:
    with one_torch_thread():
        return networks(tmp_path_factory, "torch")


def _pair(networks: Networks) -> np.ndarray:
    size = networks.flow_config.input_size
    key = cv2.resize(_texture().transpose(1, 2, 0), (size, size)).transpose(2, 0, 1)
    return np.concatenate((_rolled(key, 2, 1), key))[None].astype(np.float32)


def test_conv6_comes_from_f_only_when_asked(inner: Networks) -> None:
    pair = _pair(inner)
    with one_torch_thread():
        expected = inner.flow(pair)
        counted = WrappedNetworks(inner)
        without = DisFlowNetworks(counted, conv6=False, size=pair.shape[-1]).flow(pair)
        assert counted.calls["flow"] == 0  # F never runs
        with_f = DisFlowNetworks(counted, conv6=True, size=pair.shape[-1]).flow(pair)
        assert counted.calls["flow"] == 0 and counted.calls["conv6_features"] == 1  # encoder only
    assert without.conv6.shape == expected.conv6.shape and not without.conv6.any()
    np.testing.assert_allclose(with_f.conv6, expected.conv6, rtol=1e-5, atol=1e-6)
    assert expected.conv6.any()
    for result in (without, with_f):  # DIS flow and unit scale either way, F's shapes
        assert result.flow.shape == expected.flow.shape
        assert result.scale.shape == expected.scale.shape and np.all(result.scale == 1.0)
    np.testing.assert_array_equal(without.flow, with_f.flow)
    assert not np.allclose(with_f.flow, expected.flow)


def test_dis_on_larger_crops_keeps_grid_units_and_f_conv6(inner: Networks) -> None:
    """``size``: DIS sees the frames at that side (e.g. N's crop instead of F's half-size input);
    the flow stays in warp-grid pixels, and F still gets its own input size for Conv6."""
    small = _pair(inner)
    big_side = 2 * inner.flow_config.input_size
    big = np.stack([cv2.resize(small[0].transpose(1, 2, 0), (big_side, big_side)).transpose(2, 0, 1)])
    wide = DisFlowNetworks(inner, conv6=True, size=big_side)
    assert wide.flow_input_size == big_side and wide.backend.endswith(f"+dis{big_side}")
    default = DisFlowNetworks(inner, conv6=True)  # N's crop size by default, and no size in the name
    assert default.flow_input_size == inner.segmentation_config.input_size
    assert default.backend.endswith("+dis")
    with one_torch_thread():
        at_big = wide.flow(big)
        at_small = DisFlowNetworks(inner, conv6=True, size=small.shape[-1]).flow(small)
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert at_big.flow.shape == at_small.flow.shape
    for axis in (0, 1):  # the same motion in grid pixels at either input size
        assert np.median(at_big.flow[interior][:, axis]) == pytest.approx(
            np.median(at_small.flow[interior][:, axis]), abs=0.15
        )
    # F saw the big pair area-resized back to its input: nearly the small pair, so nearly its Conv6
    assert np.corrcoef(at_big.conv6.ravel(), at_small.conv6.ravel())[0, 1] > 0.95
    with pytest.raises(ValueError, match=str(big_side)):
        wide.flow(small)


def test_everything_but_flow_is_the_wrapped_networks(inner: Networks) -> None:
    dis = DisFlowNetworks(inner, conv6=False)
    assert dis.backend == "torch+dis" and dis.inner is inner
    assert dis.segmentation_config == inner.segmentation_config
    assert dis.flow_config == inner.flow_config
    assert (dis.has_policy, dis.has_dvsnet) == (inner.has_policy, inner.has_dvsnet)
    assert dis.device == inner.device  # backend extras pass through
    size = inner.segmentation_config.input_size
    images = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    with one_torch_thread():
        features = inner.features(images)
        np.testing.assert_array_equal(dis.features(images), features)
        np.testing.assert_array_equal(dis.task(features), inner.task(features))
        flow = dis.flow(_pair(inner))
        warped = dis.warp(features, flow.flow, flow.scale)
        np.testing.assert_array_equal(warped, inner.warp(features, flow.flow, flow.scale))
        conv6 = inner.flow(_pair(inner)).conv6
        expert = np.array([[0.1, 0.2]], np.float32)
        np.testing.assert_array_equal(
            dis.key_probability(conv6, expert), inner.key_probability(conv6, expert)
        )
        np.testing.assert_array_equal(dis.dvsnet_score(conv6), inner.dvsnet_score(conv6))


def test_with_flow_chooses_or_rejects(inner: Networks, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert FLOWS == ("flownet", "dis") and DEFAULT_FLOW == "dis"
    assert with_flow(inner, "flownet", conv6=False) is inner
    wrapped = with_flow(inner, "dis", conv6=True)
    assert isinstance(wrapped, DisFlowNetworks) and wrapped.conv6 and wrapped.inner is inner
    assert not with_flow(inner, "dis", conv6=False).conv6
    for bad in ("raft", "DIS", ""):
        with pytest.raises(ValueError, match="flownet, dis") as error:
            with_flow(inner, bad, conv6=True)
        assert repr(bad) in str(error.value)
    with pytest.raises(ValueError, match="unknown flow 'farneback'; choose one of flownet, dis"):
        create_networks(random_weights(tmp_path_factory), "torch", flow="farneback")


def _dis_segment(videos_dir: Path, factory: pytest.TempPathFactory, **changes: Any) -> SegmentOptions:
    """``facestream segment lp_d3.mp4 --flow dis --backend torch`` on random weights, one thread."""
    return SegmentOptions(
        **{
            "source": str(videos_dir / "lp_d3.mp4"),
            "backend": "torch",
            "weights": str(random_weights(factory).directory),
            "threads": 1,
            "progress": False,
            "flow": "dis",
            **changes,
        }
    )


@pytest.mark.parametrize(("scheduler", "conv6"), [("fixed", False), ("flow", False), ("rl", True)])
def test_segment_runs_f_for_conv6_only_for_schedulers_that_read_it(
    scheduler: str,
    conv6: bool,
    videos_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[dict] = []

    def spy(*args, **kwargs) -> Networks:
        asked.append(kwargs)
        return create_networks(*args, **kwargs)

    monkeypatch.setattr(segment_module, "create_networks", spy)
    options = _dis_segment(videos_dir, tmp_path_factory, scheduler=scheduler, max_frames=3)
    with one_torch_thread():
        report = run_segment(options)
    assert [(a["flow"], a["conv6"]) for a in asked] == [("dis", conv6)]
    assert report["flow"] == "dis" and report["backend"] == "torch+dis" and report["frames"] == 3


def test_cli_segment_with_dis_flow(videos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    weights = random_weights(tmp_path_factory, input_size=128).directory
    tmp = tmp_path_factory.mktemp("dis-cli")
    env = dict(os.environ, FACESTREAM_CACHE=str(tmp / "cache"))
    env.pop("FACESTREAM_WEIGHTS", None)
    script = Path(sys.executable).with_name("facestream")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "facestream"]
    frames = 6
    result = subprocess.run(
        [
            *command, "segment", str(videos_dir / "lp_d3.mp4"), "--weights", str(weights),
            "--backend", "torch", "--flow", "dis", "--scheduler", "fixed", "--interval", "3",
            "--masks", str(tmp / "masks"), "--report", str(tmp / "report.json"),
            "--max-frames", str(frames), "--threads", "1", "--no-progress",
        ],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "backend torch+dis" in result.stdout
    report = json.loads((tmp / "report.json").read_text())
    assert report["flow"] == "dis" and report["backend"] == "torch+dis"
    assert report["frames"] == frames and report["keys"] == 2  # frames 0 and 3
    assert report["stages_ms"]["flow"]["count"] == frames - 2  # DIS on every non-key frame
    assert len(list((tmp / "masks").glob("*.png"))) == frames


def test_segment_dis_size_reaches_the_flow(
    videos_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``dis_size`` (``--dis-size``, ``FACESTREAM_DIS_SIZE``): DIS sees crops of that side."""
    options = _dis_segment(videos_dir, tmp_path_factory, scheduler="fixed", knob=3, max_frames=4, dis_size=48)
    with one_torch_thread():
        report = run_segment(options)
    assert report["backend"] == "torch+dis48" and report["frames"] == 4


def test_grey_is_opencvs_grey_of_the_rounded_rgb_image() -> None:
    rgb = np.random.default_rng(0).random((3, 41, 67)).astype(np.float32)
    image = np.clip(rgb.transpose(1, 2, 0) * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    assert np.array_equal(_grey(rgb), cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
