"""What the zoo's models share: input checks, loss settings, seeded draws, diagonal Gaussians over maps.

Nothing here is a network; the convolutional building blocks come from
:mod:`probunet.models.unet`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from ...losses import Geco, build_geco
from ..gaussian import LOG_SIGMA_MAX, LOG_SIGMA_MIN

RATER_MODES = ("random", "all")


@dataclass
class ZooLossSettings:
    """How a zoo model's ``training_loss`` picks targets and weighs its terms (from ``train.*``).

    rater: ``random`` (one rater per image) or ``all``; beta / kl_warmup_steps: the KL
    weight of the latent-variable models and its warm-up; geco: a
    :class:`probunet.losses.Geco` (held here, not as a submodule, so that the model's
    state dict stays the bare network's, as for the Probabilistic U-Net).
    """

    rater: str = "random"
    beta: float = 1.0
    kl_warmup_steps: int = 0
    geco: Optional[Geco] = None


def loss_settings_from(train_cfg) -> ZooLossSettings:
    """:class:`ZooLossSettings` of a :class:`probunet.config.TrainConfig` (the defaults for None)."""
    if train_cfg is None:
        return ZooLossSettings()
    rater = getattr(train_cfg, "rater", "random")
    if rater not in RATER_MODES:
        raise ValueError(f"train.rater must be 'random' or 'all', got {rater!r}")
    geco_cfg = getattr(train_cfg, "geco", None)
    return ZooLossSettings(rater=rater, beta=float(getattr(train_cfg, "beta", 1.0)),
                           kl_warmup_steps=int(getattr(train_cfg, "kl_warmup_steps", 0)),
                           geco=build_geco(geco_cfg) if geco_cfg is not None else None)


def option(model_cfg, key: str, default, kind=None):
    """``model_cfg.<key>`` (``default`` when the config has no such key), converted by ``kind``."""
    value = getattr(model_cfg, key, None)
    if value is None:
        value = default
    return kind(value) if (kind is not None and value is not None) else value


def common_args(model_cfg) -> dict:
    """The constructor arguments every zoo model reads from ``model.*``."""
    return dict(spatial_dims=int(model_cfg.spatial_dims), in_channels=int(model_cfg.in_channels),
                num_classes=int(model_cfg.num_classes), features=tuple(int(f) for f in model_cfg.features),
                convs_per_level=int(getattr(model_cfg, "convs_per_level", 3)),
                norm=getattr(model_cfg, "norm", None), init=getattr(model_cfg, "init", "he_normal"))


class ZooModel(nn.Module):
    """Base of the zoo's models: the interface attributes and the input check.

    Subclasses set ``spatial_dims``, ``in_channels``, ``num_classes`` and ``_divisor``.
    """

    noise_shape = None  # no fixed-size per-sample draw (see probunet.models.base)
    spatial_dims: int
    in_channels: int
    num_classes: int
    _divisor: int = 1

    def _init_interface(self, spatial_dims: int, in_channels: int, num_classes: int,
                        features: Sequence[int]) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if len(features) < 1:
            raise ValueError("features must name at least one level")
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self._divisor = 2 ** (len(features) - 1)
        self.loss_settings = ZooLossSettings()

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return self._divisor

    def configure_loss(self, settings: ZooLossSettings):
        """Set the loss settings (rater choice, KL weight, GECO); returns the model."""
        if settings.rater not in RATER_MODES:
            raise ValueError(f"rater must be 'random' or 'all', got {settings.rater!r}")
        self.loss_settings = settings
        return self

    def check_input(self, image: Tensor) -> None:
        if image.dim() != self.spatial_dims + 2:
            raise ValueError(f"image must be (B, C, *spatial) with {self.spatial_dims} spatial dims, "
                             f"got shape {tuple(image.shape)}")
        if image.shape[1] != self.in_channels:
            raise ValueError(f"image has {image.shape[1]} channels, the model expects {self.in_channels}")
        if any(s % self.divisor for s in image.shape[2:]):
            raise ValueError(f"spatial size {tuple(image.shape[2:])} must be divisible by {self.divisor} "
                             f"(2**(levels-1)); pad or crop the image")

    def sampling_context(self):
        """``torch.inference_mode`` when nothing needs gradients (eval mode or grad disabled)."""
        return torch.inference_mode() if (not self.training or not torch.is_grad_enabled()) else nullcontext()


def check_num_samples(num_samples: int, noise=None, context=None) -> None:
    """``num_samples`` >= 1; ``noise`` and ``context`` must be None (the zoo's models have no fixed-size
    per-sample draw, ``noise_shape`` None, and no image-level sampling context)."""
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if noise is not None:
        raise ValueError("noise: this model has no fixed-size per-sample draw (noise_shape is None); "
                         "pass a generator instead")
    if context is not None:
        raise ValueError("context: this model has no image-level sampling context (no sample_context)")


def draw(shape, generator: Optional[torch.Generator], device, kind: str = "normal") -> Tensor:
    """Standard-normal (``normal``) or uniform [0, 1) (``uniform``) fp32 draws of ``shape`` on ``device``,
    from ``generator`` (on its own device, then moved) or the global RNG."""
    fn = torch.randn if kind == "normal" else torch.rand
    if generator is None:
        return fn(tuple(shape), device=device)
    return fn(tuple(shape), generator=generator, device=generator.device).to(device)


def onehot(seg: Tensor, num_classes: int, dtype=torch.float32) -> Tensor:
    """seg (B, *spatial) integer -> (B, C, *spatial) one-hot of ``dtype`` (by comparison, no host sync)."""
    classes = torch.arange(num_classes, device=seg.device).view(1, -1, *([1] * (seg.dim() - 1)))
    return (seg.unsqueeze(1) == classes).to(dtype)


def soft_targets(labels: Tensor, num_classes: int, num_raters: Optional[Tensor]) -> Tensor:
    """The raters' mean one-hot maps: labels (B, A, *spatial) -> (B, C, *spatial) fp32, padded raters
    (index >= num_raters[b]) left out."""
    b, a = labels.shape[:2]
    counts = (torch.full((b,), a, device=labels.device) if num_raters is None
              else torch.as_tensor(num_raters, device=labels.device).long())
    real = (torch.arange(a, device=labels.device).view(1, a) < counts.view(b, 1)).float()  # (B, A)
    hot = onehot(labels.flatten(0, 1), num_classes).view(b, a, num_classes, *labels.shape[2:])
    real = real.view(b, a, *([1] * (hot.dim() - 2)))
    return (hot * real).sum(1) / counts.clamp(min=1).view(b, *([1] * (hot.dim() - 2))).float()


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Per-pixel CE of logits (B, C, *spatial) against class probabilities (B, C, *spatial): (B, *spatial), fp32."""
    return -(target_probs.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def gaussian_params(params: Tensor) -> tuple[Tensor, Tensor]:
    """A conv output (B, 2K, *spatial) -> (mu, sigma), each (B, K, *spatial), fp32; log-sigma clamped
    to [LOG_SIGMA_MIN, LOG_SIGMA_MAX] as for the Probabilistic U-Net's latents."""
    mu, log_sigma = params.float().chunk(2, dim=1)
    return mu, log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX).exp()


def latent_level(head: nn.Module, h: Tensor, given: Optional[Tensor], mean: bool,
                 generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
    """One level of a hierarchical latent, in fp32: (mu, sigma) from ``head(h)`` and the level's z:
    ``given`` when not None (teacher forcing), else mu (``mean``), else a draw mu + sigma * eps."""
    with torch.autocast(h.device.type, enabled=False):
        mu, sigma = gaussian_params(head(h.float()))
        if given is not None:
            return mu, sigma, given
        return mu, sigma, (mu if mean else mu + sigma * draw(mu.shape, generator, mu.device))


def map_kl(q: tuple[Tensor, Tensor], p: tuple[Tensor, Tensor]) -> Tensor:
    """KL(q || p) of two diagonal Gaussians over latent maps (mu, sigma) (B, K, *spatial), summed over
    channels and positions: (B,), fp32."""
    kl = kl_divergence(Normal(q[0].float(), q[1].float(), validate_args=False),
                       Normal(p[0].float(), p[1].float(), validate_args=False))
    return kl.flatten(1).sum(dim=1)


def upsample(x: Tensor, size) -> Tensor:
    """Bilinear (2D) or trilinear (3D) resize to ``size``."""
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def conv1x1(spatial_dims: int, cin: int, cout: int) -> nn.Module:
    return (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(cin, cout, 1)
