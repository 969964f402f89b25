"""Uncertainty maps, image-level aggregations, failure / OOD detection and calibration metrics, and the
dataset shifts: hand-computed values on tiny cases."""

import math

import numpy as np
import pytest
import torch

from probunet.metrics import detection
from probunet.inference import uncertainty
from probunet.study.shift import SHIFTS, shift_image, shift_item, shift_items

LN2 = math.log(2.0)


def probs(*samples):
    """Binary samples given by their foreground probability, one voxel: (1, S, 2, 1, 1)."""
    p = torch.tensor(samples, dtype=torch.float64)
    return torch.stack([1 - p, p], dim=1).view(1, len(samples), 2, 1, 1)


def h(*p):
    return -sum(x * math.log(x) for x in p if x > 0)


# ----------------------------------------------------------------------------- decomposition


@pytest.mark.parametrize("samples, total, aleatoric", [
    ((0.0, 1.0), LN2, 0.0),                      # one-hot samples that disagree: all epistemic
    ((0.5, 0.5), LN2, LN2),                      # samples agree: all aleatoric, epistemic 0
    ((0.5, 0.0), h(0.75, 0.25), 0.5 * LN2),      # mean (0.75, 0.25); entropies ln2 and 0
    ((1.0, 1.0, 1.0), 0.0, 0.0),                 # certain
    ((0.2, 0.2, 0.2, 0.2), h(0.8, 0.2), h(0.8, 0.2)),
])
def test_decomposition_hand_computed(samples, total, aleatoric):
    maps = uncertainty.decompose(probs(*samples))
    assert maps["total"].item() == pytest.approx(total, abs=1e-12)
    assert maps["aleatoric"].item() == pytest.approx(aleatoric, abs=1e-12)
    assert maps["epistemic"].item() == pytest.approx(total - aleatoric, abs=1e-12)


def test_total_is_aleatoric_plus_epistemic_on_random_samples():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 6, 3, 5, 4, dtype=torch.float64), dim=2)
    m = uncertainty.decompose(p)
    assert torch.allclose(m["total"], m["aleatoric"] + m["epistemic"])
    assert (m["epistemic"] >= 0).all() and m["total"].shape == (2, 5, 4)
    same = uncertainty.decompose(p[:, :1].expand(-1, 6, -1, -1, -1))  # every sample equal
    assert torch.allclose(same["epistemic"], torch.zeros_like(same["epistemic"]), atol=1e-12)
    onehot = torch.nn.functional.one_hot(p.argmax(2), 3).permute(0, 1, 4, 2, 3).double()
    assert torch.count_nonzero(uncertainty.decompose(onehot)["aleatoric"]) == 0


def test_groups_are_members_in_s_mod_m_order():
    # 4 samples, 2 members: member 0 = samples 0, 2 (fg 0 and 1: its mean 0.5), member 1 = samples 1, 3 (fg 0, 0)
    p = probs(0.0, 0.0, 1.0, 0.0)
    m = uncertainty.decompose(p, groups=2)
    assert m["total"].item() == pytest.approx(h(0.75, 0.25))
    assert m["aleatoric"].item() == pytest.approx(0.5 * LN2)  # (H(0.5) + H(0)) / 2
    assert m["epistemic"].item() == pytest.approx(h(0.75, 0.25) - 0.5 * LN2)
    one = uncertainty.decompose(p, groups=1)  # one model: everything is aleatoric
    assert one["aleatoric"].item() == pytest.approx(h(0.75, 0.25)) and one["epistemic"].item() == 0.0
    every = uncertainty.decompose(p)  # every sample its own draw: one-hot, no aleatoric
    assert every["aleatoric"].item() == 0.0 and every["epistemic"].item() == pytest.approx(h(0.75, 0.25))
    with pytest.raises(ValueError, match="multiple of 3"):
        uncertainty.decompose(p, groups=3)


# ----------------------------------------------------------------------------- models


def _model(name, **extra):
    from probunet.config import load_config
    from probunet.models import build_model

    over = [f"model.name={name}", *[f"model.{k}={v}" for k, v in extra.items()]]
    return build_model(load_config("configs/debug.yaml", over).model).eval()


@pytest.mark.parametrize("name, extra, maps", [
    ("prob_unet", {}, ("total", "aleatoric")), ("hpu_net", {"latent_levels": 1}, ("total", "aleatoric")),
    ("phiseg", {"latent_levels": 1}, ("total", "aleatoric")), ("ssn", {}, ("total", "aleatoric")),
    ("unet", {}, ("total", "aleatoric")), ("mc_dropout", {}, uncertainty.MAPS),
    ("ensemble", {}, uncertainty.MAPS), ("ensemble", {"member": "prob_unet", "ensemble_size": 2}, uncertainty.MAPS),
])
def test_which_model_gives_which_map(name, extra, maps):
    spec = uncertainty.model_maps(_model(name, **extra))
    assert spec.maps == maps
    if "epistemic" not in maps:
        with pytest.raises(ValueError, match=f"{name} gives no epistemic map"):
            uncertainty.check_maps(spec, ["epistemic"])
    with pytest.raises(ValueError, match="unknown uncertainty map"):
        uncertainty.check_maps(spec, ["variance"])


def test_unet_maps_come_from_its_softmax():
    model = _model("unet")  # pixel-wise samples: one-hot logits
    x = torch.randn(2, 1, 32, 32)
    logits = model.sample(x, 4, generator=torch.Generator().manual_seed(0))
    maps = uncertainty.uncertainty_maps(model, x, logits)
    p = torch.softmax(model(x), dim=1)
    expected = -(p * p.log()).sum(dim=1)
    assert torch.allclose(maps["total"], expected, atol=1e-6) and torch.allclose(maps["aleatoric"], expected, atol=1e-6)
    assert set(maps) == {"total", "aleatoric"}


# ----------------------------------------------------------------------------- aggregations


def test_aggregations_hand_computed():
    m = (torch.arange(16, dtype=torch.float32) / 10).view(1, 4, 4)  # 0.0 .. 1.5
    agg = uncertainty.aggregate
    assert agg(m, "mean").item() == pytest.approx(0.75)
    assert agg(m, "sum").item() == pytest.approx(12.0)
    assert agg(m, "above_threshold", threshold=1.0).item() == pytest.approx(1.3)  # 1.1 .. 1.5
    assert agg(m, "above_threshold", threshold=2.0).item() == 0.0  # no voxel above: 0
    assert agg(m, "patch_max", patch_size=2).item() == pytest.approx((1.0 + 1.1 + 1.4 + 1.5) / 4)
    assert agg(m, "patch_max", patch_size=9).item() == pytest.approx(0.75)  # window clipped to the image
    vol = torch.zeros(1, 4, 4, 4)
    vol[0, 1:3, 1:3, 1:3] = 1.0
    assert agg(vol, "patch_max", patch_size=2).item() == pytest.approx(1.0)
    assert agg(vol, "patch_max", patch_size=3).item() == pytest.approx(8 / 27)
    scores = uncertainty.image_scores({"total": m}, ("mean", "sum"))
    assert set(scores) == {"total.mean", "total.sum"}
    with pytest.raises(ValueError, match="unknown aggregation"):
        agg(m, "median")


# ----------------------------------------------------------------------------- detection


def test_aurc_and_e_aurc_on_a_countable_ranking():
    risk = [0.0, 0.0, 1.0, 1.0]
    # perfect: selective risks 0, 0, 1/3, 1/2 -> AURC 5/24, E-AURC 0
    assert detection.aurc([1, 2, 3, 4], risk) == pytest.approx(5 / 24)
    assert detection.e_aurc([1, 2, 3, 4], risk) == pytest.approx(0.0)
    # reversed: 1, 1, 2/3, 1/2 -> AURC 19/24, E-AURC 14/24
    assert detection.aurc([4, 3, 2, 1], risk) == pytest.approx(19 / 24)
    assert detection.e_aurc([4, 3, 2, 1], risk) == pytest.approx(14 / 24)
    # all tied: every ordering equally likely -> each selective risk is the mean risk
    assert detection.aurc([7, 7, 7, 7], risk) == pytest.approx(0.5)
    cov, sel = detection.risk_coverage([1, 2, 3, 4], risk)
    assert np.allclose(cov, [0.25, 0.5, 0.75, 1.0]) and np.allclose(sel, [0, 0, 1 / 3, 0.5])
    # a tie between a failure and a success shares their mean: u = 1, 2, 2, 3 over risks 0, 1, 0, 1
    assert np.allclose(detection.risk_coverage([1, 2, 2, 3], [0, 1, 0, 1])[1], [0, 0.25, 1 / 3, 0.5])


def test_auroc_mann_whitney_with_ties():
    assert detection.auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert detection.auroc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    # positives {1, 3} vs negatives {1, 2}: 0.5 + 0 + 1 + 1 over 4 pairs
    assert detection.auroc([1, 1, 2, 3], [False, True, False, True]) == pytest.approx(0.625)
    assert detection.auroc([5, 5, 5], [True, False, True]) == pytest.approx(0.5)
    assert math.isnan(detection.auroc([1, 2], [True, True]))


def test_ace_and_brier_hand_computed():
    # two equal-mass bins: {0.1, 0.2} vs obs {0, 0} -> 0.15; {0.3, 0.4} vs {1, 1} -> 0.65
    assert detection.adaptive_calibration_error([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], 2) == pytest.approx(0.4)
    # 3 voxels, 2 bins of sizes 2, 1: |0.3 - 0.5| and |0.9 - 1| -> 0.15
    assert detection.adaptive_calibration_error([0.9, 0.2, 0.4], [1, 0, 1], 2) == pytest.approx(0.15)
    # tied predictions across a bin edge contribute their mean observation, whatever their order
    assert detection.adaptive_calibration_error([0.5] * 4, [0, 0, 1, 1], 2) == pytest.approx(0.0)
    assert detection.adaptive_calibration_error([0.5] * 4, [1, 1, 0, 0], 2) == pytest.approx(0.0)
    assert detection.brier_score([0.2, 0.4, 0.9], [0, 1, 1]) == pytest.approx(0.41 / 3)
    rng = np.random.default_rng(0)
    p = rng.integers(0, 5, 200) / 4
    f = rng.integers(0, 3, 200) / 2
    parts = [detection.calibration_histogram(p[:70], f[:70]), detection.calibration_histogram(p[70:], f[70:])]
    pooled = detection.merge_histograms(parts)
    assert detection.ace_from_histogram(pooled, 7) == pytest.approx(detection.adaptive_calibration_error(p, f, 7))
    assert detection.brier_from_histogram(pooled) == pytest.approx(detection.brier_score(p, f))


# ----------------------------------------------------------------------------- shifts


@pytest.fixture(scope="module")
def items():
    from probunet.data import synthetic

    return synthetic.generate(num_cases=6, size=32, seed=3)


def _hf_energy(img):
    """Power of the spatial frequencies above half the Nyquist frequency (|f| > 1/4 cycles per voxel)."""
    f = np.fft.fftfreq(img.shape[-1])
    high = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2) > 0.25
    window = np.outer(np.hanning(img.shape[0]), np.hanning(img.shape[1]))  # no wrap-around edge
    return float((np.abs(np.fft.fft2((img - img.mean()) * window)) ** 2)[high].sum())


def test_each_shift_changes_what_it_names_and_keeps_masks_and_truth(items):
    for kind in SHIFTS:
        out = shift_items(items, kind, 1.0, seed=0)
        for a, b in zip(items, out):
            assert np.array_equal(a["labels"], b["labels"]) and a["meta"]["truth"] == b["meta"]["truth"]
            assert b["meta"]["shift"] == {"kind": kind, "severity": 1.0, "seed": 0}
            assert b["image"].shape == a["image"].shape and b["image"].dtype == np.float32
            assert not np.array_equal(a["image"], b["image"])
    for it in items:
        x = it["image"]
        up = shift_image(x, "intensity", 1.0)
        assert np.allclose(up - x, 0.2, atol=1e-6) and up.std() == pytest.approx(x.std(), rel=1e-5)
        noisy = shift_image(x, "noise", 2.0, index=1)
        assert abs(noisy.mean() - x.mean()) < 0.01 and (noisy - x).std() == pytest.approx(0.1, rel=0.1)
        blurred = shift_image(x, "blur", 1.0)
        assert _hf_energy(blurred[0]) < 0.2 * _hf_energy(x[0]) and abs(blurred.mean() - x.mean()) < 1e-3
        tex = shift_image(x, "texture", 1.0, index=2)
        assert abs(tex.mean() - x.mean()) < 1e-4 and (tex - x).std() == pytest.approx(0.05, rel=0.01)
        for kind in SHIFTS:
            assert np.allclose(shift_image(x, kind, 0.0, labels=it["labels"], truth=it["meta"]["truth"]), x, atol=1e-6)


def test_lesion_contrast_changes_only_the_lesions(items):
    from probunet.data.synthetic import soft_profile

    for it in items:
        truth = it["meta"]["truth"]
        out = shift_item(it, "lesion_contrast", 1.0)["image"]
        signal = sum(0.6 * les["contrast"] * soft_profile(les, tuple(truth["shape"])) for les in truth["lesions"])
        # halved lesion signal, exactly; background (no lesion signal) untouched
        assert np.allclose(out[0], it["image"][0] - 0.5 * signal, atol=1e-5)
        far = signal < 1e-4
        assert far.any() and np.abs(out[0] - it["image"][0])[far].max() < 1e-4
    # without the truth: the raters' mean mask stands for the lesion
    it = dict(items[0], meta={})
    out = shift_item(it, "lesion_contrast", 1.0)["image"][0]
    inside = (it["labels"] > 0).mean(0) > 0.5
    before = it["image"][0][inside].mean() - it["image"][0][~inside].mean()
    after = out[inside].mean() - out[~inside].mean()
    assert 0.3 * before < after < 0.8 * before


def test_shift_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown shift"):
        shift_image(np.zeros((1, 8, 8)), "rotate", 1.0)
    with pytest.raises(ValueError, match="severity"):
        shift_image(np.zeros((1, 8, 8)), "noise", -1.0)
