"""Uncertainty maps from sampled softmax probabilities, and image-level scores from the maps.

Maps (per voxel, natural log, nats). With p_s the class probabilities of
sample s = 1..S, ``probs (B, S, C, *spatial)``, and the samples grouped by the
*model draw* they come from (g = 1..G, G groups of K = S / G samples each):

- ``total`` = H(mean_s p_s), the entropy of the predictive distribution;
- ``aleatoric`` = mean_g H(mean_{s in g} p_s), the expected entropy of one model
  draw's own predictive distribution: the part a perfectly known model would
  still be unsure about (the data's ambiguity, the raters' disagreement);
- ``epistemic`` = total - aleatoric, the mutual information between the
  prediction and the model draw (>= 0 by the concavity of H): how much the
  model draws disagree with each other.

What a model draw is, and so which maps a model can give (:func:`model_maps`), follows from what
its spec (:class:`probunet.models.spec.ModelSpec`, registered beside the model) says its samples are:

- ``dropout`` and ``members``: softmax outputs whose samples are draws of the
  *model*: a dropout mask per sample (MC dropout, an approximate posterior over
  weights), or a member per sample (an ensemble, sample s from member s mod M).
  Every sample is its own draw (G = S), or the members are (G = M, each with
  K = S / M samples: for members that are latent models the spread within a
  member is aleatoric), which gives the standard decomposition
  total = H(mean p), aleatoric = mean H(p_s), epistemic = their difference
  (all three maps).
- ``latent``: one trained network whose sample-to-sample spread comes from a
  latent (the Probabilistic U-Net's z, the hierarchical models' latent maps, or
  the SSN's Gaussian over logits) that was fitted to the raters. That spread is
  the data's ambiguity, not the model's ignorance: there is one model draw
  (G = 1), so aleatoric = total and the mutual information over the latent
  would be rater ambiguity mislabelled as epistemic. These models give
  ``total`` and ``aleatoric`` only. (For the SSN this is a choice: its samples
  are softmax outputs, so the formula could be applied, but Monteiro et al.
  fit Sigma(x) to the raters and a fixed network has no parameter uncertainty.)
- ``softmax``: draws from one deterministic softmax (the U-Net baseline):
  total = aleatoric = H(softmax(f(x))), computed from the network's softmax
  itself (its samples are one-hot draws); no epistemic map.

A model without a registered spec is an error that names it.
A map a model cannot give is refused by :func:`check_maps` with one line.

Image-level scores, named ``<map>.<aggregation>`` (:func:`aggregate`):

- ``mean``: mean over the voxels;
- ``sum``: sum over the voxels;
- ``above_threshold``: mean of the voxels whose value is > ``threshold`` (nats);
  0 when no voxel is;
- ``patch_max``: maximum over the positions of a sliding window of
  ``patch_size`` voxels per axis (clipped to the image) of the window's mean.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

MAPS = ("total", "aleatoric", "epistemic")
AGGREGATIONS = ("mean", "sum", "above_threshold", "patch_max")
DEFAULT_THRESHOLD = 0.1  # nats (ln 2 = 0.693 is the most a binary voxel can have)
DEFAULT_PATCH_SIZE = 8  # voxels per axis


def _entropy(p: Tensor, dim: int) -> Tensor:
    """Shannon entropy in nats along ``dim``, 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(dim=dim)


def decompose(probs: Tensor, *, groups: Optional[int] = None) -> dict[str, Tensor]:
    """The three maps of ``probs (B, S, C, *spatial)`` (class probabilities of S samples).

    Args:
        probs: per-sample class probabilities, summing to 1 over C.
        groups: G, the number of model draws; sample s belongs to draw ``s mod G``
            (the ensemble's order). None: every sample is its own draw (G = S);
            1: all samples come from one model (epistemic is then 0). S must be a
            multiple of G.

    Returns:
        ``{"total", "aleatoric", "epistemic"}``, each ``(B, *spatial)`` fp32 (fp64 in, fp64 out);
        epistemic is clamped at 0 against rounding.
    """
    if probs.dim() < 4:
        raise ValueError(f"probs must be (B, S, C, *spatial), got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be floating point, got {probs.dtype}")
    b, s = probs.shape[:2]
    g = s if groups is None else int(groups)
    if g < 1 or s % g:
        raise ValueError(f"{s} samples cannot be split into {g} model draws of equal size; use a number of "
                         f"samples that is a multiple of {g}")
    # sample s = k * G + g  ->  (B, K, G, C, *sp): group g holds samples g, g + G, g + 2G, ...
    grouped = probs.reshape(b, s // g, g, *probs.shape[2:])
    member_mean = grouped.mean(dim=1)  # (B, G, C, *sp): each draw's predictive distribution
    total = _entropy(member_mean.mean(dim=1), dim=1)  # (B, C, *sp) -> (B, *sp)
    aleatoric = _entropy(member_mean, dim=2).mean(dim=1)  # (B, G, *sp) -> (B, *sp)
    return {"total": total, "aleatoric": aleatoric, "epistemic": (total - aleatoric).clamp_min(0.0)}


# ----------------------------------------------------------------------------- which model gives which map


@dataclass(frozen=True)
class ModelMaps:
    """What a model's samples support.

    kind: ``per_sample`` (every sample a model draw), ``members`` (M members, sample s from member
    s mod M), ``latent`` (one model, spread from a latent), ``softmax`` (one deterministic softmax).
    maps: the maps it gives. groups: M for ``members`` (else None). why: the reason in one phrase.
    """

    name: str
    kind: str
    maps: tuple
    groups: Optional[int] = None
    why: str = ""

    def groups_for(self, num_samples: int) -> Optional[int]:
        """G for :func:`decompose` at ``num_samples`` samples."""
        if self.kind == "per_sample":
            return None
        if self.kind == "members":
            return self.groups
        return 1


_LATENT_WHY = ("its sample spread comes from a latent fitted to the raters (the data's ambiguity); epistemic "
               "needs a second source of variation: train an ensemble of it (model.name: ensemble, "
               "model.member: {name})")

# what each kind of sample (probunet.models.spec.SAMPLE_KINDS) gives: ModelMaps.kind, the maps, the reason
_BY_SAMPLES = {
    "dropout": ("per_sample", MAPS, "each sample is a dropout draw of the weights"),
    "members": ("members", MAPS, "members are draws of the model; a member's own spread is aleatoric"),
    "latent": ("latent", ("total", "aleatoric"), _LATENT_WHY),
    "softmax": ("softmax", ("total", "aleatoric"), "one deterministic softmax has no model spread"),
}


def model_maps(model) -> ModelMaps:
    """The maps ``model`` can give and how its samples group into model draws, from what its spec says its
    samples are (see the module notes); ValueError naming the model when it has no registered spec."""
    from ..models.registry import spec_of

    spec = spec_of(model)
    samples = spec.samples_of(model)
    kind, maps, why = _BY_SAMPLES[samples.kind]
    label = samples.label or spec.name
    if kind == "members" and not samples.groups:
        raise ValueError(f"model {spec.name}: its samples are members, but its spec gives no member count (groups)")
    return ModelMaps(label, kind, maps, samples.groups if kind == "members" else None,
                     samples.why or why.format(name=spec.name))


def check_maps(spec: ModelMaps, maps: Sequence[str]) -> tuple:
    """``maps`` if ``spec`` gives them all, else ValueError in one line naming the map and why."""
    for m in maps:
        if m not in MAPS:
            raise ValueError(f"unknown uncertainty map {m!r}; known: {', '.join(MAPS)}")
        if m not in spec.maps:
            raise ValueError(f"{spec.name} gives no {m} map: {spec.why}")
    return tuple(maps)


def map_probabilities(model, image: Tensor, logits: Tensor) -> Tensor:
    """The probabilities the maps are computed from: softmax of the sampled ``logits (B, S, C, *spatial)``,
    except for a model whose samples are draws from one softmax (the deterministic U-Net), whose own
    softmax ``(B, 1, C, *spatial)`` of ``model(image)`` (``image (B, C_in, *spatial)``) is used (its
    samples are one-hot draws)."""
    if model_maps(model).kind == "softmax":
        with torch.inference_mode():
            was = model.training
            model.eval()
            try:
                out = model(image.to(next(model.parameters()).device, torch.float32))
            finally:
                model.train(was)
        return torch.softmax(out.float(), dim=1)[:, None].to(logits.device)
    return torch.softmax(logits.float(), dim=2)


def uncertainty_maps(model, image: Tensor, logits: Tensor, maps: Optional[Sequence[str]] = None
                     ) -> dict[str, Tensor]:
    """The maps ``model`` gives for its samples ``logits (B, S, C, *spatial)`` of ``image (B, C_in,
    *spatial)``: ``{map: (B, *spatial)}``. ``maps`` (default: all it can give) are checked first."""
    spec = model_maps(model)
    wanted = check_maps(spec, spec.maps if maps is None else maps)
    probs = map_probabilities(model, image, logits)
    out = decompose(probs, groups=1 if spec.kind == "softmax" else spec.groups_for(probs.shape[1]))
    return {m: out[m] for m in wanted}


# ----------------------------------------------------------------------------- image-level scores


def aggregate(umap: Tensor, aggregation: str, *, threshold: float = DEFAULT_THRESHOLD,
              patch_size: int = DEFAULT_PATCH_SIZE) -> Tensor:
    """One score per image from ``umap (B, *spatial)`` (2D or 3D): ``(B,)`` fp32 (see the module notes)."""
    if umap.dim() not in (3, 4):
        raise ValueError(f"a map must be (B, *spatial) with 2 or 3 spatial dims, got shape {tuple(umap.shape)}")
    flat = umap.flatten(1).float()  # (B, N)
    if aggregation == "mean":
        return flat.mean(dim=1)
    if aggregation == "sum":
        return flat.sum(dim=1)
    if aggregation == "above_threshold":
        keep = flat > threshold
        n = keep.sum(dim=1)
        total = torch.where(keep, flat, torch.zeros_like(flat)).sum(dim=1)
        return torch.where(n > 0, total / n.clamp(min=1), torch.zeros_like(total))
    if aggregation == "patch_max":
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        spatial = umap.shape[1:]
        k = tuple(min(int(patch_size), s) for s in spatial)
        pool = F.avg_pool2d if len(spatial) == 2 else F.avg_pool3d
        means = pool(umap.float()[:, None], kernel_size=k, stride=1)  # (B, 1, *positions)
        return means.flatten(1).max(dim=1).values
    raise ValueError(f"unknown aggregation {aggregation!r}; known: {', '.join(AGGREGATIONS)}")


def image_scores(maps: dict[str, Tensor], aggregations: Sequence[str] = AGGREGATIONS, *,
                 threshold: float = DEFAULT_THRESHOLD, patch_size: int = DEFAULT_PATCH_SIZE) -> dict[str, Tensor]:
    """``{"<map>.<aggregation>": (B,)}`` for every map ``(B, *spatial)`` and aggregation."""
    return {f"{name}.{agg}": aggregate(m, agg, threshold=threshold, patch_size=patch_size)
            for name, m in maps.items() for agg in aggregations}


__all__ = ["AGGREGATIONS", "MAPS", "ModelMaps", "aggregate", "check_maps", "decompose", "image_scores",
           "map_probabilities", "model_maps", "uncertainty_maps"]
