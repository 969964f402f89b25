import math

import pytest
import torch
from torch.distributions import Independent, Normal

from probunet import ProbabilisticUNet
from probunet.models.gaussian import LOG_SIGMA_MAX, analytic_kl, diagonal_gaussian

TINY = dict(features=(4, 8), latent_dim=3, fcomb_layers=3)


@pytest.mark.parametrize("spatial_dims, size", [(2, 16), (3, 8)])
@pytest.mark.parametrize("prior", ["conditional", "standard"])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_forward_and_sample_shapes(spatial_dims, size, prior, num_classes):
    torch.manual_seed(0)
    m = ProbabilisticUNet(spatial_dims=spatial_dims, in_channels=2, num_classes=num_classes, prior=prior, **TINY)
    spatial = (size,) * spatial_dims
    x = torch.randn(3, 2, *spatial)
    y = torch.randint(0, num_classes, (3, *spatial))
    out = m(x, seg=y)
    assert out.logits.shape == (3, num_classes, *spatial)
    assert out.kl.shape == (3,)
    assert out.posterior is not None and out.posterior.batch_shape == (3,)
    assert out.prior.event_shape == (3,)
    out2 = m(x)
    assert out2.posterior is None and out2.kl is None
    assert out2.logits.shape == (3, num_classes, *spatial)
    s = m.sample(x, 5)
    assert s.shape == (3, 5, num_classes, *spatial)


def test_seg_is_keyword_only_and_changes_the_posterior():
    torch.manual_seed(0)
    m = ProbabilisticUNet(**TINY)
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(TypeError):
        m(x, torch.zeros(2, 16, 16, dtype=torch.long))
    y0 = torch.zeros(2, 16, 16, dtype=torch.long)
    y1 = torch.ones(2, 16, 16, dtype=torch.long)
    q0, q1 = m.posterior(x, y0), m.posterior(x, y1)
    assert not torch.allclose(q0.base_dist.loc, q1.base_dist.loc)


def test_standard_prior_is_unit_gaussian():
    m = ProbabilisticUNet(prior="standard", **TINY)
    p = m.prior(torch.randn(4, 1, 16, 16))
    assert torch.equal(p.base_dist.loc, torch.zeros(4, 3))
    assert torch.equal(p.base_dist.scale, torch.ones(4, 3))
    assert m.prior_net is None


def test_bad_input_shapes_are_explained():
    m = ProbabilisticUNet(**TINY)
    with pytest.raises(ValueError, match="divisible by 2"):
        m(torch.randn(1, 1, 15, 16))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="seg must be"):
        m(torch.randn(1, 1, 16, 16), seg=torch.zeros(1, 8, 8, dtype=torch.long))


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    q = diagonal_gaussian(torch.tensor([[0.3, -1.0, 0.5]]), torch.tensor([[-0.2, 0.1, -0.7]]))
    p = diagonal_gaussian(torch.tensor([[0.0, 0.5, 0.2]]), torch.tensor([[0.3, -0.1, 0.0]]))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    assert torch.allclose(analytic_kl(q, p), mc, atol=0.02)


def test_kl_to_standard_normal_closed_form():
    mu = torch.tensor([[1.0, -2.0]])
    log_sigma = torch.tensor([[0.5, -0.5]])
    q = diagonal_gaussian(mu, log_sigma)
    p = Independent(Normal(torch.zeros(1, 2), torch.ones(1, 2)), 1)
    sig2 = torch.exp(2 * log_sigma)
    expected = 0.5 * (mu ** 2 + sig2 - 1 - 2 * log_sigma).sum()
    assert torch.allclose(analytic_kl(q, p), expected.reshape(1))


def test_log_sigma_is_clamped_and_fp32():
    q = diagonal_gaussian(torch.zeros(1, 2, dtype=torch.bfloat16), torch.full((1, 2), 1e4).bfloat16())
    assert q.base_dist.scale.dtype == torch.float32
    assert torch.allclose(q.base_dist.scale, torch.full((1, 2), math.exp(LOG_SIGMA_MAX)))


def test_sampling_runs_unet_and_prior_once():
    torch.manual_seed(0)
    m = ProbabilisticUNet(**TINY).eval()
    calls = {"unet": 0, "prior": 0, "fcomb_rest": 0}
    m.unet.register_forward_hook(lambda *a: calls.__setitem__("unet", calls["unet"] + 1))
    m.prior_net.register_forward_hook(lambda *a: calls.__setitem__("prior", calls["prior"] + 1))
    m.fcomb.rest.register_forward_hook(lambda *a: calls.__setitem__("fcomb_rest", calls["fcomb_rest"] + 1))
    out = m.sample(torch.randn(2, 1, 16, 16), 10, chunk_size=4)
    assert out.shape == (2, 10, 2, 16, 16)
    assert calls["unet"] == 1 and calls["prior"] == 1
    assert calls["fcomb_rest"] == 3  # ceil(10 / 4) chunks, each batched over its samples


def test_samples_differ_and_are_seeded():
    torch.manual_seed(0)
    # One f_comb layer: logits are affine in z, so different latents give different logits.
    m = ProbabilisticUNet(features=(4, 8), latent_dim=3, fcomb_layers=1).eval()
    x = torch.randn(1, 1, 16, 16)
    a = m.sample(x, 4, generator=torch.Generator().manual_seed(1))
    b = m.sample(x, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a[:, 0], a[:, 1])
    mean = m.sample(x, 3, mean=True)
    assert torch.allclose(mean[:, 0], mean[:, 2])


def test_sample_has_no_autograd_in_eval():
    m = ProbabilisticUNet(**TINY).eval()
    out = m.sample(torch.randn(1, 1, 16, 16), 2)
    assert not out.requires_grad


def test_gradients_reach_all_parts():
    torch.manual_seed(0)
    m = ProbabilisticUNet(**TINY)
    x = torch.randn(2, 1, 16, 16)
    y = torch.randint(0, 2, (2, 16, 16))
    out = m(x, seg=y)
    (out.logits.sum() + out.kl.sum()).backward()
    for name in ("unet", "prior_net", "posterior_net", "fcomb"):
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert all(g is not None for g in grads), name
