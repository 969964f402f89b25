"""``probunet calibrate``: sample the calibration split of a run and write ``RUN/calibration.json``.

The conformal risk control itself (the regions, the two risks and their guarantees, the
calibration file that ``predict``, ``evaluate`` and ``export`` read back) lives in
:mod:`probunet.inference.regions`; its names are re-exported here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .. import __version__
from ..inference.regions import *  # noqa: F401,F403
from ..inference.regions import __all__ as _regions_all
from ..inference.regions import (ASSUMPTION, CLASS_MODE, KIND, RISKS, CalibrationError, CaseCounts,
                                calibrate_counts, calibration_path, case_counts, cases_digest, check_alpha,
                                check_size, guarantee_text, read_calibration)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the command


def sample_counts(model, cfg, items: list[dict], *, num_samples: int, seed: int, device,
                  progress: bool = False) -> list[CaseCounts]:
    """Sample every item as ``evaluate`` does (the evaluation sampler: same samples per case id and seed)
    and count the votes against its real raters."""
    from ..data import real_raters
    from ..inference.sampler import evaluation_sampler
    from .validation import case_ids

    sampler = evaluation_sampler(model, cfg.eval, device, seed=int(seed), roi_size=getattr(cfg.data, "patch_size",
                                                                                           None))
    out: list = [None] * len(items)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="calibrate", unit="case", dynamic_ncols=True)
    try:
        for batch, result in sampler.sample_batches([it["image"] for it in items], case_ids(items),
                                                    int(num_samples), pairwise=False,
                                                    key=lambda i: tuple(np.shape(items[i]["image"]))):
            labels = result.labels.cpu().numpy()
            for j, index in enumerate(batch):
                item = items[index]
                out[index] = case_counts(str(item["case_id"]), labels[j], np.asarray(real_raters(item)))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def split_kwargs(given: Path, ckpt_path: Path, ckpt: dict, cfg) -> dict:
    """The keyword arguments of :func:`probunet.data.load_splits` that keep the run's recorded split, as
    ``probunet evaluate`` looks it up (:func:`probunet.data.recorded_split.recorded_split_of`)."""
    from ..data.recorded_split import recorded_split_of

    found = recorded_split_of(given, ckpt_path, ckpt, cfg)
    if isinstance(found, tuple):  # (record, where)
        found = {"recorded": found[0], "recorded_from": found[1]}
    return dict(found)


def calibrate_run(options, *, progress: bool = False) -> dict:
    """``probunet calibrate``: sample the calibration split of a run, compute lambda_hat and write
    ``RUN/calibration.json`` (a :class:`probunet.options.CalibrateOptions`). Every refusal comes before
    anything is written. Returns the record written (plus ``"path"``)."""
    from ..models.checkpoint import load_model
    from ..runtime.rundir import config_for_evaluation, run_dir_of
    from ..data import load_splits
    from ..data.recorded_split import read_recorded_split
    from ..guards import MAX_SAMPLES
    from ..utils import atomic_write_text, resolve_device

    alpha = check_alpha(options.alpha)
    if options.risk not in RISKS:
        raise CalibrationError(f"--risk must be one of {', '.join(RISKS)}, got {options.risk!r}")
    split = str(options.split)
    if split not in ("train", "val", "test"):
        raise CalibrationError(f"--split must be val or test (a split the run did not train on), got {split!r}")
    given = Path(options.checkpoint)
    if not given.exists():
        raise FileNotFoundError(f"checkpoint or run directory not found: {given}")
    model, _, ckpt = load_model(given)
    ckpt_path = Path(ckpt["path"])
    run_dir = run_dir_of(given, ckpt_path)
    out_path = calibration_path(run_dir)
    if out_path.exists() and not out_path.is_file():
        raise CalibrationError(f"{out_path}: exists and is not a file")
    if out_path.is_file():
        try:
            read_calibration(out_path)
        except CalibrationError:
            raise CalibrationError(f"{out_path}: exists and is not a probunet calibration; move it away") from None
    cfg = config_for_evaluation(ckpt["config"], list(options.overrides or []))
    num_samples = int(options.num_samples if options.num_samples is not None else cfg.eval.num_samples)
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise CalibrationError(f"--num-samples must be in 1..{MAX_SAMPLES}, got {num_samples}")
    seed = int(options.seed if options.seed is not None else cfg.eval.seed)
    device = resolve_device(options.device, option="--device")
    if split == "train":
        raise CalibrationError("--split train: the calibration split must not overlap the cases the run trained "
                               "on; use val (the default) or test")
    split_args = split_kwargs(given, ckpt_path, ckpt, cfg)
    record = split_args.get("recorded")
    splits = load_splits(cfg, **split_args)
    items = splits[split]
    if not items:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        raise CalibrationError(f"the run has no {split} cases to calibrate on ({sizes} cases); train with "
                               f"data.split.val_fraction > 0 or pass --split test")
    # the run's training cases, whatever the data now (another folder is split by its config)
    trained, _ = read_recorded_split(run_dir, ckpt)
    train_ids = {c for c, _ in trained["train"]} if trained else {str(i["case_id"]) for i in splits["train"]}
    overlap = sorted({str(i["case_id"]) for i in items} & train_ids)
    if overlap:
        raise CalibrationError(f"the {split} split shares {len(overlap)} case(s) with the run's training cases "
                               f"({', '.join(overlap[:3])}{'...' if len(overlap) > 3 else ''}): calibration cases "
                               f"must be cases the model never trained on")
    if record is None and not trained:
        logger.warning("%s: no recorded split; the %s split is recomputed from data.split", ckpt_path, split)
    # too few cases for alpha, before any sampling (fnr: the empty unions are known only after it)
    check_size(len(items), alpha, f"{split} cases")
    logger.info("calibrating %s on the %s split (%d cases, %d samples each, alpha %g, risk %s)", ckpt_path, split,
                len(items), num_samples, alpha, options.risk)
    counts = sample_counts(model, cfg, items, num_samples=num_samples, seed=seed, device=device, progress=progress)
    result = calibrate_counts(counts, alpha, options.risk)
    ids = [c.case_id for c in counts]
    try:
        rel_ckpt = str(ckpt_path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        rel_ckpt = str(ckpt_path)
    data = {
        "kind": KIND,
        "probunet_version": __version__,
        "alpha": alpha,
        "risk": options.risk,
        "lambda": result["lambda"],
        "n": result["n"],
        "n_empty": result["n_empty"],
        "split": split,
        "cases_digest": cases_digest(ids),
        "num_cases": len(ids),
        "num_samples": num_samples,
        "seed": seed,
        "lambda_index": result["lambda_index"],
        "min_votes": result["min_votes"],
        "grid": f"lambda_j = j/S, j = 0..{num_samples} (the {num_samples + 1} values f = k/S takes: exact)",
        "class_mode": CLASS_MODE,
        "region": "C_lambda = {p : f(p) >= 1 - lambda}, f(p) the share of the S samples marking p",
        "calibration_risk": result["calibration_risk"],
        "guarantee": guarantee_text(options.risk, alpha),
        "assumption": ASSUMPTION,
        "checkpoint": rel_ckpt,
        "checkpoint_digest": ckpt.get("digest"),
        "step": ckpt.get("step"),
        "data": {"format": cfg.data.format, "path": cfg.data.path},
    }
    atomic_write_text(out_path, json.dumps(data, indent=1) + "\n")
    logger.info("wrote %s: lambda %.4f", out_path, data["lambda"])
    return {**data, "path": str(out_path)}


def calibration_lines(cal: dict) -> list[str]:
    """What ``probunet calibrate`` prints of :func:`calibrate_run`'s result."""
    what = "empty-union cases skipped" if cal["risk"] == "fnr" else "empty-union cases (always covered)"
    return [f"calibrated on {cal['num_cases']} {cal['split']} cases ({cal['n_empty']} {what}), "
            f"{cal['num_samples']} samples each: lambda {cal['lambda']:.4f} (region: pixels marked by at least "
            f"{cal['min_votes']} of {cal['num_samples']} samples)",
            f"  guarantee: {cal['guarantee']}",
            f"  assumption: {cal['assumption']}",
            f"  written: {cal['path']} (predict writes the region, evaluate reports it on the test split)"]


__all__ = [*_regions_all, "calibrate_run", "calibration_lines", "sample_counts", "split_kwargs"]
