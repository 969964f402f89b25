"""What the scripts share: the path bootstrap, the subprocess runner, and the benchmarks' parts.

The parts (imported by benchmark_quality.py, compare_models.py and zoo_lidc.py): the
benchmark datasets' ``data`` sections, a checkpoint's step and the difference of two
configs (for resuming runs), the reference rows (all-empty, majority vote, the
share-threshold oracle), one evaluation summary as a table row, training and
sampling speed, and the figure of samples per model.

A script runs from a source checkout without probunet installed: importing this
module puts the repository root on ``sys.path`` when ``import probunet`` fails
(an installed probunet is used otherwise). ``scripts/`` itself must be on the
path to import this module: it is when a script runs as ``python scripts/x.py``;
a script loaded from its file (as the tests do) adds it first::

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common
    from _common import REPO, run_logged  # noqa: E402

Not a part of probunet (nothing in the package imports it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_repo_to_path(always: bool = False) -> None:
    """Make ``import probunet`` work from a source checkout: the repository root first on ``sys.path``
    when probunet is not importable (``always``: whatever is installed, for a script that checks this
    tree's code)."""
    if str(REPO) in sys.path:
        return
    if not always:
        try:
            import probunet  # noqa: F401
            return
        except ImportError:
            pass
    sys.path.insert(0, str(REPO))


def repo_env(*, pythonpath: bool = False, **extra: str) -> dict:
    """The environment of a subprocess: this one's, plus ``extra``; ``pythonpath``: the repository root
    first on ``PYTHONPATH`` (the child then imports this tree's probunet from any directory)."""
    env = {**os.environ, **extra}
    if pythonpath:
        env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


def run_logged(cmd: list[str], env: dict, log: Path) -> None:
    """Run ``cmd`` in the repository, its output appended to ``log``; a failure raises with the log's tail."""
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd[2:5])} failed (exit {proc.returncode}); see {log}: " + " | ".join(tail))


add_repo_to_path()

NUM_SAMPLES = 16  # samples per image of the benchmarks' tables and reference rows


# ----------------------------------------------------------------------------- data sections and runs

# The synthetic benchmark set: configs/synthetic.yaml's data section with these cases and split.
SYNTHETIC_SET = {"num_cases": 400, "split": {"seed": 0, "test_fraction": 0.2, "val_fraction": 0.2}}


def dataset_section(name: str, lidc_data: Path, quick: bool) -> dict:
    """The ``data`` section of a dataset (see the module notes)."""
    from probunet.config import load_yaml

    if name == "synthetic":
        data = load_yaml(REPO / "configs" / "synthetic.yaml")["data"]
        data["synthetic"] = {**data.get("synthetic", {}), "num_cases": SYNTHETIC_SET["num_cases"]}
        data["split"] = dict(SYNTHETIC_SET["split"])
        if quick:
            data["synthetic"] = {**data.get("synthetic", {}), "num_cases": 40, "size": 32}
        return data
    data = load_yaml(REPO / "configs" / "lidc.yaml")["data"]
    data.update(path=str(lidc_data), crop_size=None, normalize="none")
    data["split"] = {"file": "lidc-idri", "unlisted": "error"}
    return data


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint was written at, or None when there is none."""
    from probunet.models.checkpoint import load_checkpoint

    return int(load_checkpoint(path)["step"]) if path.is_file() else None


def config_differences(old, new, key: str = "") -> list[str]:
    """``key: old -> new`` for every leaf where two nested config dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in config_differences(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]



# ----------------------------------------------------------------------------- reference rows


def reference_scores(refs, num_samples: int = NUM_SAMPLES) -> dict[str, tuple[float, float]]:
    """(GED, HM-IoU) of the two reference predictors for one case.

    refs (1, A, *spatial) the case's raters. "all-empty": every sample empty;
    "majority vote": every sample the pixels a strict majority of the raters mark;
    "share threshold (oracle)": sample s marks the pixels that at least
    ``s mod A + 1`` of the A raters mark, a floor that sees the raters' masks
    (GED near 0 when the readers' masks are nested), not a competitor.
    Returns (GED, HM-IoU, E[d(S,S')]) per row.
    """
    import torch

    from probunet.metrics import segmentation as metrics

    counts = (refs > 0).sum(dim=1)  # (1, *spatial): raters marking each pixel
    a = refs.shape[1]
    votes = counts.float() / a
    majority = (votes > 0.5).long().unsqueeze(1).expand(-1, num_samples, *votes.shape[1:])
    rows = {"all-empty": torch.zeros_like(majority), "majority vote": majority,
            "share threshold (oracle)": torch.stack([(counts >= s % a + 1).long() for s in range(num_samples)], 1)}
    out = {}
    for name, samples in rows.items():  # samples (1, S, *spatial)
        comp = metrics.ged_components(samples, refs, num_classes=2)
        out[name] = (float(metrics.ged_from_components(comp)[0]),
                     float(metrics.hungarian_matched_iou_from_iou(1.0 - comp.d_sy)[0]),
                     float(comp.sample_diversity[0]))
    return out


def reference_rows(cfg: dict) -> dict:
    """:func:`reference_scores` over the test split of ``cfg``: mean and standard error."""
    return all_reference_rows(cfg)[0]


def all_reference_rows(cfg: dict) -> tuple[dict, dict]:
    """:func:`reference_rows` and, where the test cases record their true rater distribution
    (the synthetic set), the true sampler's row: ``({name: row}, {"true sampler": row} or {})``.

    With the truth, each row also gets ``ged_true``: its GED against the fresh references
    from the true distribution that the models' "GED vs truth" is scored against
    (:mod:`probunet.evaluation.reference`, ``eval.seed`` 0, 32 references). The true sampler draws
    ``NUM_SAMPLES`` masks per case from the true distribution: the floor a perfect model
    reaches with that many samples.
    """
    from probunet.config import from_dict
    from probunet.data import load_splits, real_raters

    items = load_splits(from_dict(cfg))["test"]
    rows = _reference_rows(items, real_raters)
    truth_rows: dict = {}
    if items and all("truth" in it.get("meta", {}) for it in items):
        from probunet.evaluation.reference import reference_rows as library_rows

        lib = library_rows(items, num_samples=NUM_SAMPLES, seed=0, num_true_references=32)
        for name in ("all-empty", "majority vote"):
            rows[name]["ged_true"] = lib[name]["metrics"]["ged_true"]["mean"]
        m = lib["true sampler"]["metrics"]
        truth_rows["true sampler"] = {
            "ged": m["ged"]["mean"], "ged_sem": m["ged"]["sem"], "hm_iou": m["hm_iou"]["mean"],
            "hm_iou_sem": m["hm_iou"]["sem"], "diversity": m["sample_diversity"]["mean"],
            "ged_true": m["ged_true"]["mean"], "num_cases": m["ged"]["n"]}
    return rows, truth_rows


def _reference_rows(items: list, real_raters) -> dict:
    import numpy as np
    import torch

    scores: dict[str, list] = {}
    for item in items:
        refs = torch.as_tensor(real_raters(item)).long()[None]  # (1, A, *spatial)
        for name, row in reference_scores(refs).items():
            scores.setdefault(name, []).append(row)
    out = {}
    for name, rows in scores.items():
        g, h, d = (np.array([r[i] for r in rows]) for i in range(3))
        sem = (lambda x: float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0)
        out[name] = {"ged": float(g.mean()), "ged_sem": sem(g), "hm_iou": float(h.mean()), "hm_iou_sem": sem(h),
                     "diversity": float(d.mean()), "num_cases": len(g)}
    return out


# ----------------------------------------------------------------------------- rows, speed, figure


def summary_row(summary: dict) -> dict:
    """The table's numbers of one ``probunet evaluate`` summary: GED, HM-IoU, S_NCC, the two diversities,
    ECE, QUBIQ (None where absent) and, on synthetic data, GED vs truth and the presence MAE."""
    m = summary["metrics"]
    row = {key: m[key]["mean"] for key in ("ged", "hm_iou", "s_ncc", "sample_diversity", "reference_diversity")}
    row["ece"] = summary["calibration"]["ece"]
    row["qubiq"] = (m.get("qubiq") or {}).get("mean")
    truth = summary.get("truth")
    if truth:
        row["ged_true"] = truth["metrics"]["ged_true"]["mean"]
        row["lesion_mae"] = truth["lesions"]["mae_sampled_vs_true"]
    return row


def train_speed(metrics_path: Path):
    """Training images per second: the median of a run's logged ``images_per_s`` after the first log
    (warm-up); None when none was logged."""
    import numpy as np

    lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    speeds = [json.loads(l).get("images_per_s") for l in lines if l.strip()]
    speeds = [s for s in speeds if s]
    return float(np.median(speeds[1:] or speeds)) if speeds else None


def sampling_speed(model, image: "torch.Tensor", repeats: int = 3) -> float:
    """Milliseconds for 100 samples of one image (median of ``repeats``, after one warm-up)."""
    import numpy as np
    import torch

    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model.sample(image, 100, generator=torch.Generator().manual_seed(i))
            times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times[1:]))


def draw_samples(models: dict, items: list[dict], num_samples: int = 4) -> dict:
    """``{name: (cases, num_samples, *spatial) uint8}``: each model's label maps of ``items`` (the same
    generator seed for every model)."""
    import numpy as np
    import torch

    images = torch.stack([torch.as_tensor(i["image"]) for i in items]).float()
    out = {}
    for name, model in models.items():
        with torch.inference_mode():
            logits = model.sample(images, num_samples, generator=torch.Generator().manual_seed(0))
        out[name] = logits.argmax(dim=2).numpy().astype(np.uint8)  # (B, S, *spatial)
    return out


def samples_figure(path: Path, models: dict, items: list[dict], num_samples: int = 4, *,
                   samples: dict | None = None, num_classes: int = 2) -> None:
    """Rows: the raters, then every model's samples; column groups: cases (image first). ``samples``
    (``draw_samples``'s result, with ``num_classes``) instead of ``models``: label maps drawn earlier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if samples is None:
        samples = draw_samples(models, items, num_samples)
        num_classes = max(int(m.num_classes) for m in models.values())
    num_samples = min(num_samples, min(a.shape[1] for a in samples.values()))
    num_raters = max(i["labels"].shape[0] for i in items)
    width = 1 + max(num_samples, num_raters)
    rows = 1 + len(samples)
    fig, axes = plt.subplots(rows, width * len(items), figsize=(1.1 * width * len(items), 1.15 * rows + 0.4),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    vmax = max(1, num_classes - 1)
    mid = lambda a: a[a.shape[0] // 2] if a.ndim == 3 else a  # noqa: E731 - 3D: the middle slice
    for c, item in enumerate(items):
        col = c * width
        img = mid(np.asarray(item["image"][0]))
        axes[0, col].imshow(img, cmap="gray")
        axes[0, col].set_title(item["case_id"][:14], fontsize=6)
        for r in range(item["labels"].shape[0]):
            axes[0, col + 1 + r].imshow(mid(item["labels"][r]), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
            axes[0, col + 1 + r].set_title(f"rater {r + 1}", fontsize=6)
        for m, name in enumerate(samples):
            axes[1 + m, col].imshow(img, cmap="gray")
            if c == 0:
                axes[1 + m, col].set_title(name, fontsize=7, loc="left")
            for s in range(num_samples):
                axes[1 + m, col + 1 + s].imshow(mid(samples[name][c, s]), cmap="viridis", vmin=0, vmax=vmax,
                                                interpolation="nearest")
    fig.suptitle("raters (top row), then samples per model", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- fault_check's shared pieces
#
# A probe is ``probunet ARGS`` in a child process (``python -c PROBE_RUNNER --quiet ARGS``) that prints,
# last on stdout, ``@@RSS <peak MB> <seconds after imports>``; with the environment variable
# ``PROBUNET_FAULT_MEMORY_CAP`` (bytes) set, probunet sees at most that much memory.

PROBE_RUNNER = r"""
import os, resource, sys, time
cap = int(os.environ.get("PROBUNET_FAULT_MEMORY_CAP", "0"))
if cap:
    from probunet import guards
    real = guards.available_memory
    guards.available_memory = lambda device=None: min(real(device) or cap, cap)
import torch, probunet.inference.folder, probunet.models.checkpoint, probunet.config, probunet.data.io
import probunet.study.shift, probunet.train
from probunet.cli import main
t0 = time.perf_counter()  # imports done: what follows is the command's own work
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code if isinstance(exc.code, int) else 1
sys.stdout.flush()
sys.stderr.flush()
print(f"@@RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} {time.perf_counter() - t0:.3f}",
      flush=True)
sys.exit(rc)
"""


def probe_output(out: str) -> tuple[str, int, float]:
    """A probe's stdout -> (what it printed before the marker, peak MB, seconds after imports)."""
    tail = out.rsplit("@@RSS ", 1)[1].split() if "@@RSS " in out else ["0", "nan"]
    return out.split("@@RSS ")[0], int(tail[0]), float(tail[1])


def mount_tmpfs(where: Path, options: str) -> bool:
    """Mount a tmpfs with ``options`` at ``where`` (root only); False where that is not possible."""
    where.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)
