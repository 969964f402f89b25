"""Axis-aligned Gaussian latent distributions and the prior / posterior encoders.

Shared by :class:`~probunet.models.prob_unet.ProbabilisticUNet` and
:class:`~probunet.models.cvae.ConditionalVAE`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

# log-sigma is clamped to this range: sigma in [~4.5e-5, ~2.2e4]. Keeps the KL
# and the reparameterised sample finite when an encoder drifts early in training.
LOG_SIGMA_MIN = -10.0
LOG_SIGMA_MAX = 10.0


def diagonal_gaussian(mu: torch.Tensor, log_sigma: torch.Tensor) -> Independent:
    """An axis-aligned Gaussian over the last dim; computed in fp32.

    mu, log_sigma: (B, D). Returns a distribution with batch_shape (B,), event_shape (D,).
    Built with ``validate_args=False``: validating the scale (> 0, true by
    construction: exp of a clamped log-sigma) reads a device tensor on the host,
    a GPU synchronisation in every training step.
    """
    mu = mu.float()
    log_sigma = log_sigma.float().clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)
    return Independent(Normal(mu, torch.exp(log_sigma), validate_args=False), 1, validate_args=False)


def standard_gaussian(batch: int, latent_dim: int, device, dtype=torch.float32) -> Independent:
    """The fixed prior N(0, I) with batch_shape (batch,)."""
    zeros = torch.zeros(batch, latent_dim, device=device, dtype=dtype)
    return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1, validate_args=False)


def analytic_kl(q, p) -> torch.Tensor:
    """KL(q || p) of two diagonal Gaussians, in fp32: (B,) for ``Independent`` distributions,
    (B, D) per dimension for their ``Normal`` base distributions."""
    return kl_divergence(q, p)


class GaussianHead(nn.Module):
    """A linear layer from pooled features to mu and log-sigma (the 1x1 conv of Kohl et al.
    applied after the spatial mean, which is the same map).

    pooled features (B, C) -> Independent Normal with batch_shape (B,), event (latent_dim,),
    in fp32. The caller pools (e.g. the spatial mean of an encoder's last feature map).
    """

    def __init__(self, in_features: int, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.proj = nn.Linear(in_features, 2 * latent_dim)
        # Start near N(0, I): small weights, zero bias (Kohl et al. initialise this
        # layer with a small normal for the same reason).
        nn.init.normal_(self.proj.weight, std=1e-3)
        nn.init.zeros_(self.proj.bias)

    def forward(self, pooled: torch.Tensor) -> Independent:
        if pooled.dim() != 2:
            raise ValueError(f"GaussianHead takes pooled features (B, C), got shape {tuple(pooled.shape)}")
        params = self.proj(pooled.float())  # (B, 2D)
        mu, log_sigma = params.split(self.latent_dim, dim=1)
        return diagonal_gaussian(mu, log_sigma)


def mlp(sizes: Sequence[int], act=nn.ReLU) -> nn.Sequential:
    """Linear layers with activations between them (none after the last)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)
