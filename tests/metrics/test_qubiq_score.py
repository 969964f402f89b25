"""The QUBIQ challenge score (probunet.metrics.qubiq_score) against hand-computed values."""

import pytest
import torch

from probunet.metrics.segmentation import QUBIQ_THRESHOLDS, qubiq_score


def raters_with_fractions():
    """One 2x2 image, 4 raters; foreground fractions per pixel [1.0, 0.5, 0.25, 0.0]."""
    r = torch.zeros(1, 4, 2, 2, dtype=torch.long)
    r[0, :, 0, 0] = 1  # 4/4
    r[0, :2, 0, 1] = 1  # 2/4
    r[0, :1, 1, 0] = 1  # 1/4
    return r


# P = [0.95, 0.35, 0.35, 0.05], R = [1, 0.5, 0.25, 0]; masks are "> t":
# t=.1, .2: P {0,1,2} R {0,1,2} -> 1;  t=.3: P {0,1,2} R {0,1} -> 2*2/5 = 0.8
# t=.4: P {0} R {0,1} -> 2*1/3;  t=.5 (R = 0.5 is not > 0.5) ... .9: P {0} R {0} -> 1
HAND = (7 + 0.8 + 2 / 3) / 9


def test_thresholds_are_point_one_to_point_nine():
    assert QUBIQ_THRESHOLDS == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


def test_hand_computed_probability_map():
    prob = torch.tensor([[[0.95, 0.35], [0.35, 0.05]]])
    score = qubiq_score(prob, raters_with_fractions())
    assert score.shape == (1,)
    assert score.item() == pytest.approx(HAND, abs=1e-6)


def test_empty_vs_empty_is_one_and_empty_reference_vs_prediction():
    refs = torch.zeros(2, 3, 2, 2, dtype=torch.long)
    prob = torch.stack([torch.zeros(2, 2), torch.full((2, 2), 0.85)])
    score = qubiq_score(prob, refs)
    # image 0: both empty at every threshold -> 1; image 1: P > t for t <= 0.8 (8 thresholds, Dice 0),
    # at t = 0.9 both empty -> 1: mean 1/9
    assert score.tolist() == pytest.approx([1.0, 1 / 9])
    assert qubiq_score(prob, refs, empty_dice=0.0).tolist() == pytest.approx([0.0, 0.0])


def test_label_samples_logits_and_probabilities_agree():
    refs = raters_with_fractions()
    # 20 label samples with foreground fractions [0.95, 0.35, 0.35, 0.05]
    samples = torch.zeros(1, 20, 2, 2, dtype=torch.long)
    samples[0, :19, 0, 0] = 1
    samples[0, :7, 0, 1] = 1
    samples[0, 10:17, 1, 0] = 1
    samples[0, :1, 1, 1] = 1
    assert qubiq_score(samples, refs).item() == pytest.approx(HAND, abs=1e-6)
    # sampled logits (B, S, C, *spatial): the mean softmax of class 1 is the mean of the samples' probabilities
    p = torch.tensor([[0.95, 0.35], [0.35, 0.05]])
    p_samples = torch.stack([p - 0.02, p + 0.02], dim=0)  # mean p
    logits = torch.stack([torch.zeros_like(p_samples), torch.log(p_samples / (1 - p_samples))], dim=1)
    assert qubiq_score(logits.unsqueeze(0), refs).item() == pytest.approx(HAND, abs=1e-6)
    probs = torch.stack([1 - p_samples, p_samples], dim=1).unsqueeze(0)
    assert qubiq_score(probs, refs, from_logits=False).item() == pytest.approx(HAND, abs=1e-6)


def test_padded_raters_are_ignored_and_foreground_class_is_chosen():
    refs = raters_with_fractions()
    padded = torch.cat([refs, torch.zeros(1, 2, 2, 2, dtype=torch.long)], dim=1)  # 2 empty padding raters
    prob = torch.tensor([[[0.95, 0.35], [0.35, 0.05]]])
    assert qubiq_score(prob, padded, num_raters=torch.tensor([4])).item() == pytest.approx(HAND, abs=1e-6)
    assert qubiq_score(prob, padded).item() != pytest.approx(HAND, abs=1e-3)  # counted: a different score
    # 3 classes: class 2 as the foreground (class 1 elsewhere is background for this score)
    refs3 = refs * 2
    refs3[0, :, 1, 1] = 1
    assert qubiq_score(prob, refs3, num_classes=3, foreground=2).item() == pytest.approx(HAND, abs=1e-6)


def test_bad_input_is_explained():
    refs = raters_with_fractions()
    with pytest.raises(ValueError, match="prediction"):
        qubiq_score(torch.rand(1, 3, 3), refs)
    with pytest.raises(ValueError, match="foreground"):
        qubiq_score(torch.rand(1, 2, 2), refs, foreground=2)
    with pytest.raises(ValueError, match="num_raters"):
        qubiq_score(torch.rand(1, 2, 2), refs, num_raters=torch.tensor([5]))
