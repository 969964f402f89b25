"""f_comb: combines the U-Net's last feature map with a latent sample z.

z (latent_dim,) is broadcast over space and concatenated with the features, then
``num_layers`` 1x1 convolutions (ReLU between) give the class logits.

The first 1x1 conv of [features; z] is ``W_f * features + W_z * z + b``; the
second term is a per-channel constant over space. It is therefore computed as a
per-sample bias, and for S samples of one image ``W_f * features`` is computed
once and reused: no broadcast latent tensor is ever built.

Without autograd on a CPU, :meth:`Fcomb.combine` runs the remaining 1x1 convs as
matrix products over cache-sized tiles of (sample, pixel) rows, in reused
buffers, writing the logits straight into the output: the per-sample
intermediates never leave the cache. Everywhere else (training, CUDA) it runs
them as one batched convolution per chunk of samples.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Rows (pixels x samples) per tile of the CPU inference path: two (rows, hidden)
# buffers of this size stay in the L2/L3 cache.
CPU_TILE_ROWS = 16384


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
        self.rest = nn.Sequential(*rest)
        self.tile_rows = CPU_TILE_ROWS

    def feature_term(self, features: torch.Tensor) -> torch.Tensor:
        """W_f * features: (B, F, *spatial) -> (B, F_out, *spatial)."""
        w = self.first.weight[:, : self.feature_channels]
        w = w.reshape(*w.shape, *([1] * self.spatial_dims))
        return F.conv2d(features, w) if self.spatial_dims == 2 else F.conv3d(features, w)

    def latent_term(self, z: torch.Tensor) -> torch.Tensor:
        """W_z * z + b: (..., latent_dim) -> (..., F_out)."""
        return F.linear(z, self.first.weight[:, self.feature_channels:], self.first.bias)

    def combine(self, feat_term: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits for S latents per image.

        feat_term (B, F_out, *spatial) from :meth:`feature_term`, z (B, S, latent_dim)
        -> logits (B, S, C, *spatial).
        """
        if self._use_tiled(feat_term):
            return self._combine_tiled(feat_term, z)
        return self._combine_batched(feat_term, z)

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """features (B, F, *spatial), z (B, latent_dim) -> logits (B, C, *spatial)."""
        return self.combine(self.feature_term(features), z.unsqueeze(1)).squeeze(1)

    # ------------------------------------------------------------------ paths

    def _use_tiled(self, feat_term: torch.Tensor) -> bool:
        if feat_term.device.type != "cpu" or len(self.rest) == 0:
            return False
        if torch.is_grad_enabled() and (feat_term.requires_grad or self.first.weight.requires_grad):
            return False  # autograd needs the differentiable path
        return True

    def _combine_batched(self, feat_term: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """All S samples of the batch in one call: (B*S, F_out, *spatial) intermediates."""
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

    @torch.no_grad()
    def _combine_tiled(self, feat_term: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The CPU inference path; same result as :meth:`_combine_batched`.

        Rows are (sample, pixel) pairs of one image; a tile of rows goes through
        bias + ReLU, then every hidden 1x1 conv as ``addmm`` + in-place ReLU in
        two reused buffers, and the last conv writes (C, pixels) blocks of the
        output directly, so the result is an ordinary contiguous tensor.
        """
        with torch.autocast("cpu", enabled=False):
            dt = feat_term.dtype
            b, f = feat_term.shape[:2]
            s = z.shape[1]
            spatial = tuple(feat_term.shape[2:])
            p = math.prod(spatial)
            # Pixel-major view (B, P, F): free when feat_term is channels-last.
            a = feat_term.movedim(1, -1).reshape(b, p, f)
            bias = self.latent_term(z.to(dt))  # (B, S, F)
            convs = [m for m in self.rest if not isinstance(m, nn.ReLU)]
            hidden = [(m.weight.reshape(m.out_channels, -1).t().to(dt), m.bias.to(dt)) for m in convs[:-1]]
            last = convs[-1]
            w_last = last.weight.reshape(last.out_channels, -1).to(dt)  # (C, F)
            b_last = last.bias.to(dt).reshape(1, -1, 1)
            c = w_last.shape[0]
            out = torch.empty(b, s, c, p, dtype=dt, device=feat_term.device)  # (B, S, C, P)

            rows = max(1, int(self.tile_rows))
            if p <= rows:
                per_tile, pix = max(1, rows // p), p  # whole images, several samples
            else:
                per_tile, pix = 1, rows  # one sample, a range of pixels
            buf = [torch.empty(per_tile * pix, f, dtype=dt) for _ in range(2)]
            for i in range(b):
                for s0 in range(0, s, per_tile):
                    k = min(per_tile, s - s0)
                    for p0 in range(0, p, pix):
                        n = min(pix, p - p0)
                        h = buf[0][: k * n]
                        # layer 1: W_f * features + (W_z * z + b), ReLU   (k, n, F)
                        torch.add(a[i, p0:p0 + n].unsqueeze(0), bias[i, s0:s0 + k].unsqueeze(1),
                                  out=h.view(k, n, f))
                        h.relu_()
                        other = buf[1][: k * n]
                        for w_t, bb in hidden:  # 1x1 conv = (rows, F) @ (F, F_out) + b, ReLU
                            torch.addmm(bb, h, w_t, out=other)
                            other.relu_()
                            h, other = other, h
                        # last 1x1 conv, written as (k, C, n) logits blocks
                        dst = out[i, s0:s0 + k, :, p0:p0 + n]
                        hk = h.view(k, n, f).transpose(1, 2)
                        if dst.is_contiguous():
                            torch.baddbmm(b_last, w_last.expand(k, c, f), hk, out=dst)
                        else:
                            dst.copy_(torch.baddbmm(b_last, w_last.expand(k, c, f), hk))
            return out.view(b, s, c, *spatial)
