"""`facestream` as a user runs it: the installed console script, end to end on a real clip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import random_weights

from facestream.engines.video import read_mask

FRAMES = 24


def _facestream() -> list[str]:
    script = Path(sys.executable).with_name("facestream")
    return [str(script)] if script.exists() else [sys.executable, "-m", "facestream"]


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_facestream(), *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    out = dict(os.environ, FACESTREAM_CACHE=str(root / "cache"))
    out.pop("FACESTREAM_WEIGHTS", None)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_weights(tmp_path_factory, input_size=128).directory


def test_segment_writes_overlay_masks_and_report(
    videos_dir: Path, weights: Path, env: dict[str, str], tmp_path: Path
) -> None:
    clip = videos_dir / "lp_d3.mp4"
    result = _run(
        "segment", str(clip), "--weights", str(weights), "--scheduler", "fixed", "--interval", "10",
        "--out", str(tmp_path / "overlay.mp4"), "--masks", str(tmp_path / "masks"),
        "--report", str(tmp_path / "report.json"), "--max-frames", str(FRAMES), "--no-progress",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["frames"] == FRAMES
    assert report["keys"] == 3  # frames 0, 10, 20
    assert report["aki"] == pytest.approx(FRAMES / 3)
    assert report["backend"] == "onnxruntime+dis" and report["flow"] == "dis"  # the default flow
    assert report["input_size"] == 128
    assert set(report["weights"]["sha256"]) == {"segmentation", "flow", "policy", "dvsnet", "correction"}
    assert report["correction"] is True  # the weights have a corrector: it runs by default
    for stage in ("decode", "crop", "flow", "warp", "key", "task", "encode", "total"):
        assert {"mean", "p50", "p99"} <= set(report["stages_ms"][stage]), stage
    masks = sorted((tmp_path / "masks").glob("*.png"))
    assert len(masks) == FRAMES
    mask = read_mask(masks[0])
    assert mask.shape == (512, 512) and mask.max() <= 4
    with av.open(str(tmp_path / "overlay.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (512, 512, 3)
    assert np.ptp(frames[0]) > 0


def test_segment_torch_backend_and_rl(
    videos_dir: Path, weights: Path, env: dict[str, str], tmp_path: Path
) -> None:
    result = _run(
        "segment", str(videos_dir / "lp_d18.mp4"), "--weights", str(weights), "--backend", "torch",
        "--scheduler", "rl", "--tau", "0.5", "--report", str(tmp_path / "r.json"),
        "--max-frames", "8", "--no-progress",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["scheduler"] == {"name": "rl", "knob": "tau", "value": 0.5}
    assert report["backend"] == "torch+dis" and report["frames"] == 8  # DIS warps, F gives Conv6


def test_segment_without_weights_names_the_fix(videos_dir: Path, env: dict[str, str], tmp_path: Path) -> None:
    result = _run("segment", str(videos_dir / "lp_d3.mp4"), "--weights", str(tmp_path / "none"), env=env)
    assert result.returncode == 2
    assert "--weights" in result.stderr and "facestream train" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tau", "0.3"], "--tau applies to the rl scheduler"),
        (["--size", "512"], "--size 512 does not match the weights"),
        (["--scheduler", "always", "--interval", "3"], "--interval applies to the fixed scheduler"),
    ],
)
def test_segment_rejects_bad_options(
    videos_dir: Path, weights: Path, env: dict[str, str], args: list[str], message: str
) -> None:
    result = _run("segment", str(videos_dir / "lp_d3.mp4"), "--weights", str(weights), *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr


def test_segment_missing_input_is_a_clear_error(weights: Path, env: dict[str, str], tmp_path: Path) -> None:
    result = _run("segment", str(tmp_path / "nope.mp4"), "--weights", str(weights), env=env)
    assert result.returncode == 2
    assert "nope.mp4" in result.stderr and "Traceback" not in result.stderr


def test_export_writes_every_graph(weights: Path, env: dict[str, str], tmp_path: Path) -> None:
    result = _run("export", "--weights", str(weights), "--out", str(tmp_path / "onnx"), env=env)
    assert result.returncode == 0, result.stderr
    names = {p.stem for p in (tmp_path / "onnx").glob("*.onnx")}
    assert names == {
        "segmentation_features",
        "segmentation_task",
        "flow",
        "flow_conv6",
        "warp",
        "policy",
        "dvsnet",
        "correction",
    }


def test_help_lists_commands(env: dict[str, str]) -> None:
    result = _run("--help", env=env)
    assert result.returncode == 0
    for command in ("segment", "export", "bench"):
        assert command in result.stdout


def test_console_script_is_installed() -> None:
    assert shutil.which("facestream") or Path(sys.executable).with_name("facestream").exists()
