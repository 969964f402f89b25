"""``probunet evaluate`` as a library call: a checkpoint or run directory and a
:class:`probunet.options.EvaluateOptions` in, the scores (:func:`probunet.evaluation.scoring.evaluate`)
and their files out, after every input and output is checked (:func:`evaluate_checkpoint`);
:func:`summary_lines` is the table the command prints.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional

from ..data.recorded_split import recorded_split_of
from ..options import EvaluateOptions
from ..runtime.rundir import config_for_evaluation, run_dir_of

logger = logging.getLogger("probunet")  # "INFO probunet: evaluating ...", as the command always logged


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _check_outputs(paths: dict[str, Path], checkpoint: Path, data_path: Optional[str], *,
                   overwrite: bool = False, report: bool = False) -> None:
    """Never overwrite the checkpoint, the input data, or (unless ``overwrite``) a file probunet's
    evaluations did not write: every output path is checked (:func:`.report.check_owned`), and with
    ``report`` the HTML report's page and figures (:func:`.html_report.check_report_outputs`)."""
    for p in paths.values():
        if p.exists() and p.resolve() == checkpoint.resolve():
            raise ValueError(f"--out {paths['summary']}: would overwrite the checkpoint {checkpoint}")
        if data_path and _is_within(p, Path(data_path)):
            raise ValueError(f"--out {paths['summary']}: refusing to write evaluation results inside the input "
                             f"data folder {data_path}; choose another --out")
        if p.is_dir():
            raise IsADirectoryError(f"cannot write {p}: it is a directory")
    if not overwrite:
        from .report import check_owned
        from .scoring import SUMMARY_KIND

        check_owned(paths, SUMMARY_KIND)
        if report:
            from .html_report import check_report_outputs

            check_report_outputs(paths["summary"].parent)


def _model_mismatch(exc: Exception, checkpoint: Path) -> Exception:
    """Name the checkpoint in data errors that are really a model/data mismatch."""
    from ..data import DataError

    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    if any(k in msg for k in ("model.in_channels", "model.num_classes", "model.spatial_dims")):
        return DataError(f"the data does not match the checkpoint {checkpoint}: {msg}")
    return exc


def evaluate_checkpoint(options: EvaluateOptions, *, progress: bool = False) -> dict:
    """Evaluate a checkpoint or run directory as ``probunet evaluate`` does (a
    :class:`probunet.options.EvaluateOptions`); writes the files and returns
    :func:`probunet.evaluation.scoring.evaluate`'s result."""
    from ..models.checkpoint import load_model
    from ..data import DataError, load_splits
    from ..guards import MAX_SAMPLES, ensure_writable_dir
    from .report import output_paths
    from .scoring import evaluate
    from ..utils import resolve_device

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
                   overwrite=bool(options.overwrite), report=bool(options.report))
    include_new = bool(options.include_new_cases)
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
    from ..inference.regions import evaluation_calibration

    calibration = evaluation_calibration(run_dir_of(given, ckpt_path), ckpt, num_samples, cfg.eval.split)
    result = evaluate(model, cfg, items, num_samples=num_samples, seed=cfg.eval.seed, device=device,
                      progress=progress, summary_path=summary_path, checkpoint=str(ckpt_path), split=cfg.eval.split,
                      calibration=calibration)
    if options.report:
        from .html_report import write_report

        result["files"]["report"] = str(write_report(result, model, cfg, items, device=device, progress=progress))
    return result


def _check_sample_memory(items: list[dict], cfg, num_samples: int, device) -> None:
    """The samples of one batch (label maps and the logits evaluation keeps) against the memory available:
    too many samples is one line with the figures, before anything is drawn."""
    import numpy as np

    from ..guards import check_memory

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

    from ..data import DataError

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


def summary_lines(result: dict) -> list[str]:
    """The lines ``probunet evaluate`` prints for :func:`evaluate_checkpoint`'s result."""
    lines = []
    m = result["metrics"]
    lines.append(f"{result['checkpoint']}: {result['split']} split, {result['num_cases']} cases, "
                 f"{result['num_samples']} samples per image (mean +- standard error)")
    lines.append(f"  GED            {_fmt(m['ged'])}  (E[d(S,Y)] {_fmt(m['ged_cross'])}, "
                 f"E[d(S,S')] {_fmt(m['sample_diversity'])}, E[d(Y,Y')] {_fmt(m['reference_diversity'])})")
    lines.append(f"  HM-IoU         {_fmt(m['hm_iou'])}")
    lines.append(f"  S_NCC          {_fmt(m['s_ncc'])}")
    lines.append(f"  consensus Dice {_fmt(m['consensus_dice'])}, IoU {_fmt(m['consensus_iou'])}")
    ece = result["calibration"]["ece"]
    lines.append(f"  ECE            {ece:.4f} (pooled), {_fmt(m['ece'])} (per case)")
    lines.append(f"  QUBIQ score    {_fmt(m['qubiq'])}")
    lines.append(f"  empty masks    samples {m['empty_samples']['mean']:.4f}, raters "
                 f"{m['empty_raters']['mean']:.4f}, per-case gap {_fmt(m['empty_gap'])}")
    groups = result.get("by_empty_raters") or []
    if len(groups) > 1:
        lines.append("  GED by raters with an empty mask: " + "; ".join(
            f"{g['empty_raters']}/{g['num_raters']}: {g['num_cases']} cases, GED {g['ged']['mean']:.4f}, "
            f"samples empty {g['empty_samples']['mean']:.3f}" for g in groups))
    truth = result.get("truth")
    if truth:
        t, les = truth["metrics"], truth["lesions"]
        lines.append(f"  vs. true rater distribution ({truth['num_references']} fresh references): "
                     f"GED {_fmt(t['ged_true'])}, HM-IoU {_fmt(t['hm_iou_true'])}")
        corr = les["corr_sampled_vs_true"]
        lines.append(f"  lesion presence ({les['num_lesions']} lesions): MAE {les['mae_sampled_vs_true']:.4f}, "
                     f"r {corr:.3f} (raters: MAE {les['mae_raters_vs_true']:.4f})" if corr is not None and
                     math.isfinite(corr) else f"  lesion presence ({les['num_lesions']} lesions): MAE "
                     f"{les['mae_sampled_vs_true']:.4f} (raters: MAE {les['mae_raters_vs_true']:.4f})")
    from .reference import reference_table, spread_text

    lines.append("  " + spread_text(result["spread"]))
    if result.get("spread_true"):
        lines.append("  " + spread_text(result["spread_true"], "the true distribution"))
    lines.extend(reference_table(result))
    if result.get("calibrated_region"):
        from ..inference.regions import region_line

        lines.append(region_line(result["calibrated_region"]))
    for name, path in result["files"].items():
        lines.append(f"  {name + ':':15s}{path}")
    lines.append(result["conventions"]["line"])
    for warning in result.get("warnings", []):
        lines.append(f"warning: {warning}")
    return lines


__all__ = ["evaluate_checkpoint", "summary_lines"]
