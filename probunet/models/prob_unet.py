"""The Probabilistic U-Net (Kohl et al., NeurIPS 2018)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Independent

from ..config import check_number
from ..errors import ConfigError
from .losses import balanced_kl_dims, balanced_kl_objective, elbo_loss
from ._cpu import cpu_parallel_map, split_over_threads, to_channels_last
from .base import DEFAULTS as D, LossSettings, SegmentationModel, loss_settings_from, pick_raters  # noqa: F401
from .fcomb import Fcomb
from .gaussian import GaussianHead, analytic_kl, standard_gaussian
from .init import init_weights
from .registry import MODEL_LIMITS, build_model, register_model  # noqa: F401  (build_model: the one builder, re-exported)
from .scripted import EncoderPort, ScriptSampler, UNetPort, randn_from, shared_rows
from .spec import ModelKey, ModelSpec, choice, key_defaults
from .unet import Encoder, UNet


def _limit(key: str, value, model_cfg) -> None:
    lo, hi = MODEL_LIMITS[key.split(".")[-1]]
    if not lo <= value <= hi:
        raise ConfigError(f"config key '{key}': must be in [{lo}, {hi}], got {value}")


def _check_foreground_prior(key: str, value, model_cfg) -> None:
    check_number(key, value, lo=0, lo_open=True, hi=1, hi_open=True, optional=True)


# model.* keys of the Probabilistic U-Net
KEYS = (
    ModelKey("latent_dim", int, 6, "size of the latent z", _limit),
    ModelKey("fcomb_layers", int, 4, "1x1 conv layers of f_comb", _limit),
    ModelKey("prior", str, "conditional", "conditional (prior net on the image) | standard (N(0, I))",
             choice("conditional", "standard")),
    ModelKey("foreground_prior", Optional[float], None,
             "the foreground probability the logits start at (f_comb's last bias at its log-odds, its weights "
             "x0.1); null: off. Small lesions in 3D patches need it (docs/volumes.md)", _check_foreground_prior,
             card=False),
)
K = key_defaults(KEYS)


@dataclass
class ProbUNetOutput:
    """What :meth:`ProbabilisticUNet.forward` returns.

    logits (B, C, *spatial); prior / posterior: distributions with batch_shape (B,)
    and event_shape (latent_dim,), posterior None without ``seg``; kl (B,)
    KL(q(z|x,y) || p(z|x)) or None without ``seg``; z (B, latent_dim) the latent used;
    kl_dims (B, latent_dim) the KL per latent dimension (``kl`` is its sum), None
    without ``seg``.
    """

    logits: torch.Tensor
    prior: Independent
    posterior: Optional[Independent]
    kl: Optional[torch.Tensor]
    z: torch.Tensor
    kl_dims: Optional[torch.Tensor] = None


class LatentEncoder(nn.Module):
    """Prior net p(z|x) or posterior net q(z|x,y): the U-Net's encoder shape,
    spatial mean, then a projection to mu and log-sigma.

    input (B, C, *spatial) -> distribution with batch_shape (B,), event (latent_dim,).
    """

    def __init__(self, spatial_dims: int, in_channels: int, features: Sequence[int],
                 latent_dim: int, convs_per_level: int = 3, norm: Optional[str] = None):
        super().__init__()
        self.encoder = Encoder(spatial_dims, in_channels, features, convs_per_level, norm=norm)
        self.head = GaussianHead(features[-1], latent_dim)

    def forward(self, x: torch.Tensor) -> Independent:
        if split_over_threads(self, x):  # CPU inference: image by image on threads
            pooled = torch.cat(cpu_parallel_map(self._pooled, x.split(1)))
        else:
            pooled = self._pooled(x)
        with torch.autocast(x.device.type, enabled=False):  # mu and log-sigma in fp32, also under autocast
            return self.head(pooled.float())

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)[-1]
        return feats.flatten(2).float().mean(dim=2)  # (B, C): spatial mean, fp32


class ProbabilisticUNet(SegmentationModel):
    """Conditional VAE around a U-Net for sampling plausible segmentations.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels C_in.
        num_classes: label classes C, background included (>= 2).
        features: channels per U-Net level (also the prior/posterior encoders).
        latent_dim: dimension of z.
        fcomb_layers: number of 1x1 convs in f_comb, the last giving logits.
        prior: ``"conditional"`` (p(z|x), a prior net as in Kohl et al.) or
            ``"standard"`` (fixed N(0, I)).
        convs_per_level: 3x3 convs per level (3 in the reference).
        norm: None (reference) or a MONAI norm name.
        init: weight initialisation of every convolution (U-Net, both latent
            encoders, f_comb): ``"he_normal"`` (reference code; default) or
            ``"torch"`` (PyTorch's default); see :mod:`probunet.models.init`.
            The mu / log-sigma heads keep their own near-zero start.
        foreground_prior: None (off) or the foreground probability the logits start
            at (:meth:`~probunet.models.fcomb.Fcomb.start_at_prior`): for rare foreground,
            as small lesions in 3D patches, where without it the latent runs off.
    """

    has_mean_sample = True  # sample(mean=True): every sample at the prior mean

    def __init__(self, spatial_dims: int = D.spatial_dims, in_channels: int = D.in_channels,
                 num_classes: int = D.num_classes, features: Sequence[int] = D.features,
                 latent_dim: int = K.latent_dim, fcomb_layers: int = K.fcomb_layers, prior: str = K.prior,
                 convs_per_level: int = D.convs_per_level, norm: Optional[str] = D.norm, init: str = D.init,
                 foreground_prior: Optional[float] = None):
        super().__init__()
        if prior not in ("conditional", "standard"):
            raise ValueError(f"prior must be 'conditional' or 'standard', got {prior!r}")
        self.init_interface(spatial_dims, in_channels, num_classes, features)
        self.latent_dim = latent_dim
        self.prior_type = prior
        self.unet = UNet(spatial_dims, in_channels, features, convs_per_level, norm=norm, init=init)
        self.prior_net = (LatentEncoder(spatial_dims, in_channels, features, latent_dim, convs_per_level, norm)
                          if prior == "conditional" else None)
        self.posterior_net = LatentEncoder(spatial_dims, in_channels + num_classes, features, latent_dim,
                                           convs_per_level, norm)
        self.fcomb = Fcomb(spatial_dims, self.unet.out_channels, latent_dim, num_classes, fcomb_layers)
        for part in (self.posterior_net.encoder, self.fcomb,
                     self.prior_net.encoder if self.prior_net is not None else None):
            if part is not None:
                init_weights(part, init)
        if foreground_prior is not None:
            self.fcomb.start_at_prior(float(foreground_prior))

    # -- the model interface (probunet.models.base.SegmentationSampler) -----------

    @property
    def noise_shape(self) -> tuple:
        """Shape of one sample's standard-normal draw: the latent ``eps`` (latent_dim,)."""
        return (self.latent_dim,)

    def training_loss(self, image: torch.Tensor, labels: torch.Tensor, *, step: int,
                      num_raters: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """The training objective of one batch.

        image (B, C_in, *spatial); labels (B, A, *spatial) integer maps of all raters,
        of which the first ``num_raters[b]`` are real (all when None). The targets are
        chosen by :func:`probunet.models.base.pick_raters` (``loss_settings.rater``;
        ``generator`` draws the random rater). The loss is the negative ELBO
        (:func:`probunet.models.losses.elbo_loss`, beta with its warm-up at ``step``) or,
        with ``loss_settings.geco``, the GECO objective (which updates its lambda).

        Returns scalars ``loss``, ``ce_sum``, ``ce_mean``, ``kl`` (and ``geco_lambda``),
        as the loss functions do; call under autocast for mixed precision (the loss
        itself is computed in fp32).
        """
        ls = self.loss_settings
        image, target = pick_raters(image, labels, ls.rater, num_raters=num_raters, generator=generator)
        out = self(image, seg=target)
        kl_term = None
        if ls.kl_balance is not None:
            q, p = out.posterior.base_dist, out.prior.base_dist
            to_prior, to_posterior = balanced_kl_dims(q.loc, q.scale, p.loc, p.scale)
            kl_term = balanced_kl_objective(to_prior, to_posterior, ls.kl_balance, ls.free_bits)
        if ls.geco is not None:
            return ls.geco(out.logits, target, out.kl, kl_dims=out.kl_dims, free_bits=ls.free_bits,
                           kl_term=kl_term)
        return elbo_loss(out.logits, target, out.kl, beta=self.beta_at(step), kl_dims=out.kl_dims,
                         free_bits=ls.free_bits, kl_term=kl_term)

    def sample_context(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The image-level conditioning of :meth:`sample`: the prior's ``loc`` and ``scale`` (B, D), fp32.

        The prior net pools globally, so any size that is a multiple of
        :attr:`divisor` is valid: for sliding windows it runs once on the whole
        image and each window is sampled with ``context=`` these rows.
        """
        self.check_input(image)
        with self.sampling_context():
            prior = self.prior(image)
            return {"loc": prior.base_dist.loc.float(), "scale": prior.base_dist.scale.float()}

    def prior(self, image: torch.Tensor) -> Independent:
        """p(z|x) for image (B, C_in, *spatial); N(0, I) with ``prior='standard'``."""
        if self.prior_net is None:
            return standard_gaussian(image.shape[0], self.latent_dim, image.device)
        return self.prior_net(image)

    def posterior(self, image: torch.Tensor, seg: torch.Tensor) -> Independent:
        """q(z|x,y): image (B, C_in, *spatial), seg (B, *spatial) integer labels."""
        # one-hot by comparison: F.one_hot checks the label range on the host (a GPU sync per step)
        classes = torch.arange(self.num_classes, device=seg.device).view(1, -1, *([1] * (seg.dim() - 1)))
        onehot = (seg.unsqueeze(1) == classes).to(image.dtype)  # (B, C, *spatial)
        return self.posterior_net(torch.cat([image, onehot], dim=1))

    def forward(self, image: torch.Tensor, *, seg: Optional[torch.Tensor] = None) -> ProbUNetOutput:
        """image (B, C_in, *spatial), seg (B, *spatial) integer labels or None.

        With ``seg``, z is a reparameterised sample of the posterior (training);
        without, a sample of the prior. The latent distributions, z and the KL are
        fp32 also under autocast.
        """
        self.check_input(image)
        features = self.unet(image)
        prior = self.prior(image)
        posterior = kl = kl_dims = None
        if seg is not None:
            if seg.shape != (image.shape[0], *image.shape[2:]):
                raise ValueError(f"seg must be (B, *spatial) = {(image.shape[0], *image.shape[2:])}, "
                                 f"got {tuple(seg.shape)}")
            posterior = self.posterior(image, seg)
            with torch.autocast(image.device.type, enabled=False):
                z = posterior.rsample()
                kl_dims = analytic_kl(posterior.base_dist, prior.base_dist)  # (B, D)
                kl = kl_dims.sum(dim=1)
        else:
            with torch.autocast(image.device.type, enabled=False):
                z = prior.rsample()
        logits = self.fcomb(features, z)
        return ProbUNetOutput(logits=logits, prior=prior, posterior=posterior, kl=kl, z=z, kl_dims=kl_dims)

    def sample(self, image: torch.Tensor, num_samples: int, *, chunk_size: Optional[int] = 32,
               generator: Optional[torch.Generator] = None, mean: bool = False,
               noise: Optional[torch.Tensor] = None, context: Optional[Dict[str, Any]] = None,
               start: int = 0) -> torch.Tensor:
        """Draw ``num_samples`` segmentations per image from the prior.

        image (B, C_in, *spatial) -> logits (B, S, C, *spatial).

        The U-Net and the prior net run once per image; only f_comb runs per
        sample, all samples of a chunk of ``chunk_size`` in one batched call (None:
        all at once), written into one preallocated output, so memory is the
        output plus one chunk's intermediates (on a CPU without autograd, a few
        cache-sized tiles). All latents are drawn up front, so the result does
        not depend on ``chunk_size``. With ``mean=True`` every sample uses the
        prior mean instead (a deterministic segmentation). Runs under
        ``torch.inference_mode`` when gradients are disabled or the model is in
        eval mode.

        ``noise`` (B, S, latent_dim), optional: the standard-normal draws ``eps``
        themselves (``z = mu + sigma * eps``) instead of drawing them from
        ``generator``. ``context``, optional: :meth:`sample_context` of the image
        (or of a larger image this one is a window of) instead of the prior of
        ``image`` itself. ``start``: the index of the first sample among the image's samples
        (unused: the samples are exchangeable; see :mod:`probunet.models.base`).
        """
        return super().sample(image, num_samples, chunk_size=chunk_size, generator=generator, noise=noise,
                              context=context, mean=mean, start=start)

    def prepare_samples(self, image: torch.Tensor, num_samples: int, *, generator: Optional[torch.Generator],
                        noise: Optional[torch.Tensor], context: Optional[Dict[str, Any]], mean: bool):
        """The U-Net, the prior (or ``context``) and every latent, once; the draws run f_comb only."""
        b, dev = image.shape[0], image.device
        if noise is not None:
            if tuple(noise.shape) != (b, num_samples, self.latent_dim):
                raise ValueError(f"noise must be (B, S, latent_dim) = ({b}, {num_samples}, {self.latent_dim}), "
                                 f"got {tuple(noise.shape)}")
            eps = noise.to(dev, torch.float32)
        elif mean:
            eps = torch.zeros(b, num_samples, self.latent_dim, device=dev)
        elif generator is None or generator.device.type == dev.type:
            eps = torch.randn(b, num_samples, self.latent_dim, device=dev, generator=generator)
        else:
            eps = torch.randn(b, num_samples, self.latent_dim, generator=generator).to(dev)
        if dev.type == "cpu" and self.spatial_dims == 2:
            image = to_channels_last(image)  # ~2x faster convs on CPU (oneDNN)
        features = self.unet(image)
        if context is None:
            prior = self.prior(image)
            loc, scale = prior.base_dist.loc, prior.base_dist.scale  # (B, D) fp32
        else:
            loc, scale = context["loc"].to(dev, torch.float32), context["scale"].to(dev, torch.float32)
            if loc.shape != (b, self.latent_dim) or scale.shape != (b, self.latent_dim):
                raise ValueError(f"context loc/scale must be (B, latent_dim) = ({b}, {self.latent_dim}), "
                                 f"got {tuple(loc.shape)} and {tuple(scale.shape)}")
        z = loc.unsqueeze(1) + scale.unsqueeze(1) * eps  # (B, S, D)
        feat_term = self.fcomb.feature_term(features)  # (B, F, *spatial), once per image
        return lambda start, n, out: self.fcomb.combine(feat_term, z[:, start:start + n], out=out)


def build_prob_unet(model_cfg, train_cfg=None) -> ProbabilisticUNet:
    """``model.name: prob_unet``: a :class:`ProbabilisticUNet` from a :class:`probunet.config.ModelConfig`,
    with the loss settings of ``train_cfg`` when given."""
    model = ProbabilisticUNet(
        spatial_dims=model_cfg.spatial_dims, in_channels=model_cfg.in_channels,
        num_classes=model_cfg.num_classes, features=tuple(model_cfg.features),
        latent_dim=model_cfg.latent_dim, fcomb_layers=model_cfg.fcomb_layers,
        prior=model_cfg.prior, convs_per_level=model_cfg.convs_per_level, norm=model_cfg.norm,
        init=getattr(model_cfg, "init", D.init), foreground_prior=getattr(model_cfg, "foreground_prior", None),
    )
    return model.configure_loss(loss_settings_from(train_cfg))


# ----------------------------------------------------------------------------- the exported sampler and the spec


class ProbUNetSampler(ScriptSampler):
    """The Probabilistic U-Net: U-Net and prior once per image, f_comb once per sample (all S in one
    batched call: ``W_f * features`` once, ``W_z * z + b`` per sample, then the 1x1 layers)."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.latent_dim = int(model.latent_dim)
        self.unet = UNetPort(model.unet)
        self.has_prior: bool = model.prior_net is not None
        if model.prior_net is not None:
            self.prior_encoder = EncoderPort(model.prior_net.encoder)
            self.prior_proj = model.prior_net.head.proj
        else:
            self.prior_encoder = EncoderPort(model.posterior_net.encoder)  # unused; keeps the type fixed
            self.prior_proj = nn.Linear(1, 2 * self.latent_dim)
        fc = model.fcomb
        f = int(fc.feature_channels)
        w = fc.first.weight.detach()
        # the first 1x1 conv of f_comb over [features; z], split as in probunet.models.fcomb
        self.w_feat = nn.Parameter(w[:, :f].reshape(w.shape[0], f, *([1] * self.spatial_dims)).clone(),
                                   requires_grad=False)
        self.w_z = nn.Parameter(w[:, f:].clone(), requires_grad=False)
        self.b_z = nn.Parameter(fc.first.bias.detach().clone(), requires_grad=False)
        self.rest = nn.Sequential(*list(fc.rest))  # ReLU, 1x1 conv, ..., 1x1 conv to logits

    def _context(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        if not self.has_prior:
            loc = torch.zeros([b, self.latent_dim], device=x.device)
            return torch.stack([loc, torch.ones_like(loc)], dim=1)
        feats = self.prior_encoder(x)[-1]
        pooled = feats.flatten(2).float().mean(dim=2)  # (B, F): spatial mean
        params = self.prior_proj(pooled)
        mu = params[:, : self.latent_dim]
        log_sigma = params[:, self.latent_dim:].clamp(-10.0, 10.0)
        return torch.stack([mu, torch.exp(log_sigma)], dim=1)  # (B, 2, D)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        b = x.shape[0]
        if noise is not None:
            eps = shared_rows(noise.to(x.device, torch.float32), b)
        else:
            eps = randn_from([b, num_samples, self.latent_dim], g, x.device)
        features = self.unet(x)
        ctx = self._context(x) if context is None else shared_rows(context.to(x.device, torch.float32), b)
        z = ctx[:, 0].unsqueeze(1) + ctx[:, 1].unsqueeze(1) * eps  # (B, S, D)
        if self.spatial_dims == 2:
            feat_term = F.conv2d(features, self.w_feat)
        else:
            feat_term = F.conv3d(features, self.w_feat)
        bias = F.linear(z, self.w_z, self.b_z)  # (B, S, F_out)
        bias = bias.reshape([b, num_samples, bias.shape[2]] + [1] * self.spatial_dims)
        h = (feat_term.unsqueeze(1) + bias).flatten(0, 1)  # (B*S, F_out, *sp)
        out = self.rest(h)  # (B*S, C, *sp)
        return out.reshape([b, num_samples] + list(out.shape[1:]))


register_model(ModelSpec(
    name="prob_unet", model_class=ProbabilisticUNet, build=build_prob_unet, keys=KEYS, samples="latent",
    sampler=ProbUNetSampler, noise_dim=lambda model: int(model.latent_dim),
    doc="the Probabilistic U-Net (Kohl et al. 2018)"))
