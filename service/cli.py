"""``facestream serve``, ``facestream client`` and ``facestream bench-service``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import uvicorn

from facestream.engines.backends import BACKENDS
from facestream.engines.dis_flow import FLOWS, add_dis_size_argument
from facestream.engines.int8 import PRECISIONS
from facestream.engines.schedulers import SCHEDULERS
from facestream.engines.weights import WeightsError, find_weights
from facestream.service.app import create_app
from facestream.service.bench import ServiceBenchOptions, run_service_bench
from facestream.service.client import encode_frames, mask_writer, read_frames, run_clients, stream_url
from facestream.service.settings import MASK_FORMATS, SettingsError, load_settings


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size is WIDTHxHEIGHT, e.g. 640x480; got {text!r}") from None
    return width, height


class ServeCommand:
    name = "serve"
    help = "run the streaming service (WebSocket /ws, cameras /streams, /metrics, browser page /)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", type=Path, metavar="FILE", help="settings file (.toml or .json)")
        parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
        parser.add_argument("--port", type=int, help="port (default 8000)")
        parser.add_argument("--weights", metavar="DIR", help="weights folder (default: the shipped ones)")
        parser.add_argument("--backend", choices=BACKENDS)
        parser.add_argument("--flow", choices=FLOWS)
        add_dis_size_argument(parser)
        parser.add_argument("--threads", type=int, help="CPU threads for inference")
        parser.add_argument(
            "--no-correct",
            dest="correct",
            action="store_false",
            default=None,
            help="do not run the warp corrector on non-key frames (the paper's pipeline)",
        )
        parser.add_argument(
            "--correct-precision", choices=PRECISIONS, help="the corrector's arithmetic (default auto)"
        )
        parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default scheduler of a stream")
        parser.add_argument("--knob", type=float, help="the default scheduler's knob")
        parser.add_argument("--max-streams", type=int)
        parser.add_argument("--token", help="bearer token for /streams and the WebSockets")
        parser.add_argument(
            "--validate-config",
            action="store_true",
            help="check the settings (file, FACESTREAM_* environment, arguments) and the weights, "
            "print the effective settings, and exit",
        )

    def run(self, args: argparse.Namespace) -> int:
        overrides = {
            "host": args.host,
            "port": args.port,
            "weights": args.weights,
            "backend": args.backend,
            "flow": args.flow,
            "dis_size": args.dis_size,
            "threads": args.threads,
            "correct": args.correct,
            "correct_precision": args.correct_precision,
            "scheduler": args.scheduler,
            "knob": args.knob,
            "max_streams": args.max_streams,
            "token": args.token,
        }
        try:
            settings = load_settings(args.config, **overrides)
            weights = find_weights(settings.weights)
        except (SettingsError, WeightsError) as exc:
            print(f"facestream serve: {exc}", file=sys.stderr)
            return 2
        if args.validate_config:
            print(json.dumps({**settings.public(), "weights_found": str(weights.directory)}, indent=2))
            print("configuration OK", file=sys.stderr)
            return 0
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            ws_max_size=2 * settings.max_frame_bytes + (1 << 20),
        )
        return 0


class ClientCommand:
    name = "client"
    help = "stream a video to a running service over /ws and report round-trip times"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("video", help="video file, webcam index or rtsp:// URL")
        parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="the service's /ws URL")
        parser.add_argument("--fps", type=float, default=30.0, help="frames sent per second (default 30)")
        parser.add_argument("--frames", type=int, default=300, help="frames to send (default 300)")
        parser.add_argument("--size", type=_size, help="resize frames to WIDTHxHEIGHT before sending")
        parser.add_argument("--scheduler", choices=sorted(SCHEDULERS))
        parser.add_argument("--knob", type=float)
        parser.add_argument("--format", choices=MASK_FORMATS, default="png", help="mask format (default png)")
        parser.add_argument("--clients", type=int, default=1, help="concurrent connections (default 1)")
        parser.add_argument("--token", help="bearer token")
        parser.add_argument("--masks", type=Path, metavar="DIR", help="save the PNG masks (one client)")
        parser.add_argument("--report", type=Path, metavar="JSON", help="write the summary")

    def run(self, args: argparse.Namespace) -> int:
        frames = encode_frames(read_frames(args.video, args.frames), args.size)
        if not frames:
            print(f"facestream client: no frames in {args.video}", file=sys.stderr)
            return 2
        url = stream_url(args.url, scheduler=args.scheduler, knob=args.knob, format=args.format)
        on_result = mask_writer(args.masks) if args.masks and args.clients == 1 else None
        try:
            stats = asyncio.run(
                run_clients(url, frames, args.clients, fps=args.fps, token=args.token, on_result=on_result)
            )
        except (OSError, RuntimeError) as exc:
            print(f"facestream client: {exc}", file=sys.stderr)
            return 1
        report = {"url": url, "frames": len(frames), "fps": args.fps, "clients": [s.summary() for s in stats]}
        text = json.dumps(report, indent=2)
        print(text)
        if args.report:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(text)
        return 0


class BenchServiceCommand:
    name = "bench-service"
    help = "start the service, stream a clip over /ws with 1 and 4 clients; JSON + PNG report"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clip", required=True, help="video clip to stream")
        parser.add_argument("--frames", type=int, default=300)
        parser.add_argument("--fps", type=float, default=30.0)
        parser.add_argument(
            "--size", type=_size, default=(640, 480), help="frame size sent (default 640x480)"
        )
        parser.add_argument("--clients", default="1,4", help="comma-separated client counts (default 1,4)")
        parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="fixed")
        parser.add_argument("--knob", type=float)
        parser.add_argument("--threads", type=int, help="the server's inference threads")
        parser.add_argument("--weights", metavar="DIR")
        parser.add_argument("--out", type=Path, default=Path("bench"), help="output folder (default bench/)")

    def run(self, args: argparse.Namespace) -> int:
        try:
            counts = [int(c) for c in args.clients.split(",")]
        except ValueError:
            print(
                f"facestream bench-service: --clients is a list like 1,4; got {args.clients!r}",
                file=sys.stderr,
            )
            return 2
        options = ServiceBenchOptions(
            clip=args.clip,
            frames=args.frames,
            fps=args.fps,
            size=args.size,
            clients=tuple(counts),
            scheduler=args.scheduler,
            knob=args.knob,
            threads=args.threads,
            weights=args.weights,
            out=args.out,
        )
        try:
            report = run_service_bench(options)
        except (OSError, RuntimeError) as exc:
            print(f"facestream bench-service: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(report["runs"], indent=2))
        return 0
