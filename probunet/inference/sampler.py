"""One inference path: loading, precision, seeding, batching, sliding windows, reductions.

Validation during training, ``probunet evaluate`` and ``probunet predict`` draw
their samples here, through the model interface only
(:class:`probunet.models.base.SegmentationSampler`: ``sample``, ``divisor``,
``in_channels``, ``num_classes``, ``spatial_dims``, and the optional
``noise_shape`` / ``sample_context``), so for the same checkpoint, image, case
id and seed all three get the same samples.

Precision (the one policy). Sampling runs in full fp32, with no autocast,
unless the caller asks for mixed precision explicitly (``amp="bf16"``,
``"fp16"`` or ``"auto"``, resolved as :mod:`probunet.precision` resolves
``train.amp``: ``auto`` is bf16 on a CPU with bf16 units); ``amp=None`` (the
default) and ``"off"`` mean fp32. Validation and ``evaluate`` sample with
``eval.amp`` (default ``off``), ``predict`` with ``--amp``. The reason for the
fp32 default: bf16/fp16 rounding can flip the argmax of a sample where two
classes are close, so a checkpoint scored under autocast is scored on
different samples than fp32 draws; validation picks ``best.pt`` by its GED,
and the model chosen as best must be scored as ``evaluate`` scores it (both
read ``eval.amp``). The training config's ``train.amp`` is therefore not
inherited. Under bf16 the images are passed channels-last (the model's own
weights keep their layout: the sampler never changes the model it is given).

Seeding (per case). Sample ``s`` of a case is decided by ``(seed, case id, s)``
alone, never by the batch the case is in, the order of the cases, the sample
chunking or the sliding windows:

* a model with a fixed-size per-sample noise (``model.noise_shape``; the
  Probabilistic U-Net's latent ``eps``) gets ``noise`` from :func:`case_noise`
  (one generator per (seed, case id, s), so ``num_samples=32`` extends the
  first 16). With sliding windows every window of an image gets the same
  noise and the image-level ``context`` (the prior's mean and scale, from the
  whole padded image or its central window): sample ``s`` is one coherent
  segmentation, not a patchwork of independent draws. This keeps the latent
  reuse of the former ``predict`` (``latent_eps``): the draws are the same numbers.
* a model without (``noise_shape`` None) is sampled case by case with a
  generator seeded by :func:`case_seed` (plus the first sample's index of the
  chunk, so its random draws, though not their distribution, depend on
  ``sample_chunk``); each sliding window restarts that generator, so windows
  draw the same noise.
* every chunk's call tells the model the index of its first sample
  (``sample(..., start=)``; only for models whose ``sample`` takes it), so an
  ensemble takes sample ``s`` from member ``s mod M`` whatever the chunk size:
  the uncertainty maps, which group the samples by member, never depend on it.

Batching. :func:`group_by_shape` groups consecutive cases of one shape into
batches (a batch of ``batch_size`` images or slices per forward pass).

Sliding windows. An image larger than ``roi_size`` on some axis runs through
MONAI's ``sliding_window_inference`` (Gaussian or constant blending of the
logits; each window batch samples all the chunk's samples at once, returned as
``S*C`` channels); the image is padded to at least the window with its
per-channel minimum, as training pads crops, and cropped back. Otherwise the
whole image is padded to a multiple of ``model.divisor`` and sampled at once.

Reductions. :class:`SampleReducer` streams over chunks of samples: the mean
class probability, the sample label maps, and the pairwise distance matrices
(``d = 1 - IoU``, :func:`probunet.metrics.pairwise_distances`) between samples
and against the references; :class:`SampleSummary` gives the predictive
entropy, the consensus (majority vote), GED and HM-IoU from them.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..metrics import segmentation as metrics
from ..models.checkpoint import load_model  # the one way to load a model: digest-checked, through the registry
from ..models.base import index_context
from ..models._cpu import to_channels_last
from ..precision import AMP_CHOICES, amp_dtype, autocast, guard_bf16_convs

logger = logging.getLogger(__name__)

# bytes of fp32 logits one chunk of samples may take before it is split
_CHUNK_BUDGET = 1 << 30


# ----------------------------------------------------------------------------- loading and precision


def inference_dtype(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of sampling (see the module notes): None (fp32) unless ``amp`` asks for more."""
    if amp is None:
        return None
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)} (or None: fp32), got {amp!r}")
    return amp_dtype(amp, torch.device(device))


def sampling_precision(amp: Optional[str], device) -> str:
    """How sampling with ``amp`` on ``device`` runs, in words (recorded in summaries):
    ``float32 (no autocast)``, ``bfloat16 autocast, channels-last input`` or ``float16 autocast``."""
    dtype = inference_dtype(amp, torch.device(device))
    if dtype is None:
        return "float32 (no autocast)"
    name = str(dtype).replace("torch.", "")
    return f"{name} autocast" + (", channels-last input" if dtype == torch.bfloat16 else "")


# ----------------------------------------------------------------------------- seeding


def _seed_of(text: str) -> int:
    """63 bits of SHA-256 of ``text``'s UTF-8 bytes. A name that is not valid UTF-8 (a file name
    read with Python's surrogate escapes, ``bad\\xff.nii.gz``) counts by its bytes on disk,
    as ``os.fsencode`` gives them; valid text gives the same seeds as before."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no file name holds: its code points
        raw = text.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(raw).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def case_seed(seed: int, case_id: str) -> int:
    """A 63-bit seed from ``(seed, case_id)`` (SHA-256, so it is the same on every platform)."""
    return _seed_of(f"probunet-sample:{int(seed)}:{case_id}")


def case_noise(seed: int, case_id: str, num_samples: int, noise_shape: Sequence[int]) -> torch.Tensor:
    """Standard-normal draws ``(S, *noise_shape)`` of a case: row ``s`` depends only on (seed, case_id, s).

    The same numbers as the former ``predict.latent_eps``.
    """
    rows = []
    for s in range(int(num_samples)):
        g = torch.Generator().manual_seed(_seed_of(f"probunet-predict:{int(seed)}:{case_id}:{s}"))
        rows.append(torch.randn(*noise_shape, generator=g))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- batching


def group_by_shape(items: Sequence, batch_size: int, key: Callable = lambda item: tuple(item.shape)) -> list:
    """Consecutive runs of at most ``batch_size`` indices into ``items`` whose ``key`` (default:
    the shape) is equal; the order of the items is kept."""
    batch_size = max(1, int(batch_size))
    out: list[list[int]] = []
    last = None
    for i, item in enumerate(items):
        k = key(item)
        if out and len(out[-1]) < batch_size and k == last:
            out[-1].append(i)
        else:
            out.append([i])
        last = k
    return out


def pad_to(x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, tuple]:
    """Pad x (N, C, *sp) to at least ``sizes`` per axis, split evenly (the extra voxel
    after), with each image's per-channel minimum, as training's crop/pad
    (:func:`probunet.data.transforms.crop_item`) pads; returns the index that crops it back."""
    target = [max(s, int(t)) for s, t in zip(x.shape[2:], sizes)]
    crop = (slice(None), slice(None), *(slice((t - s) // 2, (t - s) // 2 + s) for s, t in zip(x.shape[2:], target)))
    if list(x.shape[2:]) == target:
        return x, crop
    fill = x.flatten(2).amin(dim=2) if x[0, 0].numel() else torch.zeros(x.shape[:2], device=x.device)  # (N, C)
    out = fill.reshape(*x.shape[:2], *([1] * (x.dim() - 2))).expand(*x.shape[:2], *target).clone()
    out[crop] = x
    return out, crop


def pad_to_multiple(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple]:
    """Pad x (N, C, *sp) to multiples of ``divisor`` (see :func:`pad_to`)."""
    return pad_to(x, [-(-s // divisor) * divisor for s in x.shape[2:]])


def centre_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    idx = [slice(None), slice(None)]
    for s, r in zip(x.shape[2:], size):
        lo = max(0, (s - r) // 2)
        idx.append(slice(lo, lo + min(s, r)))
    return x[tuple(idx)]


def resolve_roi(roi, spatial_dims: int, divisor: int) -> Optional[tuple]:
    """A sliding-window size: None or 0 (never slide), an int or one per axis; rounded up to
    multiples of ``divisor``."""
    if roi is None or (isinstance(roi, int) and roi <= 0):
        return None
    sizes = [int(roi)] * spatial_dims if isinstance(roi, int) else [int(r) for r in roi]
    if len(sizes) == 1:
        sizes = sizes * spatial_dims
    if len(sizes) != spatial_dims or any(s <= 0 for s in sizes):
        raise ValueError(f"roi size {roi!r}: expected a positive size or one per spatial axis ({spatial_dims})")
    return tuple(-(-s // divisor) * divisor for s in sizes)


# ----------------------------------------------------------------------------- reductions


@dataclass
class SampleSummary:
    """What :class:`SampleReducer` gives for a batch of B images and S samples.

    labels (B, S, *spatial) integer sample maps (uint8 when the classes fit);
    mean_probability (B, C, *spatial) fp32 mean class probabilities over samples;
    d_ss (B, S, S) sample-to-sample distances (None when the reducer was asked for no ``pairwise``); d_sy (B, S, A) and d_yy (B, A, A)
    against the references (None without); logits (B, S, C, *spatial) fp32 when kept;
    aleatoric (B, *spatial) fp32 when the reducer was given ``groups`` (see :mod:`probunet.inference.uncertainty`:
    the mean over the G model draws of the entropy of each draw's mean probability).
    """

    labels: torch.Tensor
    mean_probability: torch.Tensor
    d_ss: Optional[torch.Tensor]
    d_sy: Optional[torch.Tensor] = None
    d_yy: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    aleatoric: Optional[torch.Tensor] = None

    @property
    def entropy(self) -> torch.Tensor:
        """(B, *spatial) predictive entropy of the mean distribution (nats)."""
        return metrics.predictive_entropy(self.mean_probability[:, None], from_logits=False)

    @property
    def consensus(self) -> torch.Tensor:
        """(B, *spatial) majority vote of the samples: the most frequent label, ties to the lower
        label (two classes: foreground iff more than S/2 samples say so)."""
        lab = self.labels
        c = self.mean_probability.shape[1]
        if c == 2:
            return (2 * (lab != 0).sum(dim=1) > lab.shape[1]).to(lab.dtype)
        counts = torch.stack([(lab == k).sum(dim=1) for k in range(c)], dim=1)  # (B, C, *sp)
        return counts.argmax(dim=1).to(lab.dtype)  # first maximum: ties -> lower label

    @property
    def sample_diversity(self) -> torch.Tensor:
        """(B,) E[d(S, S')] over all ordered pairs, i == j included."""
        if self.d_ss is None:
            raise ValueError("the reducer computed no sample-to-sample distances (pairwise=False)")
        return self.d_ss.mean(dim=(1, 2))

    def components(self) -> metrics.GEDComponents:
        """The GED terms against the references (as :func:`probunet.metrics.ged_components`)."""
        if self.d_sy is None:
            raise ValueError("no references were given to the reducer: GED needs them")
        return metrics.GEDComponents(cross=self.d_sy.mean(dim=(1, 2)), sample_diversity=self.sample_diversity,
                                     reference_diversity=metrics.rater_pair_mean(self.d_yy), d_sy=self.d_sy,
                                     d_ss=self.d_ss, d_yy=self.d_yy)

    def ged(self) -> torch.Tensor:
        """(B,) D^2_GED against the references."""
        return metrics.ged_from_components(self.components())

    def hm_iou(self) -> torch.Tensor:
        """(B,) Hungarian-matched IoU against the references."""
        if self.d_sy is None:
            raise ValueError("no references were given to the reducer: HM-IoU needs them")
        return metrics.hungarian_matched_iou_from_iou(1.0 - self.d_sy)


class SampleReducer:
    """Streams chunks of sampled logits of a batch into :class:`SampleSummary`.

    ``add(logits, start)`` takes logits (B, s, C, *spatial) of samples ``start ..
    start+s-1``; the distances of the new samples to the earlier ones and to the
    references are computed as they come, so nothing but the label maps (and the
    logits with ``keep_logits``) is held. ``pairwise=False`` skips the sample-to-sample
    distances (for callers that need only the label maps and the mean probability).
    ``groups`` G (a divisor of S; sample s from model draw s mod G): also stream the aleatoric
    map (G = S: the sum of the samples' entropies; 1 < G < S: each draw's probability sum).
    """

    def __init__(self, batch: int, num_samples: int, num_classes: int, spatial: Sequence[int], *,
                 references: Optional[torch.Tensor] = None, empty_iou: float = 1.0, keep_logits: bool = False,
                 device="cpu", pairwise: bool = True, groups: Optional[int] = None):
        self.num_samples, self.num_classes, self.empty_iou = int(num_samples), int(num_classes), float(empty_iou)
        spatial = tuple(int(s) for s in spatial)
        dev = torch.device(device)
        ldtype = torch.uint8 if num_classes <= 256 else torch.long
        self.labels = torch.empty(batch, self.num_samples, *spatial, dtype=ldtype, device=dev)
        self.prob_sum = torch.zeros(batch, num_classes, *spatial, device=dev)
        dt = torch.get_default_dtype()
        self.d_ss = (torch.full((batch, self.num_samples, self.num_samples), float("nan"), dtype=dt, device=dev)
                     if pairwise else None)
        self.references = None if references is None else references.to(dev)
        self.d_sy = self.d_yy = None
        kw = {"num_classes": self.num_classes, "empty_iou": self.empty_iou}
        if self.references is not None:
            if self.references.shape[0] != batch or tuple(self.references.shape[2:]) != spatial:
                raise ValueError(f"references must be (B, A, *spatial) = ({batch}, A, {', '.join(map(str, spatial))}), "
                                 f"got {tuple(self.references.shape)}")
            a = self.references.shape[1]
            self.d_sy = torch.full((batch, self.num_samples, a), float("nan"), dtype=dt, device=dev)
            self.d_yy = metrics.pairwise_distances(self.references, self.references, **kw)
        self.logits = (torch.empty(batch, self.num_samples, num_classes, *spatial, device=dev)
                       if keep_logits else None)
        self._done = torch.zeros(self.num_samples, dtype=torch.bool)
        self.groups = None if groups is None else int(groups)
        self.entropy_sum = self.group_sum = None
        if self.groups is not None:
            if self.groups < 1 or self.num_samples % self.groups:
                raise ValueError(f"{self.num_samples} samples cannot be split into {self.groups} model draws; "
                                 f"use a multiple of {self.groups} samples")
            if self.groups == self.num_samples:
                self.entropy_sum = torch.zeros(batch, *spatial, device=dev)
            elif self.groups > 1:
                self.group_sum = torch.zeros(batch, self.groups, num_classes, *spatial, device=dev)

    def add(self, logits: torch.Tensor, start: int) -> None:
        logits = logits.float()
        s = logits.shape[1]
        stop = start + s
        if start < 0 or stop > self.num_samples:
            raise ValueError(f"samples {start}..{stop - 1} are outside 0..{self.num_samples - 1}")
        kw = {"num_classes": self.num_classes, "empty_iou": self.empty_iou}
        dev = self.labels.device
        probs = torch.softmax(logits, dim=2)  # (B, s, C, *sp)
        self.prob_sum.add_(probs.sum(dim=1).to(dev))
        if self.entropy_sum is not None:
            self.entropy_sum.add_(-torch.special.xlogy(probs, probs).sum(dim=2).sum(dim=1).to(dev))
        if self.group_sum is not None:
            for j in range(s):
                self.group_sum[:, (start + j) % self.groups].add_(probs[:, j].to(dev))
        new = logits.argmax(dim=2).to(dev, self.labels.dtype)  # (B, s, *sp)
        self.labels[:, start:stop] = new
        if self.logits is not None:
            self.logits[:, start:stop] = logits.to(dev)
        self._done[start:stop] = True
        done = self._done.nonzero().flatten().tolist()  # every sample seen so far, this chunk included
        if self.d_ss is not None:
            seen = self.labels[:, done]
            d = metrics.pairwise_distances(new, seen, **kw)  # (B, s, n_seen)
            idx = torch.tensor(done, device=dev)
            self.d_ss[:, start:stop, idx] = d.to(self.d_ss.dtype)
            self.d_ss[:, idx, start:stop] = d.transpose(1, 2).to(self.d_ss.dtype)
        if self.references is not None:
            self.d_sy[:, start:stop] = metrics.pairwise_distances(new, self.references, **kw).to(self.d_sy.dtype)

    def result(self) -> SampleSummary:
        if not bool(self._done.all()):
            missing = (~self._done).nonzero().flatten().tolist()
            raise ValueError(f"samples {missing[:5]}{'...' if len(missing) > 5 else ''} were never added")
        mean = self.prob_sum / self.num_samples
        aleatoric = None
        if self.entropy_sum is not None:
            aleatoric = self.entropy_sum / self.num_samples
        elif self.group_sum is not None:
            member = self.group_sum / (self.num_samples // self.groups)  # (B, G, C, *sp)
            aleatoric = -torch.special.xlogy(member, member).sum(dim=2).mean(dim=1)
        elif self.groups == 1:
            aleatoric = metrics.predictive_entropy(mean[:, None], from_logits=False)
        return SampleSummary(labels=self.labels, mean_probability=mean, d_ss=self.d_ss,
                             d_sy=self.d_sy, d_yy=self.d_yy, logits=self.logits, aleatoric=aleatoric)


# ----------------------------------------------------------------------------- the sampler


class Sampler:
    """Draws the samples of cases through the model interface (see the module notes).

    Args:
        model: a model meeting :class:`~probunet.models.base.SegmentationSampler` (put in eval mode
            while sampling; its mode is restored).
        seed: the seed of every case's draws.
        device: torch device (or name) to run on.
        amp: None or ``off`` (fp32, the policy), ``auto``, ``bf16``, ``fp16``.
        batch_size: images (or slices, or windows) per forward pass.
        roi_size: sliding-window size (None: always the whole image); rounded up to multiples of
            ``model.divisor``.
        overlap, blend: sliding-window overlap and blending (``gaussian`` | ``constant``).
        context_window: ``image`` (the image-level context on the whole image) or ``roi`` (on
            its central window) when sliding.
        sample_chunk: samples per model call (None: as many as ~1 GiB of fp32 logits holds).
    """

    def __init__(self, model, *, seed: int = 0, device="cpu", amp: Optional[str] = None, batch_size: int = 1,
                 roi_size=None, overlap: float = 0.25, blend: str = "gaussian", context_window: str = "image",
                 sample_chunk: Optional[int] = None):
        if blend not in ("gaussian", "constant"):
            raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
        if context_window not in ("image", "roi"):
            raise ValueError(f"context_window must be 'image' or 'roi', got {context_window!r}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.seed = int(seed)
        self.dtype = guard_bf16_convs(model, inference_dtype(amp, self.device), amp or "off", self.device)
        self.batch_size = int(batch_size)
        self.roi_size = resolve_roi(roi_size, model.spatial_dims, model.divisor)
        self.overlap, self.blend, self.context_window = float(overlap), blend, context_window
        self.sample_chunk = None if not sample_chunk else max(1, int(sample_chunk))
        self.noise_shape = getattr(model, "noise_shape", None)
        self.takes_start = _takes_keyword(model.sample, "start")

    def uses_window(self, spatial: Sequence[int]) -> bool:
        return self.roi_size is not None and any(s > r for s, r in zip(spatial, self.roi_size))

    def _chunk(self, n: int, num_samples: int, spatial: Sequence[int]) -> int:
        if self.sample_chunk:
            return min(num_samples, self.sample_chunk)
        per_sample = n * self.model.num_classes * math.prod(
            -(-s // self.model.divisor) * self.model.divisor for s in spatial) * 4
        return max(1, min(num_samples, _CHUNK_BUDGET // max(per_sample, 1)))

    # -- public

    def sample_batches(self, images: Sequence, case_ids: Sequence[str], num_samples: int, *,
                       references: Optional[Sequence] = None, empty_iou: float = 1.0, keep_logits: bool = False,
                       pairwise: bool = True,
                       key: Optional[Callable[[int], object]] = None):
        """Yield ``(indices, SampleSummary)`` per batch of cases grouped by shape.

        images: arrays or tensors (C, *spatial), one per case (or per slice: slices of one
        volume share its case id, and so its draws); references: (A, *spatial) per case or
        None. Cases are grouped by :func:`group_by_shape` on (image shape, reference shape)
        or on ``key(index)``.
        """
        num_samples = int(num_samples)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if len(images) != len(case_ids):
            raise ValueError(f"{len(images)} images but {len(case_ids)} case ids")

        def shape_key(i):
            ref = None if references is None else tuple(references[i].shape)
            return tuple(images[i].shape), ref

        groups = group_by_shape(range(len(images)), self.batch_size, key or shape_key)
        for idx in groups:
            x = torch.stack([_tensor(images[i]) for i in idx]).float()
            refs = None
            if references is not None:
                refs = torch.stack([_tensor(references[i]) for i in idx]).to(self.device)
            yield idx, self.sample([case_ids[i] for i in idx], x, num_samples, references=refs,
                                   empty_iou=empty_iou, keep_logits=keep_logits, pairwise=pairwise)

    def sample(self, case_ids: Sequence[str], images: torch.Tensor, num_samples: int, *,
               references: Optional[torch.Tensor] = None, empty_iou: float = 1.0,
               keep_logits: bool = False, pairwise: bool = True, groups: Optional[int] = None) -> SampleSummary:
        """Sample one batch: images (N, C, *spatial) of one shape, ``case_ids`` one per row; ``groups``
        as :class:`SampleReducer`'s."""
        model = self.model
        if images.dim() != model.spatial_dims + 2 or images.shape[1] != model.in_channels:
            raise ValueError(f"images must be (N, {model.in_channels}, *spatial) with {model.spatial_dims} spatial "
                             f"dims, got {tuple(images.shape)}")
        if len(case_ids) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(case_ids)} case ids")
        n, spatial = images.shape[0], tuple(images.shape[2:])
        reducer = SampleReducer(n, num_samples, model.num_classes, spatial, references=references,
                                empty_iou=empty_iou, keep_logits=keep_logits, device=self.device,
                                pairwise=pairwise, groups=groups)
        x = images.to(self.device, torch.float32)
        if self.dtype == torch.bfloat16:
            x = to_channels_last(x)
        noise = None
        if self.noise_shape is not None:
            noise = torch.stack([case_noise(self.seed, c, num_samples, self.noise_shape) for c in case_ids])
            noise = noise.to(self.device)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), autocast(self.device, self.dtype):
                chunk = self._chunk(n, num_samples, spatial)
                if self.uses_window(spatial):
                    self._windows(x, case_ids, noise, num_samples, chunk, reducer)
                else:
                    self._whole(x, case_ids, noise, num_samples, chunk, reducer)
        finally:
            model.train(was_training)
        return reducer.result()

    # -- the two ways

    def _call(self, x: torch.Tensor, num_samples: int, case_ids: Sequence[str], start: int,
              noise: Optional[torch.Tensor], context=None) -> torch.Tensor:
        """Logits (N, s, C, *sp) of samples ``start .. start+s-1`` of the cases of ``x``."""
        first = {"start": start} if self.takes_start else {}
        if noise is not None:
            kw = {"noise": noise[:, start:start + num_samples], **first}
            if context is not None:
                kw["context"] = context
            return self.model.sample(x, num_samples, **kw)
        outs = []
        for i, cid in enumerate(case_ids):  # no noise interface: case by case, each with its generator
            g = torch.Generator().manual_seed((case_seed(self.seed, cid) + start) % (2**63))
            outs.append(self.model.sample(x[i:i + 1], num_samples, generator=g, **first))
        return torch.cat(outs)

    def _whole(self, x, case_ids, noise, num_samples, chunk, reducer) -> None:
        padded, crop = pad_to_multiple(x, self.model.divisor)
        context = None
        if noise is not None and hasattr(self.model, "sample_context") and chunk < num_samples:
            context = self.model.sample_context(padded)  # computed once for all chunks
        for s0 in range(0, num_samples, chunk):
            s = min(chunk, num_samples - s0)
            logits = self._call(padded, s, case_ids, s0, noise, context)
            reducer.add(logits[(slice(None), slice(None), slice(None), *crop[2:])], s0)  # (N, s, C, *sp)

    def _windows(self, x, case_ids, noise, num_samples, chunk, reducer) -> None:
        from monai.inferers import sliding_window_inference

        model = self.model
        n, spatial, c = x.shape[0], tuple(x.shape[2:]), model.num_classes
        context = None
        if noise is not None and hasattr(model, "sample_context"):
            padded, _ = pad_to_multiple(x, model.divisor)
            if self.context_window == "roi":
                padded = centre_crop(padded, self.roi_size)
            context = model.sample_context(padded)
        big, big_crop = pad_to(x, self.roi_size)  # our padding, not MONAI's (constant 0)
        for s0 in range(0, num_samples, chunk):
            s = min(chunk, num_samples - s0)

            def predictor(win: torch.Tensor, coords, s0=s0, s=s) -> torch.Tensor:
                rows = torch.tensor([cd[0].start for cd in coords])  # the image each window comes from
                ids = [case_ids[int(r)] for r in rows]
                sub_noise = None if noise is None else noise[rows.to(noise.device)]
                logits = self._call(win, s, ids, s0, sub_noise, index_context(context, rows))
                return logits.flatten(1, 2).float()  # (w, s*C, *roi)

            out = sliding_window_inference(big, self.roi_size, self.batch_size, predictor, overlap=self.overlap,
                                           mode=self.blend, with_coord=True)
            out = out[(slice(None), slice(None), *big_crop[2:])]
            reducer.add(out.reshape(n, s, c, *spatial), s0)


def _takes_keyword(fn, name: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``name`` (by name or through ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.kind == p.VAR_KEYWORD
               for p in params)


def _tensor(array) -> torch.Tensor:
    """A tensor of ``array``; a read-only memory map (a preprocessed case) is read into memory first."""
    if isinstance(array, np.memmap) or (isinstance(array, np.ndarray) and not array.flags.writeable):
        array = np.array(array)
    return torch.as_tensor(array)


def evaluation_sampler(model, eval_cfg, device, *, seed: Optional[int] = None, roi_size=None) -> Sampler:
    """The sampler of validation during training and of ``probunet evaluate``: seed ``eval.seed``
    (or ``seed``), ``eval.batch_size`` images per pass, ``eval.sample_chunk`` samples per call,
    the precision of ``eval.amp`` (default ``off``: fp32), sliding windows of ``roi_size``
    (``data.patch_size`` for whole scans). Both draw a case's samples with it, so they score the
    same samples."""
    return Sampler(model, seed=eval_cfg.seed if seed is None else seed, device=device,
                   batch_size=max(1, int(eval_cfg.batch_size)), sample_chunk=eval_cfg.sample_chunk,
                   roi_size=roi_size, amp=getattr(eval_cfg, "amp", None))


__all__ = ["SampleReducer", "SampleSummary", "Sampler", "evaluation_sampler", "case_noise", "case_seed", "centre_crop",
           "group_by_shape", "inference_dtype", "sampling_precision", "load_model", "pad_to", "pad_to_multiple", "resolve_roi"]
