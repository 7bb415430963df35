"""Smoke test of the speed benchmark (facestream.engines.bench) with tiny settings on a real clip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facestream.engines.bench import DYNAMIC, KEY_ABOVE, _threshold, format_tables, run_benchmark

CLIP = "lp_d18.mp4"  # 480x480, 30 fps, 216 frames, one face
FRAMES = 12
AKIS = (1, 12)  # divisors of FRAMES, so that fixed intervals give exactly these AKIs


@pytest.fixture(scope="module")
def result(videos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    clip = videos_dir / CLIP
    if not clip.is_file():
        pytest.skip(f"clip {clip} is missing from the data folder")
    with pytest.MonkeyPatch.context() as monkeypatch:  # ONNX exports into a throw-away cache
        monkeypatch.setenv("FACESTREAM_CACHE", str(tmp_path_factory.mktemp("cache")))
        return run_benchmark(
            clip=clip,
            out_dir=tmp_path_factory.mktemp("bench"),
            sizes=(128,),
            backends=("torch", "onnxruntime"),
            repeats=2,
            pipeline_frames=FRAMES,
            key_backbone="mobilenet_v2",
            pipeline_size=128,
            akis=AKIS,
            progress=False,
        )


@pytest.fixture(scope="module")
def written(result: dict) -> dict:
    """bench.json as written to disk."""
    return json.loads(Path(result["files"]["json"]).read_text())


def test_writes_json_and_png(result: dict, written: dict) -> None:
    assert Path(result["files"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = {"machine", "settings", "clip", "io", "stages", "nonkey", "pipeline", "targets"}
    assert expected <= written.keys()
    assert written["machine"]["threads"] == 2
    assert written["machine"]["cpu"] and written["machine"]["onnxruntime"] and written["machine"]["torch"]
    assert written["clip"]["frames"] == FRAMES


def test_stage_costs_are_positive(written: dict) -> None:
    rows = {(r["backend"], r["stage"], r["backbone"]) for r in written["stages"]}
    for backend in ("torch", "onnxruntime"):
        assert {(backend, "key", "mobilenet_v2"), (backend, "key", "resnet50")} <= rows
        assert {(backend, stage, None) for stage in ("flow", "warp", "correct", "policy", "dvsnet")} <= rows
    # onnxruntime times its default int8 corrector and the float32 one it replaces; torch has one
    assert ("onnxruntime", "correct_fp32", None) in rows and ("torch", "correct_fp32", None) not in rows
    timed = [*written["stages"], *written["nonkey"], *written["io"].values()]
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in timed)
    assert {r["backend"] for r in written["nonkey"]} == {"torch", "onnxruntime"}


def test_pipeline_fps_and_aki(written: dict) -> None:
    pipeline = written["pipeline"]
    runs = {(r["scheduler"], r["target_aki"]): r for r in pipeline["runs"]}
    assert runs["always", 1]["achieved_aki"] == 1.0 and runs["always", 1]["speedup"] == 1.0
    for name in ("fixed", "random", "flow", "dvsnet", "rl"):
        for aki in AKIS:
            run = runs[name, aki]
            assert run["fps"] > 0 and run["speedup"] > 0 and run["frames"] == FRAMES
    for aki in AKIS:
        assert runs["fixed", aki]["achieved_aki"] == aki


def test_format_tables(result: dict) -> None:
    text = format_tables(result)
    assert "| N_feat ResNet-50 |" in text and "| fixed |" in text
    assert "target AKI 12" in text


@pytest.mark.parametrize("name", DYNAMIC)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_threshold_keys_the_wanted_share(name: str, rate: float) -> None:
    values = np.random.default_rng(0).uniform(0.2, 0.8, size=50)  # inside every knob's range
    knob = _threshold(values, rate, name)
    keys = (values > knob) if KEY_ABOVE[name] else (values < knob)
    assert keys.sum() == round(rate * values.size)
