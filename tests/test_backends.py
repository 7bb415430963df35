"""Backends and weights: ONNX Runtime vs PyTorch parity on every exported graph, the ONNX cache,
backend selection and the weights folder's error messages.

Random weights at a 64 x 64 segmentation input (16 x 16 feature grid, 64 x 64 flow input) keep
every test fast on a 2-core CPU; the ONNX cache lives in a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    ALL_GRAPHS,
    SIZE,
    build_networks,
    networks,
    one_torch_thread,
    onnx_cache_dir,
    random_weights,
)
from safetensors import safe_open
from safetensors.torch import save_file

from facestream.engines.backends import BACKENDS, create_networks
from facestream.engines.export import EXPORT_FORMAT, OPSET, cached_export
from facestream.engines.networks import Networks
from facestream.engines.weights import (
    FILES,
    WeightsError,
    build_network,
    find_weights,
    load_network,
    save_network,
    write_random_weights,
)
from facestream.models.config import (
    DVSNetConfig,
    FlowConfig,
    PolicyConfig,
    SegmentationConfig,
)

ATOL = 1e-3  # the acceptance bound on ORT vs torch outputs
ARGMAX_AGREEMENT = 0.999
BATCH = 2  # > 1 on every graph: the batch axis must be dynamic (exported with batch 1)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """One torch thread in this module (the 2 cores are shared); restored afterwards."""
    with one_torch_thread():
        yield


def assert_close(torch_out: np.ndarray, ort_out: np.ndarray, what: str) -> None:
    """Same shape, max abs diff <= ATOL and, because random weights give small outputs, also
    within ATOL of the output's own magnitude."""
    assert ort_out.shape == torch_out.shape, what
    assert ort_out.dtype == np.float32, what
    diff = float(np.abs(torch_out.astype(np.float64) - ort_out).max())
    magnitude = float(np.abs(torch_out).max())
    assert diff <= ATOL, f"{what}: max abs diff {diff:.3g}"
    assert diff <= ATOL * max(magnitude, 1e-6), f"{what}: diff {diff:.3g} vs magnitude {magnitude:.3g}"


def assert_same_argmax(torch_scores: np.ndarray, ort_scores: np.ndarray, what: str) -> None:
    """(B, K, h, w) class scores: the per-pixel argmax agrees on >= 99.9% of the pixels."""
    agreement = float((torch_scores.argmax(axis=1) == ort_scores.argmax(axis=1)).mean())
    assert agreement >= ARGMAX_AGREEMENT, f"{what}: argmax agrees on {agreement:.4%} of pixels"


@pytest.fixture(scope="module", params=["scores", "decoder"])
def backends(request, tmp_path_factory) -> tuple[Networks, Networks]:
    """(torch, onnxruntime) networks of the same random weights, for both split points."""
    split = request.param
    return (
        networks(tmp_path_factory, "torch", split=split),
        networks(tmp_path_factory, "onnxruntime", split=split),
    )


def rand(*shape: int, low: float = 0.0, high: float = 1.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# --------------------------------------------------------------------------- parity


def test_backend_names(backends) -> None:
    torch_nets, ort_nets = backends
    assert (torch_nets.backend, ort_nets.backend) == ("torch", "onnxruntime")
    assert torch_nets.segmentation_config == ort_nets.segmentation_config
    assert torch_nets.flow_config == ort_nets.flow_config
    assert torch_nets.has_policy and ort_nets.has_policy
    assert torch_nets.has_dvsnet and ort_nets.has_dvsnet
    assert sorted(ort_nets.sessions) == ALL_GRAPHS


def test_segmentation_parity(backends) -> None:
    """segmentation_features (and segmentation_task for the decoder split) at batch 2."""
    torch_nets, ort_nets = backends
    seg = torch_nets.segmentation_config
    images = rand(BATCH, 3, SIZE, SIZE)
    features_t, features_o = torch_nets.features(images), ort_nets.features(images)
    grid = SIZE // 4
    assert features_t.shape == (BATCH, seg.feature_channels, grid, grid)
    assert_close(features_t, features_o, "segmentation_features")

    scores_t, scores_o = torch_nets.task(features_t), ort_nets.task(features_t)
    assert scores_t.shape == (BATCH, seg.num_classes, grid, grid)
    assert_close(scores_t, scores_o, "segmentation_task")
    assert_same_argmax(scores_t, scores_o, "N_task(N_feat) on the same features")
    # End to end: each backend on its own features.
    assert_same_argmax(scores_t, ort_nets.task(features_o), "N_task(N_feat) end to end")
    if seg.split == "scores":
        assert scores_t is features_t  # N_task is the identity for the paper's split


def test_flow_parity(backends) -> None:
    torch_nets, ort_nets = backends
    flow_cfg = torch_nets.flow_config
    pairs = rand(BATCH, 6, flow_cfg.input_size, flow_cfg.input_size, seed=1)
    out_t, out_o = torch_nets.flow(pairs), ort_nets.flow(pairs)
    grid = flow_cfg.warp_size
    assert out_t.flow.shape == (BATCH, 2, grid, grid)
    assert out_t.scale.shape == (BATCH, flow_cfg.scale_channels, grid, grid)
    assert out_t.conv6.shape == (BATCH, flow_cfg.conv6_channels, flow_cfg.conv6_size, flow_cfg.conv6_size)
    for name in ("flow", "scale", "conv6"):
        assert_close(getattr(out_t, name), getattr(out_o, name), f"flow.{name}")
    # F's encoder alone (what rl/dvsnet read beside DIS): the same Conv6 on both backends
    assert_close(out_t.conv6, torch_nets.conv6_features(pairs), "conv6_features (torch)")
    assert_close(out_t.conv6, ort_nets.conv6_features(pairs), "flow_conv6 (ORT)")


def test_warp_parity(backends) -> None:
    torch_nets, ort_nets = backends
    seg, flow_cfg = torch_nets.segmentation_config, torch_nets.flow_config
    grid = seg.feature_size
    features = rand(BATCH, seg.feature_channels, grid, grid, low=-2, high=2, seed=2)
    flow = rand(BATCH, 2, grid, grid, low=-3, high=3, seed=3)  # some samples leave the grid
    scale = rand(BATCH, flow_cfg.scale_channels, grid, grid, low=0.5, high=1.5, seed=4)
    warped_t = torch_nets.warp(features, flow, scale)
    assert warped_t.shape == features.shape
    assert_close(warped_t, ort_nets.warp(features, flow, scale), "warp")
    scores_t = torch_nets.task(warped_t)
    assert_same_argmax(scores_t, ort_nets.task(ort_nets.warp(features, flow, scale)), "warped scores")


def test_policy_and_dvsnet_parity(backends) -> None:
    torch_nets, ort_nets = backends
    flow_cfg = torch_nets.flow_config
    conv6 = rand(BATCH, flow_cfg.conv6_channels, flow_cfg.conv6_size, flow_cfg.conv6_size, seed=5)
    expert = np.array([[0.1, 0.5], [0.9, 1.0]], np.float32)
    prob_t = torch_nets.key_probability(conv6, expert)
    assert prob_t.shape == (BATCH,)
    assert np.all((prob_t >= 0) & (prob_t <= 1))
    assert_close(prob_t, ort_nets.key_probability(conv6, expert), "policy")
    score_t = torch_nets.dvsnet_score(conv6)
    assert score_t.shape == (BATCH,)
    assert_close(score_t, ort_nets.dvsnet_score(conv6), "dvsnet")


def test_batch_rows_match_single_runs(backends) -> None:
    """The dynamic batch axis: row i of a batch-2 run equals a batch-1 run on row i."""
    _, ort_nets = backends
    images = rand(BATCH, 3, SIZE, SIZE, seed=6)
    batched = ort_nets.features(images)
    for row in range(BATCH):
        np.testing.assert_allclose(
            batched[row : row + 1], ort_nets.features(images[row : row + 1]), atol=1e-5
        )
    size = ort_nets.flow_config.input_size
    pairs = rand(BATCH, 6, size, size, seed=7)
    batched_flow = ort_nets.flow(pairs)
    single_flow = ort_nets.flow(pairs[1:])
    np.testing.assert_allclose(batched_flow.flow[1:], single_flow.flow, atol=1e-4)


def test_resnet50_parity(tmp_path_factory) -> None:
    """The paper's backbone once, at a tiny input, with both split graphs (decoder split)."""
    torch_nets = networks(tmp_path_factory, "torch", backbone="resnet50", split="decoder")
    ort_nets = networks(tmp_path_factory, "onnxruntime", backbone="resnet50", split="decoder")
    images = rand(BATCH, 3, SIZE, SIZE, seed=8)
    features_t, features_o = torch_nets.features(images), ort_nets.features(images)
    assert features_t.shape == (BATCH, 256, SIZE // 4, SIZE // 4)
    assert_close(features_t, features_o, "resnet50 segmentation_features")
    scores_t, scores_o = torch_nets.task(features_t), ort_nets.task(features_o)
    assert_close(scores_t, scores_o, "resnet50 segmentation_task")
    assert_same_argmax(scores_t, scores_o, "resnet50 scores")


# --------------------------------------------------------------------------- export and cache


def graph_mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


def test_export_manifest_and_cache_lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One weight set through the cache's life (each export costs ~1.5 s here):

    export + manifest with the weights' SHA-256 -> reuse (no re-export) -> stale manifest in the
    same folder -> re-export -> new weights -> a new folder, the old one left alone."""
    monkeypatch.setenv("FACESTREAM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "weights"
    weights = write_random_weights(folder, SegmentationConfig(input_size=SIZE), seed=1)

    first = cached_export(weights)
    assert sorted(first) == ALL_GRAPHS
    directory = first["flow"].parent
    assert directory == tmp_path / "cache" / "onnx" / weights.fingerprint()
    assert all(path.is_file() and path.stat().st_size > 0 for path in first.values())
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == EXPORT_FORMAT
    assert manifest["opset"] == OPSET
    assert manifest["graphs"] == ALL_GRAPHS
    sha256 = {name: hashlib.sha256((folder / f).read_bytes()).hexdigest() for name, f in FILES.items()}
    assert manifest["weights"] == sha256

    # Second call: the cache is reused, nothing is rewritten.
    before = graph_mtimes(directory)
    assert cached_export(find_weights(folder)) == first
    assert graph_mtimes(directory) == before, "the second call re-exported"

    # A manifest that does not match the weights (as if a graph were stale): re-export.
    manifest["weights"]["flow"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    before = graph_mtimes(directory)
    assert cached_export(weights) == first
    after = graph_mtimes(directory)
    assert all(after[f"{name}.onnx"] > before[f"{name}.onnx"] for name in ALL_GRAPHS)
    assert json.loads(manifest_path.read_text())["weights"] == sha256

    # New policy weights: a new fingerprint and a fresh export; the old export is left alone.
    before = graph_mtimes(directory)
    old_policy = weights.load("policy").config
    torch.manual_seed(123)
    save_network(build_network(old_policy), folder / FILES["policy"])
    changed = find_weights(folder)
    assert changed.hashes()["policy"] != sha256["policy"]
    third = cached_export(changed)
    assert third["flow"].parent == tmp_path / "cache" / "onnx" / changed.fingerprint() != directory
    assert json.loads((third["flow"].parent / "manifest.json").read_text())["weights"] == changed.hashes()
    assert graph_mtimes(directory) == before


def test_ort_backend_exports_into_facestream_cache(tmp_path_factory) -> None:
    """The shared ORT networks were built with $FACESTREAM_CACHE set to a temporary folder."""
    weights = random_weights(tmp_path_factory)
    ort_nets = networks(tmp_path_factory, "onnxruntime")
    cache = onnx_cache_dir(tmp_path_factory) / "onnx" / weights.fingerprint()
    assert (cache / "manifest.json").is_file()
    assert sorted(ort_nets.sessions) == ALL_GRAPHS
    assert all((cache / f"{graph}.onnx").is_file() for graph in ALL_GRAPHS)


def test_cached_export_reexports_a_missing_graph(
    tmp_path_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = random_weights(tmp_path_factory)
    networks(tmp_path_factory, "onnxruntime")  # makes sure the shared export exists
    shared = onnx_cache_dir(tmp_path_factory) / "onnx" / weights.fingerprint()
    copy = tmp_path / "onnx" / weights.fingerprint()
    shutil.copytree(shared, copy)
    (copy / "flow.onnx").unlink()
    monkeypatch.setenv("FACESTREAM_CACHE", str(tmp_path))
    paths = cached_export(weights)
    assert all(path.is_file() for path in paths.values())


# --------------------------------------------------------------------------- backends and weights


def test_create_networks_unknown_backend_names_the_choices(tmp_path_factory) -> None:
    weights = random_weights(tmp_path_factory)
    with pytest.raises(ValueError, match=r"unknown backend 'tensorflow'; choose one of onnxruntime, torch"):
        create_networks(weights, "tensorflow")
    assert BACKENDS[:2] == ("onnxruntime", "torch")


@pytest.mark.parametrize("make", ["empty", "missing", "flow-only"])
def test_find_weights_without_weights_names_the_fix(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "weights"
    if make != "missing":
        folder.mkdir()
    if make == "flow-only":
        save_network(build_network(FlowConfig(input_size=64, warp_size=16)), folder / FILES["flow"])
    with pytest.raises(WeightsError) as info:
        find_weights(folder)
    message = str(info.value)
    assert str(folder) in message
    assert "--weights" in message
    assert "facestream train" in message
    if make != "missing":
        assert "segmentation.safetensors" in message


def test_find_weights_uses_environment_variable(tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = random_weights(tmp_path_factory)
    monkeypatch.setenv("FACESTREAM_WEIGHTS", str(weights.directory))
    assert find_weights().paths == weights.paths


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors_raises_weights_error(tmp_path_factory, tmp_path: Path, damage: str) -> None:
    source = random_weights(tmp_path_factory)
    for name in ("segmentation", "flow"):
        (tmp_path / FILES[name]).write_bytes(source.paths[name].read_bytes())
    target = tmp_path / FILES["flow"]
    data = target.read_bytes()
    target.write_bytes(
        {"garbage": b"not a safetensors file" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(WeightsError, match="flow.safetensors"):
        find_weights(tmp_path)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_network(target)


def test_safetensors_without_facestream_metadata_raises(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="not a facestream weights file"):
        load_network(path)


def test_weights_not_fitting_their_config_raise(tmp_path: Path) -> None:
    """The tensors of one network under the config of another."""
    path = save_network(build_network(DVSNetConfig(in_channels=8, conv6_size=1)), tmp_path / "a.safetensors")
    other = save_network(
        build_network(DVSNetConfig(in_channels=16, conv6_size=1)), tmp_path / "b.safetensors"
    )
    with safe_open(str(other), framework="pt") as handle:
        metadata = handle.metadata()
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(WeightsError, match="do not fit their network"):
        load_network(path)


@pytest.mark.parametrize(
    "config",
    [
        SegmentationConfig(input_size=SIZE, split="decoder"),
        FlowConfig(input_size=64, warp_size=16),
        PolicyConfig(in_channels=384, conv6_size=1),
        DVSNetConfig(in_channels=384, conv6_size=1),
    ],
    ids=["segmentation", "flow", "policy", "dvsnet"],
)
def test_load_network_round_trip_is_exact(tmp_path: Path, config) -> None:
    module = build_network(config).eval()
    path = save_network(module, tmp_path / "net.safetensors", card={"trained": False})
    loaded = load_network(path)
    assert loaded.config == config
    assert not loaded.training
    original, restored = module.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    inputs = {
        SegmentationConfig: lambda: (torch.rand(2, 3, SIZE, SIZE),),
        FlowConfig: lambda: (torch.rand(2, 6, 64, 64),),
        PolicyConfig: lambda: (torch.rand(2, 384, 1, 1), torch.rand(2, 2)),
        DVSNetConfig: lambda: (torch.rand(2, 384, 1, 1),),
    }[type(config)]()
    with torch.inference_mode():
        expected, actual = module(*inputs), loaded(*inputs)
    for a, b in zip(
        expected if isinstance(expected, tuple) else (expected,),
        actual if isinstance(actual, tuple) else (actual,),
        strict=True,
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_missing_policy_and_dvsnet_raise_clear_errors(tmp_path_factory, backend: str) -> None:
    weights = random_weights(tmp_path_factory, without=("policy", "dvsnet"))
    assert not weights.has("policy") and not weights.has("dvsnet")
    nets = build_networks(tmp_path_factory, weights, backend)
    assert not nets.has_policy and not nets.has_dvsnet
    flow_cfg = nets.flow_config
    conv6 = np.zeros((1, flow_cfg.conv6_channels, flow_cfg.conv6_size, flow_cfg.conv6_size), np.float32)
    with pytest.raises(RuntimeError, match=r"no policy network \(policy\.safetensors\)"):
        nets.key_probability(conv6, np.zeros((1, 2), np.float32))
    with pytest.raises(RuntimeError, match=r"no dvsnet network \(dvsnet\.safetensors\)"):
        nets.dvsnet_score(conv6)
    with pytest.raises(WeightsError, match="no policy.safetensors in .*facestream train"):
        weights.load("policy")
    # The required networks still work.
    assert nets.features(np.zeros((1, 3, SIZE, SIZE), np.float32)).shape[0] == 1
