"""``hpu_net``: the hierarchical Probabilistic U-Net (Kohl et al. 2019, arXiv 1905.13077).

A U-Net of residual blocks whose decoder carries a hierarchy of spatial latent
variables at its ``latent_levels`` coarsest scales. At latent scale l the
decoder state h_l gives (1x1 conv) a diagonal Gaussian with per-position
mean and scale; z_l is drawn from it and concatenated with h_l, and the decoder
goes on upsampling, so every z_l is conditioned on z_<l:

    prior      p(z | x)    = prod_l p(z_l | z_<l, x)          (the U-Net on x)
    posterior  q(z | x, y) = prod_l q(z_l | z_<l, x, y)       (a second net on [x, one-hot y])

The prior net's decoder continues to full resolution and gives the logits,
so it is also the likelihood p(y | z, x). In training the prior net is fed the
posterior's draws z_l ~ q (its decoder is "teacher-forced"), so both
distributions at level l are conditioned on the same z_<l and

    KL = sum_l KL( q(z_l | z_<l, x, y) || p(z_l | z_<l, x) ),

each level's KL summed over channels and positions (analytic, diagonal
Gaussians, fp32). The objective is GECO (Rezende & Viola 2018;
:class:`probunet.models.losses.Geco`, when ``train.geco.enabled``): minimise KL
subject to the reconstruction constraint CE <= kappa, lambda (CE - kappa) + KL;
otherwise the ELBO, CE summed over pixels + beta KL. The reconstruction term
can be a top-k loss (``topk_fraction`` < 1): of each image's per-pixel CE
terms of the (stochastic, posterior-sampled) reconstruction only the
ceil(k N) largest are kept, concentrating the gradient on the pixels that are
worst explained.

Residual blocks are pre-activation: x -> W_skip x + conv(relu(conv(relu(x)))),
W_skip a 1x1 conv when the channel count changes (identity otherwise). Every
convolution starts He-normal (:func:`probunet.models.init.init_weights`), the
last of each residual branch scaled by ``RESIDUAL_INIT_SCALE`` (the network has
no normalisation, so the residual sums would otherwise grow level by level), and
the latent heads start near zero (each z_l near N(0, I), KL near 0).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from monai.networks.layers.factories import Pool

from ...config import check_number
from ..losses import elbo_loss
from ..base import SegmentationModel, loss_settings_from, pick_raters
from ..registry import register_model
from ..scripted import ScriptSampler, chunk_of, latent_draw, upsample as script_upsample
from ._common import LATENT_CHANNELS_KEY, LATENT_LEVELS_KEY
from ..spec import ModelKey, ModelSpec, int_range, key_defaults, seeded_refusal
from ..init import init_weights
from ._common import (DEFAULTS as D, check_latent_levels, common_args, conv1x1, latent_level, map_kl, onehot,
                      option, upsample)

LATENT_LEVELS = 3  # model.latent_levels of hpu_net when the config leaves it null (at most len(features))
RESIDUAL_INIT_SCALE = 0.1  # the last conv of every residual branch: He-normal times this
Gaussian = Tuple[Tensor, Tensor]  # (mu, sigma), each (B, K, *spatial)


def _check_topk(key: str, value, model_cfg) -> None:
    check_number(key, value, lo=0, lo_open=True, hi=1)


# model.* keys of the hierarchical Probabilistic U-Net
KEYS = (
    LATENT_LEVELS_KEY,
    LATENT_CHANNELS_KEY,
    ModelKey("res_blocks", int, 1, "residual blocks per level", int_range(1, 64)),
    ModelKey("topk_fraction", float, 1.0, "share of pixels with the largest CE kept in the loss (1: all)",
             _check_topk),
)
K = key_defaults(KEYS)


class ResBlock(nn.Module):
    """Pre-activation residual block of ``num_convs`` 3x3(x3) convolutions."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, num_convs: int = 2):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.convs = nn.ModuleList(conv(in_channels if i == 0 else out_channels, out_channels, 3, padding=1)
                                   for i in range(num_convs))
        self.skip = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for conv in self.convs:
            h = conv(F.relu(h))
        return self.skip(x) + h


class HierarchicalUNet(nn.Module):
    """Residual U-Net with latents at its ``latent_levels`` coarsest decoder scales.

    With ``num_classes`` the decoder runs to full resolution and ends in logits
    (prior / likelihood net); without, it stops after the last latent scale
    (posterior net).
    """

    def __init__(self, spatial_dims: int, in_channels: int, features: Sequence[int], latent_levels: int,
                 latent_channels: int, res_blocks: int = 1, num_classes: Optional[int] = None):
        super().__init__()
        self.features = tuple(features)
        n = len(self.features)
        self.latent_levels = latent_levels
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2)
        self.encoder = nn.ModuleList()
        prev = in_channels
        for f in self.features:
            self.encoder.append(nn.Sequential(*(ResBlock(spatial_dims, prev if i == 0 else f, f)
                                                for i in range(res_blocks))))
            prev = f
        last_scale = 0 if num_classes is not None else n - latent_levels
        # decoder block j (j >= 1) works at scale n - 1 - j: upsampled state + skip -> features[scale]
        self.up = nn.ModuleList(ResBlock(spatial_dims, self.features[s + 1] + self.features[s], self.features[s])
                                for s in range(n - 2, last_scale - 1, -1))
        scales = [n - 1 - j for j in range(latent_levels)]
        self.latent_heads = nn.ModuleList(conv1x1(spatial_dims, self.features[s], 2 * latent_channels)
                                          for s in scales)
        # the posterior net (no head) ends at its last latent: nothing would use a merge after it
        # (and DistributedDataParallel refuses parameters that get no gradient)
        merged = scales if num_classes is not None else scales[:-1]
        self.merge = nn.ModuleList(ResBlock(spatial_dims, self.features[s] + latent_channels, self.features[s])
                                   for s in merged)
        self.head = conv1x1(spatial_dims, self.features[0], num_classes) if num_classes is not None else None

    def encode(self, x: Tensor) -> List[Tensor]:
        skips = []
        for i, level in enumerate(self.encoder):
            x = level(self.pool(x) if i > 0 else x)
            skips.append(x)
        return skips

    def decode(self, skips: List[Tensor], *, repeats: int = 1, z: Optional[List[Tensor]] = None,
               generator: Optional[torch.Generator] = None, mean: bool = False):
        """Top-down pass over ``repeats`` copies of each image.

        z: the latents to use (teacher forcing), else z_l = mu_l + sigma_l * eps_l with eps_l
        from ``generator`` (the prior mean with ``mean``). Returns (the Gaussians of each level,
        the z used, logits or None).
        """
        rep = (lambda t: t.repeat_interleave(repeats, dim=0)) if repeats > 1 else (lambda t: t)
        h = rep(skips[-1])
        gaussians, zs = [], []
        for j in range(len(self.up) + 1):
            if j > 0:
                skip = rep(skips[len(skips) - 1 - j])
                h = self.up[j - 1](torch.cat([upsample(h, skip.shape[2:]), skip], dim=1))
            if j < self.latent_levels:
                mu, sigma, zj = latent_level(self.latent_heads[j], h, None if z is None else z[j], mean, generator)
                gaussians.append((mu, sigma))
                zs.append(zj)
                if j < len(self.merge):
                    h = self.merge[j](torch.cat([h, zj.to(h.dtype)], dim=1))
        logits = self.head(h) if self.head is not None else None
        return gaussians, zs, logits


def topk_pixels(logits: Tensor, target: Tensor, fraction: float) -> Tuple[Tensor, Tensor]:
    """The ceil(fraction * N) pixels of each image with the largest CE: logits (B, C, *spatial), target
    (B, *spatial) -> (B, C, K), (B, K). ``fraction`` >= 1 keeps every pixel (flattened)."""
    b, c = logits.shape[:2]
    flat_logits, flat_target = logits.reshape(b, c, -1), target.reshape(b, -1)
    if fraction >= 1.0:
        return flat_logits, flat_target
    k = max(1, math.ceil(fraction * flat_target.shape[1]))
    with torch.no_grad():
        ce = F.cross_entropy(flat_logits.float(), flat_target.long(), reduction="none")
        idx = ce.topk(k, dim=1).indices  # (B, K)
    return flat_logits.gather(2, idx.unsqueeze(1).expand(b, c, k)), flat_target.gather(1, idx)


class HierarchicalProbUNet(SegmentationModel):
    """The hierarchical Probabilistic U-Net; see the module docstring."""

    def __init__(self, spatial_dims: int = D.spatial_dims, in_channels: int = D.in_channels,
                 num_classes: int = D.num_classes, features: Sequence[int] = D.features,
                 convs_per_level: int = D.convs_per_level, norm: Optional[str] = D.norm, init: str = D.init,
                 latent_levels: int = LATENT_LEVELS,
                 latent_channels: int = K.latent_channels, res_blocks: int = K.res_blocks,
                 topk_fraction: float = K.topk_fraction):
        super().__init__()
        feats = self.init_interface(spatial_dims, in_channels, num_classes, features)
        check_latent_levels(latent_levels, len(feats))
        if latent_channels < 1 or res_blocks < 1:
            raise ValueError(f"latent_channels and res_blocks must be >= 1, got {latent_channels}, {res_blocks}")
        if not 0.0 < topk_fraction <= 1.0:
            raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
        self.latent_levels, self.latent_channels = int(latent_levels), int(latent_channels)
        self.topk_fraction = float(topk_fraction)
        self.prior_net = HierarchicalUNet(spatial_dims, in_channels, feats, latent_levels, latent_channels,
                                          res_blocks, num_classes)
        self.posterior_net = HierarchicalUNet(spatial_dims, in_channels + num_classes, feats, latent_levels,
                                              latent_channels, res_blocks, None)
        init_weights(self, init)
        with torch.no_grad():
            for net in (self.prior_net, self.posterior_net):
                for block in net.modules():
                    if isinstance(block, ResBlock):  # residual branches start small: the sums of the
                        block.convs[-1].weight.mul_(RESIDUAL_INIT_SCALE)  # branches stay bounded
                for head in net.latent_heads:  # latents start near N(0, I), as GaussianHead does
                    nn.init.normal_(head.weight, std=1e-3)
                    nn.init.zeros_(head.bias)

    def forward(self, image: Tensor, seg: Tensor) -> Dict[str, object]:
        """Training pass: image (B, C_in, *spatial), seg (B, *spatial) -> dict with ``logits`` (B, C, *spatial)
        (prior net fed the posterior's z), ``prior`` / ``posterior`` (lists of (mu, sigma) per level),
        ``z``, ``kl_levels`` (B, L) and ``kl`` (B,) = their sum."""
        self.check_input(image)
        post_in = torch.cat([image, onehot(seg, self.num_classes, image.dtype)], dim=1)
        posterior, z, _ = self.posterior_net.decode(self.posterior_net.encode(post_in))
        prior, _, logits = self.prior_net.decode(self.prior_net.encode(image), z=z)
        kl_levels = torch.stack([map_kl(q, p) for q, p in zip(posterior, prior)], dim=1)
        return {"logits": logits, "prior": prior, "posterior": posterior, "z": z, "kl_levels": kl_levels,
                "kl": kl_levels.sum(dim=1)}

    def training_loss(self, image: Tensor, labels: Tensor, *, step: int, num_raters: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """GECO (with ``loss_settings.geco``) or ELBO on the (top-k) reconstruction CE; ``kl`` is the sum of
        the per-level KLs ``kl_level<l>`` (batch means)."""
        ls = self.loss_settings
        image, target = pick_raters(image, labels, ls.rater, num_raters=num_raters, generator=generator)
        out = self(image, target)
        logits, tgt = topk_pixels(out["logits"], target, self.topk_fraction)
        if ls.geco is not None:
            terms = ls.geco(logits, tgt, out["kl"])
        else:
            terms = elbo_loss(logits, tgt, out["kl"], beta=self.beta_at(step))
        for level, kl in enumerate(out["kl_levels"].mean(dim=0)):
            terms[f"kl_level{level}"] = kl.detach()
        return terms

    has_mean_sample = True  # sample(mean=True): every z_l the prior mean

    def prepare_samples(self, image: Tensor, num_samples: int, *, generator: Optional[torch.Generator],
                        noise=None, context=None, mean: bool = False):
        """The prior net's encoder once per image; each chunk of :meth:`sample` decodes ``n`` copies of
        each image, z_l drawn from ``generator`` level after level (``mean``: the prior means)."""
        skips, b = self.prior_net.encode(image), image.shape[0]

        def draw_chunk(start: int, n: int, out: Optional[Tensor]) -> Tensor:
            logits = self.prior_net.decode(skips, repeats=n, generator=generator, mean=mean)[2]
            return logits.view(b, n, *logits.shape[1:])

        return draw_chunk


def build_hpu_net(model_cfg, train_cfg=None) -> HierarchicalProbUNet:
    """``model.name: hpu_net``; options ``model.latent_levels`` (null: :data:`LATENT_LEVELS`, at most
    len(features)), ``model.latent_channels``, ``model.res_blocks``, ``model.topk_fraction`` (1.0: off)."""
    args = common_args(model_cfg)
    model = HierarchicalProbUNet(
        **args, latent_levels=option(model_cfg, "latent_levels", int, min(LATENT_LEVELS, len(args["features"]))),
        latent_channels=option(model_cfg, "latent_channels", int), res_blocks=option(model_cfg, "res_blocks", int),
        topk_fraction=option(model_cfg, "topk_fraction", float))
    return model.configure_loss(loss_settings_from(train_cfg))


# ----------------------------------------------------------------------------- the exported sampler and the spec


class _HpuStage(nn.Module):
    """Step j of the hierarchical U-Net's decoder: [up block], [latent head, [merge block]]."""

    def __init__(self, up: Optional[nn.Module], head: Optional[nn.Module], merge: Optional[nn.Module]):
        super().__init__()
        self.has_up: bool = up is not None
        self.has_latent: bool = head is not None
        self.has_merge: bool = merge is not None
        self.up = up if up is not None else nn.Identity()
        self.head = head if head is not None else nn.Identity()
        self.merge = merge if merge is not None else nn.Identity()


class HPUNetSampler(ScriptSampler):
    """``hpu_net``: the prior net's encoder once; per chunk of ``chunk_size`` samples the decoder with
    z_l drawn level after level (coarsest first)."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        net = model.prior_net
        self.pool = net.pool
        self.encoder = net.encoder
        stages = []
        for j in range(len(net.up) + 1):
            latent = j < net.latent_levels
            stages.append(_HpuStage(net.up[j - 1] if j > 0 else None, net.latent_heads[j] if latent else None,
                                    net.merge[j] if latent and j < len(net.merge) else None))
        self.stages = nn.ModuleList(stages)
        self.head = net.head
        self.chunk: int = chunk_of(model)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        skips: List[Tensor] = []
        i = 0
        h = x
        for level in self.encoder:
            h = level(self.pool(h) if i > 0 else h)
            skips.append(h)
            i += 1
        b = x.shape[0]
        chunks: List[Tensor] = []
        for start in range(0, num_samples, self.chunk):
            n = min(self.chunk, num_samples - start)
            h = skips[-1].repeat_interleave(n, dim=0)
            j = 0
            for stage in self.stages:
                if stage.has_up:
                    skip = skips[len(skips) - 1 - j].repeat_interleave(n, dim=0)
                    h = stage.up(torch.cat([script_upsample(h, skip.shape[2:]), skip], dim=1))
                if stage.has_latent:
                    z = latent_draw(stage.head(h.float()), g)
                    if stage.has_merge:
                        h = stage.merge(torch.cat([h, z.to(h.dtype)], dim=1))
                j += 1
            logits = self.head(h)
            chunks.append(logits.reshape([b, n] + list(logits.shape[1:])))
        return torch.cat(chunks, dim=1)


register_model(ModelSpec(
    name="hpu_net", model_class=HierarchicalProbUNet, build=build_hpu_net, keys=KEYS, samples="latent",
    sampler=HPUNetSampler,
    onnx_refusal=seeded_refusal("hpu_net", "draws a latent map at every level of its decoder"),
    doc="the hierarchical Probabilistic U-Net (Kohl et al. 2019)"))
