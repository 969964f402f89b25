"""Batch prediction: a trained checkpoint over a folder of scans.

``probunet predict CHECKPOINT INPUT_DIR OUTPUT_DIR [--num-samples N]`` and, in
Python, :func:`predict_folder` (folders) or :class:`Predictor` (arrays).

Per input image (NIfTI, NRRD, MHA/MHD, TIFF, single-file DICOM, ..., PNG/JPEG
for 2D models) a folder ``OUTPUT_DIR/<case>/`` holds, in the input's format and
geometry (same shape, spacing, origin, direction / affine)::

    sample_000 ... sample_{N-1}   label maps drawn from the prior (uint8)
    probability                   mean foreground probability over the samples
                                  (1 - p(background)); multi-class models add
                                  probability_class1 ... probability_class{C-1}
    entropy                       predictive entropy of the mean distribution (nats)
    consensus                     majority vote of the samples (the most frequent
                                  label per voxel; ties go to the lower label, so
                                  for binary models: foreground iff > S/2 samples)
    case.json                     settings and statistics; written last, it marks
                                  the case as complete

and ``OUTPUT_DIR/summary.csv`` one row per case (see :data:`SUMMARY_COLUMNS`).
Label maps keep their format's extension; for formats without a float pixel
type or geometry (PNG, JPEG, BMP) the label maps are PNG and the float maps TIFF.
DICOM and two-file inputs (``.mhd``, ``.nhdr``) are written as ``.nii.gz``,
``.mha`` and ``.nrrd``.

Preprocessing is that of training, read from the checkpoint's config: the image
gets a channel axis (``num_components`` of the file, channels last), the channel
count must equal ``model.in_channels``, and ``data.normalize`` is applied per
image as :func:`probunet.data.transforms.normalize_image` did in training (per
*slice* when a 2D model runs slice by slice on a volume, because its training
images were single slices).

Sampling. Sample ``s`` of a case uses the standard-normal draw ``eps_s`` seeded
by ``(seed, case id, s)``, so outputs are reproducible, independent of the batch
size, of the order of cases and of sharding, and ``--num-samples 32`` extends the
first 16. ``z_s = mu + sigma * eps_s`` with the prior ``p(z|x) = N(mu, sigma)``:

* whole image (it fits the training patch, or no patch is known): the image is
  padded to a multiple of ``model.divisor`` (with its per-channel minimum, as
  training pads crops), the U-Net runs once and f_comb once per sample; the
  padding is cropped off.
* larger than the training patch: MONAI's ``sliding_window_inference`` over the
  U-Net + f_comb, the predictor returning the logits of all samples of a chunk
  as ``S*C`` channels. The prior (global average pooled, so any size that is a
  multiple of ``divisor`` is valid) is computed ONCE on the whole padded image
  (``prior_window="image"``, default) or on its central patch (``"roi"``, less
  memory), and every window uses the same ``z_s``: sample ``s`` is one coherent
  segmentation, not a patchwork of independent draws. Overlaps are blended
  (Gaussian weights by default) in logit space.
* a 2D model on a 3D volume: slice by slice along ``axis`` (default: the axis
  with the coarsest spacing, the last one on ties), batched over slices. Each
  slice has its own prior ``(mu, sigma)``, but sample ``s`` uses the same
  ``eps_s`` on every slice, so it is one coherent volume.

Robustness: a case that fails (unreadable file, wrong channel count, NaN) gets a
summary row with status ``error`` and the message, is logged, and the others go
on; :func:`predict_folder` reports the number of failures and the CLI exits 1.
A case folder that holds a ``case.json`` is skipped (status ``skipped``, its
statistics carried over) unless ``overwrite``; a non-empty folder without one
(an interrupted run) is an error unless ``overwrite``. Nothing is written under
the input folder (an output folder inside it, or containing it, is refused) nor
outside OUTPUT_DIR (a case whose output folder resolves elsewhere, e.g. a
``../`` entry of a file list, is an error row), and every file is written
atomically (temporary file + rename). One run at a time per OUTPUT_DIR: the run
holds an OS file lock on ``OUTPUT_DIR/.probunet.lock`` (shared by the shards of
one ``--shard`` run), and a folder that cannot be written is refused before the
model is loaded.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import logging
import math
import re
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .data import io
from .data.transforms import normalize_image
from .data.validate import DataError
from .utils import FolderLock, atomic_write_text, check_writable, remove_stale_temps, resolve_device

logger = logging.getLogger(__name__)

# Extensions taken as images when scanning a folder (two-file formats by their header).
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff", ".jpg",
                  ".jpeg", ".bmp", ".dcm")
_NO_FLOAT = (".png", ".jpg", ".jpeg", ".bmp")  # no float pixels, no geometry
_OUT_SUFFIX = {".nhdr": ".nrrd", ".mhd": ".mha", ".dcm": ".nii.gz", ".jpg": ".png", ".jpeg": ".png", ".bmp": ".png"}
OUTPUT_FORMATS = ("same", "nii.gz", "nii", "nrrd", "mha")
_OUR_FILE = re.compile(r"^(sample_\d+|probability(_class\d+)?|entropy|consensus)\.")

SUMMARY_COLUMNS = (
    "case",  # case id = output sub-folder (relative path of the input without extension)
    "status",  # ok | error | skipped (complete outputs existed)
    "error",  # why a case failed
    "input",
    "output",
    "mode",  # whole | sliding_window | slices(axis=K) [+ sliding_window]
    "shape",  # spatial shape of the input, e.g. 64x64x32
    "spacing",  # voxel size in mm (empty for formats without geometry)
    "num_samples",
    "volume_unit",  # mm3 / mm2 where spacing is known, else voxels / pixels
    "consensus_volume",  # foreground (any class != 0) volume of the consensus
    "sample_volume_min",  # foreground volume across the samples
    "sample_volume_median",
    "sample_volume_max",
    "mean_entropy_in_union",  # mean predictive entropy (nats) over the union of the samples' foreground
    "sample_diversity",  # E[d(S,S')], d = 1 - IoU (probunet.metrics.sample_diversity)
    "seconds",
)


# ----------------------------------------------------------------------------- results


@dataclass
class Prediction:
    """One image's prediction; ``*spatial`` is the input's spatial shape.

    samples (S, *spatial) uint8 label maps; probability (C, *spatial) float32 mean
    class probabilities over the samples; entropy (*spatial) float32 predictive
    entropy of that mean (nats); consensus (*spatial) uint8 majority vote.
    """

    samples: np.ndarray
    probability: np.ndarray
    entropy: np.ndarray
    consensus: np.ndarray
    mode: str = "whole"

    @property
    def foreground(self) -> np.ndarray:
        """(*spatial) float32: mean probability of any class != 0."""
        return (1.0 - self.probability[0]).astype(np.float32)


@dataclass
class PredictSummary:
    """What :func:`predict_folder` returns: one row (dict of SUMMARY_COLUMNS) per case."""

    rows: list
    summary_path: Path
    output_dir: Path

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r["status"] == "error"]

    @property
    def skipped(self) -> list:
        return [r for r in self.rows if r["status"] == "skipped"]


@dataclass
class InputCase:
    """An input image: ``case_id`` (posix relative path, the output sub-folder) and its ``path``."""

    case_id: str
    path: Path


# ----------------------------------------------------------------------------- the model runner


def latent_eps(seed: int, case_id: str, num_samples: int, latent_dim: int) -> torch.Tensor:
    """Standard-normal draws (S, D) for a case: row ``s`` depends only on (seed, case_id, s)."""
    rows = []
    for s in range(num_samples):
        digest = hashlib.sha256(f"probunet-predict:{seed}:{case_id}:{s}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        rows.append(torch.randn(latent_dim, generator=g))
    return torch.stack(rows)


def _pad_to(x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, tuple]:
    """Pad x (N, C, *sp) to at least ``sizes`` per axis, split evenly (the extra voxel
    after), with each image's per-channel minimum, as training's crop/pad
    (:func:`probunet.data.transforms.crop_item`) pads; returns the crop back."""
    target = [max(s, int(t)) for s, t in zip(x.shape[2:], sizes)]
    crop = (slice(None), slice(None), *(slice((t - s) // 2, (t - s) // 2 + s) for s, t in zip(x.shape[2:], target)))
    if list(x.shape[2:]) == target:
        return x, crop
    fill = x.flatten(2).amin(dim=2) if x[0, 0].numel() else torch.zeros(x.shape[:2], device=x.device)  # (N, C)
    out = fill.reshape(*x.shape[:2], *([1] * (x.dim() - 2))).expand(*x.shape[:2], *target).clone()
    out[crop] = x
    return out, crop


def _pad_to_multiple(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, tuple]:
    """Pad x (N, C, *sp) to multiples of divisor (see :func:`_pad_to`)."""
    return _pad_to(x, [-(-s // divisor) * divisor for s in x.shape[2:]])


def _centre_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    idx = [slice(None), slice(None)]
    for s, r in zip(x.shape[2:], size):
        lo = max(0, (s - r) // 2)
        idx.append(slice(lo, lo + min(s, r)))
    return x[tuple(idx)]


class _Runner:
    """Runs the model on stacked units (N, C, *sp) with latents eps (N, S, D).

    Returns mean class probabilities (N, C, *sp) float32 and labels (N, S, *sp) uint8, on the CPU.
    """

    def __init__(self, model, device: torch.device, dtype: Optional[torch.dtype], *, roi_size, overlap: float,
                 blend: str, prior_window: str, batch_size: int, sample_chunk: Optional[int]):
        self.model, self.device, self.dtype = model, device, dtype
        self.roi_size = roi_size
        self.overlap, self.blend, self.prior_window = overlap, blend, prior_window
        self.batch_size = batch_size
        self.sample_chunk = sample_chunk

    def uses_window(self, spatial: Sequence[int]) -> bool:
        return self.roi_size is not None and any(s > r for s, r in zip(spatial, self.roi_size))

    def _chunk(self, n: int, num_samples: int, spatial, window: bool) -> int:
        if self.sample_chunk:
            return max(1, min(num_samples, int(self.sample_chunk)))
        hidden = self.model.unet.out_channels
        budget = 1 << 30  # bytes of float32 per chunk
        if window:
            per_sample = max(self.batch_size * hidden * math.prod(self.roi_size),
                             n * self.model.num_classes * math.prod(spatial)) * 4
        else:
            per_sample = n * hidden * math.prod(-(-s // self.model.divisor) * self.model.divisor for s in spatial) * 4
        return max(1, min(num_samples, budget // max(per_sample, 1)))

    def run(self, units: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs, labels = [], []
        for i in range(0, units.shape[0], self.batch_size):
            p, l = self._run(units[i:i + self.batch_size], eps[i:i + self.batch_size])
            probs.append(p)
            labels.append(l)
        return torch.cat(probs), torch.cat(labels)

    def _run(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .train import autocast

        model = self.model
        x = x.to(self.device, torch.float32)
        eps = eps.to(self.device, torch.float32)
        n, spatial = x.shape[0], tuple(x.shape[2:])
        num_samples, num_classes = eps.shape[1], model.num_classes
        window = self.uses_window(spatial)
        chunk = self._chunk(n, num_samples, spatial, window)
        padded, crop = _pad_to_multiple(x, model.divisor)
        prob_sum = torch.zeros(n, num_classes, *spatial, device=self.device)
        labels = torch.empty(n, num_samples, *spatial, dtype=torch.uint8, device=self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            prior_in = padded
            if window and self.prior_window == "roi":
                prior_in = _centre_crop(padded, self.roi_size)
            prior = model.prior(prior_in)
            loc, scale = prior.base_dist.loc.float(), prior.base_dist.scale.float()  # (N, D)
            z = loc[:, None] + scale[:, None] * eps  # (N, S, D)

            def reduce(logits: torch.Tensor, s0: int) -> None:  # logits (N, s, C, *spatial)
                logits = logits.float()
                prob_sum.add_(torch.softmax(logits, dim=2).sum(dim=1))  # sum over samples -> (N, C, *sp)
                labels[:, s0:s0 + logits.shape[1]] = logits.argmax(dim=2).to(torch.uint8)

            if not window:
                feat = model.fcomb.feature_term(model.unet(padded))  # once per image
                for s0 in range(0, num_samples, chunk):
                    reduce(model.fcomb.combine(feat, z[:, s0:s0 + chunk])[(slice(None), *crop)], s0)
            else:
                from monai.inferers import sliding_window_inference

                big, big_crop = _pad_to(x, self.roi_size)  # our padding, not MONAI's (constant 0)
                for s0 in range(0, num_samples, chunk):
                    zc = z[:, s0:s0 + chunk]  # (N, s, D)

                    def predictor(win: torch.Tensor, coords, zc=zc) -> torch.Tensor:
                        b = torch.tensor([c[0].start for c in coords], device=zc.device)
                        out = model.fcomb.combine(model.fcomb.feature_term(model.unet(win)), zc[b])
                        return out.flatten(1, 2).float()  # (w, s*C, *roi)

                    out = sliding_window_inference(big, self.roi_size, self.batch_size, predictor,
                                                   overlap=self.overlap, mode=self.blend, with_coord=True)
                    out = out[(slice(None), slice(None), *big_crop[2:])]
                    reduce(out.reshape(n, zc.shape[1], num_classes, *spatial), s0)
        return (prob_sum / num_samples).cpu(), labels.cpu()


# ----------------------------------------------------------------------------- predictor


def _resolve_roi(roi, cfg, spatial_dims: int, divisor: int) -> Optional[tuple]:
    """The sliding-window size: ``"config"`` (data.crop_size, or the synthetic image size),
    None/0 (never slide), an int or a sequence per axis; rounded up to multiples of divisor."""
    if isinstance(roi, str) and roi == "config":
        roi = cfg.data.crop_size
        if roi is None and cfg.data.format == "synthetic" and not cfg.data.path:
            roi = cfg.data.synthetic.size
    if roi is None or (isinstance(roi, int) and roi <= 0):
        return None
    sizes = [int(roi)] * spatial_dims if isinstance(roi, int) else [int(r) for r in roi]
    if len(sizes) == 1:
        sizes = sizes * spatial_dims
    if len(sizes) != spatial_dims or any(s <= 0 for s in sizes):
        raise ValueError(f"roi size {roi!r}: expected a positive size or one per spatial axis ({spatial_dims})")
    return tuple(-(-s // divisor) * divisor for s in sizes)


class Predictor:
    """A model and the preprocessing of its training config, ready to predict images.

    Args:
        model: a :class:`probunet.ProbabilisticUNet` (its weights are used as is).
        cfg: the resolved :class:`probunet.config.Config` it was trained with.
        num_samples: S, samples per image.
        seed: seeds the latents (see the module docstring).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        amp: ``None`` (``train.amp`` of the config), ``auto``, ``off``, ``bf16``, ``fp16``.
        batch_size: images (or slices, or sliding windows) per forward pass;
            None: 16 for 2D models, 1 for 3D.
        roi_size: sliding-window size; ``"config"`` (the training patch:
            ``data.crop_size``, or the synthetic image size), None or 0 (always
            the whole image), an int or one per axis.
        overlap, blend: sliding-window overlap and blending (``gaussian`` | ``constant``).
        prior_window: ``image`` (the prior on the whole image) or ``roi`` (on its
            central patch) when sliding.
        axis: slicing axis for a 2D model on 3D volumes: ``auto`` or 0/1/2
            (array axes (x, y, z), as :func:`probunet.data.io.read_image` gives).
        sample_chunk: samples per f_comb pass (None: as many as fit in ~1 GiB).
    """

    def __init__(self, model, cfg, *, num_samples: int = 16, seed: int = 0, device: str | torch.device = "auto",
                 amp: Optional[str] = None, batch_size: Optional[int] = None, roi_size="config",
                 overlap: float = 0.25, blend: str = "gaussian", prior_window: str = "image",
                 axis: int | str = "auto", sample_chunk: Optional[int] = None):
        from .train import amp_dtype

        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if blend not in ("gaussian", "constant"):
            raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
        if prior_window not in ("image", "roi"):
            raise ValueError(f"prior_window must be 'image' or 'roi', got {prior_window!r}")
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if axis != "auto" and int(axis) not in (0, 1, 2):
            raise ValueError(f"axis must be 'auto', 0, 1 or 2, got {axis!r}")
        amp = amp or cfg.train.amp
        if amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"amp must be one of auto, off, bf16, fp16, got {amp!r}")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.axis = axis if axis == "auto" else int(axis)
        self.dtype = amp_dtype(amp, self.device)
        self.batch_size = int(batch_size) if batch_size else (16 if model.spatial_dims == 2 else 1)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.roi_size = _resolve_roi(roi_size, cfg, model.spatial_dims, model.divisor)
        self.runner = _Runner(self.model, self.device, self.dtype, roi_size=self.roi_size, overlap=overlap,
                              blend=blend, prior_window=prior_window, batch_size=self.batch_size,
                              sample_chunk=sample_chunk)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "Predictor":
        """Load a checkpoint file or run directory (``best.pt``, else ``last.pt``)."""
        from .checkpoint import load_model

        model, cfg, _ = load_model(path)
        return cls(model, cfg, **kwargs)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    # -- preprocessing

    def to_channels_first(self, array: np.ndarray, meta: Optional[dict] = None, where: str = "image"):
        """``array`` as read by :func:`probunet.data.io.read_image` -> float32 (C, *spatial).

        Channels come from ``meta["num_components"]`` (channels last). For a 2D
        model, a 3D array whose last axis equals ``in_channels`` (> 1) is read as
        channels last, as the training readers do. Raises DataError naming ``where``.
        """
        meta = meta or {}
        array = np.asarray(array)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
            raise DataError(f"{where}: image has unsupported dtype {array.dtype}")
        c_in = self.model.in_channels
        if meta.get("num_components"):
            image = np.moveaxis(array, -1, 0)
        elif self.model.spatial_dims == 2 and array.ndim == 3 and c_in > 1 and array.shape[-1] == c_in:
            image = np.moveaxis(array, -1, 0)
        else:
            image = array[None]
        if image.ndim - 1 not in (2, 3):
            raise DataError(f"{where}: expected a 2D or 3D image, got shape {array.shape}")
        if image.shape[0] != c_in:
            raise DataError(f"{where}: image has {image.shape[0]} channel(s), the model expects {c_in} "
                            f"(model.in_channels of the checkpoint)")
        if image.ndim - 1 == 2 and self.model.spatial_dims == 3:
            raise DataError(f"{where}: a 2D image of shape {array.shape} for a 3D model")
        image = np.asarray(image, dtype=np.float32)
        if not np.isfinite(image).all():
            raise DataError(f"{where}: image contains NaN or Inf values")
        return image

    def choose_axis(self, spacing: Optional[Sequence[float]]) -> int:
        if self.axis != "auto":
            return self.axis
        if not spacing or len(spacing) != 3:
            return 2
        sp = np.asarray(spacing, dtype=float)
        return int(max(range(3), key=lambda k: (round(sp[k], 6), k)))

    def prepare(self, image: np.ndarray, spacing=None) -> tuple[torch.Tensor, Optional[int]]:
        """image (C, *spatial) -> normalised units (N, C, *unit_spatial) and the slicing axis (or None)."""
        if image.ndim - 1 == self.model.spatial_dims:
            return torch.from_numpy(normalize_image(image, self.cfg.data))[None], None
        axis = self.choose_axis(spacing)
        slices = np.moveaxis(image, 1 + axis, 0)  # (N, C, a, b)
        units = np.stack([normalize_image(s, self.cfg.data) for s in slices])  # per slice, as in training
        return torch.from_numpy(units), axis

    def eps(self, case_id: str) -> torch.Tensor:
        return latent_eps(self.seed, case_id, self.num_samples, self.model.latent_dim)

    def mode_of(self, unit_spatial: Sequence[int], axis: Optional[int]) -> str:
        mode = "sliding_window" if self.runner.uses_window(unit_spatial) else "whole"
        return mode if axis is None else f"slices(axis={axis})" + (" + sliding_window" if mode != "whole" else "")

    def finish(self, mean_prob: torch.Tensor, labels: torch.Tensor, axis: Optional[int], mode: str) -> Prediction:
        """mean_prob (N, C, *u), labels (N, S, *u) from the runner -> :class:`Prediction`."""
        from .metrics import predictive_entropy

        if axis is None:
            prob, lab = mean_prob[0], labels[0]  # (C, *sp), (S, *sp)
        else:
            prob, lab = mean_prob.movedim(0, 1 + axis), labels.movedim(0, 1 + axis)
        entropy = predictive_entropy(prob[None, None], from_logits=False)[0]  # (*sp)
        c = self.num_classes
        if c == 2:
            consensus = (2 * (lab != 0).sum(dim=0) > lab.shape[0]).to(torch.uint8)
        else:
            counts = torch.stack([(lab == k).sum(dim=0) for k in range(c)])  # (C, *sp)
            consensus = counts.argmax(dim=0).to(torch.uint8)  # first maximum: ties -> lower label
        return Prediction(samples=lab.contiguous().numpy(), probability=prob.contiguous().numpy(),
                          entropy=entropy.float().numpy(), consensus=consensus.numpy(), mode=mode)

    def __call__(self, image: np.ndarray, *, case_id: str = "", spacing=None,
                 meta: Optional[dict] = None) -> Prediction:
        """Predict one image.

        ``image``: with ``meta`` (as :func:`probunet.data.io.read_image` returns
        them), the array as read; without, channels first ``(C, *spatial)`` or
        ``(*spatial)`` for single-channel models, where ``*spatial`` has the
        model's dims or, for a 2D model, 3 dims (run slice by slice).
        ``case_id`` seeds the latents with the predictor's seed.
        """
        image = np.asarray(image)
        if meta is not None:
            spacing = spacing or meta.get("spacing")
            image = self.to_channels_first(image, meta)
        else:
            nd = self.model.spatial_dims
            if self.model.in_channels == 1 and image.ndim in (2, 3) and not (nd == 2 and image.shape[0] == 1):
                image = image[None]  # (*spatial) -> (1, *spatial)
            image = self.to_channels_first(np.moveaxis(image, 0, -1), {"num_components": image.shape[0]})
        units, axis = self.prepare(image, spacing)
        eps = self.eps(case_id).expand(units.shape[0], -1, -1)
        mean_prob, labels = self.runner.run(units, eps)
        return self.finish(mean_prob, labels, axis, self.mode_of(units.shape[2:], axis))


# ----------------------------------------------------------------------------- inputs and outputs


def find_inputs(input_dir: str | Path, *, recursive: bool = False,
                file_list: Optional[str | Path] = None) -> list[InputCase]:
    """The images to predict, sorted by relative path.

    Without ``file_list``: every file in ``input_dir`` (with ``recursive``, in its
    sub-folders too) whose extension is in :data:`IMAGE_SUFFIXES`; hidden files
    and folders are ignored. With ``file_list``: a text file with one path per
    line (relative to ``input_dir`` or absolute; blank lines and ``#`` comments
    ignored; a DICOM series folder is allowed); a missing file becomes an error
    row, not an exception. The case id is the path relative to ``input_dir``
    without its extension (the file name for paths outside it); two inputs with
    the same id (``a.nii.gz`` and ``a.nrrd``) keep their extension as ``a_nrrd``.
    """
    root = Path(input_dir)
    if not root.exists():
        raise FileNotFoundError(f"input folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"INPUT_DIR must be a folder: {root}")
    paths: list[Path] = []
    if file_list is not None:
        fl = Path(file_list)
        if not fl.is_file():
            raise FileNotFoundError(f"--file-list: not found: {fl}")
        for line in fl.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            paths.append(p if p.is_absolute() else root / p)
    else:
        pattern = root.rglob("*") if recursive else root.iterdir()
        for p in pattern:
            rel = p.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            if io.full_suffix(p) in IMAGE_SUFFIXES:
                paths.append(p)
            else:
                logger.debug("predict: ignoring %s (not an image extension)", p)
    cases, seen = [], {}
    for p in paths:
        try:
            rel = p.relative_to(root)
        except ValueError:
            rel = Path(p.name)
        cid = (rel.parent / io.strip_suffix(rel)).as_posix() if io.full_suffix(rel) else rel.as_posix()
        cases.append([cid, p, rel])
        seen[cid] = seen.get(cid, 0) + 1
    out = []
    for cid, p, rel in cases:
        if seen[cid] > 1:
            cid = (rel.parent / rel.name.replace(".", "_")).as_posix()
        out.append(InputCase(cid, p))
    out.sort(key=lambda c: c.case_id)
    ids = [c.case_id for c in out]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"two inputs map to the same output folder: {', '.join(dup[:5])}")
    return out


def output_suffixes(input_path: str | Path, output_format: str = "same") -> tuple[str, str]:
    """(label suffix, float suffix) for an input: its own format where it can hold both."""
    if output_format != "same":
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
        s = "." + output_format
        return s, s
    p = Path(input_path)
    if p.is_dir():  # a DICOM series
        return ".nii.gz", ".nii.gz"
    suffix = io.full_suffix(p)
    if suffix in _NO_FLOAT:
        return ".png", ".tif"
    s = _OUT_SUFFIX.get(suffix, suffix if suffix in io.NIFTI_SUFFIXES + io.ITK_WRITE_SUFFIXES else ".nii.gz")
    return s, s


def _check_folders(input_dir: Path, output_dir: Path, cases: list[InputCase]) -> None:
    inp, out = input_dir.resolve(), output_dir.resolve()
    if out == inp or out.is_relative_to(inp):
        raise ValueError(f"OUTPUT_DIR {output_dir} is inside INPUT_DIR {input_dir}: the input folder is never "
                         f"written to; choose an output folder elsewhere")
    if inp.is_relative_to(out):
        raise ValueError(f"INPUT_DIR {input_dir} is inside OUTPUT_DIR {output_dir}; choose another output folder")
    for c in cases:
        if c.path.resolve().is_relative_to(out):
            raise ValueError(f"input {c.path} lies inside OUTPUT_DIR {output_dir}; choose another output folder")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.8g}"
    return str(v)


def case_statistics(pred: Prediction, meta: dict, num_classes: int, *, has_geometry: bool) -> dict:
    """Summary values of one prediction (see :data:`SUMMARY_COLUMNS`)."""
    from .metrics import sample_diversity

    s = pred.samples.shape[0]
    spatial = pred.consensus.shape
    nd = len(spatial)
    spacing = meta.get("spacing") if has_geometry else None
    if spacing is not None and len(spacing) == nd:
        voxel = float(np.prod(spacing))
        unit = f"mm{nd}"
    else:
        voxel, unit = 1.0, "voxels" if nd == 3 else "pixels"
    fg = pred.samples.reshape(s, -1) != 0  # (S, N)
    vols = fg.sum(axis=1) * voxel
    union = fg.any(axis=0)
    ent = pred.entropy.reshape(-1)
    div = sample_diversity(torch.from_numpy(pred.samples[None].astype(np.int64)), num_classes=num_classes)
    row = {
        "mode": pred.mode,
        "shape": "x".join(str(v) for v in spatial),
        "spacing": "x".join(f"{v:.6g}" for v in spacing) if spacing is not None else "",
        "num_samples": s,
        "volume_unit": unit,
        "consensus_volume": float((pred.consensus != 0).sum() * voxel),
        "sample_volume_min": float(vols.min()),
        "sample_volume_median": float(np.median(vols)),
        "sample_volume_max": float(vols.max()),
        "mean_entropy_in_union": float(ent[union].mean()) if union.any() else float("nan"),
        "sample_diversity": float(div[0]),
    }
    for k in range(1, num_classes) if num_classes > 2 else ():
        row[f"consensus_volume_class{k}"] = float((pred.consensus == k).sum() * voxel)
    return row


def write_prediction(pred: Prediction, meta: dict, case_dir: Path, suffixes: tuple[str, str]) -> list[str]:
    """Write the maps of one case into ``case_dir`` (atomically, file by file); returns the file names."""
    label_suffix, float_suffix = suffixes
    out_meta = {k: v for k, v in meta.items() if k != "num_components"}
    out_meta["shape"] = list(pred.consensus.shape)
    num_classes = pred.probability.shape[0]
    ldtype = np.uint8 if num_classes <= 255 else np.uint16
    names = []

    def put(name: str, array: np.ndarray, suffix: str) -> None:
        io.write_image(array, out_meta, case_dir / f"{name}{suffix}")
        names.append(f"{name}{suffix}")

    width = max(3, len(str(pred.samples.shape[0] - 1)))
    for s, sample in enumerate(pred.samples):
        put(f"sample_{s:0{width}d}", sample.astype(ldtype), label_suffix)
    put("probability", pred.foreground, float_suffix)
    if num_classes > 2:
        for k in range(1, num_classes):
            put(f"probability_class{k}", pred.probability[k].astype(np.float32), float_suffix)
    put("entropy", pred.entropy.astype(np.float32), float_suffix)
    put("consensus", pred.consensus.astype(ldtype), label_suffix)
    return names


def read_summary(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_summary(rows: list[dict], path: str | Path) -> Path:
    """Write rows as CSV (atomically): :data:`SUMMARY_COLUMNS`, then any extra columns in order."""
    columns = list(SUMMARY_COLUMNS)
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in columns})
    return atomic_write_text(path, buf.getvalue())


def merge_summaries(output_dir: str | Path) -> tuple[Path, list[dict]]:
    """Merge the shard summaries ``summary.shard-K-of-N.csv`` of ``output_dir``
    into ``summary.csv`` (sorted by case); returns its path and rows."""
    output_dir = Path(output_dir)
    parts = sorted(output_dir.glob("summary.shard-*-of-*.csv"))
    if not parts:
        raise FileNotFoundError(f"no shard summaries (summary.shard-K-of-N.csv) in {output_dir}")
    rows = [r for p in parts for r in read_summary(p)]
    rows.sort(key=lambda r: r["case"])
    return write_summary(rows, output_dir / "summary.csv"), rows


# ----------------------------------------------------------------------------- the folder loop


@dataclass
class _Prepared:
    case: InputCase
    row: dict
    t0: float
    meta: dict = field(default_factory=dict)
    units: Optional[torch.Tensor] = None  # (N, C, *unit_spatial); released once stacked for the model
    axis: Optional[int] = None
    mode: str = ""
    error: Optional[str] = None
    skip: bool = False


def _error_message(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    msg = msg[0] if msg else ""
    return msg if isinstance(exc, (DataError, OSError)) and msg else f"{exc.__class__.__name__}: {msg}"


def _shard(spec: Optional[str]) -> Optional[tuple[int, int]]:
    if spec is None:
        return None
    if isinstance(spec, (tuple, list)):
        k, n = (int(v) for v in spec)
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
        if not m:
            raise ValueError(f"--shard: expected K/N (0 <= K < N), got {spec!r}")
        k, n = int(m.group(1)), int(m.group(2))
    if not 0 <= k < n:
        raise ValueError(f"--shard: expected K/N with 0 <= K < N, got {k}/{n}")
    return k, n


def predict_folder(checkpoint, input_dir: str | Path, output_dir: str | Path, *, recursive: bool = False,
                   file_list: Optional[str | Path] = None, overwrite: bool = False, output_format: str = "same",
                   workers: int = 2, shard=None, progress: bool = False, **predictor_kwargs) -> PredictSummary:
    """Predict every image of ``input_dir`` into ``output_dir`` (see the module docstring).

    Args:
        checkpoint: a checkpoint file, a run directory, or a :class:`Predictor`.
        recursive, file_list: which inputs (see :func:`find_inputs`).
        overwrite: recompute cases whose output folder exists.
        output_format: ``same`` (the input's) or one of nii.gz, nii, nrrd, mha.
        workers: threads reading and writing images while the model runs.
        shard: ``"K/N"``: only cases K, K+N, K+2N, ... of the sorted list; the
            summary is then ``summary.shard-K-of-N.csv`` (see :func:`merge_summaries`).
        progress: a tqdm bar on stderr.
        **predictor_kwargs: :class:`Predictor` options (num_samples, seed, device, ...).

    Returns:
        :class:`PredictSummary`; failed cases are rows with status ``error``
        (the function raises only for problems with the arguments).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not isinstance(checkpoint, Predictor):
        from .checkpoint import resolve_checkpoint_path

        resolve_checkpoint_path(checkpoint)  # a missing checkpoint first; it is loaded once OUTPUT_DIR is ours
    cases = find_inputs(input_dir, recursive=recursive, file_list=file_list)
    shard = _shard(shard)
    if not cases:
        where = f"{file_list}" if file_list else f"{input_dir}" + ("" if recursive else " (try --recursive)")
        raise ValueError(f"no input images found in {where}; extensions read: {', '.join(IMAGE_SUFFIXES)}")
    if shard is not None:
        cases = cases[shard[0]::shard[1]]  # may be empty: more shards than cases
    _check_folders(input_dir, output_dir, cases)
    output_format = output_format or "same"
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"OUTPUT_DIR {output_dir} cannot be created "
                              f"({exc.strerror or exc.__class__.__name__})") from None
    check_writable(output_dir, "OUTPUT_DIR")  # before any model is loaded or run
    with ExitStack() as locks:
        # One run per OUTPUT_DIR (exclusive lock); the shards of one run share it, each shard alone.
        locks.enter_context(FolderLock(output_dir, shared=shard is not None, what="OUTPUT_DIR"))
        if shard is not None:
            locks.enter_context(FolderLock(output_dir, what=f"OUTPUT_DIR (shard {shard[0]}/{shard[1]})",
                                           name=f".probunet.shard-{shard[0]}-of-{shard[1]}.lock"))
        else:  # alone in the folder: temp files of an interrupted run are nobody's
            remove_stale_temps(output_dir, recursive=True)
        predictor = checkpoint if isinstance(checkpoint, Predictor) else \
            Predictor.from_checkpoint(checkpoint, **predictor_kwargs)
        return _predict_cases(predictor, checkpoint, cases, input_dir, output_dir, overwrite=overwrite,
                              output_format=output_format, workers=workers, shard=shard, progress=progress)


def _case_dir(output_dir: Path, case: InputCase) -> Path:
    """``OUTPUT_DIR/<case id>``; DataError when it resolves outside OUTPUT_DIR (``..`` in a
    --file-list entry, a symlink): nothing is ever written outside OUTPUT_DIR."""
    case_dir = output_dir / case.case_id
    root = output_dir.resolve()
    resolved = case_dir.resolve()
    if resolved == root or not resolved.is_relative_to(root) or ".." in Path(case.case_id).parts:
        raise DataError(f"{case.path}: its output folder {case_dir} lies outside OUTPUT_DIR {output_dir} "
                        f"(a '..' in the file list?); skipped")
    return case_dir


def _predict_cases(predictor: "Predictor", checkpoint, cases: list, input_dir: Path, output_dir: Path, *,
                   overwrite: bool, output_format: str, workers: int, shard, progress: bool) -> PredictSummary:
    ckpt_name = str(checkpoint) if not isinstance(checkpoint, Predictor) else ""
    logger.info("predict: %d case(s) from %s -> %s (%d samples, device %s, roi %s, batch %d)", len(cases),
                input_dir, output_dir, predictor.num_samples, predictor.device, predictor.roi_size,
                predictor.batch_size)
    settings = {"checkpoint": ckpt_name, "probunet_version": __version__, "num_samples": predictor.num_samples,
                "seed": predictor.seed, "roi_size": list(predictor.roi_size) if predictor.roi_size else None,
                "amp": str(predictor.dtype).replace("torch.", "") if predictor.dtype else "off"}

    def prepare(case: InputCase) -> _Prepared:
        t0 = time.perf_counter()
        row = {"case": case.case_id, "input": str(case.path), "output": ""}
        item = _Prepared(case, row, t0)
        try:
            case_dir = _case_dir(output_dir, case)
            row["output"] = str(case_dir)
            done = case_dir / "case.json"
            if not overwrite and done.is_file():
                old = json.loads(done.read_text(encoding="utf-8"))
                row.update({k: v for k, v in old.get("summary", {}).items() if k not in ("status", "error")})
                row.update(status="skipped", error="", case=case.case_id, output=str(case_dir))
                if old.get("num_samples") != predictor.num_samples or old.get("seed") != predictor.seed:
                    logger.warning("%s: existing outputs (%s samples, seed %s) kept; pass --overwrite to recompute",
                                   case_dir, old.get("num_samples"), old.get("seed"))
                item.skip = True
                return item
            if not overwrite and case_dir.is_dir() and any(case_dir.iterdir()):
                raise FileExistsError(f"{case_dir} exists without case.json (an interrupted run?); "
                                      f"pass --overwrite to recompute it")
            array, meta = io.read_image(case.path)
            image = predictor.to_channels_first(array, meta, where=str(case.path))
            item.meta = meta
            item.units, item.axis = predictor.prepare(image, meta.get("spacing"))
            item.mode = predictor.mode_of(item.units.shape[2:], item.axis)
        except Exception as exc:  # one bad case never stops the others
            item.error = _error_message(exc)
        return item

    def finish(item: _Prepared, mean_prob, labels, seconds: float) -> dict:
        row, case_dir = item.row, output_dir / item.case.case_id
        try:
            pred = predictor.finish(mean_prob, labels, item.axis, item.mode)
            suffixes = output_suffixes(item.case.path, output_format)
            row.update(case_statistics(pred, item.meta, predictor.num_classes,
                                       has_geometry=suffixes[0] not in _NO_FLOAT))
            if overwrite and (case_dir / "case.json").exists():
                (case_dir / "case.json").unlink()  # incomplete until rewritten
            names = write_prediction(pred, item.meta, case_dir, suffixes)
            for p in case_dir.iterdir() if overwrite else ():
                if p.is_file() and _OUR_FILE.match(p.name) and p.name not in names:
                    p.unlink()  # stale output of an earlier run (other sample count or format)
            row.update(status="ok", error="", seconds=round(seconds + time.perf_counter() - item.t0, 3))
            record = {"case": item.case.case_id, "input": str(item.case.path), **settings,
                      "axis": item.axis, "outputs": names, "summary": row}
            atomic_write_text(case_dir / "case.json", json.dumps(record, indent=1, default=str))
        except Exception as exc:
            row.update(status="error", error=_error_message(exc))
            logger.error("predict: case %s failed: %s", item.case.case_id, row["error"])
        return row

    rows: dict[str, dict] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), desc="predict", unit="case", dynamic_ncols=True)

    def record(row: dict) -> None:
        rows[row["case"]] = row
        if bar is not None:
            bar.update(1)

    def fail(item: _Prepared, message: str) -> None:
        item.row.update(status="error", error=message)
        logger.error("predict: case %s failed: %s", item.case.case_id, message)
        record(item.row)

    workers = max(1, int(workers))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probunet-io") as pool:
        pending: deque[Future] = deque()
        writes: list[Future] = []
        queue = iter(cases)
        ahead = max(2 * workers, 2)

        def fill():
            while len(pending) < ahead:
                case = next(queue, None)
                if case is None:
                    return
                pending.append(pool.submit(prepare, case))

        fill()
        group: list[_Prepared] = []

        def flush():
            if not group:
                return
            t0 = time.perf_counter()
            try:
                counts = [g.units.shape[0] for g in group]
                units = torch.cat([g.units for g in group])
                eps = torch.cat([predictor.eps(g.case.case_id).expand(g.units.shape[0], -1, -1) for g in group])
                for g in group:
                    g.units = None  # only the stacked copy is kept
                mean_prob, labels = predictor.runner.run(units, eps)
            except Exception as exc:  # e.g. out of memory: these cases fail, the rest go on
                for g in group:
                    fail(g, _error_message(exc))
                group.clear()
                return
            share = (time.perf_counter() - t0) / units.shape[0]
            i = 0
            for g, n in zip(group, counts):
                writes.append(pool.submit(finish, g, mean_prob[i:i + n], labels[i:i + n], share * n))
                i += n
            group.clear()

        while pending:
            item = pending.popleft().result()
            fill()
            if item.skip:
                record(item.row)
                continue
            if item.error is not None:
                fail(item, item.error)
                continue
            if group and (group[0].units.shape[1:] != item.units.shape[1:]
                          or sum(g.units.shape[0] for g in group) + item.units.shape[0] > predictor.batch_size):
                flush()
            group.append(item)
            done = [w for w in writes if w.done()]
            for w in done:
                writes.remove(w)
                record(w.result())
        flush()
        for w in writes:
            record(w.result())
    if bar is not None:
        bar.close()

    ordered = [rows[c.case_id] for c in cases]
    name = "summary.csv" if shard is None else f"summary.shard-{shard[0]}-of-{shard[1]}.csv"
    path = write_summary(ordered, output_dir / name)
    summary = PredictSummary(ordered, path, output_dir)
    logger.info("predict: %d ok, %d skipped, %d failed; summary %s", len(ordered) - len(summary.failed)
                - len(summary.skipped), len(summary.skipped), len(summary.failed), path)
    return summary


# ----------------------------------------------------------------------------- CLI


def _parse_roi(value):
    if value is None:
        return "config"
    if isinstance(value, (int, list, tuple)):
        return value
    parts = [p for p in re.split(r"[,x ]+", str(value).strip()) if p]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--roi: expected an integer or one per axis like 64,64,32, got {value!r}") from None
    return sizes[0] if len(sizes) == 1 else sizes


def predict_cli(args) -> int:
    """``probunet predict``: 0 all cases written (or skipped), 1 some failed, user errors raise."""
    import sys

    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    axis = get("axis", "auto")
    summary = predict_folder(
        args.checkpoint, args.input_dir, args.output_dir, recursive=bool(get("recursive")),
        file_list=get("file_list"), overwrite=bool(get("overwrite")), output_format=get("output_format", "same"),
        workers=get("workers", 2) or 2, shard=get("shard"), progress=not get("no_progress", False),
        num_samples=get("num_samples", 16), seed=get("seed", 0) or 0, device=get("device", "auto") or "auto",
        amp=get("amp"), batch_size=get("batch_size"), roi_size=_parse_roi(get("roi")),
        overlap=get("overlap", 0.25), blend=get("blend", "gaussian"), prior_window=get("prior_window", "image"),
        axis="auto" if axis in (None, "auto") else int(axis), sample_chunk=get("sample_chunk"))
    n, failed, skipped = len(summary.rows), summary.failed, summary.skipped
    print(f"predicted {n - len(failed) - len(skipped)} of {n} case(s)"
          + (f", {len(skipped)} skipped (outputs exist; --overwrite recomputes them)" if skipped else "")
          + (f", {len(failed)} FAILED" if failed else "") + f"; summary: {summary.summary_path}")
    for r in failed:
        print(f"probunet predict: failed: {r['case']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["IMAGE_SUFFIXES", "SUMMARY_COLUMNS", "InputCase", "Prediction", "PredictSummary", "Predictor",
           "case_statistics", "find_inputs", "latent_eps", "merge_summaries", "output_suffixes", "predict_cli",
           "predict_folder", "read_summary", "write_prediction", "write_summary"]
