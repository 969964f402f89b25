"""The ``probunet`` command line: thin wrappers over the library.

User errors (bad path, bad config key, bad file) exit non-zero with one line on
stderr and no traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .options import EvaluateOptions, PredictOptions, TrainOptions, add_arguments, from_args

logger = logging.getLogger("probunet")


class UserError(Exception):
    """An error caused by the user's input: reported in one line."""


def _user_errors() -> tuple:
    from .config import ConfigError
    from .data.errors import DataError
    from .nonfinite import TrainingError
    from .guards import WriteError
    from .utils import FolderBusyError

    return (UserError, ConfigError, DataError, TrainingError, FolderBusyError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError, ValueError, WriteError)


# ----------------------------------------------------------------------------- commands


def cmd_synth(args) -> int:
    from .data import synthetic

    out = Path(args.out)
    t0 = time.perf_counter()
    items = synthetic.generate(args.num_cases, args.size, args.spatial_dims, args.num_raters, args.seed)
    params = {"num_cases": args.num_cases, "size": args.size, "spatial_dims": args.spatial_dims,
              "num_raters": args.num_raters, "seed": args.seed}
    synthetic.write_qubiq(items, out, params=params)
    print(f"wrote {len(items)} cases ({args.spatial_dims}D, {args.size}px, {args.num_raters} raters) "
          f"to {out} in {time.perf_counter() - t0:.1f}s; truth in {out / 'truth.json'}")
    return 0


def _default_run_dir(config: str) -> Path:
    return Path("runs") / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args) -> int:
    from .config import load_config
    from .train import fit

    opts = from_args(TrainOptions, args)
    cfg = load_config(opts.config, opts.overrides)
    run_dir = Path(opts.out) if opts.out else _default_run_dir(opts.config)
    summary = fit(cfg, run_dir, resume=opts.resume, progress=not args.no_progress)
    from .distributed import dist_info

    if dist_info().is_main:
        print(f"run directory: {run_dir}")
        print(f"  checkpoints: {run_dir / 'checkpoints'} (last.pt, best.pt)")
        print(f"  metrics:     {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})")
        if summary.get("figure"):
            print(f"  samples:     {summary['figure']}")
        if summary.get("val_ged") is not None:
            print(f"  validation GED {summary['val_ged']:.4f}, sample diversity "
                  f"{summary['val_sample_diversity']:.4f}")
        message = (summary.get("collapse") or {}).get("message")
        if message:
            print(f"warning: {message}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_cli

    return evaluate_cli(args)


def cmd_predict(args) -> int:
    from .predict import predict_cli

    return predict_cli(args)


def cmd_demo(args) -> int:
    """synth -> train -> evaluate on the embedded synthetic default."""
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; remove it or pass --out NEW_DIR")
    from .resources import config_path

    config = Path(args.config) if args.config else config_path("synthetic.yaml")
    data_dir, run_dir = out / "data", out / "run"
    t0 = time.perf_counter()
    print(f"[1/3] synthetic multi-rater dataset -> {data_dir}")
    from .config import load_config

    cfg = load_config(config, args.overrides)
    s = cfg.data.synthetic
    cmd_synth(argparse.Namespace(out=data_dir, num_cases=s.num_cases, size=s.size, spatial_dims=s.spatial_dims,
                                 num_raters=s.num_raters, seed=s.seed))
    print(f"[2/3] training ({cfg.train.steps} steps) -> {run_dir}")
    cmd_train(argparse.Namespace(config=str(config), overrides=[*args.overrides, f"data.path={data_dir}"],
                                 out=str(run_dir), resume=False, no_progress=args.no_progress))
    print("[3/3] evaluation on the held-out test split")
    rc = cmd_evaluate(argparse.Namespace(checkpoint=str(run_dir), num_samples=args.num_samples, out=None,
                                         overrides=[], no_progress=args.no_progress, device="auto"))
    print(f"done in {time.perf_counter() - t0:.0f}s; everything is under {out}")
    return rc


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="probunet",
        description="Probabilistic U-Net (Kohl et al. 2018): train, sample, evaluate and predict "
                    "segmentations under annotator variability.")
    p.add_argument("--version", action="version", version=f"probunet {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors in the log")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("synth", help="write a synthetic multi-rater dataset (QUBIQ layout + truth.json)")
    s.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty)")
    s.add_argument("--num-cases", type=int, default=400)
    s.add_argument("--size", type=int, default=64, help="image side length in pixels")
    s.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    s.add_argument("--num-raters", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    t = sub.add_parser("train", help="train from a YAML config")
    add_arguments(t, TrainOptions)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="GED, HM-IoU, calibration of a checkpoint on a data split")
    add_arguments(e, EvaluateOptions)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser(
        "predict", help="segment every image of a folder: samples, probability, uncertainty",
        description="Per image of INPUT_DIR (NIfTI, NRRD, MHA, TIFF, DICOM, ...; PNG for 2D models), write "
                    "OUTPUT_DIR/<case>/ sample_000.., probability, entropy, consensus in the input's format and "
                    "geometry, and OUTPUT_DIR/summary.csv. Exit 0: all written; 1: some cases failed (see the "
                    "summary); 2: bad arguments.")
    r.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    r.add_argument("input_dir", metavar="INPUT_DIR", help="folder of images (never written to)")
    r.add_argument("output_dir", metavar="OUTPUT_DIR")
    add_arguments(r, PredictOptions)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="the main job: synth -> train -> evaluate on the synthetic default")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--config", default=None,
                   help="YAML config (default: the synthetic.yaml shipped with probunet)")
    d.add_argument("overrides", nargs="*", metavar="key=value")
    d.add_argument("--num-samples", type=int, default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser.parse_args`` where ``key=value`` overrides may come before, between or after the
    options (``train CONFIG --out R train.steps=20``): argparse alone takes the positionals of a
    sub-command only in one run, so overrides after an option are collected here, in order."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        if hasattr(args, "overrides") and not any(e.startswith("-") for e in extras):
            args.overrides = [*(args.overrides or []), *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("probunet: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        print(f"probunet {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # an allocation that still failed: one line with its size
        from .guards import out_of_memory_message

        msg = out_of_memory_message(exc)
        if msg is None or args.debug:
            raise
        print(f"probunet {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
