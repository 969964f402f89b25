"""f_comb: combines the U-Net's last feature map with a latent sample z.

z (latent_dim,) is broadcast over space and concatenated with the features, then
``num_layers`` 1x1 convolutions (ReLU between) give the class logits.

The first 1x1 conv of [features; z] is ``W_f * features + W_z * z + b``; the
second term is a per-channel constant over space. It is therefore computed as a
per-sample bias, and for S samples of one image ``W_f * features`` is computed
once and reused: no broadcast latent tensor is ever built.

:meth:`Fcomb.combine` runs the remaining layers once per chunk of samples, all
samples of the chunk in one call of ``Fcomb.rest``. With autograd or on a GPU
that call is one batched convolution over (B*S, F, *spatial). For CPU
inference it is a tiled schedule instead: (sample, pixel) rows of one image go
through the layers as matrix products in two cache-sized buffers that are
reused, tiles spread over the CPU threads, and the last layer writes its
logits straight into the output. The per-sample intermediates never leave the
cache, which is what bounds this memory-bound stage on a CPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._cpu import CPU_TILE_ROWS, CPU_UNIT_ROWS, TiledJob, run_tiled_layers

_TiledJob = TiledJob  # old private name


class _Layers(nn.Sequential):
    """f_comb's layers after the first: ReLU, 1x1 conv, ..., 1x1 conv to logits.

    Called with a tensor (B', F, *spatial) it is the plain ``nn.Sequential``;
    called with a :class:`~probunet.models._cpu.TiledJob` it runs the CPU inference schedule
    (:func:`~probunet.models._cpu.run_tiled_layers`).
    """

    tile_rows = CPU_TILE_ROWS
    unit_rows = CPU_UNIT_ROWS

    def forward(self, x):
        if isinstance(x, TiledJob):
            return self._tiled(x)
        return super().forward(x)

    def _tiled(self, job: TiledJob) -> torch.Tensor:
        return run_tiled_layers(self, job, self.tile_rows, self.unit_rows)


class Fcomb(nn.Module):
    def __init__(self, spatial_dims: int, feature_channels: int, latent_dim: int,
                 num_classes: int, num_layers: int = 4):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.spatial_dims = spatial_dims
        self.feature_channels = feature_channels
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        hidden = feature_channels
        out_first = hidden if num_layers > 1 else num_classes
        # Weights of the first 1x1 conv over [features; z], stored as one matrix.
        self.first = nn.Linear(feature_channels + latent_dim, out_first)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        rest = []
        for i in range(1, num_layers):
            rest.append(nn.ReLU(inplace=True))
            rest.append(conv(hidden, num_classes if i == num_layers - 1 else hidden, 1))
        self.rest = _Layers(*rest)

    def feature_term(self, features: torch.Tensor) -> torch.Tensor:
        """W_f * features: (B, F, *spatial) -> (B, F_out, *spatial)."""
        w = self.first.weight[:, : self.feature_channels]
        w = w.reshape(*w.shape, *([1] * self.spatial_dims))
        return F.conv2d(features, w) if self.spatial_dims == 2 else F.conv3d(features, w)

    def latent_term(self, z: torch.Tensor) -> torch.Tensor:
        """W_z * z + b: (..., latent_dim) -> (..., F_out)."""
        return F.linear(z, self.first.weight[:, self.feature_channels:], self.first.bias)

    def combine(self, feat_term: torch.Tensor, z: torch.Tensor, *,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for S latents per image, all S in one call of the layers.

        feat_term (B, F_out, *spatial) from :meth:`feature_term`, z (B, S, latent_dim)
        -> logits (B, S, C, *spatial). ``out``, optional, is a (B, S, C, *spatial)
        tensor (a view into a larger one is fine) that receives the logits.
        """
        if self.uses_tiled_path(feat_term):
            return self._combine_tiled(feat_term, z, out)
        logits = self._combine_batched(feat_term, z)
        if out is None:
            return logits
        return out.copy_(logits)

    @torch.no_grad()
    def start_at_prior(self, foreground: float, weight_scale: float = 0.1) -> None:
        """Start the logits at a class prior (the prior-probability initialisation of Lin et al.
        2017, RetinaNet): the last layer's bias gives background probability ``1 - foreground``
        and each of the C-1 other classes ``foreground / (C-1)``; its weights are scaled by
        ``weight_scale`` so that the features move the logits little at first.

        Why: with He-normal weights a U-Net starts at about 50% foreground per pixel. Where
        lesions are a few per mille of a patch's voxels (small lesions in 3D patches), the
        quickest way down from there is through z, a bias over the whole patch: the posterior's
        mean then runs off to hundreds with its log-sigma at the clamp's floor and the prior's at
        its ceiling, where their gradients stop, and samples from the prior mark whole patches.
        """
        if not 0.0 < foreground < 1.0:
            raise ValueError(f"foreground must be in (0, 1), got {foreground}")
        last = self.rest[-1] if len(self.rest) else self.first
        c = self.num_classes
        bias = torch.full((c,), math.log(foreground / (c - 1)) - math.log1p(-foreground))
        bias[0] = 0.0
        last.weight.mul_(weight_scale)
        last.bias.copy_(bias)

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """features (B, F, *spatial), z (B, latent_dim) -> logits (B, C, *spatial)."""
        return self.combine(self.feature_term(features), z.unsqueeze(1)).squeeze(1)

    # ------------------------------------------------------------------ paths

    def uses_tiled_path(self, feat_term: torch.Tensor) -> bool:
        """CPU inference (no autograd) with at least one layer after the first."""
        if feat_term.device.type != "cpu" or len(self.rest) == 0 or torch.compiler.is_compiling():
            return False
        return not (torch.is_grad_enabled() and (feat_term.requires_grad or self.first.weight.requires_grad))

    def _combine_batched(self, feat_term: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B*S, F_out, *spatial) intermediates; differentiable."""
        b, s = z.shape[:2]
        bias = self.latent_term(z.to(feat_term.dtype))  # (B, S, F_out)
        bias = bias.reshape(b, s, -1, *([1] * self.spatial_dims))
        h = feat_term.unsqueeze(1) + bias  # (B, S, F_out, *spatial)
        h = h.flatten(0, 1)  # (B*S, F_out, *spatial)
        if self.spatial_dims == 2 and feat_term.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous(memory_format=torch.channels_last)
        elif self.spatial_dims == 3 and feat_term.is_contiguous(memory_format=torch.channels_last_3d):
            h = h.contiguous(memory_format=torch.channels_last_3d)
        out = self.rest(h)  # (B*S, C, *spatial)
        return out.reshape(b, s, *out.shape[1:])

    def _combine_tiled(self, feat_term: torch.Tensor, z: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The CPU inference path; the same logits as :meth:`_combine_batched`."""
        with torch.autocast("cpu", enabled=False):
            dt = feat_term.dtype
            b, f = feat_term.shape[:2]
            s = z.shape[1]
            spatial = tuple(feat_term.shape[2:])
            p = math.prod(spatial)
            # Pixel-major (B, P, F): a view when feat_term is channels-last, else one copy.
            feat_pm = feat_term.movedim(1, -1).reshape(b, p, f)
            w_z = self.first.weight[:, self.feature_channels:].to(dt)
            bias = F.linear(z.to(dt), w_z, self.first.bias.to(dt))  # (B, S, F): W_z * z + b
            c = self.num_classes
            flat = None
            if out is not None and out.dtype == dt:
                try:
                    flat = out.view(b, s, c, p)
                except RuntimeError:  # not viewable: fill a fresh tensor, copy below
                    flat = None
            target = flat if flat is not None else torch.empty(b, s, c, p, dtype=dt)
            self.rest(TiledJob(feat_pm, bias, target))
            logits = target.view(b, s, c, *spatial)
            if out is None:
                return logits
            if flat is None:
                out.copy_(logits)
            return out
