"""An int8 warp corrector for ONNX Runtime on the CPU (static quantisation, shipped calibration).

The corrector runs on every non-key frame, so its cost is paid 29 times out of 30. Its
convolutions quantise well: ONNX Runtime's static QDQ quantisation (int8 weights per output
channel, uint8 activations) of the Conv nodes alone -- the flow warp, the softmax, the eye guard
and the final residual add stay float32 -- runs in about 70 % of the float32 graph's time on
2 cores and scored the same on set B's validation pairs (README, "int8 corrector").

Static quantisation needs the range of every activation it quantises. Those ranges are measured
once, offline, on training pairs (``facestream train calibrate``), and shipped next to the weights
as ``correction-int8.json``: the graph's tensor names with their (lowest, highest) values and the
sha256 of the ``correction.safetensors`` they were measured with. At run time the int8 graph is
made from the float32 export and that file, once, into the ONNX cache.

Precision (``--correct-precision``): ``auto`` takes int8 where a calibration that fits the
weights is present and this ONNX Runtime can apply it, else float32; ``int8`` requires it;
``fp32`` never uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from facestream.engines.weights import WeightSet, file_sha256

LOG = logging.getLogger(__name__)

CALIBRATION_FILE = "correction-int8.json"
CALIBRATION_FORMAT = "facestream-int8-calibration-1"
PRECISIONS = ("auto", "int8", "fp32")
QUANTIZED_OPS = ("Conv",)
GRAPH_VERSION = "2"  # of the int8 graph made from a calibration (2: biases kept as initializers)


class Int8Unavailable(RuntimeError):
    """int8 was asked for but cannot run: no calibration, a stale one, or an old ONNX Runtime."""


def add_precision_argument(parser: Any) -> None:
    """``--correct-precision``: the corrector's arithmetic on the onnxruntime CPU backend."""
    parser.add_argument(
        "--correct-precision",
        choices=PRECISIONS,
        default="auto",
        help="the warp corrector on the onnxruntime CPU backend: int8 (statically quantised with "
        f"the shipped {CALIBRATION_FILE}), fp32, or auto (int8 where a calibration fitting the "
        "weights is present; default)",
    )


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown corrector precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def _checked_calibration(weights: WeightSet) -> tuple[dict[str, Any] | None, str | None]:
    """(the calibration file's content, None) where the int8 corrector can run, else (None, why)."""
    if not weights.has("correction"):
        return None, f"no correction.safetensors in {weights.directory}"
    path = weights.directory / CALIBRATION_FILE
    if not path.is_file():
        return None, f"no {CALIBRATION_FILE} in {weights.directory} (make one: facestream train calibrate)"
    try:
        calibration = read_calibration(path)
    except ValueError as exc:
        return None, str(exc)
    if calibration["weights_sha256"] != file_sha256(weights.paths["correction"]):
        return None, (
            f"{path} was measured for another correction.safetensors (sha256 differs): "
            "run facestream train calibrate again"
        )
    if "calibration_cache_path" not in inspect.signature(_quantize_static()).parameters:
        import onnxruntime

        return None, (
            f"onnxruntime {onnxruntime.__version__} cannot quantise from stored ranges "
            "(quantize_static has no calibration_cache_path; 1.32 has)"
        )
    return calibration, None


def read_calibration(path: str | Path) -> dict[str, Any]:
    """The calibration file's content, checked; ValueError (naming the file) when unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read int8 calibration {path}: {exc}") from exc
    ranges = data.get("ranges") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT or not isinstance(ranges, dict):
        raise ValueError(f"{path} is not a facestream int8 calibration ({CALIBRATION_FORMAT})")
    for name, pair in ranges.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)):
            raise ValueError(f"{path}: range of {name!r} is not [lowest, highest]")
        if not pair[0] <= pair[1]:
            raise ValueError(f"{path}: range of {name!r} has lowest > highest")
    if not isinstance(data.get("weights_sha256"), str):
        raise ValueError(f"{path} does not say which correction.safetensors it was measured with")
    return data


def write_calibration(
    path: str | Path, ranges: Mapping[str, tuple[float, float]], weights_sha256: str, card: Mapping[str, Any]
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": CALIBRATION_FORMAT,
        "weights_sha256": weights_sha256,
        "ops": list(QUANTIZED_OPS),
        "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in sorted(ranges.items())},
        "card": dict(card),
    }
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def measure_ranges(
    graph: str | Path, feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, tuple[float, float]]:
    """(lowest, highest) of every input and output of the graph's Conv nodes over ``feeds``
    (ONNX Runtime's min-max calibrator)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {k: np.ascontiguousarray(v, np.float32) for k, v in item.items()}

    with tempfile.TemporaryDirectory(prefix="facestream-calib") as tmp:
        graph = constants_as_initializers(graph, Path(tmp) / "graph.onnx")
        calibrator = create_calibrator(
            Path(graph),
            list(QUANTIZED_OPS),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
        )
        calibrator.collect_data(Reader())
        data = calibrator.compute_data()
    ranges = {}
    for name, tensor in data.data.items():
        lo, hi = tensor.range_value
        ranges[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
    if not ranges:
        raise ValueError(f"no Conv activations measured in {graph} (no calibration inputs?)")
    return ranges


def quantize(graph: str | Path, ranges: Mapping[str, tuple[float, float]], out: str | Path) -> Path:
    """The int8 QDQ graph of ``graph`` with the stored activation ``ranges`` (no data needed)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorData,
        TensorsData,
        save_tensors_data,
    )

    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".int8") as tmp:
        plain = constants_as_initializers(graph, Path(tmp) / "graph.onnx")
        names = _conv_tensors(onnx.load(str(plain)))
        missing = sorted(names - set(ranges))
        if missing:
            raise Int8Unavailable(
                f"the int8 calibration does not fit this corrector graph ({len(missing)} of its Conv "
                f"tensors have no range, e.g. {missing[0]!r}): run facestream train calibrate again"
            )
        stored = {
            n: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for n, (lo, hi) in ranges.items()
        }
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, {n: stored[n] for n in names}), cache)
        partial = Path(tmp) / out.name
        with _quiet_root_log():
            _quantize_static()(
                str(plain),
                str(partial),
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(cache),
            )
        os.replace(partial, out)  # atomic: processes sharing the cache never see half a graph
    return out


def int8_correction_graph(
    weights: WeightSet, graph: str | Path, calibration: dict[str, Any] | None = None
) -> Path:
    """The int8 corrector of ``weights`` next to its float32 export ``graph`` (made once).
    ``calibration``: the one ``plan_precision`` returned for these weights (read and checked
    there); None reads and checks the file here."""
    if calibration is None:
        calibration, problem = _checked_calibration(weights)
        if calibration is None:
            raise Int8Unavailable(problem or "no int8 calibration")
    stored = json.dumps(calibration, sort_keys=True).encode()  # the file's content, read once
    digest = hashlib.sha256(GRAPH_VERSION.encode() + stored + Path(graph).read_bytes()).hexdigest()[:12]
    out = Path(graph).with_name(f"correction_int8-{digest}.onnx")
    if not out.is_file():
        quantize(graph, {k: (v[0], v[1]) for k, v in calibration["ranges"].items()}, out)
    return out


def write_timing_calibration(weights: WeightSet, graph: str | Path, *, seed: int = 0) -> Path:
    """A calibration of ``weights``' corrector on random inputs -- for speed benchmarks of random
    weights only (int8 arithmetic costs the same whatever the ranges; its accuracy would not)."""
    import onnx

    rng = np.random.default_rng(seed)
    model = onnx.load(str(graph))
    shapes = {i.name: [d.dim_value or 1 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    feeds = [
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        for _ in range(2)
    ]
    ranges = measure_ranges(graph, feeds)
    card = {"trained": False, "note": "random inputs: for speed benchmarks only"}
    return write_calibration(
        weights.directory / CALIBRATION_FILE, ranges, file_sha256(weights.paths["correction"]), card
    )


def build_precision(precision: str, correct: bool) -> str:
    """The corrector precision to build networks with: ``fp32`` where frames skip the corrector
    (no int8 graph to make or check)."""
    return precision if correct else "fp32"


def plan_precision(
    precision: str, weights: WeightSet, *, cpu: bool = True
) -> tuple[str, dict[str, Any] | None]:
    """The corrector's precision: (``int8``, the checked calibration) or (``fp32``, None);
    Int8Unavailable where int8 is asked for and cannot run. The calibration file is read once,
    here, and handed on to ``int8_correction_graph``."""
    check_precision(precision)
    if precision == "fp32" or not weights.has("correction"):
        return "fp32", None
    if cpu:
        calibration, problem = _checked_calibration(weights)
    else:
        calibration, problem = None, "int8 runs on the onnxruntime CPU backend only"
    if calibration is not None:
        return "int8", calibration
    if precision == "int8":
        raise Int8Unavailable(f"int8 corrector: {problem}")
    LOG.info("corrector in float32: %s", problem)
    return "fp32", None


def constants_as_initializers(graph: str | Path, out: str | Path) -> Path:
    """``graph`` with every Constant node, and every Identity of an initializer, made an
    initializer of the same name (nothing else renamed). The exporter writes equal Conv biases
    (say, all-zero ones) once and feeds the others through Identity nodes; the quantiser would
    take those for activations, give them a zero range and leave their Convs unfused (slower
    than float32)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    values = {t.name: t for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        tensor = None
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            tensor = numpy_helper.from_array(numpy_helper.to_array(values[node.input[0]]))
        if tensor is None:
            kept.append(node)
            continue
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        values[tensor.name] = tensor
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.save(model, str(out))
    return Path(out)


def _conv_tensors(model: Any) -> set[str]:
    initializers = {t.name for t in model.graph.initializer}
    return {
        name
        for node in model.graph.node
        if node.op_type in QUANTIZED_OPS
        for name in (*node.input, *node.output)
        if name and name not in initializers
    }


@contextlib.contextmanager
def _quiet_root_log() -> Iterator[None]:
    """ONNX Runtime's quantisation tools advise on the root logger ("consider pre-processing"):
    the graph needs no pre-processing here, so that advice is not shown to users."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize_static() -> Any:
    from onnxruntime.quantization import quantize_static

    return quantize_static
