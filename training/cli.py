"""The training extra's subcommands: ``label``, ``manifest`` and ``evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facestream.engines.backends import BACKENDS, DEFAULT_BACKEND, create_networks
from facestream.engines.dis_flow import DEFAULT_FLOW, FLOWS, add_dis_size_argument
from facestream.engines.pipeline import add_correct_argument
from facestream.engines.schedulers import SCHEDULERS
from facestream.engines.weights import WeightsError, find_weights
from facestream.training.compare import compare_teachers
from facestream.training.evaluation import SCHEDULER_NAMES, EvalConfig, pair_fingerprint
from facestream.training.labelling import label_video, make_teacher
from facestream.training.manifest import (
    DEFAULT_TEACHER,
    SETS,
    Entry,
    Manifest,
    ManifestError,
    load_manifest,
    manifest_from_300vw,
    manifest_from_300vw_mask,
    manifest_from_videos,
    open_clips,
)
from facestream.training.sweep import SweepOptions, evaluate
from facestream.training.teachers import TEACHERS, TeacherError


def _fail(command: str, error: Exception) -> int:
    print(f"facestream {command}: error: {error}", file=sys.stderr)
    return 2


class LabelCommand:
    name = "label"
    help = "teacher labels (5 classes from facial landmarks) for face videos, with overlay sheets"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("videos", nargs="+", type=Path, metavar="VIDEO")
        parser.add_argument(
            "--out", type=Path, default=Path("labels"), help="output folder (default: labels/)"
        )
        parser.add_argument("--teacher", choices=TEACHERS, default="dlib68", help="default: dlib68 (iBUG-68)")
        parser.add_argument("--max-frames", type=int, help="label only the first N frames")
        parser.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        try:
            with make_teacher(args.teacher) as teacher:
                for video in args.videos:
                    if not video.is_file():
                        raise FileNotFoundError(f"{video} is not a video file")
                    labels = label_video(
                        video,
                        args.out / video.stem,
                        teacher,
                        max_frames=args.max_frames,
                        progress=not args.no_progress,
                    )
                    done, total = len(labels.labelled), len(labels.records)
                    share = 100.0 * done / total if total else 0.0
                    print(f"{video}: {done}/{total} frames with a face ({share:.1f}%) -> {labels.folder}")
        except (TeacherError, OSError, ValueError) as exc:
            return _fail(self.name, exc)
        return 0


class CompareTeachersCommand:
    name = "compare-teachers"
    help = "agreement and still-frame jitter of two teachers' label folders (JSON + PNG)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("a", type=Path, help="label folder of teacher A (facestream label --out)")
        parser.add_argument("b", type=Path, help="label folder of teacher B")
        parser.add_argument("--out", type=Path, default=Path("teacher-comparison"))
        parser.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        try:
            summary = compare_teachers(args.a, args.b, args.out, progress=not args.no_progress)
        except (OSError, ValueError) as exc:
            return _fail(self.name, exc)
        keys = (
            "teacher_a",
            "teacher_b",
            "face_rate_a",
            "face_rate_b",
            "agreement_miou",
            "still_miou_a",
            "still_miou_b",
        )
        print(json.dumps({k: summary[k] for k in keys}))
        return 0


class ManifestCommand:
    name = "manifest"
    help = "write a dataset manifest (videos split by subject into sets A, B, C)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--videos", nargs="+", type=Path, help="video files or folders of videos")
        source.add_argument("--300vw", dest="vw", type=Path, metavar="ROOT", help="a 300VW folder")
        source.add_argument("--300vw-mask", dest="vw_mask", type=Path, metavar="ROOT", help="300VW-Mask")
        source.add_argument("--default", action="store_true", help="the built-in split of ../shared/data")
        parser.add_argument("--out", type=Path, required=True, metavar="JSON")
        parser.add_argument("--split", default=None, help="fractions of A,B,C (default 0.45,0.45,0.1)")
        parser.add_argument("--seed", type=int, default=0)

    def run(self, args: argparse.Namespace) -> int:
        try:
            fractions = tuple(float(v) for v in args.split.split(",")) if args.split else None
            manifest = _build_manifest(args, fractions)
            manifest.save(args.out)
        except (ManifestError, OSError, ValueError) as exc:
            return _fail(self.name, exc)
        counts = {s: len(manifest.videos(s)) for s in SETS}
        print(
            f"{args.out}: {len(manifest.entries)} videos, " + ", ".join(f"{s} {n}" for s, n in counts.items())
        )
        return 0


def _build_manifest(args: argparse.Namespace, fractions: tuple[float, ...] | None) -> Manifest:
    if args.videos:
        return manifest_from_videos(args.videos, fractions=fractions or (0.45, 0.45, 0.1), seed=args.seed)
    if args.vw:
        return manifest_from_300vw(args.vw, fractions=fractions or (51, 51, 12), seed=args.seed)
    if args.vw_mask:
        return manifest_from_300vw_mask(args.vw_mask)
    return load_manifest("default")


class EvaluateCommand:
    name = "evaluate"
    help = "sweep every key scheduler on a test set: AKI, mIoU, FPS, the oracle, the paper's figures"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        data = parser.add_mutually_exclusive_group()
        data.add_argument("--manifest", default="default", help="manifest JSON or 'default' (shared clips)")
        data.add_argument(
            "--videos", nargs="+", type=Path, help="plain videos (labelled by the teacher, cached)"
        )
        parser.add_argument("--set", default="C", choices=SETS, help="which set to evaluate (default C)")
        parser.add_argument(
            "--schedulers", default="all", help=f"'all' or a comma list of {','.join(SCHEDULER_NAMES)}"
        )
        parser.add_argument(
            "--sweep", action="store_true", help="sweep each scheduler's knob (else its default)"
        )
        parser.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder")
        parser.add_argument(
            "--weights", metavar="DIR", help="weights folder (default: shipped / $FACESTREAM_WEIGHTS)"
        )
        parser.add_argument(
            "--policy", type=Path, action="append", default=[], help="RL policy file (repeat per η)"
        )
        parser.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND)
        parser.add_argument(
            "--flow",
            choices=FLOWS,
            default=DEFAULT_FLOW,
            help="warp flow: learned F (flownet) or OpenCV DIS (dis; F still gives rl/dvsnet Conv6)",
        )
        add_dis_size_argument(parser)
        add_correct_argument(parser)
        parser.add_argument(
            "--no-track",
            action="store_true",
            help="hold each key's face square for its non-key frames (default: move it with the face)",
        )
        parser.add_argument(
            "--teacher",
            choices=TEACHERS,
            help=f"labeller of unlabelled videos (default: the manifest's, else {DEFAULT_TEACHER})",
        )
        parser.add_argument(
            "--labels", type=Path, help="label cache folder (default ~/.cache/facestream/labels)"
        )
        parser.add_argument("--cache", type=Path, help="pair-table cache (default OUT/cache)")
        parser.add_argument("--max-gap", type=int, default=EvalConfig.max_gap, help="longest key distance")
        parser.add_argument("--max-frames", type=int, help="use only the first N frames of each video")
        parser.add_argument(
            "--aki", type=float, default=30.0, help="AKI of the histogram/timeline/mask figures"
        )
        parser.add_argument("--timeline-clip", help="clip of the timeline and mask figures (default: first)")
        parser.add_argument(
            "--starts",
            type=int,
            default=1,
            help="watch every clip from this many start frames, --start-step apart, and pool them "
            "(every scheduler then has as many key grids as fixed has phases; default 1)",
        )
        parser.add_argument("--start-step", type=int, default=10, help="frames between starts (default 10)")
        parser.add_argument("--threads", type=int, help="CPU threads for inference")
        parser.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        try:
            weights = find_weights(args.weights)
            schedulers = _scheduler_list(args.schedulers)
            policies = tuple(args.policy) or ((weights.paths["policy"],) if weights.has("policy") else ())
            manifest = _evaluation_manifest(args)
            clips = open_clips(
                manifest,
                args.set,
                teacher=args.teacher,
                labels_dir=args.labels,
                max_frames=args.max_frames,
                progress=not args.no_progress,
            )
            conv6 = any(SCHEDULERS[name].needs_conv6 for name in schedulers)
            networks = create_networks(
                weights,
                args.backend,
                threads=args.threads,
                flow=args.flow,
                conv6=conv6,
                dis_size=args.dis_size,
            )
            options = SweepOptions(
                schedulers=schedulers,
                sweep=args.sweep,
                policies=policies,
                chosen_aki=args.aki,
                timeline_clip=args.timeline_clip,
                starts=args.starts,
                start_step=args.start_step,
                config=EvalConfig(max_gap=args.max_gap, track=not args.no_track, correct=args.correct),
                cache=args.cache or args.out / "cache",
                progress=not args.no_progress,
            )
            report = evaluate(clips, networks, pair_fingerprint(weights, options.config), options, args.out)
        except (WeightsError, ManifestError, TeacherError, OSError, ValueError) as exc:
            return _fail(self.name, exc)
        print(
            json.dumps({"out": str(args.out), "rows": len(report["rows"]), "timings_s": report["timings_s"]})
        )
        return 0


def _scheduler_list(spec: str) -> tuple[str, ...]:
    names = SCHEDULER_NAMES if spec == "all" else tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [n for n in names if n not in SCHEDULER_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown schedulers {unknown}: choose from {', '.join(SCHEDULER_NAMES)} or 'all'")
    return tuple(names)


def _evaluation_manifest(args: argparse.Namespace) -> Manifest:
    if args.videos:
        missing = [str(v) for v in args.videos if not v.is_file()]
        if missing:
            raise FileNotFoundError(f"no such video: {', '.join(missing)}")
        entries = tuple(Entry(v.stem, v.stem, args.set, "video", str(v.resolve())) for v in args.videos)
        return Manifest("videos", args.teacher or DEFAULT_TEACHER, entries, Path.cwd())
    return load_manifest(args.manifest)
