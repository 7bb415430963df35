"""The import direction of the code base: ``service -> engines -> models``; ``training -> engines,
models``; nothing imports ``service`` or ``training``; each heavy dependency lives in one place.

The checker parses the sources with :mod:`ast` (nothing is imported, so a missing optional
dependency cannot hide a violation) and reports every offending ``file:line``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "facestream"
LAYERS = ("models", "engines", "service", "training")

# The facestream layers each layer may import (its own included).
ALLOWED_LAYERS: dict[str, frozenset[str]] = {
    "models": frozenset({"models"}),
    "engines": frozenset({"models", "engines"}),
    "service": frozenset({"models", "engines", "service"}),
    "training": frozenset({"models", "engines", "training"}),
}


def _under_service(rel: PurePosixPath) -> bool:
    return rel.parts[0] == "service"


def _is_service_metrics(rel: PurePosixPath) -> bool:
    return rel == PurePosixPath("service/metrics.py")


def _is_engines_gpu_module(rel: PurePosixPath) -> bool:
    return rel.parts[0] == "engines" and ("tensorrt" in rel.name or "cuda" in rel.name)


def _under_training(rel: PurePosixPath) -> bool:
    return rel.parts[0] == "training"


# Third-party package -> (where it may be imported, said in words for the message).
CONFINED_PACKAGES: dict[str, tuple[Callable[[PurePosixPath], bool], str]] = {
    "fastapi": (_under_service, "only under service/"),
    "prometheus_client": (_is_service_metrics, "only in service/metrics.py"),
    "tensorrt": (_is_engines_gpu_module, "only in engines/ modules named *tensorrt* or *cuda*"),
    "pycuda": (_is_engines_gpu_module, "only in engines/ modules named *tensorrt* or *cuda*"),
    "dlib": (_under_training, "only under training/"),
    "mediapipe": (_under_training, "only under training/"),
}


@dataclass(frozen=True)
class ImportRef:
    """One import statement's target, resolved to an absolute module path."""

    line: int
    target: str  # absolute dotted name ("facestream.engines.x", "fastapi.responses")
    statement: str  # the source as written, for the message
    relative_level: int = 0


def python_files(root: Path) -> Iterator[Path]:
    """Every .py file under the layer folders of ``root`` that exist."""
    for layer in LAYERS:
        folder = root / layer
        if folder.is_dir():
            yield from sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(rel: PurePosixPath) -> tuple[str, bool]:
    """``models/warp.py`` -> (``facestream.models.warp``, False); packages give True."""
    parts = list(rel.with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join((DISTRIBUTION, *parts)), is_package


def _import_from_targets(node: ast.ImportFrom, base: str) -> Iterator[str]:
    for alias in node.names:
        yield base if alias.name == "*" else f"{base}.{alias.name}" if base else alias.name


def _dynamic_import(node: ast.Call) -> str | None:
    """The constant module name of ``importlib.import_module("x")`` or ``__import__("x")``."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def imports_of(tree: ast.AST, module: str, is_package: bool) -> Iterator[ImportRef]:
    """Every import target of a parsed module; relative imports resolved against ``module``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield ImportRef(node.lineno, alias.name, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            names = ", ".join(a.name for a in node.names)
            statement = f"from {'.' * node.level}{node.module or ''} import {names}"
            if node.level == 0:
                base = node.module or ""
            elif node.level - 1 >= len(package):
                yield ImportRef(node.lineno, "", statement, node.level)  # above the distribution
                continue
            else:
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            for target in _import_from_targets(node, base):
                yield ImportRef(node.lineno, target, statement, node.level)
        elif isinstance(node, ast.Call) and (target := _dynamic_import(node)):
            yield ImportRef(node.lineno, target, f"import_module({target!r})")


def _layer_of(target: str) -> str | None:
    parts = target.split(".")
    if len(parts) >= 2 and parts[0] == DISTRIBUTION and parts[1] in LAYERS:
        return parts[1]
    return None


def check_import(rel: PurePosixPath, ref: ImportRef) -> str | None:
    """Why this import breaks the layering, or None."""
    layer = rel.parts[0]
    if ref.relative_level and not ref.target.startswith(f"{DISTRIBUTION}.{layer}"):
        where = ref.target or "above the facestream distribution"
        return f"relative import climbs out of {layer}/ (to {where}); import it absolutely"
    top = ref.target.split(".")[0]
    if top in LAYERS:
        return f"import facestream.{top}, not the generic top-level name {top!r}"
    target_layer = _layer_of(ref.target)
    if target_layer is not None and target_layer not in ALLOWED_LAYERS[layer]:
        allowed = ", ".join(sorted(ALLOWED_LAYERS[layer]))
        return f"{layer}/ may import only facestream.{{{allowed}}}, not facestream.{target_layer}"
    if top in CONFINED_PACKAGES:
        may_import_here, where = CONFINED_PACKAGES[top]
        if not may_import_here(rel):
            return f"{top} may be imported {where}"
    return None


def find_violations(root: Path) -> list[str]:
    """``"path:line: statement: reason"`` for every import under ``root`` that breaks a rule."""
    violations = []
    for path in python_files(root):
        rel = PurePosixPath(path.relative_to(root).as_posix())
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as exc:
            violations.append(f"{rel}:{exc.lineno}: cannot be parsed: {exc.msg}")
            continue
        module, is_package = module_name(rel)
        for ref in sorted(imports_of(tree, module, is_package), key=lambda r: r.line):
            reason = check_import(rel, ref)
            if reason:
                violations.append(f"{rel}:{ref.line}: {ref.statement}: {reason}")
    return violations


# --------------------------------------------------------------------------- the repository


def test_repository_import_direction() -> None:
    scanned = list(python_files(REPO_ROOT))
    assert any(p.parent.name == "models" for p in scanned), f"no models/*.py under {REPO_ROOT}"
    violations = find_violations(REPO_ROOT)
    assert not violations, "import direction violated:\n" + "\n".join(violations)


# --------------------------------------------------------------------------- the checker itself


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")


CLEAN_TREE = {
    "models/__init__.py": "from facestream.models.warp import warp\nfrom . import warp as _w\n",
    "models/warp.py": "import torch\nimport torch.nn.functional as F\n",
    "models/blocks/__init__.py": "from .. import warp\nfrom ..warp import warp as w\n",
    "engines/__init__.py": "",
    "engines/pipeline.py": "from facestream.models import warp\nfrom .cache import Cache\n",
    "engines/tensorrt_backend.py": "def load():\n    import tensorrt as trt\n    return trt\n",
    "engines/cuda_warp.py": "import pycuda.driver as cuda\nimport tensorrt\n",
    "service/__init__.py": "",
    "service/app.py": (
        "from fastapi import FastAPI\nfrom facestream.engines import pipeline\n"
        "from facestream.models import warp\nfrom facestream.service.metrics import Metrics\n"
    ),
    "service/metrics.py": "import prometheus_client\nfrom prometheus_client import Counter\n",
    "training/__init__.py": "",
    "training/labels.py": ("import dlib\nimport mediapipe as mp\nfrom facestream.engines import pipeline\n"),
    "training/train_policy.py": "from facestream.models import KeyPolicy\nfrom .labels import x\n",
}


def test_checker_accepts_clean_tree(tmp_path: Path) -> None:
    _write_tree(tmp_path, CLEAN_TREE)
    assert find_violations(tmp_path) == []


VIOLATIONS = [
    # (file, source, line, text the message must contain)
    (
        "models/bad.py",
        "import torch\nfrom facestream.engines import x\n",
        2,
        "not facestream.engines",
    ),
    ("models/bad.py", "import facestream.service.app\n", 1, "not facestream.service"),
    ("models/bad.py", "from facestream import training\n", 1, "not facestream.training"),
    ("engines/bad.py", "from facestream.service.app import create_app\n", 1, "facestream.service"),
    ("engines/bad.py", "\n\nimport facestream.training.data\n", 3, "not facestream.training"),
    ("service/bad.py", "from facestream.training import evaluate\n", 1, "facestream.training"),
    ("training/bad.py", "from facestream.service import metrics\n", 1, "facestream.service"),
    ("models/bad.py", "from .. import engines\n", 1, "relative import climbs out of models/"),
    ("engines/bad.py", "from ..models import warp\n", 1, "relative import climbs out of engines/"),
    ("models/bad.py", "from ... import anything\n", 1, "above the facestream distribution"),
    ("engines/bad.py", "from models import warp\n", 1, "not the generic top-level name"),
    ("service/bad.py", "import engines.pipeline\n", 1, "not the generic top-level name"),
    ("engines/bad.py", "from fastapi import FastAPI\n", 1, "fastapi may be imported only under"),
    ("service/app.py", "import prometheus_client\n", 1, "only in service/metrics.py"),
    ("engines/pipeline.py", "from prometheus_client import Gauge\n", 1, "prometheus_client"),
    ("engines/onnx_backend.py", "import tensorrt as trt\n", 1, "tensorrt may be imported only"),
    ("engines/pipeline.py", "def f():\n    import pycuda.autoinit\n", 2, "pycuda may be imported"),
    ("models/tensorrt_model.py", "import tensorrt\n", 1, "tensorrt may be imported only"),
    ("service/labels.py", "import dlib\n", 1, "dlib may be imported only under training/"),
    ("engines/face.py", "import mediapipe\n", 1, "mediapipe may be imported only under"),
    (
        "models/bad.py",
        "import importlib\nimportlib.import_module('facestream.engines.x')\n",
        2,
        "not facestream.engines",
    ),
    ("service/broken.py", "def f(:\n", 1, "cannot be parsed"),
]


@pytest.mark.parametrize(("rel", "source", "line", "reason"), VIOLATIONS)
def test_checker_reports_violation(tmp_path: Path, rel: str, source: str, line: int, reason: str) -> None:
    _write_tree(tmp_path, {**CLEAN_TREE, rel: source})
    violations = find_violations(tmp_path)
    assert len(violations) == 1, violations
    assert violations[0].startswith(f"{rel}:{line}: "), violations
    assert reason in violations[0], violations


def test_checker_lists_every_offence(tmp_path: Path) -> None:
    _write_tree(
        tmp_path,
        {
            **CLEAN_TREE,
            "models/a.py": "from facestream.engines import x\nimport fastapi\n",
            "engines/b.py": "import dlib\n",
        },
    )
    violations = find_violations(tmp_path)
    assert [v.split(": ")[0] for v in violations] == [
        "models/a.py:1",
        "models/a.py:2",
        "engines/b.py:1",
    ]
