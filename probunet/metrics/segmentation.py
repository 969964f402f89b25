"""Metrics for segmentation under annotator variability.

Pure tensor functions: batched, device-agnostic, no I/O, no configuration.

Tensor layout; the set axis is always dim 1:

- references / raters: integer label maps ``(B, A, *spatial)``
- samples: integer label maps ``(B, S, *spatial)``
- sampled logits or probabilities: ``(B, S, C, *spatial)``

``spatial`` is 2D or 3D; every function that takes sets flattens it. Classes are
``0 .. num_classes - 1`` and class 0 is background.

Conventions (each one a named keyword):

- ``d(a, b) = 1 - IoU(a, b)``; IoU is computed per foreground class
  ``1 .. num_classes - 1`` and averaged over those classes.
- A class absent from both masks has IoU ``empty_iou``: 1.0 by default (so
  ``d = 0``; PHiSeg, SSN and CCDM evaluation code do this) or ``float('nan')``
  (Kohl et al. 2018 evaluation code). The mean over classes skips NaN classes
  (a nanmean, as Kohl's code); with a finite ``empty_iou`` no NaN arises and
  it is the plain mean (as PHiSeg's ``sum / nlabels``). A pair in which every
  foreground class is absent from both masks gets NaN under the NaN option.
- GED expectations run over all ordered pairs including ``i == j``. As in Kohl's
  evaluation code, E[d(Y,Y')] is a nanmean over the rater pairs (two empty
  raters, NaN under ``empty_iou=nan``, are left out) while E[d(S,Y)] and
  E[d(S,S')] are plain means (an empty sample facing an empty rater, or two
  empty samples, give NaN). With a finite ``empty_iou`` every mean is plain.

Intersection counts are computed as one-hot matrix products in chunks over
the flattened spatial axis (float32 products of 0/1 values, exact per chunk,
accumulated in int64), so memory stays bounded for large 3D volumes.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "iou",
    "pairwise_iou",
    "pairwise_distances",
    "GEDComponents",
    "ged_components",
    "ged_from_components",
    "rater_pair_mean",
    "generalized_energy_distance",
    "sample_diversity",
    "distinct_pair_mean",
    "hungarian_matched_iou",
    "hungarian_matched_iou_from_iou",
    "variance_ncc",
    "predictive_entropy",
    "foreground_variance",
    "mutual_information",
    "Calibration",
    "calibration",
    "calibration_from_sums",
    "aggregate_calibration",
    "consensus_scores",
    "empty_share",
    "QUBIQ_THRESHOLDS",
    "qubiq_score",
    "pearson",
]

# Elements per one-hot operand chunk (float32): 2**22 elements = 16 MiB. Also
# keeps every per-chunk count below 2**24, where float32 integers are exact.
_CHUNK_ELEMENTS = 2**22


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _out_dtype() -> torch.dtype:
    return torch.get_default_dtype()


def _acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for ratios and sums where the device has it (MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an integer >= 2 (background + at least one "
            f"foreground class), got {num_classes!r}"
        )


def _check_labels(labels: Tensor, name: str, num_classes: int) -> Tensor:
    """Validate an integer label map; bool maps are read as 0/1."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool:
        return labels.to(torch.uint8)
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"{name} must hold integer class labels, got dtype {labels.dtype}; "
            f"convert logits first, e.g. logits.argmax(dim=2)"
        )
    if labels.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} holds labels in [{lo}, {hi}] but num_classes={num_classes} "
                f"allows only 0..{num_classes - 1}; pass the right num_classes"
            )
    return labels


def _check_sets(x: Tensor, y: Tensor, x_name: str, y_name: str) -> None:
    """``x (B, S, *spatial)`` and ``y (B, A, *spatial)`` with matching B and spatial."""
    for t, n in ((x, x_name), (y, y_name)):
        if t.dim() < 3:
            raise ValueError(
                f"{n} must have shape (B, set, *spatial) with 1 to 3 spatial dims, "
                f"got {tuple(t.shape)}"
            )
        if t.shape[1] == 0:
            raise ValueError(f"{n} has an empty set axis (dim 1): {tuple(t.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
        raise ValueError(
            f"{x_name} {tuple(x.shape)} and {y_name} {tuple(y.shape)} must share the "
            f"batch size (dim 0) and the spatial shape (dims 2+)"
        )
    if x.device != y.device:
        raise ValueError(f"{x_name} is on {x.device} but {y_name} is on {y.device}")


def _iou_from_counts(
    inter: Tensor, size_a: Tensor, size_b: Tensor, empty_iou: float
) -> Tensor:
    """Per-class IoU from counts, then nanmean over the class axis (dim -1).

    ``inter``, ``size_a``, ``size_b`` broadcast to ``(..., K)`` integer counts.
    Returns ``(...)`` in the accumulation dtype.
    """
    dtype = _acc_dtype(inter.device)
    inter = inter.to(dtype)
    union = size_a.to(dtype) + size_b.to(dtype) - inter  # (..., K)
    empty = union == 0
    per_class = inter / torch.where(empty, torch.ones_like(union), union)
    per_class = torch.where(empty, torch.full_like(per_class, float(empty_iou)), per_class)
    return torch.nanmean(per_class, dim=-1)  # (...)


def _flatten_set(t: Tensor) -> Tensor:
    """``(B, S, *spatial)`` -> ``(B, S, N)``."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def _onehot_chunk(labels: Tensor, start: int, stop: int, num_classes: int) -> Tensor:
    """Foreground one-hot of a spatial chunk: ``(B, S, N)`` -> ``(B, K, S, n)`` float32.

    ``labels`` must already be validated (values in ``0 .. num_classes - 1``).
    """
    part = labels[..., start:stop]  # (B, S, n)
    if num_classes == 2:  # labels are 0/1: the label map is its own indicator
        return part.to(torch.float32).unsqueeze(1)
    classes = torch.arange(1, num_classes, device=labels.device).view(1, -1, 1, 1)
    return (part.unsqueeze(1) == classes).to(torch.float32)  # (B, 1, S, n) == (1, K, 1, 1)


def _pairwise_counts(
    sets: list[Tensor], pairs: list[tuple[int, int]], num_classes: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Foreground intersection counts for several pairs of label sets in one pass.

    ``sets[i]``: validated ``(B, S_i, N)`` integer labels. Returns, per pair
    ``(i, j)``, ``inter (B, S_i, S_j, K)`` int64 and, per set,
    ``size (B, S_i, K)`` int64, where K = num_classes - 1 foreground classes.
    Sizes come from the diagonal of a self-pair when one is requested.
    """
    device = sets[0].device
    batch, n_pix = sets[0].shape[0], sets[0].shape[-1]
    k = num_classes - 1
    widest = max(s.shape[1] for s in sets)
    chunk = max(1, min(n_pix, _CHUNK_ELEMENTS // max(1, batch * k * widest)))
    self_pair = {i: p for p, (i, j) in enumerate(pairs) if i == j}

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=torch.int64, device=device)

    inter = [zeros(batch, k, sets[i].shape[1], sets[j].shape[1]) for i, j in pairs]
    sizes = [None if i in self_pair else zeros(batch, k, s.shape[1]) for i, s in enumerate(sets)]
    for start in range(0, n_pix, chunk):
        onehot = [_onehot_chunk(s, start, start + chunk, num_classes) for s in sets]
        for idx, size in enumerate(sizes):
            if size is not None:
                size += onehot[idx].sum(dim=-1).round_().to(torch.int64)
        for out, (i, j) in zip(inter, pairs):
            # (B, K, S_i, n) @ (B, K, n, S_j) -> (B, K, S_i, S_j); exact below 2**24
            out += torch.matmul(onehot[i], onehot[j].transpose(-1, -2)).round_().to(torch.int64)
    for i, p in self_pair.items():
        sizes[i] = torch.diagonal(inter[p], dim1=-2, dim2=-1)  # |a| = |a & a|, (B, K, S_i)
    # move the class axis last: (B, S_i, S_j, K) and (B, S_i, K)
    return [t.permute(0, 2, 3, 1) for t in inter], [t.permute(0, 2, 1) for t in sizes]


# ----------------------------------------------------------------------------
# IoU and pairwise distances
# ----------------------------------------------------------------------------


def iou(
    a: Tensor,
    b: Tensor,
    *,
    num_classes: int = 2,
    empty_iou: float = 1.0,
    spatial_dims: int | None = None,
) -> Tensor:
    """IoU of two label maps over the foreground classes, mean over classes.

    Args:
        a, b: integer label maps that broadcast against each other,
            ``(*lead, *spatial)``. Bool maps are read as 0/1.
        num_classes: C; foreground classes are ``1 .. C - 1``.
        empty_iou: IoU of a class absent from both maps (1.0: PHiSeg/SSN/CCDM
            code; ``float('nan')``: Kohl et al. 2018 code).
        spatial_dims: how many trailing dims are spatial. ``None`` (default)
            reduces over all dims, i.e. ``a`` and ``b`` are single masks.

    Returns:
        IoU of shape ``lead`` (a 0-dim tensor when ``spatial_dims`` is None):
        per-class IoU with the empty convention, then a mean over classes that
        skips NaN classes (identical to the plain mean for finite ``empty_iou``).
    """
    _check_num_classes(num_classes)
    a = _check_labels(a, "a", num_classes)
    b = _check_labels(b, "b", num_classes)
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    shape = torch.broadcast_shapes(a.shape, b.shape)
    nd = len(shape) if spatial_dims is None else int(spatial_dims)
    if not 0 < nd <= min(a.dim(), b.dim()):
        raise ValueError(
            f"spatial_dims={spatial_dims} does not fit inputs of shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    dims = tuple(range(-nd, 0))  # trailing spatial dims of every operand
    inter, size_a, size_b = [], [], []
    for c in range(1, num_classes):  # loop over classes, not over pairs
        ma, mb = a == c, b == c
        inter.append((ma & mb).sum(dim=dims))
        size_a.append(ma.sum(dim=dims))
        size_b.append(mb.sum(dim=dims))
    lead = shape[: len(shape) - nd]

    def stack(counts: list[Tensor]) -> Tensor:  # K tensors broadcastable to lead -> (*lead, K)
        return torch.stack([t.expand(lead) for t in counts], dim=-1)

    out = _iou_from_counts(stack(inter), stack(size_a), stack(size_b), empty_iou)
    return out.to(_out_dtype())


def pairwise_iou(
    x: Tensor, y: Tensor, *, num_classes: int = 2, empty_iou: float = 1.0
) -> Tensor:
    """IoU between every element of set ``x`` and every element of set ``y``.

    Args:
        x: integer label maps ``(B, S, *spatial)``.
        y: integer label maps ``(B, A, *spatial)``.
        num_classes, empty_iou: as in :func:`iou`.

    Returns:
        ``(B, S, A)``; entry ``[b, i, j]`` is ``iou(x[b, i], y[b, j])``.
    """
    _check_num_classes(num_classes)
    x = _check_labels(x, "x", num_classes)
    y = _check_labels(y, "y", num_classes)
    _check_sets(x, y, "x", "y")
    (inter,), (sx, sy) = _pairwise_counts([_flatten_set(x), _flatten_set(y)], [(0, 1)], num_classes)
    out = _iou_from_counts(inter, sx[:, :, None, :], sy[:, None, :, :], empty_iou)  # (B, S, A)
    return out.to(_out_dtype())


def pairwise_distances(
    x: Tensor, y: Tensor, *, num_classes: int = 2, empty_iou: float = 1.0
) -> Tensor:
    """Distance matrix ``d = 1 - IoU`` between two sets of label maps.

    Args:
        x: integer label maps ``(B, S, *spatial)``.
        y: integer label maps ``(B, A, *spatial)``.
        num_classes, empty_iou: as in :func:`iou`.

    Returns:
        ``(B, S, A)`` distances in [0, 1] (NaN only under ``empty_iou=nan``).
    """
    return 1.0 - pairwise_iou(x, y, num_classes=num_classes, empty_iou=empty_iou)


# ----------------------------------------------------------------------------
# Generalized energy distance
# ----------------------------------------------------------------------------


class GEDComponents(NamedTuple):
    """Terms of the generalized energy distance for a batch.

    Fields (all tensors, default float dtype):
        cross: ``(B,)`` E[d(S, Y)], mean of ``d_sy``.
        sample_diversity: ``(B,)`` E[d(S, S')], mean of ``d_ss``.
        reference_diversity: ``(B,)`` E[d(Y, Y')], mean of ``d_yy``.
        d_sy: ``(B, S, A)`` sample-to-reference distances.
        d_ss: ``(B, S, S)`` sample-to-sample distances (zero diagonal unless NaN).
        d_yy: ``(B, A, A)`` reference-to-reference distances.

    Expectations are means over all ordered pairs including i == j: plain for
    ``cross`` and ``sample_diversity`` (NaN entries under ``empty_iou=nan``
    propagate), over the defined pairs for ``reference_diversity``
    (:func:`rater_pair_mean`, as Kohl's code); the matrices are kept so that a
    study can re-score with fewer samples (:func:`ged_from_components`) or
    apply another NaN policy.
    """

    cross: Tensor
    sample_diversity: Tensor
    reference_diversity: Tensor
    d_sy: Tensor
    d_ss: Tensor
    d_yy: Tensor


def ged_components(
    samples: Tensor, references: Tensor, *, num_classes: int = 2, empty_iou: float = 1.0
) -> GEDComponents:
    """Distance matrices and expectations that make up D^2_GED.

    Args:
        samples: integer label maps ``(B, S, *spatial)``.
        references: integer label maps ``(B, A, *spatial)``.
        num_classes, empty_iou: as in :func:`iou`.

    Returns:
        :class:`GEDComponents` with ``cross``, ``sample_diversity``,
        ``reference_diversity`` ``(B,)`` and ``d_sy (B, S, A)``,
        ``d_ss (B, S, S)``, ``d_yy (B, A, A)``. Follows Kohl et al. 2018 /
        PHiSeg: expectations over all ordered pairs, i == j included.
    """
    _check_num_classes(num_classes)
    samples = _check_labels(samples, "samples", num_classes)
    references = _check_labels(references, "references", num_classes)
    _check_sets(samples, references, "samples", "references")
    sets = [_flatten_set(samples), _flatten_set(references)]
    (i_sy, i_ss, i_yy), (n_s, n_y) = _pairwise_counts(sets, [(0, 1), (0, 0), (1, 1)], num_classes)
    dt = _out_dtype()
    d_sy = (1.0 - _iou_from_counts(i_sy, n_s[:, :, None], n_y[:, None], empty_iou)).to(dt)
    d_ss = (1.0 - _iou_from_counts(i_ss, n_s[:, :, None], n_s[:, None], empty_iou)).to(dt)
    d_yy = (1.0 - _iou_from_counts(i_yy, n_y[:, :, None], n_y[:, None], empty_iou)).to(dt)
    return GEDComponents(
        cross=d_sy.mean(dim=(1, 2)),  # (B,)
        sample_diversity=d_ss.mean(dim=(1, 2)),
        reference_diversity=rater_pair_mean(d_yy),
        d_sy=d_sy,
        d_ss=d_ss,
        d_yy=d_yy,
    )


def rater_pair_mean(d_yy: Tensor) -> Tensor:
    """E[d(Y,Y')]: ``d_yy (B, A, A)`` -> ``(B,)``, the mean over the ordered rater pairs (i == j
    included) whose distance is defined. Kohl et al. 2018's evaluation code takes this nanmean, so
    that under ``empty_iou=nan`` two empty raters (IoU undefined) are left out; with a finite
    ``empty_iou`` no entry is NaN and it is the plain mean. NaN when no pair is defined."""
    return torch.nanmean(d_yy, dim=(1, 2))


def ged_from_components(components: GEDComponents, *, num_samples: int | None = None) -> Tensor:
    """D^2_GED = 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')] from precomputed terms.

    Args:
        components: output of :func:`ged_components`.
        num_samples: if given, re-score with only the first ``num_samples``
            samples (slices ``d_sy`` and ``d_ss``; no recomputation), as in
            Kohl et al. 2018's study of GED against the number of samples.

    Returns:
        ``(B,)`` D^2_GED.
    """
    if num_samples is None:
        return 2.0 * components.cross - components.sample_diversity - components.reference_diversity
    total = components.d_ss.shape[1]
    if not 1 <= num_samples <= total:
        raise ValueError(f"num_samples must be in 1..{total}, got {num_samples}")
    cross = components.d_sy[:, :num_samples].mean(dim=(1, 2))
    diversity = components.d_ss[:, :num_samples, :num_samples].mean(dim=(1, 2))
    return 2.0 * cross - diversity - components.reference_diversity


def generalized_energy_distance(
    samples: Tensor, references: Tensor, *, num_classes: int = 2, empty_iou: float = 1.0
) -> Tensor:
    """Squared generalized energy distance D^2_GED with d = 1 - IoU.

    ``D^2_GED = 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')]`` (Kohl et al. 2018,
    Eq. 4), expectations over all ordered pairs including i == j.

    Args:
        samples: integer label maps ``(B, S, *spatial)``.
        references: integer label maps ``(B, A, *spatial)``.
        num_classes, empty_iou: as in :func:`iou`.

    Returns:
        ``(B,)`` D^2_GED per image.
    """
    return ged_from_components(
        ged_components(samples, references, num_classes=num_classes, empty_iou=empty_iou)
    )


def sample_diversity(samples: Tensor, *, num_classes: int = 2, empty_iou: float = 1.0) -> Tensor:
    """Mean pairwise distance among samples, E[d(S, S')] (collapse indicator).

    Args:
        samples: integer label maps ``(B, S, *spatial)``.
        num_classes, empty_iou: as in :func:`iou`.

    Returns:
        ``(B,)``; 0 when all samples are identical. Mean over all S*S ordered
        pairs including i == j, as the GED term.
    """
    return pairwise_distances(samples, samples, num_classes=num_classes, empty_iou=empty_iou).mean(dim=(1, 2))


def distinct_pair_mean(d: Tensor) -> Tensor:
    """Mean of a set's self-distance matrix over its distinct pairs (i != j).

    ``d (B, N, N)`` with ``d[:, i, i] = 0`` (as ``GEDComponents.d_ss`` / ``d_yy``) -> ``(B,)``.
    For N independent draws this is an unbiased estimate of E[d(X, X')] for two
    independent draws X, X'; the all-pairs mean (the GED term) is that times
    (N - 1) / N, so it reads lower for a small set (four raters: 3/4) than for a
    large one (100 samples: 99/100). NaN entries propagate; N = 1 gives NaN (no pair).
    """
    if d.dim() != 3 or d.shape[1] != d.shape[2]:
        raise ValueError(f"d must be (B, N, N), got shape {tuple(d.shape)}")
    n = d.shape[1]
    if n < 2:
        return torch.full(d.shape[:1], float("nan"), dtype=d.dtype, device=d.device)
    off = ~torch.eye(n, dtype=torch.bool, device=d.device)
    return d[:, off].mean(dim=1)


# ----------------------------------------------------------------------------
# Hungarian-matched IoU
# ----------------------------------------------------------------------------


def hungarian_matched_iou_from_iou(iou_matrix: Tensor) -> Tensor:
    """HM-IoU from a precomputed sample-by-reference IoU matrix.

    Args:
        iou_matrix: ``(B, S, A)`` IoU between samples and references (e.g.
            ``1 - ged_components(...).d_sy``).

    Returns:
        ``(B,)`` mean matched IoU. Both sets are tiled to L = lcm(S, A)
        elements (samples L/S times, references L/A times; element k of the
        tiled set is original element k mod S, resp. k mod A), matched one to
        one with ``scipy.optimize.linear_sum_assignment`` on cost 1 - IoU, and
        the L matched IoUs are averaged (Kohl et al. 2019). The tiled L x L
        matrix is built by indexing, not recomputed.
    """
    if iou_matrix.dim() != 3:
        raise ValueError(f"iou_matrix must have shape (B, S, A), got {tuple(iou_matrix.shape)}")
    batch, s, a = iou_matrix.shape
    values = iou_matrix.detach().to("cpu", torch.float64).numpy()
    if np.isnan(values).any():
        raise ValueError(
            "the IoU matrix contains NaN (empty_iou=nan with masks empty in both sets); "
            "Hungarian matching needs finite costs: use a finite empty_iou such as 1.0"
        )
    length = math.lcm(s, a)
    rows = np.arange(length) % s  # tiled sample k -> original sample k mod S
    cols = np.arange(length) % a  # tiled reference k -> original reference k mod A
    out = np.empty(batch, dtype=np.float64)
    for b in range(batch):  # one assignment problem per image
        tiled = values[b][rows[:, None], cols[None, :]]  # (L, L)
        r, c = linear_sum_assignment(1.0 - tiled)
        out[b] = tiled[r, c].mean()
    return torch.as_tensor(out, dtype=_out_dtype(), device=iou_matrix.device)


def hungarian_matched_iou(
    samples: Tensor, references: Tensor, *, num_classes: int = 2, empty_iou: float = 1.0
) -> Tensor:
    """Hungarian-matched IoU (Kohl et al. 2019) between samples and references.

    Args:
        samples: integer label maps ``(B, S, *spatial)``.
        references: integer label maps ``(B, A, *spatial)``.
        num_classes, empty_iou: as in :func:`iou`; ``empty_iou`` must be
            finite where both sets contain masks with no foreground.

    Returns:
        ``(B,)`` mean IoU of the optimal one-to-one matching between both sets
        tiled to lcm(S, A) elements; see :func:`hungarian_matched_iou_from_iou`.
        When A divides S this equals duplicating the raters S/A times.
    """
    return hungarian_matched_iou_from_iou(
        pairwise_iou(samples, references, num_classes=num_classes, empty_iou=empty_iou)
    )


# ----------------------------------------------------------------------------
# Probability-based metrics
# ----------------------------------------------------------------------------


def _class_probabilities(values: Tensor, from_logits: bool, name: str) -> Tensor:
    """``(B, S, C, *spatial)`` -> class probabilities ``(B, S, C', *spatial)``.

    C == 1 is read as a binary foreground channel (sigmoid for logits) and
    expanded to C' = 2 channels ``[1 - p, p]``.
    """
    if not values.is_floating_point():
        raise TypeError(f"{name} must be floating point (B, S, C, *spatial), got {values.dtype}")
    if values.dim() < 4:
        raise ValueError(f"{name} must have shape (B, S, C, *spatial), got {tuple(values.shape)}")
    if values.shape[2] == 1:
        fg = torch.sigmoid(values) if from_logits else values
        return torch.cat([1.0 - fg, fg], dim=2)
    return torch.softmax(values, dim=2) if from_logits else values


def _entropy(p: Tensor, dim: int) -> Tensor:
    """Shannon entropy in nats with 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(dim=dim)


def predictive_entropy(values: Tensor, *, from_logits: bool = True) -> Tensor:
    """Entropy of the mean predictive distribution, per pixel (natural log, nats).

    Args:
        values: sampled logits (``from_logits=True``) or class probabilities
            ``(B, S, C, *spatial)``; C == 1 is a binary foreground channel.

    Returns:
        ``(B, *spatial)``: ``H[mean_s p_s] = -sum_c pbar_c log pbar_c``, in [0, log C].
    """
    p = _class_probabilities(values, from_logits, "values")
    return _entropy(p.mean(dim=1), dim=1)  # mean over S -> (B, C, *sp) -> (B, *sp)


def mutual_information(values: Tensor, *, from_logits: bool = True) -> Tensor:
    """Mutual information between prediction and latent sample, per pixel (nats).

    ``MI = H[mean_s p_s] - mean_s H[p_s]`` (the epistemic / "BALD" part of the
    predictive entropy), clamped at 0 against rounding.

    Args:
        values: sampled logits or probabilities ``(B, S, C, *spatial)``.

    Returns:
        ``(B, *spatial)``.
    """
    p = _class_probabilities(values, from_logits, "values")
    total = _entropy(p.mean(dim=1), dim=1)  # (B, *sp)
    expected = _entropy(p, dim=2).mean(dim=1)  # (B, S, *sp) -> (B, *sp)
    return (total - expected).clamp_min(0.0)


def foreground_variance(values: Tensor, *, from_logits: bool = True) -> Tensor:
    """Variance over samples of the foreground probability ``1 - p(background)``.

    Args:
        values: sampled logits or probabilities ``(B, S, C, *spatial)``.

    Returns:
        ``(B, *spatial)`` population variance (divides by S, not S - 1), in [0, 1/4].
    """
    p = _class_probabilities(values, from_logits, "values")
    fg = 1.0 - p[:, :, 0]  # (B, S, *sp)
    return fg.var(dim=1, correction=0)


def variance_ncc(
    values: Tensor,
    references: Tensor,
    *,
    from_logits: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """S_NCC of PHiSeg (Baumgartner et al. 2019): error/variance correlation.

    With ``p_s`` the sampled class probabilities, ``pbar = mean_s p_s`` and
    ``CE(t, q) = -sum_c t_c log(q_c + eps)`` per pixel (natural log)::

        gamma   = mean_s CE(pbar, p_s)          # expected CE vs. the mean, (B, *sp)
        err_y   = mean_s CE(onehot(y), p_s)     # per rater y, (B, A, *sp)
        S_NCC   = mean_y NCC(gamma, err_y)

    This is the convention of PHiSeg's ``variance_ncc_dist`` and of the
    paper's definition: the rater map averages the cross-entropy of y against
    each sample (not against pbar), the target of the variance map is pbar and
    the prediction is the sample. NCC is the Pearson correlation over all
    pixels of one image (means and population standard deviations over
    pixels). A map that is constant over the image has no defined NCC: the
    result for that rater is NaN (PHiSeg divides by zero there too).

    Args:
        values: sampled class probabilities (default) or logits
            (``from_logits=True``) ``(B, S, C, *spatial)``; C == 1 is a
            binary foreground channel (probability or sigmoid logit).
        references: integer label maps ``(B, A, *spatial)`` in ``0..C-1``
            (0..1 when C == 1).
        eps: added inside the log, as PHiSeg (1e-8).

    Returns:
        ``(B,)`` S_NCC in [-1, 1]; higher means the sample variance points at
        the pixels where the raters disagree with the model.
    """
    p = _class_probabilities(values, from_logits, "values").to(_acc_dtype(values.device))
    num_classes = p.shape[2]
    references = _check_labels(references, "references", num_classes)
    if references.dim() != values.dim() - 1 or references.shape[0] != values.shape[0] or (
        references.shape[2:] != values.shape[3:]
    ):
        raise ValueError(
            f"references {tuple(references.shape)} must be (B, A, *spatial) matching "
            f"values {tuple(values.shape)} = (B, S, C, *spatial)"
        )
    log_p = torch.log(p + eps)  # (B, S, C, *sp)
    mean_p = p.mean(dim=1)  # (B, C, *sp)
    gamma = -(mean_p[:, None] * log_p).sum(dim=2).mean(dim=1)  # (B, *sp)
    # CE(onehot(y), p_s) = -log(p_s[y] + eps): gather along C for every rater
    mean_log_p = log_p.mean(dim=1)  # (B, C, *sp); mean_s commutes with the gather
    err = -torch.gather(
        mean_log_p[:, None].expand(-1, references.shape[1], *mean_log_p.shape[1:]),
        2,
        references.long()[:, :, None],
    ).squeeze(2)  # (B, A, *sp)
    g = gamma.reshape(gamma.shape[0], 1, -1)  # (B, 1, N)
    e = err.reshape(err.shape[0], err.shape[1], -1)  # (B, A, N)
    g = (g - g.mean(-1, keepdim=True)) / g.std(-1, correction=0, keepdim=True)
    e = (e - e.mean(-1, keepdim=True)) / e.std(-1, correction=0, keepdim=True)
    ncc = (g * e).mean(dim=-1)  # (B, A); inf/NaN -> NaN below for constant maps
    ncc = torch.where(torch.isfinite(ncc), ncc, torch.full_like(ncc, float("nan")))
    return ncc.mean(dim=1).to(_out_dtype())


# ----------------------------------------------------------------------------
# Calibration against rater frequency
# ----------------------------------------------------------------------------


class Calibration(NamedTuple):
    """Reliability-diagram data and ECE of sampled vs. rater foreground frequency.

    Fields (``...`` is ``(B,)`` per image, ``()`` after aggregation):
        ece: ``(...)`` expected calibration error.
        bin_edges: ``(num_bins + 1,)`` equal-width edges on [0, 1].
        counts: ``(..., num_bins)`` int64 pixel counts per bin.
        sum_predicted: ``(..., num_bins)`` sum of per-pixel sampled frequencies.
        sum_observed: ``(..., num_bins)`` sum of per-pixel rater frequencies.
        mean_predicted: ``(..., num_bins)`` sum_predicted / counts (NaN if empty).
        mean_observed: ``(..., num_bins)`` sum_observed / counts (NaN if empty).
    """

    ece: Tensor
    bin_edges: Tensor
    counts: Tensor
    sum_predicted: Tensor
    sum_observed: Tensor
    mean_predicted: Tensor
    mean_observed: Tensor


def calibration_from_sums(
    bin_edges: Tensor, counts: Tensor, sum_predicted: Tensor, sum_observed: Tensor
) -> Calibration:
    """Build a :class:`Calibration` from per-bin counts and sums ``(..., num_bins)``.

    ``ECE = sum_k n_k |mean_pred_k - mean_obs_k| / sum_k n_k
          = sum_k |sum_pred_k - sum_obs_k| / sum_k n_k``; NaN if no pixel.
    """
    n = counts.to(sum_predicted.dtype)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    nan = torch.full_like(n, float("nan"))
    mean_pred = torch.where(n > 0, sum_predicted / safe, nan)
    mean_obs = torch.where(n > 0, sum_observed / safe, nan)
    total = n.sum(dim=-1)
    ece = (sum_predicted - sum_observed).abs().sum(dim=-1) / total
    return Calibration(ece, bin_edges, counts, sum_predicted, sum_observed, mean_pred, mean_obs)


def calibration(
    sample_labels: Tensor,
    references: Tensor,
    *,
    num_bins: int = 10,
    num_classes: int = 2,
) -> Calibration:
    """Calibration of the per-pixel sampled foreground frequency vs. rater frequency.

    For every pixel, the predicted value is the fraction of samples that label
    it foreground (any class != 0) and the observed value is the fraction of
    raters that do. Pixels are binned by predicted value into ``num_bins``
    equal-width bins ``[k/n, (k+1)/n)``, the last one closed; the bin of a
    frequency ``c / S`` is ``floor(c * num_bins / S)`` computed in integers,
    so values on an edge go to the upper bin without rounding error. ALL
    pixels of the image are counted (background-only pixels included; they
    fill bin 0 and pull the ECE down on images with small structures).

    Args:
        sample_labels: integer label maps ``(B, S, *spatial)``.
        references: integer label maps ``(B, A, *spatial)``.
        num_bins: number of equal-width bins on [0, 1].
        num_classes: C, used to validate the labels.

    Returns:
        :class:`Calibration` with ``ece (B,)`` and per-image bin data
        ``(B, num_bins)``; sum several with :func:`aggregate_calibration`.
    """
    _check_num_classes(num_classes)
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    sample_labels = _check_labels(sample_labels, "sample_labels", num_classes)
    references = _check_labels(references, "references", num_classes)
    _check_sets(sample_labels, references, "sample_labels", "references")
    device = sample_labels.device
    dtype = _acc_dtype(device)
    s, a = sample_labels.shape[1], references.shape[1]
    fg_s = (_flatten_set(sample_labels) != 0).sum(dim=1)  # (B, N) sample votes
    fg_y = (_flatten_set(references) != 0).sum(dim=1)  # (B, N) rater votes
    bins = torch.clamp((fg_s * num_bins) // s, max=num_bins - 1)  # (B, N) exact integer binning
    pred = fg_s.to(dtype) / s
    obs = fg_y.to(dtype) / a
    batch = fg_s.shape[0]
    counts = torch.zeros(batch, num_bins, dtype=torch.int64, device=device)
    counts.scatter_add_(1, bins, torch.ones_like(bins))
    sum_pred = torch.zeros(batch, num_bins, dtype=dtype, device=device).scatter_add_(1, bins, pred)
    sum_obs = torch.zeros(batch, num_bins, dtype=dtype, device=device).scatter_add_(1, bins, obs)
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=dtype, device=device)
    return calibration_from_sums(edges, counts, sum_pred, sum_obs)


def aggregate_calibration(results: Calibration | Iterable[Calibration]) -> Calibration:
    """Pool calibration bins over images and batches (a dataset-level diagram).

    Args:
        results: one :class:`Calibration` or several (e.g. one per batch),
            with the same bin edges.

    Returns:
        :class:`Calibration` with ``ece ()`` and ``(num_bins,)`` bin data: the
        pixel counts and sums of all leading dims are added, so every pixel of
        the dataset weighs the same.
    """
    if isinstance(results, Calibration):
        results = [results]
    results = list(results)
    if not results:
        raise ValueError("aggregate_calibration needs at least one Calibration")
    edges = results[0].bin_edges
    counts = sum_pred = sum_obs = None
    for r in results:
        if r.bin_edges.shape != edges.shape or not torch.allclose(r.bin_edges.to(edges), edges):
            raise ValueError("cannot aggregate calibrations with different bin edges")
        nb = r.counts.shape[-1]
        c = r.counts.reshape(-1, nb).sum(dim=0)
        p = r.sum_predicted.reshape(-1, nb).sum(dim=0)
        o = r.sum_observed.reshape(-1, nb).sum(dim=0)
        if counts is None:
            counts, sum_pred, sum_obs = c, p, o
        else:
            counts = counts + c.to(counts.device)
            sum_pred = sum_pred + p.to(sum_pred)
            sum_obs = sum_obs + o.to(sum_obs)
    return calibration_from_sums(edges, counts, sum_pred, sum_obs)


# ----------------------------------------------------------------------------
# Consensus
# ----------------------------------------------------------------------------


def consensus_scores(
    samples: Tensor,
    references: Tensor,
    *,
    num_classes: int = 2,
    empty_score: float = 1.0,
) -> dict[str, Tensor]:
    """Dice and IoU of the samples' consensus vs. the raters' majority vote.

    Foreground is binary: any class != 0 (for probabilities, ``1 - p(class 0)``).

    - Prediction consensus: for integer ``samples (B, S, *spatial)``, a pixel
      is foreground if strictly more than half of the samples say so; for
      floating ``samples`` (probabilities ``(B, S, C, *spatial)``, or
      foreground probabilities ``(B, S, *spatial)``), if the mean foreground
      probability over samples is > 0.5.
    - Rater consensus: foreground if strictly more than half of the A raters
      label it foreground; a tie (e.g. 2 of 4) is background.

    Args:
        samples: label maps or probabilities, see above.
        references: integer label maps ``(B, A, *spatial)``.
        num_classes: C, used to validate labels.
        empty_score: Dice and IoU when both consensus masks are empty.

    Returns:
        ``{"dice": (B,), "iou": (B,)}``.
    """
    _check_num_classes(num_classes)
    references = _check_labels(references, "references", num_classes)
    if samples.is_floating_point():
        if samples.dim() == references.dim() + 1:
            fg_prob = 1.0 - _class_probabilities(samples, False, "samples")[:, :, 0]  # (B, S, *sp)
        elif samples.dim() == references.dim():
            fg_prob = samples
        else:
            raise ValueError(
                f"probability samples must be (B, S, C, *spatial) or (B, S, *spatial) "
                f"for references {tuple(references.shape)}, got {tuple(samples.shape)}"
            )
        _check_sets(fg_prob, references, "samples", "references")
        pred = fg_prob.mean(dim=1) > 0.5  # (B, *sp)
    else:
        samples = _check_labels(samples, "samples", num_classes)
        _check_sets(samples, references, "samples", "references")
        pred = 2 * (samples != 0).sum(dim=1) > samples.shape[1]  # strict majority, (B, *sp)
    ref = 2 * (references != 0).sum(dim=1) > references.shape[1]  # (B, *sp), tie -> background
    dtype = _acc_dtype(pred.device)
    pred = pred.reshape(pred.shape[0], -1)
    ref = ref.reshape(ref.shape[0], -1)
    inter = (pred & ref).sum(dim=1).to(dtype)
    sp, sr = pred.sum(dim=1).to(dtype), ref.sum(dim=1).to(dtype)
    union = sp + sr - inter
    empty = union == 0
    one = torch.ones_like(union)
    fill = torch.full_like(union, float(empty_score))
    dice = torch.where(empty, fill, 2.0 * inter / torch.where(empty, one, sp + sr))
    jacc = torch.where(empty, fill, inter / torch.where(empty, one, union))
    return {"dice": dice.to(_out_dtype()), "iou": jacc.to(_out_dtype())}


def empty_share(masks: Tensor, *, num_classes: int = 2) -> Tensor:
    """Share of a set's label maps with no foreground pixel at all.

    ``masks (B, S, *spatial)`` integer labels (samples or raters) -> ``(B,)``:
    the fraction of the S maps in which every pixel is class 0. For the raters
    it is how often "nothing there" was drawn; for the samples, how often the
    model says so. Under d = 1 - IoU with two empty masks at IoU 1, an empty
    sample is at distance 0 from an empty rater and 1 from any other, so the
    two shares tell whether a model says "nothing there" as often as the raters.
    """
    _check_num_classes(num_classes)
    masks = _check_labels(masks, "masks", num_classes)
    if masks.dim() < 3:
        raise ValueError(f"masks must be (B, S, *spatial), got shape {tuple(masks.shape)}")
    if masks.shape[1] == 0:
        raise ValueError("masks holds no label map (S = 0)")
    empty = ~(masks.reshape(masks.shape[0], masks.shape[1], -1) != 0).any(dim=2)  # (B, S)
    return empty.to(_acc_dtype(masks.device)).mean(dim=1).to(_out_dtype())


# ----------------------------------------------------------------------------
# QUBIQ challenge score
# ----------------------------------------------------------------------------

QUBIQ_THRESHOLDS = tuple(k / 10 for k in range(1, 10))  # 0.1, 0.2, ..., 0.9


def qubiq_score(
    prediction: Tensor,
    references: Tensor,
    *,
    num_classes: int = 2,
    foreground: int = 1,
    from_logits: bool = True,
    num_raters: Tensor | None = None,
    thresholds: Iterable[float] = QUBIQ_THRESHOLDS,
    empty_dice: float = 1.0,
) -> Tensor:
    """The QUBIQ challenge score per image: Dice of the thresholded mean prediction against the
    thresholded mean of the raters, averaged over the thresholds 0.1, 0.2, ..., 0.9.

    Convention, exactly: with P the predicted probability of class ``foreground``
    per pixel and R the fraction of the image's raters that marked the pixel as
    ``foreground``, for each threshold t the masks are ``P > t`` and ``R > t``
    (strictly greater: with 4 raters, R = 0.5 is inside at t = 0.4 and outside at
    t = 0.5), Dice = 2 |P_t & R_t| / (|P_t| + |R_t|), and Dice = ``empty_dice``
    (1.0) when both masks are empty (an empty prediction of an empty reference
    is right). The score is the plain mean of the Dice values over ``thresholds``.

    prediction, one of:

    - floating ``(B, S, C, *spatial)``: per-sample logits (``from_logits``, softmax
      over C; C = 1 a sigmoid foreground channel) or probabilities; P is the mean
      over the S samples of class ``foreground``'s probability;
    - floating ``(B, *spatial)``: P itself (a probability map in [0, 1]);
    - integer ``(B, S, *spatial)``: label samples; P is the fraction of samples
      equal to ``foreground``.

    references: integer ``(B, A, *spatial)`` rater label maps; ``num_raters`` ``(B,)``
    optional, the number of real raters of each image (the first ``num_raters[b]``;
    the rest are padding and ignored). Returns ``(B,)`` scores in [0, 1].
    """
    _check_num_classes(num_classes)
    references = _check_labels(references, "references", num_classes)
    if references.dim() < 3:
        raise ValueError(f"references must be (B, A, *spatial), got {tuple(references.shape)}")
    if not 0 <= int(foreground) < num_classes:
        raise ValueError(f"foreground must be a class in 0..{num_classes - 1}, got {foreground}")
    b, a = references.shape[:2]
    spatial = tuple(references.shape[2:])
    if prediction.is_floating_point():
        if prediction.dim() == references.dim() + 1:
            probs = _class_probabilities(prediction, from_logits, "prediction")
            if probs.shape[2] != num_classes:
                raise ValueError(f"prediction has {probs.shape[2]} classes (dim 2), num_classes={num_classes}")
            pred = probs[:, :, foreground].float().mean(dim=1)
        elif prediction.dim() == references.dim() - 1:
            pred = prediction.float()
        else:
            raise ValueError(
                f"prediction must be (B, S, C, *spatial) or (B, *spatial) floating point, or (B, S, *spatial) "
                f"integer, for references {tuple(references.shape)}; got {tuple(prediction.shape)}"
            )
    else:
        prediction = _check_labels(prediction, "prediction", num_classes)
        if prediction.dim() != references.dim():
            raise ValueError(
                f"integer prediction must be label samples (B, S, *spatial) for references "
                f"{tuple(references.shape)}, got {tuple(prediction.shape)}"
            )
        pred = (prediction == foreground).float().mean(dim=1)
    if tuple(pred.shape) != (b, *spatial):
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and references {tuple(references.shape)} must share the "
            f"batch size and the spatial shape"
        )
    if pred.device != references.device:
        raise ValueError(f"prediction is on {pred.device} but references is on {references.device}")
    if num_raters is None:
        counts = torch.full((b,), a, device=references.device, dtype=torch.long)
    else:
        counts = torch.as_tensor(num_raters, device=references.device).long()
        if counts.shape != (b,) or bool(((counts < 1) | (counts > a)).any()):
            raise ValueError(f"num_raters must be (B,) = ({b},) with values in 1..{a}, got {num_raters!r}")
    real = torch.arange(a, device=references.device).view(1, a) < counts.view(b, 1)  # (B, A)
    hits = (references == foreground).reshape(b, a, -1) & real.unsqueeze(2)
    ref = hits.sum(dim=1).double() / counts.view(b, 1).double()  # (B, N) rater fraction
    pred = pred.reshape(b, -1).double()
    thresholds = [float(t) for t in thresholds]
    if not thresholds:
        raise ValueError("thresholds must not be empty")
    scores = []
    for t in thresholds:
        p_t, r_t = pred > t, ref > t
        inter = (p_t & r_t).sum(dim=1).double()
        total = p_t.sum(dim=1).double() + r_t.sum(dim=1).double()
        empty = total == 0
        scores.append(torch.where(empty, torch.full_like(total, float(empty_dice)),
                                  2.0 * inter / torch.where(empty, torch.ones_like(total), total)))
    return torch.stack(scores, dim=1).mean(dim=1).to(_out_dtype())


# ----------------------------------------------------------------------------
# Summaries over cases
# ----------------------------------------------------------------------------


def pearson(x, y) -> float:
    """Pearson correlation of two 1-D sequences of equal length ``(N,)``; NaN when it is
    undefined (fewer than two values, or either sequence constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def mean_and_sem(values) -> dict:
    """Mean, standard deviation (ddof=1) and standard error over the finite values of
    ``values (N,)``.

    ``n`` is the number of finite values, ``num_nan`` the others (NaN cases, e.g.
    S_NCC on an image where the model is certain everywhere).
    """
    v = np.asarray(values, dtype=np.float64)
    ok = v[np.isfinite(v)]
    n = int(ok.size)
    mean = float(ok.mean()) if n else float("nan")
    std = float(ok.std(ddof=1)) if n > 1 else float("nan")
    sem = std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "sem": sem, "std": std, "n": n, "num_nan": int(v.size - n)}
