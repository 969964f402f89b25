"""Numeric precision: what an ``amp`` setting resolves to, the memory layout that goes with it,
and the autocast context.

``amp`` is one of ``auto``, ``bf16``, ``fp16``, ``off`` (``train.amp``, ``eval.amp``,
``predict --amp``). It resolves, as a pure function of the setting, the device
and the CPU's capability (:func:`resolve_amp`), to an autocast dtype:

- ``auto`` on a CUDA GPU: bf16 where the GPU supports it, else fp16 (with a
  GradScaler in training);
- ``auto`` on a CPU: bf16 where the CPU has bf16 matrix units, AMX or
  AVX512-BF16 (asked of torch, :func:`cpu_capability`), where oneDNN runs the
  convolutions about 3x faster than in fp32; fp32 (no autocast) elsewhere;
- ``bf16`` / ``fp16``: that dtype; ``bf16`` on a CPU without those units is
  allowed but several times slower than fp32, and says so in one warning line;
- ``off``: fp32.

Whenever the autocast dtype is bf16 the model and its input run channels-last
(``channels_last_3d`` in 3D; :func:`uses_channels_last`), the layout oneDNN's
and cuDNN's bf16 convolutions are fastest in. Checkpoints are written in the
standard (contiguous) layout whatever the layout of training, so they load and
resume under either.

Under autocast only the convolutions and matrix products run in bf16: the
Gaussian heads' mu, log-sigma and sigma, the KL and its free-bits floor, the
cross-entropy and every metric are computed in fp32 (the models leave autocast
for them). Training resolves ``train.amp`` (default ``auto``). Sampling for
validation and evaluation keeps fp32 unless asked (``eval.amp``, default
``off``), and ``predict`` unless ``--amp`` is given: see :mod:`probunet.inference`.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

logger = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "off", "bf16", "fp16")

# CPU capabilities (as :func:`cpu_capability` names them) under which bf16 autocast is fast
FAST_BF16_CPU = ("amx_bf16", "avx512_bf16")


def cpu_capability() -> str:
    """The CPU's bf16 matrix units as torch reports them: ``amx_bf16`` (AMX tiles), ``avx512_bf16``,
    or ``none``. Asked of torch (its cpuinfo), never of /proc."""
    cpu = getattr(torch, "cpu", None)

    def ask(name: str) -> bool:
        fn = getattr(cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except Exception:  # an older torch without the probe: no such unit
            return False

    if ask("_is_amx_tile_supported"):
        return "amx_bf16"
    if ask("_is_avx512_bf16_supported"):
        return "avx512_bf16"
    return "none"


def cpu_description() -> str:
    """torch's CPU kernel level and the bf16 units, e.g. ``AVX512, avx512_bf16`` (for summaries)."""
    try:
        level = torch.backends.cpu.get_cpu_capability()
    except Exception:
        level = "unknown"
    return f"{level}, {cpu_capability()}"


def resolve_amp(amp: str, device_type: str, capability: str = "none",
                cuda_bf16: bool = False) -> tuple[Optional[torch.dtype], Optional[str]]:
    """The autocast dtype of ``amp`` on a device of type ``device_type`` (None: fp32), and a warning
    (or None). A pure function: ``capability`` is the CPU's (:func:`cpu_capability`), ``cuda_bf16``
    whether the GPU supports bf16."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    fast_cpu = capability in FAST_BF16_CPU
    if amp == "off":
        return None, None
    if amp == "auto":
        if device_type == "cuda":
            return (torch.bfloat16 if cuda_bf16 else torch.float16), None
        if device_type == "cpu" and fast_cpu:
            return torch.bfloat16, None
        return None, None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device_type == "cpu" and dtype == torch.bfloat16 and not fast_cpu:
        return dtype, ("amp bf16 on a CPU without bf16 units (AMX or AVX512-BF16; torch reports "
                       f"{capability!r}): bf16 runs emulated there, several times slower than fp32 "
                       "(amp off or auto is faster)")
    return dtype, None


_WARNED: set = set()


def amp_dtype(amp: str, device: torch.device, *, capability: Optional[str] = None) -> Optional[torch.dtype]:
    """The autocast dtype for an ``amp`` setting on ``device``; None means full fp32. Logs
    :func:`resolve_amp`'s warning (once per process)."""
    device = torch.device(device)
    if capability is None:
        capability = cpu_capability() if device.type == "cpu" else "none"
    cuda_bf16 = device.type == "cuda" and amp == "auto" and torch.cuda.is_bf16_supported()
    dtype, warning = resolve_amp(amp, device.type, capability, cuda_bf16)
    if warning and warning not in _WARNED:
        _WARNED.add(warning)
        logger.warning(warning)
    return dtype


def uses_channels_last(dtype: Optional[torch.dtype], setting: Optional[bool] = None, *,
                       device_type: str = "cpu", spatial_dims: int = 2) -> bool:
    """Whether a model runs channels-last: ``setting`` (``train.channels_last``) when given, else
    whenever the autocast dtype is bf16 (CPU and GPU), and for 2D models on a GPU."""
    if setting is not None:
        return bool(setting)
    return dtype == torch.bfloat16 or (device_type == "cuda" and spatial_dims == 2)


@dataclass(frozen=True)
class Precision:
    """A resolved precision: autocast dtype and layout, and the CPU it was resolved for."""

    dtype: Optional[torch.dtype]
    channels_last: bool
    cpu: str = ""

    @property
    def label(self) -> str:
        """``fp32``, ``bf16``, ``fp16``, with ``+channels_last`` when the layout is channels-last."""
        name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return name + ("+channels_last" if self.channels_last else "")


def memory_format(spatial_dims: int) -> torch.memory_format:
    """The channels-last memory format of a model with ``spatial_dims`` spatial axes."""
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def bf16_conv_hazards(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s convolutions whose shapes torch's CPU bf16 kernels are known to get wrong:
    a stride of 3 on some axis (pytorch/pytorch#169688) and a 3D convolution with a stride > 1
    (AMX, wrong where an output axis is 1 wide: pytorch/pytorch#188426). probunet's models have
    none (stride-1 convolutions, pooling down); a model with one trains in fp32 on a CPU."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            stride = tuple(m.stride)
            if 3 in stride or (isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and max(stride) > 1):
                found.append(name or type(m).__name__)
    return found


def guard_bf16_convs(model: torch.nn.Module, dtype: Optional[torch.dtype], amp: str, device: torch.device,
                     key: str = "amp") -> Optional[torch.dtype]:
    """``dtype``, unless it is bf16 on a CPU and ``model`` has a convolution of :func:`bf16_conv_hazards`:
    then fp32 (with a log line) for ``amp: auto``, and a ValueError naming ``key`` for ``amp: bf16``."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return dtype
    hazards = bf16_conv_hazards(model)
    if not hazards:
        return dtype
    what = (f"convolution(s) {', '.join(hazards[:3])} have strides torch's CPU bf16 kernels compute wrongly "
            f"(stride 3, or a strided 3D convolution)")
    if amp == "auto":
        logger.info("%s: %s; running in fp32", key, what)
        return None
    raise ValueError(f"{key}={amp}: {what}; use {key}=off")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op context for None (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["AMP_CHOICES", "FAST_BF16_CPU", "Precision", "amp_dtype", "autocast", "bf16_conv_hazards",
           "cpu_capability", "cpu_description", "guard_bf16_convs", "memory_format", "resolve_amp",
           "uses_channels_last"]
