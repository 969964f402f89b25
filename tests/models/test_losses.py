import math

import pytest
import torch

from probunet.models.losses import Geco, beta_schedule, elbo_loss


def test_ce_is_summed_over_pixels_and_averaged_over_batch():
    # 2x2 image, 2 classes; logits give p(correct) = e/(e+1) at every pixel.
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = 1.0
    target = torch.ones(1, 2, 2, dtype=torch.long)
    out = elbo_loss(logits, target, torch.tensor([0.5]), beta=2.0)
    per_pixel = -math.log(math.e / (math.e + 1))
    assert out["ce_sum"].item() == pytest.approx(4 * per_pixel, rel=1e-5)
    assert out["ce_mean"].item() == pytest.approx(per_pixel, rel=1e-5)
    assert out["loss"].item() == pytest.approx(4 * per_pixel + 2.0 * 0.5, rel=1e-5)


def test_doubling_a_batch_of_identical_images_leaves_the_loss_unchanged():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5, 5)
    target = torch.randint(0, 3, (1, 5, 5))
    kl = torch.tensor([1.7])
    one = elbo_loss(logits, target, kl, beta=3.0)
    two = elbo_loss(logits.repeat(2, 1, 1, 1), target.repeat(2, 1, 1), kl.repeat(2), beta=3.0)
    for k in one:
        assert torch.allclose(one[k], two[k]), k


def test_beta_warmup():
    assert beta_schedule(2.0, 0, 0) == 2.0
    assert beta_schedule(2.0, 0, 4) == pytest.approx(0.5)
    assert beta_schedule(2.0, 1, 4) == pytest.approx(1.0)
    assert beta_schedule(2.0, 10, 4) == 2.0


def test_geco_raises_lambda_while_the_constraint_is_violated_and_lowers_it_after():
    geco = Geco(goal=0.1, alpha=0.0, step_size=0.5, lambda_init=1.0)
    bad = torch.zeros(1, 2, 4, 4)  # CE = log 2 = 0.69 > goal
    target = torch.ones(1, 4, 4, dtype=torch.long)
    out = geco(bad, target, torch.tensor([0.0]))
    expected = math.exp(0.5 * (math.log(2) - 0.1))
    assert geco.lagmul.item() == pytest.approx(expected, rel=1e-5)
    good = torch.zeros(1, 2, 4, 4)
    good[:, 1] = 10.0  # CE ~ 4.5e-5 < goal
    geco(good, target, torch.tensor([0.0]))
    assert geco.lagmul.item() < expected
    assert "geco_lambda" in out
    out["loss"].backward() if out["loss"].requires_grad else None


def test_geco_state_is_in_the_state_dict():
    g = Geco(goal=0.2)
    assert {"lagmul", "constraint_ma", "initialised"} <= set(g.state_dict())


def test_rater_entropy_is_the_mean_per_pixel_entropy_of_the_raters_frequency():
    import numpy as np

    from probunet.models.losses import rater_entropy

    # case 1: two raters over two pixels: they agree on pixel 0 (H = 0), split 1:1 on pixel 1 (H = ln 2)
    one = np.array([[[1, 0]], [[1, 1]]])
    # case 2: four raters on one pixel, one of them marks it: H = -(1/4 ln 1/4 + 3/4 ln 3/4)
    two = np.array([[[1]], [[0]], [[0]], [[0]]])
    h1 = math.log(2) / 2
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert rater_entropy([one, two], num_classes=2) == pytest.approx((h1 + h2) / 2, rel=1e-12)
    # three classes, three raters each with its own class on the one pixel: ln 3
    assert rater_entropy([np.array([[[0]], [[1]], [[2]]])], num_classes=3) == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="no cases"):
        rater_entropy([], num_classes=2)


def test_auto_geco_goal_is_goal_scale_times_the_rater_entropy():
    import numpy as np

    from probunet.config import GecoConfig
    from probunet.models.losses import build_geco, resolve_geco_goal

    cases = [np.array([[[1, 0]], [[1, 1]]])]  # rater entropy ln(2) / 2
    goal, entropy = resolve_geco_goal(GecoConfig(enabled=True, goal="auto", goal_scale=0.5), cases, 2)
    assert entropy == pytest.approx(math.log(2) / 2) and goal == pytest.approx(math.log(2) / 4)
    assert resolve_geco_goal(GecoConfig(enabled=True, goal=0.1), cases, 2) is None  # a number stays
    assert resolve_geco_goal(GecoConfig(enabled=False, goal="auto"), cases, 2) is None
    unresolved = build_geco(GecoConfig(enabled=True, goal="auto"))
    with pytest.raises(RuntimeError, match="auto"):
        unresolved(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1))
    assert build_geco(GecoConfig(enabled=True, goal=0.25)).goal == 0.25
