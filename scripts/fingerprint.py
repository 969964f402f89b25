"""Fingerprint of what probunet computes, to check that a refactoring changed no number.

For every model of the zoo (``configs/zoo/*.yaml``) and ``configs/synthetic.yaml``, tiny and on
synthetic data, through the command line only (so that it runs unchanged before and after
code moves): train a few steps, then record

- the training losses logged at every step (``metrics.jsonl``, exact floats),
- the evaluation summary's metrics (``probunet evaluate``),
- the SHA-256 of the sample arrays ``probunet predict`` writes for one image,
- the SHA-256 of the samples of the exported TorchScript sampler, or its refusal.

A last entry holds the metrics of fixed random label sets (GED, HM-IoU, S_NCC, ECE, QUBIQ),
computed by the library's metric functions.

    OMP_NUM_THREADS=1 python scripts/fingerprint.py --out before.json
    ... move code ...
    OMP_NUM_THREADS=1 python scripts/fingerprint.py --out after.json --compare before.json

``--compare`` exits 1 and lists every entry that differs. Run both on the same machine,
with the same thread count and torch build: float results depend on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common

from _common import REPO, add_repo_to_path, repo_env  # noqa: E402

TINY = ["model.features=[4,8]", "data.format=synthetic", "data.synthetic.num_cases=20", "data.synthetic.size=16",
        "train.steps=3", "train.batch_size=4", "train.log_every=1", "train.val_every=3", "train.val_cases=2",
        "train.val_samples=2", "train.checkpoint_every=3", "train.seed=0"]
NUM_SAMPLES = 3


def configs() -> list[Path]:
    return sorted((REPO / "configs" / "zoo").glob("*.yaml")) + [REPO / "configs" / "synthetic.yaml"]


def probunet(*args: str) -> subprocess.CompletedProcess:
    env = repo_env(pythonpath=True, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "probunet", *args], env=env, capture_output=True, text=True,
                          cwd=REPO)


def checked(*args: str) -> subprocess.CompletedProcess:
    proc = probunet(*args)
    if proc.returncode != 0:
        raise RuntimeError(f"probunet {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def sha_of_arrays(folder: Path) -> str:
    """SHA-256 over the voxel arrays of every image file in ``folder`` (sorted by name)."""
    import nibabel as nib
    import numpy as np

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.nii.gz")):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(np.ascontiguousarray(np.asarray(nib.load(str(f)).dataobj)).tobytes())
    return h.hexdigest()


def model_entry(config: Path, tmp: Path) -> dict:
    import nibabel as nib
    import numpy as np
    import torch

    run = tmp / config.stem
    extra = ["model.latent_levels=null"] if "zoo" in config.parts and config.stem in ("hpu_net", "phiseg") else []
    checked("train", str(config), *TINY, *extra, "--out", str(run), "--no-progress")
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [{k: v for k, v in rec.items() if "time" not in k and not k.endswith("_s") and "per_s" not in k}
              for rec in losses]
    checked("evaluate", str(run / "checkpoints" / "last.pt"), "--num-samples", str(NUM_SAMPLES), "--out",
            str(run / "eval.json"), "--no-progress")
    summary = json.loads((run / "eval.json").read_text())
    inp, out = tmp / f"{config.stem}-in", tmp / f"{config.stem}-out"
    inp.mkdir()
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((16, 16)).astype(np.float32), np.eye(4)), str(inp / "c1.nii.gz"))
    checked("predict", str(run / "checkpoints" / "last.pt"), str(inp), str(out), "--num-samples", str(NUM_SAMPLES),
            "--seed", "0")
    entry = {"losses": losses, "eval": summary["metrics"], "predict_sha256": sha_of_arrays(out)}
    ts = tmp / f"{config.stem}.ts"
    proc = probunet("export", str(run / "checkpoints" / "last.pt"), "--format", "torchscript", "--out", str(ts))
    if proc.returncode != 0:
        entry["export"] = "refused: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    else:
        sampler = torch.jit.load(str(ts))
        image = torch.from_numpy(rng.random((1, 1, 16, 16)).astype(np.float32))
        with torch.no_grad():
            drawn = sampler(image, generator=torch.Generator().manual_seed(0), num_samples=NUM_SAMPLES)
        entry["export"] = hashlib.sha256(drawn.detach().float().contiguous().numpy().tobytes()).hexdigest()
    return entry


def metrics_entry() -> dict:
    """The metric functions on fixed random label sets (this tree's ``probunet.metrics``)."""
    import torch

    add_repo_to_path(always=True)
    from probunet import metrics
    g = torch.Generator().manual_seed(0)
    samples = (torch.rand(5, 8, 16, 16, generator=g) > 0.6).long()  # (B, S, H, W)
    raters = (torch.rand(5, 4, 16, 16, generator=g) > 0.5).long()
    raters[0] = 0  # a case with all readers empty
    logits = torch.randn(5, 8, 2, 16, 16, generator=g)
    out = {
        "ged": metrics.generalized_energy_distance(samples, raters).tolist(),
        "hm_iou": metrics.hungarian_matched_iou(samples, raters).tolist(),
        "diversity": metrics.sample_diversity(samples).tolist(),
        "entropy_sum": float(metrics.predictive_entropy(logits).sum()),
        "mutual_information_sum": float(metrics.mutual_information(logits).sum()),
        "variance_ncc": metrics.variance_ncc(logits, raters, from_logits=True).tolist(),
    }
    return out


def compare(now: dict, before: dict) -> list[str]:
    diffs = []
    for key in sorted(set(now) | set(before)):
        if now.get(key) != before.get(key):
            a, b = json.dumps(before.get(key), sort_keys=True), json.dumps(now.get(key), sort_keys=True)
            diffs.append(f"{key}: before {a[:300]} | now {b[:300]}")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the fingerprint (JSON) written")
    p.add_argument("--compare", default=None, help="an earlier fingerprint: exit 1 if anything differs")
    p.add_argument("--models", nargs="+", default=None, help="config stems (default: all)")
    args = p.parse_args(argv)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs():
            if args.models and config.stem not in args.models:
                continue
            print(f"{config.relative_to(REPO)} ...", flush=True)
            result[str(config.relative_to(REPO))] = model_entry(config, Path(tmp))
    result["metrics"] = metrics_entry()
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.out}")
    if args.compare:
        diffs = compare(result, json.loads(Path(args.compare).read_text()))
        for d in diffs:
            print("DIFFERS", d)
        print("identical" if not diffs else f"{len(diffs)} entries differ")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
