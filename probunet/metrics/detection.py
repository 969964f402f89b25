"""Does the uncertainty find the failures, the shifted images, and is it calibrated? Pure functions.

Failure detection (Geifman et al. 2019; Jaeger et al. 2023), per case a risk
r_i (higher is worse: 1 - Dice, GED) and an uncertainty score u_i:

- risk-coverage curve: cases sorted by ascending u (the most certain first);
  at coverage k / n the selective risk is the mean risk of the k most certain
  cases. Cases with equal u are in no particular order: each point of the curve
  is the expectation over their orderings (a tie group of risks shares its mean
  risk over its positions), so the result does not depend on the input order.
- AURC = mean over k = 1..n of the selective risk at coverage k / n;
- E-AURC = AURC - AURC of the optimal ranking (ascending risk): 0 for a ranking
  as good as the risks allow, larger is worse.
- AUROC of the score for "failed" cases (risk > a threshold) against the others
  (Mann-Whitney U / (n_pos n_neg), ties counted 1/2); NaN when one class is empty.
  The same function gives OOD detection (positives: the shifted images).

Calibration of a predicted foreground probability p against the raters'
foreground frequency f per voxel (the existing ECE is
:func:`probunet.metrics.calibration`):

- ACE, the adaptive calibration error (Nixon et al. 2019): voxels sorted by p
  and cut into ``num_bins`` bins of equal mass (``numpy.array_split`` sizes),
  ACE = (1 / num_bins) sum_b |mean_b p - mean_b f|. Voxels with equal p are in
  no particular order: across a bin boundary they contribute their mean f (the
  expectation over their orderings). Computed from a histogram of the distinct
  predicted values, so per-case histograms add up to the pooled one.
- Brier score: mean over voxels of (p - f)^2.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _tie_groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order by ascending value (stable) and the start of each run of equal values in that order."""
    order = np.argsort(values, kind="stable")
    v = values[order]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    return order, starts


def risk_coverage(uncertainty, risk) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve: ``(coverage (n,), selective_risk (n,))``, coverage k / n for k = 1..n.

    ``uncertainty (n,)``: higher means less sure; ``risk (n,)``: higher means worse. Ties in the
    uncertainty are averaged over their orderings (see the module notes).
    """
    u, r = _as_1d(uncertainty, "uncertainty"), _as_1d(risk, "risk")
    if u.shape != r.shape:
        raise ValueError(f"uncertainty and risk must have the same length, got {u.size} and {r.size}")
    n = u.size
    if n == 0:
        raise ValueError("the risk-coverage curve needs at least one case")
    order, starts = _tie_groups(u)
    rs = r[order]
    ends = np.r_[starts[1:], n]
    sorted_risk = rs.copy()
    for a, b in zip(starts, ends):  # a tie group: every position holds the group's mean risk in expectation
        sorted_risk[a:b] = rs[a:b].mean()
    k = np.arange(1, n + 1)
    return k / n, np.cumsum(sorted_risk) / k


def aurc(uncertainty, risk) -> float:
    """Area under the risk-coverage curve: mean of the selective risks at coverage 1/n .. n/n."""
    return float(risk_coverage(uncertainty, risk)[1].mean())


def optimal_aurc(risk) -> float:
    """AURC of the best ranking (ascending risk)."""
    r = np.sort(_as_1d(risk, "risk"))
    if r.size == 0:
        raise ValueError("AURC needs at least one case")
    k = np.arange(1, r.size + 1)
    return float((np.cumsum(r) / k).mean())


def e_aurc(uncertainty, risk) -> float:
    """Excess AURC: ``aurc - optimal_aurc`` (0 for an optimal ranking)."""
    return aurc(uncertainty, risk) - optimal_aurc(risk)


def auroc(scores, positive) -> float:
    """P(score of a positive > score of a negative) + P(equal) / 2, by Mann-Whitney's U with mid-ranks.

    ``scores (n,)``, ``positive (n,)`` bool. NaN when there are no positives or no negatives.
    """
    s = _as_1d(scores, "scores")
    pos = np.asarray(positive, dtype=bool).reshape(-1)
    if pos.shape != s.shape:
        raise ValueError(f"scores and positive must have the same length, got {s.size} and {pos.size}")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order, starts = _tie_groups(s)
    ranks = np.empty(s.size, dtype=np.float64)
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + 1 + b) / 2.0  # mid-rank of positions a+1 .. b
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# ----------------------------------------------------------------------------- calibration


class CalibrationHistogram(NamedTuple):
    """Sufficient statistics of (predicted, observed) pairs for ACE and Brier, additive over voxels.

    values (V,) the distinct predicted values, ascending; counts (V,) voxels per value; sum_observed
    (V,) sum of f per value; sum_squared_error () sum of (p - f)^2; both in float64.
    """

    values: np.ndarray
    counts: np.ndarray
    sum_observed: np.ndarray
    sum_squared_error: float

    @property
    def num_voxels(self) -> int:
        return int(self.counts.sum())


def calibration_histogram(predicted, observed) -> CalibrationHistogram:
    """The :class:`CalibrationHistogram` of per-voxel ``predicted`` and ``observed`` (any equal shapes)."""
    p, f = _as_1d(predicted, "predicted"), _as_1d(observed, "observed")
    if p.shape != f.shape:
        raise ValueError(f"predicted and observed must have the same size, got {p.size} and {f.size}")
    values, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=f, minlength=values.size)
    return CalibrationHistogram(values, counts.astype(np.int64), sums, float(((p - f) ** 2).sum()))


def merge_histograms(parts) -> CalibrationHistogram:
    """Pool several histograms (e.g. one per case) into one."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge_histograms needs at least one histogram")
    values = np.concatenate([h.values for h in parts])
    counts = np.concatenate([h.counts for h in parts])
    sums = np.concatenate([h.sum_observed for h in parts])
    uniq, inverse = np.unique(values, return_inverse=True)
    return CalibrationHistogram(uniq, np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64),
                                np.bincount(inverse, weights=sums, minlength=uniq.size),
                                float(sum(h.sum_squared_error for h in parts)))


def ace_from_histogram(hist: CalibrationHistogram, num_bins: int = 10) -> float:
    """ACE of the pooled voxels of ``hist`` with ``num_bins`` equal-mass bins (see the module notes)."""
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    n = hist.num_voxels
    if n == 0:
        return float("nan")
    sizes = np.full(num_bins, n // num_bins, dtype=np.int64)
    sizes[: n % num_bins] += 1  # numpy.array_split: the first n % num_bins bins one larger
    sizes = sizes[sizes > 0]
    bin_edges = np.r_[0, np.cumsum(sizes)]  # positions in the sorted order
    group_edges = np.r_[0, np.cumsum(hist.counts)]
    mean_f = hist.sum_observed / np.maximum(hist.counts, 1)
    errors = []
    for lo, hi in zip(bin_edges[:-1], bin_edges[1:]):
        # overlap of each value's run of positions [group_lo, group_hi) with the bin [lo, hi)
        overlap = np.clip(np.minimum(group_edges[1:], hi) - np.maximum(group_edges[:-1], lo), 0, None)
        m = overlap.sum()
        errors.append(abs(float((overlap * hist.values).sum() - (overlap * mean_f).sum())) / m)
    return float(np.mean(errors))


def adaptive_calibration_error(predicted, observed, num_bins: int = 10) -> float:
    """ACE of per-voxel ``predicted`` probabilities against ``observed`` frequencies (equal shapes)."""
    return ace_from_histogram(calibration_histogram(predicted, observed), num_bins)


def brier_from_histogram(hist: CalibrationHistogram) -> float:
    n = hist.num_voxels
    return hist.sum_squared_error / n if n else float("nan")


def brier_score(predicted, observed) -> float:
    """Mean over voxels of (predicted - observed)^2 (equal shapes)."""
    p, f = _as_1d(predicted, "predicted"), _as_1d(observed, "observed")
    if p.shape != f.shape:
        raise ValueError(f"predicted and observed must have the same size, got {p.size} and {f.size}")
    if p.size == 0:
        return float("nan")
    return float(((p - f) ** 2).mean())


__all__ = ["CalibrationHistogram", "ace_from_histogram", "adaptive_calibration_error", "aurc", "auroc",
           "brier_from_histogram", "brier_score", "calibration_histogram", "e_aurc", "merge_histograms",
           "optimal_aurc", "risk_coverage"]
