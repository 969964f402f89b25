"""A synthetic multi-rater segmentation dataset whose rater distribution is known.

Each case is an image with 1 to 3 lesions (ellipses, ellipsoids in 3D) of varied
contrast and fuzzy edges on a smooth textured background. A rater

* marks each lesion independently with a presence probability that rises with
  the lesion's contrast (faint lesions are seen by only some raters), and
* outlines a marked lesion at their own threshold of the lesion's soft profile
  (a tight rater draws a smaller outline than a loose one).

The truth (lesion geometry, presence probabilities, rater thresholds) is
recorded per case, so :func:`draw_references` can draw any number of fresh
rater masks from the true distribution, and :func:`lesion_presence` can compare
a model's sampled presence frequencies with the true probabilities.
Everything is deterministic given the seed: case ``i`` uses the random stream
``(seed, i)`` and does not depend on how many cases are generated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.ndimage import gaussian_filter

logger = logging.getLogger(__name__)

# Presence probability as a function of contrast: sigmoid((c - C0) / WIDTH).
PRESENCE_C0 = 0.35
PRESENCE_WIDTH = 0.07
CONTRAST_RANGE = (0.15, 0.9)
# Rater thresholds of the soft lesion profile, tight to loose are spread over this range.
THRESHOLD_RANGE = (0.3, 0.7)
# A lesion counts as present in a mask when this fraction of its core (the region
# every rater includes: soft > the tightest threshold) is foreground.
PRESENCE_COVERAGE = 0.5


def presence_probability(contrast: float) -> float:
    return float(1.0 / (1.0 + np.exp(-(contrast - PRESENCE_C0) / PRESENCE_WIDTH)))


def rater_thresholds(num_raters: int) -> list[float]:
    """Each rater's boundary habit; rater 0 is the loosest (lowest threshold)."""
    if num_raters == 1:
        return [0.5]
    return [float(t) for t in np.linspace(THRESHOLD_RANGE[0], THRESHOLD_RANGE[1], num_raters)]


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    return np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")


def soft_profile(lesion: dict, shape: tuple[int, ...]) -> np.ndarray:
    """The lesion's soft profile in [0, 1]: 0.5 on its nominal boundary. Shape ``shape``."""
    grids = _grid(shape)
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, lesion["center"], lesion["radii"]))
    rnorm = np.sqrt(r2)
    dist = (rnorm - 1.0) * float(np.mean(lesion["radii"]))  # signed distance (pixels), approx.
    with np.errstate(over="ignore"):  # far from a sharp lesion exp() overflows to inf: the profile is 0 there
        return (1.0 / (1.0 + np.exp(dist / lesion["edge"]))).astype(np.float32)


def _texture(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    size = shape[0]
    coarse = gaussian_filter(rng.standard_normal(shape), sigma=size / 8)
    fine = gaussian_filter(rng.standard_normal(shape), sigma=1.0)
    coarse /= coarse.std() + 1e-8
    fine /= fine.std() + 1e-8
    return 0.08 * coarse + 0.03 * fine


def _offcentre(rng: np.random.Generator, spatial_dims: int) -> np.ndarray:
    """A lesion centre (fraction of the side per axis) in [0.12, 0.88] but outside the central
    box [0.35, 0.65]^d (where a centre crop would look)."""
    while True:
        c = rng.uniform(0.12, 0.88, size=spatial_dims)
        if np.any(np.abs(c - 0.5) > 0.15):
            return c


def make_case(seed: int, index: int, size: int, spatial_dims: int, thresholds: list[float], *,
              lesion_offcentre: bool = False) -> tuple[np.ndarray, dict]:
    """One case: image (1, *spatial) float32 and its truth record.

    ``lesion_offcentre``: small lesions (radius 4-8% of the side, edge 1-2%) placed away from
    the centre, as lesions in whole scans (the default cases are unchanged by this option)."""
    rng = np.random.default_rng([seed, index])
    shape = (size,) * spatial_dims
    num_lesions = int(rng.integers(1, 4))
    lesions = []
    for _ in range(num_lesions):
        if lesion_offcentre:
            radii = rng.uniform(0.04, 0.08, size=spatial_dims) * size
            center = _offcentre(rng, spatial_dims) * size
        else:
            radii = rng.uniform(0.1, 0.2, size=spatial_dims) * size
            center = rng.uniform(0.25, 0.75, size=spatial_dims) * size
        contrast = float(rng.uniform(*CONTRAST_RANGE))
        edge_range = (0.01, 0.02) if lesion_offcentre else (0.03, 0.06)
        lesions.append({
            "center": [float(c) for c in center],
            "radii": [float(r) for r in radii],
            "edge": float(rng.uniform(*edge_range) * size),
            "contrast": contrast,
            "presence_probability": presence_probability(contrast),
        })
    image = 0.3 + _texture(rng, shape)
    for lesion in lesions:
        image = image + 0.6 * lesion["contrast"] * soft_profile(lesion, shape)
    image = image + 0.02 * rng.standard_normal(shape)
    # Rater draws: presence per (rater, lesion), stored so the on-disk masks are reproducible.
    present = rng.random((len(thresholds), num_lesions)) < np.array([l["presence_probability"] for l in lesions])
    truth = {
        "lesions": lesions,
        "rater_thresholds": list(thresholds),
        "rater_presence": present.astype(int).tolist(),
        "shape": list(shape),
    }
    return image[None].astype(np.float32), truth


def masks_from(truth: dict, thresholds: list[float], presence: np.ndarray) -> np.ndarray:
    """Masks for raters with the given thresholds (R,) and presence (R, L) -> (R, *spatial) int64."""
    shape = tuple(truth["shape"])
    profiles = np.stack([soft_profile(l, shape) for l in truth["lesions"]])  # (L, *spatial)
    th = np.asarray(thresholds, dtype=np.float32).reshape(-1, 1, *([1] * len(shape)))
    inside = profiles[None] > th  # (R, L, *spatial)
    pres = np.asarray(presence, dtype=bool).reshape(*presence.shape, *([1] * len(shape)))
    return np.any(inside & pres, axis=1).astype(np.int64)


def rater_masks(truth: dict) -> np.ndarray:
    """The recorded raters' masks of a case: (A, *spatial) int64."""
    return masks_from(truth, truth["rater_thresholds"], np.asarray(truth["rater_presence"], dtype=bool))


def draw_references(truth: dict, num: int, rng: np.random.Generator) -> np.ndarray:
    """``num`` fresh masks from the true rater distribution: (num, *spatial) int64.

    A reference is drawn by picking one of the rater habits uniformly and each
    lesion independently with its presence probability.
    """
    thresholds = np.asarray(truth["rater_thresholds"])
    which = rng.integers(0, len(thresholds), size=num)
    probs = np.array([l["presence_probability"] for l in truth["lesions"]])
    presence = rng.random((num, len(probs))) < probs
    return masks_from(truth, thresholds[which].tolist(), presence)


def lesion_presence(labels: np.ndarray, truth: dict) -> np.ndarray:
    """Which lesions each mask marks: labels (S, *spatial) -> (S, L) bool.

    A lesion is present in a mask when at least ``PRESENCE_COVERAGE`` of its core
    (soft profile above the tightest rater's threshold) is foreground.
    """
    shape = tuple(truth["shape"])
    core_level = max(truth["rater_thresholds"])
    cores = np.stack([soft_profile(l, shape) > core_level for l in truth["lesions"]])  # (L, *spatial)
    fg = (np.asarray(labels) > 0).reshape(labels.shape[0], 1, -1)  # (S, 1, N)
    cores = cores.reshape(1, cores.shape[0], -1)
    covered = (fg & cores).sum(-1) / np.maximum(cores.sum(-1), 1)
    return covered >= PRESENCE_COVERAGE


def generate(num_cases: int = 400, size: int = 64, spatial_dims: int = 2, num_raters: int = 4,
             seed: int = 0, *, lesion_offcentre: bool = False) -> list[dict]:
    """The dataset as items ``{"image" (1, *spatial) float32, "labels" (A, *spatial) int64,
    "case_id", "meta": {"group", "truth"}}``."""
    return list(iter_generate(num_cases, size, spatial_dims, num_raters, seed, lesion_offcentre=lesion_offcentre))


def iter_generate(num_cases: int = 400, size: int = 64, spatial_dims: int = 2, num_raters: int = 4,
                  seed: int = 0, *, lesion_offcentre: bool = False):
    """The items of :func:`generate` one at a time (large 3D sets need not fit in memory)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if num_cases < 1 or num_raters < 1:
        raise ValueError("num_cases and num_raters must be >= 1")
    thresholds = rater_thresholds(num_raters)

    def cases():  # the checks above run at the call, not at the first case
        for i in range(num_cases):
            image, truth = make_case(seed, i, size, spatial_dims, thresholds, lesion_offcentre=lesion_offcentre)
            case_id = f"case_{i:04d}"
            yield {"image": image, "labels": rater_masks(truth), "case_id": case_id,
                   "meta": {"group": case_id, "truth": truth}}

    return cases()


def write_qubiq(items, out: str | Path, *, params: Optional[dict] = None, task: int = 1) -> Path:
    """Write items in the QUBIQ layout plus ``truth.json``.

    ``<out>/<case>/image.nii.gz`` and ``task<TT>_seg<RR>.nii.gz`` (raters from 01),
    identity affine; ``<out>/truth.json`` holds the generator parameters and each
    case's truth. Refuses to write into a non-empty folder.
    """
    import nibabel as nib

    from ..guards import ensure_writable_dir, writing
    from ..utils import atomic_call, atomic_write_text

    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} exists and is not empty; choose a new folder")
    ensure_writable_dir(out, "output folder")  # read-only, full or a file: one line naming it
    affine = np.eye(4)
    truths = {}
    for item in items:
        truths[item["case_id"]] = item["meta"]["truth"]
        case_dir = out / item["case_id"]
        with writing(case_dir):
            case_dir.mkdir()
        img = nib.Nifti1Image(item["image"][0].astype(np.float32), affine)
        atomic_call(case_dir / "image.nii.gz", lambda p, im=img: nib.save(im, p), suffix=".nii.gz")
        for r, mask in enumerate(item["labels"]):
            m = nib.Nifti1Image(mask.astype(np.uint8), affine)
            atomic_call(case_dir / f"task{task:02d}_seg{r + 1:02d}.nii.gz", lambda p, im=m: nib.save(im, p),
                        suffix=".nii.gz")
    truth = {"generator": "probunet.data.synthetic", "params": params or {},
             "presence_model": {"c0": PRESENCE_C0, "width": PRESENCE_WIDTH},
             "cases": truths}
    atomic_write_text(out / "truth.json", json.dumps(truth, indent=1))
    logger.info("wrote %d synthetic cases to %s", len(truths), out)
    return out


def read_truth(root: str | Path) -> dict:
    """The per-case truth records of a dataset written by :func:`write_qubiq`."""
    path = Path(root) / "truth.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; a synthetic dataset folder holds truth.json "
                                f"(write one with 'probunet synth OUT')")
    try:
        return json.loads(path.read_text())["cases"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a probunet truth file ({exc})") from None
