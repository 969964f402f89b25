"""Evaluation of a trained model over a dataset split: samples, scores, summary.

``evaluate(model, cfg, items, ...)`` draws N samples per image through
:mod:`probunet.inference` (seeded per case, batched, fp32: the samples validation
during training draws) and scores them against the image's raters:

- D^2_GED and its three terms E[d(S,Y)], E[d(S,S')], E[d(Y,Y')] (d = 1 - IoU),
- Hungarian-matched IoU (both sets tiled to lcm(S, A)),
- S_NCC (PHiSeg), Dice / IoU of the sample consensus vs. the raters' majority
  vote, and ECE of the sampled vs. rater foreground frequency (per case, and
  pooled over the split for the reliability diagram).

On the synthetic dataset (items with ``meta["truth"]``) the samples are also
scored against fresh references drawn from the true rater distribution
(``GED_true``, ``HM-IoU_true``) and, per lesion, the sampled presence frequency
is compared with the true presence probability (the experiment of Kohl et al.
2018 on their synthetic Cityscapes task).

:func:`evaluate` returns the summary (mean and standard error of every metric,
the conventions, the data config) with the per-case and per-lesion rows; given
``out_dir`` or ``summary_path`` it has :mod:`probunet.evaluation.report` write them
(``summary.json``, ``per_case.csv``, ``reliability.png`` and, with truth,
``lesions.csv`` and ``lesions.png``). Results depend only on the checkpoint, the
data, ``eval.seed``, ``eval.batch_size`` and the number of samples: a rerun
writes identical files. ``probunet evaluate`` (checkpoint in, files out) is its
thin wrapper in :mod:`probunet.cli`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import __version__
from ..metrics import segmentation as metrics
from ..models.collapse import diversity_warning
from ..data import real_raters
from ..inference.sampler import evaluation_sampler, sampling_precision
from ..metrics.segmentation import mean_and_sem
from .reference import fresh_true_references, reference_rows, spread_ratio
from .report import output_paths, write_outputs

logger = logging.getLogger(__name__)

SUMMARY_KIND = "probunet-evaluation"
NUM_BINS = 10

# per-case CSV columns: (column, description) in file order
CASE_METRICS = {
    "ged": "D^2_GED = 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')] vs. the raters",
    "ged_cross": "E[d(S,Y)]: mean sample-to-rater distance",
    "sample_diversity": "E[d(S,S')]: mean sample-to-sample distance",
    "reference_diversity": "E[d(Y,Y')]: mean rater-to-rater distance",
    "sample_diversity_distinct": "E[d(S,S')] over distinct pairs (i != j): the spread ratio's numerator",
    "reference_diversity_distinct": "E[d(Y,Y')] over distinct rater pairs (i != j): the spread ratio's denominator "
                                    "(NaN for one rater)",
    "hm_iou": "Hungarian-matched IoU, samples vs. raters",
    "s_ncc": "S_NCC (PHiSeg): NCC of the sample variance map and the rater error maps",
    "consensus_dice": "Dice of the sample majority vs. the rater majority",
    "consensus_iou": "IoU of the sample majority vs. the rater majority",
    "ece": "expected calibration error of this case (sampled vs. rater foreground frequency)",
    "qubiq": "QUBIQ challenge score: Dice of mean sampled probability > t vs. rater fraction > t, mean over "
             "t = 0.1..0.9 (and over the foreground classes)",
    "empty_samples": "share of the samples with no foreground pixel",
    "empty_raters": "share of the raters with no foreground pixel",
    "empty_gap": "|empty_samples - empty_raters|: how far the sampled chance of an empty mask is from the raters'",
}
REGION_COLUMNS = ("region_fnr", "region_covered", "region_size", "union_size")  # with a calibration
TRUTH_METRICS = {
    "ged_true": "D^2_GED vs. fresh references from the true rater distribution",
    "hm_iou_true": "Hungarian-matched IoU vs. the fresh true references",
    "reference_diversity_true": "E[d(Y,Y')] of the fresh true references",
    "reference_diversity_true_distinct": "E[d(Y,Y')] of the fresh true references over distinct pairs (i != j)",
    "lesion_presence_mae": "mean |sampled presence frequency - true presence probability| over the case's lesions",
}


# ----------------------------------------------------------------------------- small helpers


# ----------------------------------------------------------------------------- library


def evaluate(model, cfg, items: list[dict], *, num_samples: int, seed: int, device, progress: bool = False,
             out_dir: Optional[str | Path] = None, summary_path: Optional[str | Path] = None,
             checkpoint: Optional[str] = None, split: Optional[str] = None, references: bool = True,
             calibration: Optional[dict] = None) -> dict:
    """Sample ``num_samples`` segmentations per item and score them against the raters.

    Args:
        model: a model meeting :class:`probunet.models.base.SegmentationSampler` (its
            train/eval mode is restored).
        cfg: the :class:`~probunet.config.Config` (``model.num_classes``, ``eval.*``;
            ``data`` is recorded in the summary).
        items: dataset items ``{"image" (C, *spatial), "labels" (A, *spatial), "case_id",
            "meta"}``; ``meta["truth"]`` (synthetic data) adds the truth block.
        num_samples: S, samples per image.
        seed: seeds the samples of each case by ``(seed, case id)`` and the fresh true
            references by ``(seed, case index)``.
        device: torch device (or name) to run on.
        progress: show a tqdm bar over cases.
        out_dir: write ``summary.json``, ``per_case.csv``, ``reliability.png`` (and
            ``lesions.csv``, ``lesions.png`` with truth) there. ``summary_path``
            instead names the summary JSON itself (see :func:`output_paths`).
        checkpoint, split: recorded in the summary (split defaults to ``cfg.eval.split``).
        references: add the reference rows on the same cases (``summary["reference"]``:
            majority vote, all-empty and, with truth, the true sampler; see
            :mod:`probunet.evaluation.reference`). The spread ratio (``summary["spread"]``,
            :func:`probunet.evaluation.reference.spread_ratio` over distinct pairs) is always
            there; with truth ``summary["spread_true"]`` divides by the fresh true
            references' spread instead of the raters'.

        calibration: a run's calibration (:func:`probunet.evaluation.calibration.load_calibration`, computed for
            ``num_samples`` samples): every case is also scored on the calibrated region (``per_case``
            columns ``region_*``, ``union_size``) and ``summary["calibrated_region"]`` holds the empirical
            risk with its standard error, the guarantee and the region's size against the readers' union.

    The samples are drawn by :func:`probunet.inference.evaluation_sampler`, the
    sampler validation during training uses: the same samples per case, in full
    precision (fp32: bf16/fp16 rounding could flip the argmax of a sample).

    Returns:
        The summary dict (what ``summary.json`` holds) plus ``"per_case"`` (list of
        row dicts, the CSV) and ``"lesions"`` (list of per-lesion row dicts).
    """
    if not items:
        raise ValueError("nothing to evaluate: the list of cases is empty")
    if num_samples < 1:
        raise ValueError(f"the number of samples must be >= 1, got {num_samples}")
    device = torch.device(device)
    has_truth = any("truth" in it.get("meta", {}) for it in items)
    sampler = evaluation_sampler(model, cfg.eval, device, seed=int(seed),
                                 roi_size=getattr(cfg.data, "patch_size", None))
    rows, lesion_rows, calibrations = _score_items(sampler, cfg, items, int(num_samples), int(seed), has_truth,
                                                   progress, region=calibration)
    pooled = metrics.aggregate_calibration(calibrations)
    summary = _summary(cfg, rows, lesion_rows, pooled, num_samples=int(num_samples), seed=int(seed), device=device,
                       checkpoint=checkpoint, split=split or cfg.eval.split, has_truth=has_truth)
    if references:
        summary["reference"] = reference_rows(items, num_samples=int(num_samples), seed=int(seed),
                                              num_classes=int(cfg.model.num_classes),
                                              empty_iou=float(cfg.eval.empty_iou),
                                              num_true_references=int(cfg.eval.num_true_references))
    if calibration is not None:
        from ..inference.regions import region_summary

        summary["calibrated_region"] = region_summary(rows, calibration)
    summary["files"] = {}
    if out_dir is not None or summary_path is not None:
        paths = output_paths(summary_path if summary_path is not None else Path(out_dir) / "summary.json")
        files = {"summary": paths["summary"], "per_case": paths["per_case"],
                 "reliability": paths["reliability"]}
        if has_truth:
            files.update(lesions=paths["lesions"], lesions_plot=paths["lesions_plot"])
        summary["files"] = {k: str(v) for k, v in files.items()}
        columns = ["case_id", "index", "num_raters", *CASE_METRICS, *(TRUTH_METRICS if has_truth else ()),
                   *(REGION_COLUMNS if calibration is not None else ())]
        write_outputs(summary, rows, lesion_rows, pooled, files, columns=columns, has_truth=has_truth)
    m = summary["metrics"]
    logger.info("evaluated %d cases x %d samples: GED %.4f +- %.4f, HM-IoU %.4f +- %.4f, diversity %.4f, "
                "ECE %.4f", len(rows), num_samples, m["ged"]["mean"], m["ged"]["sem"], m["hm_iou"]["mean"],
                m["hm_iou"]["sem"], m["sample_diversity"]["mean"], summary["calibration"]["ece"])
    return {**summary, "per_case": rows, "lesions": lesion_rows}


class _HmIou:
    """HM-IoU of one case from its d_sy; NaN (warned once) where the IoU is undefined (empty_iou=nan)."""

    def __init__(self):
        self.warned = False

    def __call__(self, d_sy: torch.Tensor) -> float:
        try:
            return float(metrics.hungarian_matched_iou_from_iou(1.0 - d_sy)[0])
        except ValueError as exc:  # NaN IoU under empty_iou=nan
            if not self.warned:
                logger.warning("HM-IoU is NaN for some cases: %s", exc)
                self.warned = True
            return float("nan")


def _score_items(sampler, cfg, items: list[dict], num_samples: int, seed: int, has_truth: bool,
                 progress: bool, region: Optional[dict] = None) -> tuple[list, list, list]:
    """Per-case rows, lesion rows and calibrations of the samples ``sampler`` draws, in item order."""
    from .validation import case_ids

    rows: list = [None] * len(items)
    lesion_rows: dict[int, list] = {}
    calibrations: list = [None] * len(items)
    hm_iou = _HmIou()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="evaluate", unit="case", dynamic_ncols=True)
    try:
        batches = sampler.sample_batches([it["image"] for it in items], case_ids(items), num_samples,
                                         keep_logits=True, pairwise=False,
                                         key=lambda i: tuple(np.shape(items[i]["image"])))
        for batch, result in batches:
            labels = result.labels.long()  # (B, S, *spatial)
            for j, index in enumerate(batch):
                lesion_rows[index] = []
                rows[index], calibrations[index] = _score_case(
                    items[index], index, labels[j:j + 1], result.logits[j:j + 1], cfg, seed, has_truth, hm_iou,
                    lesion_rows[index], sampler.device)
                if region is not None:  # the calibrated region of the run (probunet.evaluation.calibration)
                    rows[index].update(_region_scores(items[index], labels[j], region))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows, [r for i in sorted(lesion_rows) for r in lesion_rows[i]], calibrations


def _score_case(item: dict, index: int, sam: torch.Tensor, logits: torch.Tensor, cfg, seed: int, has_truth: bool,
                hm_iou, lesion_rows: list, device) -> tuple[dict, metrics.Calibration]:
    """The per-case row of samples ``sam (1, S, *spatial)`` (and their logits) against the item's raters."""
    num_classes = int(cfg.model.num_classes)
    kw = {"num_classes": num_classes, "empty_iou": float(cfg.eval.empty_iou)}
    # a copy: the raters of a preprocessed case are a read-only memory map
    refs = torch.from_numpy(np.array(real_raters(item))).to(device)[None]  # (1, A, *spatial)
    comp = metrics.ged_components(sam, refs, **kw)
    cal = metrics.calibration(sam, refs, num_bins=NUM_BINS, num_classes=num_classes)
    cons = metrics.consensus_scores(sam, refs, num_classes=num_classes)
    row = {
        "case_id": item["case_id"], "index": index, "num_raters": int(refs.shape[1]),
        "ged": float(metrics.ged_from_components(comp)[0]),
        "ged_cross": float(comp.cross[0]),
        "sample_diversity": float(comp.sample_diversity[0]),
        "reference_diversity": float(comp.reference_diversity[0]),
        "sample_diversity_distinct": float(metrics.distinct_pair_mean(comp.d_ss)[0]),
        "reference_diversity_distinct": float(metrics.distinct_pair_mean(comp.d_yy)[0]),
        "hm_iou": hm_iou(comp.d_sy),
        "s_ncc": float(metrics.variance_ncc(logits, refs, from_logits=True)[0]),
        "consensus_dice": float(cons["dice"][0]),
        "consensus_iou": float(cons["iou"][0]),
        "ece": float(cal.ece[0]),
        "qubiq": float(sum(metrics.qubiq_score(logits, refs, num_classes=num_classes, foreground=c)[0]
                           for c in range(1, num_classes)) / (num_classes - 1)),
        "empty_samples": float(metrics.empty_share(sam, num_classes=num_classes)[0]),
        "empty_raters": float(metrics.empty_share(refs, num_classes=num_classes)[0]),
    }
    row["empty_gap"] = abs(row["empty_samples"] - row["empty_raters"])
    truth = item.get("meta", {}).get("truth")
    if has_truth:
        row.update({k: float("nan") for k in TRUTH_METRICS})
    if truth is not None:
        row.update(_truth_scores(sam, truth, item, index, seed, int(cfg.eval.num_true_references), kw, hm_iou,
                                 lesion_rows))
    return row, metrics.Calibration(*(t.cpu() for t in cal))


def _region_scores(item: dict, labels: torch.Tensor, calibration: dict) -> dict:
    """The calibrated region of one case's samples ``labels (S, *spatial)`` against its readers' union."""
    from ..inference.regions import case_counts, case_scores

    counts = case_counts(str(item["case_id"]), labels.cpu().numpy(), np.asarray(real_raters(item)))
    return case_scores(counts, float(calibration["lambda"]))


def by_empty_raters(rows: list[dict]) -> list[dict]:
    """The cases grouped by how many of their raters drew an empty mask.

    One entry per (raters with an empty mask, raters) pair present, in that
    order: ``empty_raters``, ``num_raters``, ``num_cases``, the mean ``ged`` and
    ``empty_samples`` of the group (mean and standard error), and the group's
    share of the summed GED (``ged_share``), so that one can see where the
    distance to the raters comes from (on LIDC, the crops some readers left
    empty).
    """
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        a = int(r["num_raters"])
        groups.setdefault((int(round(r["empty_raters"] * a)), a), []).append(r)
    total = sum(r["ged"] for r in rows if math.isfinite(r["ged"]))
    out = []
    for (k, a), group in sorted(groups.items()):
        ged = [r["ged"] for r in group]
        out.append({
            "empty_raters": k, "num_raters": a, "num_cases": len(group),
            "ged": mean_and_sem(ged),
            "empty_samples": mean_and_sem([r["empty_samples"] for r in group]),
            "ged_share": float(sum(g for g in ged if math.isfinite(g)) / total) if total > 0 else None,
        })
    return out


def _summary(cfg, rows: list[dict], lesion_rows: list[dict], pooled, *, num_samples: int, seed: int, device,
             checkpoint, split: str, has_truth: bool) -> dict:
    """What ``summary.json`` holds (without ``files``)."""
    empty_iou = float(cfg.eval.empty_iou)
    summary = {
        "kind": SUMMARY_KIND,
        "probunet_version": __version__,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "split": split,
        "num_cases": len(rows),
        "num_samples": num_samples,
        "seed": seed,
        "batch_size": max(1, int(cfg.eval.batch_size)),
        "device": str(device),
        "precision": sampling_precision(getattr(cfg.eval, "amp", None), device),
        "metrics": {k: mean_and_sem([r[k] for r in rows]) for k in CASE_METRICS},
        "calibration": {
            "ece": float(pooled.ece),
            "num_bins": NUM_BINS,
            "bin_edges": pooled.bin_edges.tolist(),
            "counts": pooled.counts.tolist(),
            "mean_predicted": pooled.mean_predicted.tolist(),
            "mean_observed": pooled.mean_observed.tolist(),
        },
        "conventions": _conventions(empty_iou, int(cfg.model.num_classes)),
        "descriptions": dict(CASE_METRICS),
        "data": _data_dict(cfg),
        "eval": _eval_dict(cfg),
    }
    summary["by_empty_raters"] = by_empty_raters(rows)
    if has_truth:
        summary["truth"] = _truth_summary(rows, lesion_rows, int(cfg.eval.num_true_references))
    summary["conventions"]["line"] = conventions_line(summary)
    m = summary["metrics"]
    summary["spread"] = spread_ratio(m["sample_diversity_distinct"]["mean"], m["reference_diversity_distinct"]["mean"])
    if has_truth:
        summary["spread_true"] = spread_ratio(m["sample_diversity_distinct"]["mean"],
                                              summary["truth"]["metrics"]["reference_diversity_true_distinct"]["mean"])
    warning = diversity_warning(m["sample_diversity"]["mean"], m["reference_diversity"]["mean"])
    summary["warnings"] = [warning] if warning else []
    if warning:
        logger.warning(warning)
    return summary


def _conventions(empty_iou: float, num_classes: int) -> dict:
    return {
        "distance": "d(a, b) = 1 - IoU over the foreground classes 1..C-1, mean over classes",
        "empty_iou": empty_iou if math.isfinite(empty_iou) else "nan",
        "ged_pairs": "expectations over all ordered pairs, i == j included" + (
            "" if math.isfinite(empty_iou) else "; E[d(Y,Y')] over the rater pairs whose distance is defined "
                                                "(two empty raters left out, as Kohl et al. 2018's code)"),
        "hm_iou": "both sets tiled to lcm(S, A) elements, Hungarian matching on 1 - IoU (Kohl et al. 2019)",
        "references": "the dataset's raters of each case (raters padded in by the reader excluded)",
        "consensus": "strict majority of the samples vs. strict majority of the raters (a tie is background); "
                     "empty vs. empty scores 1",
        "calibration": f"per-pixel sampled vs. rater foreground frequency, {NUM_BINS} equal-width bins, "
                       f"all pixels; 'calibration.ece' pools the pixels of the split, 'metrics.ece' is "
                       f"the mean of per-case ECEs",
        "s_ncc": "PHiSeg variance_ncc: mean over raters of NCC(E_s CE(pbar, p_s), E_s CE(y, p_s))",
        "qubiq": "QUBIQ challenge score: P = mean over samples of the softmax probability of a foreground class, "
                 "R = fraction of the real raters marking it; Dice(P > t, R > t) (strict; both empty: 1) "
                 "averaged over t = 0.1, ..., 0.9, then over the foreground classes",
        "summary_statistics": "mean and standard error (std with ddof=1 / sqrt(n)) over the cases with a "
                              "finite value; n counts them, num_nan the others",
        "sampling": "sample s of a case is drawn from (eval.seed, case id, s) alone (probunet.inference), "
                    "in the precision of eval.amp (default off: fp32); validation during training draws the "
                    "same samples",
        "num_classes": num_classes,
    }


def conventions_line(summary: dict) -> str:
    """The protocol in one line, to print under a table of results."""
    empty = summary["conventions"]["empty_iou"]
    empty_rule = "IoU 1 (d = 0)" if empty == 1.0 else ("NaN, cases skipped" if empty == "nan" else f"IoU {empty}")
    return (f"Protocol: {summary['num_samples']} samples per image, {summary['num_cases']} {summary['split']} cases; "
            f"d = 1 - IoU over the foreground classes; two empty masks: {empty_rule}; GED over all ordered "
            f"pairs, self-pairs (i = j) included; HM-IoU: Hungarian matching after tiling both sets to "
            f"lcm(S, A); references: each case's real raters; mean +- standard error over cases.")


def _data_dict(cfg) -> dict:
    return cfg.to_dict()["data"]


def _eval_dict(cfg) -> dict:
    return cfg.to_dict()["eval"]


def _truth_scores(sam: torch.Tensor, truth: dict, item: dict, index: int, seed: int, num_true: int,
                  kw: dict, hm_iou, lesion_rows: list) -> dict:
    """Scores of one case's samples ``(1, S, *spatial)`` against its true rater distribution."""
    from ..data import synthetic

    true_refs = fresh_true_references(truth, seed, index, num_true)  # (K, *spatial)
    true_refs = torch.as_tensor(true_refs).to(sam.device)[None]  # (1, K, *spatial)
    comp = metrics.ged_components(sam, true_refs, **kw)
    sampled = synthetic.lesion_presence(sam[0].cpu().numpy(), truth).mean(axis=0)  # (S, L) -> (L,)
    raters = synthetic.lesion_presence(real_raters(item), truth).mean(axis=0)  # (A, L) -> (L,)
    true_p = np.array([les["presence_probability"] for les in truth["lesions"]], dtype=np.float64)
    for k, les in enumerate(truth["lesions"]):
        lesion_rows.append({"case": item["case_id"], "lesion": k, "contrast": float(les["contrast"]),
                            "true_p": float(true_p[k]), "sampled_freq": float(sampled[k]),
                            "rater_freq": float(raters[k])})
    return {
        "ged_true": float(metrics.ged_from_components(comp)[0]),
        "hm_iou_true": hm_iou(comp.d_sy),
        "reference_diversity_true": float(comp.reference_diversity[0]),
        "reference_diversity_true_distinct": float(metrics.distinct_pair_mean(comp.d_yy)[0]),
        "lesion_presence_mae": float(np.mean(np.abs(sampled - true_p))) if true_p.size else float("nan"),
    }


def _truth_summary(rows: list[dict], lesion_rows: list[dict], num_true: int) -> dict:
    true_p = np.array([r["true_p"] for r in lesion_rows], dtype=np.float64)
    sampled = np.array([r["sampled_freq"] for r in lesion_rows], dtype=np.float64)
    raters = np.array([r["rater_freq"] for r in lesion_rows], dtype=np.float64)
    nan = float("nan")
    return {
        "num_references": num_true,
        "references": "fresh masks drawn from the recorded true rater distribution (synthetic.draw_references), "
                      "rng seeded by (eval.seed, case index)",
        "metrics": {k: mean_and_sem([r[k] for r in rows]) for k in TRUTH_METRICS},
        "descriptions": dict(TRUTH_METRICS),
        "lesions": {
            "num_lesions": int(true_p.size),
            "presence": "a lesion is present in a mask when >= half of its core is foreground "
                        "(synthetic.lesion_presence); sampled_freq = fraction of the model's samples, "
                        "rater_freq = fraction of the dataset's raters",
            "mae_sampled_vs_true": float(np.mean(np.abs(sampled - true_p))) if true_p.size else nan,
            "corr_sampled_vs_true": metrics.pearson(sampled, true_p),
            "mae_raters_vs_true": float(np.mean(np.abs(raters - true_p))) if true_p.size else nan,
            "corr_raters_vs_true": metrics.pearson(raters, true_p),
        },
    }


__all__ = ["CASE_METRICS", "NUM_BINS", "REGION_COLUMNS", "SUMMARY_KIND", "TRUTH_METRICS", "by_empty_raters",
           "conventions_line", "evaluate", "mean_and_sem"]
