"""The int8 warp corrector: calibration, quantisation, precision choice, the shipped calibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import THREADS, FakeClip, clip_frames, networks, one_torch_thread, random_weights

from facestream.cli import main
from facestream.engines.backends import create_networks
from facestream.engines.export import cached_export
from facestream.engines.int8 import (
    CALIBRATION_FILE,
    Int8Unavailable,
    int8_correction_graph,
    measure_ranges,
    plan_precision,
    quantize,
    read_calibration,
    write_calibration,
)
from facestream.engines.weights import DEFAULT_DIR, file_sha256, find_weights
from facestream.service.engine import ServiceEngine
from facestream.service.settings import ServiceSettings
from facestream.training.calibrate import calibrate_correction, pair_feeds
from facestream.training.train_correction import make_correction_pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, videos_dir: Path):
    """Real-frame correction pairs made with the tiny random networks."""
    clip = FakeClip(clip_frames(videos_dir, count=8))
    return make_correction_pairs([clip], networks(tmp_path_factory), per_frame=2, max_gap=3, progress=False)


@pytest.fixture
def weights(tmp_path_factory, tmp_path, monkeypatch):
    """A private copy of the tiny random weights (calibration files are added to it)."""
    monkeypatch.setenv("FACESTREAM_CACHE", str(tmp_path / "onnx"))
    for path in random_weights(tmp_path_factory).paths.values():
        shutil.copy(path, tmp_path / path.name)
    return find_weights(tmp_path)


def _calibrated(weights, pairs) -> Path:
    graph = cached_export(weights)["correction"]
    ranges = measure_ranges(graph, (pair_feeds(pairs, np.asarray([i])) for i in range(len(pairs))))
    return write_calibration(
        weights.directory / CALIBRATION_FILE, ranges, file_sha256(weights.paths["correction"]), {}
    )


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_int8_corrector_follows_the_float32_one(weights, pairs) -> None:
    assert plan_precision("auto", weights)[0] == "fp32"  # no calibration yet
    with pytest.raises(Int8Unavailable, match="facestream train calibrate"):
        plan_precision("int8", weights)
    ranges = read_calibration(_calibrated(weights, pairs))["ranges"]
    assert plan_precision("int8", weights)[0] == "int8" and plan_precision("auto", weights)[0] == "int8"
    # ranges of activations only: the Convs' inputs and outputs, never their (shared, Identity-fed)
    # biases, which would get a zero range and leave their Convs unfused
    exported = onnx.load(str(cached_export(weights)["correction"])).graph
    convs = [n for n in exported.node if n.op_type == "Conv"]
    assert set(ranges) == {n.input[0] for n in convs} | {n.output[0] for n in convs}
    assert all(hi > lo for lo, hi in ranges.values())
    assert plan_precision("fp32", weights)[0] == "fp32"
    assert plan_precision("auto", weights, cpu=False)[0] == "fp32"
    fp32 = create_networks(weights, "onnxruntime", threads=THREADS)
    int8 = create_networks(weights, "onnxruntime", threads=THREADS, correct_precision="auto")
    assert (fp32.correct_precision, int8.correct_precision) == ("fp32", "int8")
    graph = int8_correction_graph(weights, cached_export(weights)["correction"])
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= _op_types(graph)
    # every Conv reads quantised activations and weights; the guard and the final add stay float
    model = onnx.load(str(graph))
    made_by = {out: node.op_type for node in model.graph.node for out in node.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(made_by.get(n.input[0]) == "DequantizeLinear" for n in convs)
    assert "GridSample" in _op_types(graph) and "MaxPool" in _op_types(graph)
    feed = pair_feeds(pairs, np.arange(len(pairs)))
    a = fp32.correct(feed["current"], feed["key"], feed["flow"], feed["scores"])
    b = int8.correct(feed["current"], feed["key"], feed["flow"], feed["scores"])
    residual = np.abs(a - feed["scores"]).max()
    assert residual > 0.05  # the random corrector changes the scores ...
    assert np.abs(a - b).max() < 0.15 * residual  # ... and int8 changes them the same way
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.97


def test_a_stale_or_broken_calibration_is_named_and_auto_falls_back(weights, pairs) -> None:
    path = _calibrated(weights, pairs)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "weights_sha256": "0" * 64}))
    with pytest.raises(Int8Unavailable, match="another correction.safetensors"):
        plan_precision("int8", weights)
    assert plan_precision("auto", weights)[0] == "fp32"
    with pytest.raises(Int8Unavailable, match="another correction.safetensors"):
        create_networks(weights, "onnxruntime", threads=THREADS, correct_precision="int8")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read int8 calibration"):
        read_calibration(path)
    assert plan_precision("auto", weights)[0] == "fp32"
    path.write_text(json.dumps({**data, "ranges": {"x": [2.0, 1.0]}}))
    with pytest.raises(ValueError, match="lowest > highest"):
        read_calibration(path)
    with pytest.raises(Int8Unavailable, match="does not fit this corrector graph"):
        quantize(cached_export(weights)["correction"], {"x": (0.0, 1.0)}, weights.directory / "q.onnx")
    with pytest.raises(Int8Unavailable, match="onnxruntime CPU backend only"):
        create_networks(weights, "torch", threads=THREADS, correct_precision="int8")
    with pytest.raises(ValueError, match="unknown corrector precision"):
        create_networks(weights, "onnxruntime", correct_precision="int4")


def test_calibrate_writes_ranges_and_a_card_that_measures_both(weights, pairs, tmp_path) -> None:
    with one_torch_thread():
        path = calibrate_correction(weights, pairs, pairs, weights.directory, count=4, threads=THREADS)
    data = read_calibration(path)
    assert data["weights_sha256"] == file_sha256(weights.paths["correction"])
    assert data["card"]["calibration_pairs"] == 4 and data["card"]["val_pairs"] == len(pairs)
    assert 0 <= data["card"]["val_int8"]["miou"] <= 1 and data["card"]["ms_int8"] > 0
    card = (weights.directory / "correction-int8.md").read_text()
    assert "| mIoU |" in card and "ms per call" in card
    assert plan_precision("int8", weights)[0] == "int8"
    with pytest.raises(ValueError, match="no calibration pairs"):
        calibrate_correction(weights, pairs.__class__(*(a[:0] for a in vars(pairs).values())), None, tmp_path)


def test_shipped_calibration_fits_the_shipped_corrector(tmp_path_factory, monkeypatch) -> None:
    """The shipped weights run the int8 corrector with no option (``auto``)."""
    shipped = find_weights(DEFAULT_DIR)
    assert (DEFAULT_DIR / CALIBRATION_FILE).is_file() and (DEFAULT_DIR / "correction-int8.md").is_file()
    assert plan_precision("int8", shipped)[0] == "int8"
    card = read_calibration(DEFAULT_DIR / CALIBRATION_FILE)["card"]
    # judged on set B's validation pairs against float32 (engines.int8 module doc, README)
    assert card["val_int8"]["miou"] >= card["val_fp32"]["miou"] - 0.002
    monkeypatch.setenv("FACESTREAM_CACHE", str(tmp_path_factory.mktemp("onnx-shipped")))
    nets = create_networks(shipped, "onnxruntime", threads=THREADS)
    assert nets.correct_precision == "fp32"  # the library default: the trained network as it is
    int8 = create_networks(shipped, "onnxruntime", threads=THREADS, correct_precision="auto")
    assert int8.correct_precision == "int8"
    # the service's default settings run it too, and /readyz says so (ServiceEngine.describe)
    engine = ServiceEngine.load(
        None, "onnxruntime", "dis", THREADS, correct_precision=ServiceSettings().correct_precision
    )
    assert engine.describe()["correction_precision"] == "int8"
    off = ServiceEngine.load(None, "onnxruntime", "dis", THREADS, correct=False)
    assert off.describe()["correction_precision"] is None


def test_auto_runs_float32_when_the_int8_graph_cannot_be_made(weights, pairs, monkeypatch) -> None:
    """A read-only ONNX cache, say: ``auto`` warns and runs float32; ``int8`` says why it failed."""
    _calibrated(weights, pairs)

    def unwritable(*args, **kwargs):
        raise PermissionError("cache is read-only")

    monkeypatch.setattr("facestream.engines.backend_onnxruntime.int8_correction_graph", unwritable)
    assert create_networks(weights, "onnxruntime", correct_precision="auto").correct_precision == "fp32"
    with pytest.raises(PermissionError, match="read-only"):
        create_networks(weights, "onnxruntime", correct_precision="int8")


def test_calibrate_command_needs_a_corrector(tmp_path_factory, tmp_path, capsys) -> None:
    for path in random_weights(tmp_path_factory, without=("correction",)).paths.values():
        shutil.copy(path, tmp_path / path.name)
    assert main(["train", "calibrate", "--weights", str(tmp_path), "--no-progress"]) == 2
    assert "no correction.safetensors in" in capsys.readouterr().err
    assert not (tmp_path / CALIBRATION_FILE).exists()


def test_the_calibration_is_read_once_per_backend_build(weights, pairs, monkeypatch) -> None:
    """Start-up reads and checks the calibration file once (plan_precision hands it on)."""
    _calibrated(weights, pairs)
    reads = []
    real = read_calibration

    def counting(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr("facestream.engines.int8.read_calibration", counting)
    assert create_networks(weights, "onnxruntime", correct_precision="auto").correct_precision == "int8"
    assert len(reads) == 1
