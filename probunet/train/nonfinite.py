"""The NaN guard of training: non-finite steps counted on the device, looked at every few steps.

:class:`NonFiniteGuard` keeps its counters as device tensors, so recording a
step's verdict (:meth:`NonFiniteGuard.record`) never synchronises with the
host; :meth:`NonFiniteGuard.check` is the one place the host reads them. It
logs skipped steps, and stops training (:class:`TrainingError`) after
``max_bad`` non-finite steps in a row or when the weights themselves are no
longer finite (a step that was finite but too large).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from ..models.checkpoint import non_finite

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (for example repeated non-finite losses)."""


class NonFiniteGuard:
    """Device-side bookkeeping of non-finite steps.

    Args:
        device: where the counters live (the training device).
        max_bad: non-finite steps in a row that stop training (``train.max_bad_steps``).
        params: the trained parameters (their finiteness is checked by :meth:`check`).
        state_dict: returns the model's state dict (to name a non-finite weight).
        kept: returns a sentence on the checkpoint that stays (for the error message).
    """

    def __init__(self, device: torch.device, max_bad: int, params: Sequence[torch.Tensor],
                 state_dict: Callable[[], dict], kept: Callable[[], str]):
        self.max_bad = int(max_bad)
        self.params = list(params)
        self.state_dict, self.kept = state_dict, kept
        self.zero = torch.zeros((), device=device)
        self.run = self.zero.clone()  # non-finite steps in a row
        self.total = self.zero.clone()  # since the last check
        self.trip = torch.full((), -1.0, device=device)  # the step where `run` reached max_bad
        self.last = torch.full((), -1.0, device=device)  # the last non-finite step

    def record(self, bad: torch.Tensor, step: int) -> None:
        """Count the verdict ``bad`` (bool tensor on the device) of ``step``; no host sync."""
        badf = bad.float()
        self.run = self.run * badf + badf
        self.total = self.total + badf
        self.last = torch.where(bad, float(step), self.last)
        self.trip = torch.where((self.run >= self.max_bad) & (self.trip < 0), float(step), self.trip)

    def check(self, done: int) -> None:
        """Read the counters (one host sync): log skipped steps, raise :class:`TrainingError` when
        training cannot go on."""
        total, _, trip, last = (int(v) for v in torch.stack([self.total, self.run, self.trip, self.last]).tolist())
        if total:
            logger.warning("non-finite loss or gradients: %d step(s) skipped up to step %d (last at step %d)",
                           total, done, last)
            self.total = self.zero.clone()
        if trip >= 0:
            raise TrainingError(f"loss was NaN/Inf {self.max_bad} times in a row, last at step {trip}; "
                                f"lower train.lr, set train.amp=off, or check the data; {self.kept()}")
        self.check_weights(done)

    def check_weights(self, done: int) -> None:
        """Stop when the weights themselves went non-finite (a step that was finite but too large)."""
        if bool(torch.stack([torch.isfinite(p.detach()).all() for p in self.params]).all()):
            return
        names = non_finite({"model": self.state_dict()})
        raise TrainingError(f"step {done}: the model weights are no longer finite (NaN/Inf in "
                            f"{names[0] if names else 'a parameter'}): the training cannot take a finite step; "
                            f"lower train.lr or check the data; training stopped, {self.kept()}")


__all__ = ["NonFiniteGuard", "TrainingError"]
