"""``ssn``: Stochastic Segmentation Networks (Monteiro et al., NeurIPS 2020).

The logits of all N pixels and C classes together, eta in R^{N*C}, follow one
multivariate Gaussian with a low-rank-plus-diagonal covariance:

    eta | x ~ N(mu(x), Sigma(x)),   Sigma(x) = P(x) P(x)^T + diag(d(x)),

with P (N*C) x R of rank R (``rank``) and d > 0. A U-Net body
gives features at full resolution and three 1x1 heads give mu, P (R maps of C
channels) and d = softplus(.) + ``diag_eps`` (the diagonal floor that keeps
Sigma positive definite whatever the network outputs). A draw is the
reparameterisation eta = mu + P eps_R + sqrt(d) * eps_N with eps_R ~ N(0, I_R),
eps_N ~ N(0, I_{N*C}); each draw is one coherent segmentation, the correlations
between pixels coming from P.

Training maximises the log of a Monte-Carlo estimate of the marginal
likelihood over M draws (``mc_samples``):

    loss = -log( (1/M) sum_m p(y | eta_m) ) = -logsumexp_m( log p(y | eta_m) ) + log M,

log p(y | eta) = -sum_pixels CE(softmax(eta), y), per image, averaged over the
batch (computed with logsumexp, in fp32). The distribution's parameters are
computed in fp32 also under autocast (the body may run in fp16/bf16).

Region of interest (``roi: image``): as the paper does outside the brain mask,
the covariance is restricted to a region of interest, here the image's
foreground (any channel with ``|x| > roi_threshold``) dilated by
``roi_dilation`` pixels: outside it P = 0 and d = ``diag_eps``, so those logits
are (nearly) deterministic. ``roi: none`` (default) keeps the whole image.

Initialisation: every convolution He-normal (:mod:`probunet.models.init`), then
the factor and diagonal heads scaled down (``COVARIANCE_INIT_SCALE``, diagonal
bias ``DIAG_INIT_BIAS``), so training starts near a deterministic U-Net and the
covariance grows where the raters disagree. Started with He-scale heads, the
logit noise dwarfed the mean at step 0 and the Monte-Carlo objective, which
rewards the best of its M draws, kept the variance high (on the synthetic set,
samples disagreed on 95% of the pixels after 300 steps).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import check_number
from ..base import SegmentationModel, loss_settings_from, pick_raters
from ..registry import register_model
from ..scripted import ScriptSampler, UNetPort, chunk_of, randn_from
from ..spec import ModelKey, ModelSpec, choice, int_range, key_defaults, seeded_refusal
from ..init import init_weights
from ..unet import UNet
from ._common import DEFAULTS as D, common_args, conv1x1, draw, option

ROI_MODES = ("none", "image")
COVARIANCE_INIT_SCALE = 0.1  # the factor and diagonal heads: He-normal weights times this
DIAG_INIT_BIAS = -4.0  # softplus(-4) ~ 0.018: the diagonal's start


def _positive(key: str, value, model_cfg) -> None:
    check_number(key, value, lo=0, lo_open=True)


def _non_negative(key: str, value, model_cfg) -> None:
    check_number(key, value, lo=0)


# model.* keys of the SSN
KEYS = (
    ModelKey("rank", int, 10, "rank of the covariance factor P", int_range(1, 1024)),
    ModelKey("mc_samples", int, 20, "Monte-Carlo samples M of the loss", int_range(1, 10000)),
    ModelKey("diag_eps", float, 1e-5, "floor of the diagonal covariance d", _positive),
    ModelKey("roi", str, "none", "none | image (covariance only inside the dilated image foreground)",
             choice(*ROI_MODES)),
    ModelKey("roi_dilation", int, 3, "dilation of that region, pixels", int_range(0, 1000), card=False),
    ModelKey("roi_threshold", float, 0.0, "the image foreground is |x| > this", _non_negative, card=False),
)
K = key_defaults(KEYS)


class StochasticSegmentationNetwork(SegmentationModel):
    """Low-rank multivariate Gaussian over all logits of an image; see the module docstring."""

    def __init__(self, spatial_dims: int = D.spatial_dims, in_channels: int = D.in_channels,
                 num_classes: int = D.num_classes, features: Sequence[int] = D.features,
                 convs_per_level: int = D.convs_per_level, norm: Optional[str] = D.norm, init: str = D.init,
                 rank: int = K.rank, mc_samples: int = K.mc_samples,
                 diag_eps: float = K.diag_eps, roi: str = K.roi, roi_dilation: int = K.roi_dilation,
                 roi_threshold: float = K.roi_threshold):
        super().__init__()
        self.init_interface(spatial_dims, in_channels, num_classes, features)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if not diag_eps > 0:
            raise ValueError(f"diag_eps must be > 0, got {diag_eps}")
        if roi not in ROI_MODES:
            raise ValueError(f"roi must be one of {', '.join(ROI_MODES)}, got {roi!r}")
        if roi_dilation < 0:
            raise ValueError(f"roi_dilation must be >= 0, got {roi_dilation}")
        self.rank, self.mc_samples, self.diag_eps = int(rank), int(mc_samples), float(diag_eps)
        self.roi, self.roi_dilation, self.roi_threshold = roi, int(roi_dilation), float(roi_threshold)
        self.body = UNet(spatial_dims, in_channels, features, convs_per_level, norm=norm, init=init)
        f0 = self.body.out_channels
        self.mean_head = conv1x1(spatial_dims, f0, num_classes)
        self.diag_head = conv1x1(spatial_dims, f0, num_classes)
        self.factor_head = conv1x1(spatial_dims, f0, num_classes * self.rank)
        init_weights(self, init)
        with torch.no_grad():  # start close to a deterministic U-Net: small covariance (see the docstring)
            self.factor_head.weight.mul_(COVARIANCE_INIT_SCALE)
            self.diag_head.weight.mul_(COVARIANCE_INIT_SCALE)
            self.diag_head.bias.fill_(DIAG_INIT_BIAS)

    def roi_mask(self, image: Tensor) -> Tensor:
        """The region of interest (B, 1, *spatial) fp32 in {0, 1}: foreground of ``image`` dilated."""
        fg = (image.float().abs() > self.roi_threshold).any(dim=1, keepdim=True).float()
        if self.roi_dilation == 0:
            return fg
        k = 2 * self.roi_dilation + 1
        pool = F.max_pool2d if self.spatial_dims == 2 else F.max_pool3d
        return pool(fg, kernel_size=k, stride=1, padding=self.roi_dilation)

    def distribution(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The Gaussian over the logits of ``image`` (B, C_in, *spatial), all fp32:
        mean (B, C, *spatial), factor P (B, R, C, *spatial) (column r of P is ``factor[:, r]``
        flattened), diagonal d (B, C, *spatial), d >= ``diag_eps``."""
        self.check_input(image)
        feats = self.body(image)
        with torch.autocast(image.device.type, enabled=False):
            f = feats.float()
            mean = self.mean_head(f)
            diag = F.softplus(self.diag_head(f))
            factor = self.factor_head(f).view(f.shape[0], self.rank, self.num_classes, *f.shape[2:])
            if self.roi == "image":
                mask = self.roi_mask(image)
                diag = diag * mask
                factor = factor * mask.unsqueeze(1)
            return mean, factor, diag + self.diag_eps

    @staticmethod
    def draw_logits(mean: Tensor, factor: Tensor, diag: Tensor, eps_rank: Tensor, eps_diag: Tensor) -> Tensor:
        """eta = mu + P eps_R + sqrt(d) * eps_N for S draws: eps_rank (B, S, R), eps_diag (B, S, C, *spatial)
        -> logits (B, S, C, *spatial)."""
        low = torch.einsum("bsr,brn->bsn", eps_rank, factor.flatten(2)).view(eps_diag.shape)
        return mean.unsqueeze(1) + low + diag.sqrt().unsqueeze(1) * eps_diag

    def _draws(self, mean: Tensor, factor: Tensor, diag: Tensor, n: int,
               generator: Optional[torch.Generator]) -> Tensor:
        b = mean.shape[0]
        eps_rank = draw((b, n, self.rank), generator, mean.device)
        eps_diag = draw((b, n, *mean.shape[1:]), generator, mean.device)
        return self.draw_logits(mean, factor, diag, eps_rank, eps_diag)

    def training_loss(self, image: Tensor, labels: Tensor, *, step: int, num_raters: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """-log of the Monte-Carlo mean likelihood over ``mc_samples`` reparameterised draws (per image,
        batch mean); also ``ce_mean`` (per pixel, over the draws) and ``log_likelihood`` (the batch
        mean of the estimate's log). Draws come from the global RNG."""
        image, target = pick_raters(image, labels, self.loss_settings.rater, num_raters=num_raters,
                                    generator=generator)
        mean, factor, diag = self.distribution(image)
        with torch.autocast(image.device.type, enabled=False):
            logits = self._draws(mean, factor, diag, self.mc_samples, None)  # (B, M, C, *spatial)
            b, m = logits.shape[:2]
            tgt = target.long().unsqueeze(1).expand(b, m, *target.shape[1:])
            ce = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(0, 1), reduction="none").view(b, m, -1)
            log_lik = -ce.sum(dim=2)  # (B, M): log p(y | eta_m)
            log_mean_lik = torch.logsumexp(log_lik, dim=1) - math.log(m)  # (B,)
        return {"loss": -log_mean_lik.mean(), "log_likelihood": log_mean_lik.mean().detach(),
                "ce_mean": ce.mean().detach(), "ce_sum": ce.sum(dim=2).mean().detach()}

    def prepare_samples(self, image: Tensor, num_samples: int, *, generator: Optional[torch.Generator],
                        noise=None, context=None, mean: bool = False):
        """The network once per image; each chunk of :meth:`sample` (logits (B, S, C, *spatial), fp32) is
        ``n`` draws of the Gaussian from ``generator``."""
        loc, factor, diag = self.distribution(image)

        def draw_chunk(start: int, n: int, out: Optional[Tensor]) -> Tensor:
            with torch.autocast(image.device.type, enabled=False):
                return self._draws(loc, factor, diag, n, generator)

        return draw_chunk


def build_ssn(model_cfg, train_cfg=None) -> StochasticSegmentationNetwork:
    """``model.name: ssn``; options ``model.rank``, ``model.mc_samples``, ``model.diag_eps``, ``model.roi``
    (none | image), ``model.roi_dilation``, ``model.roi_threshold`` (defaults: :class:`probunet.config.ModelConfig`)."""
    model = StochasticSegmentationNetwork(
        **common_args(model_cfg), rank=option(model_cfg, "rank", int),
        mc_samples=option(model_cfg, "mc_samples", int), diag_eps=option(model_cfg, "diag_eps", float),
        roi=option(model_cfg, "roi", str), roi_dilation=option(model_cfg, "roi_dilation", int),
        roi_threshold=option(model_cfg, "roi_threshold", float))
    return model.configure_loss(loss_settings_from(train_cfg))


# ----------------------------------------------------------------------------- the exported sampler and the spec


class SSNSampler(ScriptSampler):
    """``ssn``: mean, low-rank factor P and diagonal d once; eta = mu + P eps_R + sqrt(d) eps_N per sample,
    eps_R (B, n, R) then eps_N (B, n, C, *sp) drawn ``chunk_size`` samples at a time."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.body = UNetPort(model.body)
        self.mean_head, self.diag_head, self.factor_head = model.mean_head, model.diag_head, model.factor_head
        self.rank: int = int(model.rank)
        self.diag_eps: float = float(model.diag_eps)
        self.roi_image: bool = model.roi == "image"
        self.roi_dilation: int = int(model.roi_dilation)
        self.roi_threshold: float = float(model.roi_threshold)
        self.chunk: int = chunk_of(model)

    def _roi_mask(self, image: Tensor) -> Tensor:
        fg = (image.float().abs() > self.roi_threshold).any(dim=1, keepdim=True).float()
        if self.roi_dilation == 0:
            return fg
        k = 2 * self.roi_dilation + 1
        if self.spatial_dims == 2:
            return F.max_pool2d(fg, kernel_size=k, stride=1, padding=self.roi_dilation)
        return F.max_pool3d(fg, kernel_size=k, stride=1, padding=self.roi_dilation)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        f = self.body(x).float()
        b = f.shape[0]
        mean = self.mean_head(f)
        diag = F.softplus(self.diag_head(f))
        factor = self.factor_head(f).reshape([b, self.rank, self.num_classes] + list(f.shape[2:]))
        if self.roi_image:
            mask = self._roi_mask(x)
            diag = diag * mask
            factor = factor * mask.unsqueeze(1)
        diag = diag + self.diag_eps
        flat = factor.flatten(2)  # (B, R, C*prod(sp))
        sd = diag.sqrt().unsqueeze(1)
        chunks: List[Tensor] = []
        for start in range(0, num_samples, self.chunk):
            n = min(self.chunk, num_samples - start)
            eps_rank = randn_from([b, n, self.rank], g, x.device)
            eps_diag = randn_from([b, n] + list(mean.shape[1:]), g, x.device)
            low = torch.einsum("bsr,brn->bsn", eps_rank, flat).reshape(eps_diag.shape)
            chunks.append(mean.unsqueeze(1) + low + sd * eps_diag)
        return torch.cat(chunks, dim=1)


register_model(ModelSpec(
    name="ssn", model_class=StochasticSegmentationNetwork, build=build_ssn, keys=KEYS, samples="latent",
    sampler=SSNSampler,
    onnx_refusal=seeded_refusal("ssn", "draws its low-rank and diagonal noise inside the network"),
    doc="the stochastic segmentation network (Monteiro et al. 2020)"))
