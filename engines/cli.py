"""The engine's subcommands: ``segment``, ``export``, ``bench`` and ``build-engines``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facestream.engines.backend_choice import BackendUnavailable
from facestream.engines.backends import BACKENDS, CPU_BACKENDS, DEFAULT_BACKEND
from facestream.engines.dis_flow import DEFAULT_FLOW, FLOWS, add_dis_size_argument
from facestream.engines.export import export_onnx
from facestream.engines.int8 import Int8Unavailable, add_precision_argument
from facestream.engines.pipeline import add_correct_argument
from facestream.engines.schedulers import SCHEDULERS
from facestream.engines.segment import SegmentOptions, run_segment
from facestream.engines.tensorrt_build import (
    DEFAULT_MAX_BATCH,
    EngineBuildError,
    TensorRTError,
    TensorRTUnavailable,
    build_engines,
)
from facestream.engines.weights import WeightsError, find_weights

_KNOB_FLAGS = {"interval": "fixed", "rate": "random", "threshold": "flow|dvsnet", "tau": "rl"}


def _fail(command: str, error: Exception) -> int:
    print(f"facestream {command}: error: {error}", file=sys.stderr)
    return 2


def _weights_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        metavar="DIR",
        help="folder with segmentation/flow/policy/dvsnet .safetensors "
        "(default: $FACESTREAM_WEIGHTS, else the weights shipped with the package)",
    )


def _flow_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flow",
        choices=FLOWS,
        default=DEFAULT_FLOW,
        help="flow to warp by: flownet = the learned FlowNet2-s F; dis = OpenCV DIS optical flow "
        "(medium preset, no learned flow); the rl/dvsnet schedulers still use F's Conv6 features "
        f"(default: {DEFAULT_FLOW})",
    )


def _knob(args: argparse.Namespace) -> float | None:
    """The one knob flag given, checked against the scheduler it belongs to."""
    given = {name: getattr(args, name) for name in _KNOB_FLAGS if getattr(args, name) is not None}
    if len(given) > 1:
        raise ValueError(f"give at most one of --{', --'.join(given)}")
    if not given:
        return None
    ((name, value),) = given.items()
    owner = SCHEDULERS[args.scheduler].knob
    if owner != name:
        raise ValueError(f"--{name} applies to the {_KNOB_FLAGS[name]} scheduler, not {args.scheduler!r}")
    return value


class SegmentCommand:
    name = "segment"
    help = "segment faces in a video file, webcam (index) or rtsp:// stream"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("input", help="video file, webcam index (0, 1, ...) or rtsp:// URL")
        parser.add_argument(
            "--scheduler",
            choices=sorted(SCHEDULERS),
            default="fixed",
            help="key scheduler (default: fixed)",
        )
        parser.add_argument("--interval", type=int, help="fixed: key every N frames (default 30)")
        parser.add_argument("--rate", type=float, help="random: key probability per frame")
        parser.add_argument(
            "--threshold",
            type=float,
            help="flow: mean flow magnitude in pixels; dvsnet: predicted score",
        )
        parser.add_argument("--tau", type=float, help="rl: key when pi(key|s) > tau (default 0.5)")
        parser.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND)
        _flow_argument(parser)
        add_dis_size_argument(parser)
        add_correct_argument(parser)
        add_precision_argument(parser)
        parser.add_argument("--size", type=int, help="face crop side in pixels (must match the weights)")
        _weights_argument(parser)
        parser.add_argument("--out", type=Path, metavar="VIDEO", help="write an overlay video (mp4)")
        parser.add_argument("--masks", type=Path, metavar="DIR", help="write one PNG of class ids per frame")
        parser.add_argument("--report", type=Path, metavar="JSON", help="write the run report")
        parser.add_argument("--max-frames", type=int, help="stop after N frames")
        parser.add_argument("--threads", type=int, help="CPU threads for inference")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        try:
            options = SegmentOptions(
                source=args.input,
                scheduler=args.scheduler,
                knob=_knob(args),
                backend=args.backend,
                size=args.size,
                weights=args.weights,
                out=args.out,
                masks=args.masks,
                report=args.report,
                max_frames=args.max_frames,
                threads=args.threads,
                progress=not args.no_progress,
                flow=args.flow,
                dis_size=args.dis_size,
                correct=args.correct,
                correct_precision=args.correct_precision,
            )
            report = run_segment(options)
        except (WeightsError, ValueError, OSError, BackendUnavailable, TensorRTError, Int8Unavailable) as exc:
            return _fail(self.name, exc)
        keys, frames = report["keys"], report["frames"]
        print(
            f"{frames} frames, {keys} keys (AKI {report['aki'] or 0:.1f}), "
            f"{report['fps']} FPS processing, backend {report['backend']}"
            + (f", {report['correction_precision']} corrector" if report["correction_precision"] else "")
        )
        return 0


class ExportCommand:
    name = "export"
    help = "export every network of a weights folder to ONNX (opset 17, dynamic batch)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _weights_argument(parser)
        parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")

    def run(self, args: argparse.Namespace) -> int:
        try:
            weights = find_weights(args.weights)
            paths = export_onnx(
                weights, args.out, progress=lambda n: print(f"exporting {n} ...", file=sys.stderr)
            )
        except (WeightsError, OSError) as exc:
            return _fail(self.name, exc)
        print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
        return 0


class BenchCommand:
    name = "bench"
    help = "measure per-stage cost and end-to-end FPS per scheduler (JSON + PNG)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clip", type=Path, required=True, help="a face video to run on")
        parser.add_argument("--out", type=Path, default=Path("bench"), help="output folder")
        parser.add_argument("--threads", type=int, default=2)
        parser.add_argument("--repeats", type=int, default=20)
        parser.add_argument("--frames", type=int, default=300, help="frames of the clip for end-to-end FPS")
        parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
        parser.add_argument(
            "--backends",
            nargs="+",
            choices=BACKENDS,
            default=list(CPU_BACKENDS),
            help=f"backends to measure (default: {' '.join(CPU_BACKENDS)}; GPUs: make bench-gpu)",
        )
        parser.add_argument("--key-backbone", choices=["mobilenet_v2", "resnet50"], default="resnet50")
        _flow_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        # bench plots with matplotlib, which comes with the `bench`/`dev` extras only
        from facestream.engines.bench import format_tables, run_benchmark

        result = run_benchmark(
            clip=args.clip,
            out_dir=args.out,
            sizes=tuple(args.sizes),
            backends=tuple(args.backends),
            threads=args.threads,
            repeats=args.repeats,
            pipeline_frames=args.frames,
            key_backbone=args.key_backbone,
            flow=args.flow,
        )
        print(format_tables(result))
        print(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
        return 0


class BuildEnginesCommand:
    name = "build-engines"
    help = "build TensorRT engines of every network into the engine cache (needs a CUDA GPU and TensorRT)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        _weights_argument(parser)
        parser.add_argument(
            "--out",
            type=Path,
            metavar="CACHE",
            help="engine cache folder (default: $FACESTREAM_CACHE/trt, else ~/.cache/facestream/trt)",
        )
        precision = parser.add_mutually_exclusive_group()
        precision.add_argument(
            "--fp16",
            dest="precision",
            action="store_const",
            const="fp16",
            help="FP16 engines where the GPU has fast FP16 (the default)",
        )
        precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32")
        parser.set_defaults(precision="fp16")
        parser.add_argument(
            "--max-batch",
            type=int,
            default=DEFAULT_MAX_BATCH,
            help=f"largest batch (default {DEFAULT_MAX_BATCH})",
        )
        parser.add_argument("--workspace-gb", type=float, help="TensorRT builder workspace limit in GiB")

    def run(self, args: argparse.Namespace) -> int:
        def say(message: str) -> None:
            print(f"build-engines: {message}", file=sys.stderr, flush=True)

        try:
            weights = find_weights(args.weights)
            engines = build_engines(
                weights,
                out=args.out,
                precision=args.precision,
                max_batch=args.max_batch,
                workspace_gb=args.workspace_gb,
                progress=say,
            )
        except TensorRTUnavailable as exc:
            return _fail(self.name, exc)
        except EngineBuildError as exc:
            print(f"facestream {self.name}: error: {exc}", file=sys.stderr)
            return 1
        except (WeightsError, ValueError, OSError) as exc:
            return _fail(self.name, exc)
        key = engines.key
        say(f"{key.precision} engines for {key.gpu}, TensorRT {key.tensorrt}, batch 1..{key.max_batch}")
        print(json.dumps({name: str(path) for name, path in engines.plans.items()}, indent=2))
        return 0
