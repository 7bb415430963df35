"""``facestream train {segmentation,flow,dvsnet,policy}``: resumable training runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from facestream.engines.dis_flow import DEFAULT_FLOW, FLOWS
from facestream.engines.pipeline import add_correct_argument
from facestream.models.config import POLICY_CUES, check_cues
from facestream.training.manifest import (
    DEFAULT_TEACHER,
    ManifestError,
    MirroredClip,
    ReversedClip,
    load_manifest,
    open_clips,
)
from facestream.training.runs import RunError, set_threads


def _cue_list(text: str) -> tuple[str, ...]:
    try:
        return check_cues([n.strip() for n in text.split(",") if n.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _class_list(text: str) -> tuple[int, ...]:
    from facestream.models import CLASS_NAMES

    ids = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name.isdigit() and int(name) < len(CLASS_NAMES):
            ids.append(int(name))
        elif name in CLASS_NAMES:
            ids.append(CLASS_NAMES.index(name))
        else:
            raise argparse.ArgumentTypeError(f"unknown class {name!r}: use ids or {', '.join(CLASS_NAMES)}")
    return tuple(ids)


def _stride_list(text: str) -> tuple[int, ...]:
    try:
        strides = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"strides are comma-separated whole numbers, got {text!r}") from None
    if not strides or min(strides) < 1:
        raise argparse.ArgumentTypeError(f"strides must be >= 1, got {text!r}")
    return strides


def _common(parser: argparse.ArgumentParser, out: str, *, resumable: bool = True) -> None:
    parser.add_argument("--manifest", default="default", help="manifest JSON or 'default' (../shared/data)")
    parser.add_argument(
        "--teacher", default=DEFAULT_TEACHER, help=f"label teacher (default: {DEFAULT_TEACHER})"
    )
    parser.add_argument(
        "--labels", type=Path, help="labels cache folder (default: ~/.cache/facestream/labels)"
    )
    if out:
        parser.add_argument("--out", type=Path, default=Path(out), help=f"run folder (default: {out})")
    else:
        parser.add_argument("--out", type=Path, help="output folder (default: the --weights folder)")
    if resumable:
        parser.add_argument("--fresh", action="store_true", help="discard the run folder's checkpoint")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")


def _segmentation(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from facestream.training.train_segmentation import SegTrainConfig

    d = SegTrainConfig()
    p = sub.add_parser("segmentation", help="N (DeepLab-V3+) from scratch on set A teacher labels")
    _common(p, "runs/segmentation")
    p.add_argument("--backbone", choices=("mobilenet_v2", "resnet50"), default=d.backbone)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--input-size", type=int, default=d.input_size)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--seed", type=int, default=d.seed)

    def run(args: argparse.Namespace) -> int:
        from facestream.training.train_segmentation import train_segmentation

        config = SegTrainConfig(
            manifest=str(args.manifest),
            teacher=args.teacher,
            backbone=args.backbone,
            input_size=args.input_size,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            val_every=args.val_every,
            bf16=not args.fp32,
            seed=args.seed,
        )
        manifest = load_manifest(config.manifest)
        progress = not args.no_progress
        train = open_clips(
            manifest, config.train_set, teacher=config.teacher, labels_dir=args.labels, progress=progress
        )
        val = open_clips(
            manifest, config.val_set, teacher=config.teacher, labels_dir=args.labels, progress=progress
        )
        card = {"data": f"manifest {manifest.name}, set {config.train_set}, teacher {config.teacher} labels"}
        path = train_segmentation(
            config, train, val, args.out, fresh=args.fresh, progress=progress, card=card
        )
        print(f"wrote {path}")
        return 0

    return run


def _flow(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from facestream.training.train_flow import FlowTrainConfig

    d = FlowTrainConfig()
    p = sub.add_parser(
        "flow",
        help="F (FlowNet2-s) from scratch: DIS distillation, then DFF fine-tuning with N frozen",
    )
    _common(p, "runs/flow")
    p.add_argument(
        "--segmentation",
        type=Path,
        help="N's segmentation.safetensors for the DFF stage (without it only the DIS stage runs)",
    )
    p.add_argument("--distil-steps", type=int, default=d.distil_steps)
    p.add_argument("--dff-steps", type=int, default=d.dff_steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seed", type=int, default=d.seed)

    def run(args: argparse.Namespace) -> int:
        from facestream.engines.weights import load_network
        from facestream.models import DeepLabV3Plus
        from facestream.training.train_flow import train_flow

        segmentation = None
        if args.segmentation is not None:
            segmentation = load_network(args.segmentation)
            if not isinstance(segmentation, DeepLabV3Plus):
                raise ValueError(f"{args.segmentation} is not a segmentation network")
        size = segmentation.config if segmentation is not None else None
        config = FlowTrainConfig(
            manifest=str(args.manifest),
            teacher=args.teacher,
            distil_steps=args.distil_steps,
            dff_steps=args.dff_steps,
            batch=args.batch,
            seed=args.seed,
            **(
                {
                    "crop_size": size.input_size,
                    "warp_size": size.feature_size,
                    "scale_channels": size.feature_channels,
                }
                if size is not None
                else {}
            ),
        )
        manifest = load_manifest(config.manifest)
        progress = not args.no_progress
        clips = open_clips(
            manifest, config.train_set, teacher=config.teacher, labels_dir=args.labels, progress=progress
        )
        card = {
            "data": f"manifest {manifest.name}, set {config.train_set}, teacher {config.teacher} labels",
            "segmentation_for_dff": str(args.segmentation) if args.segmentation else None,
        }
        path = train_flow(
            config, clips, segmentation, args.out, fresh=args.fresh, progress=progress, card=card
        )
        print(f"wrote {path}")
        return 0

    return run


def _correction(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from facestream.training.train_correction import CorrectionTrainConfig

    d = CorrectionTrainConfig()
    p = sub.add_parser(
        "correction",
        help="the warp corrector of non-key frames (not in the paper) on set A, N and DIS fixed",
    )
    _common(p, "runs/correction")
    p.add_argument(
        "--weights", type=Path, required=True, help="folder with the trained segmentation (and flow) weights"
    )
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-gap", type=int, default=d.max_gap, help="longest key-to-current distance")
    p.add_argument("--pairs-per-frame", type=int, default=d.pairs_per_frame)
    p.add_argument("--width", type=int, default=d.width, help="channels of the corrector")
    p.add_argument("--train-sets", default=d.train_set, help="training set(s), comma-separated (default: A)")
    p.add_argument(
        "--val-clips",
        type=lambda s: tuple(c.strip() for c in s.split(",") if c.strip()),
        default=d.val_clips,
        metavar="IDS",
        help="comma-separated clips of the training sets held out for validation instead of set B "
        "(needed when B is a training set)",
    )
    p.add_argument(
        "--image-factor",
        type=int,
        choices=(2, 4),
        default=d.image_factor,
        help="crops the corrector sees, in multiples of the score grid (2: 128², 4: N's full 256²)",
    )
    p.add_argument(
        "--protect",
        type=_class_list,
        default=d.protect,
        metavar="CLASSES",
        help="comma-separated classes left to the warp (names or ids; default: eyes; '' for none)",
    )
    p.add_argument(
        "--protect-margin",
        type=int,
        default=d.protect_margin,
        help="grid cells around the warp's protected pixels left alone too (default %(default)s)",
    )
    p.add_argument(
        "--train-protect-margin",
        type=int,
        default=d.train_protect_margin,
        help="the margin while training (default %(default)s, as the shipped corrector)",
    )
    p.add_argument(
        "--protect-grow",
        action=argparse.BooleanOptionalAction,
        default=d.protect_grow,
        help="in the guarded zone other classes may still lose score, so eyes grow but never shrink",
    )
    p.add_argument(
        "--train-protect-grow",
        action=argparse.BooleanOptionalAction,
        default=d.train_protect_grow,
        help="the same while training (default off, as the shipped corrector)",
    )
    p.add_argument(
        "--affine",
        type=float,
        default=d.affine,
        help="strength of random rotation/scale/aspect/shift of training pairs (default 0: off)",
    )
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--seed", type=int, default=d.seed)

    def run(args: argparse.Namespace) -> int:
        from facestream.engines.backends import create_networks
        from facestream.engines.weights import find_weights
        from facestream.training.train_correction import (
            CorrectionPairs,
            concat_pairs,
            make_correction_pairs,
            split_clips,
            train_correction,
        )

        config = CorrectionTrainConfig(
            manifest=str(args.manifest),
            teacher=args.teacher,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            max_gap=args.max_gap,
            pairs_per_frame=args.pairs_per_frame,
            width=args.width,
            train_set=args.train_sets,
            val_clips=args.val_clips,
            image_factor=args.image_factor,
            protect=args.protect,
            protect_margin=args.protect_margin,
            train_protect_margin=args.train_protect_margin,
            protect_grow=args.protect_grow,
            train_protect_grow=args.train_protect_grow,
            affine=args.affine,
            val_every=args.val_every,
            bf16=not args.fp32,
            seed=args.seed,
        )
        weights = find_weights(args.weights)
        networks = create_networks(weights, "onnxruntime", threads=args.threads, flow="dis", conv6=False)
        manifest = load_manifest(config.manifest)
        progress = not args.no_progress

        def pairs(clips: list, per_frame: int) -> CorrectionPairs:
            return make_correction_pairs(
                clips,
                networks,
                per_frame=per_frame,
                max_gap=config.max_gap,
                seed=config.seed,
                progress=progress,
                image_factor=config.image_factor,
            )

        train_sets, val_clips = split_clips(
            config,
            lambda s: open_clips(
                manifest, s, teacher=config.teacher, labels_dir=args.labels, progress=progress
            ),
        )
        train = concat_pairs([pairs(clips, config.pairs_per_frame) for clips in train_sets if clips])
        val = pairs(val_clips, config.val_pairs_per_frame)
        validation = ", ".join(config.val_clips) if config.val_clips else f"set {config.val_set}"
        card = {
            "data": f"manifest {manifest.name}, set {config.train_set} (validation {validation}), "
            f"teacher {config.teacher} labels; DIS flow; N {weights.fingerprint(('segmentation',))}",
        }
        path = train_correction(config, train, val, args.out, fresh=args.fresh, progress=progress, card=card)
        print(f"wrote {path}")
        return 0

    return run


def _calibrate(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "calibrate",
        help="activation ranges of the int8 warp corrector (correction-int8.json) on set A pairs, "
        "judged against float32 on set B",
    )
    _common(p, "", resumable=False)
    p.add_argument("--weights", type=Path, required=True, help="weights folder with correction.safetensors")
    p.add_argument("--pairs", type=int, default=256, help="random training pairs to measure ranges on")
    p.add_argument(
        "--train-set", default="A", help="set the pairs come from (default: A, as the corrector's)"
    )
    p.add_argument("--val-set", default="B", help="set int8 is judged on against float32 ('' for none)")
    p.add_argument("--max-gap", type=int, default=60, help="longest key-to-current distance")
    p.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from facestream.engines.backends import create_networks
        from facestream.engines.weights import find_weights
        from facestream.training.calibrate import calibrate_correction
        from facestream.training.train_correction import make_correction_pairs

        weights = find_weights(args.weights)
        if not weights.has("correction"):
            raise ValueError(f"no correction.safetensors in {weights.directory}")
        networks = create_networks(weights, "onnxruntime", threads=args.threads, flow="dis", conv6=False)
        manifest = load_manifest(args.manifest)
        progress = not args.no_progress

        def pairs(subset: str, per_frame: int):
            clips = open_clips(
                manifest, subset, teacher=args.teacher, labels_dir=args.labels, progress=progress
            )
            return make_correction_pairs(
                clips, networks, per_frame=per_frame, max_gap=args.max_gap, seed=args.seed, progress=progress
            )

        val = pairs(args.val_set, 2) if args.val_set else None
        card = {
            "data": f"manifest {manifest.name}, set {args.train_set} pairs (1 per frame, gaps "
            f"1-{args.max_gap}); judged on set {args.val_set or '-'} (2 pairs per frame), teacher "
            f"{args.teacher} labels; DIS flow",
            "validation": f"set {args.val_set}, gaps 1-{args.max_gap}, 2 per frame" if args.val_set else "",
            "command": " ".join(["facestream", *sys.argv[1:]]) if sys.argv[1:2] == ["train"] else "",
        }
        path = calibrate_correction(
            weights,
            pairs(args.train_set, 1),
            val,
            args.out or args.weights,
            count=args.pairs,
            seed=args.seed,
            threads=args.threads,
            card={k: v for k, v in card.items() if v},
        )
        print(f"wrote {path}")
        return 0

    return run


def _tables_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        type=Path,
        required=True,
        help="folder with the trained segmentation and flow safetensors",
    )
    parser.add_argument("--set", default="B", help="manifest set to learn from (default: B)")
    parser.add_argument(
        "--cache", type=Path, default=Path("runs/pairs"), help="pair-table cache (default: runs/pairs)"
    )
    parser.add_argument("--max-gap", type=int, default=90, help="longest key distance in the pair tables")
    parser.add_argument(
        "--flow",
        choices=FLOWS,
        default=DEFAULT_FLOW,
        help=f"warp flow of the tables (default: {DEFAULT_FLOW})",
    )
    parser.add_argument(
        "--no-track", action="store_true", help="tables with each key's face square held (not moved)"
    )
    parser.add_argument(
        "--reverse",
        action="store_true",
        help="also learn from every clip of the set played backwards (twice the tables)",
    )
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="also learn from every clip mirrored left to right (twice the tables again)",
    )
    add_correct_argument(parser)


def _pair_tables(args: argparse.Namespace) -> tuple[list, str]:
    from facestream.engines.backends import create_networks
    from facestream.engines.weights import find_weights
    from facestream.training.evaluation import EvalConfig, cached_pair_table, pair_fingerprint

    weights = find_weights(args.weights)
    networks = create_networks(weights, "onnxruntime", threads=args.threads, flow=args.flow, conv6=True)
    manifest = load_manifest(args.manifest)
    progress = not args.no_progress
    clips = open_clips(manifest, args.set, teacher=args.teacher, labels_dir=args.labels, progress=progress)
    if args.reverse:
        clips += [ReversedClip(c) for c in clips]
    if args.mirror:
        clips += [MirroredClip(c) for c in clips]
    config = EvalConfig(max_gap=args.max_gap, track=not args.no_track, correct=args.correct)
    fingerprint = pair_fingerprint(weights, config)
    corrected = args.correct and networks.has_correction
    tables = [cached_pair_table(c, networks, fingerprint, config, args.cache, progress) for c in clips]
    source = (
        f"manifest {manifest.name}, set {args.set}, teacher {args.teacher} labels; "
        f"N+F weights {fingerprint}; warp flow {args.flow}"
        + ("; warped frames through the warp corrector" if corrected else "")
        + ("; key squares held" if args.no_track else "; non-key crops follow the face")
        + ("; every clip also played backwards" if args.reverse else "")
        + ("; every clip also mirrored left to right" if args.mirror else "")
    )
    return tables, source


def _dvsnet(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from facestream.training.train_policy import DVSNetTrainConfig

    d = DVSNetTrainConfig()
    p = sub.add_parser(
        "dvsnet", help="the DVSNet baseline head: Conv6 features -> warped frame's mIoU (set B)"
    )
    _common(p, "runs/dvsnet")
    _tables_arguments(p)
    p.add_argument("--epochs", type=int, default=d.epochs)

    def run(args: argparse.Namespace) -> int:
        from facestream.training.train_policy import train_dvsnet

        tables, source = _pair_tables(args)
        config = DVSNetTrainConfig(epochs=args.epochs)
        path, fit = train_dvsnet(
            config, tables, args.out, progress=not args.no_progress, card={"data": source}
        )
        print(f"wrote {path}: " + ", ".join(f"{k} {v:.4g}" for k, v in fit.items()))
        return 0

    return run


def _policy(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from facestream.training.train_policy import REWARDS, PolicyTrainConfig

    d = PolicyTrainConfig()
    p = sub.add_parser("policy", help="the RL key policy (REINFORCE, paper section 3.2) on set B pair tables")
    _common(p, "runs/policy")
    _tables_arguments(p)
    p.add_argument(
        "--eta",
        type=float,
        default=d.eta,
        help="key budget: KAR limit of an episode (default 0.04; 1: no limit, with --key-cost)",
    )
    p.add_argument(
        "--key-cost",
        type=float,
        default=d.key_cost,
        help="mIoU each key costs, with --reward frame (a Lagrangian key budget; default 0: none)",
    )
    p.add_argument("--episodes", type=int, default=d.episodes)
    p.add_argument("--trials", type=int, default=d.trials, help="K trials per episode")
    p.add_argument("--episode-len", type=int, default=d.episode_len)
    p.add_argument("--entropy", type=float, default=d.entropy, help="entropy weight lambda1")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--reward",
        choices=REWARDS,
        default=d.reward,
        help="eq1: labels (paper); eq2: no labels (paper); frame: every frame earns its mIoU (labels)",
    )
    p.add_argument(
        "--reward-scale",
        type=float,
        default=d.reward_scale,
        help=f"reward units per mIoU (default {d.reward_scale:g})",
    )
    p.add_argument(
        "--advantage-norm",
        action="store_true",
        help="divide each update's advantages by their std, so that the entropy bonus keeps its weight",
    )
    p.add_argument(
        "--tf-rmsprop",
        action="store_true",
        help="RMSProp as TensorFlow's (accumulator starts at 1, decay 0.9) instead of torch's",
    )
    p.add_argument(
        "--normalize-input", action="store_true", help="standardise Conv6 per channel inside the policy"
    )
    p.add_argument(
        "--init-trunk", metavar="DVSNET", help="start Conv0/FC0 from a trained DVSNet head (.safetensors)"
    )
    p.add_argument("--freeze-trunk", action="store_true", help="keep the --init-trunk layers fixed")
    p.add_argument(
        "--cues",
        type=_cue_list,
        default=d.cues,
        metavar="NAMES",
        help="comma-separated per-frame cues added to the state next to [KAR, LKD] (from "
        f"{', '.join(POLICY_CUES)}; default: none, the paper's state)",
    )
    p.add_argument(
        "--quality",
        action="store_true",
        help="also copy the --init-trunk DVSNet head's quality output into the policy; FC3 sees "
        "that predicted mIoU next to FC2 (not in the paper)",
    )
    p.add_argument(
        "--strides",
        type=_stride_list,
        default=d.strides,
        metavar="N,N",
        help="frame-rate augmentation: also learn from the tables played N times faster (e.g. 1,2,3; "
        "default 1: as recorded)",
    )
    p.add_argument("--seed", type=int, default=d.seed)

    def run(args: argparse.Namespace) -> int:
        from facestream.training.train_policy import train_policy

        tables, source = _pair_tables(args)
        config = PolicyTrainConfig(
            eta=args.eta,
            episodes=args.episodes,
            trials=args.trials,
            episode_len=args.episode_len,
            entropy=args.entropy,
            lr=args.lr,
            reward=args.reward,
            reward_scale=args.reward_scale,
            key_cost=args.key_cost,
            advantage_norm=args.advantage_norm,
            rmsprop_init=1.0 if args.tf_rmsprop else 0.0,
            rmsprop_alpha=0.9 if args.tf_rmsprop else 0.99,
            normalize_input=args.normalize_input,
            init_trunk=args.init_trunk,
            freeze_trunk=args.freeze_trunk,
            cues=args.cues,
            quality=args.quality,
            strides=args.strides,
            seed=args.seed,
        )
        path = train_policy(
            config, tables, args.out, fresh=args.fresh, progress=not args.no_progress, card={"data": source}
        )
        print(f"wrote {path}")
        return 0

    return run


def _ensemble(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "policy-ensemble",
        help="one seed-ensemble policy (mean of the members' pi) from trained policies on one frozen trunk",
    )
    p.add_argument(
        "--member",
        type=Path,
        action="append",
        required=True,
        help="a trained policy run folder or file (repeat; same eta, trunk and data)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder for the ensemble's policy.safetensors")
    p.add_argument("--threads", type=int)

    def run(args: argparse.Namespace) -> int:
        from facestream.training.train_policy import ensemble_policies

        path = ensemble_policies(args.member, args.out)
        print(f"wrote {path} ({len(args.member)} members)")
        return 0

    return run


def _ship(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("ship", help="pack trained runs into a weights folder (float16) with model cards")
    p.add_argument(
        "--runs", type=Path, default=Path("runs"), help="folder of the training runs (default: runs)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("models/weights"), help="weights folder (default: models/weights)"
    )
    p.add_argument("--etas", default="0.04,0.06,0.14", help="policies to ship (one per eta)")
    p.add_argument("--default-eta", type=float, default=0.04, help="the policy shipped as policy.safetensors")
    p.add_argument("--metrics", type=Path, help="JSON {file stem: {metric: value}} to put on the model cards")
    p.add_argument("--teacher", default=DEFAULT_TEACHER)
    p.add_argument("--threads", type=int)

    def run(args: argparse.Namespace) -> int:
        import json

        from facestream.training.ship import default_sources, ship_weights

        etas = tuple(float(e) for e in args.etas.split(",") if e.strip())
        sources = default_sources(args.runs, etas, args.default_eta)
        metrics = json.loads(args.metrics.read_text()) if args.metrics else None
        commands = {}
        for name, path in sources.items():
            config = path.parent / "config.json"
            if config.is_file():
                commands[name] = " ".join(["facestream", *json.loads(config.read_text())["command"][1:]])
        written = ship_weights(sources, args.out, metrics=metrics, commands=commands, teacher=args.teacher)
        total = sum(p.stat().st_size for p in written.values()) / 1e6
        print(f"wrote {len(written)} networks to {args.out} ({total:.1f} MB)")
        return 0

    return run


BUILDERS = (_segmentation, _flow, _correction, _calibrate, _dvsnet, _policy, _ensemble, _ship)


class TrainCommand:
    name = "train"
    help = "train N, F, the warp corrector, the DVSNet head or the RL key policy (resumable runs)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="network", metavar="NETWORK", required=True)
        for build in BUILDERS:
            before = set(sub.choices)
            run = build(sub)
            for name in set(sub.choices) - before:
                sub.choices[name].set_defaults(_train=run)

    def run(self, args: argparse.Namespace) -> int:
        set_threads(args.threads)
        try:
            return int(args._train(args))
        except (RunError, ManifestError, OSError, ValueError) as exc:
            print(f"facestream train {args.network}: error: {exc}", file=sys.stderr)
            return 2
