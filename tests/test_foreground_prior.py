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
