"""The backend chooser (``--backend auto``): tensorrt -> torch-cuda -> onnxruntime-cuda -> onnxruntime,
each skipped step with its reason, on monkeypatched probes (no GPU is needed), and
``create_networks(weights, "auto")`` going on down the chain when a backend fails to start."""

from __future__ import annotations

import argparse
import logging
import sys

import pytest
from helpers import THREADS, StubNetworks, onnx_cache_dir, random_weights

from facestream.cli import build_parser, load_commands
from facestream.engines import backend_choice, backends
from facestream.engines.backend_choice import (
    CHAIN,
    BackendChoice,
    BackendUnavailable,
    choose_backend,
)
from facestream.engines.backends import BACKENDS, DEFAULT_BACKEND, create_chosen_networks, create_networks
from facestream.engines.tensorrt_build import EngineBuildError, TensorRTUnavailable
from facestream.engines.weights import WeightsError

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
NO_TRT = "TensorRT cannot be imported (ModuleNotFoundError: No module named 'tensorrt')"
NO_ORT_CUDA = "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
GPU = "NVIDIA Test GPU"


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """Set what the probes find: ``machine(cuda=..., tensorrt=..., ort_cuda=...)`` (True = there)."""

    def set_machine(*, cuda: bool, tensorrt: bool = False, ort_cuda: bool = False) -> None:
        monkeypatch.setattr(backend_choice, "cuda_problem", lambda: None if cuda else NO_CUDA)
        monkeypatch.setattr(backend_choice, "tensorrt_problem", lambda: None if tensorrt else NO_TRT)
        monkeypatch.setattr(backend_choice, "ort_cuda_problem", lambda: None if ort_cuda else NO_ORT_CUDA)
        monkeypatch.setattr(backend_choice, "gpu_description", lambda: GPU)

    return set_machine


# --------------------------------------------------------------------------- choose_backend


def test_no_cuda_falls_back_to_onnxruntime_with_every_reason(machine) -> None:
    machine(cuda=False, tensorrt=True, ort_cuda=True)
    choice = choose_backend()
    assert choice.name == "onnxruntime"
    assert [name for name, _ in choice.tried] == ["tensorrt", "torch-cuda", "onnxruntime-cuda"]
    assert all(reason == NO_CUDA for _, reason in choice.tried)
    assert choice.reason.startswith("CPU")
    assert "fallback after tensorrt, torch-cuda, onnxruntime-cuda" in choice.reason


def test_cuda_without_tensorrt_takes_torch_cuda(machine) -> None:
    machine(cuda=True, tensorrt=False)
    choice = choose_backend("auto")
    assert choice.name == "torch-cuda"
    assert choice.tried == [("tensorrt", NO_TRT)]
    assert GPU in choice.reason


def test_everything_present_takes_tensorrt(machine) -> None:
    machine(cuda=True, tensorrt=True, ort_cuda=True)
    choice = choose_backend()
    assert (choice.name, choice.tried) == ("tensorrt", [])
    assert choice.reason == f"TensorRT on {GPU}"


def test_failed_backends_are_skipped_with_their_reason(machine) -> None:
    machine(cuda=True, tensorrt=True, ort_cuda=True)
    failed = {"tensorrt": "failed to start: EngineBuildError: x", "torch-cuda": "failed to start: y"}
    choice = choose_backend(failed=failed)
    assert choice.name == "onnxruntime-cuda"
    assert choice.tried == list(failed.items())
    machine(cuda=True, tensorrt=True, ort_cuda=False)
    choice = choose_backend(failed=failed)
    assert choice.name == "onnxruntime"
    assert choice.tried[-1] == ("onnxruntime-cuda", NO_ORT_CUDA)


@pytest.mark.parametrize(
    ("preferred", "cuda", "tensorrt", "expected", "tried"),
    [
        ("onnxruntime", True, True, "onnxruntime", []),
        ("torch", True, True, "torch", []),
        ("torch-cuda", True, True, "torch-cuda", []),
        ("tensorrt", True, True, "tensorrt", []),
        ("tensorrt", True, False, "torch-cuda", ["tensorrt"]),
        ("torch-cuda", False, False, "onnxruntime", ["torch-cuda", "onnxruntime-cuda"]),
        ("torch", False, False, "torch", []),
    ],
)
def test_preferred_names_are_honoured(machine, preferred, cuda, tensorrt, expected, tried) -> None:
    machine(cuda=cuda, tensorrt=tensorrt)
    choice = choose_backend(preferred)
    assert choice.name == expected
    assert [name for name, _ in choice.tried] == tried


def test_unknown_name_raises_value_error(machine) -> None:
    machine(cuda=True, tensorrt=True)
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; choose one of tensorrt, torch-cuda"):
        choose_backend("tpu")


def test_choice_and_reasons_are_logged(machine, caplog: pytest.LogCaptureFixture) -> None:
    machine(cuda=True, tensorrt=False)
    with caplog.at_level(logging.INFO, logger="facestream.engines.backend_choice"):
        choose_backend()
    assert f"backend torch-cuda (CUDA GPU {GPU}" in caplog.text
    assert f"skipped tensorrt: {NO_TRT}" in caplog.text


def test_backend_choice_to_json() -> None:
    choice = BackendChoice("onnxruntime", "CPU", [("tensorrt", NO_CUDA)])
    assert choice.to_json() == {"name": "onnxruntime", "reason": "CPU", "tried": [["tensorrt", NO_CUDA]]}
    assert BackendChoice("torch", "asked for").tried == []


def test_real_probes_on_this_machine_name_a_backend() -> None:
    """Whatever this machine has, the chain ends in a backend and each skip has a reason."""
    choice = choose_backend()
    assert choice.name in CHAIN
    assert all(reason for _, reason in choice.tried)


# --------------------------------------------------------------------------- create_networks


def test_backends_registry() -> None:
    assert DEFAULT_BACKEND == "onnxruntime"
    assert set(BACKENDS) == {"onnxruntime", "torch", "tensorrt", "torch-cuda", "onnxruntime-cuda", "auto"}
    assert BACKENDS[:2] == ("onnxruntime", "torch")


def test_backend_flag_choices_follow_backends() -> None:
    parser = build_parser(load_commands())
    for name in BACKENDS:
        args = parser.parse_args(["segment", "clip.mp4", "--backend", name])
        assert isinstance(args, argparse.Namespace) and args.backend == name
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "clip.mp4", "--backend", "tpu"])


def test_auto_without_gpu_builds_onnxruntime(tmp_path_factory, machine, monkeypatch) -> None:
    machine(cuda=False)
    monkeypatch.setenv("FACESTREAM_CACHE", str(onnx_cache_dir(tmp_path_factory)))
    networks, choice = create_chosen_networks(random_weights(tmp_path_factory), "auto", threads=THREADS)
    assert (networks.backend, choice.name) == ("onnxruntime", "onnxruntime")
    assert [name for name, _ in choice.tried] == ["tensorrt", "torch-cuda", "onnxruntime-cuda"]


def test_auto_goes_on_when_a_backend_fails_to_start(tmp_path_factory, machine, monkeypatch) -> None:
    machine(cuda=True, tensorrt=True, ort_cuda=True)
    errors = {
        "tensorrt": EngineBuildError("flow", "build_serialized_network failed"),
        "torch-cuda": RuntimeError("CUDA out of memory"),
        "onnxruntime-cuda": BackendUnavailable("the CUDA execution provider did not start"),
    }
    started: list[str] = []

    def fake_create(backend, weights, threads, correct_precision):
        started.append(backend)
        if backend in errors:
            raise errors[backend]
        return StubNetworks()

    monkeypatch.setattr(backends, "_create", fake_create)
    networks, choice = create_chosen_networks(random_weights(tmp_path_factory), "auto")
    assert started == ["tensorrt", "torch-cuda", "onnxruntime-cuda", "onnxruntime"]
    assert choice.name == "onnxruntime" and isinstance(networks, StubNetworks)
    reasons = dict(choice.tried)
    assert reasons["tensorrt"].startswith(
        "failed to start: EngineBuildError: TensorRT engine for graph 'flow'"
    )
    assert reasons["torch-cuda"] == "failed to start: RuntimeError: CUDA out of memory"
    assert "did not start" in reasons["onnxruntime-cuda"]


def test_auto_does_not_hide_weights_errors(tmp_path_factory, machine, monkeypatch) -> None:
    machine(cuda=True, tensorrt=True)

    def broken(backend, weights, threads, correct_precision):
        raise WeightsError("weights in x do not fit their network")

    monkeypatch.setattr(backends, "_create", broken)
    with pytest.raises(WeightsError, match="do not fit"):
        create_networks(random_weights(tmp_path_factory), "auto")


def test_explicit_gpu_backends_without_gpu_raise_clearly(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setattr(backends, "cuda_problem", lambda: NO_CUDA)
    weights = random_weights(tmp_path_factory)
    for name in ("torch-cuda", "onnxruntime-cuda"):
        with pytest.raises(BackendUnavailable, match=f"backend {name} needs a CUDA GPU: no CUDA device"):
            create_networks(weights, name)


def test_explicit_tensorrt_without_tensorrt_raises_clearly(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match=r"pip install 'facestream\[gpu\]'"):
        create_networks(random_weights(tmp_path_factory), "tensorrt")
