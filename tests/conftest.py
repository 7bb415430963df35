"""Shared pytest setup: hardware auto-skips, thread count, per-test RNG seeding, data paths.

The markers (slow, gpu, tensorrt, integration) are declared in pyproject.toml; this file only
decides at collection time which of them cannot run on this machine.
"""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DATA_ENV_VAR = "FACESTREAM_DATA"
SEED = 0

torch.set_num_threads(2)


def _tensorrt_missing() -> str | None:
    """Why TensorRT tests cannot run here, or None when ``import tensorrt`` works."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (import tensorrt failed)"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError (e.g. OSError)
        return f"TensorRT cannot be imported: {type(exc).__name__}: {exc}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wants_gpu = any(item.get_closest_marker("gpu") for item in items)
    wants_trt = any(item.get_closest_marker("tensorrt") for item in items)
    skip_gpu = None
    if wants_gpu and not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="no CUDA GPU (torch.cuda.is_available() is False)")
    trt_missing = _tensorrt_missing() if wants_trt else None
    skip_trt = pytest.mark.skip(reason=trt_missing) if trt_missing else None
    for item in items:
        if skip_gpu is not None and item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)
        if skip_trt is not None and item.get_closest_marker("tensorrt"):
            item.add_marker(skip_trt)


@pytest.fixture(autouse=True)
def seeded_rng() -> Iterator[None]:
    """Seed torch, numpy and random for each test; give back the global RNG states afterwards."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    numpy_state = np.random.get_state()
    random_state = random.getstate()
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(random_state)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder of real face clips: ``$FACESTREAM_DATA`` or ``<repo>/../shared/data``.

    It must contain ``videos/``; tests that need it are skipped where it is absent.
    """
    configured = os.environ.get(DATA_ENV_VAR)
    path = Path(configured) if configured else DEFAULT_DATA_DIR
    source = f"from ${DATA_ENV_VAR}" if configured else f"the default; set ${DATA_ENV_VAR}"
    if not path.is_dir():
        pytest.skip(f"face clip data folder {path} ({source}) does not exist")
    return path


@pytest.fixture(scope="session")
def videos_dir(data_dir: Path) -> Path:
    """``<data_dir>/videos``, the real face video clips."""
    path = data_dir / "videos"
    if not path.is_dir():
        pytest.skip(f"no videos/ folder in the face clip data folder {data_dir}")
    return path
