"""Numeric precision: the autocast dtype of ``amp`` settings, and the autocast context.

Training runs under ``train.amp`` (``auto``: bf16 on GPUs that have it, else
fp16; fp32 on CPUs). Sampling for validation, evaluation and prediction follows
the policy of :mod:`probunet.inference` (fp32 unless amp is asked for there).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for an ``amp`` setting on ``device``; None means full fp32."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op context for None (fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["AMP_CHOICES", "amp_dtype", "autocast"]
