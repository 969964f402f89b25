"""Calibrated regions with a finite-sample guarantee: conformal risk control over the samples.

For a case, S samples are drawn and every pixel gets its *vote* k(p), the number of
samples that mark it as foreground (any class other than 0: multi-class models are
calibrated on the union of their foreground classes), and its frequency f(p) = k(p)/S.
The readers' union U is the set of pixels that at least one real rater marks (any
class other than 0). The region of a case is

    C_lambda = {p : f(p) >= 1 - lambda},   lambda in [0, 1],

growing with lambda (lambda = 0: the pixels every sample marks; lambda = 1: the whole
image). Since f takes only the values k/S, lambda is searched on the S + 1 attainable
values lambda_j = j/S (j = 0..S), where C_{lambda_j} = {p : k(p) >= S - j}; the grid
is exact: any lambda between two grid points gives the region of the lower one.

Two risks (Angelopoulos et al., "Conformal Risk Control", ICLR 2024):

- ``fnr``: the loss of a case is L(lambda) = 1 - |U ∩ C_lambda| / |U|, non-increasing in
  lambda, bounded by B = 1; cases with an empty union have no false-negative rate and are
  skipped (and counted). lambda_hat is the smallest grid value with
  (n / (n + 1)) R_n(lambda) + B / (n + 1) <= alpha, R_n the mean loss of the n calibration
  cases. Guarantee: E[L_{n+1}(lambda_hat)] <= alpha for a new case exchangeable with the
  calibration cases (the expectation is over the calibration set and the new case).
- ``coverage``: the score of a case is s = max over p in U of (1 - f(p)) (an empty union
  scores 0: it is always covered, and counts); q_hat is the ceil((n + 1)(1 - alpha))-th
  smallest score. Guarantee: P(U ⊆ C_{q_hat}) >= 1 - alpha.

Both need n + 1 >= 1 / alpha calibration cases (otherwise the bound cannot be met by any
lambda, or the quantile index exceeds n): fewer is refused with the figures.

:func:`probunet.evaluation.calibration.calibrate_run` (``probunet calibrate``) samples the calibration split of a run and
writes ``RUN/calibration.json``; :func:`load_calibration` reads it back for ``predict``,
``evaluate`` and ``export``, which use it only for the checkpoint it was computed for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
KIND = "probunet-calibration"
RISKS = ("fnr", "coverage")
CLASS_MODE = "union of the foreground classes (label != 0)"
_EPS = 1e-9
ASSUMPTION = ("the calibration cases and the new cases are exchangeable: drawn from the same population, scanner "
              "and protocol, and read by readers like the calibration readers")


class CalibrationError(ValueError):
    """A calibration that cannot be computed or used (a user error: one line)."""


# ----------------------------------------------------------------------------- per-case counts


@dataclass
class CaseCounts:
    """What calibration needs of one case: pixels by vote k = 0..S, in the union and in all.

    ``union_hist[k]``: pixels of the readers' union marked by exactly k of the S samples;
    ``all_hist[k]``: all pixels marked by exactly k samples (the region sizes).
    """

    case_id: str
    union_hist: np.ndarray
    all_hist: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.union_hist) - 1

    @property
    def union_size(self) -> int:
        return int(self.union_hist.sum())


def votes(labels) -> np.ndarray:
    """labels (S, *spatial) -> (*spatial) int: how many samples mark each pixel (label != 0)."""
    return (np.asarray(labels) != 0).sum(axis=0)


def case_counts(case_id: str, labels, raters) -> CaseCounts:
    """The counts of one case from its sample label maps ``(S, *spatial)`` and real raters ``(A, *spatial)``."""
    labels = np.asarray(labels)
    s = labels.shape[0]
    k = votes(labels).ravel()
    union = (np.asarray(raters) != 0).any(axis=0).ravel()
    if union.shape != k.shape:
        raise ValueError(f"case {case_id}: raters of shape {np.shape(raters)[1:]} against samples of shape "
                         f"{labels.shape[1:]}")
    return CaseCounts(str(case_id), np.bincount(k[union], minlength=s + 1).astype(np.int64),
                      np.bincount(k, minlength=s + 1).astype(np.int64))


# ----------------------------------------------------------------------------- the grid and the region


def lambda_grid(num_samples: int) -> np.ndarray:
    """The S + 1 attainable thresholds j/S, j = 0..S."""
    return np.arange(int(num_samples) + 1, dtype=np.float64) / int(num_samples)


def min_votes(lam: float, num_samples: int) -> int:
    """The region C_lambda = {f >= 1 - lambda} as a vote count: pixels marked by at least this many
    of the S samples (integer arithmetic, so 1 - lambda is never rounded across a k/S)."""
    s = int(num_samples)
    return int(min(s, max(0, math.ceil(s * (1.0 - float(lam)) - _EPS))))


def region(labels, lam: float) -> np.ndarray:
    """labels (S, *spatial) -> the region C_lambda (*spatial) bool."""
    labels = np.asarray(labels)
    return votes(labels) >= min_votes(lam, labels.shape[0])


def covered_counts(hist: np.ndarray) -> np.ndarray:
    """(S + 1,) pixels of ``hist`` inside C_{lambda_j} for j = 0..S: sum of hist[m] for m >= S - j."""
    return np.cumsum(np.asarray(hist)[::-1])


def fnr_curve(c: CaseCounts) -> Optional[np.ndarray]:
    """L(lambda_j), j = 0..S, of one case; None for an empty union."""
    n = c.union_size
    if n == 0:
        return None
    return 1.0 - covered_counts(c.union_hist) / n


def coverage_score(c: CaseCounts) -> float:
    """max over U of 1 - f = 1 - (smallest vote in U)/S; 0 for an empty union."""
    present = np.nonzero(c.union_hist)[0]
    if present.size == 0:
        return 0.0
    return 1.0 - present[0] / c.num_samples


def region_sizes(c: CaseCounts) -> np.ndarray:
    """(S + 1,) region size |C_{lambda_j}| in pixels."""
    return covered_counts(c.all_hist)


# ----------------------------------------------------------------------------- the two procedures


def check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise CalibrationError(f"--alpha must be a number in (0, 1), got {alpha!r}") from None
    if not (0.0 < a < 1.0) or not math.isfinite(a):
        raise CalibrationError(f"--alpha must be in (0, 1) (the tolerated risk), got {alpha}")
    return a


def check_size(n: int, alpha: float, what: str = "calibration cases") -> None:
    """Refuse n with n + 1 < 1/alpha: no lambda meets the bound (fnr), the quantile index exceeds n (coverage)."""
    if (n + 1) * alpha < 1.0 - _EPS:
        need = math.ceil(1.0 / alpha - 1.0 - _EPS)
        raise CalibrationError(f"{n} {what} are too few for alpha {alpha:g}: conformal calibration needs "
                               f"n >= 1/alpha - 1 = {need}; use a larger split or a larger alpha")


def crc_index(curves: np.ndarray, alpha: float, bound: float = 1.0) -> int:
    """The smallest j with (n/(n+1)) R_n(lambda_j) + B/(n+1) <= alpha, curves (n, G) non-increasing in j."""
    curves = np.asarray(curves, dtype=np.float64)
    n = curves.shape[0]
    check_size(n, alpha)
    risk = curves.mean(axis=0)
    ok = n * risk + bound <= alpha * (n + 1) + _EPS
    if not ok.any():  # only with a loss that stays above 0 at lambda = 1
        raise CalibrationError(f"no lambda on the grid meets the bound for alpha {alpha:g} (the risk at lambda = 1 "
                               f"is {risk[-1]:.4f})")
    return int(np.argmax(ok))


def conformal_quantile(scores: Sequence[float], alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest score."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = s.size
    check_size(n, alpha)
    rank = math.ceil((n + 1) * (1.0 - alpha) - _EPS)
    return float(s[max(rank, 1) - 1])


def calibrate_counts(cases: Sequence[CaseCounts], alpha: float, risk: str = "fnr") -> dict:
    """lambda_hat of ``cases`` (one S for all): ``{"lambda", "lambda_index", "min_votes", "n",
    "n_empty", "calibration_risk"}`` (``calibration_risk``: the empirical risk at lambda_hat
    on the calibration cases). CalibrationError for a set too small for ``alpha``."""
    alpha = check_alpha(alpha)
    if risk not in RISKS:
        raise CalibrationError(f"--risk must be one of {', '.join(RISKS)}, got {risk!r}")
    if not cases:
        raise CalibrationError("no calibration cases")
    s = cases[0].num_samples
    if any(c.num_samples != s for c in cases):
        raise CalibrationError("the calibration cases were sampled with different numbers of samples")
    grid = lambda_grid(s)
    n_empty = sum(1 for c in cases if c.union_size == 0)
    if risk == "fnr":
        curves = [fnr_curve(c) for c in cases]
        curves = np.array([c for c in curves if c is not None]).reshape(-1, s + 1)
        try:
            j = crc_index(curves, alpha)
        except CalibrationError as exc:
            if curves.shape[0] < len(cases) and "too few" in str(exc):
                raise CalibrationError(f"{exc} ({n_empty} of the {len(cases)} cases have an empty readers' "
                                       f"union and no false-negative rate)") from None
            raise
        return {"lambda": float(grid[j]), "lambda_index": j, "min_votes": s - j, "n": int(curves.shape[0]),
                "n_empty": n_empty, "calibration_risk": float(curves[:, j].mean())}
    scores = np.array([coverage_score(c) for c in cases])
    q = conformal_quantile(scores, alpha)
    j = int(round(q * s))
    return {"lambda": float(grid[j]), "lambda_index": j, "min_votes": s - j, "n": len(cases), "n_empty": n_empty,
            "calibration_risk": float(np.mean(scores <= grid[j] + _EPS))}


def guarantee_text(risk: str, alpha: float) -> str:
    if risk == "fnr":
        return (f"expected false-negative rate of the region against the readers' union <= {alpha:g} for a new case "
                f"exchangeable with the calibration cases (marginal over cases; cases with an empty union excluded)")
    return (f"P(readers' union inside the region) >= {1 - alpha:g} for a new case exchangeable with the "
            f"calibration cases (marginal over cases)")


# ----------------------------------------------------------------------------- validity by resplitting


def resplit(cases: Sequence[CaseCounts], alpha: float, risk: str = "fnr", *, resplits: int = 1000,
            calibration_fraction: float = 0.5, seed: int = 0) -> dict:
    """Split ``cases`` at random into calibration and test cases ``resplits`` times, calibrate on the first
    part and measure the risk of the region on the second: the test risk (``fnr``: mean FNR over test cases
    with a non-empty union; ``coverage``: the share of test cases whose union is *not* inside the region,
    so that both compare with alpha). Returns its mean, standard deviation, standard error of the mean
    over resplits, 5% and 95% quantiles, the mean lambda_hat and the region's size against the union.

    The samples are drawn once per case (the counts); only the split changes. For a uniformly random split
    the calibration and test cases are exchangeable, so the expected test risk is <= alpha exactly (the
    guarantee conditional on the pool of cases); the mean over resplits estimates it with the standard
    error given."""
    alpha = check_alpha(alpha)
    if risk not in RISKS:
        raise CalibrationError(f"risk must be one of {', '.join(RISKS)}, got {risk!r}")
    n_total = len(cases)
    s = cases[0].num_samples
    grid = lambda_grid(s)
    n_cal = int(round(calibration_fraction * n_total))
    if not 0 < n_cal < n_total:
        raise CalibrationError(f"calibration fraction {calibration_fraction} of {n_total} cases leaves no "
                               f"calibration or no test case")
    curves = np.full((n_total, s + 1), np.nan)
    for i, c in enumerate(cases):
        curve = fnr_curve(c)
        if curve is not None:
            curves[i] = curve
    nonempty = ~np.isnan(curves[:, 0])
    scores = np.array([coverage_score(c) for c in cases])
    sizes = np.array([region_sizes(c) for c in cases], dtype=np.float64)  # (N, S + 1)
    unions = np.array([c.union_size for c in cases], dtype=np.float64)
    rng = np.random.default_rng(seed)
    risks, lambdas, ratios = np.empty(resplits), np.empty(resplits), np.empty(resplits)
    for r in range(resplits):
        perm = rng.permutation(n_total)
        cal, test = perm[:n_cal], perm[n_cal:]
        if risk == "fnr":
            j = crc_index(curves[cal][nonempty[cal]], alpha)
            t = test[nonempty[test]]
            risks[r] = curves[t, j].mean() if t.size else np.nan
        else:
            j = int(round(conformal_quantile(scores[cal], alpha) * s))
            risks[r] = float(np.mean(scores[test] > grid[j] + _EPS))
        lambdas[r] = grid[j]
        ratios[r] = sizes[test, j].sum() / unions[test].sum() if unions[test].sum() > 0 else np.nan
    ok = ~np.isnan(risks)
    x = risks[ok]
    return {"alpha": alpha, "risk": risk, "num_cases": n_total, "num_calibration": n_cal,
            "num_test": n_total - n_cal, "num_empty_union": int((~nonempty).sum()), "num_samples": s,
            "resplits": int(ok.sum()), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "sem": float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan"),
            "p05": float(np.quantile(x, 0.05)), "p95": float(np.quantile(x, 0.95)),
            "lambda_mean": float(lambdas.mean()), "region_to_union": float(np.nanmean(ratios))}


# ----------------------------------------------------------------------------- test-time scores


def case_scores(c: CaseCounts, lam: float) -> dict:
    """Per-case figures of the region C_lambda: its size, the union's, the FNR (NaN for an empty union)
    and whether the union is inside it."""
    s = c.num_samples
    m = min_votes(lam, s)
    inside_union = int(c.union_hist[m:].sum())
    n_union = c.union_size
    return {"region_size": int(c.all_hist[m:].sum()), "union_size": n_union,
            "region_fnr": (1.0 - inside_union / n_union) if n_union else float("nan"),
            "region_covered": float(inside_union == n_union)}


def region_summary(rows: Sequence[dict], calibration: dict) -> dict:
    """The calibrated region on evaluated cases (rows with :func:`case_scores` keys): the empirical risk with its
    standard error, next to the guarantee it should meet, and the region's mean size against the union."""
    from ..metrics.segmentation import mean_and_sem

    risk, alpha = calibration["risk"], float(calibration["alpha"])
    key = "region_fnr" if risk == "fnr" else "region_covered"
    values = [r[key] for r in rows if risk != "fnr" or r["union_size"] > 0]
    stat = mean_and_sem(values)
    regions = np.array([r["region_size"] for r in rows], dtype=np.float64)
    unions = np.array([r["union_size"] for r in rows], dtype=np.float64)
    out = {
        "risk": risk, "alpha": alpha, "lambda": calibration["lambda"], "min_votes": calibration.get("min_votes"),
        "num_samples": calibration["num_samples"], "calibration_split": calibration.get("split"),
        "calibration_n": calibration.get("n"),
        "empirical": stat,
        "num_cases": len(values), "num_empty_union": int(sum(1 for r in rows if r["union_size"] == 0)),
        "mean_region_size": float(regions.mean()) if regions.size else float("nan"),
        "mean_union_size": float(unions.mean()) if unions.size else float("nan"),
        "region_to_union": float(regions.sum() / unions.sum()) if unions.sum() > 0 else float("nan"),
        "guarantee": guarantee_text(risk, alpha),
        "assumption": ASSUMPTION,
        "note": calibration.get("note"),
        "bound": alpha if risk == "fnr" else 1.0 - alpha,
        "measure": "mean false-negative rate over cases with a non-empty union" if risk == "fnr"
        else "share of cases whose readers' union lies inside the region",
    }
    return out


def region_line(summary: dict) -> str:
    """One line for the evaluate printout."""
    e = summary["empirical"]
    sem = e.get("sem")
    value = "n/a" if e.get("mean") is None else f"{e['mean']:.4f}" + (
        f" +- {sem:.4f}" if sem is not None and math.isfinite(sem) else "")
    what = "FNR" if summary["risk"] == "fnr" else "coverage"
    sign = "<=" if summary["risk"] == "fnr" else ">="
    line = (f"  calibrated region (lambda {summary['lambda']:.4f}, >= {summary['min_votes']} of "
            f"{summary['num_samples']} samples): {what} {value} over {summary['num_cases']} cases "
            f"(guarantee: {sign} {summary['bound']:g} in expectation); mean size {summary['mean_region_size']:.1f} "
            f"px against the readers' union {summary['mean_union_size']:.1f} px "
            f"(ratio {summary['region_to_union']:.2f})")
    if summary.get("note"):
        line += f"; {summary['note']}"
    return line


# ----------------------------------------------------------------------------- the file


def cases_digest(case_ids: Sequence[str]) -> str:
    """SHA-256 of the sorted case ids, one per line."""
    return hashlib.sha256("\n".join(sorted(str(c) for c in case_ids)).encode("utf-8", "surrogateescape")
                          ).hexdigest()


def calibration_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CALIBRATION_FILE


def read_calibration(path: str | Path) -> dict:
    """The calibration JSON at ``path``; CalibrationError naming it when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable calibration file ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise CalibrationError(f"{path}: not a probunet calibration file (kind {KIND!r} missing)")
    for key in ("alpha", "risk", "lambda", "num_samples", "checkpoint_digest"):
        if key not in data:
            raise CalibrationError(f"{path}: key '{key}' missing")
    if data["risk"] not in RISKS:
        raise CalibrationError(f"{path}: risk must be one of {', '.join(RISKS)}, got {data['risk']!r}")
    lam, s = data["lambda"], data["num_samples"]
    if not isinstance(lam, (int, float)) or not 0 <= lam <= 1 or not isinstance(s, int) or s < 1:
        raise CalibrationError(f"{path}: lambda must be in [0, 1] and num_samples a positive integer")
    return data


def load_calibration(run_dir: Optional[str | Path], ckpt: Optional[dict]) -> Optional[dict]:
    """``RUN_DIR/calibration.json`` when it exists and was computed for this checkpoint (same digest);
    None (with a warning naming the reason) otherwise."""
    if run_dir is None:
        return None
    path = calibration_path(run_dir)
    if not path.is_file():
        return None
    try:
        data = read_calibration(path)
    except CalibrationError as exc:
        logger.warning("%s; the calibration is ignored", exc)
        return None
    digest = (ckpt or {}).get("digest")
    if digest is None or data.get("checkpoint_digest") != digest:
        logger.warning("%s was computed for another checkpoint (%s, digest %s...) than %s: it is ignored; run "
                       "probunet calibrate again", path, data.get("checkpoint"),
                       str(data.get("checkpoint_digest"))[:12], (ckpt or {}).get("path"))
        return None
    data["_path"] = str(path)
    return data


def run_dir_of_checkpoint(checkpoint: str | Path) -> Path:
    """RUN for a run directory or RUN/checkpoints/x.pt; else the checkpoint's folder."""
    p = Path(checkpoint)
    if p.is_dir():
        return p
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def export_record(calibration: Optional[dict]) -> Optional[dict]:
    """What exports carry of a calibration: alpha, risk, lambda and how to apply it."""
    if not calibration:
        return None
    keys = ("alpha", "risk", "lambda", "min_votes", "num_samples", "n", "n_empty", "split", "cases_digest",
            "class_mode", "guarantee", "assumption")
    out = {k: calibration.get(k) for k in keys}
    out["region"] = (f"pixels marked foreground (any class != 0) by at least {calibration.get('min_votes')} of "
                     f"{calibration.get('num_samples')} samples, i.e. f >= 1 - lambda; the guarantee holds "
                     f"for {calibration.get('num_samples')} samples per image")
    return out


def evaluation_calibration(run_dir, ckpt: dict, num_samples: int, split: str) -> Optional[dict]:
    """The calibration ``probunet evaluate`` scores: the run's, for this checkpoint and number of samples
    (another number: warned and left out); evaluating the calibration split itself is noted."""
    cal = load_calibration(run_dir, ckpt)
    if cal is None:
        return None
    if int(cal["num_samples"]) != int(num_samples):
        logger.warning("%s holds for %d samples per image, this evaluation draws %d: the calibrated region is "
                       "not scored (pass --num-samples %d)", cal["_path"], cal["num_samples"], num_samples,
                       cal["num_samples"])
        return None
    cal.setdefault("min_votes", min_votes(cal["lambda"], cal["num_samples"]))
    if cal.get("split") == split:
        cal["note"] = (f"these are the calibration cases ({split} split): not an independent check of the "
                       f"guarantee")
        logger.warning("evaluating the calibrated region on its own calibration cases (%s split): not an "
                       "independent check", split)
    return cal


def region_rule(checkpoint, predictor) -> Optional[dict]:
    """The calibration ``probunet predict`` applies: the run's ``calibration.json`` when it was computed for
    the predictor's checkpoint and number of samples; None (warned) otherwise."""
    if not isinstance(checkpoint, (str, Path)):
        return None
    info = getattr(predictor, "checkpoint", None)
    cal = load_calibration(run_dir_of_checkpoint(checkpoint), info)
    if cal is None:
        return None
    if int(cal["num_samples"]) != int(predictor.num_samples):
        logger.warning("%s holds for %d samples per image, this run draws %d: no region is written (pass "
                       "--num-samples %d)", cal["_path"], cal["num_samples"], predictor.num_samples,
                       cal["num_samples"])
        return None
    cal.setdefault("min_votes", min_votes(cal["lambda"], cal["num_samples"]))
    return cal


def write_region(pred, meta: dict, case_dir: Path, suffix: str, calibration: dict) -> str:
    """Write ``region`` (uint8, 1 inside C_lambda_hat) of a :class:`probunet.inference.predictor.Prediction` next to its
    other maps; returns the file name."""
    from ..data import io

    out_meta = {k: v for k, v in meta.items() if k != "num_components"}
    out_meta["shape"] = list(pred.consensus.shape)
    mask = region(pred.samples, float(calibration["lambda"])).astype(np.uint8)
    name = f"region{suffix}"
    io.write_image(mask, out_meta, Path(case_dir) / name)
    return name


__all__ = ["ASSUMPTION", "calibrate_counts", "CALIBRATION_FILE", "calibration_path", "CalibrationError",
           "case_counts",            "case_scores", "CaseCounts", "cases_digest", "check_alpha", "check_size",
           "CLASS_MODE",            "conformal_quantile", "coverage_score", "crc_index",
           "evaluation_calibration", "export_record",            "fnr_curve", "guarantee_text", "KIND",
           "lambda_grid", "load_calibration", "min_votes",            "read_calibration", "region",
           "region_line", "region_rule", "region_sizes", "region_summary",            "resplit", "RISKS",
           "run_dir_of_checkpoint", "votes", "write_region"]
