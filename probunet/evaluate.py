"""Evaluation of a trained Probabilistic U-Net over a dataset split.

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

Files (``out_dir`` or next to ``--out FILE``): ``summary.json`` (mean and
standard error of every metric, the conventions, the data config),
``per_case.csv``, ``reliability.png`` and, with truth, ``lesions.csv`` and
``lesions.png``. Results depend only on the checkpoint, the data, ``eval.seed``,
``eval.batch_size`` and the number of samples: a rerun writes identical files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import __version__, metrics
from .collapse import diversity_warning
from .data import real_raters
from .checkpoint import load_model
from .inference import evaluation_sampler
from .guards import MAX_SAMPLES, ensure_writable_dir
from .utils import atomic_call, atomic_write_text

logger = logging.getLogger(__name__)

SUMMARY_KIND = "probunet-evaluation"
NUM_BINS = 10

# per-case CSV columns: (column, description) in file order
CASE_METRICS = {
    "ged": "D^2_GED = 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')] vs. the raters",
    "ged_cross": "E[d(S,Y)]: mean sample-to-rater distance",
    "sample_diversity": "E[d(S,S')]: mean sample-to-sample distance",
    "reference_diversity": "E[d(Y,Y')]: mean rater-to-rater distance",
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
TRUTH_METRICS = {
    "ged_true": "D^2_GED vs. fresh references from the true rater distribution",
    "hm_iou_true": "Hungarian-matched IoU vs. the fresh true references",
    "reference_diversity_true": "E[d(Y,Y')] of the fresh true references",
    "lesion_presence_mae": "mean |sampled presence frequency - true presence probability| over the case's lesions",
}
LESION_COLUMNS = ["case", "lesion", "contrast", "true_p", "sampled_freq", "rater_freq"]


# ----------------------------------------------------------------------------- small helpers


def _finite_or_none(x):
    """JSON-safe value: NaN / Inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def mean_and_sem(values) -> dict:
    """Mean, standard deviation (ddof=1) and standard error over the finite values.

    ``n`` is the number of finite values, ``num_nan`` the others (NaN cases, e.g.
    S_NCC on an image where the model is certain everywhere).
    """
    v = np.asarray(values, dtype=np.float64)
    ok = v[np.isfinite(v)]
    n = int(ok.size)
    mean = float(ok.mean()) if n else float("nan")
    std = float(ok.std(ddof=1)) if n > 1 else float("nan")
    sem = std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "sem": sem, "std": std, "n": n, "num_nan": int(v.size - n)}


def _pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([repr(float(row[c])) if isinstance(row[c], (float, np.floating)) else row[c]
                         for c in columns])
    return buf.getvalue()


def output_paths(summary_path: str | Path) -> dict[str, Path]:
    """The files written next to the summary JSON.

    ``summary.json`` gets ``per_case.csv``, ``reliability.png``, ``lesions.csv`` and
    ``lesions.png`` beside it; any other name ``NAME.json`` gets ``NAME_per_case.csv`` etc.
    """
    summary_path = Path(summary_path)
    prefix = "" if summary_path.stem == "summary" else summary_path.stem + "_"
    folder = summary_path.parent
    return {"summary": summary_path, "per_case": folder / f"{prefix}per_case.csv",
            "reliability": folder / f"{prefix}reliability.png", "lesions": folder / f"{prefix}lesions.csv",
            "lesions_plot": folder / f"{prefix}lesions.png"}


def lesion_scatter(path: str | Path, rows: list[dict], *, title: str = "lesion presence") -> Path:
    """Sampled presence frequency (y) against the true presence probability (x), one dot per
    lesion; the raters' observed frequency in grey for comparison."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    true_p = np.array([r["true_p"] for r in rows], dtype=np.float64)
    sampled = np.array([r["sampled_freq"] for r in rows], dtype=np.float64)
    raters = np.array([r["rater_freq"] for r in rows], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    ax.scatter(true_p, raters, s=10, c="0.7", marker="x", label="raters")
    ax.scatter(true_p, sampled, s=14, c="C0", label="model samples")
    mae = float(np.mean(np.abs(sampled - true_p))) if rows else float("nan")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("true presence probability")
    ax.set_ylabel("presence frequency")
    ax.set_title(f"{title} (MAE {mae:.3f}, r {_pearson(sampled, true_p):.2f})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = atomic_call(path, lambda p: fig.savefig(p, dpi=110, format="png"), suffix=".png")
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- library


def evaluate(model, cfg, items: list[dict], *, num_samples: int, seed: int, device, progress: bool = False,
             out_dir: Optional[str | Path] = None, summary_path: Optional[str | Path] = None,
             checkpoint: Optional[str] = None, split: Optional[str] = None) -> dict:
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
    sampler = evaluation_sampler(model, cfg.eval, device, seed=int(seed))
    rows, lesion_rows, calibrations = _score_items(sampler, cfg, items, int(num_samples), int(seed), has_truth,
                                                   progress)
    pooled = metrics.aggregate_calibration(calibrations)
    summary = _summary(cfg, rows, lesion_rows, pooled, num_samples=int(num_samples), seed=int(seed), device=device,
                       checkpoint=checkpoint, split=split or cfg.eval.split, has_truth=has_truth)
    summary["files"] = {}
    if out_dir is not None or summary_path is not None:
        paths = output_paths(summary_path if summary_path is not None else Path(out_dir) / "summary.json")
        files = {"summary": paths["summary"], "per_case": paths["per_case"],
                 "reliability": paths["reliability"]}
        if has_truth:
            files.update(lesions=paths["lesions"], lesions_plot=paths["lesions_plot"])
        summary["files"] = {k: str(v) for k, v in files.items()}
        _write_outputs(summary, rows, lesion_rows, pooled, files, has_truth)
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
                 progress: bool) -> tuple[list, list, list]:
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
    refs = torch.as_tensor(real_raters(item)).to(device)[None]  # (1, A, *spatial)
    comp = metrics.ged_components(sam, refs, **kw)
    cal = metrics.calibration(sam, refs, num_bins=NUM_BINS, num_classes=num_classes)
    cons = metrics.consensus_scores(sam, refs, num_classes=num_classes)
    row = {
        "case_id": item["case_id"], "index": index, "num_raters": int(refs.shape[1]),
        "ged": float(metrics.ged_from_components(comp)[0]),
        "ged_cross": float(comp.cross[0]),
        "sample_diversity": float(comp.sample_diversity[0]),
        "reference_diversity": float(comp.reference_diversity[0]),
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
        "precision": "float32 (no autocast)",
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
    warning = diversity_warning(m["sample_diversity"]["mean"], m["reference_diversity"]["mean"])
    summary["warnings"] = [warning] if warning else []
    if warning:
        logger.warning(warning)
    return summary


def _conventions(empty_iou: float, num_classes: int) -> dict:
    return {
        "distance": "d(a, b) = 1 - IoU over the foreground classes 1..C-1, mean over classes",
        "empty_iou": empty_iou if math.isfinite(empty_iou) else "nan",
        "ged_pairs": "expectations over all ordered pairs, i == j included",
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
                    "fp32; validation during training draws the same samples",
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
    from .data import synthetic

    rng = np.random.default_rng([int(seed), int(index)])
    true_refs = synthetic.draw_references(truth, num_true, rng)  # (K, *spatial)
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
            "corr_sampled_vs_true": _pearson(sampled, true_p),
            "mae_raters_vs_true": float(np.mean(np.abs(raters - true_p))) if true_p.size else nan,
            "corr_raters_vs_true": _pearson(raters, true_p),
        },
    }


def _write_outputs(summary: dict, rows: list[dict], lesion_rows: list[dict], pooled, files: dict,
                   has_truth: bool) -> None:
    from .viz import reliability_diagram

    columns = ["case_id", "index", "num_raters", *CASE_METRICS, *(TRUTH_METRICS if has_truth else ())]
    folder = Path(files["summary"]).parent
    folder.mkdir(parents=True, exist_ok=True)
    _record_outputs(folder, [Path(f).name for f in files.values() if Path(f).parent == folder])
    atomic_write_text(files["per_case"], _csv_text(rows, columns))
    ece = float(pooled.ece)
    reliability_diagram(files["reliability"], pooled.bin_edges.numpy(), pooled.mean_predicted.numpy(),
                        pooled.mean_observed.numpy(), pooled.counts.numpy(),
                        ece=ece if math.isfinite(ece) else None,
                        title=f"{summary['split']} split, {summary['num_cases']} cases, "
                              f"{summary['num_samples']} samples")
    if has_truth:
        atomic_write_text(files["lesions"], _csv_text(lesion_rows, LESION_COLUMNS))
        lesion_scatter(files["lesions_plot"], lesion_rows,
                       title=f"lesion presence, {summary['split']} split")
    # the summary last: its presence means the others are complete
    atomic_write_text(files["summary"], json.dumps(_finite_or_none(summary), indent=1) + "\n")


# ----------------------------------------------------------------------------- command line


def run_dir_of(given: Path, checkpoint: Path) -> Path:
    """RUN_DIR: the given run folder, or RUN for RUN/checkpoints/x.pt, else the checkpoint's folder."""
    if given.is_dir():
        return given
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return checkpoint.parent


def config_for_evaluation(ckpt_config: dict, overrides: list[str]):
    """The checkpoint's resolved config with ``key=value`` overrides; ``model.*`` is fixed."""
    from .config import ConfigError, apply_overrides, from_dict, parse_override

    for text in overrides or []:
        path, _ = parse_override(text)
        if path[0] == "model":
            raise ConfigError(f"override '{text}': the model is defined by the checkpoint; model.* cannot be "
                              f"changed at evaluation")
    return from_dict(apply_overrides(ckpt_config, list(overrides or [])))


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


OUTPUTS_RECORD = ".probunet-evaluation.json"  # names of the files evaluations wrote into a folder
_RECORD_KIND = "probunet-evaluation-files"


def _recorded_outputs(folder: Path) -> Optional[set]:
    """Names the record in ``folder`` lists (empty when there is none); None when a file of that
    name exists but is not probunet's."""
    path = folder / OUTPUTS_RECORD
    if not (path.exists() or path.is_symlink()):
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("kind") != _RECORD_KIND or not isinstance(data.get("files"), list):
        return None
    return {str(n) for n in data["files"]}


def _record_outputs(folder: Path, names) -> None:
    """Add ``names`` to the folder's record before they are written (an interrupted evaluation's
    files stay probunet's own)."""
    known = _recorded_outputs(folder) or set()
    if set(names) <= known:
        return
    atomic_write_text(folder / OUTPUTS_RECORD, json.dumps({"kind": _RECORD_KIND, "files": sorted(known | set(names))},
                                                          indent=1) + "\n")


def _own_outputs(summary: Path) -> set:
    """Names in the summary's folder that probunet's evaluations wrote: those of the folder's record,
    and those a probunet summary at ``summary`` lists."""
    names = set(_recorded_outputs(summary.parent) or ())
    if summary.is_file():
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            data = None
        if isinstance(data, dict) and data.get("kind") == SUMMARY_KIND:
            names.add(summary.name)
            files = data.get("files")
            names.update(Path(str(f)).name for f in (files.values() if isinstance(files, dict) else ())
                         if Path(str(f)).parent == summary.parent or not Path(str(f)).is_absolute())
    return names


def _check_outputs(paths: dict[str, Path], checkpoint: Path, data_path: Optional[str], *,
                   overwrite: bool = False) -> None:
    """Never overwrite the checkpoint, the input data, or (unless ``overwrite``) a file that
    probunet's evaluations did not write: every output path is checked, not only the summary."""
    for p in paths.values():
        if p.exists() and p.resolve() == checkpoint.resolve():
            raise ValueError(f"--out {paths['summary']}: would overwrite the checkpoint {checkpoint}")
        if data_path and _is_within(p, Path(data_path)):
            raise ValueError(f"--out {paths['summary']}: refusing to write evaluation results inside the input "
                             f"data folder {data_path}; choose another --out")
        if p.is_dir():
            raise IsADirectoryError(f"cannot write {p}: it is a directory")
    if overwrite:
        return
    summary = paths["summary"]
    record = summary.parent / OUTPUTS_RECORD
    if _recorded_outputs(summary.parent) is None:
        raise FileExistsError(f"--out {summary}: {record} exists and probunet did not write it; refusing to "
                              f"overwrite it (--overwrite replaces it)")
    own = _own_outputs(summary)
    for key, p in paths.items():
        if (p.exists() or p.is_symlink()) and p.name not in own:
            what = "is not a probunet evaluation summary" if key == "summary" else "was not written by probunet"
            raise FileExistsError(f"--out {summary}: {p} exists and {what}; refusing to overwrite it "
                                  f"(--overwrite replaces it)")


def _resolve_device(name: str) -> torch.device:
    from .utils import resolve_device

    try:
        return resolve_device(name or "auto")
    except RuntimeError:
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device auto "
                         f"or --device cpu") from None
    except Exception as exc:  # a malformed device string
        raise ValueError(f"--device {name}: not a device ({exc.__class__.__name__}); use auto, cpu, cuda "
                         f"or cuda:N") from None


def _model_mismatch(exc: Exception, checkpoint: Path) -> Exception:
    """Name the checkpoint in data errors that are really a model/data mismatch."""
    from .data import DataError

    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    if any(k in msg for k in ("model.in_channels", "model.num_classes", "model.spatial_dims")):
        return DataError(f"the data does not match the checkpoint {checkpoint}: {msg}")
    return exc


def evaluate_cli(args) -> int:
    """``probunet evaluate CHECKPOINT_OR_RUN [--num-samples N] [--out FILE] [key=value ...]``."""
    from .options import EvaluateOptions, from_args

    result = evaluate_checkpoint(from_args(EvaluateOptions, args), progress=not getattr(args, "no_progress", False))
    _print_summary(result)
    return 0


def evaluate_checkpoint(options, *, progress: bool = False) -> dict:
    """Evaluate a checkpoint or run directory as ``probunet evaluate`` does (a
    :class:`probunet.options.EvaluateOptions`); writes the files and returns :func:`evaluate`'s result."""
    from .data import DataError, load_splits

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
    device = _resolve_device(options.device)
    summary_path = _summary_path(options.out, given, ckpt_path)
    _check_outputs(output_paths(summary_path), ckpt_path, cfg.data.path,
                   overwrite=bool(getattr(options, "overwrite", False)))
    include_new = bool(getattr(options, "include_new_cases", False))
    if include_new and cfg.eval.split != "test":
        raise ValueError(f"--include-new-cases: new cases join the test split only, not eval.split="
                         f"{cfg.eval.split}")
    record, where = recorded_split_of(given, ckpt_path, ckpt, cfg)
    try:
        splits = load_splits(cfg, recorded=record, recorded_from=where, include_new=include_new)
    except DataError as exc:
        raise _model_mismatch(exc, ckpt_path) from None
    items = splits[cfg.eval.split]
    if not items:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        raise ValueError(f"the {cfg.eval.split} split is empty ({sizes} cases); choose another eval.split=... "
                         f"or change data.split")
    _check_divisible(items, int(getattr(model, "divisor", 1)))
    _check_sample_memory(items, cfg, num_samples, device)
    ensure_writable_dir(summary_path.parent, "--out")  # a read-only or missing folder: refused before the work
    logger.info("evaluating %s on the %s split (%d cases, %d samples each) on %s", ckpt_path, cfg.eval.split,
                len(items), num_samples, device)
    return evaluate(model, cfg, items, num_samples=num_samples, seed=cfg.eval.seed, device=device,
                    progress=progress, summary_path=summary_path, checkpoint=str(ckpt_path), split=cfg.eval.split)


def recorded_split_of(given: Path, ckpt_path: Path, ckpt: dict, cfg) -> tuple[Optional[dict], str]:
    """The split the run fixed when it started (its checkpoint's record, else ``RUN_DIR/splits.json``),
    when the evaluated data is the run's own (same ``data.format`` and ``data.path``); ``(None, "")``
    for another dataset or a run without a record. Overriding ``data.split`` on the run's own data
    is refused: it would move training cases into the test set."""
    from .config import ConfigError, from_dict
    from .data.recorded_split import read_recorded_split, same_data_source

    now = cfg.to_dict()["data"]
    trained = from_dict(ckpt["config"]).to_dict()["data"]
    if not same_data_source(now, trained):
        logger.info("the data (format, path or synthetic settings) differs from the run's: another dataset, split by "
                    "its data.split")
        return None, ""
    run_dir = given if given.is_dir() else ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" \
        else None
    record, where = read_recorded_split(run_dir, ckpt)
    if record is None:
        logger.warning("%s: no recorded split (a run from before probunet kept one); the data is split again by "
                       "data.split, which matches training only if the data did not change", ckpt_path)
    elif now["split"] != trained["split"]:
        changed = sorted(k for k in set(now["split"]) | set(trained["split"])
                         if now["split"].get(k) != trained["split"].get(k))
        raise ConfigError(f"data.split.{changed[0]}: the run's split is fixed ({where}) and cannot be changed "
                          f"on its own data; point data.path at another folder to evaluate other cases")
    return record, where


def _check_sample_memory(items: list[dict], cfg, num_samples: int, device) -> None:
    """The samples of one batch (label maps and the logits evaluation keeps) against the memory available:
    too many samples is one line with the figures, before anything is drawn."""
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
    for name, path in result["files"].items():
        print(f"  {name + ':':15s}{path}")
    print(result["conventions"]["line"])
    for warning in result.get("warnings", []):
        print(f"warning: {warning}")
