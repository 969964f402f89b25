"""``phiseg``: Probabilistic Hierarchical Segmentation (Baumgartner et al., MICCAI 2019).

Segmentations s are generated from a hierarchy of spatial latent variables
z_1 .. z_L (``latent_levels``), z_l at 1/2^(l-1) of the image resolution (z_1
at full resolution, z_L the coarsest), each a diagonal Gaussian per position:

    prior      p(z | x)    = p(z_L | x)    prod_{l<L} p(z_l | z_{l+1}, x)
    posterior  q(z | x, y) = q(z_L | x, y) prod_{l<L} q(z_l | z_{l+1}, x, y)
    likelihood p(s | z)    = prod_l p(s_l | z_l, ..., z_L)

The prior and posterior nets are encoders of x (resp. [x, one-hot y]) over all
levels of ``features``; the coarsest latent level gets the encoder's features
passed down from the levels above it, and at every finer level l the mean and
scale of z_l come from the encoder's features at that level concatenated with
the (convolved) upsampled z_{l+1}. The likelihood net sees only the latents:
g_L = f(z_L), g_l = f([f(z_l), up(g_{l+1})]), and each level gives its own
segmentation logits s_l = W_l g_l, upsampled to full resolution; s_1 (full
resolution) is the prediction and what :meth:`PHiSeg.sample` returns.

Training (z drawn from the posterior, the prior evaluated at the posterior's
z_{l+1}) minimises

    sum_l CE(up(s_l), y)  +  beta * sum_l KL( q(z_l | z_{l+1}, x, y) || p(z_l | z_{l+1}, x) ),

CE summed over pixels, each level's KL summed over channels and positions
(analytic, fp32), both averaged over the batch: a likelihood at each level.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ..base import SegmentationModel, loss_settings_from, pick_raters
from ..registry import register_model
from ..scripted import EncoderPort, ScriptSampler, chunk_of, latent_draw, upsample as script_upsample
from ._common import LATENT_CHANNELS_KEY, LATENT_LEVELS_KEY
from ..spec import ModelSpec, key_defaults, seeded_refusal
from ..init import init_weights
from ..unet import Encoder, conv_block
from ._common import (DEFAULTS as D, check_latent_levels, common_args, conv1x1, latent_level, map_kl, onehot,
                      option, upsample)

LATENT_LEVELS = 5  # model.latent_levels of phiseg when the config leaves it null (at most len(features))


# model.* keys of PHiSeg
KEYS = (LATENT_LEVELS_KEY, LATENT_CHANNELS_KEY)
K = key_defaults(KEYS)


class LatentHierarchy(nn.Module):
    """The prior (or posterior) net: encoder, then z_L .. z_1 top-down, each conditioned on the one above.

    Latent index j = 0 .. L-1 runs from the coarsest (z_L, scale L-1) to the finest (z_1, scale 0).
    """

    def __init__(self, spatial_dims: int, in_channels: int, features: Sequence[int], latent_levels: int,
                 latent_channels: int, convs_per_level: int, norm: Optional[str]):
        super().__init__()
        f = tuple(features)
        n, self.latent_levels = len(f), latent_levels
        self.encoder = Encoder(spatial_dims, in_channels, f, convs_per_level, norm=norm)
        # context from the levels above the coarsest latent scale (L - 1), passed down
        self.context = nn.ModuleList(conv_block(spatial_dims, f[s + 1] + f[s], f[s], convs_per_level, norm=norm)
                                     for s in range(n - 2, latent_levels - 2, -1))
        scales = [latent_levels - 1 - j for j in range(latent_levels)]
        self.z_in = nn.ModuleList(conv_block(spatial_dims, latent_channels, f[s], 1, norm=norm) for s in scales[1:])
        self.combine = nn.ModuleList(conv_block(spatial_dims, 2 * f[s], f[s], convs_per_level, norm=norm)
                                     for s in scales[1:])
        self.heads = nn.ModuleList(conv1x1(spatial_dims, f[s], 2 * latent_channels) for s in scales)

    def encode(self, x: Tensor) -> List[Tensor]:
        """Encoder features per level, the coarsest latent level's replaced by the context passed down."""
        skips = self.encoder(x)
        h = skips[-1]
        for k, block in enumerate(self.context):
            skip = skips[len(skips) - 2 - k]
            h = block(torch.cat([upsample(h, skip.shape[2:]), skip], dim=1))
        return skips[:self.latent_levels - 1] + [h]

    def latents(self, feats: List[Tensor], *, repeats: int = 1, z: Optional[List[Tensor]] = None,
                generator: Optional[torch.Generator] = None, mean: bool = False):
        """Gaussians and latents of every level (coarsest first) for ``repeats`` copies of each image;
        ``z`` given: conditioned on those (teacher forcing) instead of on its own draws."""
        rep = (lambda t: t.repeat_interleave(repeats, dim=0)) if repeats > 1 else (lambda t: t)
        gaussians, zs = [], []
        for j in range(self.latent_levels):
            skip = rep(feats[self.latent_levels - 1 - j])
            if j == 0:
                h = skip
            else:
                above = (z if z is not None else zs)[j - 1]
                h = self.combine[j - 1](torch.cat([skip, self.z_in[j - 1](upsample(above.to(skip.dtype),
                                                                                   skip.shape[2:]))], dim=1))
            mu, sigma, zj = latent_level(self.heads[j], h, None if z is None else z[j], mean, generator)
            gaussians.append((mu, sigma))
            zs.append(zj)
        return gaussians, zs


class Likelihood(nn.Module):
    """p(s | z): g_L = f(z_L), g_l = f([f(z_l), up(g_{l+1})]); logits s_l = W_l g_l at each level."""

    def __init__(self, spatial_dims: int, features: Sequence[int], latent_levels: int, latent_channels: int,
                 num_classes: int, convs_per_level: int, norm: Optional[str]):
        super().__init__()
        f = tuple(features)
        scales = [latent_levels - 1 - j for j in range(latent_levels)]
        self.z_in = nn.ModuleList(conv_block(spatial_dims, latent_channels, f[s], convs_per_level, norm=norm)
                                  for s in scales)
        self.merge = nn.ModuleList(conv_block(spatial_dims, f[s + 1] + f[s], f[s], convs_per_level, norm=norm)
                                   for s in scales[1:])
        self.heads = nn.ModuleList(conv1x1(spatial_dims, f[s], num_classes) for s in scales)

    def forward(self, zs: List[Tensor], dtype=None) -> List[Tensor]:
        """Latents (coarsest first) -> logits of every level at its own resolution (coarsest first)."""
        outs, g = [], None
        for j, zj in enumerate(zs):
            h = self.z_in[j](zj if dtype is None else zj.to(dtype))
            g = h if g is None else self.merge[j - 1](torch.cat([upsample(g, h.shape[2:]), h], dim=1))
            outs.append(self.heads[j](g))
        return outs


class PHiSeg(SegmentationModel):
    """PHiSeg; see the module docstring."""

    def __init__(self, spatial_dims: int = D.spatial_dims, in_channels: int = D.in_channels,
                 num_classes: int = D.num_classes, features: Sequence[int] = D.features,
                 convs_per_level: int = D.convs_per_level, norm: Optional[str] = D.norm, init: str = D.init,
                 latent_levels: int = LATENT_LEVELS,
                 latent_channels: int = K.latent_channels):
        super().__init__()
        feats = self.init_interface(spatial_dims, in_channels, num_classes, features)
        check_latent_levels(latent_levels, len(feats))
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
        self.latent_levels, self.latent_channels = int(latent_levels), int(latent_channels)
        args = (feats, self.latent_levels, self.latent_channels)
        self.prior_net = LatentHierarchy(spatial_dims, in_channels, *args, convs_per_level, norm)
        self.posterior_net = LatentHierarchy(spatial_dims, in_channels + num_classes, *args, convs_per_level, norm)
        self.likelihood = Likelihood(spatial_dims, *args, num_classes, convs_per_level, norm)
        init_weights(self, init)
        with torch.no_grad():
            for head in (*self.prior_net.heads, *self.posterior_net.heads):  # latents start near N(0, I)
                nn.init.normal_(head.weight, std=1e-3)
                nn.init.zeros_(head.bias)

    def forward(self, image: Tensor, seg: Tensor) -> Dict[str, object]:
        """Training pass: image (B, C_in, *spatial), seg (B, *spatial) -> dict with ``level_logits`` (each
        level's logits upsampled to full resolution, coarsest first; the last is the prediction),
        ``prior`` / ``posterior`` ((mu, sigma) per level), ``z``, ``kl_levels`` (B, L), ``kl`` (B,)."""
        self.check_input(image)
        post_in = torch.cat([image, onehot(seg, self.num_classes, image.dtype)], dim=1)
        posterior, z = self.posterior_net.latents(self.posterior_net.encode(post_in))
        prior, _ = self.prior_net.latents(self.prior_net.encode(image), z=z)
        outs = [upsample(o, image.shape[2:]) if o.shape[2:] != image.shape[2:] else o
                for o in self.likelihood(z, image.dtype)]
        kl_levels = torch.stack([map_kl(q, p) for q, p in zip(posterior, prior)], dim=1)
        return {"level_logits": outs, "prior": prior, "posterior": posterior, "z": z, "kl_levels": kl_levels,
                "kl": kl_levels.sum(dim=1)}

    def training_loss(self, image: Tensor, labels: Tensor, *, step: int, num_raters: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """sum_l CE_l + beta * sum_l KL_l (see the module docstring); also ``ce_sum`` / ``ce_mean`` of the
        prediction (the finest level), ``ce_level<l>`` and ``kl_level<l>`` (index 0 the coarsest)."""
        ls = self.loss_settings
        image, target = pick_raters(image, labels, ls.rater, num_raters=num_raters, generator=generator)
        out = self(image, target)
        ce = [F.cross_entropy(o.float(), target.long(), reduction="none").flatten(1) for o in out["level_logits"]]
        ce_sums = torch.stack([c.sum(dim=1).mean() for c in ce])  # (L,)
        kl_levels = out["kl_levels"].mean(dim=0)  # (L,)
        beta = self.beta_at(step)
        terms = {"loss": ce_sums.sum() + beta * kl_levels.sum(), "ce_sum": ce_sums[-1], "ce_mean": ce[-1].mean(),
                 "kl": out["kl"].mean()}
        for level in range(self.latent_levels):
            terms[f"ce_level{level}"] = ce_sums[level].detach()
            terms[f"kl_level{level}"] = kl_levels[level].detach()
        return terms

    has_mean_sample = True  # sample(mean=True): every z_l the prior mean

    def prepare_samples(self, image: Tensor, num_samples: int, *, generator: Optional[torch.Generator],
                        noise=None, context=None, mean: bool = False):
        """The prior net's encoder once per image; each chunk of :meth:`sample` is the finest level's
        prediction for ``n`` latent draws per image from the prior hierarchy (``generator``; ``mean``:
        every z_l the prior mean)."""
        feats, b = self.prior_net.encode(image), image.shape[0]

        def draw_chunk(start: int, n: int, out: Optional[Tensor]) -> Tensor:
            zs = self.prior_net.latents(feats, repeats=n, generator=generator, mean=mean)[1]
            logits = self.likelihood(zs, image.dtype)[-1]
            return logits.view(b, n, *logits.shape[1:])

        return draw_chunk


def build_phiseg(model_cfg, train_cfg=None) -> PHiSeg:
    """``model.name: phiseg``; options ``model.latent_levels`` (null: :data:`LATENT_LEVELS`, at most
    len(features)) and ``model.latent_channels``. Trains with its ELBO (``train.beta``, ``train.kl_warmup_steps``)."""
    args = common_args(model_cfg)
    settings = loss_settings_from(train_cfg)
    if settings.geco is not None:
        raise ConfigError("train.geco.enabled: phiseg trains with its own multi-level ELBO; set it to false")
    levels = option(model_cfg, "latent_levels", int, min(LATENT_LEVELS, len(args["features"])))
    model = PHiSeg(**args, latent_levels=levels, latent_channels=option(model_cfg, "latent_channels", int))
    return model.configure_loss(settings)


# ----------------------------------------------------------------------------- the exported sampler and the spec


class _PhisegStage(nn.Module):
    """Latent level j of PHiSeg: the prior's [z_in, combine] and head, the likelihood's z_in, [merge], head."""

    def __init__(self, z_in: Optional[nn.Module], combine: Optional[nn.Module], head: nn.Module,
                 lik_in: nn.Module, lik_merge: Optional[nn.Module], lik_head: nn.Module):
        super().__init__()
        self.conditioned: bool = z_in is not None
        self.z_in = z_in if z_in is not None else nn.Identity()
        self.combine = combine if combine is not None else nn.Identity()
        self.head = head
        self.lik_in = lik_in
        self.has_merge: bool = lik_merge is not None
        self.lik_merge = lik_merge if lik_merge is not None else nn.Identity()
        self.lik_head = lik_head


class PHiSegSampler(ScriptSampler):
    """``phiseg``: the prior hierarchy's encoder once; per chunk, z_L .. z_1 drawn coarsest first, then the
    likelihood net's finest logits."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        prior, lik = model.prior_net, model.likelihood
        self.encoder = EncoderPort(prior.encoder)
        self.context_blocks = prior.context
        self.latent_levels: int = int(prior.latent_levels)
        stages = []
        for j in range(self.latent_levels):
            stages.append(_PhisegStage(prior.z_in[j - 1] if j > 0 else None, prior.combine[j - 1] if j > 0 else None,
                                       prior.heads[j], lik.z_in[j], lik.merge[j - 1] if j > 0 else None,
                                       lik.heads[j]))
        self.stages = nn.ModuleList(stages)
        self.chunk: int = chunk_of(model)

    def _features(self, x: Tensor) -> List[Tensor]:
        skips = self.encoder(x)
        h = skips[-1]
        k = 0
        for block in self.context_blocks:
            skip = skips[len(skips) - 2 - k]
            h = block(torch.cat([script_upsample(h, skip.shape[2:]), skip], dim=1))
            k += 1
        feats: List[Tensor] = []
        for i in range(self.latent_levels - 1):
            feats.append(skips[i])
        feats.append(h)
        return feats

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        feats = self._features(x)
        b = x.shape[0]
        chunks: List[Tensor] = []
        for start in range(0, num_samples, self.chunk):
            n = min(self.chunk, num_samples - start)
            zs: List[Tensor] = []
            j = 0
            for stage in self.stages:  # the prior hierarchy, coarsest first
                skip = feats[self.latent_levels - 1 - j].repeat_interleave(n, dim=0)
                if stage.conditioned:
                    above = zs[j - 1]
                    h = stage.combine(torch.cat([skip, stage.z_in(script_upsample(above.to(skip.dtype),
                                                                             skip.shape[2:]))], dim=1))
                else:
                    h = skip
                zs.append(latent_draw(stage.head(h.float()), g))
                j += 1
            out = torch.zeros([1])
            gl = torch.zeros([1])
            j = 0
            for stage in self.stages:  # the likelihood, coarsest first; the finest logits are the sample
                hl = stage.lik_in(zs[j].to(x.dtype))
                if stage.has_merge:
                    gl = stage.lik_merge(torch.cat([script_upsample(gl, hl.shape[2:]), hl], dim=1))
                else:
                    gl = hl
                out = stage.lik_head(gl)
                j += 1
            chunks.append(out.reshape([b, n] + list(out.shape[1:])))
        return torch.cat(chunks, dim=1)


register_model(ModelSpec(
    name="phiseg", model_class=PHiSeg, build=build_phiseg, keys=KEYS, samples="latent", sampler=PHiSegSampler,
    onnx_refusal=seeded_refusal("phiseg", "draws a latent map at every level of its hierarchy"),
    doc="PHiSeg (Baumgartner et al. 2019)"))
