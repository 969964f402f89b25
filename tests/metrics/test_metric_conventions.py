"""Conventions that decide whether a number matches a paper's: Kohl's nan-mean over rater pairs under
empty_iou=nan, and AURC / E-AURC against the trapezoid integrations of fd-shifts and ValUES."""

import math

import numpy as np
import pytest
import torch

from probunet.metrics import segmentation as metrics
from probunet.metrics.detection import aurc, e_aurc, optimal_aurc, risk_coverage
from probunet.inference.sampler import SampleSummary

NAN = float("nan")


def _masks(*rows):
    """Label maps (1, N, 1, 4) from rows of four pixels."""
    return torch.tensor([[list(r)] for r in rows], dtype=torch.long)[None]


# ----------------------------------------------------------------------------- Kohl's empty_iou=nan


def _ged_both_ways(samples, refs):
    kw = {"num_classes": 2, "empty_iou": NAN}
    direct = float(metrics.generalized_energy_distance(samples, refs, **kw)[0])
    summary = SampleSummary(labels=samples, mean_probability=torch.zeros(1, 2, 1, 4),
                            d_ss=metrics.pairwise_distances(samples, samples, **kw),
                            d_sy=metrics.pairwise_distances(samples, refs, **kw),
                            d_yy=metrics.pairwise_distances(refs, refs, **kw))
    return direct, float(summary.ged()[0])


def test_kohl_nanmean_over_rater_pairs():
    # Two samples, both equal to the one rater who drew something; two raters drew nothing.
    #   S1 = S2 = Y1 = [1 1 0 0], Y2 = Y3 = empty.
    # d(S, Y): Y1 -> 0, 0; Y2 -> 1, 1 (IoU 0 of a mask and an empty one); Y3 -> 1, 1: mean 4/6.
    # d(S, S'): all 0: mean 0.
    # d(Y, Y'): (Y1,Y1) 0; (Y1,Y2), (Y2,Y1), (Y1,Y3), (Y3,Y1) 1; the four pairs among Y2, Y3 are
    #   undefined (two empty masks: NaN) and left out: 4 / 5.
    # GED = 2 * 4/6 - 0 - 4/5 = 8/15 = 0.5333 (Kohl's code); the plain mean over all nine pairs is NaN.
    samples = _masks([1, 1, 0, 0], [1, 1, 0, 0])
    refs = _masks([1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0])
    direct, reduced = _ged_both_ways(samples, refs)
    assert direct == pytest.approx(8 / 15, abs=1e-6)
    assert reduced == pytest.approx(8 / 15, abs=1e-6)


def test_kohl_nanmean_second_example_and_what_stays_nan():
    # S1 = [1 1 0 0], S2 = [1 0 0 0], Y1 = [1 1 0 0], Y2 = Y3 = empty.
    # d(S, Y): Y1 -> 0, 1/2; Y2, Y3 -> 1 each: (0 + 0.5 + 4) / 6 = 0.75.
    # d(S, S'): 0, 0.5, 0.5, 0: 0.25.   d(Y, Y'): 4/5 as above.   GED = 1.5 - 0.25 - 0.8 = 0.45.
    samples = _masks([1, 1, 0, 0], [1, 0, 0, 0])
    refs = _masks([1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0])
    assert _ged_both_ways(samples, refs) == pytest.approx((0.45, 0.45), abs=1e-6)
    # An empty sample facing the empty raters: d(S, Y) is a plain mean in Kohl's code, so NaN stays.
    empty_sample = _masks([0, 0, 0, 0], [1, 1, 0, 0])
    assert all(math.isnan(g) for g in _ged_both_ways(empty_sample, refs))
    # The default empty_iou=1 is untouched: (Y2, Y3) distance 0, plain means over all nine pairs.
    # d(S, Y) as in the first example 4/6; d(Y, Y') = 4/9; GED = 8/6 - 0 - 4/9 = 8/9.
    same = _masks([1, 1, 0, 0], [1, 1, 0, 0])
    assert float(metrics.generalized_energy_distance(same, refs)[0]) == pytest.approx(8 / 9, abs=1e-6)


# ----------------------------------------------------------------------------- AURC conventions


def _trapezoid(coverage, risk):
    """Area under a polyline through (coverage, risk) points given by descending coverage."""
    c, r = np.asarray(coverage, float), np.asarray(risk, float)
    return float(np.sum((c[:-1] - c[1:]) * (r[:-1] + r[1:]) / 2.0))


def _fd_shifts_style(u, r):
    """Trapezoid through (k/n, R_k), k = n..1, and (0, R_1), times 1000 (distinct scores)."""
    cov, sel = risk_coverage(u, r)
    return 1000 * _trapezoid(np.r_[cov[::-1], 0.0], np.r_[sel[::-1], sel[0]])


def _values_style(u, r):
    """The same trapezoid without the last segment (coverage 1/n -> 0), no factor."""
    cov, sel = risk_coverage(u, r)
    return _trapezoid(cov[::-1], sel[::-1])


def test_aurc_against_the_trapezoid_conventions():
    # Four cases, most certain first (uncertainty ascending), risks 0.2, 0.6, 0, 1.
    # Selective risks R_1..R_4 = 0.2, 0.8/2 = 0.4, 0.8/3 = 0.2667, 1.8/4 = 0.45.
    # probunet: mean of R_k = (0.2 + 0.4 + 0.26667 + 0.45) / 4 = 0.329167.
    # fd-shifts: trapezoid, segments 0.25 wide: (0.45+0.2667)/2 + (0.2667+0.4)/2 + (0.4+0.2)/2 + 0.2
    #   = 1.191667 -> 0.297917 x 1000 = 297.917 = 1000 * (0.329167 + (0.2 - 0.45) / 8).
    # ValUES: without the last 0.25 x 0.2 segment: 0.247917 = 0.329167 - (0.2 + 0.45) / 8.
    u = np.array([0.1, 0.2, 0.3, 0.4])
    r = np.array([0.2, 0.6, 0.0, 1.0])
    n = 4
    sel = risk_coverage(u, r)[1]
    assert sel == pytest.approx([0.2, 0.4, 0.8 / 3, 0.45])
    a = aurc(u, r)
    assert a == pytest.approx(1.316667 / 4, abs=1e-6)
    assert _fd_shifts_style(u, r) == pytest.approx(297.916667, abs=1e-4)
    assert _fd_shifts_style(u, r) == pytest.approx(1000 * (a + (sel[0] - sel[-1]) / (2 * n)))
    assert _values_style(u, r) == pytest.approx(0.247917, abs=1e-6)
    assert _values_style(u, r) == pytest.approx(a - (sel[0] + sel[-1]) / (2 * n))
    # the input order of the cases does not matter
    perm = [2, 0, 3, 1]
    assert aurc(u[perm], r[perm]) == pytest.approx(a)


def test_e_aurc_against_the_trapezoid_conventions():
    # Optimal order, risks 0, 0.2, 0.6, 1: R = 0, 0.1, 0.26667, 0.45, mean 0.204167;
    # probunet e_aurc = 0.329167 - 0.204167 = 0.125.
    # fd-shifts (continuous risks): trapezoid AURC minus the trapezoid of the sorted risks:
    #   297.917 - 1000 * (0.204167 + (0 - 0.45) / 8) = 297.917 - 147.917 = 150
    #   = 1000 * (0.125 + (0.2 - 0) / 8).
    # ValUES: its trapezoid minus probunet's optimum: 0.247917 - 0.204167 = 0.04375 = 0.125 - 0.65 / 8.
    u = np.array([0.1, 0.2, 0.3, 0.4])
    r = np.array([0.2, 0.6, 0.0, 1.0])
    n = 4
    sel = risk_coverage(u, r)[1]
    assert optimal_aurc(r) == pytest.approx(0.816667 / 4, abs=1e-6)
    e = e_aurc(u, r)
    assert e == pytest.approx(0.125, abs=1e-9)
    best = r.copy()  # an uncertainty that ranks by ascending risk (distinct values)
    assert e_aurc(best, r) == pytest.approx(0.0, abs=1e-12)
    fd_e = _fd_shifts_style(u, r) - _fd_shifts_style(best, r)
    assert fd_e == pytest.approx(150.0, abs=1e-6)
    assert fd_e == pytest.approx(1000 * (e + (sel[0] - r.min()) / (2 * n)))
    values_e = _values_style(u, r) - optimal_aurc(r)
    assert values_e == pytest.approx(0.04375, abs=1e-9)
    assert values_e == pytest.approx(e - (sel[0] + sel[-1]) / (2 * n))
