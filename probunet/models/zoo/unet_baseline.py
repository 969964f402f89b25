"""``unet``: the deterministic U-Net baseline of every comparison.

A U-Net (:class:`probunet.models.UNet` with a 1x1 head) gives logits f(x) per
pixel. It is trained with the per-pixel cross-entropy against one random rater
of each image (``train.rater: random``; ``all``: every rater, the image
repeated), or, with ``soft_target``, against the raters' mean one-hot map
p_bar(c) = (1/A) sum_a [y_a = c]: CE = -sum_c p_bar(c) log softmax(f(x))_c,
averaged over pixels and images.

Samples (``sampling``):

- ``pixelwise``: every pixel of every sample is drawn independently from the
  categorical distribution softmax(f(x)) at that pixel (``u ~ U[0, 1)`` per
  pixel, class = the first c with u < cumulative probability); the returned
  logits are 0 for the drawn class and -30 for the others, so their argmax is
  the draw and their softmax (nearly) its one-hot map.
- ``argmax``: every sample is f(x) itself (all samples equal).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import SegmentationModel, check_labels, loss_settings_from, pick_raters
from ..registry import register_model
from ..scripted import ScriptSampler, UNetPort, rand_from
from ..spec import ModelKey, ModelSpec, choice, key_defaults, seeded_refusal
from ..unet import UNet
from ._common import DEFAULTS as D, common_args, draw, option, soft_cross_entropy, soft_targets
from ._common import SOFT_TARGET_KEY

SAMPLING_MODES = ("pixelwise", "argmax")
DRAWN_LOGIT_GAP = 30.0  # logit of the drawn class minus the others' in a pixelwise sample


# model.* keys of the U-Net baseline
KEYS = (
    ModelKey("sampling", str, "pixelwise", "pixelwise (a categorical draw per pixel) | argmax (all samples equal)",
             choice(*SAMPLING_MODES)),
    SOFT_TARGET_KEY,
)
K = key_defaults(KEYS)


def pixelwise_samples(logits: Tensor, num_samples: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """``num_samples`` independent per-pixel categorical draws from softmax(logits).

    logits (B, C, *spatial) -> logits (B, S, C, *spatial), fp32: 0 for the drawn
    class, ``-DRAWN_LOGIT_GAP`` elsewhere.
    """
    b, c = logits.shape[:2]
    probs = torch.softmax(logits.float(), dim=1)
    cum = probs.cumsum(dim=1).unsqueeze(1)  # (B, 1, C, *spatial)
    u = draw((b, num_samples, 1, *logits.shape[2:]), generator, logits.device, kind="uniform")
    cls = (u >= cum).sum(dim=2, keepdim=True).clamp(max=c - 1)  # (B, S, 1, *spatial)
    classes = torch.arange(c, device=logits.device).view(1, 1, c, *([1] * (logits.dim() - 2)))
    return torch.where(cls == classes, 0.0, -DRAWN_LOGIT_GAP)


class UNetBaseline(SegmentationModel):
    """Deterministic U-Net trained with cross-entropy; samples pixel-wise or all equal to its argmax."""

    def __init__(self, spatial_dims: int = D.spatial_dims, in_channels: int = D.in_channels,
                 num_classes: int = D.num_classes, features: Sequence[int] = D.features,
                 convs_per_level: int = D.convs_per_level, norm: Optional[str] = D.norm, init: str = D.init,
                 sampling: str = K.sampling,
                 soft_target: bool = K.soft_target):
        super().__init__()
        self.init_interface(spatial_dims, in_channels, num_classes, features)
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")
        self.sampling = sampling
        self.soft_target = bool(soft_target)
        self.net = UNet(spatial_dims, in_channels, features, convs_per_level, norm=norm,
                        num_classes=num_classes, init=init)

    def forward(self, image: Tensor) -> Tensor:
        """image (B, C_in, *spatial) -> logits (B, C, *spatial)."""
        self.check_input(image)
        return self.net(image)

    def training_loss(self, image: Tensor, labels: Tensor, *, step: int, num_raters: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """Mean per-pixel CE (``loss`` = ``ce_mean``; ``ce_sum`` per image, batch mean)."""
        if self.soft_target:
            check_labels(labels, image, num_raters)
            ce = soft_cross_entropy(self(image), soft_targets(labels, self.num_classes, num_raters))
        else:
            image, target = pick_raters(image, labels, self.loss_settings.rater, num_raters=num_raters,
                                        generator=generator)
            ce = F.cross_entropy(self(image).float(), target.long(), reduction="none")
        ce = ce.flatten(1)
        return {"loss": ce.mean(), "ce_mean": ce.mean(), "ce_sum": ce.sum(dim=1).mean()}

    def sample(self, image: Tensor, num_samples: int, *, generator: Optional[torch.Generator] = None,
               noise: Optional[Tensor] = None, context=None, start: int = 0) -> Tensor:
        """image (B, C_in, *spatial) -> logits (B, S, C, *spatial) (see the module docstring); ``start``
        unused (the samples are exchangeable)."""
        self.check_sample_args(num_samples, noise, context, start=start)
        with self.sampling_context():
            logits = self(image)
            if self.sampling == "argmax":
                return logits.unsqueeze(1).expand(-1, num_samples, *logits.shape[1:]).clone()
            return pixelwise_samples(logits, num_samples, generator)


def build_unet(model_cfg, train_cfg=None) -> UNetBaseline:
    """``model.name: unet``; options ``model.sampling`` and ``model.soft_target``."""
    model = UNetBaseline(**common_args(model_cfg), sampling=option(model_cfg, "sampling", str),
                         soft_target=option(model_cfg, "soft_target", bool))
    return model.configure_loss(loss_settings_from(train_cfg))


# ----------------------------------------------------------------------------- the exported sampler and the spec


class UNetBaselineSampler(ScriptSampler):
    """``unet``: logits once; ``pixelwise`` draws u ~ U[0, 1) (B, S, 1, *sp), ``argmax`` repeats them."""

    def __init__(self, model: nn.Module, **kw):
        super().__init__(model, **kw)
        self.net = UNetPort(model.net)
        self.pixelwise: bool = model.sampling == "pixelwise"
        self.gap: float = float(DRAWN_LOGIT_GAP)

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        logits = self.net(x)
        b, c = logits.shape[0], logits.shape[1]
        if not self.pixelwise:
            return logits.unsqueeze(1).expand([b, num_samples] + list(logits.shape[1:])).clone()
        probs = torch.softmax(logits.float(), dim=1)
        cum = probs.cumsum(dim=1).unsqueeze(1)  # (B, 1, C, *sp)
        u = rand_from([b, num_samples, 1] + list(logits.shape[2:]), g, x.device)
        cls = (u >= cum).sum(dim=2, keepdim=True).clamp(max=c - 1)  # (B, S, 1, *sp)
        classes = torch.arange(c, device=x.device).reshape([1, 1, c] + [1] * (logits.dim() - 2))
        zero = torch.zeros([1], device=x.device)
        return torch.where(cls == classes, zero, zero - self.gap)


def _onnx(model) -> "str | None":
    if model.sampling == "argmax":
        return None
    return seeded_refusal("unet", "draws every pixel of every sample (sampling: pixelwise)")


register_model(ModelSpec(
    name="unet", model_class=UNetBaseline, build=build_unet, keys=KEYS, samples="softmax",
    sampler=UNetBaselineSampler, onnx_refusal=_onnx, doc="a deterministic U-Net (cross-entropy)"))
