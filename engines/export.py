"""ONNX export of every network (opset 17, dynamic batch axis).

Graphs written for a weight set:

=========================  ==================================  ===============================
file                       inputs                              outputs
=========================  ==================================  ===============================
segmentation_features      image (B,3,S,S)                     features (B,C,S/4,S/4)
segmentation_task          features                            scores (B,K,S/4,S/4)
flow                       pair (B,6,Sf,Sf)                    flow, scale, conv6
flow_conv6                 pair (B,6,Sf,Sf)                    conv6 (F's encoder alone)
warp                       features, flow, scale               warped
policy                     conv6, expert (B,2+cues)            key_probability (B,)
dvsnet                     conv6                               score (B,)
correction                 current, key (B,3,I,I), flow,       corrected (B,K,S/4,S/4)
                           scores
=========================  ==================================  ===============================
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facestream.engines.weights import WeightSet
from facestream.models import warp

OPSET = 17
# 2: the corrector guard's margin; 3: eyes may grow in it; 4: F's encoder alone (flow_conv6)
EXPORT_FORMAT = "facestream-onnx-4"


class _Features(nn.Module):
    net: Any  # DeepLabV3Plus, FlowNet2S or KeyPolicy; typed loosely for their extra methods

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net.features(image)


class _Task(_Features):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.task(features)


class _Flow(_Features):
    def forward(self, pair: torch.Tensor):
        return tuple(self.net(pair))


class _Conv6(_Features):
    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.net.conv6_features(pair)


class _Warp(nn.Module):
    def forward(self, features: torch.Tensor, flow: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return warp(features, flow, scale)


class _Policy(_Features):
    def forward(self, conv6: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net.key_probability(conv6, expert)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    module: nn.Module
    inputs: dict[str, tuple[int, ...]]
    outputs: tuple[str, ...]


def graph_specs(weights: WeightSet) -> list[GraphSpec]:
    """What to export for a weight set, with example input shapes (batch 1)."""
    seg = weights.load("segmentation")
    flow = weights.load("flow")
    s, fs, c = seg.config.input_size, flow.config.input_size, seg.config.feature_channels
    grid = (1, c, seg.config.feature_size, seg.config.feature_size)
    conv6 = (1, flow.config.conv6_channels, flow.config.conv6_size, flow.config.conv6_size)
    scale = (1, flow.config.scale_channels, *grid[2:])
    specs = [
        GraphSpec("segmentation_features", _Features(seg), {"image": (1, 3, s, s)}, ("features",)),
        GraphSpec("segmentation_task", _Task(seg), {"features": grid}, ("scores",)),
        GraphSpec("flow", _Flow(flow), {"pair": (1, 6, fs, fs)}, ("flow", "scale", "conv6")),
        GraphSpec("flow_conv6", _Conv6(flow), {"pair": (1, 6, fs, fs)}, ("conv6",)),
        GraphSpec(
            "warp",
            _Warp(),
            {"features": grid, "flow": (1, 2, *grid[2:]), "scale": scale},
            ("warped",),
        ),
    ]
    if weights.has("policy"):
        policy = weights.load("policy")
        specs.append(
            GraphSpec(
                "policy",
                _Policy(policy),
                {"conv6": conv6, "expert": (1, policy.config.expert_size)},
                ("key_probability",),
            )
        )
    if weights.has("dvsnet"):
        specs.append(GraphSpec("dvsnet", weights.load("dvsnet"), {"conv6": conv6}, ("score",)))
    if weights.has("correction"):
        corrector = weights.load("correction")
        side = corrector.config.image_size
        crops = (1, 3, side, side)
        scores = (1, corrector.config.num_classes, *grid[2:])
        inputs: dict[str, tuple[int, ...]] = {
            "current": crops,
            "key": crops,
            "flow": (1, 2, *grid[2:]),
            "scores": scores,
        }
        specs.append(GraphSpec("correction", corrector, inputs, ("corrected",)))
    return specs


def export_graph(spec: GraphSpec, path: Path, opset: int = OPSET) -> Path:
    args = tuple(torch.rand(shape) for shape in spec.inputs.values())
    axes = {name: {0: "batch"} for name in (*spec.inputs, *spec.outputs)}
    # a temporary name of its own: processes exporting into the same cache at once must not
    # rename each other's half-written files
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks in Python
            torch.onnx.export(
                spec.module.eval(),
                args,
                str(tmp),
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def export_onnx(weights: WeightSet, out_dir: str | Path, *, progress=None) -> dict[str, Path]:
    """Export every network of ``weights`` into ``out_dir``; returns {graph name: path}.

    A ``manifest.json`` records the weights' hashes, so that a cache can tell when to re-export.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    specs = graph_specs(weights)
    for spec in specs:
        if progress is not None:
            progress(spec.name)
        paths[spec.name] = export_graph(spec, out / f"{spec.name}.onnx")
    manifest = {
        "format": EXPORT_FORMAT,
        "opset": OPSET,
        "weights": weights.hashes(),
        "graphs": sorted(paths),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return paths


def cache_root() -> Path:
    env = os.environ.get("FACESTREAM_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "facestream"
    return base / "onnx"


def cached_export(weights: WeightSet, *, progress=None) -> dict[str, Path]:
    """The ONNX graphs of ``weights``, exported once into the cache and reused afterwards."""
    directory = cache_root() / weights.fingerprint()
    manifest = directory / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        graphs = {name: directory / f"{name}.onnx" for name in data.get("graphs", [])}
        fresh = data.get("format") == EXPORT_FORMAT and data.get("weights") == weights.hashes()
        if fresh and all(path.is_file() for path in graphs.values()):
            return graphs
    return export_onnx(weights, directory, progress=progress)
