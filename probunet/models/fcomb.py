"""f_comb: combines the U-Net's last feature map with a latent sample z.

z (latent_dim,) is broadcast over space and concatenated with the features, then
``num_layers`` 1x1 convolutions (ReLU between) give the class logits.

The first 1x1 conv of [features; z] is ``W_f * features + W_z * z + b``; the
second term is a per-channel constant over space. It is therefore computed as a
per-sample bias, and for S samples of one image ``W_f * features`` is computed
once and reused: no broadcast latent tensor is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Fcomb(nn.Module):
    def __init__(self, spatial_dims: int, feature_channels: int, latent_dim: int,
                 num_classes: int, num_layers: int = 4):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.spatial_dims = spatial_dims
        self.feature_channels = feature_channels
        self.latent_dim = latent_dim
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
        b, s = z.shape[:2]
        bias = self.latent_term(z.to(feat_term.dtype))  # (B, S, F_out)
        bias = bias.reshape(b, s, -1, *([1] * self.spatial_dims))
        h = feat_term.unsqueeze(1) + bias  # (B, S, F_out, *spatial)
        h = h.flatten(0, 1)  # (B*S, F_out, *spatial)
        if self.spatial_dims == 2 and feat_term.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous(memory_format=torch.channels_last)
        out = self.rest(h)  # (B*S, C, *spatial)
        return out.reshape(b, s, *out.shape[1:])

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """features (B, F, *spatial), z (B, latent_dim) -> logits (B, C, *spatial)."""
        return self.combine(self.feature_term(features), z.unsqueeze(1)).squeeze(1)
