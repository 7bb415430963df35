"""Packing trained runs into the shipped weights folder, each file with a model card.

``ship_weights`` copies the networks of the run folders into one weights folder (float16 tensors:
half the size, and loading casts them back), adds the measured metrics to the card in each file's
metadata, and writes a human-readable model card ``<name>.md`` next to each file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from facestream.engines.weights import FILES, REQUIRED, file_sha256, load_network, read_metadata, save_network
from facestream.models.config import config_from_json, config_to_dict

LICENCE = {
    "mediapipe": "labels from MediaPipe Face Mesh (Apache-2.0 model); the videos' own licences apply "
    "(see ../shared/data/README.md)",
    "dlib68": "labels from dlib's 68-point predictor, trained on iBUG 300-W: research use only; the "
    "videos' own licences apply",
}


def card_of(path: Path) -> dict[str, Any]:
    return json.loads(read_metadata(path).get("card", "{}"))


def ship_weights(
    sources: Mapping[str, Path],
    out: Path,
    *,
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    commands: Mapping[str, str] | None = None,
    teacher: str = "mediapipe",
) -> dict[str, Path]:
    """Copy ``sources`` (file name stem -> trained safetensors) into ``out`` with model cards."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, source in sources.items():
        module = load_network(source)
        card = card_of(source)
        card.update(
            {
                "licence": LICENCE.get(teacher, f"labels from the {teacher} teacher"),
                "command": (commands or {}).get(name, card.get("command", "")),
                "stored_as": "float16",
            }
        )
        # Shipping the same run again (say, with new evaluation metrics for the .md card) keeps the
        # file as it is: safetensors orders its metadata differently on each write, and pair-table
        # caches are keyed on the files' hashes.
        path = out / f"{name}.safetensors"
        if not _unchanged(path, module, card):
            save_network(module, path, card, half=True)
        shown = {**card, "metrics": dict((metrics or {}).get(name, {}))}
        (out / f"{name}.md").write_text(model_card(name, path, shown))
        written[name] = path
    return written


def _unchanged(path: Path, module: Any, card: Mapping[str, Any]) -> bool:
    """Whether ``path`` already holds ``module`` (as float16) with this card."""
    if not path.is_file():
        return False
    try:
        metadata = read_metadata(path)
        if json.loads(metadata.get("card", "{}")) != json.loads(json.dumps(card)):
            return False
        stored = load_network(path).state_dict()
    except Exception:
        return False
    current = module.state_dict()
    if stored.keys() != current.keys():
        return False
    return all(
        torch.equal(stored[k], v.half().to(v.dtype) if v.is_floating_point() else v)
        for k, v in current.items()
    )


def model_card(name: str, path: Path, card: Mapping[str, Any]) -> str:
    # the config the network runs with: the stored one, with defaults for fields added since
    config = config_to_dict(config_from_json(read_metadata(path)["config"]))
    size_mb = path.stat().st_size / 1e6
    stored = card.get("stored_as", "float32")
    params = card.get("parameters")
    params_text = f"{params:,}" if isinstance(params, int) else "?"
    lines = [
        f"# {name}.safetensors",
        "",
        f"**Network**: {card.get('network', config.get('kind'))}  ",
        f"**Config**: `{json.dumps(config, sort_keys=True)}`  ",
        f"**Parameters**: {params_text}; file {size_mb:.1f} MB ({stored})  ",
        f"**sha256**: `{file_sha256(path)}`",
        "",
        "## Data",
        str(card.get("data", "?")),
        "",
        f"Licence note: {card.get('licence', '?')}.",
        "",
        "## How it was made",
        f"```\n{card.get('command') or '?'}\n```",
    ]
    if "train_minutes" in card:
        lines.append(f"Training time: {card['train_minutes']} min on 2 CPU cores.")
    train = card.get("train")
    if train:
        lines += [
            "",
            "<details><summary>training config</summary>",
            "",
            "```json",
            json.dumps(train, indent=2),
            "```",
            "</details>",
        ]
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["", "## Measured", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    extra = {k: v for k, v in card.items() if k not in _SHOWN}
    if extra:
        lines += ["", "## Other facts from training", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in sorted(extra.items())]
    return "\n".join(lines) + "\n"


_SHOWN = {
    "network",
    "parameters",
    "stored_as",
    "data",
    "licence",
    "command",
    "train_minutes",
    "train",
    "metrics",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def default_sources(runs: Path, etas: tuple[float, ...], default_eta: float) -> dict[str, Path]:
    """The run folders ``make train-all`` writes, by shipped file stem (those trained so far;
    N and F are required)."""
    sources = {
        "segmentation": runs / "segmentation" / FILES["segmentation"],
        "flow": runs / "flow" / FILES["flow"],
        "correction": runs / "correction" / FILES["correction"],
        "dvsnet": runs / "dvsnet" / FILES["dvsnet"],
        "policy": runs / f"policy-eta{default_eta:g}" / FILES["policy"],
    }
    for eta in etas:
        if eta != default_eta:
            sources[f"policy-eta{eta:g}"] = runs / f"policy-eta{eta:g}" / FILES["policy"]
    missing = [str(p) for n, p in sources.items() if n in REQUIRED and not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing trained networks: {', '.join(missing)} (run make train-all)")
    return {n: p for n, p in sources.items() if p.is_file()}
