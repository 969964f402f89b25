"""Figures: sample grids with uncertainty, reliability diagrams and lesion-presence scatters
(PNG, written atomically)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..utils import atomic_call

logger = logging.getLogger(__name__)


PNG_SOFTWARE = "probunet"  # the PNG "Software" text of every figure: marks it as probunet's own


def _save_png(fig, path: str | Path) -> Path:
    return atomic_call(path, lambda p: fig.savefig(p, dpi=110, format="png", metadata={"Software": PNG_SOFTWARE}),
                       suffix=".png")


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _middle_slice(a: np.ndarray, spatial_dims: int) -> np.ndarray:
    """A 2D view of (..., *spatial): 3D volumes show their middle slice along the first axis."""
    if spatial_dims == 3:
        return a[..., a.shape[-3] // 2, :, :]
    return a


def sample_grid(path: str | Path, images: np.ndarray, raters: np.ndarray, samples: np.ndarray,
                probability: np.ndarray, uncertainty: np.ndarray, *, case_ids: Optional[Sequence[str]] = None,
                spatial_dims: int = 2, max_samples: int = 6, title: Optional[str] = None) -> Path:
    """One row per case: image | raters | samples | mean foreground probability | entropy.

    images (B, C, *spatial), raters (B, A, *spatial), samples (B, S, *spatial) label maps,
    probability (B, *spatial) mean foreground probability, uncertainty (B, *spatial)
    predictive entropy. 3D inputs show their middle slice.
    """
    plt = pyplot()
    images = _middle_slice(np.asarray(images), spatial_dims)
    raters = _middle_slice(np.asarray(raters), spatial_dims)
    samples = _middle_slice(np.asarray(samples), spatial_dims)[:, :max_samples]
    probability = _middle_slice(np.asarray(probability), spatial_dims)
    uncertainty = _middle_slice(np.asarray(uncertainty), spatial_dims)
    b, a, s = images.shape[0], raters.shape[1], samples.shape[1]
    cols = 1 + a + s + 2
    fig, axes = plt.subplots(b, cols, figsize=(1.3 * cols, 1.3 * b + 0.6), squeeze=False)
    umax = max(float(uncertainty.max()), 1e-6)
    for i in range(b):
        panels = [(images[i, 0], "gray", None, "image")]
        panels += [(raters[i, r], "viridis", (0, max(1, raters.max())), f"rater {r + 1}") for r in range(a)]
        panels += [(samples[i, k], "viridis", (0, max(1, raters.max())), f"sample {k + 1}") for k in range(s)]
        panels += [(probability[i], "magma", (0, 1), "mean p(fg)"), (uncertainty[i], "inferno", (0, umax), "entropy")]
        for j, (arr, cmap, lim, name) in enumerate(panels):
            ax = axes[i, j]
            kw = {} if lim is None else {"vmin": lim[0], "vmax": lim[1]}
            ax.imshow(arr, cmap=cmap, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
        if case_ids is not None:
            axes[i, 0].set_ylabel(str(case_ids[i]), fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = _save_png(fig, path)
    plt.close(fig)
    return out


def reliability_diagram(path: str | Path, bin_edges: np.ndarray, predicted: np.ndarray, observed: np.ndarray,
                        counts: np.ndarray, *, ece: Optional[float] = None, title: str = "calibration") -> Path:
    """Mean sampled foreground frequency per bin (x) against rater frequency (y)."""
    plt = pyplot()
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4, 5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    centers = 0.5 * (np.asarray(bin_edges[:-1]) + np.asarray(bin_edges[1:]))
    ok = np.asarray(counts) > 0
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    ax.plot(np.asarray(predicted)[ok], np.asarray(observed)[ok], "o-", label="model")
    ax.set_ylabel("rater foreground frequency")
    ax.set_title(title + (f" (ECE {ece:.4f})" if ece is not None else ""), fontsize=9)
    ax.legend(fontsize=7)
    axc.bar(centers, np.asarray(counts), width=np.diff(bin_edges), color="gray")
    axc.set_yscale("log")
    axc.set_xlabel("sampled foreground frequency")
    axc.set_ylabel("pixels")
    fig.tight_layout()
    out = _save_png(fig, path)
    plt.close(fig)
    return out


def model_figure(path: str | Path, model, items: list[dict], *, num_samples: int = 6, seed: int = 0,
                 spatial_dims: int = 2, device=None, title: Optional[str] = None) -> Path:
    """Sample ``num_samples`` segmentations for each item and draw :func:`sample_grid`.

    items: dataset items (``image`` (C, *spatial), ``labels`` (A, *spatial)) of one shape.
    """
    import torch

    from ..metrics.segmentation import predictive_entropy

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = torch.stack([torch.as_tensor(i["image"]) for i in items]).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode():
        logits = model.sample(images, max(num_samples, 16), generator=g).float()  # (B, S, C, *sp)
        probs = logits.softmax(dim=2)
        fg = 1.0 - probs[:, :, 0].mean(dim=1)  # (B, *sp)
        entropy = predictive_entropy(logits)
        labels = logits.argmax(dim=2)[:, :num_samples]
    model.train(was_training)
    num_raters = max(i["labels"].shape[0] for i in items)
    raters = np.stack([np.concatenate([i["labels"], np.zeros((num_raters - i["labels"].shape[0], *i["labels"].shape[1:]),
                                                              dtype=i["labels"].dtype)]) for i in items])
    return sample_grid(path, images.cpu().numpy(), raters, labels.cpu().numpy(), fg.cpu().numpy(),
                       entropy.cpu().numpy(), case_ids=[i["case_id"] for i in items],
                       spatial_dims=spatial_dims, max_samples=num_samples, title=title)


def lesion_scatter(path: str | Path, rows: list[dict], *, title: str = "lesion presence") -> Path:
    """Sampled presence frequency (y) against the true presence probability (x), one dot per
    lesion; the raters' observed frequency in grey for comparison.

    ``rows``: one dict per lesion with ``true_p``, ``sampled_freq`` and ``rater_freq``
    (the rows of an evaluation's ``lesions.csv``).
    """
    from ..metrics.segmentation import pearson

    plt = pyplot()
    true_p = np.array([r["true_p"] for r in rows], dtype=np.float64)
    sampled = np.array([r["sampled_freq"] for r in rows], dtype=np.float64)
    raters = np.array([r["rater_freq"] for r in rows], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    ax.scatter(true_p, raters, s=10, c="0.7", marker="x", label="raters")
    ax.scatter(true_p, sampled, s=14, c="C0", label="model samples")
    mae = float(np.mean(np.abs(sampled - true_p))) if rows else float("nan")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("true presence probability")
    ax.set_ylabel("presence frequency")
    ax.set_title(f"{title} (MAE {mae:.3f}, r {pearson(sampled, true_p):.2f})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = _save_png(fig, path)
    plt.close(fig)
    return out
