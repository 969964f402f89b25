"""The Probabilistic U-Net's training objective.

ELBO form (Kohl et al. 2018): cross-entropy summed over pixels and averaged over
the batch, plus beta * KL(q(z|x,y) || p(z|x)) averaged over the batch. Both
terms are per-image quantities averaged the same way, so the effective beta
does not depend on the batch size.

GECO form (Rezende & Viola 2018), as the hierarchical Prob U-Net trains:
minimise KL subject to the mean per-pixel CE staying under a goal kappa, with a
Lagrange multiplier lambda updated from a moving average of the constraint:
``loss = lambda * (CE_mean - kappa) + KL``.

The goal can follow the data (``train.geco.goal: auto``): a multiple of the
mean per-pixel entropy of the raters' label frequency over the training cases
(:func:`rater_entropy`). That entropy is the cross-entropy against a randomly
drawn rater that the best predictor without a latent code reaches (the raters'
frequency itself), so a goal below it makes the latents carry the raters'
disagreement; a fixed goal above it never binds.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy_terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, C, *spatial), target (B, *spatial) int -> (CE summed over pixels (B,), mean CE (B,)), fp32."""
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")  # (B, *spatial)
    ce = ce.flatten(1)  # (B, N)
    return ce.sum(dim=1), ce.mean(dim=1)


def beta_schedule(beta: float, step: int, warmup_steps: int) -> float:
    """Linear KL warm-up: beta * min(1, (step + 1) / warmup_steps); constant without warm-up."""
    if warmup_steps <= 0:
        return float(beta)
    return float(beta) * min(1.0, (step + 1) / warmup_steps)


def kl_objective(kl: torch.Tensor, kl_dims: Optional[torch.Tensor] = None, free_bits: float = 0.0) -> torch.Tensor:
    """The KL term that is minimised: mean_b(KL), or with ``free_bits`` > 0 the "free bits"
    form (Kingma et al. 2016) sum_d max(mean_b KL_d, free_bits).

    kl (B,), kl_dims (B, D) the KL per latent dimension (needed when ``free_bits`` > 0).
    Below the floor a dimension's KL costs nothing, so the optimiser gains nothing by
    pushing the posterior onto the prior there: a guard against posterior collapse.
    """
    if free_bits <= 0:
        return kl.float().mean()
    if kl_dims is None:
        raise ValueError("free_bits > 0 needs the KL per latent dimension (kl_dims)")
    return kl_dims.float().mean(dim=0).clamp(min=float(free_bits)).sum()


def balanced_kl_dims(q_loc: torch.Tensor, q_scale: torch.Tensor, p_loc: torch.Tensor,
                     p_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(q || p) per latent dimension of two diagonal Gaussians, twice: with the
    posterior q detached (its gradient reaches only the prior) and with the prior
    p detached (its gradient reaches only the posterior). Both (B, D), fp32, with
    the value of the plain KL_d = log(s_p/s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2.
    """
    def kl(mq, sq, mp, sp):
        mq, sq, mp, sp = (t.float() for t in (mq, sq, mp, sp))
        return torch.log(sp / sq) + (sq.square() + (mq - mp).square()) / (2 * sp.square()) - 0.5

    to_prior = kl(q_loc.detach(), q_scale.detach(), p_loc, p_scale)
    to_posterior = kl(q_loc, q_scale, p_loc.detach(), p_scale.detach())
    return to_prior, to_posterior


def balanced_kl_objective(to_prior: torch.Tensor, to_posterior: torch.Tensor, balance: float,
                          free_bits: float = 0.0) -> torch.Tensor:
    """KL balancing (Hafner et al. 2021, DreamerV2): the KL term that is minimised,
    ``2 * balance * mean_b KL(sg q || p) + 2 * (1 - balance) * FB(KL(q || sg p))``.

    to_prior, to_posterior (B, D) from :func:`balanced_kl_dims`; FB is
    :func:`kl_objective` on the posterior side only (``free_bits`` per dimension).
    ``balance`` 0.5 without free bits gives each net the gradient of the plain KL
    (the term's value is then twice the KL: the logged ``kl`` stays the true KL).
    With free bits, the floor only spares the posterior: the prior always learns
    to match it, so that samples drawn from the prior look like the latents the
    decoder was trained on. ``balance`` > 0.5 moves the prior faster than the
    posterior is pulled towards it.
    """
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    prior_side = to_prior.float().sum(dim=1).mean()
    post_side = kl_objective(to_posterior.sum(dim=1), to_posterior, free_bits)
    return 2.0 * balance * prior_side + 2.0 * (1.0 - balance) * post_side


def elbo_loss(logits: torch.Tensor, target: torch.Tensor, kl: torch.Tensor,
              beta: float = 1.0, *, kl_dims: Optional[torch.Tensor] = None,
              free_bits: float = 0.0, kl_term: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Negative ELBO.

    logits (B, C, *spatial), target (B, *spatial) integer labels, kl (B,),
    kl_dims (B, D) optional, the KL per latent dimension (for ``free_bits``).
    Returns a dict of scalars: ``loss`` = mean_b(CE_sum) + beta * KL term (see
    :func:`kl_objective`; mean_b(KL) without free bits), ``ce_sum`` (per image,
    summed over pixels, batch mean), ``ce_mean`` (per pixel), ``kl`` (batch mean,
    the true KL also with free bits). ``kl_term``: the KL objective already computed
    (e.g. :func:`balanced_kl_objective`), used instead of :func:`kl_objective`.
    """
    ce_sum, ce_mean = cross_entropy_terms(logits, target)
    kl_mean = kl.float().mean()
    ce_sum_mean = ce_sum.mean()
    if kl_term is None:
        kl_term = kl_objective(kl, kl_dims, free_bits)
    return {
        "loss": ce_sum_mean + beta * kl_term,
        "ce_sum": ce_sum_mean,
        "ce_mean": ce_mean.mean(),
        "kl": kl_mean,
    }


class Geco(nn.Module):
    """GECO constraint on the mean per-pixel CE (Rezende & Viola 2018).

    ``lambda`` and the constraint's moving average are buffers, so they live in
    the state dict and resume with the checkpoint.
    """

    def __init__(self, goal: Optional[float], alpha: float = 0.99, step_size: float = 0.01,
                 lambda_init: float = 1.0, lambda_min: float = 1e-3, lambda_max: float = 1e4):
        super().__init__()
        self.goal = goal
        self.alpha = alpha
        self.step_size = step_size
        self.lambda_min = lambda_min
        self.lambda_max = lambda_max
        self.register_buffer("lagmul", torch.tensor(float(lambda_init)))
        self.register_buffer("constraint_ma", torch.tensor(0.0))
        self.register_buffer("initialised", torch.tensor(False))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, kl: torch.Tensor, *,
                kl_dims: Optional[torch.Tensor] = None, free_bits: float = 0.0,
                kl_term: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Same inputs as :func:`elbo_loss`; also updates lambda (no gradient through it)."""
        if self.goal is None:
            raise RuntimeError("the GECO goal is 'auto' and was not resolved: probunet train resolves it from the "
                               "training split (probunet.models.losses.resolve_geco_goal)")
        if kl_term is None:
            kl_term = kl_objective(kl, kl_dims, free_bits)
        ce_sum, ce_mean = cross_entropy_terms(logits, target)
        kl_mean = kl.float().mean()
        constraint = ce_mean.mean() - self.goal
        with torch.no_grad():
            c = constraint.detach()
            ma = torch.where(self.initialised, self.alpha * self.constraint_ma + (1 - self.alpha) * c, c)
            self.constraint_ma.copy_(ma)
            self.initialised.fill_(True)
            new = self.lagmul * torch.exp(self.step_size * ma)
            self.lagmul.copy_(new.clamp(self.lambda_min, self.lambda_max))
        # Straight-through: the gradient sees the current constraint, its value the moving average.
        smoothed = constraint + (self.constraint_ma - constraint).detach()
        return {
            "loss": self.lagmul * smoothed + kl_term,
            "ce_sum": ce_sum.mean(),
            "ce_mean": ce_mean.mean(),
            "kl": kl_mean,
            "geco_lambda": self.lagmul.detach().clone(),
        }


def rater_entropy(label_sets: Iterable, num_classes: int) -> float:
    """The mean per-pixel entropy (nats) of the raters' label frequency: for each case, the
    frequency f_c of every class over its raters at every pixel, H = -sum_c f_c log f_c, averaged
    over the case's pixels, then over the cases (each case weighs alike, as the per-pixel mean CE
    of a batch does). ``label_sets``: one integer array (A, *spatial) per case, its A raters."""
    total, n = 0.0, 0
    for labels in label_sets:
        labels = np.asarray(labels)
        if labels.ndim < 2 or labels.shape[0] < 1:
            raise ValueError(f"expected rater masks (A, *spatial), got shape {labels.shape}")
        h = np.zeros(labels.shape[1:], dtype=np.float64)
        for c in range(num_classes):
            f = (labels == c).mean(axis=0)
            h -= np.where(f > 0, f * np.log(np.where(f > 0, f, 1.0)), 0.0)
        total += float(h.mean())
        n += 1
    if n == 0:
        raise ValueError("no cases to compute the raters' entropy from")
    return total / n


def resolve_geco_goal(geco_cfg, label_sets: Iterable, num_classes: int) -> Optional[tuple[float, float]]:
    """``(goal, entropy)`` for ``train.geco.goal: auto`` (goal = ``goal_scale`` x :func:`rater_entropy`
    of ``label_sets``, the training cases' real raters); None when GECO is off or the goal is a number."""
    if not geco_cfg.enabled or geco_cfg.goal != "auto":
        return None
    entropy = rater_entropy(label_sets, num_classes)
    return float(geco_cfg.goal_scale) * entropy, entropy


def build_geco(geco_cfg) -> Optional[Geco]:
    """The Geco module of ``train.geco`` (None when off). A goal still ``auto`` builds one that refuses to
    train (:meth:`Geco.forward`): the trainer resolves the goal before it builds the model."""
    if not geco_cfg.enabled:
        return None
    goal = None if geco_cfg.goal == "auto" else float(geco_cfg.goal)
    return Geco(goal=goal, alpha=geco_cfg.alpha, step_size=geco_cfg.step_size, lambda_init=geco_cfg.lambda_init, lambda_min=geco_cfg.lambda_min,
                lambda_max=geco_cfg.lambda_max)
