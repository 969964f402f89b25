"""Training patches from the preprocessed cache (``data.patch_size``).

:class:`PatchStream` gives the batch of a step as :class:`probunet.data.stream.BatchStream`
does, but each image is a patch of ``data.patch_size`` read from its case's
memory-mapped ``.npy`` files (only the patch is read, never the whole volume;
worker processes open their own maps). Which cases, where the patches sit and
their augmentation are a function of ``(train.seed, step, rank)``, so a resumed
run reads exactly the patches of an uninterrupted one.

Placement (nnU-Net's scheme): each patch is, with probability
``data.foreground_oversample``, centred on a voxel that at least one rater
marked (drawn from the foreground locations in the cache's index), otherwise
placed uniformly; patches lie inside the case. A case smaller than the patch
along an axis is padded (image with its minimum, masks with background), noted
once in the log.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from .stream import BatchStream, step_seed
from .transforms import crop_sizes

logger = logging.getLogger(__name__)


class PatchStream:
    """Training batches of patches: ``batch(step)`` -> image (B, C, *patch) float32, labels
    (B, A, *patch) uint8 (raters past a case's own are empty padding) and num_raters (B,) int64.

    ``items`` come from :func:`probunet.data.preprocess.cached_items` (``meta["cache"]`` names
    the files); only their paths, shapes and foreground locations are kept.
    """

    def __init__(self, items: Sequence[dict], patch_size, batch_size: int, seed: int, dist, *,
                 foreground_oversample: float = 1 / 3, transform=None):
        if not items:
            raise ValueError("no training cases")
        nd = len(items[0]["image"].shape) - 1
        self.patch = crop_sizes(patch_size, nd)
        self.batch_size, self.seed, self.rank = int(batch_size), int(seed), dist.rank
        self.oversample = float(foreground_oversample)
        self.transform = transform
        self.case_ids = [str(i["case_id"]) for i in items]
        self.files = [(i["meta"]["cache"]["image"], i["meta"]["cache"]["raters"]) for i in items]
        self.shapes = [tuple(int(s) for s in i["image"].shape[1:]) for i in items]
        self.channels = int(items[0]["image"].shape[0])
        self.fill = [np.asarray(i["meta"]["cache"]["image_min"], np.float32) for i in items]
        self.foreground = [np.asarray(i["meta"]["cache"]["foreground"], np.int64).reshape(-1, nd) for i in items]
        present = [i["meta"].get("rater_present") or [True] * i["labels"].shape[0] for i in items]
        self.max_raters = max(len(p) for p in present)
        self.num_raters = torch.tensor([int(i["labels"].shape[0]) for i in items])  # (N,) real raters per case
        self.sampler = DistributedSampler(range(len(items)), num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=self.seed, drop_last=False)
        self.per_epoch = len(self.sampler)
        self._epoch, self._order = None, []
        self._maps: dict = {}
        self._pid = None
        small = [(c, s) for c, s in zip(self.case_ids, self.shapes) if any(n < p for n, p in zip(s, self.patch))]
        if small:
            shown = ", ".join(f"{c} {list(s)}" for c, s in small[:5]) + (" ..." if len(small) > 5 else "")
            logger.warning("%d case(s) smaller than data.patch_size %s along some axis are padded (image with its "
                           "minimum, masks with background): %s", len(small), list(self.patch), shown)
        no_fg = sum(len(f) == 0 for f in self.foreground)
        if no_fg and self.oversample > 0:
            logger.info("%d of %d case(s) have no foreground: their patches are placed uniformly", no_fg, len(items))

    batch_indices = BatchStream.batch_indices
    rater_generator = BatchStream.rater_generator

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = {}, None  # each process opens its own memory maps
        return state

    def _arrays(self, i: int):
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if i not in self._maps:
            if len(self._maps) > 64:  # bound the open maps (each map is an address range, not memory)
                self._maps.clear()
            ip, rp = self.files[i]
            self._maps[i] = (np.load(ip, mmap_mode="r"), np.load(rp, mmap_mode="r"))
        return self._maps[i]

    def placement(self, rng: np.random.Generator, i: int) -> tuple[tuple[int, ...], bool]:
        """The patch's start per axis in case ``i`` (negative where the case is smaller and padded) and
        whether it was centred on foreground."""
        shape, patch, fg = self.shapes[i], self.patch, self.foreground[i]
        forced = len(fg) > 0 and rng.random() < self.oversample
        if forced:
            centre = fg[int(rng.integers(len(fg)))]
            start = [int(c) - p // 2 for c, p in zip(centre, patch)]
        else:
            start = [int(rng.integers(0, n - p + 1)) if n >= p else 0 for n, p in zip(shape, patch)]
        out = []
        for s, n, p in zip(start, shape, patch):
            out.append(min(max(s, 0), n - p) if n >= p else -((p - n) // 2))
        return tuple(out), forced

    def read_patch(self, i: int, start: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """image (C, *patch) float32 and labels (max_raters, *patch) uint8 of case ``i`` at ``start``."""
        image_map, raters_map = self._arrays(i)
        src, dst = [], []
        for s, n, p in zip(start, self.shapes[i], self.patch):
            lo, hi = max(s, 0), min(s + p, n)
            src.append(slice(lo, hi))
            dst.append(slice(lo - s, hi - s))
        image = np.empty((self.channels, *self.patch), np.float32)
        image[...] = self.fill[i].reshape(-1, *([1] * len(self.patch)))
        image[(slice(None), *dst)] = image_map[(slice(None), *src)]
        labels = np.zeros((self.max_raters, *self.patch), np.uint8)
        labels[(slice(0, raters_map.shape[0]), *dst)] = raters_map[(slice(None), *src)]
        return image, labels

    def draw(self, step: int) -> list[tuple[int, tuple[int, ...], bool]]:
        """(case, start, centred on foreground) of each patch of ``step``."""
        rng = np.random.default_rng([self.seed, step, self.rank, 1])
        return [(i, *self.placement(rng, i)) for i in self.batch_indices(step)]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        draws = self.draw(step)
        pairs = [self.read_patch(i, start) for i, start, _ in draws]
        images = torch.from_numpy(np.stack([p[0] for p in pairs]))
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
        if self.transform is not None:
            self.transform.set_random_state(seed=step_seed(self.seed, step, self.rank) % (2**32))
            outs = [self.transform({"image": im, "labels": lb.long()}) for im, lb in zip(images, labels)]
            images = torch.stack([torch.as_tensor(o["image"]).float() for o in outs])
            labels = torch.stack([torch.as_tensor(o["labels"]).round().to(torch.uint8) for o in outs])
        idx = torch.tensor([d[0] for d in draws])
        return images, labels, self.num_raters[idx].long()


def foreground_crops(items: Sequence[dict], patch_size) -> list[dict]:
    """Items cut to ``patch_size`` around the middle of each case's foreground (the case's centre
    when it has none), padded as training patches are: for figures of whole scans, whose middle
    slice would miss a small lesion. ``image`` (C, *patch) float32, ``labels`` (A, *patch) uint8."""
    if not items:
        return []
    stream = PatchStream(items, patch_size, 1, 0, _OneProcess(), foreground_oversample=0.0)
    out = []
    for i, item in enumerate(items):
        fg = stream.foreground[i]
        centre = np.median(fg, axis=0).astype(int) if len(fg) else np.asarray(stream.shapes[i]) // 2
        start = [min(max(int(c) - p // 2, 0), n - p) if n >= p else -((p - n) // 2)
                 for c, n, p in zip(centre, stream.shapes[i], stream.patch)]
        image, labels = stream.read_patch(i, start)
        out.append({"image": image, "labels": labels[: item["labels"].shape[0]], "case_id": item["case_id"],
                    "meta": {"crop_start": start}})
    return out


class _OneProcess:
    rank, world_size = 0, 1


__all__ = ["PatchStream", "foreground_crops"]
