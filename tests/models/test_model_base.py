"""models/base.py: one base class, one loss-settings type, one chunked sampling loop (issue 31)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from probunet.config import ModelConfig, TrainConfig
from probunet.models import LossSettings, ProbabilisticUNet, SegmentationModel, build_model, model_names
from probunet.models.base import chunked_samples, loss_settings_from
from probunet.models.zoo import (DeepEnsemble, HierarchicalProbUNet, MCDropoutUNet, PHiSeg,
                                 StochasticSegmentationNetwork, UNetBaseline)

CLASSES = [ProbabilisticUNet, UNetBaseline, MCDropoutUNet, DeepEnsemble, StochasticSegmentationNetwork,
           HierarchicalProbUNet, PHiSeg]


def tiny(name, **kw):
    return build_model(ModelConfig(name=name, features=(4, 8), latent_dim=2, fcomb_layers=2, convs_per_level=1,
                                   ensemble_size=2, rank=2, mc_samples=2, **kw))


def test_every_model_shares_the_base_and_the_loss_settings_type():
    shipped = ["prob_unet", "unet", "mc_dropout", "ensemble", "ssn", "hpu_net", "phiseg"]
    assert set(shipped) <= set(model_names())  # (other tests register toy models of their own)
    for name in shipped:
        model = tiny(name)
        assert isinstance(model, SegmentationModel), name
        assert type(model.loss_settings) is LossSettings, name
        assert model.divisor == 2  # two levels


def test_each_constructor_default_is_the_configs():
    default = ModelConfig()
    for cls in CLASSES:
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if hasattr(default, name) and getattr(default, name) is not None:
                assert p.default == getattr(default, name), (cls.__name__, name)
    for f in dataclasses.fields(LossSettings):
        if hasattr(TrainConfig, f.name) and f.name != "geco":
            assert f.default == getattr(TrainConfig(), f.name), f.name


def test_loss_settings_from_a_train_config_and_their_checks():
    train = TrainConfig(beta=2.5, kl_warmup_steps=7, rater="all", free_bits=0.25, kl_balance=0.8)
    ls = loss_settings_from(train)
    assert (ls.beta, ls.kl_warmup_steps, ls.rater, ls.geco, ls.free_bits, ls.kl_balance) == (2.5, 7, "all", None,
                                                                                             0.25, 0.8)
    assert loss_settings_from(None) == LossSettings()
    for bad in ({"rater": "one"}, {"kl_warmup_steps": -1}, {"free_bits": -0.5}, {"kl_balance": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossSettings(**bad)
    model = tiny("ssn")
    assert model.configure_loss(beta=3.0).loss_settings.beta == 3.0
    assert model.beta_at(0) == 3.0
    with pytest.raises(TypeError):
        model.configure_loss(LossSettings(), beta=1.0)


def test_the_chunked_loop_draws_in_order_into_one_output():
    calls = []

    def draw(start, n, out):
        calls.append((start, n, out is None))
        chunk = torch.arange(start, start + n, dtype=torch.float32).view(1, n, 1).expand(2, n, 3)
        if out is not None:
            out.copy_(chunk)
            return out
        return chunk.clone()

    result = chunked_samples(10, 4, draw)
    assert calls == [(0, 4, True), (4, 4, False), (8, 2, False)]
    assert result.shape == (2, 10, 3)
    assert torch.equal(result[0, :, 0], torch.arange(10, dtype=torch.float32))
    calls.clear()
    assert torch.equal(chunked_samples(10, None, draw), result) and calls == [(0, 10, True)]
    calls.clear()
    assert torch.equal(chunked_samples(3, 16, draw), result[:, :3]) and calls == [(0, 3, True)]
    # a draw that returns a new tensor instead of writing into ``out`` is copied there
    assert torch.equal(chunked_samples(10, 3, lambda s, n, out: draw(s, n, None)), result)


@pytest.mark.parametrize("name", ["mc_dropout", "ssn", "hpu_net", "phiseg"])
def test_zoo_samples_come_chunk_after_chunk(name):
    """With a generator, sample(chunk_size=k) equals k-sample draws concatenated (the loop draws in order)."""
    torch.manual_seed(0)
    model = tiny(name).eval()
    x = torch.randn(2, 1, 8, 8)
    whole = model.sample(x, 5, chunk_size=2, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    parts = [model.sample(x, n, chunk_size=None, generator=g) for n in (2, 2, 1)]
    assert whole.shape == (2, 5, 2, 8, 8)
    torch.testing.assert_close(whole, torch.cat(parts, dim=1))


def test_sample_arguments_a_model_does_not_have_are_refused():
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="mean: this model has no mean sample"):
        tiny("ssn").sample(x, 2, mean=True)
    with pytest.raises(ValueError, match="noise: this model has no fixed-size per-sample draw"):
        tiny("phiseg").sample(x, 2, noise=torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        tiny("prob_unet").sample(x, 0)
    assert tiny("hpu_net").eval().sample(x, 2, mean=True).shape == (1, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="must be divisible by 2"):
        tiny("mc_dropout").sample(torch.randn(1, 1, 7, 8), 2)
