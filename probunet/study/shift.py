"""Dataset shifts for out-of-distribution studies: change the images, keep the masks and the truth.

Each shift takes an image ``(C, *spatial)`` float32 and a ``severity`` >= 0
(0: the image unchanged) and changes one thing:

- ``intensity``: a brightness offset, x + 0.2 * severity (changes the mean, not
  the contrast or the structure);
- ``noise``: additive Gaussian noise of standard deviation 0.05 * severity
  (changes the standard deviation, the mean only by chance);
- ``blur``: a Gaussian blur of sigma = severity voxels over the spatial axes
  (removes high-frequency energy, keeps the mean);
- ``texture``: an added zero-mean random texture, Gaussian-smoothed noise of
  scale 2 voxels and standard deviation 0.05 * severity (a background unlike the
  training set's);
- ``lesion_contrast``: the lesions' contrast against the background scaled by
  max(0, 1 - 0.5 * severity) (faint lesions), background untouched. On the
  synthetic set the lesion signal is known exactly (the generator's soft
  profiles); elsewhere it is estimated from the raters' mean mask, smoothed,
  times the difference of the mean image inside and outside it.

Severity is bounded per kind (:data:`MAX_SEVERITY`), wide enough for every value that
changes the image meaningfully: ``intensity``, ``noise`` and ``texture`` at most 1000
(an offset of 200, a noise or texture standard deviation of 50: far past any
normalised intensity range); ``blur`` at most the image's largest side in voxels
(and 1024 before the image is known: a blur wider than the image leaves only its
mean); ``lesion_contrast`` at most 2 (the lesions are gone at 2). A shifted image
that is not finite (an input already holding NaN or Inf, or values near the
float32 limit) is an error naming the case.

Random shifts draw from ``numpy.random.default_rng([seed, index, KIND_CODE])``:
case ``index`` gets the same draw whatever the other cases.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
from scipy.ndimage import gaussian_filter

from ..options import SHIFT_KINDS as SHIFTS
_CODES = {k: i + 101 for i, k in enumerate(SHIFTS)}


MAX_SEVERITY = {"intensity": 1000.0, "noise": 1000.0, "blur": 1024.0, "texture": 1000.0, "lesion_contrast": 2.0}


def max_severity(kind: str, size: Optional[int] = None) -> float:
    """The largest ``--severity`` of ``kind``; for ``blur`` also at most ``size``, the image's largest side."""
    top = MAX_SEVERITY[kind]
    return min(top, float(size)) if kind == "blur" and size is not None else top


def severity_of(shift: Optional[str], severity: Optional[float]) -> float:
    """``severity`` (default 1) of the shift ``shift``; a ValueError without a shift (it would change nothing)."""
    if severity is not None and not shift:
        raise ValueError(f"--severity {severity:g} needs --shift KIND (the kind of shift it is the strength of)")
    return 1.0 if severity is None else float(severity)


def check_shift(kind: str, severity: float, size: Optional[int] = None) -> None:
    """ValueError in one line for an unknown kind or a severity outside ``0..max_severity(kind, size)``
    (``size``: the image's largest side in voxels, where known)."""
    if kind not in SHIFTS:
        raise ValueError(f"--shift {kind!r}: unknown shift; known: {', '.join(SHIFTS)}")
    top = max_severity(kind, size)
    if not np.isfinite(severity) or not 0 <= severity <= top:
        why = (f" (a blur sigma in voxels, at most the image's largest side, {top:g} here)"
               if kind == "blur" and size is not None and top < MAX_SEVERITY[kind] else "")
        raise ValueError(f"--severity {severity:g}: --shift {kind} takes a severity in 0..{top:g}{why}")


def lesion_signal(image: np.ndarray, labels: np.ndarray, truth: Optional[dict] = None) -> np.ndarray:
    """What the lesions add to ``image (C, *spatial)``: ``(*spatial)`` (broadcast over channels).

    With the synthetic generator's ``truth`` exactly 0.6 * contrast * soft profile summed over
    lesions; else the raters' mean mask ``labels (A, *spatial)`` (foreground = label > 0),
    Gaussian-smoothed (sigma 1), times (mean image inside - mean image outside the majority).
    """
    if truth is not None and truth.get("lesions") is not None:
        from ..data.synthetic import soft_profile

        shape = tuple(truth["shape"])
        signal = np.zeros(shape, dtype=np.float64)
        for lesion in truth["lesions"]:
            signal += 0.6 * lesion["contrast"] * soft_profile(lesion, shape)
        return signal
    freq = (np.asarray(labels) > 0).mean(axis=0).astype(np.float64)  # (*spatial)
    inside = freq > 0.5
    if not inside.any() or inside.all():
        return np.zeros_like(freq)
    mean_img = np.asarray(image, dtype=np.float64).mean(axis=0)
    contrast = float(mean_img[inside].mean() - mean_img[~inside].mean())
    return gaussian_filter(freq, sigma=1.0) * contrast


def shift_image(image: np.ndarray, kind: str, severity: float, *, seed: int = 0, index: int = 0,
                labels: Optional[np.ndarray] = None, truth: Optional[dict] = None,
                where: str = "the image") -> np.ndarray:
    """``image (C, *spatial)`` shifted by ``kind`` at ``severity``: a new float32 array of the same shape.

    ``labels (A, *spatial)`` and ``truth`` are read by ``lesion_contrast`` only. ValueError naming
    ``where`` when the shifted image is not finite.
    """
    x = np.asarray(image, dtype=np.float64)
    check_shift(kind, float(severity), max(x.shape[1:], default=None))
    s = float(severity)
    spatial_sigma = (0,) + (1,) * (x.ndim - 1)
    rng = np.random.default_rng([int(seed), int(index), _CODES[kind]])
    if kind == "intensity":
        out = x + 0.2 * s
    elif kind == "noise":
        out = x + 0.05 * s * rng.standard_normal(x.shape)
    elif kind == "blur":
        out = gaussian_filter(x, sigma=tuple(s * a for a in spatial_sigma)) if s > 0 else x
    elif kind == "texture":
        field = gaussian_filter(rng.standard_normal(x.shape), sigma=tuple(2.0 * a for a in spatial_sigma))
        field = (field - field.mean()) / (field.std() + 1e-12)
        out = x + 0.05 * s * field
    else:  # lesion_contrast
        if labels is None and truth is None:
            raise ValueError("lesion_contrast needs the case's rater masks or its synthetic truth")
        factor = max(0.0, 1.0 - 0.5 * s)
        out = x + (factor - 1.0) * lesion_signal(x, labels, truth)[None]
    out = out.astype(np.float32)
    if not np.all(np.isfinite(out)):
        bad = int(out.size - np.isfinite(out).sum())
        raise ValueError(f"--shift {kind} --severity {s:g}: the shifted image of {where} is not finite ({bad} "
                         f"voxels NaN or Inf); check the input image's values or lower --severity")
    return out


def shift_item(item: dict, kind: str, severity: float, *, seed: int = 0, index: int = 0) -> dict:
    """A shifted copy of a dataset item: new image, the same labels (copied), ``meta["shift"]`` added."""
    meta = copy.deepcopy(item.get("meta", {}))
    image = shift_image(item["image"], kind, severity, seed=seed, index=index, labels=item["labels"],
                        truth=meta.get("truth"), where=f"case {item.get('case_id', index)}")
    meta["shift"] = {"kind": kind, "severity": float(severity), "seed": int(seed)}
    return {**item, "image": image, "labels": np.array(item["labels"], copy=True), "meta": meta}


def shift_items(items: list[dict], kind: str, severity: float, *, seed: int = 0) -> list[dict]:
    """Every item shifted; item i draws from ``(seed, i)``."""
    check_shift(kind, float(severity))
    return [shift_item(it, kind, severity, seed=seed, index=i) for i, it in enumerate(items)]


__all__ = ["MAX_SEVERITY", "SHIFTS", "check_shift", "lesion_signal", "max_severity", "severity_of", "shift_image",
           "shift_item", "shift_items"]
