"""``facestream train calibrate``: the activation ranges of the int8 warp corrector.

Measures, with ONNX Runtime's min-max calibrator, the range of every Conv input and output of the
exported float32 corrector on ``count`` random (key, current) pairs of the training set (set A),
then judges the int8 graph made from those ranges against the float32 one on the validation pairs
(set B, as ``facestream train correction`` validates) and times both. Writes
``correction-int8.json`` (see :mod:`facestream.engines.int8`) and its model card
``correction-int8.md`` into the weights folder.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facestream.engines.bench import cpu_model
from facestream.engines.export import cached_export
from facestream.engines.int8 import CALIBRATION_FILE, measure_ranges, quantize, write_calibration
from facestream.engines.weights import WeightSet, file_sha256
from facestream.training.evaluation import NUM_CLASSES
from facestream.training.train_correction import CorrectionPairs, batch_inputs, validate

CLASS_LABELS = ("background", "skin", "eyes", "outer mouth", "inner mouth")


def pair_feeds(data: CorrectionPairs, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The corrector graph's inputs for pairs ``idx`` of ``data``."""
    current, key, flow, scores, _ = batch_inputs(data, idx)
    return {"current": current.numpy(), "key": key.numpy(), "flow": flow.numpy(), "scores": scores.numpy()}


class GraphCorrector:
    """An ONNX corrector graph behind the torch corrector's call (for ``validate``)."""

    def __init__(self, graph: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def eval(self) -> GraphCorrector:
        return self

    def __call__(self, current, key, flow, scores) -> torch.Tensor:
        feed = {"current": current, "key": key, "flow": flow, "scores": scores}
        out = self.session.run(
            None, {k: np.ascontiguousarray(v.numpy(), np.float32) for k, v in feed.items()}
        )
        return torch.from_numpy(out[0])

    def time_ms(self, feed: dict[str, np.ndarray], *, repeats: int = 30) -> float:
        """Median of 7 means over ``repeats`` calls, in ms."""
        self.session.run(None, feed)
        means = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(repeats):
                self.session.run(None, feed)
            means.append((time.perf_counter() - start) / repeats * 1e3)
        return statistics.median(means)


def calibrate_correction(
    weights: WeightSet,
    train: CorrectionPairs,
    val: CorrectionPairs | None,
    out: Path,
    *,
    count: int = 256,
    seed: int = 0,
    threads: int | None = None,
    card: dict[str, Any] | None = None,
) -> Path:
    """Measure the ranges on ``count`` random pairs of ``train``; judge int8 against float32 on
    ``val``; write ``out/correction-int8.json`` and ``.md``. Returns the JSON's path."""
    if len(train) == 0:
        raise ValueError("no calibration pairs")
    graph = cached_export(weights)["correction"]
    chosen = np.random.default_rng(seed).choice(len(train), size=min(count, len(train)), replace=False)

    def feeds() -> Iterator[dict[str, np.ndarray]]:
        for i in chosen:
            yield pair_feeds(train, np.asarray([i]))

    ranges = measure_ranges(graph, feeds())
    info: dict[str, Any] = {
        "network": "int8 activation ranges of the warp corrector (ONNX Runtime static QDQ, Conv nodes)",
        "calibration_pairs": len(chosen),
        "seed": seed,
        "onnx_graph_sha256": file_sha256(graph),
        **(card or {}),
    }
    with tempfile.TemporaryDirectory(prefix="facestream-int8") as tmp:
        int8_graph = quantize(graph, ranges, Path(tmp) / "correction_int8.onnx")
        if val is not None and len(val):
            fp32, int8 = GraphCorrector(graph, threads), GraphCorrector(int8_graph, threads)
            info["val_pairs"] = len(val)
            info["val_fp32"] = _scores(validate(fp32, val))
            info["val_int8"] = _scores(validate(int8, val))
            feed = pair_feeds(val, np.asarray([0]))
            info["ms_fp32"] = round(fp32.time_ms(feed), 2)
            info["ms_int8"] = round(int8.time_ms(feed), 2)
            info["timing"] = f"batch 1, {threads or 'default'} threads, {cpu_model()}"
    path = write_calibration(out / CALIBRATION_FILE, ranges, file_sha256(weights.paths["correction"]), info)
    (out / CALIBRATION_FILE.replace(".json", ".md")).write_text(calibration_card(path, info))
    return path


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    return {"miou": round(result["val_miou_corrected"], 4), "class_iou": result["val_class_iou_corrected"]}


def calibration_card(path: Path, info: dict[str, Any]) -> str:
    written = json.loads(path.read_text())
    lines = [
        f"# {path.name}",
        "",
        f"**What**: {info['network']}  ",
        f"**For**: `correction.safetensors` with sha256 `{written['weights_sha256']}`  ",
        f"**Ranges**: {len(written['ranges'])} tensors, measured on "
        f"{info['calibration_pairs']} random training pairs (seed {info['seed']})",
        "",
        "## Data",
        info.get("data", "—"),
        "",
        "## How it was made",
        "```",
        info.get("command", "facestream train calibrate --weights models/weights"),
        "```",
        "",
    ]
    if "val_fp32" in info:
        fp32, int8 = info["val_fp32"], info["val_int8"]
        lines += [
            "## Measured",
            "",
            f"Validation pairs ({info['val_pairs']}, {info.get('validation', 'set B')}), corrected scores, "
            "same pairs for both graphs:",
            "",
            "| | float32 | int8 |",
            "|---|---:|---:|",
            f"| mIoU | {fp32['miou']:.4f} | {int8['miou']:.4f} |",
        ]
        for c in range(NUM_CLASSES):
            lines.append(
                f"| IoU {CLASS_LABELS[c]} | {fp32['class_iou'][c]:.4f} | {int8['class_iou'][c]:.4f} |"
            )
        lines += [
            f"| ms per call ({info['timing']}) | {info['ms_fp32']:.2f} | {info['ms_int8']:.2f} |",
            "",
        ]
    return "\n".join(lines)
