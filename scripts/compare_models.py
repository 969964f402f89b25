#!/usr/bin/env python
"""Compare stochastic segmentation models on the same data, split, budget and metrics.

Every config (``configs/zoo/*.yaml`` by default) is trained by ``probunet train``
at the same number of steps and batch size on the same data and split (the
``data`` section of ``--data-config``, default the first config), and scored by
``probunet evaluate`` on the test split with the same sample count and seed.
Writes into ``--out``:

- ``compare.csv`` and ``compare.md``: one row per model: GED, HM-IoU, S_NCC,
  ECE, QUBIQ score, sample diversity next to the raters', on synthetic data
  also GED against fresh references from the true rater distribution and the
  error of the sampled lesion presence against its true probability; training
  images per second, milliseconds per 100 samples of one image, parameters;
- ``compare.png``: the same test cases for every model: the image and its
  raters first, then a row of samples per model;
- one run folder per model (checkpoints, metrics, evaluation).

    python scripts/compare_models.py --out runs/compare                     # every configs/zoo model
    python scripts/compare_models.py configs/zoo/prob_unet.yaml configs/zoo/ssn.yaml --steps 300 --out runs/c
    python scripts/compare_models.py --quick --out /tmp/c                   # a smoke run: tiny models, 4 steps
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common (also when loaded from its file)

import torch  # noqa: E402
import yaml  # noqa: E402

from _common import (REPO, repo_env, run_logged, samples_figure, sampling_speed,  # noqa: E402
                     summary_row, train_speed)  # (also makes probunet importable from a source checkout)

COLUMNS = [("model", "model"), ("ged", "GED"), ("hm_iou", "HM-IoU"), ("s_ncc", "S_NCC"), ("ece", "ECE"),
           ("qubiq", "QUBIQ"), ("sample_diversity", "E[d(S,S')]"), ("reference_diversity", "E[d(Y,Y')]"),
           ("ged_true", "GED vs truth"), ("lesion_mae", "presence MAE"), ("train_images_per_s", "train img/s"),
           ("ms_per_100_samples", "ms / 100 samples"), ("parameters", "parameters")]


def run_config(name: str, cfg: dict, out: Path, *, num_samples: int, env: dict) -> dict:
    """Train and evaluate one model; returns its table row (without the timing of sampling)."""
    cfg_path = out / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_dir, log = out / name, out / f"{name}.log"
    py = [sys.executable, "-m", "probunet"]
    run_logged([*py, "train", str(cfg_path), "--out", str(run_dir), "--no-progress"], env, log)
    run_logged([*py, "evaluate", str(run_dir / "checkpoints" / "last.pt"), "--num-samples", str(num_samples),
                "--out", str(run_dir / "eval" / "summary.json"), "--no-progress"], env, log)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    return {"model": name, **summary_row(summary), "train_images_per_s": train_speed(run_dir / "metrics.jsonl")}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def tables(rows: list[dict]) -> tuple[str, str]:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([k for k, _ in cols])
    for r in rows:
        w.writerow(["" if r.get(k) is None else r[k] for k, _ in cols])
    md = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(r["model"] if k == "model" else _fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", help="model configs (default: configs/zoo/*.yaml)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=None, help="training steps of every model (default: the first config's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of every model (default: the first config's)")
    p.add_argument("--num-samples", type=int, default=16, help="samples per test image (default 16)")
    p.add_argument("--data-config", type=Path, default=None, help="whose data section all models use (default: the first)")
    p.add_argument("--cases", type=int, default=4, help="test cases in the figure")
    p.add_argument("--quick", action="store_true", help="tiny models and data, 4 steps (a smoke run)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from probunet.config import load_yaml

    paths = [Path(c) for c in args.configs] or sorted((REPO / "configs" / "zoo").glob("*.yaml"))
    if not paths:
        raise SystemExit("compare_models: error: no configs given and configs/zoo is empty")
    for p in paths:
        if not p.is_file():
            raise SystemExit(f"compare_models: error: config not found: {p}")
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise SystemExit("compare_models: error: two configs share a file name; rename one")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"compare_models: error: {args.out} exists and is not empty; choose a new --out")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = [load_yaml(p) for p in paths]
    data = load_yaml(args.data_config)["data"] if args.data_config else raw[0].get("data", {})
    first_train = raw[0].get("train", {})
    steps = args.steps or first_train.get("steps", 2000)
    batch = args.batch_size or first_train.get("batch_size", 16)
    if args.quick:
        steps, data = 4, {**data, "synthetic": {**data.get("synthetic", {}), "num_cases": 24, "size": 32}}
    env = repo_env(PYTHONUNBUFFERED="1")
    rows, failures, models, cfgs = [], [], {}, {}
    t0 = time.perf_counter()
    for name, cfg in zip(names, raw):
        cfg = {**cfg, "data": data}
        cfg["train"] = {**cfg.get("train", {}), "steps": steps, "batch_size": batch,
                        "checkpoint_every": steps, "val_every": max(1, steps // 4)}
        cfg["eval"] = {**cfg.get("eval", {}), "num_samples": args.num_samples, "split": "test", "seed": 0}
        if args.quick:
            cfg["model"] = {**cfg.get("model", {}), "features": [4, 8]}
            cfg["train"]["log_every"] = 2
        print(f"[{len(rows) + len(failures) + 1}/{len(names)}] {name}: {steps} steps x {batch}", flush=True)
        from probunet.models.checkpoint import load_model

        try:
            row = run_config(name, cfg, args.out, num_samples=args.num_samples, env=env)
            model, mcfg, _ = load_model(args.out / name / "checkpoints" / "last.pt")
        except (RuntimeError, ValueError, OSError) as exc:  # one failing model does not stop the others
            failures.append(f"{name}: {exc}")
            print(f"  FAILED: {exc}", flush=True)
            continue
        model.eval()
        row["parameters"] = int(sum(p.numel() for p in model.parameters()))
        cfgs[name], models[name] = mcfg, model
        rows.append(row)
    if rows:
        from probunet.data import load_splits

        items = load_splits(next(iter(cfgs.values())))["test"][: args.cases]
        image = torch.as_tensor(items[0]["image"])[None].float()
        for row in rows:
            row["ms_per_100_samples"] = sampling_speed(models[row["model"]], image)
        samples_figure(args.out / "compare.png", models, items)
    csv_text, md = tables(rows)
    (args.out / "compare.csv").write_text(csv_text)
    head = (f"# Model comparison\n\n{steps} steps x batch {batch} each, the same data and split; test split, "
            f"{args.num_samples} samples per image; sampling speed: one image on "
            f"the CPU with {torch.get_num_threads()} threads; total {time.perf_counter() - t0:.0f}s.\n\n")
    text = head + md + "\n" + ("".join(f"\n- failed: {f}" for f in failures) + "\n" if failures else "")
    (args.out / "compare.md").write_text(text)
    print(text)
    print(f"written: {args.out / 'compare.csv'}, {args.out / 'compare.md'}, {args.out / 'compare.png'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
