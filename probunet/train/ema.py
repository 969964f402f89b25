"""An exponential moving average of the weights (Polyak averaging), ``train.ema_decay``.

Sample quality is judged on one set of weights; with a constant learning rate
the last iterate wanders from step to step, and so do the GED and the samples.
The average of the recent iterates is smoother and usually better. With
``train.ema_decay`` set, the trainer keeps such an average next to the weights
it optimises, validates and samples with the average, and writes it as the
checkpoint's ``model`` (what ``evaluate`` and ``predict`` load); the optimised
weights go in ``model_train``, from which ``--resume`` continues.

The decay of update ``t`` (0-based) is ``min(decay, (1 + t) / (10 + t))``: the
average starts close to the current weights and lengthens its memory to the
configured ``1 / (1 - decay)`` steps. Integer buffers (counters) are copied.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def decay_at(decay: float, updates: int) -> float:
    """The decay used by update number ``updates`` (0-based)."""
    return min(float(decay), (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """An exponential moving average of a module's floating-point state.

    ``update(model)`` after each optimizer step; ``state_dict()`` is a state dict
    of the model's own keys (load it into the model to sample with the average);
    ``applied(model)`` swaps the average in for the duration of a ``with`` block.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = decay_at(self.decay, self.updates)
        floats_avg, floats_new = [], []
        for k, v in model.state_dict().items():
            avg = self.shadow[k]
            if avg.is_floating_point():
                floats_avg.append(avg)
                floats_new.append(v.detach())
            else:
                avg.copy_(v)
        if floats_avg:
            torch._foreach_lerp_(floats_avg, floats_new, 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load(self, shadow: dict, updates: int) -> None:
        """Restore the average (a model state dict) and its update count, e.g. on resume."""
        missing = set(self.shadow) ^ set(shadow)
        if missing:
            raise KeyError(f"the averaged weights do not match the model: {sorted(missing)[:3]}")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.updates = int(updates)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the averaged weights inside the block, its own weights restored after."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(own)


__all__ = ["WeightAverage", "decay_at"]
