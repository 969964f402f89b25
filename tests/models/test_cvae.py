"""ConditionalVAE: shapes, KL for both priors, loss terms, training, and the digits example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probunet.models.cvae import ConditionalVAE

ROOT = Path(__file__).resolve().parents[2]
Y_SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny; one intra-op thread is fastest and avoids thrashing a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.one_hot(torch.arange(b) % 10, 10).float()
    y = torch.rand(b, *Y_SHAPE, generator=g)
    return x, y


def _spread_head(latent_head, seed):
    """Give a latent head non-trivial mu / sigma (the default init is close to N(0, I))."""
    g = torch.Generator().manual_seed(seed)
    proj = latent_head.head.proj
    with torch.no_grad():
        proj.weight.copy_(0.3 * torch.randn(proj.weight.shape, generator=g))
        proj.bias.copy_(0.5 * torch.randn(proj.bias.shape, generator=g))


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("prior", ["conditional", "standard"])
def test_shapes(arch, prior):
    torch.manual_seed(0)
    model = ConditionalVAE(10, Y_SHAPE, latent_dim=3, prior=prior, arch=arch, hidden=(32, 32))
    x, y = _batch(5)
    out = model(x, y=y)
    assert out["logits"].shape == (5, *Y_SHAPE)
    assert out["z"].shape == (5, 3)
    for key in ("loss", "recon", "kl"):
        assert out[key].shape == () and torch.isfinite(out[key])
    assert model(x)["logits"].shape == (5, *Y_SHAPE)
    assert model.prior(x).batch_shape == (5,) and model.prior(x).event_shape == (3,)
    assert model.posterior(x, y).batch_shape == (5,)
    probs = model.sample(x, 7)
    assert probs.shape == (5, 7, *Y_SHAPE)
    assert probs.min() >= 0 and probs.max() <= 1
    assert model.sample(x, 2, logits=True).shape == (5, 2, *Y_SHAPE)
    assert model.elbo(x, y, num_samples=3).shape == (5,)
    assert (model.prior_net is None) == (prior == "standard")


def test_kl_standard_prior_matches_closed_form():
    torch.manual_seed(0)
    model = ConditionalVAE(10, Y_SHAPE, latent_dim=4, prior="standard", hidden=(32,))
    _spread_head(model.posterior_net, 1)
    x, y = _batch(6)
    q = model.posterior(x, y)
    mu, sigma = q.base_dist.loc, q.base_dist.scale
    assert mu.abs().max() > 0.1  # the check is not vacuous
    expected = (0.5 * (mu ** 2 + sigma ** 2 - 1 - 2 * torch.log(sigma)).sum(1)).mean()
    got = model(x, y=y)["kl"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got > 0.05


def test_kl_conditional_prior_matches_closed_form():
    torch.manual_seed(0)
    model = ConditionalVAE(10, Y_SHAPE, latent_dim=4, prior="conditional", hidden=(32,))
    _spread_head(model.posterior_net, 1)
    _spread_head(model.prior_net, 2)
    x, y = _batch(6)
    q, p = model.posterior(x, y), model.prior(x)
    mq, sq = q.base_dist.loc, q.base_dist.scale
    mp, sp = p.base_dist.loc, p.base_dist.scale
    # the prior depends on x (one-hot classes differ per row)
    assert (mp[0] - mp[1]).abs().max() > 1e-3
    expected = (0.5 * (2 * torch.log(sp / sq) + (sq ** 2 + (mq - mp) ** 2) / sp ** 2 - 1).sum(1)).mean()
    got = model(x, y=y)["kl"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # differs from the KL to N(0, I): the prior net is really used
    to_std = (0.5 * (mq ** 2 + sq ** 2 - 1 - 2 * torch.log(sq)).sum(1)).mean()
    assert (got - to_std).abs() > 1e-3


def test_loss_terms():
    torch.manual_seed(0)
    model = ConditionalVAE(10, Y_SHAPE, latent_dim=2, beta=0.25, hidden=(32,))
    _spread_head(model.posterior_net, 3)
    x, y = _batch(4)
    out = model(x, y=y)
    recon = F.binary_cross_entropy_with_logits(out["logits"], y, reduction="sum") / 4  # sum over pixels, mean over B
    torch.testing.assert_close(out["recon"], recon)
    torch.testing.assert_close(out["loss"], out["recon"] + 0.25 * out["kl"])


def test_elbo_is_minus_recon_minus_kl_for_a_sharp_posterior():
    torch.manual_seed(0)
    model = ConditionalVAE(10, Y_SHAPE, latent_dim=2, hidden=(32,))
    _spread_head(model.posterior_net, 4)
    with torch.no_grad():  # log-sigma = -10: z is the posterior mean up to ~5e-5
        model.posterior_net.head.proj.weight[2:].zero_()
        model.posterior_net.head.proj.bias[2:].fill_(-10.0)
    model.beta = 1.0
    x, y = _batch(4)
    out = model(x, y=y)
    torch.testing.assert_close(model.elbo(x, y, num_samples=2).mean(), -out["loss"], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("prior", ["conditional", "standard"])
def test_loss_decreases_on_a_tiny_batch(prior):
    torch.manual_seed(0)
    model = ConditionalVAE(10, Y_SHAPE, latent_dim=2, prior=prior, hidden=(32, 32))
    x, y = _batch(8)
    y = (y > 0.5).float()  # binary targets: the loss can fall well below its start
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out = model(x, y=y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_sample_reproducible_and_mean():
    torch.manual_seed(0)
    model = ConditionalVAE(10, Y_SHAPE, latent_dim=3, hidden=(32,))
    _spread_head(model.prior_net, 5)
    x, _ = _batch(3)
    a = model.sample(x, 4, generator=torch.Generator().manual_seed(7))
    b = model.sample(x, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[:, 0], a[:, 1])  # different z per sample
    m = model.sample(x, 3, mean=True)
    torch.testing.assert_close(m[:, 0], m[:, 2])


def test_custom_modules():
    class XEnc(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(10, 16)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    dec = nn.Sequential(nn.Linear(16 + 2, 64))  # flat logits, reshaped by the model
    model = ConditionalVAE(10, Y_SHAPE, latent_dim=2, x_encoder=XEnc(), x_features=16,
                           y_encoder=nn.Flatten(1), y_features=64, decoder=dec)
    x, y = _batch(3)
    out = model(x, y=y)
    assert out["logits"].shape == (3, *Y_SHAPE)
    assert model.decoder is dec
    with pytest.raises(ValueError, match="x_features"):
        ConditionalVAE(10, Y_SHAPE, x_encoder=XEnc())


def test_invalid_arguments():
    with pytest.raises(ValueError, match="prior"):
        ConditionalVAE(10, Y_SHAPE, prior="gaussian")
    with pytest.raises(ValueError, match="arch"):
        ConditionalVAE(10, Y_SHAPE, arch="transformer")
    with pytest.raises(ValueError, match="multiples of 4"):
        ConditionalVAE(10, (1, 6, 6), arch="conv")
    model = ConditionalVAE(10, Y_SHAPE, hidden=(16,))
    x, y = _batch(2)
    with pytest.raises(ValueError, match="y must be"):
        model(x, y=y.flatten(1))
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :5])


def test_digits_script_quick(tmp_path):
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (pip install 'probunet[examples]')")
    pytest.importorskip("matplotlib", reason="the digits example writes its figure with matplotlib")
    out = tmp_path / "figs" / "digits.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "cvae_digits.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test ELBO" in proc.stdout
    for prior in ("conditional", "standard"):
        assert f"per digit 0-9, {prior}:" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write left no temp file
