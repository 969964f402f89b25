"""Inference on images in memory: :class:`Predictor` turns one array into samples,
mean class probabilities, predictive entropy and a consensus (:class:`Prediction`).

The folder batch job (scanning, writers, summary, sharding, locks) built on it is
:mod:`probunet.inference.folder`; ``probunet predict`` is its thin wrapper in :mod:`probunet.cli`.

Preprocessing is that of training, read from the checkpoint's config: the image
gets a channel axis (``num_components`` of the file, channels last), the channel
count must equal ``model.in_channels``, and ``data.normalize`` is applied per
image as :func:`probunet.data.transforms.normalize_image` did in training (per
*slice* when a 2D model runs slice by slice on a volume, because its training
images were single slices).

Sampling goes through :class:`probunet.inference.Sampler`, the path validation
and ``probunet evaluate`` use (same checkpoint, image, case id and seed: same
samples), in fp32 unless ``--amp`` asks for autocast (the one precision policy,
written down in :mod:`probunet.inference`). Sample ``s`` of a case uses the
standard-normal draw ``eps_s`` seeded by ``(seed, case id, s)``, so outputs are reproducible, independent of the batch
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

Spacing (:class:`Resampling`): a model trained on whole scans resampled to one
spacing (``data.patch_size`` with a numeric ``data.spacing``; ``probunet train``
writes ``median`` into the run's config as the numbers it resolved to) sees every
image at that spacing. An image whose spacing is known and differs from it by more
than :data:`SPACING_TOLERANCE` (relative, per axis) is resampled as preprocessing
resamples training cases (:func:`probunet.data.preprocess.resample_image`: linear,
first voxel's centre kept, ``round(size * spacing / target)`` voxels per axis),
normalised, predicted, and every output is mapped back onto the image's own grid
(its shape; spacing, origin and direction are the input's). An image without a
known spacing (a plain array without ``spacing=``, PNG/JPEG/BMP files) is
predicted as it is, with a note in the log; so is a 3D volume under a 2D model
(slice by slice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..models.checkpoint import load_model
from ..data.errors import DataError
from ..data.preprocess import resample_image, resample_labels, target_spacing
from ..data.transforms import normalize_image
from .sampler import Sampler
from ..options import PredictOptions, with_overrides
from ..utils import resolve_device

logger = logging.getLogger(__name__)

SPACING_TOLERANCE = 1e-3  # relative difference per axis under which an image is taken as at the training spacing


# ----------------------------------------------------------------------------- results


@dataclass
class Prediction:
    """One image's prediction; ``*spatial`` is the input's spatial shape.

    samples (S, *spatial) uint8 label maps; probability (C, *spatial) float32 mean
    class probabilities over the samples; entropy (*spatial) float32 predictive
    entropy of that mean (nats); consensus (*spatial) uint8 majority vote; maps: the
    uncertainty maps beyond ``entropy`` (which is the ``total`` map) that the model gives,
    ``{"aleatoric", "epistemic"}`` (*spatial) float32 nats, empty for a model whose
    aleatoric map is its total (see :mod:`probunet.inference.uncertainty`).
    """

    samples: np.ndarray
    probability: np.ndarray
    entropy: np.ndarray
    consensus: np.ndarray
    mode: str = "whole"
    maps: dict = field(default_factory=dict)
    resampling: Optional[dict] = None  # the model's grid when the image was resampled (Resampling.record)

    @property
    def foreground(self) -> np.ndarray:
        """(*spatial) float32: mean probability of any class != 0."""
        return (1.0 - self.probability[0]).astype(np.float32)


@dataclass(frozen=True)
class Resampling:
    """An image resampled to the training spacing: its own grid (``shape`` (*spatial), ``spacing``)
    and the model's (``target`` spacing, ``model_shape``), to map the outputs back.

    Back on the image's grid (both grids share the first voxel's centre, as in preprocessing):

    * ``probability`` (C, *spatial) and the ``aleatoric`` map: linear interpolation, as the image
      was resampled (a linear mix of distributions is a distribution: the classes still sum to 1);
    * ``entropy`` and ``epistemic``: recomputed from those (entropy of the mapped mean probability,
      epistemic = entropy - aleatoric), so the written maps keep their definitions exactly;
    * ``samples`` (S, *spatial): per sample, linear interpolation of each class's one-hot map, then
      the most likely class (binary: threshold 0.5): the rule preprocessing applies to the raters'
      masks (:func:`probunet.data.preprocess.resample_labels`), which keeps a lesion's volume better
      than nearest neighbour and gives smooth outlines, not blocks of the model's voxels, when
      mapping to a finer grid;
    * ``consensus``: the majority vote of the mapped samples, so it stays the vote of the samples
      that are written.
    """

    shape: tuple
    spacing: tuple
    target: tuple
    model_shape: tuple

    def record(self) -> dict:
        return {"spacing": list(self.spacing), "model_spacing": list(self.target),
                "model_shape": list(self.model_shape)}


def _consensus(lab: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels (S, *sp) -> (*sp) uint8 majority vote (ties: the lower label; binary: foreground iff > S/2)."""
    if num_classes == 2:
        return (2 * (lab != 0).sum(dim=0) > lab.shape[0]).to(torch.uint8)
    counts = torch.stack([(lab == k).sum(dim=0) for k in range(num_classes)])  # (C, *sp)
    return counts.argmax(dim=0).to(torch.uint8)  # first maximum: ties -> lower label


# ----------------------------------------------------------------------------- predictor


def config_roi(roi, cfg):
    """``"config"``: the training patch (data.patch_size, data.crop_size, or the synthetic image size);
    else ``roi``."""
    if isinstance(roi, str) and roi == "config":
        roi = getattr(cfg.data, "patch_size", None) or cfg.data.crop_size
        if roi is None and cfg.data.format == "synthetic" and not cfg.data.path:
            roi = cfg.data.synthetic.size
    return roi


class Predictor:
    """A model and the preprocessing of its training config, ready to predict images.

    Args:
        model: a model meeting :class:`probunet.models.base.SegmentationSampler` (its weights are used as is).
        cfg: the resolved :class:`probunet.config.Config` it was trained with.
        options: a :class:`probunet.options.PredictOptions` (the sampling fields are used:
            num_samples, seed, device, amp, batch_size, roi_size, overlap, blend,
            prior_window, axis, sample_chunk); keyword arguments of the same names
            override single fields. ``amp`` None means fp32 (the policy of
            :mod:`probunet.inference`); ``batch_size`` None: 16 for 2D models, 1 for 3D;
            ``roi_size`` ``"config"``: the training patch (``data.crop_size``, or the
            synthetic image size), None or 0: always the whole image.

    Sampling goes through :class:`probunet.inference.Sampler`, as validation and
    ``evaluate`` do: sample ``s`` of a case is decided by ``(seed, case id, s)``.
    """

    def __init__(self, model, cfg, options: Optional[PredictOptions] = None, **kwargs):
        opts = with_overrides(options, PredictOptions, **kwargs).check()
        self.options = opts
        self.device = opts.device if isinstance(opts.device, torch.device) else resolve_device(opts.device)
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.num_samples = int(opts.num_samples)
        self.seed = int(opts.seed)
        self.axis = opts.axis
        self.batch_size = int(opts.batch_size) if opts.batch_size else (16 if model.spatial_dims == 2 else 1)
        self.sampler = Sampler(self.model, seed=self.seed, device=self.device, amp=opts.amp,
                               batch_size=self.batch_size, roi_size=config_roi(opts.roi_size, cfg),
                               overlap=opts.overlap, blend=opts.blend, context_window=opts.prior_window,
                               sample_chunk=opts.sample_chunk)
        self.roi_size = self.sampler.roi_size
        self.dtype = self.sampler.dtype
        self.target_spacing = self._training_spacing(cfg)
        self._noted_unknown = False
        from .uncertainty import model_maps

        spec = model_maps(self.model)  # models with an epistemic map: stream the aleatoric one too
        self.groups = (spec.groups_for(self.num_samples) or self.num_samples) if "epistemic" in spec.maps else None
        if self.groups is not None and self.num_samples % self.groups:
            self.groups = None  # an ensemble sampled fewer times than multiples of its members: entropy only
            logger.warning("%d samples are not a multiple of the ensemble's %d members: only the entropy map is "
                           "written", self.num_samples, spec.groups)

    @classmethod
    def from_checkpoint(cls, path: str | Path, options: Optional[PredictOptions] = None, **kwargs) -> "Predictor":
        """Load a checkpoint file or run directory (``best.pt``, else ``last.pt``)."""
        model, cfg, ckpt = load_model(path)
        predictor = cls(model, cfg, options, **kwargs)
        predictor.checkpoint = {"path": ckpt.get("path"), "digest": ckpt.get("digest")}  # what a calibration names
        return predictor

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def _training_spacing(self, cfg) -> Optional[tuple]:
        """The spacing the model saw in training, one value per spatial axis, or None (no resampling)."""
        data = cfg.data
        spacing = getattr(data, "spacing", None)
        if getattr(data, "patch_size", None) is None or spacing is None:
            return None  # without patch_size, data.spacing does not resample (docs/configs.md)
        if spacing == "median":
            logger.warning("the checkpoint's data.spacing is \"median\" (a run from before probunet train wrote the "
                           "resolved numbers): images are predicted at their own spacing")
            return None
        try:
            return target_spacing(spacing, [], self.model.spatial_dims)
        except DataError as exc:
            logger.warning("the checkpoint's %s: images are predicted at their own spacing", exc)
            return None

    def resample_for_model(self, image: np.ndarray, spacing=None, *, where: str = "image"):
        """image (C, *spatial) at ``spacing`` (mm per axis, None: unknown) -> the image the model sees,
        (C, *model_spatial), and a :class:`Resampling` to map the outputs back (None: not resampled).

        Resampled when the checkpoint's training spacing is known, the image has the model's spatial
        dims, its spacing is known and differs by more than :data:`SPACING_TOLERANCE`; logged per image.
        """
        target = self.target_spacing
        nd = image.ndim - 1
        if target is None or nd != self.model.spatial_dims:
            return image, None
        if spacing is None or len(spacing) != nd:
            level = logging.INFO if self._noted_unknown else logging.WARNING
            self._noted_unknown = True
            logger.log(level, "%s: spacing unknown; predicted at its own voxel size (the model was trained at "
                       "%s mm)", where, list(target))
            return image, None
        spacing = tuple(float(v) for v in spacing)
        if np.allclose(spacing, target, rtol=SPACING_TOLERANCE, atol=0):
            return image, None
        resampled = resample_image(image, spacing, target)
        plan = Resampling(tuple(image.shape[1:]), spacing, tuple(target), tuple(resampled.shape[1:]))
        logger.info("%s: resampled from spacing %s to %s mm (shape %s -> %s) for the model; outputs are mapped "
                    "back to the input's grid", where, [round(v, 6) for v in spacing], list(target),
                    list(plan.shape), list(plan.model_shape))
        return resampled, plan

    def to_input_grid(self, pred: Prediction, plan: Resampling) -> Prediction:
        """A :class:`Prediction` on the model's grid -> on the image's own grid (the rules of :class:`Resampling`)."""
        from ..metrics.segmentation import predictive_entropy

        back = (plan.target, plan.spacing)
        prob = resample_image(pred.probability, *back, out_shape=plan.shape)  # (C, *spatial)
        entropy = predictive_entropy(torch.from_numpy(prob)[None, None], from_logits=False)[0]
        samples = resample_labels(pred.samples, *back, self.num_classes, out_shape=plan.shape)  # (S, *spatial)
        maps = {}
        if "aleatoric" in pred.maps:
            aleatoric = torch.from_numpy(resample_image(pred.maps["aleatoric"][None], *back, out_shape=plan.shape)[0])
            maps = {"aleatoric": aleatoric.numpy(), "epistemic": (entropy - aleatoric).clamp_min(0.0).float().numpy()}
        consensus = _consensus(torch.from_numpy(samples), self.num_classes).numpy()
        return Prediction(samples=samples, probability=prob, entropy=entropy.float().numpy(), consensus=consensus,
                          mode=pred.mode, maps=maps, resampling=plan.record())

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

    def run(self, units: torch.Tensor, case_ids: Sequence[str]) -> tuple:
        """units (N, C, *u) of one shape, one case id per unit (slices of a volume share theirs) ->
        mean class probabilities (N, C, *u) float32, labels (N, S, *u) and, for models with an
        epistemic map, the aleatoric map (N, *u) float32 (else None), on the CPU."""
        probs, labels, aleatoric = [], [], []
        for i in range(0, units.shape[0], self.batch_size):
            out = self.sampler.sample(list(case_ids[i:i + self.batch_size]), units[i:i + self.batch_size],
                                      self.num_samples, pairwise=False, groups=self.groups)
            probs.append(out.mean_probability.cpu())
            labels.append(out.labels.cpu())
            if out.aleatoric is not None:
                aleatoric.append(out.aleatoric.cpu())
        return torch.cat(probs), torch.cat(labels), (torch.cat(aleatoric) if aleatoric else None)

    def mode_of(self, unit_spatial: Sequence[int], axis: Optional[int]) -> str:
        mode = "sliding_window" if self.sampler.uses_window(unit_spatial) else "whole"
        return mode if axis is None else f"slices(axis={axis})" + (" + sliding_window" if mode != "whole" else "")

    def finish(self, mean_prob: torch.Tensor, labels: torch.Tensor, axis: Optional[int], mode: str,
               aleatoric: Optional[torch.Tensor] = None, resampling: Optional[Resampling] = None) -> Prediction:
        """mean_prob (N, C, *u), labels (N, S, *u) and aleatoric (N, *u) or None from the runner ->
        :class:`Prediction` (with ``aleatoric``: ``maps`` aleatoric and epistemic = entropy - aleatoric),
        mapped back onto the image's grid when ``resampling`` (from :meth:`resample_for_model`) is given."""
        from ..metrics.segmentation import predictive_entropy

        if axis is None:
            prob, lab = mean_prob[0], labels[0]  # (C, *sp), (S, *sp)
        else:
            prob, lab = mean_prob.movedim(0, 1 + axis), labels.movedim(0, 1 + axis)
        entropy = predictive_entropy(prob[None, None], from_logits=False)[0]  # (*sp)
        maps = {}
        if aleatoric is not None:
            aleatoric = aleatoric[0] if axis is None else aleatoric.movedim(0, axis)  # (*sp)
            maps = {"aleatoric": aleatoric.float().numpy(),
                    "epistemic": (entropy - aleatoric).clamp_min(0.0).float().numpy()}
        consensus = _consensus(lab, self.num_classes)
        pred = Prediction(samples=lab.contiguous().numpy(), probability=prob.contiguous().numpy(),
                          entropy=entropy.float().numpy(), consensus=consensus.numpy(), mode=mode, maps=maps)
        return pred if resampling is None else self.to_input_grid(pred, resampling)

    def __call__(self, image: np.ndarray, *, case_id: str = "", spacing=None,
                 meta: Optional[dict] = None) -> Prediction:
        """Predict one image.

        ``image``: with ``meta`` (as :func:`probunet.data.io.read_image` returns
        them), the array as read; without, channels first ``(C, *spatial)`` or
        ``(*spatial)`` for single-channel models, where ``*spatial`` has the
        model's dims or, for a 2D model, 3 dims (run slice by slice).
        ``case_id`` seeds the samples with the predictor's seed. ``spacing`` (mm per spatial axis, or
        ``meta["spacing"]``): an image not at the training spacing is resampled for the model and
        the outputs mapped back (see the module notes); without one it is predicted as it is.
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
        image, plan = self.resample_for_model(image, spacing, where=f"case {case_id}" if case_id else "image")
        units, axis = self.prepare(image, spacing if plan is None else plan.target)
        mean_prob, labels, aleatoric = self.run(units, [case_id] * units.shape[0])
        return self.finish(mean_prob, labels, axis, self.mode_of(units.shape[2:], axis), aleatoric, plan)


__all__ = ["SPACING_TOLERANCE", "Prediction", "Predictor", "Resampling"]
