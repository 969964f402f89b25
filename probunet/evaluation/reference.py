"""Reference rows: where a model's scores stand next to trivial and ideal predictors.

Scored on the same cases and with the same conventions as the model in
:func:`probunet.evaluation.evaluate`:

- ``majority vote``: every sample is the raters' strict-majority mask (a pixel
  gets the class that more than half of the case's raters give it, else
  background). A model that cannot beat it has learnt nothing about the spread.
- ``all-empty``: every sample is empty.
- ``true sampler`` (synthetic data only, where the true rater distribution is
  recorded): S samples drawn from the true distribution
  (:func:`probunet.data.synthetic.draw_references`). This is the floor: what a
  perfect model would score with the same number of samples.

Each row is scored against the case's raters (GED, HM-IoU, E[d(S,S')]) and,
where the truth is known, against the fresh references from the true
distribution that the model's ``GED_true`` uses (:func:`fresh_true_references`,
the same draws) plus the lesion-presence MAE.

A constant predictor (majority vote, all-empty) scores the same with one sample
as with S copies of it: E[d(S,S')] is 0 and the Hungarian matching of copies
gives each reference the same mask. So those rows are scored with one sample.

:func:`spread_ratio` gives E[d(S,S')] / E[d(Y,Y')] with a verdict
("over-spread" above 1.15, "under-spread" below 0.85). Both expectations are
taken over distinct pairs (i != j, :func:`probunet.metrics.distinct_pair_mean`),
not over all ordered pairs as in the GED: the all-pairs mean of N draws is
(N - 1) / N times the expectation, so 100 samples against four raters would read
99/100 / (3/4) = 1.32 times too spread for a sampler that draws exactly like the
raters.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch

from ..metrics import segmentation as metrics

logger = logging.getLogger(__name__)

SPREAD_BOUNDS = (0.85, 1.15)
ROW_DESCRIPTIONS = {
    "majority vote": "every sample is the raters' strict-majority mask (a tie is background)",
    "all-empty": "every sample is empty",
    "true sampler": "samples drawn from the true rater distribution (synthetic.draw_references), rng seeded by "
                    "(eval.seed, case index, 1): the floor a perfect model reaches with the same number of samples",
}
RATER_METRICS = ("ged", "hm_iou", "sample_diversity", "sample_diversity_distinct")
TRUTH_METRICS = ("ged_true", "hm_iou_true", "lesion_presence_mae")


def fresh_true_references(truth: dict, seed: int, index: int, num: int) -> np.ndarray:
    """The fresh references of case ``index`` from its true rater distribution: ``(num, *spatial)`` int64.

    Seeded by ``(seed, index)``: the references the model's ``GED_true`` is scored against.
    """
    from ..data import synthetic

    return synthetic.draw_references(truth, int(num), np.random.default_rng([int(seed), int(index)]))


def true_sampler_samples(truth: dict, seed: int, index: int, num: int) -> np.ndarray:
    """``num`` samples of the true sampler for case ``index``: ``(num, *spatial)`` int64.

    Seeded by ``(seed, index, 1)``: independent of :func:`fresh_true_references`.
    """
    from ..data import synthetic

    return synthetic.draw_references(truth, int(num), np.random.default_rng([int(seed), int(index), 1]))


def majority_vote(refs: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """The raters' strict-majority mask.

    Args:
        refs: integer label maps ``(B, A, *spatial)``.
        num_classes: C.

    Returns:
        ``(B, *spatial)`` int64: the class more than half of the A raters give a
        pixel, else 0 (background; a tie is background).
    """
    refs = refs.long()
    a = refs.shape[1]
    out = torch.zeros((refs.shape[0], *refs.shape[2:]), dtype=torch.long, device=refs.device)
    for c in range(1, int(num_classes)):
        out[2 * (refs == c).sum(dim=1) > a] = c
    return out


def spread_ratio(sample_diversity: Optional[float], rater_diversity: Optional[float],
                 bounds: tuple[float, float] = SPREAD_BOUNDS) -> dict:
    """E[d(S,S')] / E[d(Y,Y')] and a verdict.

    Pass both expectations over distinct pairs (i != j; see the module docstring):
    then a sampler that draws like the raters scores 1 whatever the set sizes.

    Returns ``{"ratio", "verdict", "sample_diversity", "rater_diversity", "bounds"}``;
    ``verdict`` is ``"over-spread"`` above ``bounds[1]``, ``"under-spread"`` below
    ``bounds[0]``, else ``"matched"``; ratio and verdict are None when the raters'
    diversity is 0 or a value is missing.
    """
    ratio = None
    ok = (sample_diversity is not None and rater_diversity is not None and math.isfinite(sample_diversity)
          and math.isfinite(rater_diversity) and rater_diversity > 0)
    if ok:
        ratio = float(sample_diversity) / float(rater_diversity)
    verdict = None
    if ratio is not None:
        verdict = "over-spread" if ratio > bounds[1] else ("under-spread" if ratio < bounds[0] else "matched")
    return {"ratio": ratio, "verdict": verdict,
            "sample_diversity": None if sample_diversity is None else float(sample_diversity),
            "rater_diversity": None if rater_diversity is None else float(rater_diversity),
            "bounds": [float(bounds[0]), float(bounds[1])], "pairs": "distinct (i != j)"}


def spread_text(spread: dict, against: str = "the raters") -> str:
    """One line: ``spread ratio E[d(S,S')] / E[d(Y,Y')] 1.20 vs the raters: over-spread (0.5300 vs 0.4417; ...)``."""
    if spread.get("ratio") is None:
        return (f"spread ratio E[d(S,S')] / E[d(Y,Y')] vs {against} n/a "
                f"(fewer than two references, or they never disagree)")
    lo, hi = spread["bounds"]
    return (f"spread ratio E[d(S,S')] / E[d(Y,Y')] vs {against} {spread['ratio']:.2f}: {spread['verdict']} "
            f"({spread['sample_diversity']:.4f} vs {spread['rater_diversity']:.4f} over distinct pairs; "
            f"{lo:g} to {hi:g} counts as matched)")


def _hm_iou(d_sy: torch.Tensor) -> float:
    try:
        return float(metrics.hungarian_matched_iou_from_iou(1.0 - d_sy)[0])
    except ValueError:  # NaN IoU under empty_iou=nan
        return float("nan")


def score_case(samples: torch.Tensor, refs: torch.Tensor, *, num_classes: int = 2, empty_iou: float = 1.0,
               truth: Optional[dict] = None, true_refs: Optional[torch.Tensor] = None) -> dict:
    """One predictor's scores on one case.

    Args:
        samples: integer label maps ``(1, S, *spatial)``.
        refs: the case's raters ``(1, A, *spatial)``.
        truth: the case's truth record (synthetic data), for the lesion-presence MAE.
        true_refs: fresh references from the true distribution ``(1, K, *spatial)``.

    Returns:
        ``ged``, ``hm_iou``, ``sample_diversity`` (all pairs) and
        ``sample_diversity_distinct`` (distinct pairs; 0 for one sample, which
        stands for S copies of a constant prediction) against the raters and, with
        ``true_refs``, ``ged_true``, ``hm_iou_true`` (and with ``truth``,
        ``lesion_presence_mae``: mean over the case's lesions of |presence
        frequency in the samples - true presence probability|, and ``lesion_errors``,
        those |differences| per lesion).
    """
    kw = {"num_classes": int(num_classes), "empty_iou": float(empty_iou)}
    comp = metrics.ged_components(samples, refs, **kw)
    row = {"ged": float(metrics.ged_from_components(comp)[0]), "hm_iou": _hm_iou(comp.d_sy),
           "sample_diversity": float(comp.sample_diversity[0]),
           # one sample stands for S copies of a constant prediction: no spread
           "sample_diversity_distinct": 0.0 if samples.shape[1] == 1
           else float(metrics.distinct_pair_mean(comp.d_ss)[0])}
    if true_refs is not None:
        tcomp = metrics.ged_components(samples, true_refs, **kw)
        row["ged_true"] = float(metrics.ged_from_components(tcomp)[0])
        row["hm_iou_true"] = _hm_iou(tcomp.d_sy)
    if truth is not None:
        from ..data import synthetic

        true_p = np.array([les["presence_probability"] for les in truth["lesions"]], dtype=np.float64)
        freq = synthetic.lesion_presence(samples[0].cpu().numpy(), truth).mean(axis=0)  # (S, L) -> (L,)
        row["lesion_errors"] = [float(e) for e in np.abs(freq - true_p)]
        row["lesion_presence_mae"] = float(np.mean(row["lesion_errors"])) if true_p.size else float("nan")
    return row


def reference_rows(items: list[dict], *, num_samples: int, seed: int = 0, num_classes: int = 2,
                   empty_iou: float = 1.0, num_true_references: int = 32) -> dict:
    """The reference rows over ``items``: mean and standard error of each score.

    Args:
        items: dataset items ``{"image", "labels" (A, *spatial), "case_id", "meta"}``;
            ``meta["truth"]`` (synthetic data) adds the true sampler and the scores
            against the truth.
        num_samples: S of the true sampler (the model's number of samples).
        seed: ``eval.seed``: the true references and the true sampler's draws.
        num_classes, empty_iou: the metric conventions (``eval.empty_iou``).
        num_true_references: K fresh references per case (``eval.num_true_references``).

    Returns:
        ``{row name: {"description", "metrics": {name: {"mean", "sem", "std", "n",
        "num_nan"}}}}`` for ``majority vote``, ``all-empty`` and, when every item
        has a truth record, ``true sampler``; with truth each row also holds
        ``lesion_presence_mae_pooled``, the MAE over all lesions of the split (what
        the evaluation prints for the model), where ``metrics.lesion_presence_mae``
        averages per case first.
    """
    from ..data import real_raters
    from ..metrics.segmentation import mean_and_sem

    if not items:
        raise ValueError("no cases to score the reference rows on")
    has_truth = all("truth" in it.get("meta", {}) for it in items)
    names = ["majority vote", "all-empty"] + (["true sampler"] if has_truth else [])
    per_row: dict[str, list[dict]] = {n: [] for n in names}
    for index, item in enumerate(items):
        refs = torch.from_numpy(np.array(real_raters(item))).long()[None]  # (1, A, *spatial), copied from a memory map
        truth = item["meta"]["truth"] if has_truth else None
        true_refs = None
        if has_truth:
            true_refs = torch.as_tensor(fresh_true_references(truth, seed, index, num_true_references))[None]
        majority = majority_vote(refs, num_classes)[:, None]  # (1, 1, *spatial)
        predictors = {"majority vote": majority, "all-empty": torch.zeros_like(majority)}
        if has_truth:
            predictors["true sampler"] = torch.as_tensor(true_sampler_samples(truth, seed, index, num_samples))[None]
        for name, samples in predictors.items():
            per_row[name].append(score_case(samples, refs, num_classes=num_classes, empty_iou=empty_iou,
                                            truth=truth, true_refs=true_refs))
    out = {}
    for name, rows in per_row.items():
        keys = RATER_METRICS + (TRUTH_METRICS if has_truth else ())
        out[name] = {"description": ROW_DESCRIPTIONS[name],
                     "metrics": {k: mean_and_sem([r[k] for r in rows]) for k in keys}}
        if has_truth:
            errors = [e for r in rows for e in r["lesion_errors"]]
            out[name]["lesion_presence_mae_pooled"] = float(np.mean(errors)) if errors else float("nan")
    logger.debug("reference rows on %d cases: %s", len(items),
                 {n: round(v["metrics"]["ged"]["mean"], 4) for n, v in out.items()})
    return out


def _num(stat: Optional[dict], nd: int = 3) -> str:
    if not stat or stat.get("mean") is None or not math.isfinite(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.{nd}f}"


def reference_table(summary: dict) -> list[str]:
    """The model's row and the reference rows of an evaluation summary as text lines (no printing).

    Columns: GED and HM-IoU against the raters, E[d(S,S')] (all pairs), the spread
    ratio against the raters (distinct pairs) and, with truth, GED
    and HM-IoU against the true distribution and the lesion-presence MAE.
    """
    refs = summary.get("reference")
    if not refs:
        return []
    truth = summary.get("truth")
    m = summary["metrics"]
    rater_spread = (m.get("reference_diversity_distinct") or {}).get("mean")
    div = "E[d(S,S')]"
    head = f"  {'':22s}{'GED':>7s}{'HM-IoU':>8s}{div:>12s}{'spread':>8s}"
    if truth:
        head += f"{'GED true':>10s}{'HM-IoU true':>13s}{'presence MAE':>14s}"
    lines = [f"  where this stands (same {summary['num_cases']} cases; GED, HM-IoU vs the raters"
             + (", 'true' vs the true distribution):" if truth else "):"), head]

    def line(name, row, truth_row):
        ratio = spread_ratio((row.get("sample_diversity_distinct") or {}).get("mean"), rater_spread)["ratio"]
        text = f"  {name:22s}{_num(row.get('ged')):>7s}{_num(row.get('hm_iou')):>8s}" \
               f"{_num(row.get('sample_diversity')):>12s}{_num({'mean': ratio}, 2):>8s}"
        if truth:
            text += f"{_num(truth_row.get('ged_true')):>10s}{_num(truth_row.get('hm_iou_true')):>13s}" \
                    f"{_num(truth_row.get('lesion_presence_mae')):>14s}"
        return text

    model_truth = {}
    if truth:
        model_truth = dict(truth["metrics"])
        model_truth["lesion_presence_mae"] = {"mean": truth["lesions"]["mae_sampled_vs_true"]}
    lines.append(line("this model", m, model_truth))
    for name, row in refs.items():
        row_truth = dict(row["metrics"])
        if "lesion_presence_mae_pooled" in row:
            row_truth["lesion_presence_mae"] = {"mean": row["lesion_presence_mae_pooled"]}
        lines.append(line(name, row["metrics"], row_truth))
    return lines
