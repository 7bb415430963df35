"""TensorRT: the engine builder, its cache and errors, the import guards, ``build-engines`` and
``make bench-gpu`` without a GPU, and -- on a GPU with TensorRT -- engine parity with ONNX Runtime.

The CPU tests drive :func:`build_engine` / :func:`build_engines` with a small fake of the
``tensorrt`` module (:class:`FakeTensorRT`) that parses the real exported ONNX graphs' input
shapes and records what the builder was asked for. The ``tensorrt``/``gpu`` tests run the real
thing and are skipped on machines without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import ALL_GRAPHS, SIZE, THREADS, networks, one_torch_thread, onnx_cache_dir, random_weights

from facestream.engines import tensorrt_build
from facestream.engines.backend_tensorrt import TensorRTNetworks
from facestream.engines.backend_torch import TorchNetworks
from facestream.engines.backends import create_networks
from facestream.engines.bench_gpu import main as bench_gpu_main
from facestream.engines.export import cached_export
from facestream.engines.tensorrt_build import (
    ENGINE_FORMAT,
    EngineBuildError,
    EngineKey,
    TensorRTUnavailable,
    build_engine,
    build_engines,
    engine_cache_root,
    export_fp16_onnx,
    has_fast_fp16,
    import_tensorrt,
    onnx_digest,
    parser_errors,
    require_gpu,
    resolve_precision,
    tensorrt_problem,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL = "pip install 'facestream[gpu]'"


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import tensorrt`` fails in this test, whatever is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def onnx_cache(tmp_path_factory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$FACESTREAM_CACHE -> the session's ONNX cache (the exports are shared with other tests)."""
    root = onnx_cache_dir(tmp_path_factory)
    monkeypatch.setenv("FACESTREAM_CACHE", str(root))
    return root


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env.pop("FACESTREAM_WEIGHTS", None)
    return env


# --------------------------------------------------------------------------- import guards


def test_modules_import_without_tensorrt() -> None:
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "import facestream.engines.tensorrt_build, facestream.engines.backend_tensorrt\n"
        "import facestream.engines.backends, facestream.engines.bench_gpu\n"
        "print('imported')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"


def test_using_tensorrt_without_it_names_the_package(no_tensorrt, monkeypatch, tmp_path_factory) -> None:
    with pytest.raises(TensorRTUnavailable) as info:
        import_tensorrt()
    message = str(info.value)
    assert "TensorRT cannot be imported" in message and INSTALL in message and "CUDA GPU" in message
    assert tensorrt_problem() == message
    # a GPU but no TensorRT: the install hint alone
    monkeypatch.setattr(tensorrt_build, "cuda_problem", lambda: None)
    with pytest.raises(TensorRTUnavailable, match=r"pip install 'facestream\[gpu\]'"):
        require_gpu()
    # neither: both reasons
    monkeypatch.setattr(tensorrt_build, "cuda_problem", lambda: "no CUDA device (test)")
    with pytest.raises(TensorRTUnavailable, match=r"gpu\]'.*no CUDA GPU here: no CUDA device \(test\)"):
        require_gpu()
    weights = random_weights(tmp_path_factory)
    with pytest.raises(TensorRTUnavailable, match="TensorRT cannot be imported"):
        TensorRTNetworks(weights)
    with pytest.raises(TensorRTUnavailable, match="TensorRT cannot be imported"):
        build_engines(weights)


def test_tensorrt_without_gpu_says_a_gpu_is_needed(monkeypatch) -> None:
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(tensorrt_build, "cuda_problem", lambda: "no CUDA device (test)")
    with pytest.raises(TensorRTUnavailable, match="need an NVIDIA CUDA GPU: no CUDA device"):
        require_gpu()


def test_unknown_warp_is_rejected_before_anything_else(tmp_path_factory) -> None:
    with pytest.raises(ValueError, match="warp must be one of engine, cuda_warp"):
        TensorRTNetworks(random_weights(tmp_path_factory), warp="opencv")


# --------------------------------------------------------------------------- cache key, precision


def test_engine_key_changes_with_every_field() -> None:
    base = EngineKey("NVIDIA H100", "10.13.0", "a" * 64, "fp16", 8)
    assert base.digest() == EngineKey("NVIDIA H100", "10.13.0", "a" * 64, "fp16", 8).digest()
    assert len(base.digest()) == 16 and int(base.digest(), 16) >= 0
    variants = [
        EngineKey("NVIDIA A100", "10.13.0", "a" * 64, "fp16", 8),
        EngineKey("NVIDIA H100", "11.4.0", "a" * 64, "fp16", 8),
        EngineKey("NVIDIA H100", "10.13.0", "b" * 64, "fp16", 8),
        EngineKey("NVIDIA H100", "10.13.0", "a" * 64, "fp32", 8),
        EngineKey("NVIDIA H100", "10.13.0", "a" * 64, "fp16", 16),
    ]
    digests = {base.digest(), *(key.digest() for key in variants)}
    assert len(digests) == 6


def test_onnx_digest_follows_the_file_contents(tmp_path: Path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"graph a")
    b.write_bytes(b"graph b")
    first = onnx_digest({"flow": a, "warp": b})
    assert first == onnx_digest({"warp": b, "flow": a})
    b.write_bytes(b"graph b, retrained")
    assert onnx_digest({"flow": a, "warp": b}) != first


def test_engine_cache_root_honours_facestream_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FACESTREAM_CACHE", str(tmp_path / "cache"))
    assert engine_cache_root() == tmp_path / "cache" / "trt"
    monkeypatch.delenv("FACESTREAM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engine_cache_root() == tmp_path / "xdg" / "facestream" / "trt"


@pytest.mark.parametrize(
    ("capability", "fast"), [((5, 3), True), ((6, 1), False), ((7, 5), True), ((9, 0), True), ((5, 2), False)]
)
def test_fp16_only_where_the_gpu_has_fast_fp16(capability, fast) -> None:
    assert has_fast_fp16(capability) is fast
    assert resolve_precision("fp16", capability) == ("fp16" if fast else "fp32")
    assert resolve_precision("fp32", capability) == "fp32"


def test_unknown_precision_is_rejected() -> None:
    with pytest.raises(ValueError, match="precision must be one of fp16, fp32, got 'int8'"):
        resolve_precision("int8", (9, 0))


# --------------------------------------------------------------------------- the ONNX side


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _assert_dynamic_batch(path: Path) -> onnx.ModelProto:
    """Every input: a symbolic batch axis and fixed other axes (one profile can cover them);
    every output: a symbolic batch axis. Inputs and outputs are float32."""
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        dims = _dims(value)
        assert isinstance(dims[0], str) and dims[0], f"{path.name}: {value.name} has a fixed batch {dims}"
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, f"{path.name}: {value.name}"
    for value in model.graph.input:
        dims = _dims(value)
        assert all(isinstance(d, int) and d > 0 for d in dims[1:]), f"{path.name}: {value.name} {dims}"
    return model


def test_every_graph_the_builder_consumes_has_a_dynamic_batch_axis(tmp_path_factory, onnx_cache) -> None:
    graphs = cached_export(random_weights(tmp_path_factory, split="decoder"))
    assert sorted(graphs) == ALL_GRAPHS
    for path in graphs.values():
        model = _assert_dynamic_batch(path)
        assert model.opset_import[0].version == 17


def test_fp16_export_keeps_names_and_batch_axis_and_agrees_with_fp32(tmp_path_factory, onnx_cache, tmp_path):
    """The graphs strongly typed TensorRT builds FP16 engines from (ONNX Runtime CPU as referee)."""
    weights = random_weights(tmp_path_factory, split="decoder")
    fp32 = cached_export(weights)
    with one_torch_thread():
        fp16 = export_fp16_onnx(weights, tmp_path, ALL_GRAPHS)
    assert sorted(fp16) == [n for n in ALL_GRAPHS if n not in ("warp", "correction")]  # both stay FP32
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    rng = np.random.default_rng(0)
    for name, path in fp16.items():
        model = _assert_dynamic_batch(path)
        reference = onnx.load(str(fp32[name]))
        assert [v.name for v in model.graph.input] == [v.name for v in reference.graph.input]
        assert [v.name for v in model.graph.output] == [v.name for v in reference.graph.output]
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer), name
        half = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        full = ort.InferenceSession(str(fp32[name]), options, providers=["CPUExecutionProvider"])
        feed = {i.name: rng.uniform(0, 1, [3, *i.shape[1:]]).astype(np.float32) for i in full.get_inputs()}
        for got, want in zip(half.run(None, feed), full.run(None, feed), strict=True):
            assert got.dtype == np.float32 and got.shape == want.shape
            assert_close(got, want, "fp16", f"{name} FP16 export")


# --------------------------------------------------------------------------- the builder, on a fake


class _ParserError:
    def __init__(self, node: int, desc: str, name: str = "", operator: str = "") -> None:
        self._node, self._desc, self._name, self._operator = node, desc, name, operator

    def node(self) -> int:
        return self._node

    def desc(self) -> str:
        return self._desc

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._operator


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags, self.inputs, self.path = flags, [], Path()

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> Any:
        return self.inputs[index]


class _Parser:
    def __init__(self, fake: FakeTensorRT, network: _Network) -> None:
        self.fake, self.network = fake, network

    def parse_from_file(self, path: str) -> bool:
        """Takes the real graph's input names and shapes (-1 for the symbolic batch)."""
        self.network.path = Path(path)
        for value in onnx.load(path, load_external_data=False).graph.input:
            shape = tuple(-1 if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim)
            self.network.inputs.append(SimpleNamespace(name=value.name, shape=self.fake.input_shape or shape))
        return not self.fake.errors

    @property
    def num_errors(self) -> int:
        return len(self.fake.errors)

    def get_error(self, index: int) -> _ParserError:
        return self.fake.errors[index]


class _Config:
    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.pools: dict[str, int] = {}
        self.profiles: list[_Profile] = []

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: _Profile) -> None:
        self.profiles.append(profile)


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, low: tuple[int, ...], opt: tuple[int, ...], high: tuple[int, ...]) -> None:
        self.shapes[name] = (low, opt, high)


class _Builder:
    def __init__(self, fake: FakeTensorRT, logger: Any) -> None:
        self.fake, self.logger = fake, logger

    def create_network(self, flags: int) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        self.fake.builds.append(
            {
                "onnx": network.path,
                "network_flags": network.flags,
                "flags": config.flags,
                "pools": config.pools,
                "profiles": [profile.shapes for profile in config.profiles],
            }
        )
        if self.fake.build_log is not None:
            self.logger.errors.extend(self.fake.build_log)
            return None
        return b"plan of " + network.path.name.encode()


class FakeTensorRT:
    """Just enough of ``tensorrt`` for :func:`build_engine`; records every build in ``builds``.

    ``fp16_flag=False`` is TensorRT 11 (no ``BuilderFlag.FP16``); ``errors`` are parser errors;
    ``build_log`` makes ``build_serialized_network`` log these errors and return None.
    """

    def __init__(
        self,
        *,
        fp16_flag: bool = True,
        errors: list[_ParserError] | None = None,
        build_log: list[str] | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.__version__ = "10.99.0"
        self.BuilderFlag = SimpleNamespace(FP16="FP16") if fp16_flag else SimpleNamespace()
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=5)
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
        self.errors, self.build_log, self.input_shape = errors or [], build_log, input_shape
        self.builds: list[dict[str, Any]] = []
        self.logger = SimpleNamespace(errors=[])

    def Builder(self, logger: Any) -> _Builder:  # noqa: N802 - the tensorrt name
        return _Builder(self, logger)

    def OnnxParser(self, network: _Network, logger: Any) -> _Parser:  # noqa: N802 - the tensorrt name
        return _Parser(self, network)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A GPU named 'Fake GPU' (compute capability 8.9) with ``fake(...)`` as its TensorRT."""
    state: dict[str, FakeTensorRT] = {}

    def use(**kwargs: Any) -> FakeTensorRT:
        state["trt"] = FakeTensorRT(**kwargs)
        return state["trt"]

    monkeypatch.setattr(tensorrt_build, "require_gpu", lambda: state["trt"])
    monkeypatch.setattr(tensorrt_build, "trt_logger", lambda: state["trt"].logger)
    monkeypatch.setattr(tensorrt_build, "gpu_name", lambda device=0: "Fake GPU")
    monkeypatch.setattr(tensorrt_build.torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    yield use


def test_parser_errors_name_each_node() -> None:
    parser = SimpleNamespace(
        num_errors=2,
        get_error=[
            _ParserError(3, "Unsupported ONNX data type: DOUBLE", "/net/Conv_3", "Conv"),
            _ParserError(-1, "Graph has no outputs"),
        ].__getitem__,
    )
    assert parser_errors(parser) == [
        "node 3 (/net/Conv_3, Conv): Unsupported ONNX data type: DOUBLE",
        "node -1: Graph has no outputs",
    ]


def test_build_engine_parse_error_names_graph_and_nodes(fake_gpu, tmp_path_factory, onnx_cache, tmp_path):
    trt = fake_gpu(
        errors=[_ParserError(7, "No importer registered for op: GridSample", "/GridSample", "GridSample")]
    )
    onnx_path = cached_export(random_weights(tmp_path_factory))["warp"]
    with pytest.raises(EngineBuildError) as info:
        build_engine(trt, onnx_path, tmp_path / "warp.plan", graph="warp", fp16=True, max_batch=8)
    message = str(info.value)
    assert info.value.graph == "warp"
    assert message.startswith("TensorRT engine for graph 'warp': cannot parse")
    assert "node 7 (/GridSample, GridSample): No importer registered for op: GridSample" in message
    assert not (tmp_path / "warp.plan").exists()


def test_build_engine_failure_names_graph_and_log(fake_gpu, tmp_path_factory, onnx_cache, tmp_path) -> None:
    trt = fake_gpu(build_log=["[optimizer] out of memory for tactic"])
    onnx_path = cached_export(random_weights(tmp_path_factory))["flow"]
    with pytest.raises(EngineBuildError, match="graph 'flow': build_serialized_network failed") as info:
        build_engine(trt, onnx_path, tmp_path / "flow.plan", graph="flow", fp16=False, max_batch=4)
    assert "out of memory for tactic" in str(info.value)


def test_build_engine_needs_a_dynamic_batch_axis(fake_gpu, tmp_path_factory, onnx_cache, tmp_path) -> None:
    trt = fake_gpu(input_shape=(1, 384, 1, 1))
    onnx_path = cached_export(random_weights(tmp_path_factory))["dvsnet"]
    with pytest.raises(EngineBuildError, match="graph 'dvsnet': input 'conv6' has shape .* dynamic batch"):
        build_engine(trt, onnx_path, tmp_path / "x.plan", graph="dvsnet", fp16=False, max_batch=8)


def test_build_engines_fp16_with_builder_flag_and_cache(fake_gpu, tmp_path_factory, onnx_cache, tmp_path):
    """TensorRT 10 (BuilderFlag.FP16): FP32 graphs + the flag; one profile per input; cached."""
    trt = fake_gpu(fp16_flag=True)
    weights = random_weights(tmp_path_factory, split="decoder")
    messages: list[str] = []
    engines = build_engines(weights, out=tmp_path, workspace_gb=2, progress=messages.append)
    graphs = cached_export(weights)
    key = engines.key
    assert (key.gpu, key.tensorrt, key.precision, key.max_batch) == ("Fake GPU", "10.99.0", "fp16", 8)
    assert key.onnx == onnx_digest(graphs)
    assert engines.directory == tmp_path / key.digest()
    assert sorted(engines.plans) == ALL_GRAPHS
    for name, plan in engines.plans.items():
        assert plan == engines.directory / f"{name}.plan"
        assert plan.read_bytes() == f"plan of {name}.onnx".encode()
    assert len(trt.builds) == len(ALL_GRAPHS)
    for build in trt.builds:
        assert build["onnx"] in graphs.values()  # the FP32 graphs of cached_export
        fp32 = build["onnx"].stem in ("warp", "correction")
        assert build["flags"] == (set() if fp32 else {"FP16"})  # warp and the corrector: FP32
        assert build["network_flags"] == 0
        assert build["pools"] == {"workspace": 2 * 2**30}
        (profile,) = build["profiles"]  # one profile, every input in it
        for name, (low, opt, high) in profile.items():
            assert low[0] == 1 and opt[0] == 1 and high[0] == 8, name
            assert low[1:] == opt[1:] == high[1:] and all(d > 0 for d in low[1:]), name
    warp_build = next(b for b in trt.builds if b["onnx"].stem == "warp")
    assert set(warp_build["profiles"][0]) == {"features", "flow", "scale"}
    manifest = json.loads((engines.directory / "engines.json").read_text())
    assert manifest["format"] == ENGINE_FORMAT and manifest["graphs"] == ALL_GRAPHS
    assert manifest["precision"] == "fp16" and manifest["gpu"] == "Fake GPU"
    assert any("building fp16 engine, batch 1..8" in m for m in messages)

    # Second call: everything cached, nothing built.
    messages.clear()
    again = build_engines(weights, out=tmp_path, progress=messages.append)
    assert again == engines
    assert len(trt.builds) == len(ALL_GRAPHS)
    assert sum("cached" in m for m in messages) == len(ALL_GRAPHS)

    # FP32 and another max batch are other engines, in other folders.
    fp32 = build_engines(weights, out=tmp_path, precision="fp32", max_batch=2, progress=messages.append)
    assert fp32.directory != engines.directory
    assert all(not b["flags"] for b in trt.builds[len(ALL_GRAPHS) :])


def test_build_engines_fp16_strongly_typed(fake_gpu, tmp_path_factory, onnx_cache, tmp_path) -> None:
    """TensorRT 11 (no BuilderFlag.FP16): FP16 graphs, strongly typed networks; warp and the
    warp corrector stay FP32."""
    trt = fake_gpu(fp16_flag=False)
    weights = random_weights(tmp_path_factory)
    with one_torch_thread():
        engines = build_engines(weights, out=tmp_path, progress=lambda message: None)
    graphs = cached_export(weights)
    sources = {build["onnx"].stem: build["onnx"] for build in trt.builds}
    assert sorted(sources) == ALL_GRAPHS
    for build in trt.builds:
        name, source = build["onnx"].stem, build["onnx"]
        assert not build["flags"], name  # no weak-typing flags on this TensorRT
        if name in ("warp", "correction"):  # FP32: the FP32 graph, an ordinary network
            assert (source, build["network_flags"]) == (graphs[name], 0)
        else:
            assert source == engines.directory / "onnx-fp16" / f"{name}.onnx"
            assert build["network_flags"] == 1 << 5  # STRONGLY_TYPED


def test_build_engines_on_gpu_without_fast_fp16_builds_fp32(
    fake_gpu, tmp_path_factory, onnx_cache, tmp_path, monkeypatch
) -> None:
    trt = fake_gpu()
    monkeypatch.setattr(tensorrt_build.torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    engines = build_engines(random_weights(tmp_path_factory), out=tmp_path, progress=lambda message: None)
    assert engines.key.precision == "fp32"
    assert all(not b["flags"] for b in trt.builds)


def test_build_engines_rejects_bad_max_batch(tmp_path_factory) -> None:
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        build_engines(random_weights(tmp_path_factory), max_batch=0)


# --------------------------------------------------------------------------- commands without a GPU


def test_build_engines_command_without_tensorrt_exits_2(tmp_path_factory, tmp_path: Path) -> None:
    weights = random_weights(tmp_path_factory).directory
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "from facestream.cli import main\n"
        f"sys.exit(main(['build-engines', '--weights', {str(weights)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_subprocess_env(FACESTREAM_CACHE=str(tmp_path)),
        cwd=tmp_path,  # not the repository root, where a stale *.egg-info could shadow the entry points
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("facestream build-engines: error: TensorRT cannot be imported")
    assert INSTALL in result.stderr and "CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_gpu_without_gpu_exits_2(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr("facestream.engines.bench_gpu.cuda_problem", lambda: "no CUDA device (test)")
    assert bench_gpu_main(["--out", str(tmp_path / "gpu")]) == 2
    err = capsys.readouterr().err
    assert "facestream bench-gpu: no CUDA GPU here (no CUDA device (test))" in err
    assert "make bench" in err
    assert not (tmp_path / "gpu").exists()


def test_bench_gpu_module_without_gpu_exits_2_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "facestream.engines.bench_gpu", "--out", str(tmp_path / "gpu")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_subprocess_env(CUDA_VISIBLE_DEVICES=""),
    )
    assert result.returncode == 2, result.stderr
    assert "no CUDA GPU here" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_bench_gpu_runs_the_module() -> None:
    result = subprocess.run(
        ["make", "-n", "bench-gpu"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "-m facestream.engines.bench_gpu --out bench/gpu" in result.stdout


# --------------------------------------------------------------------------- on a GPU with TensorRT

TOLERANCE = {"fp32": 1e-2, "fp16": 5e-2}  # of the reference's magnitude (TF32 / FP16 arithmetic)
BATCHES = (1, 8)


def assert_close(actual: np.ndarray, expected: np.ndarray, precision: str, what: str) -> None:
    assert actual.shape == expected.shape, what
    assert actual.dtype == np.float32, what
    magnitude = max(float(np.abs(expected).max()), 1e-3)
    diff = float(np.abs(actual.astype(np.float64) - expected).max())
    assert diff <= TOLERANCE[precision] * magnitude, f"{what}: max abs diff {diff:.3g} vs {magnitude:.3g}"


def _rand(*shape: int, low: float = 0.0, high: float = 1.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


@pytest.fixture(scope="module", params=["fp16", "fp32"])
def trt_and_ort(request, tmp_path_factory) -> Iterator[tuple[TensorRTNetworks, Any, str]]:
    """TensorRT networks (engines in the session's cache) and ONNX Runtime on the same weights."""
    weights = random_weights(tmp_path_factory, split="decoder")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACESTREAM_CACHE", str(onnx_cache_dir(tmp_path_factory)))
        trt = TensorRTNetworks(weights, precision=request.param, max_batch=max(BATCHES))
    yield trt, networks(tmp_path_factory, "onnxruntime", split="decoder"), request.param


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("batch", BATCHES)
def test_tensorrt_matches_onnxruntime_on_every_graph(trt_and_ort, batch: int) -> None:
    trt, ref, precision = trt_and_ort
    seg, flow_cfg = ref.segmentation_config, ref.flow_config
    grid, six = seg.feature_size, flow_cfg.conv6_size
    images = _rand(batch, 3, SIZE, SIZE, seed=1)
    features = trt.features(images)
    assert_close(features, ref.features(images), precision, "segmentation_features")
    assert_close(trt.task(features), ref.task(features), precision, "segmentation_task")
    agreement = float((trt.task(features).argmax(1) == ref.task(features).argmax(1)).mean())
    assert agreement >= 0.95, f"argmax agrees on {agreement:.2%}"
    pairs = _rand(batch, 6, flow_cfg.input_size, flow_cfg.input_size, seed=2)
    for name, got, want in zip(("flow", "scale", "conv6"), trt.flow(pairs), ref.flow(pairs), strict=True):
        assert_close(got, want, precision, f"flow.{name}")
    feats = _rand(batch, seg.feature_channels, grid, grid, low=-2, high=2, seed=3)
    flow = _rand(batch, 2, grid, grid, low=-3, high=3, seed=4)
    scale = _rand(batch, flow_cfg.scale_channels, grid, grid, low=0.5, high=1.5, seed=5)
    assert_close(trt.warp(feats, flow, scale), ref.warp(feats, flow, scale), "fp32", "warp")  # always FP32
    conv6 = _rand(batch, flow_cfg.conv6_channels, six, six, seed=6)
    expert = _rand(batch, 2, seed=7)
    prob = trt.key_probability(conv6, expert)
    assert prob.shape == (batch,) and np.all((prob >= 0) & (prob <= 1))
    assert_close(prob, ref.key_probability(conv6, expert), precision, "policy")
    assert_close(trt.dvsnet_score(conv6), ref.dvsnet_score(conv6), precision, "dvsnet")


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_streams_and_device_paths(trt_and_ort) -> None:
    trt, _, precision = trt_and_ort
    assert trt.backend == "tensorrt" and trt.precision in ("fp16", "fp32")
    images = _rand(2, 3, SIZE, SIZE, seed=8)
    pairs = _rand(2, 6, trt.flow_input_size, trt.flow_input_size, seed=9)
    features, flow = trt.features_and_flow(images, pairs)  # N_feat and F on two streams at once
    np.testing.assert_allclose(features, trt.features(images), rtol=1e-5, atol=1e-6)
    for got, want in zip(flow, trt.flow(pairs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    on_device = trt.features_device(images)
    assert on_device.is_cuda and on_device.dtype == torch.float32
    np.testing.assert_allclose(on_device.cpu().numpy(), features, rtol=1e-5, atol=1e-6)
    warped_from_device = trt.warp(on_device, flow.flow, flow.scale)
    np.testing.assert_allclose(warped_from_device, trt.warp(features, flow.flow, flow.scale), atol=1e-6)
    assert trt.warp_device(on_device, flow.flow, flow.scale).is_cuda
    with pytest.raises(ValueError, match=r"outside the engine's range .*--max-batch"):
        trt.features(_rand(max(BATCHES) + 1, 3, SIZE, SIZE))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engines_are_cached_and_auto_takes_them(trt_and_ort, tmp_path_factory, monkeypatch) -> None:
    trt, _, precision = trt_and_ort
    monkeypatch.setenv("FACESTREAM_CACHE", str(onnx_cache_dir(tmp_path_factory)))
    weights = random_weights(tmp_path_factory, split="decoder")
    mtimes = {name: plan.stat().st_mtime_ns for name, plan in trt.engine_set.plans.items()}
    again = build_engines(weights, precision=precision, max_batch=max(BATCHES))
    assert again.plans == trt.engine_set.plans
    assert {name: plan.stat().st_mtime_ns for name, plan in again.plans.items()} == mtimes
    if precision == "fp16":
        assert create_networks(weights, "auto").backend == "tensorrt"


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_cuda_warp_option_falls_back_or_agrees(trt_and_ort, tmp_path_factory) -> None:
    trt, ref, _ = trt_and_ort
    kernel = TensorRTNetworks(
        random_weights(tmp_path_factory, split="decoder"), engines=trt.engine_set, warp="cuda_warp"
    )
    assert kernel.warp_impl in ("engine", "cuda_warp"), kernel.warp_note
    grid = ref.segmentation_config.feature_size
    feats = _rand(2, ref.segmentation_config.feature_channels, grid, grid, seed=10)
    flow = _rand(2, 2, grid, grid, low=-3, high=3, seed=11)
    scale = _rand(2, ref.flow_config.scale_channels, grid, grid, low=0.5, high=1.5, seed=12)
    assert_close(kernel.warp(feats, flow, scale), ref.warp(feats, flow, scale), "fp32", kernel.warp_note)


# --------------------------------------------------------------------------- torch-cuda


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-autocast"])
def test_torch_cuda_matches_torch_cpu(tmp_path_factory, fp16: bool) -> None:
    weights = random_weights(tmp_path_factory, split="decoder")
    with one_torch_thread():
        cpu = networks(tmp_path_factory, "torch", split="decoder")
        gpu = TorchNetworks(weights, device="cuda", fp16=fp16)
        assert gpu.backend == "torch-cuda" and cpu.backend == "torch"
        precision = "fp16" if fp16 else "fp32"
        for batch in BATCHES:
            images = _rand(batch, 3, SIZE, SIZE, seed=13)
            features = cpu.features(images)
            assert_close(gpu.features(images), features, precision, "features")
            assert_close(gpu.task(features), cpu.task(features), precision, "task")
            size = cpu.flow_input_size
            pairs = _rand(batch, 6, size, size, seed=14)
            for got, want in zip(gpu.flow(pairs), cpu.flow(pairs), strict=True):
                assert_close(got, want, precision, "flow")
    assert create_networks(weights, "torch-cuda").backend == "torch-cuda"
