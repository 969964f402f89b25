"""Tests for probunet.metrics against hand-computed values.

Masks are tiny (2x2, 10x10) so every expected number can be checked on paper;
the comments show the arithmetic. Nothing here compares the code with itself
except the explicit symmetry / batch-independence properties.
"""

from __future__ import annotations

import math

import pytest
import torch

from probunet.metrics import segmentation as M

NAN = float("nan")

# --------------------------------------------------------------------------
# fixtures: 10x10 masks as in Kohl et al.'s evaluation tests
# --------------------------------------------------------------------------

EMPTY = torch.zeros(10, 10, dtype=torch.long)
FULL = torch.ones(10, 10, dtype=torch.long)
LEFT = torch.cat([torch.ones(10, 5), torch.zeros(10, 5)], dim=1).long()  # 50 px
RIGHT = 1 - LEFT  # the other 50 px
TOP_LEFT = torch.zeros(10, 10, dtype=torch.long)
TOP_LEFT[:5, :5] = 1  # 25 px, inside LEFT

# 2x2 masks used for set-level cases
T = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
Y1 = T([[1, 1], [0, 0]])
Y2 = T([[0, 0], [1, 1]])
S_A = T([[1, 0], [0, 0]])
S_B = T([[0, 0], [1, 0]])
Z2 = T([[0, 0], [0, 0]])


def same(actual, expected, tol=1e-6):
    """Elementwise closeness where NaN equals NaN."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=tol, rtol=0, equal_nan=True), (actual, expected)


def batch(*sets):
    """Stack lists of masks into (B, set, *spatial)."""
    return torch.stack([torch.stack(list(s)) for s in sets])


def to_3d(t, depth=2):
    """Repeat a 2D set (B, S, H, W) along a new depth axis -> (B, S, D, H, W).

    Intersections and unions both scale by ``depth``, so IoU is unchanged.
    """
    return t.unsqueeze(2).repeat_interleave(depth, dim=2)


# --------------------------------------------------------------------------
# IoU
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, expected, expected_nan",
    [
        (EMPTY, EMPTY, 1.0, NAN),  # both empty: convention
        (FULL, FULL, 1.0, 1.0),
        (FULL, EMPTY, 0.0, 0.0),  # 0 / 100
        (LEFT, EMPTY, 0.0, 0.0),  # 0 / 50
        (LEFT, FULL, 0.5, 0.5),  # 50 / 100
        (LEFT, RIGHT, 0.0, 0.0),  # disjoint
        (TOP_LEFT, LEFT, 0.5, 0.5),  # 25 / 50
        (TOP_LEFT, FULL, 0.25, 0.25),  # 25 / 100
    ],
)
def test_iou_kohl_10x10(a, b, expected, expected_nan):
    same(M.iou(a, b), expected)
    same(M.iou(b, a), expected)  # symmetric
    same(M.iou(a, b, empty_iou=NAN), expected_nan)


@pytest.mark.parametrize(
    "a, b, num_classes, empty_iou, expected",
    [
        # inter {(0,0)}, union {(0,0),(0,1),(1,0)} -> 1/3
        (T([[1, 1], [0, 0]]), T([[1, 0], [1, 0]]), 2, 1.0, 1 / 3),
        # class 1: {(0,0)} vs {(0,0),(0,1)} -> 1/2; class 2: {(0,1)} vs {(1,0)} -> 0; mean 1/4
        (T([[1, 2], [0, 0]]), T([[1, 1], [2, 0]]), 3, 1.0, 0.25),
        # class 1: 1/2; class 2 absent in both -> 1; mean (0.5 + 1) / 2
        (T([[1, 0], [0, 0]]), T([[1, 1], [0, 0]]), 3, 1.0, 0.75),
        # same with NaN convention: class 2 skipped in the class mean -> 0.5
        (T([[1, 0], [0, 0]]), T([[1, 1], [0, 0]]), 3, NAN, 0.5),
        # every foreground class empty in both -> NaN under the NaN option
        (Z2, Z2, 3, NAN, NAN),
        (Z2, Z2, 3, 1.0, 1.0),
        # custom empty value: class 1 = 1/2, class 2 empty -> 0; mean 0.25
        (T([[1, 0], [0, 0]]), T([[1, 1], [0, 0]]), 3, 0.0, 0.25),
        # label 2 is foreground only in the 3-class setting: class1 {(0,0)} vs {} -> 0,
        # class 2 {} vs {(0,0)} -> 0
        (T([[1, 0], [0, 0]]), T([[2, 0], [0, 0]]), 3, 1.0, 0.0),
    ],
)
def test_iou_small_cases(a, b, num_classes, empty_iou, expected):
    same(M.iou(a, b, num_classes=num_classes, empty_iou=empty_iou), expected)


def test_iou_broadcasts_over_leading_dims():
    a = torch.stack([LEFT, FULL, EMPTY])  # (3, 10, 10)
    same(M.iou(a, LEFT, spatial_dims=2), [1.0, 0.5, 0.0])
    # 3D: (2, 10, 10) volume, one slice LEFT, one slice empty vs all-full volume: 50 / 200
    vol = torch.stack([LEFT, EMPTY])
    same(M.iou(vol, torch.ones_like(vol)), 0.25)
    same(M.iou(vol[None], torch.ones_like(vol)[None], spatial_dims=3), [0.25])


def test_bool_masks_are_labels():
    same(M.iou(LEFT.bool(), FULL.bool()), 0.5)


# --------------------------------------------------------------------------
# Pairwise distances
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_pairwise_distances_hand_matrix(dims):
    x = batch([LEFT, FULL, EMPTY])
    y = batch([TOP_LEFT, EMPTY])
    if dims == 3:
        x, y = to_3d(x), to_3d(y)
    # rows x: LEFT, FULL, EMPTY; cols y: TOP_LEFT, EMPTY
    # d(LEFT, TL) = 1 - 25/50; d(LEFT, EMPTY) = 1; d(FULL, TL) = 1 - 25/100;
    # d(FULL, EMPTY) = 1; d(EMPTY, TL) = 1; d(EMPTY, EMPTY) = 1 - 1 = 0
    expected = [[[0.5, 1.0], [0.75, 1.0], [1.0, 0.0]]]
    d = M.pairwise_distances(x, y)
    same(d, expected)
    same(M.pairwise_distances(y, x), torch.tensor(expected).transpose(1, 2))  # symmetry of d
    same(M.pairwise_iou(x, y), 1.0 - torch.tensor(expected))
    same(M.pairwise_distances(x, y, empty_iou=NAN), [[[0.5, 1.0], [0.75, 1.0], [1.0, NAN]]])


def test_pairwise_distances_multiclass():
    # classes 1 and 2; pair (a, b): class1 1/2, class2 0 -> IoU 1/4 -> d 3/4
    a = T([[1, 2], [0, 0]])
    b = T([[1, 1], [2, 0]])
    d = M.pairwise_distances(batch([a, b]), batch([b]), num_classes=3)
    # d(a, b) = 0.75; d(b, b) = 0
    same(d, [[[0.75], [0.0]]])


def test_pairwise_distances_chunked_matches_hand(monkeypatch):
    # force tiny spatial chunks (one pixel at a time): counts must still add up
    monkeypatch.setattr(M, "_CHUNK_ELEMENTS", 1)
    x = batch([LEFT, FULL, EMPTY])
    y = batch([TOP_LEFT, EMPTY])
    same(M.pairwise_distances(x, y), [[[0.5, 1.0], [0.75, 1.0], [1.0, 0.0]]])
    c = M.ged_components(x, y)
    same(c.d_yy, [[[0.0, 1.0], [1.0, 0.0]]])  # d(TL, EMPTY) = 1
    # multi-class path: as in test_pairwise_distances_multiclass
    a, b = T([[1, 2], [0, 0]]), T([[1, 1], [2, 0]])
    same(M.pairwise_distances(batch([a, b]), batch([b]), num_classes=3), [[[0.75], [0.0]]])


# --------------------------------------------------------------------------
# GED
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_ged_components_2x2(dims):
    # samples S_A=[[1,0],[0,0]], Y1=[[1,1],[0,0]]; references Y1, Y2=[[0,0],[1,1]]
    samples = batch([S_A, Y1])
    refs = batch([Y1, Y2])
    if dims == 3:
        samples, refs = to_3d(samples), to_3d(refs)
    c = M.ged_components(samples, refs)
    # d(S_A, Y1) = 1 - 1/2; d(S_A, Y2) = 1; d(Y1, Y1) = 0; d(Y1, Y2) = 1
    same(c.d_sy, [[[0.5, 1.0], [0.0, 1.0]]])
    same(c.cross, [2.5 / 4])  # 0.625
    # d(S_A, Y1) = 0.5 off the diagonal: mean (0 + .5 + .5 + 0) / 4
    same(c.d_ss, [[[0.0, 0.5], [0.5, 0.0]]])
    same(c.sample_diversity, [0.25])
    same(c.d_yy, [[[0.0, 1.0], [1.0, 0.0]]])
    same(c.reference_diversity, [0.5])
    # 2 * 0.625 - 0.25 - 0.5
    same(M.generalized_energy_distance(samples, refs), [0.5])
    same(M.ged_from_components(c), [0.5])
    same(M.sample_diversity(samples), [0.25])
    # keyword roles matter: swapping sets swaps the diversities
    swapped = M.ged_components(refs, samples)
    same(swapped.sample_diversity, [0.5])
    same(swapped.reference_diversity, [0.25])


def test_ged_components_kohl_10x10():
    # samples (FULL, LEFT), references (EMPTY, LEFT)
    samples = batch([FULL, LEFT])
    refs = batch([EMPTY, LEFT])
    c = M.ged_components(samples, refs)
    # d(FULL, EMPTY) = 1, d(FULL, LEFT) = 1/2, d(LEFT, EMPTY) = 1, d(LEFT, LEFT) = 0
    same(c.d_sy, [[[1.0, 0.5], [1.0, 0.0]]])
    same(c.cross, [0.625])
    same(c.sample_diversity, [0.25])  # off-diagonal d(FULL, LEFT) = 0.5 twice / 4
    same(c.reference_diversity, [0.5])  # d(EMPTY, LEFT) = 1 twice / 4
    same(M.ged_from_components(c), [0.5])  # 1.25 - 0.25 - 0.5
    # re-score with the first sample only (FULL): cross = (1 + .5)/2, diversity 0
    same(M.ged_from_components(c, num_samples=1), [2 * 0.75 - 0.0 - 0.5])
    # NaN option: d(EMPTY, EMPTY) is NaN and, as in Kohl's code, left out of E[d(Y, Y')]:
    # (1 + 1 + 0) / 3 defined pairs = 2/3; GED = 1.25 - 0.25 - 2/3
    cn = M.ged_components(samples, refs, empty_iou=NAN)
    same(cn.d_yy, [[[NAN, 1.0], [1.0, 0.0]]])
    same(cn.cross, [0.625])
    same(cn.reference_diversity, [2 / 3])
    same(M.generalized_energy_distance(samples, refs, empty_iou=NAN), [1.0 - 2 / 3])


@pytest.mark.parametrize(
    "samples, refs, cross, sdiv, rdiv, ged",
    [
        # all-empty sets: every d = 0
        ([EMPTY, EMPTY, EMPTY], [EMPTY, EMPTY], 0.0, 0.0, 0.0, 0.0),
        # identical sets (same distribution): 2 * E d(S,Y) = E d(S,S') + E d(Y,Y')
        # d(LEFT, FULL) = .5; d(S,S') = (0+.5+.5+0)/4 = .25 for both -> GED 0
        ([LEFT, FULL], [LEFT, FULL], 0.25, 0.25, 0.25, 0.0),
        # disjoint masks: d(S,Y) = 1, no diversity -> GED 2
        ([LEFT, LEFT], [RIGHT, RIGHT, RIGHT], 1.0, 0.0, 0.0, 2.0),
        # collapsed samples vs diverse raters: d(LEFT, LEFT)=0, d(LEFT, RIGHT)=1
        # cross = 1/2, rdiv = 2/4 -> GED = 1 - 0 - 0.5
        ([LEFT], [LEFT, RIGHT], 0.5, 0.0, 0.5, 0.5),
    ],
)
@pytest.mark.parametrize("dims", [2, 3])
def test_ged_special_sets(samples, refs, cross, sdiv, rdiv, ged, dims):
    s, r = batch(samples), batch(refs)
    if dims == 3:
        s, r = to_3d(s), to_3d(r)
    c = M.ged_components(s, r)
    same(c.cross, [cross])
    same(c.sample_diversity, [sdiv])
    same(c.reference_diversity, [rdiv])
    same(M.generalized_energy_distance(s, r), [ged])
    same(M.generalized_energy_distance(r, s), [ged])  # D^2_GED is symmetric


def test_ged_multiclass():
    # one sample [[1,2],[0,0]] vs one rater [[1,1],[2,0]]: IoU 1/4, d 3/4
    # GED = 2 * 0.75 - 0 - 0
    s = batch([T([[1, 2], [0, 0]])])
    r = batch([T([[1, 1], [2, 0]])])
    same(M.generalized_energy_distance(s, r, num_classes=3), [1.5])
    # as binary foreground-vs-background the labels 2 are invalid
    with pytest.raises(ValueError, match="num_classes"):
        M.generalized_energy_distance(s, r, num_classes=2)


def test_batch_independence():
    # image 0: the 2x2 GED case (0.5); image 1: disjoint (2.0) then identical (0.0)
    s0, r0 = [S_A, Y1], [Y1, Y2]
    for s1, r1, g1 in [([Y1, Y1], [Y2, Y2], 2.0), ([Y1, Y2], [Y1, Y2], 0.0)]:
        g = M.generalized_energy_distance(batch(s0, s1), batch(r0, r1))
        same(g, [0.5, g1])
        h = M.hungarian_matched_iou(batch(s0, s1), batch(r0, r1))
        # image 0: match S_A-Y2 (0) + Y1-Y1 (1) -> 0.5
        same(h, [0.5, 0.0 if g1 == 2.0 else 1.0])


# --------------------------------------------------------------------------
# Hungarian-matched IoU
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    "samples, refs, expected",
    [
        # S=3, A=2 -> lcm 6: samples tiled twice, raters three times.
        # IoU rows (vs Y1, Y2): Y1 (1, 0), S_A (.5, 0), S_B (0, .5)
        # Y1 gets 3 slots, Y2 3 slots; best: Y1<-{Y1, Y1, S_A} = 2.5,
        # Y2<-{S_A, S_B, S_B} = 0 + .5 + .5 = 1.0 -> 3.5 / 6
        ([Y1, S_A, S_B], [Y1, Y2], 3.5 / 6),
        # S=4, A=2 (A divides S: raters duplicated twice)
        # Y1<-{Y1, Y1} = 2, Y2<-{S_A, S_B} = 0 + .5 -> 2.5 / 4
        ([Y1, Y1, S_A, S_B], [Y1, Y2], 2.5 / 4),
        # S=1, A=2: the sample is tiled twice: (1 + 0) / 2
        ([Y1], [Y1, Y2], 0.5),
        # permutation of the raters: perfect matching
        ([Y2, Y1], [Y1, Y2], 1.0),
        # disjoint
        ([Y1, Y1], [Y2], 0.0),
        # empty vs empty counts as a perfect match under the default convention
        ([Z2, Y1], [Y1, Z2], 1.0),
    ],
)
def test_hungarian_matched_iou(samples, refs, expected, dims):
    s, r = batch(samples), batch(refs)
    if dims == 3:
        s, r = to_3d(s), to_3d(r)
    same(M.hungarian_matched_iou(s, r), [expected])


def test_hungarian_from_iou_matrix():
    # the 3x2 IoU matrix of the lcm case, given directly
    iou = torch.tensor([[[1.0, 0.0], [0.5, 0.0], [0.0, 0.5]]])
    same(M.hungarian_matched_iou_from_iou(iou), [3.5 / 6])


def test_hungarian_nan_convention_raises():
    with pytest.raises(ValueError, match="finite empty_iou"):
        M.hungarian_matched_iou(batch([Z2]), batch([Z2]), empty_iou=NAN)


# --------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------


def test_input_errors():
    with pytest.raises(TypeError, match="integer"):
        M.generalized_energy_distance(batch([Y1]).float(), batch([Y1]))
    with pytest.raises(ValueError, match="spatial shape"):
        M.generalized_energy_distance(batch([Y1]), batch([torch.zeros(3, 3, dtype=torch.long)]))
    with pytest.raises(ValueError, match="num_classes"):
        M.iou(Y1, Y1, num_classes=1)


# --------------------------------------------------------------------------
# uncertainty maps
# --------------------------------------------------------------------------

LN2 = math.log(2.0)
H_QUARTER = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.5623351446...


def _two_pixel_probs():
    # (B=1, S=2, C=2, 1, 2): pixel 0 samples (1,0) and (0,1); pixel 1 (.25,.75), (.75,.25)
    p = torch.tensor([[[1.0, 0.25], [0.0, 0.75]], [[0.0, 0.75], [1.0, 0.25]]])  # (S, C, W)
    return p[None, :, :, None, :]  # (1, 2, 2, 1, 2)


def test_uncertainty_maps_hand():
    p = _two_pixel_probs()
    # both pixels have mean (.5, .5): predictive entropy ln 2
    same(M.predictive_entropy(p, from_logits=False), [[[LN2, LN2]]])
    # pixel 0: per-sample entropy 0 -> MI ln 2; pixel 1: ln 2 - H(1/4)
    same(M.mutual_information(p, from_logits=False), [[[LN2, LN2 - H_QUARTER]]])
    # foreground probs pixel 0: 0, 1 -> var 1/4; pixel 1: .75, .25 -> var 1/16
    same(M.foreground_variance(p, from_logits=False), [[[0.25, 0.0625]]])


@pytest.mark.parametrize("dims", [2, 3])
def test_uncertainty_maps_from_logits(dims):
    # logits (0, ln 3) -> softmax (1/4, 3/4); (ln 3, 0) -> (3/4, 1/4)
    l3 = math.log(3.0)
    logits = torch.tensor([[0.0, l3], [l3, 0.0]])  # (S, C)
    spatial = (2, 2) if dims == 2 else (2, 2, 2)
    x = logits.view(1, 2, 2, *([1] * dims)).expand(1, 2, 2, *spatial)
    npix = (1,) + spatial
    same(M.predictive_entropy(x), torch.full(npix, LN2))
    same(M.mutual_information(x), torch.full(npix, LN2 - H_QUARTER))
    same(M.foreground_variance(x), torch.full(npix, 0.0625))
    # a single foreground channel: sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4
    x1 = torch.tensor([l3, -l3]).view(1, 2, 1, *([1] * dims)).expand(1, 2, 1, *spatial)
    same(M.foreground_variance(x1), torch.full(npix, 0.0625))
    same(M.predictive_entropy(x1), torch.full(npix, LN2))


# --------------------------------------------------------------------------
# S_NCC
# --------------------------------------------------------------------------


def _phiseg_sncc_by_hand(fg_probs, raters, eps=1e-8):
    """Plain-Python S_NCC for binary probs: fg_probs[s][pixel], raters[a][pixel]."""
    ns, npx = len(fg_probs), len(fg_probs[0])
    probs = [[(1 - fg_probs[s][i], fg_probs[s][i]) for i in range(npx)] for s in range(ns)]
    mean = [tuple(sum(probs[s][i][c] for s in range(ns)) / ns for c in range(2)) for i in range(npx)]
    # gamma_i = mean_s CE(target = mean, prediction = sample)
    gamma = [
        sum(-sum(mean[i][c] * math.log(probs[s][i][c] + eps) for c in range(2)) for s in range(ns)) / ns
        for i in range(npx)
    ]

    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        sa = math.sqrt(sum((v - ma) ** 2 for v in a) / len(a))
        sb = math.sqrt(sum((v - mb) ** 2 for v in b) / len(b))
        return sum((u - ma) * (v - mb) for u, v in zip(a, b)) / (len(a) * sa * sb)

    out = []
    for y in raters:
        # err_i = mean_s CE(onehot(y_i), sample) = mean_s -log(p_s[y_i] + eps)
        err = [sum(-math.log(probs[s][i][y[i]] + eps) for s in range(ns)) / ns for i in range(npx)]
        out.append(pearson(gamma, err))
    return sum(out) / len(out)


def _fg_to_values(fg):
    """fg[s][pixel] -> (1, S, 2, 1, N) class probabilities."""
    f = torch.tensor(fg, dtype=torch.float64)
    return torch.stack([1 - f, f], dim=1)[None, :, :, None, :]


def test_variance_ncc_two_pixels_sign():
    # pixel 0: both samples p_fg = .5 -> gamma = ln 2 = .693
    # pixel 1: both samples p_fg = .1 -> gamma = H(.1) = .325 (lower)
    fg = [[0.5, 0.1], [0.5, 0.1]]
    v = _fg_to_values(fg)
    # rater all background: err = (-ln .5, -ln .9) = (.693, .105): same order -> +1
    same(M.variance_ncc(v, torch.tensor([[[[0, 0]]]])), [1.0])
    # rater marks pixel 1: err = (.693, -ln .1 = 2.303): opposite order -> -1
    same(M.variance_ncc(v, torch.tensor([[[[0, 1]]]])), [-1.0])
    # both raters: mean of +1 and -1
    same(M.variance_ncc(v, torch.tensor([[[[0, 0]], [[0, 1]]]])), [0.0])


def test_variance_ncc_matches_definition_by_hand():
    # samples disagree, so gamma differs from the entropy of the mean
    fg = [[0.9, 0.2, 0.6, 0.05], [0.7, 0.4, 0.1, 0.05], [0.8, 0.3, 0.5, 0.5]]
    raters = [[1, 0, 1, 0], [1, 1, 0, 0]]
    expected = _phiseg_sncc_by_hand(fg, raters)
    got = M.variance_ncc(_fg_to_values(fg), torch.tensor(raters)[None, :, None, :])
    same(got, [expected], tol=1e-5)
    # single foreground channel and logits give the same number
    f = torch.tensor(fg, dtype=torch.float64)
    same(M.variance_ncc(f[None, :, None, None, :], torch.tensor(raters)[None, :, None, :]), [expected], tol=1e-5)
    logit = torch.log(f / (1 - f))[None, :, None, None, :]
    same(
        M.variance_ncc(logit, torch.tensor(raters)[None, :, None, :], from_logits=True),
        [expected],
        tol=1e-5,
    )


def test_variance_ncc_constant_map_is_nan():
    fg = [[0.3, 0.3], [0.3, 0.3]]  # gamma constant over pixels
    same(M.variance_ncc(_fg_to_values(fg), torch.tensor([[[[0, 1]]]])), [NAN])


# --------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------


def _calibration_case():
    # image 0: samples [[1,1],[0,0]], [[1,0],[0,0]] -> predicted [[1, .5], [0, 0]]
    #          raters  [[1,0],[1,0]], [[1,1],[0,0]] -> observed  [[1, .5], [.5, 0]]
    # image 1: samples = raters = [[1,0],[0,0]] twice -> predicted = observed
    s = batch([Y1, S_A], [S_A, S_A])
    r = batch([T([[1, 0], [1, 0]]), Y1], [S_A, S_A])
    return s, r


def test_calibration_hand():
    s, r = _calibration_case()
    cal = M.calibration(s, r, num_bins=2)
    same(cal.bin_edges, [0.0, 0.5, 1.0])
    # image 0 bin [0, .5): pixels (1,0) p=0 o=.5 and (1,1) p=0 o=0
    #         bin [.5, 1]: pixels (0,0) p=1 o=1 and (0,1) p=.5 o=.5
    # image 1 bin 0: three pixels p=o=0; bin 1: one pixel p=o=1
    same(cal.counts, [[2, 2], [3, 1]])
    same(cal.sum_predicted, [[0.0, 1.5], [0.0, 1.0]])
    same(cal.sum_observed, [[0.5, 1.5], [0.0, 1.0]])
    same(cal.mean_predicted, [[0.0, 0.75], [0.0, 1.0]])
    same(cal.mean_observed, [[0.25, 0.75], [0.0, 1.0]])
    # ECE image 0: 2/4 * |0 - .25| + 2/4 * 0 = .125; image 1: 0
    same(cal.ece, [0.125, 0.0])
    # dataset level: counts (5, 3), |sums| (0 - .5) + 0 over 8 pixels
    agg = M.aggregate_calibration(cal)
    same(agg.counts, [5, 3])
    same(agg.ece, 0.0625)
    # accumulating per-image results gives the same as one batch
    agg2 = M.aggregate_calibration([M.calibration(s[:1], r[:1], num_bins=2), M.calibration(s[1:], r[1:], num_bins=2)])
    same(agg2.counts, [5, 3])
    same(agg2.ece, 0.0625)


def test_calibration_bin_edges_exact():
    # 10 samples, 3 of them foreground at the pixel: frequency 0.3 sits on an edge
    # and belongs to bin [0.3, 0.4) (index 3), not bin 2; 10/10 goes to the last bin
    s = torch.zeros(1, 10, 1, 2, dtype=torch.long)
    s[0, :3, 0, 0] = 1
    s[0, :, 0, 1] = 1
    r = torch.zeros(1, 1, 1, 2, dtype=torch.long)
    cal = M.calibration(s, r, num_bins=10)
    expected = torch.zeros(1, 10, dtype=torch.long)
    expected[0, 3] = 1
    expected[0, 9] = 1
    same(cal.counts, expected)
    same(cal.ece, [(0.3 + 1.0) / 2])


# --------------------------------------------------------------------------
# consensus
# --------------------------------------------------------------------------


def test_consensus_labels_and_tie_rule():
    # sample votes [[3, 2], [1, 0]] of 3 -> majority [[1, 1], [0, 0]]
    s = batch([Y1, Y1, T([[1, 0], [1, 0]])])
    # rater votes [[3, 2], [1, 1]] of 4 -> strict majority [[1, 0], [0, 0]] (2 of 4 is a tie -> 0)
    r = batch([Y1, Y1, S_A, Y2])
    out = M.consensus_scores(s, r)
    # inter 1, |pred| 2, |ref| 1 -> Dice 2/3, IoU 1/2
    same(out["dice"], [2 / 3])
    same(out["iou"], [0.5])


def test_consensus_probabilities():
    # mean foreground prob per pixel: [[.8, .5], [.6, .1]] -> > .5: [[1, 0], [1, 0]]
    fg = torch.tensor([[[0.9, 0.5], [0.7, 0.0]], [[0.7, 0.5], [0.5, 0.2]]])[None]  # (1, 2, 2, 2)
    r = batch([Y1, Y1])  # majority [[1, 1], [0, 0]]
    # inter 1, |pred| 2, |ref| 2 -> Dice 1/2, IoU 1/3
    out = M.consensus_scores(fg, r)
    same(out["dice"], [0.5])
    same(out["iou"], [1 / 3])
    probs = torch.stack([1 - fg, fg], dim=2)  # (1, 2, C=2, 2, 2)
    out2 = M.consensus_scores(probs, r)
    same(out2["dice"], [0.5])


def test_empty_share_by_hand():
    # case 0: samples [Z2, Y1, Z2] -> 2 of 3 empty; case 1: [Y1, Y2, S_A] -> none empty
    s = torch.stack([torch.stack([Z2, Y1, Z2]), torch.stack([Y1, Y2, S_A])])
    same(M.empty_share(s), [2 / 3, 0.0])
    # a map with only class-2 pixels is not empty
    three = torch.stack([torch.stack([Z2, 2 * Y1])])
    same(M.empty_share(three, num_classes=3), [0.5])
    same(M.empty_share(batch([Z2, Z2])), [1.0])
    with pytest.raises(ValueError, match="masks must be"):
        M.empty_share(Z2)
    with pytest.raises(ValueError, match="num_classes=2"):
        M.empty_share(three)


def test_consensus_empty():
    out = M.consensus_scores(batch([Z2]), batch([Z2, Z2]))
    same(out["dice"], [1.0])
    same(M.consensus_scores(batch([Z2]), batch([Z2]), empty_score=0.0)["iou"], [0.0])


# --------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_results_stay_on_input_device(device):
    # the S=3, A=2 HM-IoU case and the 2x2 GED case, computed on `device`
    s = batch([Y1, S_A, S_B]).to(device)
    r = batch([Y1, Y2]).to(device)
    c = M.ged_components(s, r)
    # d_sy rows: Y1 (0, 1), S_A (.5, 1), S_B (1, .5): cross = 4 / 6
    # d_ss off-diagonal: d(Y1,S_A)=.5, d(Y1,S_B)=1, d(S_A,S_B)=1 -> 2 * 2.5 / 9
    # d_yy: 2 * 1 / 4 -> GED = 8/6 - 5/9 - 1/2
    ged = M.ged_from_components(c)
    assert ged.device.type == torch.device(device).type
    same(ged.cpu(), [8 / 6 - 5 / 9 - 0.5])
    hm = M.hungarian_matched_iou_from_iou(1.0 - c.d_sy)
    assert hm.device.type == torch.device(device).type
    same(hm.cpu(), [3.5 / 6])
    cal = M.calibration(*[t.to(device) for t in _calibration_case()], num_bins=2)
    same(cal.ece.cpu(), [0.125, 0.0])
    p = _two_pixel_probs().to(device)
    same(M.mutual_information(p, from_logits=False).cpu(), [[[LN2, LN2 - H_QUARTER]]])


def test_pearson_by_hand():
    from probunet.metrics.segmentation import pearson

    # x - mean = (-1, 0, 1), y - mean = (-7/3, -1/3, 8/3): r = 5 / (sqrt(2) * sqrt(114) / 3) = 15 / sqrt(228)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 2, 3], [5, 5, 5])) and math.isnan(pearson([1], [2]))
