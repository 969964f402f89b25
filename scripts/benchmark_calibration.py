"""Validity of ``probunet calibrate`` shown, not claimed: the test risk of the calibrated region over
random calibration/test splits, against alpha.

For every run given, the cases the run never trained on (its recorded ``val`` and ``test`` splits by
default) are sampled once (S = ``eval.num_samples`` per case, the evaluation sampler: the samples
``probunet calibrate`` and ``evaluate`` draw) and reduced to per-case vote histograms, from which every
loss curve L_i(lambda) on the grid lambda = k/S follows. Then, ``--resplits`` times (default 1000), the
cases are split at random into calibration and test parts (``--calibration-fraction``, default one
half), lambda_hat is computed on the calibration part (:func:`probunet.evaluation.calibration.calibrate_counts`'s
rules) and the risk of the region is measured on the test part: for ``fnr`` the mean false-negative rate
over test cases with a non-empty readers' union, for ``coverage`` the share of test cases whose union is
not inside the region (both compare with alpha). The table gives, per run, risk and alpha, the mean test
risk with its standard error over the resplits, its standard deviation and 5-95% range, the mean
lambda_hat and the region's size against the readers' union.

A uniformly random split makes the calibration and test cases exchangeable, so the expected test risk is
at most alpha exactly (given the pool of cases); the mean over resplits estimates it, within about 3
standard errors.

    python scripts/benchmark_calibration.py RUN [RUN ...] --out DIR [--resplits 1000]

Writes ``DIR/calibration_benchmark.json`` and ``DIR/calibration_benchmark.md``; the per-case counts are
cached in ``DIR/counts/`` (by checkpoint digest, cases and S), so a rerun only resplits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (puts the repository on the path when probunet is not installed)

from probunet.evaluation.calibration import RISKS, CaseCounts, resplit, sample_counts, split_kwargs  # noqa: E402


def _data_label(cfg) -> str:
    d = cfg.data
    if d.format == "synthetic" and not d.path:
        return f"synthetic ({d.synthetic.size}px, in memory)"
    return f"{d.format}: {Path(str(d.path)).name}"


def load_cases(run: Path, splits: list[str], num_samples, device: str, cache: Path) -> tuple[list, dict]:
    """The run's per-case counts over ``splits`` (sampled once, cached) and a description of the run."""
    from probunet.models.checkpoint import load_model
    from probunet.runtime.rundir import config_for_evaluation
    from probunet.data import load_splits
    from probunet.utils import atomic_call, resolve_device

    model, _, ckpt = load_model(run)
    ckpt_path = Path(ckpt["path"])
    cfg = config_for_evaluation(ckpt["config"], [])
    s = int(num_samples or cfg.eval.num_samples)
    parts = load_splits(cfg, **split_kwargs(run, ckpt_path, ckpt, cfg))
    if "train" in splits:
        raise SystemExit("benchmark_calibration: the train split is never used for calibration")
    items = [it for name in splits for it in parts[name]]
    info = {"run": str(run), "model": cfg.model.name or "prob_unet", "data": _data_label(cfg),
            "steps": ckpt.get("step"), "splits": splits, "num_cases": len(items), "num_samples": s,
            "seed": int(cfg.eval.seed), "checkpoint_digest": ckpt.get("digest")}
    key = hashlib.sha256(json.dumps([ckpt.get("digest"), s, int(cfg.eval.seed),
                                     [str(i["case_id"]) for i in items]]).encode()).hexdigest()[:16]
    path = cache / f"{run.name}-{key}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        cases = [CaseCounts(str(c), u, a) for c, u, a in zip(z["ids"], z["union"], z["all"])]
        info["sampling_seconds"] = float(z["seconds"])
        return cases, info
    t0 = time.perf_counter()
    cases = sample_counts(model, cfg, items, num_samples=s, seed=int(cfg.eval.seed),
                          device=resolve_device(device, option="--device"), progress=True)
    seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=np.array([c.case_id for c in cases]), union=np.stack([c.union_hist for c in cases]),
                     all=np.stack([c.all_hist for c in cases]), seconds=seconds)

    atomic_call(path, write, suffix=".npz")
    info["sampling_seconds"] = seconds
    return cases, info


def table(rows: list[dict]) -> str:
    lines = ["| data | model (steps) | risk | alpha | cases cal / test | mean test risk ± s.e. | std | 5% - 95% | "
             "mean lambda | region / union | <= alpha + 3 s.e. |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r["mean"] <= r["alpha"] + 3 * r["sem"]
        lines.append(f"| {r['data']} | {r['model']} ({r['steps']}) | {r['risk']} | {r['alpha']:g} | "
                     f"{r['num_calibration']} / {r['num_test']} | {r['mean']:.4f} ± {r['sem']:.4f} | {r['std']:.4f} | "
                     f"{r['p05']:.4f} - {r['p95']:.4f} | {r['lambda_mean']:.3f} | {r['region_to_union']:.2f} | "
                     f"{'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="trained run directories")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--splits", nargs="+", default=["val", "test"], choices=("val", "test"),
                   help="the pool of cases, never trained on (default val test)")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    p.add_argument("--risks", nargs="+", default=list(RISKS), choices=RISKS)
    p.add_argument("--resplits", type=int, default=1000)
    p.add_argument("--calibration-fraction", type=float, default=0.5)
    p.add_argument("--num-samples", type=int, default=None, help="samples per case (default eval.num_samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resplits")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, runs = [], []
    for run in args.runs:
        cases, info = load_cases(Path(run), args.splits, args.num_samples, args.device, out / "counts")
        runs.append(info)
        print(f"{run}: {info['model']} ({info['steps']} steps) on {info['data']}: {len(cases)} cases x "
              f"{info['num_samples']} samples ({info['sampling_seconds']:.0f}s to sample)", flush=True)
        for risk in args.risks:
            for alpha in args.alphas:
                r = resplit(cases, alpha, risk, resplits=args.resplits,
                            calibration_fraction=args.calibration_fraction, seed=args.seed)
                rows.append({**r, "run": str(run), "model": info["model"], "data": info["data"],
                             "steps": info["steps"]})
                print(f"  {risk:8s} alpha {alpha:<5g} mean test risk {r['mean']:.4f} +- {r['sem']:.4f} "
                      f"(std {r['std']:.4f}, 5-95% {r['p05']:.4f}-{r['p95']:.4f}), lambda {r['lambda_mean']:.3f}",
                      flush=True)
    cmd = "python scripts/benchmark_calibration.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"kind": "probunet-calibration-benchmark", "command": cmd, "resplits": args.resplits,
              "calibration_fraction": args.calibration_fraction, "runs": runs, "rows": rows}
    (out / "calibration_benchmark.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    md = table(rows)
    (out / "calibration_benchmark.md").write_text(f"`{cmd}`\n\n{md}\n", encoding="utf-8")
    print(md)
    return 0 if all(r["mean"] <= r["alpha"] + 3 * r["sem"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
