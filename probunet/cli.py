"""The ``probunet`` command line: the thin wrappers over the library.

This module holds all the command-line glue and nothing else: argument handling,
printing and exit codes. Each command reads its options (:mod:`probunet.options`),
calls one library function (``fit``, ``evaluate``, ``predict_folder``, ...) and
prints what came back.

User errors (bad path, bad config key, bad file) exit non-zero with one line on
stderr and no traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from . import __version__
from .data.recorded_split import recorded_split_of
from .options import EvaluateOptions, PredictOptions, TrainOptions, add_arguments, from_args
from .runtime.rundir import config_for_evaluation, run_dir_of

logger = logging.getLogger("probunet")
SHIFT_KINDS = ("intensity", "noise", "blur", "texture", "lesion_contrast")  # probunet.study.shift.SHIFTS


class UserError(Exception):
    """An error caused by the user's input: reported in one line."""


def _user_errors() -> tuple:
    from .config import ConfigError
    from .data.errors import DataError
    from .train.nonfinite import TrainingError
    from .guards import WriteError
    from .utils import FolderBusyError

    return (UserError, ConfigError, DataError, TrainingError, FolderBusyError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError, ValueError, WriteError)


# ----------------------------------------------------------------------------- commands


def cmd_synth(args) -> int:
    from .data import synthetic

    out = Path(args.out)
    severity = _severity_of(args)
    if getattr(args, "shift", None):
        from .study.shift import check_shift

        check_shift(args.shift, severity, args.size)  # before a case is generated
    t0 = time.perf_counter()
    offcentre = bool(getattr(args, "lesion_offcentre", False))
    items = synthetic.iter_generate(args.num_cases, args.size, args.spatial_dims, args.num_raters, args.seed,
                                    lesion_offcentre=offcentre)
    params = {"num_cases": args.num_cases, "size": args.size, "spatial_dims": args.spatial_dims,
              "num_raters": args.num_raters, "seed": args.seed}
    if offcentre:
        params["lesion_offcentre"] = True
    if getattr(args, "shift", None):
        from .study.shift import shift_items

        items = shift_items(items, args.shift, severity, seed=args.seed)  # same masks and truth
        params["shift"] = {"kind": args.shift, "severity": severity}
    synthetic.write_qubiq(items, out, params=params)
    print(f"wrote {args.num_cases} cases ({args.spatial_dims}D, {args.size}px, {args.num_raters} raters) "
          f"to {out} in {time.perf_counter() - t0:.1f}s; truth in {out / 'truth.json'}")
    return 0


def _severity_of(args) -> float:
    """``--severity`` (default 1) where ``--shift`` is given; refused without it (it would change nothing)."""
    severity = getattr(args, "severity", None)
    if severity is not None and not getattr(args, "shift", None):
        raise UserError(f"--severity {severity:g} needs --shift KIND (the kind of shift it is the strength of)")
    return 1.0 if severity is None else float(severity)


def cmd_preprocess(args) -> int:
    from .config import load_config
    from .data.preprocess import preprocess, read_index

    cfg = load_config(args.config, list(args.overrides or []))
    t0 = time.perf_counter()
    folder = preprocess(cfg, args.out, progress=not args.no_progress)
    index = read_index(folder)
    spacing = index.get("spacing")
    print(f"preprocessed {len(index['cases'])} cases into {folder} in {time.perf_counter() - t0:.1f}s "
          f"(spacing {'as read' if spacing is None else spacing}); train with data.cache_dir="
          f"{folder.parent} and the same data section to use it")
    return 0


def _default_run_dir(config: str) -> Path:
    return Path("runs") / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_train(args) -> int:
    from .config import load_config
    from .train.trainer import fit

    opts = from_args(TrainOptions, args)
    cfg = load_config(opts.config, opts.overrides)
    run_dir = Path(opts.out) if opts.out else _default_run_dir(opts.config)
    summary = fit(cfg, run_dir, resume=opts.resume, progress=not args.no_progress)
    from .runtime.distributed import dist_info

    if dist_info().is_main:
        print(f"run directory: {run_dir}")
        print(f"  checkpoints: {run_dir / 'checkpoints'} (last.pt, best.pt)")
        print(f"  metrics:     {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})")
        if summary.get("precision"):
            print(f"  precision:   {summary['precision']}")
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
    return evaluate_cli(args)


def cmd_predict(args) -> int:
    return predict_cli(args)


def cmd_export(args) -> int:
    from .export.exporter import export_model

    result = export_model(args.source, args.format, args.out, num_samples=args.num_samples,
                          overwrite=args.overwrite, seed=args.seed, roi_size=args.roi, evaluation=args.evaluation)
    for path, size in result.files.items():
        print(f"  {size / 1e6:8.3f} MB  {path}")
    print(f"exported {args.source} as {args.format} to {result.path} ({result.size / 1e6:.3f} MB)")
    return 0


def predict_cli(args) -> int:
    """``probunet predict``: 0 all cases written (or skipped), 1 some failed, user errors raise."""
    from .inference.folder import predict_folder

    summary = predict_folder(args.checkpoint, args.input_dir, args.output_dir, from_args(PredictOptions, args),
                             progress=not getattr(args, "no_progress", False))
    n, failed, skipped = len(summary.rows), summary.failed, summary.skipped
    print(f"predicted {n - len(failed) - len(skipped)} of {n} case(s)"
          + (f", {len(skipped)} skipped (outputs exist; --overwrite recomputes them)" if skipped else "")
          + (f", {len(failed)} FAILED" if failed else "") + f"; summary: {summary.summary_path}")
    for r in failed:
        print(f"probunet predict: failed: {r['case']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def cmd_calibrate(args) -> int:
    from .evaluation.calibration import calibrate_run
    from .options import CalibrateOptions

    cal = calibrate_run(from_args(CalibrateOptions, args), progress=not getattr(args, "no_progress", False))
    what = "empty-union cases skipped" if cal["risk"] == "fnr" else "empty-union cases (always covered)"
    print(f"calibrated on {cal['num_cases']} {cal['split']} cases ({cal['n_empty']} {what}), "
          f"{cal['num_samples']} samples each: lambda {cal['lambda']:.4f} (region: pixels marked by at least "
          f"{cal['min_votes']} of {cal['num_samples']} samples)")
    print(f"  guarantee: {cal['guarantee']}")
    print(f"  assumption: {cal['assumption']}")
    print(f"  written: {cal['path']} (predict writes the region, evaluate reports it on the test split)")
    return 0


def cmd_study(args) -> int:
    from .study.pipeline import StudySettings, parse_failure, run_study

    settings = StudySettings(num_samples=args.num_samples, seed=args.seed, steps=args.steps, shift=args.shift,
                             severity=_severity_of(args), ood=args.ood, maps=tuple(args.maps) if args.maps else None,
                             threshold=args.threshold, patch_size=args.patch_size,
                             failure=parse_failure(args.fail), device=args.device)
    t0 = time.perf_counter()
    from .train.trainer import fit

    study = run_study(args.sources, args.out, settings, train=fit, progress=not args.no_progress,
                      retrain=args.retrain)
    print(f"study of {len(study['settings']['models'])} models in {time.perf_counter() - t0:.0f}s")
    for question, best in study["best"].items():
        o = best["overall"]
        if o:
            print(f"  {question:32s} best score {o['score']} ({o['mean']:.4f}, mean over {o['n_models']} models)")
    for name, path in study["files"].items():
        print(f"  {name + ':':15s}{path}")
    return 0


def cmd_demo(args) -> int:
    """synth -> train -> evaluate on the embedded synthetic default."""
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; remove it or pass --out NEW_DIR")
    from .runtime.resources import config_path

    config = Path(args.config) if args.config else config_path("synthetic.yaml")
    data_dir, run_dir = out / "data", out / "run"
    if any(o.split("=", 1)[0].strip() in ("data", "data.path") for o in args.overrides):
        raise UserError(f"data.path: the demo trains on the set it writes into {data_dir}; leave data.path out")
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


# ----------------------------------------------------------------------------- evaluate: checkpoint in, table out






def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _check_outputs(paths: dict[str, Path], checkpoint: Path, data_path: Optional[str], *,
                   overwrite: bool = False, report: bool = False) -> None:
    """Never overwrite the checkpoint, the input data, or (unless ``overwrite``) a file probunet's
    evaluations did not write: every output path is checked (:func:`probunet.evaluation.report.check_owned`), and
    with ``report`` the HTML report's page and figures (:func:`probunet.evaluation.html_report.check_report_outputs`)."""
    for p in paths.values():
        if p.exists() and p.resolve() == checkpoint.resolve():
            raise ValueError(f"--out {paths['summary']}: would overwrite the checkpoint {checkpoint}")
        if data_path and _is_within(p, Path(data_path)):
            raise ValueError(f"--out {paths['summary']}: refusing to write evaluation results inside the input "
                             f"data folder {data_path}; choose another --out")
        if p.is_dir():
            raise IsADirectoryError(f"cannot write {p}: it is a directory")
    if not overwrite:
        from .evaluation.report import check_owned
        from .evaluation.scoring import SUMMARY_KIND

        check_owned(paths, SUMMARY_KIND)
        if report:
            from .evaluation.html_report import check_report_outputs

            check_report_outputs(paths["summary"].parent)


def _model_mismatch(exc: Exception, checkpoint: Path) -> Exception:
    """Name the checkpoint in data errors that are really a model/data mismatch."""
    from .data import DataError

    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    if any(k in msg for k in ("model.in_channels", "model.num_classes", "model.spatial_dims")):
        return DataError(f"the data does not match the checkpoint {checkpoint}: {msg}")
    return exc


def evaluate_cli(args) -> int:
    """``probunet evaluate CHECKPOINT_OR_RUN [--num-samples N] [--out FILE] [key=value ...]``."""
    result = evaluate_checkpoint(from_args(EvaluateOptions, args), progress=not getattr(args, "no_progress", False))
    _print_summary(result)
    return 0


def evaluate_checkpoint(options, *, progress: bool = False) -> dict:
    """Evaluate a checkpoint or run directory as ``probunet evaluate`` does (a
    :class:`probunet.options.EvaluateOptions`); writes the files and returns
    :func:`probunet.evaluation.scoring.evaluate`'s result."""
    from .models.checkpoint import load_model
    from .data import DataError, load_splits
    from .guards import MAX_SAMPLES, ensure_writable_dir
    from .evaluation.report import output_paths
    from .evaluation.scoring import evaluate
    from .utils import resolve_device

    given = Path(options.checkpoint)
    if not given.exists():
        raise FileNotFoundError(f"checkpoint or run directory not found: {given}")
    model, _, ckpt = load_model(given)
    ckpt_path = Path(ckpt["path"])
    cfg = config_for_evaluation(ckpt["config"], list(options.overrides or []))
    num_samples = options.num_samples if options.num_samples is not None else cfg.eval.num_samples
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise ValueError(f"--num-samples must be in 1..{MAX_SAMPLES}, got {num_samples}")
    cfg.eval.num_samples = int(num_samples)
    device = resolve_device(options.device, option="--device")
    summary_path = _summary_path(options.out, given, ckpt_path)
    _check_outputs(output_paths(summary_path), ckpt_path, cfg.data.path,
                   overwrite=bool(getattr(options, "overwrite", False)), report=bool(getattr(options, "report", False)))
    include_new = bool(getattr(options, "include_new_cases", False))
    if include_new and cfg.eval.split != "test":
        raise ValueError(f"--include-new-cases: new cases join the test split only, not eval.split="
                         f"{cfg.eval.split}")
    split_args = recorded_split_of(given, ckpt_path, ckpt, cfg)
    try:
        splits = load_splits(cfg, **split_args, include_new=include_new)
    except DataError as exc:
        raise _model_mismatch(exc, ckpt_path) from None
    items = splits[cfg.eval.split]
    if not items:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        raise ValueError(f"the {cfg.eval.split} split is empty ({sizes} cases); choose another eval.split=... "
                         f"or change data.split")
    if cfg.data.patch_size is None:  # whole scans are sampled in padded sliding windows
        _check_divisible(items, int(getattr(model, "divisor", 1)))
    _check_sample_memory(items, cfg, num_samples, device)
    ensure_writable_dir(summary_path.parent, "--out")  # a read-only or missing folder: refused before the work
    logger.info("evaluating %s on the %s split (%d cases, %d samples each) on %s", ckpt_path, cfg.eval.split,
                len(items), num_samples, device)
    from .inference.regions import evaluation_calibration

    calibration = evaluation_calibration(run_dir_of(given, ckpt_path), ckpt, num_samples, cfg.eval.split)
    result = evaluate(model, cfg, items, num_samples=num_samples, seed=cfg.eval.seed, device=device,
                      progress=progress, summary_path=summary_path, checkpoint=str(ckpt_path), split=cfg.eval.split,
                      calibration=calibration)
    if getattr(options, "report", False):
        from .evaluation.html_report import write_report

        result["files"]["report"] = str(write_report(result, model, cfg, items, device=device, progress=progress))
    return result




def _check_sample_memory(items: list[dict], cfg, num_samples: int, device) -> None:
    """The samples of one batch (label maps and the logits evaluation keeps) against the memory available:
    too many samples is one line with the figures, before anything is drawn."""
    import numpy as np

    from .guards import check_memory

    voxels = max(int(np.prod(np.shape(i["image"])[1:])) for i in items)
    batch = min(int(cfg.eval.batch_size), len(items))
    per_sample = voxels * (1 + 4 * int(cfg.model.num_classes))  # uint8 labels + fp32 logits
    check_memory(batch * num_samples * per_sample, f"--num-samples {num_samples} (eval.batch_size {batch}, "
                 f"{voxels} voxels per image)", device)


def _summary_path(out: Optional[str], given: Path, ckpt_path: Path) -> Path:
    """``--out`` (a folder gets summary.json) or RUN_DIR/eval/summary.json."""
    if out:
        return Path(out) / "summary.json" if Path(out).is_dir() or str(out).endswith(("/", os.sep)) else Path(out)
    return run_dir_of(given, ckpt_path) / "eval" / "summary.json"


def _check_divisible(items: list[dict], divisor: int) -> None:
    import numpy as np

    from .data import DataError

    for item in items:
        shape = tuple(np.shape(item["image"])[1:])
        if any(s % divisor for s in shape):
            raise DataError(f"case {item['case_id']}: spatial size {shape} is not divisible by {divisor}, as the "
                            f"checkpoint's model needs; set data.crop_size=... to a multiple of {divisor}")


def _fmt(stat: dict) -> str:
    if stat["mean"] is None or not math.isfinite(stat["mean"]):
        return "n/a"
    sem = stat["sem"]
    return f"{stat['mean']:.4f} +- {sem:.4f}" if sem is not None and math.isfinite(sem) else f"{stat['mean']:.4f}"


def _print_summary(result: dict) -> None:
    m = result["metrics"]
    print(f"{result['checkpoint']}: {result['split']} split, {result['num_cases']} cases, "
          f"{result['num_samples']} samples per image (mean +- standard error)")
    print(f"  GED            {_fmt(m['ged'])}  (E[d(S,Y)] {_fmt(m['ged_cross'])}, "
          f"E[d(S,S')] {_fmt(m['sample_diversity'])}, E[d(Y,Y')] {_fmt(m['reference_diversity'])})")
    print(f"  HM-IoU         {_fmt(m['hm_iou'])}")
    print(f"  S_NCC          {_fmt(m['s_ncc'])}")
    print(f"  consensus Dice {_fmt(m['consensus_dice'])}, IoU {_fmt(m['consensus_iou'])}")
    ece = result["calibration"]["ece"]
    print(f"  ECE            {ece:.4f} (pooled), {_fmt(m['ece'])} (per case)")
    print(f"  QUBIQ score    {_fmt(m['qubiq'])}")
    print(f"  empty masks    samples {m['empty_samples']['mean']:.4f}, raters {m['empty_raters']['mean']:.4f}, "
          f"per-case gap {_fmt(m['empty_gap'])}")
    groups = result.get("by_empty_raters") or []
    if len(groups) > 1:
        print("  GED by raters with an empty mask: " + "; ".join(
            f"{g['empty_raters']}/{g['num_raters']}: {g['num_cases']} cases, GED {g['ged']['mean']:.4f}, "
            f"samples empty {g['empty_samples']['mean']:.3f}" for g in groups))
    truth = result.get("truth")
    if truth:
        t, les = truth["metrics"], truth["lesions"]
        print(f"  vs. true rater distribution ({truth['num_references']} fresh references): "
              f"GED {_fmt(t['ged_true'])}, HM-IoU {_fmt(t['hm_iou_true'])}")
        corr = les["corr_sampled_vs_true"]
        print(f"  lesion presence ({les['num_lesions']} lesions): MAE {les['mae_sampled_vs_true']:.4f}, "
              f"r {corr:.3f} (raters: MAE {les['mae_raters_vs_true']:.4f})" if corr is not None and
              math.isfinite(corr) else f"  lesion presence ({les['num_lesions']} lesions): MAE "
              f"{les['mae_sampled_vs_true']:.4f} (raters: MAE {les['mae_raters_vs_true']:.4f})")
    from .evaluation.reference import reference_table, spread_text

    print("  " + spread_text(result["spread"]))
    if result.get("spread_true"):
        print("  " + spread_text(result["spread_true"], "the true distribution"))
    for line in reference_table(result):
        print(line)
    if result.get("calibrated_region"):
        from .inference.regions import region_line

        print(region_line(result["calibrated_region"]))
    for name, path in result["files"].items():
        print(f"  {name + ':':15s}{path}")
    print(result["conventions"]["line"])
    for warning in result.get("warnings", []):
        print(f"warning: {warning}")


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
    s.add_argument("--lesion-offcentre", action="store_true",
                   help="small lesions (radius 4-8%% of the side) placed away from the centre, as in whole scans")
    s.add_argument("--shift", default=None, choices=SHIFT_KINDS,
                   help="write a shifted copy: the same cases, masks and truth, images changed by this kind")
    s.add_argument("--severity", type=float, default=None, help="strength of --shift (0: none; default 1)")
    s.set_defaults(func=cmd_synth)

    pp = sub.add_parser("preprocess", help="resample, normalise and cache whole scans for patch training "
                                           "(data.patch_size)")
    pp.add_argument("config", metavar="CONFIG", help="YAML config whose data section is preprocessed")
    pp.add_argument("--out", metavar="DIR", default=None,
                    help="cache root (default: data.cache_dir, $PROBUNET_CACHE or ~/.cache/probunet/preprocessed)")
    pp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    pp.add_argument("--no-progress", action="store_true")
    pp.set_defaults(func=cmd_preprocess)

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
                    "OUTPUT_DIR/<case>/ sample_000.., probability, entropy (MC dropout and ensembles: also "
                    "aleatoric, epistemic), consensus in the input's format and geometry, and "
                    "OUTPUT_DIR/summary.csv. Exit 0: all written; 1: some cases failed (see the summary); 2: bad "
                    "arguments.")
    r.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file or run directory")
    r.add_argument("input_dir", metavar="INPUT_DIR", help="folder of images (never written to)")
    r.add_argument("output_dir", metavar="OUTPUT_DIR")
    add_arguments(r, PredictOptions)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser(
        "export", help="export the sampler: TorchScript, ONNX or a MONAI Bundle (use the model without probunet)",
        description="Write the model's sampler (image, noise or seed -> S sample logits) as TorchScript or ONNX, "
                    "or a MONAI Bundle folder (configs/metadata.json, configs/inference.json, models/model.ts, "
                    "docs/README.md model card).")
    x.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoint file")
    x.add_argument("--format", required=True, choices=("torchscript", "onnx", "bundle"))
    x.add_argument("--out", required=True, metavar="FILE_OR_DIR", help="the file (torchscript, onnx) or folder "
                   "(bundle) to write")
    x.add_argument("--num-samples", type=int, default=16, help="samples per image (default 16)")
    x.add_argument("--seed", type=int, default=0, help="bundle: the seed of the samples (default 0)")
    x.add_argument("--roi", default="config", help="bundle: sliding-window size (default: the training patch)")
    x.add_argument("--evaluation", default=None, metavar="SUMMARY_JSON",
                   help="bundle: evaluation summary.json for the model card (default RUN/eval/summary.json)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.set_defaults(func=cmd_export)

    from .options import CalibrateOptions

    cb = sub.add_parser(
        "calibrate", help="calibrated regions: conformal risk control of the sampled segmentations",
        description="Sample the run's validation cases (never its training cases) and choose lambda so that the "
                    "region {f >= 1 - lambda} (f: share of the samples marking a pixel) misses at most ALPHA of "
                    "the readers' union in expectation (--risk fnr), or holds the whole union with probability "
                    ">= 1 - ALPHA (--risk coverage). Writes RUN/calibration.json; predict then writes a region "
                    "map, evaluate reports its risk on the test split.")
    add_arguments(cb, CalibrateOptions)
    cb.add_argument("--no-progress", action="store_true")
    cb.set_defaults(func=cmd_calibrate)

    st = sub.add_parser(
        "study", help="uncertainty study of several models: failure and OOD detection, calibration, maps",
        description="Per model (a run directory, or a YAML config trained here into OUT/runs/), sample the "
                    "test split and a shifted set, and write OUT/study.json, study.md, study.csv and figures. "
                    "A killed study resumes per model (OUT/cache/).")
    st.add_argument("sources", nargs="+", metavar="CONFIG_OR_RUN")
    st.add_argument("--out", required=True, help="output folder")
    st.add_argument("--ood", default=None, metavar="DIR", help="a folder of other scans as the shifted set")
    st.add_argument("--shift", default=None, choices=SHIFT_KINDS, help="shift the test split itself")
    st.add_argument("--severity", type=float, default=None, help="strength of --shift (default 1)")
    st.add_argument("--steps", type=int, default=None, help="training steps for the configs (default: theirs)")
    st.add_argument("--num-samples", type=int, default=16, help="samples per case, every model (default 16)")
    st.add_argument("--seed", type=int, default=0, help="sampling seed, every model (default 0)")
    st.add_argument("--maps", nargs="+", default=None, metavar="MAP",
                    help="total, aleatoric, epistemic (default: every map each model gives)")
    st.add_argument("--threshold", type=float, default=0.1, help="above_threshold aggregation, nats (0.1)")
    st.add_argument("--patch-size", type=int, default=8, help="patch_max window, voxels per axis (8)")
    st.add_argument("--fail", action="append", metavar="RISK=T",
                    help="a case failed when RISK > T (default one_minus_dice=0.2, ged=0.3)")
    st.add_argument("--retrain", action="store_true",
                    help="train again a config whose run in OUT/runs/ was trained with other settings (--steps, "
                         "an edited config); without it such a run is refused")
    st.add_argument("--device", default="auto")
    st.add_argument("--no-progress", action="store_true")
    st.set_defaults(func=cmd_study)

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
