#!/usr/bin/env python
"""Conditional VAE on scikit-learn's handwritten digits (8x8, no download).

x is the one-hot digit class, y the image scaled to [0, 1]. One model is trained
per prior (conditional p(z|x) and standard N(0, I)); for each the script prints
the test ELBO and the fraction of generated digits that a logistic-regression
classifier (trained on the same training split) recognises as the requested
class, and writes a PNG: one row per digit 0-9, samples of z ~ p(z|x) across.

    python scripts/cvae_digits.py                 # full run, about a minute on CPU
    python scripts/cvae_digits.py --quick --out /tmp/d.png   # a few seconds, for tests

Needs scikit-learn (``pip install probunet[examples]``) and matplotlib.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common (also when loaded from its file)
import _common  # noqa: E402,F401  (probunet importable from a source checkout)

from probunet.models.cvae import ConditionalVAE  # noqa: E402
from probunet.utils import atomic_call, seed_everything  # noqa: E402

PRIORS = ("conditional", "standard")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/cvae_digits/cvae_digits.png", help="PNG to write")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent-dim", type=int, default=4)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--arch", choices=("mlp", "conv"), default="mlp")
    p.add_argument("--samples", type=int, default=100, help="generated digits per class for the accuracy")
    p.add_argument("--cols", type=int, default=12, help="samples per row in the figure")
    p.add_argument("--elbo-samples", type=int, default=10, help="posterior draws per test image for the ELBO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the model is tiny: 1 is fastest)")
    p.add_argument("--quick", action="store_true", help="a few epochs, a few seconds (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 3)
        args.samples = min(args.samples, 20)
        args.elbo_samples = 1
    return args


def load_data(seed: int):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit("this example needs scikit-learn: pip install 'probunet[examples]'") from exc
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # (N, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    return train_test_split(images, labels, test_size=0.2, random_state=seed, stratify=labels)


def one_hot(labels: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(labels), 10).float()


def train(prior: str, x: torch.Tensor, y: torch.Tensor, args) -> ConditionalVAE:
    seed_everything(args.seed)
    model = ConditionalVAE(10, (1, 8, 8), args.latent_dim, prior=prior, beta=args.beta, arch=args.arch)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    n = x.shape[0]
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        total = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            out = model(x[idx], y=y[idx])
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            for k in total:
                total[k] += out[k].item() * len(idx)
        if epoch == args.epochs - 1 or (epoch + 1) % 50 == 0:
            print(f"  [{prior}] epoch {epoch + 1:4d}  " + "  ".join(f"{k} {v / n:7.2f}" for k, v in total.items()),
                  flush=True)
    model.eval()
    return model


def mosaic(samples: np.ndarray, pad: int = 1) -> np.ndarray:
    """samples (rows, cols, H, W) -> one image with ``pad`` pixels of spacing (NaN: background)."""
    r, c, h, w = samples.shape
    out = np.full((r * (h + pad) - pad, c * (w + pad) - pad), np.nan, dtype=np.float32)
    for i in range(r):
        for j in range(c):
            out[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = samples[i, j]
    return out


def write_figure(path: Path, grids: dict, accs: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"conditional": "conditional prior p(z|x)", "standard": "standard prior N(0, I)"}
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.9), squeeze=False)
    cmap = plt.get_cmap("gray_r").copy()
    cmap.set_bad("white")
    for ax, (prior, grid) in zip(axes[0], grids.items()):
        ax.imshow(mosaic(grid), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"{titles[prior]}\nrecognised: {accs[prior]:.1%}", fontsize=10)
        h = grid.shape[2] + 1
        ax.set_yticks([i * h + (h - 2) / 2 for i in range(grid.shape[0])], [str(i) for i in range(grid.shape[0])])
        ax.set_xticks([])
        ax.tick_params(length=0)
        ax.set_ylabel("requested digit x")
        ax.set_xlabel("samples z ~ prior, mean of p(y|x,z)")
    fig.tight_layout()
    atomic_call(path, lambda tmp: fig.savefig(tmp, dpi=80), suffix=".png")
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(max(1, args.threads))
    img_tr, img_te, lab_tr, lab_te = load_data(args.seed)
    from sklearn.linear_model import LogisticRegression  # after load_data's friendly check
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    print(f"digits: {len(img_tr)} train / {len(img_te)} test images, 8x8, scaled to [0, 1]")

    clf = LogisticRegression(max_iter=2000)
    with threadpool_limits(limits=max(1, args.threads)):  # BLAS threads thrash on a busy small machine
        clf.fit(img_tr.reshape(len(img_tr), -1), lab_tr)
    print(f"classifier (logistic regression) accuracy on real test digits: "
          f"{clf.score(img_te.reshape(len(img_te), -1), lab_te):.1%}")

    x_tr, y_tr = one_hot(lab_tr), torch.from_numpy(img_tr).unsqueeze(1)
    x_te, y_te = one_hot(lab_te), torch.from_numpy(img_te).unsqueeze(1)
    classes = torch.arange(10)
    grids, accs, results = {}, {}, {}
    for prior in PRIORS:
        t0 = time.perf_counter()
        model = train(prior, x_tr, y_tr, args)
        torch.manual_seed(args.seed + 1)
        elbo = model.elbo(x_te, y_te, num_samples=args.elbo_samples).mean().item()
        gen = torch.Generator().manual_seed(args.seed + 2)
        probs = model.sample(one_hot(classes.numpy()), max(args.samples, args.cols), generator=gen)  # (10, S, 1, 8, 8)
        pred = clf.predict(probs[:, :args.samples].reshape(-1, 64).numpy()).reshape(10, -1)
        per_class = (pred == classes.numpy()[:, None]).mean(1)
        accs[prior] = float(per_class.mean())
        grids[prior] = probs[:, :args.cols, 0].numpy()
        results[prior] = (elbo, accs[prior], per_class, time.perf_counter() - t0)

    out = Path(args.out)
    write_figure(out, grids, accs)

    print()
    print(f"{'prior':<12} {'test ELBO (nats/image)':>23} {'generated digits recognised':>28} {'time':>7}")
    for prior, (elbo, acc, _, secs) in results.items():
        print(f"{prior:<12} {elbo:23.2f} {acc:28.1%} {secs:6.1f}s")
    for prior, (_, _, per_class, _) in results.items():
        print(f"per digit 0-9, {prior}: " + " ".join(f"{a:.2f}" for a in per_class))
    print(f"figure: {out}")
    print(f"total time: {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
