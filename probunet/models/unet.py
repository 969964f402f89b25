"""The U-Net of the Probabilistic U-Net (Kohl et al. 2018), without a final layer.

Levels with ``features`` channels, ``convs_per_level`` 3x3 convolutions with ReLU
per level, average pooling down, bilinear (trilinear in 3D) upsampling and skip
concatenation up. The last feature map, ``features[0]`` channels at full
resolution, goes to f_comb.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from torch import nn

from .init import init_weights
# The CPU speed machinery lives in ._cpu; these names are re-exported for existing imports.
from ._cpu import flushes_denormals, cat_batch, cpu_parallel_map, split_over_threads, to_channels_last  # noqa: F401


def _norm_arg(norm: Optional[str]):
    if norm is None:
        return None
    if norm == "group":
        return ("group", {"num_groups": 8})
    return norm


def conv_block(spatial_dims: int, in_channels: int, out_channels: int, num_convs: int,
               act="relu", norm: Optional[str] = None) -> nn.Sequential:
    """``num_convs`` 3x3(x3) convolutions + activation, built from MONAI's ``Convolution``."""
    layers = []
    for i in range(num_convs):
        layers.append(Convolution(spatial_dims, in_channels if i == 0 else out_channels, out_channels,
                                  kernel_size=3, act=act, norm=_norm_arg(norm), adn_ordering="NDA"))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """The U-Net's contracting path: image (B, C_in, *spatial) -> list of per-level features.

    Level i has ``features[i]`` channels at resolution spatial / 2**i. Also used,
    with a different ``in_channels``, as the body of the prior and posterior nets.
    """

    def __init__(self, spatial_dims: int, in_channels: int, features: Sequence[int],
                 convs_per_level: int = 3, act="relu", norm: Optional[str] = None):
        super().__init__()
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2)
        self.levels = nn.ModuleList()
        prev = in_channels
        for f in features:
            self.levels.append(conv_block(spatial_dims, prev, f, convs_per_level, act, norm))
            prev = f

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, level in enumerate(self.levels):
            if i > 0:
                x = self.pool(x)
            x = level(x)
            outs.append(x)
        return outs


class UNet(nn.Module):
    """U-Net body: image (B, C_in, *spatial) -> features (B, features[0], *spatial).

    With ``num_classes`` set, a final 1x1 conv gives logits (B, num_classes, *spatial):
    the deterministic segmenter used as a baseline.
    Spatial sizes must be divisible by 2**(len(features) - 1).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1,
                 features: Sequence[int] = (32, 64, 128, 192), convs_per_level: int = 3,
                 act="relu", norm: Optional[str] = None, num_classes: Optional[int] = None,
                 init: str = "he_normal"):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.features = tuple(int(f) for f in features)
        self.out_channels = self.features[0]
        self.encoder = Encoder(spatial_dims, in_channels, self.features, convs_per_level, act, norm)
        self.decoder = nn.ModuleList()
        for i in range(len(self.features) - 2, -1, -1):
            cin = self.features[i + 1] + self.features[i]
            self.decoder.append(conv_block(spatial_dims, cin, self.features[i], convs_per_level, act, norm))
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.head = None
        if num_classes is not None:
            self.head = nn.Conv2d(self.out_channels, num_classes, 1) if spatial_dims == 2 else \
                nn.Conv3d(self.out_channels, num_classes, 1)
        init_weights(self, init)  # see probunet.models.init: He-normal as the reference code

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.features) - 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if split_over_threads(self, image):
            return cat_batch(cpu_parallel_map(self._forward, image.split(1)))
        return self._forward(image)

    def _forward(self, image: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(image)
        x = skips[-1]
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode=self.mode, align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x) if self.head is not None else x
