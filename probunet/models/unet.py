"""The U-Net of the Probabilistic U-Net (Kohl et al. 2018), without a final layer.

Levels with ``features`` channels, ``convs_per_level`` 3x3 convolutions with ReLU
per level, average pooling down, bilinear (trilinear in 3D) upsampling and skip
concatenation up. The last feature map, ``features[0]`` channels at full
resolution, goes to f_comb.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from torch import nn

from .init import init_weights


# ----------------------------------------------------------------------------- CPU inference threads

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_KEY: tuple = ()
_POOL_LOCK = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_KEY
    key = (os.getpid(), workers)  # a forked child rebuilds its own pool
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY != key:
            if _POOL is not None and _POOL_KEY[0] == key[0]:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="probunet-cpu")
            _POOL_KEY = key
        return _POOL


def cpu_parallel_map(fn: Callable, items: Sequence, workers: Optional[int] = None) -> list:
    """``[fn(item) for item in items]``, spread over threads that each run torch ops single-threaded.

    For CPU inference: independent pieces of work (images of a batch, tiles of
    samples) on ``workers`` threads (default: ``torch.get_num_threads()``), each
    one-threaded, instead of every op split over all threads. Small ops keep
    every core busy without a barrier per op, which also keeps the speed on a
    shared machine where a core is taken away now and then. The caller's grad,
    inference and CPU autocast modes carry over to the threads; results come in
    item order and do not depend on the number of workers.
    """
    items = list(items)
    n = min(int(workers or torch.get_num_threads()), len(items))
    if n <= 1:
        return [fn(item) for item in items]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    autocast, ac_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    threads = torch.get_num_threads()
    flush = _flushes_denormals()

    def run(item):
        torch.set_num_threads(1)  # this thread only (the OpenMP/MKL settings are per thread)
        torch.set_flush_denormal(flush)  # a per-thread CPU flag too
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                    torch.autocast("cpu", dtype=ac_dtype, enabled=autocast):
                return fn(item)
        finally:
            torch.set_num_threads(threads)

    return list(_executor(n).map(run, items))


def _flushes_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (``torch.set_flush_denormal``)."""
    with torch.inference_mode():
        return float(torch.full((1,), 1e-39) * 2.0) == 0.0


def split_over_threads(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module``'s forward of ``x`` may run image by image on threads.

    Only for CPU inference (no autograd, eval mode: batch statistics do not mix
    images) of a batch of several images with more than one thread allowed.
    """
    return (x.device.type == "cpu" and x.shape[0] > 1 and not module.training and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and torch.get_num_threads() > 1)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) in channels-last memory order, also when C == 1.

    PyTorch treats a one-channel contiguous tensor as both layouts and runs its
    convolution in NCHW; with channels-last strides (a free view for C == 1)
    the first convolution, and so the whole network, runs channels-last.
    """
    if x.dim() != 4:
        return x
    if x.shape[1] == 1 and x.is_contiguous():
        b, _, h, w = x.shape
        return x.as_strided(x.shape, (h * w, 1, w, 1))
    return x.contiguous(memory_format=torch.channels_last)


def cat_batch(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` along the batch that keeps a channels-last layout."""
    if parts[0].dim() in (4, 5) and parts[0].is_contiguous(
            memory_format=torch.channels_last if parts[0].dim() == 4 else torch.channels_last_3d):
        return torch.cat([p.movedim(1, -1) for p in parts]).movedim(-1, 1)
    return torch.cat(list(parts))


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
