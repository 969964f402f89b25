"""What the zoo's models share besides their base class: reading ``model.*``, seeded draws, diagonal
Gaussians over maps.

The base class (interface, input checks, loss settings, the chunked sampling
loop) is :class:`probunet.models.base.SegmentationModel`. Nothing here is a
network; the convolutional building blocks come from :mod:`probunet.models.unet`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from ...config import check_int, model_key_default
from ...errors import ConfigError
from ..base import DEFAULTS  # noqa: F401  (re-exported: the shared keys' defaults)
from ..gaussian import LOG_SIGMA_MAX, LOG_SIGMA_MIN
from ..spec import ModelKey, int_range


def option(model_cfg, key: str, kind=None, default=None):
    """``model_cfg.<key>`` converted by ``kind``; when the config has no such key (or it is None),
    ``default`` or else the key's declared default (:func:`probunet.config.model_key_default`)."""
    value = getattr(model_cfg, key, None)
    if value is None:
        value = default if default is not None else model_key_default(key)
    return kind(value) if (kind is not None and value is not None) else value


def common_args(model_cfg) -> dict:
    """The constructor arguments every zoo model reads from ``model.*``."""
    return dict(spatial_dims=int(model_cfg.spatial_dims), in_channels=int(model_cfg.in_channels),
                num_classes=int(model_cfg.num_classes), features=tuple(int(f) for f in model_cfg.features),
                convs_per_level=option(model_cfg, "convs_per_level", int), norm=getattr(model_cfg, "norm", None),
                init=option(model_cfg, "init"))


def check_latent_levels(latent_levels: int, levels: int) -> None:
    """A hierarchical model's ``latent_levels``: 1 .. ``levels`` (at most one latent scale per U-Net level)."""
    if not 1 <= latent_levels <= levels:
        raise ValueError(f"latent_levels must be in 1..{levels} (the number of levels), got {latent_levels}")


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


def member_batch(batch_mode: str, image: Tensor, labels: Tensor, num_raters: Optional[Tensor],
                 generator: Optional[torch.Generator]):
    """One ensemble member's batch: image (B, C_in, *spatial), labels (B, A, *spatial) and the
    per-image rater counts (B,) as they are (``same``), resampled with replacement (``bootstrap``)
    or permuted (else), by uniform draws from ``generator``."""
    b = image.shape[0]
    if batch_mode == "same":
        return image, labels, num_raters
    if batch_mode == "bootstrap":
        idx = (draw((b,), generator, image.device, kind="uniform") * b).long().clamp(max=b - 1)
    else:
        idx = draw((b,), generator, image.device, kind="uniform").argsort()
    counts = None if num_raters is None else torch.as_tensor(num_raters, device=image.device)[idx]
    return image[idx], labels[idx.to(labels.device)], counts


# ----------------------------------------------------------------------------- config keys several models read


def _check_latent_levels_key(key: str, value, model_cfg) -> None:
    if value is None:
        return
    check_int(key, value, 1)
    if value > len(model_cfg.features):
        raise ConfigError(f"config key '{key}': at most one per level ({len(model_cfg.features)}), got {value}")


SOFT_TARGET_KEY = ModelKey("soft_target", bool, False, "cross-entropy against the raters' mean instead of one rater")
LATENT_LEVELS_KEY = ModelKey("latent_levels", Optional[int], None,
                             "latent scales, clipped to the levels (null: the model's own default)",
                             _check_latent_levels_key)
LATENT_CHANNELS_KEY = ModelKey("latent_channels", int, 2, "latent channels per scale", int_range(1, 1024))
