"""The training batches as a function of the step (deterministic, resumable).

The batch of step ``k`` (its cases, their augmentation and, through
:meth:`BatchStream.rater_generator`, the rater the model picks per image)
depends only on ``train.seed``, ``k`` and the rank under DDP, so a run resumed
from a checkpoint sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from . import MultiRaterDataset, real_raters


MAX_BATCH = 65536  # as probunet.config.MAX_BATCH


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of step ``step`` on ``rank`` (rank 0's seeds are those of a single-process run)."""
    return (seed * 1_000_003 + step + rank * 7_919_000_003) % (2**63 - 1)


def pad_raters(labels: np.ndarray, num: int) -> np.ndarray:
    """``labels (A, *spatial)`` padded with empty masks to ``num`` raters."""
    if labels.shape[0] == num:
        return labels
    pad = np.zeros((num - labels.shape[0], *labels.shape[1:]), dtype=labels.dtype)
    return np.concatenate([labels, pad])


class BatchStream:
    """The training batches as a function of the step.

    Case order per epoch comes from a ``DistributedSampler`` (one replica unless
    running under torchrun) reshuffled each epoch; the augmentation of step ``k``
    is seeded by ``(seed, k, rank)``. The whole split is cached as two arrays
    (labels as uint8 where the classes fit); a batch is gathered from them with
    all raters of each image and the number of real ones: the model picks its
    targets (:meth:`probunet.models.base.SegmentationSampler.training_loss`) with
    :meth:`rater_generator` of the step.

    ``dist`` is anything with ``rank`` and ``world_size`` (a
    :class:`probunet.runtime.distributed.DistInfo`).
    """

    def __init__(self, dataset: MultiRaterDataset, batch_size: int, seed: int, dist, transform=None):
        if not 1 <= int(batch_size) <= MAX_BATCH:  # a batch of 1e21 cases would never be gathered
            raise ValueError(f"train.batch_size: must be in [1, {MAX_BATCH}], got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = dist.rank
        self.transform = transform
        self.sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.per_epoch = len(self.sampler)
        self._epoch = None
        self._order: list[int] = []
        items = dataset.items
        self.images = torch.stack([torch.as_tensor(i["image"]) for i in items]).float()  # (N, C, *spatial)
        real = [real_raters(i) for i in items]  # padded-in raters are never training targets
        num_raters = max(r.shape[0] for r in real)
        labels = torch.stack([torch.as_tensor(pad_raters(r, num_raters)) for r in real])
        small = labels.numel() == 0 or (int(labels.min()) >= 0 and int(labels.max()) < 256)
        self.labels = labels.to(torch.uint8) if small else labels.long()  # (N, A, *spatial)
        self.num_raters = torch.tensor([r.shape[0] for r in real])  # (N,) real raters per case

    def batch_indices(self, step: int) -> list[int]:
        out = []
        pos = step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, self.per_epoch)
            if epoch != self._epoch:
                self.sampler.set_epoch(epoch)
                self._order = list(iter(self.sampler))
                self._epoch = epoch
            take = min(self.batch_size - len(out), self.per_epoch - offset)
            out.extend(self._order[offset:offset + take])
            pos += take
        return out

    def rater_generator(self, step: int) -> torch.Generator:
        """The CPU generator with which the model draws the random rater of each image at ``step``."""
        return torch.Generator().manual_seed(step_seed(self.seed, step, self.rank))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image (B, C, *spatial) float32, labels (B, A, *spatial) of all raters (uint8 when
        the classes fit, else int64; raters past ``num_raters`` are empty padding) and
        num_raters (B,) int64."""
        idx = torch.tensor(self.batch_indices(step))
        images, labels = self.images[idx], self.labels[idx]
        if self.transform is not None:
            seed = step_seed(self.seed, step, self.rank)
            self.transform.set_random_state(seed=seed % (2**32))
            outs = [self.transform({"image": im, "labels": lb.long()}) for im, lb in zip(images, labels)]
            images = torch.stack([torch.as_tensor(o["image"]).float() for o in outs])
            labels = torch.stack([torch.as_tensor(o["labels"]).round().to(self.labels.dtype) for o in outs])
        return images, labels, self.num_raters[idx].long()


class StepBatches(torch.utils.data.Dataset):
    """``BatchStream`` as a map-style dataset over steps, for DataLoader workers."""

    def __init__(self, stream: BatchStream, steps: int):
        self.stream, self.steps = stream, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        return self.stream.batch(step)


def batches(stream: BatchStream, start: int, stop: int, device: torch.device, num_workers: int = 0):
    """(step, image, labels, num_raters) for steps ``start..stop-1``, on ``device`` (labels int64).

    With workers, DataLoader processes build the batches ahead (the batch of a
    step does not depend on which process builds it). On CUDA the batches are
    pinned and copied asynchronously.
    """
    pin = device.type == "cuda"
    if num_workers > 0 and stop > start:
        loader = torch.utils.data.DataLoader(
            StepBatches(stream, stop), batch_size=None, sampler=range(start, stop), num_workers=num_workers,
            pin_memory=pin, prefetch_factor=4, persistent_workers=False)
        source = zip(range(start, stop), loader)
    else:
        source = ((step, stream.batch(step)) for step in range(start, stop))
    for step, (image, labels, num_raters) in source:
        if pin and not image.is_pinned():
            image, labels, num_raters = image.pin_memory(), labels.pin_memory(), num_raters.pin_memory()
        yield (step, image.to(device, non_blocking=True), labels.to(device, non_blocking=True).long(),
               num_raters.to(device, non_blocking=True))


__all__ = ["BatchStream", "StepBatches", "batches", "pad_raters", "step_seed"]
