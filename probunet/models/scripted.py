"""What the models' TorchScript-ready samplers share: the base class :class:`ScriptSampler`, the
U-Net bodies and the seeded draws (used by each model's own sampler, beside the model; exported
by :mod:`probunet.export`).

Each model's sampler wraps the trained network's own submodules (its weights, not
copies of the code that built them) and re-states the model's ``sample`` in the
subset of Python TorchScript compiles: no thread pools, no tiling, no
registries. The result loads with ``torch.jit.load`` alone.

Every sampler has one signature::

    forward(image (B, C_in, *spatial), noise=None, generator=None, num_samples=0, context=None)
        -> logits (B, S, C, *spatial)

- ``image``: after the checkpoint's preprocessing (``data.normalize``; see
  :meth:`ScriptSampler.normalize`), any spatial size: it is padded to a multiple of
  ``divisor`` with its per-channel minimum (split evenly, the extra voxel after),
  as ``probunet predict`` pads, and the logits are cropped back.
- ``noise``: the Probabilistic U-Net's standard-normal latent draws ``eps``
  ``(B or 1, S, latent_dim)`` (``z = mu + sigma * eps``; for an ensemble of
  Probabilistic U-Nets row s goes to sample s's member); other models take none.
- ``generator``: a CPU ``torch.Generator`` (``torch.Generator().manual_seed(seed)``):
  every random number is drawn from it in the order the model's own
  ``sample(..., generator=g)`` draws them (so the samples equal probunet's for
  that generator); None uses torch's global RNG. (The generator is made by the
  caller: a ``torch.Generator`` created inside TorchScript is a constant that
  serialisation may duplicate, so that the seeded one is not the one drawn from.)
- ``num_samples``: S (0: the number fixed at export; ignored when ``noise`` is given).
- ``context``: the Probabilistic U-Net's image-level prior ``(B or 1, 2, latent_dim)``
  (:meth:`sample_context` of the whole image) for sliding windows; None: the
  prior of ``image`` itself. An ensemble's is its members' stacked on axis 1:
  ``(B or 1, M, 2, latent_dim)``.

The draws are made on the CPU and moved to the image's device, as the models do.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def chunk_of(model) -> int:
    """The samples per chunk that ``model.sample`` draws by default (its ``chunk_size``): the exported
    sampler draws its random numbers in the same blocks, so it gives the same samples."""
    import inspect

    p = inspect.signature(type(model).sample).parameters.get("chunk_size")
    return max(1, int(p.default)) if p is not None and p.default else 1 << 30


# log-sigma is clamped to [-10, 10], as probunet.models.gaussian (LOG_SIGMA_MIN, LOG_SIGMA_MAX)


def randn_from(shape: List[int], g: Optional[torch.Generator], device: torch.device) -> Tensor:
    if g is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=g).to(device)


def rand_from(shape: List[int], g: Optional[torch.Generator], device: torch.device) -> Tensor:
    if g is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=g).to(device)


def pad_with_min(x: Tensor, sizes: List[int]) -> Tuple[Tensor, List[int]]:
    """x (N, C, *sp) padded to at least ``sizes`` with each image's per-channel minimum, split evenly
    (the extra voxel after); returns it and the start of the original on each spatial axis."""
    nd = x.dim() - 2
    target: List[int] = []
    starts: List[int] = []
    same = True
    for d in range(nd):
        s = x.shape[2 + d]
        t = max(s, sizes[d])
        target.append(t)
        starts.append((t - s) // 2)
        if t != s:
            same = False
    if same:
        return x, starts
    fill = x.flatten(2).amin(dim=2)  # (N, C)
    shape = [x.shape[0], x.shape[1]] + target
    view_shape = [x.shape[0], x.shape[1]] + [1] * nd
    out = fill.reshape(view_shape).expand(shape).clone()
    inner = out
    for d in range(nd):
        inner = inner.narrow(2 + d, starts[d], x.shape[2 + d])
    inner.copy_(x)
    return out, starts


def crop_spatial(x: Tensor, first: int, starts: List[int], sizes: List[int]) -> Tensor:
    """The window ``starts``/``sizes`` of the spatial axes of ``x``, which begin at axis ``first``."""
    for d in range(len(sizes)):
        x = x.narrow(first + d, starts[d], sizes[d])
    return x


def upsample(x: Tensor, size: List[int]) -> Tensor:
    if x.dim() == 4:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class ScriptSampler(nn.Module):
    """What every exported sampler shares: padding, input checks, normalisation, metadata."""

    def __init__(self, model: nn.Module, *, num_samples: int, normalize: str = "none",
                 ct_window: Tuple[float, float] = (0.0, 1.0), model_name: str = ""):
        super().__init__()
        self.spatial_dims: int = int(model.spatial_dims)
        self.in_channels: int = int(model.in_channels)
        self.num_classes: int = int(model.num_classes)
        self.divisor: int = int(model.divisor)
        self.num_samples: int = int(num_samples)
        self.normalize_mode: str = str(normalize)
        self.ct_low: float = float(ct_window[0])
        self.ct_high: float = float(ct_window[1])
        self.model_name: str = model_name
        self.latent_dim: int = 0  # > 0: the model takes ``noise`` (B, S, latent_dim)

    @torch.jit.export
    def normalize(self, image: Tensor) -> Tensor:
        """``data.normalize`` of the checkpoint on raw intensities image (B, C_in, *spatial), per image
        and channel: ``none``; ``zscore`` (x - mean) / max(std, 1e-6), std with ddof 0; ``ct_window``
        clip to [low, high] and scale to [0, 1]."""
        x = image.float()
        if self.normalize_mode == "zscore":
            flat = x.flatten(2)
            mean = flat.mean(dim=2)
            std = flat.std(dim=2, unbiased=False).clamp(min=1e-6)
            shape = [x.shape[0], x.shape[1]] + [1] * (x.dim() - 2)
            return (x - mean.reshape(shape)) / std.reshape(shape)
        if self.normalize_mode == "ct_window":
            return (x.clamp(self.ct_low, self.ct_high) - self.ct_low) / (self.ct_high - self.ct_low)
        return x

    @torch.jit.export
    def pad_min(self, image: Tensor, sizes: List[int]) -> Tensor:
        """image (B, C, *spatial) padded to at least ``sizes`` with its per-channel minimum, split evenly."""
        return pad_with_min(image, sizes)[0]

    def _check(self, image: Tensor) -> None:
        if image.dim() != self.spatial_dims + 2:
            raise ValueError("image must be (B, C_in, *spatial) with " + str(self.spatial_dims) + " spatial dims")
        if image.shape[1] != self.in_channels:
            raise ValueError("image must have " + str(self.in_channels) + " channels")

    def _padded(self, image: Tensor) -> Tuple[Tensor, List[int]]:
        self._check(image)
        sizes: List[int] = []
        for s in image.shape[2:]:
            sizes.append(-(-s // self.divisor) * self.divisor)
        return pad_with_min(image.float(), sizes)

    @torch.jit.export
    def sample_context(self, image: Tensor) -> Tensor:
        """The image-level conditioning (B, 2, latent_dim): the prior's mean and scale of the whole image
        (padded as :meth:`forward` pads); an empty (B, 2, 0) for models without one."""
        x, _ = self._padded(image)
        return self._context(x)

    def _context(self, x: Tensor) -> Tensor:
        return torch.zeros([x.shape[0], 2, 0], device=x.device)

    def forward(self, image: Tensor, noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                num_samples: int = 0, context: Optional[Tensor] = None) -> Tensor:
        x, starts = self._padded(image)
        n = num_samples if num_samples > 0 else self.num_samples
        if noise is not None:
            if self.latent_dim == 0:
                raise ValueError("noise: this model has no fixed-size per-sample draw; pass a generator instead")
            if noise.dim() != 3 or noise.shape[2] != self.latent_dim:
                raise ValueError("noise must be (B, S, latent_dim) with latent_dim " + str(self.latent_dim))
            n = noise.shape[1]
        if n < 1:
            raise ValueError("num_samples must be >= 1")
        logits = self._sample(x, n, noise, generator, context)
        return crop_spatial(logits, 3, starts, image.shape[2:])

    def _sample(self, x: Tensor, num_samples: int, noise: Optional[Tensor], g: Optional[torch.Generator],
                context: Optional[Tensor]) -> Tensor:
        raise NotImplementedError("subclass")


def shared_rows(t: Tensor, b: int) -> Tensor:
    """A per-image tensor (1 or B, ...) for B images: a single row is shared by all."""
    if t.shape[0] == 1 and b != 1:
        return t.expand([b] + list(t.shape[1:]))
    return t


# ----------------------------------------------------------------------------- U-Net bodies


class UNetPort(nn.Module):
    """:class:`probunet.models.unet.UNet`'s forward: image -> features (B, features[0], *sp) or logits."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.encoder = EncoderPort(unet.encoder)
        self.decoder = unet.decoder
        self.has_head: bool = unet.head is not None
        self.head = unet.head if unet.head is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        skips = self.encoder(x)
        h = skips[-1]
        n = len(skips)
        j = 0
        for block in self.decoder:
            skip = skips[n - 2 - j]
            h = block(torch.cat([upsample(h, skip.shape[2:]), skip], dim=1))
            j += 1
        if self.has_head:
            h = self.head(h)
        return h


class EncoderPort(nn.Module):
    """:class:`probunet.models.unet.Encoder`: x -> the per-level features."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.pool = encoder.pool
        self.levels = encoder.levels

    def forward(self, x: Tensor) -> List[Tensor]:
        outs: List[Tensor] = []
        i = 0
        for level in self.levels:
            if i > 0:
                x = self.pool(x)
            x = level(x)
            outs.append(x)
            i += 1
        return outs


def latent_draw(params: Tensor, g: Optional[torch.Generator]) -> Tensor:
    """z = mu + sigma * eps of one latent level from its head's output (B, 2K, *sp) on fp32 features,
    as probunet.models.zoo._common.latent_level."""
    params = params.float()
    k = params.shape[1] // 2
    mu = params[:, :k]
    sigma = params[:, k:].clamp(-10.0, 10.0).exp()
    return mu + sigma * randn_from(list(mu.shape), g, mu.device)


__all__ = ["EncoderPort", "ScriptSampler", "UNetPort", "chunk_of", "crop_spatial", "latent_draw", "pad_with_min",
           "rand_from", "randn_from", "shared_rows", "upsample"]
