"""model.foreground_prior: the logits start at a class prior (rare foreground, e.g. 3D patches)."""

import math

import pytest
import torch

from probunet.config import ConfigError, load_config
from probunet.models import build_model
from probunet.models.prob_unet import ProbabilisticUNet


def tiny(**kw):
    torch.manual_seed(0)
    return ProbabilisticUNet(spatial_dims=3, in_channels=1, num_classes=kw.pop("num_classes", 2), features=(4, 8),
                             latent_dim=2, fcomb_layers=3, convs_per_level=1, **kw)


def last_layer(model):
    return model.fcomb.rest[-1]


def test_bias_is_the_log_odds_of_the_prior():
    model = tiny(foreground_prior=0.01)
    # by hand: log(0.01 / 0.99) = -4.59512
    assert last_layer(model).bias.tolist() == pytest.approx([0.0, -4.59512], abs=1e-4)
    three = tiny(num_classes=3, foreground_prior=0.02)
    # two foreground classes of 0.01 each against 0.98 background: log(0.01 / 0.98) = -4.58497
    assert last_layer(three).bias.tolist() == pytest.approx([0.0, -4.58497, -4.58497], abs=1e-4)


def test_logits_start_near_the_prior_and_without_it_near_half():
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        fg = tiny(foreground_prior=0.01)(x).logits.softmax(1)[:, 1].mean().item()
        plain = tiny()(x).logits.softmax(1)[:, 1].mean().item()
    assert 0.005 < fg < 0.02
    assert 0.2 < plain < 0.8  # He-normal init: about even odds, the start the option replaces


def test_weights_are_scaled_not_replaced():
    plain, scaled = tiny(), tiny(foreground_prior=0.3)
    assert torch.allclose(last_layer(scaled).weight, 0.1 * last_layer(plain).weight)


def test_config_key_reaches_the_model_and_is_checked():
    cfg = load_config("configs/volumes3d.yaml", ["model.features=[4,8]", "model.foreground_prior=0.05"])
    model = build_model(cfg.model, cfg.train)
    assert last_layer(model).bias[1].item() == pytest.approx(math.log(0.05 / 0.95), abs=1e-5)
    for bad in ("0", "1", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="model.foreground_prior"):
            load_config("configs/volumes3d.yaml", [f"model.foreground_prior={bad}"])
    assert load_config("configs/synthetic.yaml").model.foreground_prior is None


def test_shipped_3d_config_starts_at_the_prior():
    assert load_config("configs/volumes3d.yaml").model.foreground_prior == 0.01


def _latent_after_training(foreground_prior, steps=40):
    """KL (max of the last 10 steps), the posterior's smallest log-sigma and largest |mu| after
    ``steps`` ELBO steps on 16^3 images with one small bright sphere (~0.2% of the voxels)."""
    torch.manual_seed(0)
    model = ProbabilisticUNet(spatial_dims=3, in_channels=1, num_classes=2, features=(4, 8), latent_dim=3,
                              fcomb_layers=3, convs_per_level=2, foreground_prior=foreground_prior)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))  # (3, 16, 16, 16)
    kls = []
    for _ in range(steps):
        centre = torch.randint(3, 13, (2, 3), generator=g).float()
        seg = ((grid[None] - centre[:, :, None, None, None]).square().sum(1) < 2.0).long()  # (2, 16, 16, 16)
        image = torch.randn(2, 1, 16, 16, 16, generator=g) * 0.3 + 2.0 * seg[:, None]
        out = model(image, seg=seg)
        ce = torch.nn.functional.cross_entropy(out.logits, seg, reduction="none").flatten(1).sum(1).mean()
        loss = ce + out.kl.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        kls.append(out.kl.mean().item())
    q = model.posterior(image, seg).base_dist
    return max(kls[-10:]), q.scale.log().min().item(), q.loc.abs().max().item()


def test_rare_foreground_does_not_push_the_latent_into_a_bias():
    # Without the prior the quickest way from even odds to the background is z, a bias over the
    # whole image: the KL rises (3 nats here; at 32^3 it ran to the log-sigma clamps, docs/volumes.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 40 tiny steps: threads only add synchronisation on a busy CPU
    try:
        kl_plain, _, _ = _latent_after_training(None)
        kl, log_sigma, mu = _latent_after_training(0.01)
    finally:
        torch.set_num_threads(threads)
    assert kl_plain > 1.0
    assert kl < 0.3 and log_sigma > -1.0 and mu < 1.5
