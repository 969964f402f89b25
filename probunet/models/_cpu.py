"""CPU speed machinery of the models (private): a thread map and the tiled f_comb schedule.

For CPU inference (no autograd) two things keep every core busy without a
barrier per op, which also keeps the speed on a shared machine where a core is
taken away now and then:

- :func:`cpu_parallel_map` runs independent pieces of work (the images of a
  batch, tiles of samples) on threads that each run torch ops single-threaded;
  the U-Net and the latent encoders use it through :func:`split_over_threads`.
- :func:`run_tiled_layers` is f_comb's tiled schedule (see
  :mod:`probunet.models.fcomb`): (sample, pixel) rows of one image go through
  the 1x1 convolutions as matrix products in cache-sized buffers.

:func:`to_channels_last` and :func:`cat_batch` keep the channels-last layout
that oneDNN (CPU) and cuDNN (GPU) convolutions run fastest in.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

# ----------------------------------------------------------------------------- thread map

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
    flush = flushes_denormals()

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


def flushes_denormals() -> bool:
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
    """``x`` (B, C, H, W) in channels-last memory order (B, C, D, H, W: channels-last-3d), also
    when C == 1; other ranks unchanged.

    PyTorch treats a one-channel contiguous tensor as both layouts and runs its
    convolution in the standard layout; with channels-last strides (a free view
    for C == 1) the first convolution, and so the whole network, runs channels-last.
    """
    if x.dim() not in (4, 5):
        return x
    if x.shape[1] == 1 and x.is_contiguous():
        spatial = x.shape[2:]
        inner = 1
        strides = []
        for s in reversed(spatial):
            strides.append(inner)
            inner *= s
        return x.as_strided(x.shape, (inner, 1, *reversed(strides)))
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def cat_batch(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` along the batch that keeps a channels-last layout."""
    if parts[0].dim() in (4, 5) and parts[0].is_contiguous(
            memory_format=torch.channels_last if parts[0].dim() == 4 else torch.channels_last_3d):
        return torch.cat([p.movedim(1, -1) for p in parts]).movedim(-1, 1)
    return torch.cat(list(parts))


# ----------------------------------------------------------------------------- tiled f_comb

# Rows ((sample, pixel) pairs) per tile of the CPU inference path: its two
# (rows, hidden) fp32 buffers (2 MiB each at 32 channels) stay in the cache.
CPU_TILE_ROWS = 16384
# Rows per unit of work handed to a thread (a few tiles, to amortise the hand-off).
CPU_UNIT_ROWS = 4 * CPU_TILE_ROWS


@dataclass
class TiledJob:
    """Arguments of one tiled call of f_comb's layers (CPU inference)."""

    feat_pm: torch.Tensor  # (B, P, F) pixel-major W_f * features
    bias: torch.Tensor  # (B, S, F) W_z * z + b of this chunk's samples
    out: torch.Tensor  # (B, S, C, P) where the logits go


@torch.no_grad()
def run_tiled_layers(layers: nn.Sequential, job: TiledJob, tile_rows: int = CPU_TILE_ROWS,
                     unit_rows: int = CPU_UNIT_ROWS) -> torch.Tensor:
    """f_comb's layers after the first (ReLU, 1x1 conv, ..., 1x1 conv) on ``job``, tile by tile.

    The (sample, pixel) rows of one image go through the layers as matrix
    products in two cache-sized buffers per thread, reused; units of a few
    tiles are spread over the CPU threads (:func:`cpu_parallel_map`) and the
    last layer writes its logits straight into ``job.out``. Returns ``job.out``.
    """
    a, bias, out = job.feat_pm, job.bias, job.out
    b, p, f = a.shape
    s = bias.shape[1]
    dt = a.dtype
    convs = [m for m in layers if not isinstance(m, nn.ReLU)]
    hidden = [(m.weight.reshape(m.out_channels, -1).t().to(dt), m.bias.to(dt)) for m in convs[:-1]]
    w_last = convs[-1].weight.reshape(convs[-1].out_channels, -1).to(dt)  # (C, F)
    b_last = convs[-1].bias.to(dt).reshape(1, -1, 1)
    c = w_last.shape[0]
    rows = max(1, int(tile_rows))
    if p <= rows:
        per_tile, pix = max(1, rows // p), p  # a tile is several whole samples
    else:
        per_tile, pix = 1, rows  # a tile is a range of pixels of one sample
    per_unit = per_tile * max(1, int(unit_rows) // (per_tile * min(p, pix)))
    units = [(i, s0, min(s, s0 + per_unit)) for i in range(b) for s0 in range(0, s, per_unit)]
    local = threading.local()  # each thread's two tile buffers, reused across its units

    def run(unit) -> None:
        i, s_begin, s_end = unit
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = [torch.empty(per_tile * pix, f, dtype=dt) for _ in range(2)]
        for s0 in range(s_begin, s_end, per_tile):
            k = min(per_tile, s_end - s0)
            for p0 in range(0, p, pix):
                n = min(pix, p - p0)
                h, other = buf[0][: k * n], buf[1][: k * n]
                # layer 1 = W_f * features + (W_z * z + b), then ReLU: (k, n, F)
                torch.add(a[i, p0:p0 + n].unsqueeze(0), bias[i, s0:s0 + k].unsqueeze(1), out=h.view(k, n, f))
                h.relu_()
                for w_t, bb in hidden:  # hidden 1x1 conv: (rows, F) @ (F, F) + b, ReLU
                    torch.addmm(bb, h, w_t, out=other)
                    other.relu_()
                    h, other = other, h
                # last 1x1 conv, as (k, C, n) blocks of the (B, S, C, P) output
                hk = h.view(k, n, f).transpose(1, 2)
                dst = out[i, s0:s0 + k, :, p0:p0 + n]
                if dst.is_contiguous():
                    torch.baddbmm(b_last, w_last.expand(k, c, f), hk, out=dst)
                else:
                    dst.copy_(torch.baddbmm(b_last, w_last.expand(k, c, f), hk))

    cpu_parallel_map(run, units)
    return out
