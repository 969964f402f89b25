"""One optimizer step without a host-device synchronisation (non-finite steps skipped on the device)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..runtime.distributed import DistInfo, all_reduce


def lr_at(step: int, steps: int, lr: float, schedule: str = "constant", final_fraction: float = 0.0) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``: a function of the step alone, so a
    resumed run continues the same schedule. ``cosine``: half a cosine from ``lr`` at step 0 down to
    ``lr * final_fraction`` at the last step (Loshchilov and Hutter 2017, without restarts)."""
    if schedule == "constant" or steps <= 1:
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    progress = min(max(step, 0), steps - 1) / (steps - 1)
    return lr * (final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      params: list, *, grad_clip: Optional[float] = None,
                      dist: Optional[DistInfo] = None) -> torch.Tensor:
    """Backward pass and optimizer step without a host-device synchronisation.

    The step is skipped when the loss or a gradient is not finite: by the
    GradScaler with fp16 (which also skips, and backs off from, the overflows
    of its scaled gradients: those are not counted as bad), else by the fused
    Adam kernel's ``found_inf`` (an optimizer without it falls back to a
    synchronising check). Under DDP the verdict is the same on every rank.
    Returns the verdict, a bool tensor (True: non-finite loss or gradients)
    left on the device.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    bad = ~torch.isfinite(loss.detach().float())
    if grad_clip:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    elif not scaler.is_enabled():
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
    else:
        norm = None
    if norm is not None and not scaler.is_enabled():
        # fp16's scaled gradients overflow now and then by design: the scaler's business, not a bad step
        bad = bad | ~torch.isfinite(norm.float())
    if dist is not None and dist.world_size > 1:
        bad = all_reduce(bad.float(), dist, "max") > 0
    if scaler.is_enabled():  # fp16: the scaler skips inf/NaN gradient steps and backs off its scale
        scaler.step(optimizer)
        scaler.update()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        # fused Adam: the kernel reads found_inf on the device and skips the update (and the step count)
        optimizer.grad_scale = None
        optimizer.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(bad):  # other optimizers: one synchronisation per step
        optimizer.step()
    return bad


def fused_adam_ok(device: torch.device) -> bool:
    """Whether torch's fused Adam kernel runs on ``device``."""
    return device.type in ("cuda", "cpu")


__all__ = ["backward_and_step", "fused_adam_ok"]
