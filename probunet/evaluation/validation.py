"""Validation during training: GED and sample diversity on a fixed subset, drawn through
:mod:`probunet.inference` exactly as ``probunet evaluate`` draws them.

The samples of a validation case are those ``evaluate`` draws for it with the
same checkpoint: the same :class:`probunet.inference.Sampler` settings
(``eval.seed``, the one precision policy: fp32), seeded per case id. So the
checkpoint kept as ``best.pt`` (lowest validation GED) is chosen on the samples
``evaluate`` scores.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..data import real_raters
from ..runtime.distributed import DistInfo, all_reduce
from ..inference.sampler import Sampler, evaluation_sampler, group_by_shape


def case_ids(items: list[dict]) -> list[str]:
    """The id that seeds each item's samples (its ``case_id``, else its position)."""
    return [str(it.get("case_id", i)) for i, it in enumerate(items)]


def validate(model, items: list[dict], cfg, device, dist: Optional[DistInfo] = None) -> dict:
    """``val_ged`` and ``val_sample_diversity`` (means over the cases with a finite value) of
    ``cfg.train.val_samples`` samples per item, the item's real raters as references.

    Under DDP each rank samples its share of the batches and the sums are
    reduced, so every rank returns the same numbers; the samples of a case do not
    depend on the number of ranks (they are seeded per case).
    """
    dist = dist or DistInfo()
    device = torch.device(device)
    sampler = evaluation_sampler(model, cfg.eval, device, roi_size=getattr(cfg.data, "patch_size", None))
    ids = case_ids(items)
    refs = [real_raters(it) for it in items]
    groups = group_by_shape(range(len(items)), sampler.batch_size,
                            lambda i: (tuple(items[i]["image"].shape), tuple(refs[i].shape)))
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # [GED sum, count, diversity sum, count]
    for j in range(dist.rank, len(groups), dist.world_size):
        idx = groups[j]
        image = torch.stack([torch.from_numpy(np.array(items[i]["image"], dtype=np.float32)) for i in idx]).float()
        ref = torch.stack([torch.from_numpy(np.array(refs[i])) for i in idx]).to(device).long()
        summary = sampler.sample([ids[i] for i in idx], image, cfg.train.val_samples, references=ref,
                                 empty_iou=cfg.eval.empty_iou)
        for slot, values in ((0, summary.ged()), (2, summary.sample_diversity)):
            values = values.double().to(device)
            ok = ~torch.isnan(values)
            acc[slot] += torch.where(ok, values, 0).sum()
            acc[slot + 1] += ok.sum()
    all_reduce(acc, dist)
    ged, n_ged, div, n_div = acc.tolist()
    return {"val_ged": ged / n_ged if n_ged else float("nan"),
            "val_sample_diversity": div / n_div if n_div else float("nan")}


def batch_diversity(model, image: torch.Tensor, num_classes: int, device, *, seed: int = 0) -> float:
    """E[d(S,S')] of 4 samples on a few training images (near 0: posterior collapse)."""
    sampler = Sampler(model, seed=seed, device=device, batch_size=max(1, image.shape[0]))
    summary = sampler.sample([f"train-batch:{i}" for i in range(image.shape[0])], image.float().contiguous(), 4)
    return float(summary.sample_diversity.mean())


__all__ = ["batch_diversity", "case_ids", "validate"]
