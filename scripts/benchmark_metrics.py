"""Benchmark: batched GED + HM-IoU (probunet.metrics) vs. a per-pair Python loop.

Workload per image: 100 samples x 4 raters of 128 x 128 binary masks (the LIDC
protocol), a batch of 8 images (2 with ``--quick``). The baseline is the way
many papers' evaluation scripts do it: numpy boolean masks, a Python double
loop computing IoU for every pair (S x A, S x S, A x A for GED; the L x L tiled
pairs for HM-IoU) and ``scipy.optimize.linear_sum_assignment``. Both paths use
the same conventions (two empty masks: IoU 1), and their results are checked
to agree before any time is reported.

Timings are medians over several repeats after one warm-up run. ``ratio`` is
the loop's seconds divided by the row's seconds (the speed-up over the loop).

``from benchmark_metrics import run`` works with ``scripts/`` on ``sys.path``
and the ``probunet`` package importable (installed, or the repository root on
``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

NUM_SAMPLES = 100
NUM_RATERS = 4
SIZE = 128


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------


def make_data(num_images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic lesion-like masks: ellipses around a per-image centre.

    Returns boolean ``samples (B, S, H, W)`` and ``references (B, A, H, W)``;
    about 10% of samples and some raters are empty, as on LIDC.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]

    def ellipses(n: int, centre: np.ndarray, radius: float, p_empty: float) -> np.ndarray:
        c = centre + rng.normal(0.0, 3.0, size=(n, 2))
        r = radius * rng.uniform(0.6, 1.4, size=(n, 2))
        dist = ((yy[None] - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + (
            (xx[None] - c[:, 1, None, None]) / r[:, 1, None, None]
        ) ** 2
        masks = dist <= 1.0
        masks[rng.uniform(size=n) < p_empty] = False
        return masks

    samples, refs = [], []
    for _ in range(num_images):
        centre = rng.uniform(40, SIZE - 40, size=2)
        radius = rng.uniform(6, 20)
        samples.append(ellipses(NUM_SAMPLES, centre, radius, 0.1))
        refs.append(ellipses(NUM_RATERS, centre, radius, 0.15))
    return np.stack(samples), np.stack(refs)


# ----------------------------------------------------------------------------
# baseline: per-pair loop over numpy masks
# ----------------------------------------------------------------------------


def _iou_np(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def loop_ged(samples: np.ndarray, refs: np.ndarray) -> float:
    n, m = len(samples), len(refs)
    d_sy = sum(1.0 - _iou_np(samples[i], refs[j]) for i in range(n) for j in range(m))
    d_ss = sum(1.0 - _iou_np(samples[i], samples[j]) for i in range(n) for j in range(n))
    d_yy = sum(1.0 - _iou_np(refs[i], refs[j]) for i in range(m) for j in range(m))
    return 2.0 * d_sy / (n * m) - d_ss / n**2 - d_yy / m**2


def loop_hm_iou(samples: np.ndarray, refs: np.ndarray) -> float:
    length = math.lcm(len(samples), len(refs))
    tiled_s = [samples[k % len(samples)] for k in range(length)]
    tiled_y = [refs[k % len(refs)] for k in range(length)]
    cost = np.empty((length, length))
    for i in range(length):
        for j in range(length):
            cost[i, j] = 1.0 - _iou_np(tiled_s[i], tiled_y[j])
    r, c = linear_sum_assignment(cost)
    return float(1.0 - cost[r, c].mean())


def loop_all(samples: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ged = np.array([loop_ged(s, r) for s, r in zip(samples, refs)])
    hm = np.array([loop_hm_iou(s, r) for s, r in zip(samples, refs)])
    return ged, hm


# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    """Time batched vs. looped GED + HM-IoU; return one row per method.

    Args:
        quick: 2 images and 3 repeats instead of 8 images and 5 repeats
            (the loop uses 3 repeats in both modes).
        device: torch device for the batched path (e.g. ``"cpu"``, ``"cuda"``).

    Returns:
        Rows ``{"name", "seconds", "ratio", "images", "samples", "raters",
        "size", "device", "repeats"}``; ``seconds`` is the median wall time
        for the whole batch, ``ratio`` = loop seconds / row seconds.

    Raises:
        AssertionError: if the two paths disagree (atol 1e-5).
    """
    from probunet.metrics import segmentation as metrics  # imported here so a missing install fails with a hint

    num_images = 2 if quick else 8
    repeats = 3 if quick else 5
    loop_repeats = 3
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    samples_np, refs_np = make_data(num_images)
    samples = torch.from_numpy(samples_np.astype(np.uint8)).to(dev)
    refs = torch.from_numpy(refs_np.astype(np.uint8)).to(dev)

    def batched() -> tuple[torch.Tensor, torch.Tensor]:
        ged = metrics.generalized_energy_distance(samples, refs)
        hm = metrics.hungarian_matched_iou(samples, refs)
        return ged, hm

    def shared() -> tuple[torch.Tensor, torch.Tensor]:
        comps = metrics.ged_components(samples, refs)
        ged = metrics.ged_from_components(comps)
        hm = metrics.hungarian_matched_iou_from_iou(1.0 - comps.d_sy)
        return ged, hm

    # correctness first
    ged_loop, hm_loop = loop_all(samples_np, refs_np)
    for fn in (batched, shared):
        ged_b, hm_b = fn()
        np.testing.assert_allclose(ged_b.double().cpu().numpy(), ged_loop, atol=1e-5)
        np.testing.assert_allclose(hm_b.double().cpu().numpy(), hm_loop, atol=1e-5)

    t_loop = _median_seconds(lambda: loop_all(samples_np, refs_np), loop_repeats, lambda: None)
    t_batched = _median_seconds(batched, repeats, sync)
    t_shared = _median_seconds(shared, repeats, sync)

    common = {
        "images": num_images,
        "samples": NUM_SAMPLES,
        "raters": NUM_RATERS,
        "size": SIZE,
    }
    return [
        {"name": "loop_numpy_ged_hmiou", "seconds": t_loop, "ratio": 1.0,
         "device": "cpu", "repeats": loop_repeats, **common},
        {"name": "batched_ged_plus_hmiou", "seconds": t_batched, "ratio": t_loop / t_batched,
         "device": str(dev), "repeats": repeats, **common},
        {"name": "batched_shared_components", "seconds": t_shared, "ratio": t_loop / t_shared,
         "device": str(dev), "repeats": repeats, **common},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 images, fewer repeats")
    parser.add_argument("--device", default="cpu", help="torch device for the batched path")
    args = parser.parse_args(argv)
    try:
        rows = run(quick=args.quick, device=args.device)
    except ModuleNotFoundError as err:
        if err.name != "probunet":
            raise
        parser.exit(2, "error: cannot import probunet; install it (pip install -e .) "
                       "or run with PYTHONPATH set to the repository root\n")
    for row in rows:
        print(f"{row['name']:<28} {row['seconds'] * 1e3:10.1f} ms   ratio {row['ratio']:8.1f}x   "
              f"({row['images']} images x {row['samples']} samples x {row['raters']} raters, "
              f"{row['size']}x{row['size']}, {row['device']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
