"""A generic conditional VAE (Sohn, Lee & Yan, NeurIPS 2015).

The Probabilistic U-Net is this model specialised to segmentation: x is the
image, y a segmentation, the decoder a U-Net plus f_comb. Here x and y are any
tensors; y is modelled with independent Bernoulli likelihoods per element
(values in [0, 1], e.g. grey levels scaled to [0, 1]).

Generative model: z ~ p(z|x) (or the fixed N(0, I)), y ~ Bernoulli(sigmoid(f(x, z))).
Inference: q(z|x,y). Training minimises

    loss = E_q[-log p(y|x,z)] + beta * KL(q(z|x,y) || p(z|x)),

which with ``beta=1`` is the negative ELBO. The Gaussian and KL code is shared
with :class:`~probunet.models.prob_unet.ProbabilisticUNet` (see ``gaussian.py``).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent

from .gaussian import GaussianHead, analytic_kl, mlp, standard_gaussian

Shape = Union[int, Sequence[int]]


def _as_shape(shape: Shape) -> tuple:
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
    return shape


class MLPEncoder(nn.Module):
    """Flatten, then an MLP with a ReLU after every layer.

    (B, *in_shape) -> (B, sizes[-1]).
    """

    def __init__(self, in_shape: Shape, sizes: Sequence[int]):
        super().__init__()
        self.net = nn.Sequential(mlp([math.prod(_as_shape(in_shape)), *sizes]), nn.ReLU())
        self.out_features = int(sizes[-1])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(t.flatten(1))


class ConvEncoder(nn.Module):
    """Two stride-2 3x3 convs, flatten, a linear layer.

    (B, C, H, W) -> (B, out_features); H and W must be multiples of 4.
    """

    def __init__(self, in_shape: Sequence[int], channels: Sequence[int] = (32, 64), out_features: int = 256):
        super().__init__()
        c, h, w = _check_image_shape(in_shape)
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(c, c1, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(1), nn.Linear(c2 * (h // 4) * (w // 4), out_features), nn.ReLU(),
        )
        self.out_features = int(out_features)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(t)


class MLPDecoder(nn.Module):
    """An MLP from (B, in_features) to logits (B, *out_shape)."""

    def __init__(self, in_features: int, out_shape: Shape, hidden: Sequence[int]):
        super().__init__()
        self.out_shape = _as_shape(out_shape)
        self.net = mlp([in_features, *hidden, math.prod(self.out_shape)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).view(h.shape[0], *self.out_shape)


class ConvDecoder(nn.Module):
    """Linear to a (C2, H/4, W/4) map, two stride-2 transposed convs, a 3x3 conv.

    (B, in_features) -> logits (B, C, H, W); H and W must be multiples of 4.
    """

    def __init__(self, in_features: int, out_shape: Sequence[int], channels: Sequence[int] = (32, 64)):
        super().__init__()
        c, h, w = _check_image_shape(out_shape)
        c1, c2 = channels
        self.start = (c2, h // 4, w // 4)
        self.fc = nn.Sequential(nn.Linear(in_features, math.prod(self.start)), nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c, 3, padding=1),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(h).view(h.shape[0], *self.start))


def _check_image_shape(shape: Sequence[int]) -> tuple:
    shape = _as_shape(shape)
    if len(shape) != 3 or shape[1] % 4 or shape[2] % 4:
        raise ValueError(f"the conv encoder/decoder needs a (C, H, W) shape with H and W multiples of 4, "
                         f"got {shape}")
    return shape


class _LatentHead(nn.Module):
    """Features (B, F) -> one hidden layer -> diagonal Gaussian over z (B, latent_dim)."""

    def __init__(self, in_features: int, hidden: int, latent_dim: int):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
        self.head = GaussianHead(hidden, latent_dim)

    def forward(self, h: torch.Tensor) -> Independent:
        return self.head(self.hidden(h))


class ConditionalVAE(nn.Module):
    """Conditional VAE with a Bernoulli likelihood over y.

    Args:
        x_shape: shape of one x, e.g. ``10`` for a one-hot class or ``(1, 28, 28)``.
        y_shape: shape of one y, e.g. ``(1, 8, 8)``; values in [0, 1].
        latent_dim: dimension D of z.
        prior: ``"conditional"`` (a learned p(z|x)) or ``"standard"`` (fixed N(0, I)),
            the same option as the Probabilistic U-Net.
        beta: weight of the KL term in the loss (an attribute; may be changed
            during training, e.g. for KL warm-up).
        arch: ``"mlp"`` or ``"conv"``: the default encoder/decoder for an
            image-shaped (C, H, W) x or y. Vectors always get an MLP.
        hidden: hidden widths of the default MLPs; ``hidden[-1]`` is also the
            feature width of the default encoders and of the latent heads.
        x_encoder, y_encoder: optional modules replacing the defaults, mapping
            (B, *x_shape) -> (B, x_features) and (B, *y_shape) -> (B, y_features).
            Their widths are read from ``x_features`` / ``y_features`` or, if
            those are None, from the module's ``out_features`` attribute.
        decoder: optional module replacing the default decoder, mapping
            concat(h_x, z) (B, x_features + D) -> logits (B, *y_shape) (or
            (B, prod(y_shape)); reshaped).

    The x features h_x feed the prior net, the posterior net (with h_y) and the decoder.
    """

    def __init__(self, x_shape: Shape, y_shape: Shape, latent_dim: int = 8, *,
                 prior: str = "conditional", beta: float = 1.0, arch: str = "mlp",
                 hidden: Sequence[int] = (256, 256),
                 x_encoder: Optional[nn.Module] = None, x_features: Optional[int] = None,
                 y_encoder: Optional[nn.Module] = None, y_features: Optional[int] = None,
                 decoder: Optional[nn.Module] = None):
        super().__init__()
        if prior not in ("conditional", "standard"):
            raise ValueError(f"prior must be 'conditional' or 'standard', got {prior!r}")
        if arch not in ("mlp", "conv"):
            raise ValueError(f"arch must be 'mlp' or 'conv', got {arch!r}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        hidden = tuple(int(h) for h in hidden)
        if not hidden:
            raise ValueError("hidden must list at least one width")
        self.x_shape = _as_shape(x_shape)
        self.y_shape = _as_shape(y_shape)
        self.latent_dim = int(latent_dim)
        self.prior_type = prior
        self.beta = float(beta)

        self.x_encoder = x_encoder if x_encoder is not None else self._default_encoder(self.x_shape, arch, hidden)
        self.y_encoder = y_encoder if y_encoder is not None else self._default_encoder(self.y_shape, arch, hidden)
        fx = self._width(self.x_encoder, x_features, "x")
        fy = self._width(self.y_encoder, y_features, "y")
        self.prior_net = _LatentHead(fx, hidden[-1], self.latent_dim) if prior == "conditional" else None
        self.posterior_net = _LatentHead(fx + fy, hidden[-1], self.latent_dim)
        if decoder is None:
            if arch == "conv" and len(self.y_shape) == 3:
                decoder = ConvDecoder(fx + self.latent_dim, self.y_shape)
            else:
                decoder = MLPDecoder(fx + self.latent_dim, self.y_shape, hidden)
        self.decoder = decoder

    @staticmethod
    def _default_encoder(shape: tuple, arch: str, hidden: tuple) -> nn.Module:
        if arch == "conv" and len(shape) == 3:
            return ConvEncoder(shape, out_features=hidden[-1])
        return MLPEncoder(shape, hidden)

    @staticmethod
    def _width(module: nn.Module, given: Optional[int], name: str) -> int:
        width = given if given is not None else getattr(module, "out_features", None)
        if width is None:
            raise ValueError(f"{name}_features is required for a custom {name}_encoder without `out_features`")
        return int(width)

    # -- the three networks -------------------------------------------------

    def _check(self, t: torch.Tensor, shape: tuple, name: str) -> None:
        if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
            raise ValueError(f"{name} must be (B, {', '.join(map(str, shape))}), got {tuple(t.shape)}")

    def encode_x(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, *x_shape) -> features h_x (B, x_features)."""
        self._check(x, self.x_shape, "x")
        return self.x_encoder(x).flatten(1)

    def prior(self, x: torch.Tensor, h_x: Optional[torch.Tensor] = None) -> Independent:
        """p(z|x) for x (B, *x_shape); N(0, I) with ``prior='standard'``.

        Batch shape (B,), event shape (D,). ``h_x`` reuses already computed x features.
        """
        if self.prior_net is None:
            return standard_gaussian(x.shape[0], self.latent_dim, x.device)
        return self.prior_net(self.encode_x(x) if h_x is None else h_x)

    def posterior(self, x: torch.Tensor, y: torch.Tensor, h_x: Optional[torch.Tensor] = None) -> Independent:
        """q(z|x,y) for x (B, *x_shape), y (B, *y_shape); batch shape (B,), event (D,)."""
        self._check(y, self.y_shape, "y")
        h_x = self.encode_x(x) if h_x is None else h_x
        h_y = self.y_encoder(y).flatten(1)
        return self.posterior_net(torch.cat([h_x, h_y.to(h_x.dtype)], dim=1))

    def decode(self, h_x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """h_x (N, x_features), z (N, D) -> logits of p(y|x,z), (N, *y_shape)."""
        logits = self.decoder(torch.cat([h_x, z.to(h_x.dtype)], dim=1))
        return logits.reshape(h_x.shape[0], *self.y_shape)

    # -- training / evaluation ----------------------------------------------

    def forward(self, x: torch.Tensor, *, y: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """x (B, *x_shape), y (B, *y_shape) in [0, 1] or None.

        With ``y`` (training): z is a reparameterised sample of q(z|x,y) and the
        result holds scalars ``loss`` = ``recon`` + beta * ``kl``, where ``recon`` is
        the binary cross-entropy summed over the elements of y and ``kl`` is
        KL(q(z|x,y) || p(z|x)), both averaged over the batch; also ``logits``
        (B, *y_shape) and ``z`` (B, D).
        Without ``y``: z is sampled from the prior; returns ``logits`` and ``z``.
        """
        h_x = self.encode_x(x)
        prior = self.prior(x, h_x)
        if y is None:
            z = prior.rsample()
            return {"logits": self.decode(h_x, z), "z": z}
        posterior = self.posterior(x, y, h_x)
        z = posterior.rsample()
        logits = self.decode(h_x, z)
        recon = F.binary_cross_entropy_with_logits(logits.float(), y.float(), reduction="none").flatten(1).sum(1)
        kl = analytic_kl(posterior, prior)
        recon, kl = recon.mean(), kl.mean()
        return {"loss": recon + self.beta * kl, "recon": recon, "kl": kl, "logits": logits, "z": z}

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, y: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """ELBO per example in nats, (B,): E_q[log p(y|x,z)] - KL(q || p), with beta = 1.

        The expectation is a Monte-Carlo average over ``num_samples`` posterior draws.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        h_x = self.encode_x(x)
        q = self.posterior(x, y, h_x)
        kl = analytic_kl(q, self.prior(x, h_x))
        b, s = x.shape[0], num_samples
        z = q.rsample((s,)).transpose(0, 1).reshape(b * s, self.latent_dim)  # (B*S, D), example-major
        logits = self.decode(h_x.repeat_interleave(s, dim=0), z)
        target = y.float().repeat_interleave(s, dim=0)
        nll = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").flatten(1).sum(1)
        return -nll.view(b, s).mean(1) - kl

    @torch.no_grad()
    def sample(self, x: torch.Tensor, num_samples: int, *, logits: bool = False, mean: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw ``num_samples`` outputs per x from p(y|x,z), z ~ p(z|x).

        x (B, *x_shape) -> (B, S, *y_shape): the Bernoulli means sigmoid(f(x, z))
        in [0, 1], or the logits f(x, z) with ``logits=True``. Use
        ``torch.bernoulli`` on the means for binary draws. ``mean=True`` uses the
        prior mean for every z. ``generator`` (a CPU generator) makes the draw
        reproducible independently of the global RNG.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        h_x = self.encode_x(x)
        prior = self.prior(x, h_x)
        loc, scale = prior.base_dist.loc, prior.base_dist.scale  # (B, D) fp32
        b, s = x.shape[0], num_samples
        if mean:
            eps = torch.zeros(b, s, self.latent_dim, device=loc.device)
        else:
            eps = torch.randn(b, s, self.latent_dim, generator=generator,
                              device=generator.device if generator is not None else loc.device).to(loc.device)
        z = (loc.unsqueeze(1) + scale.unsqueeze(1) * eps).reshape(b * s, self.latent_dim)
        out = self.decode(h_x.repeat_interleave(s, dim=0), z).view(b, s, *self.y_shape)
        return out if logits else torch.sigmoid(out)
