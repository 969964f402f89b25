#!/usr/bin/env python
"""The model zoo on LIDC-style data: tuning, the table, the uncertainty study, the figure, the report.

Every model of ``configs/zoo/lidc/`` (the LIDC-IDRI readers' masks on synthesised
CT-like images, 64x64, split by the frozen patient manifest; batch 16, lr 3e-4
with a weight average, He-normal init, features 32-64-128-192) goes through:

- ``tune``: the config and its variants (``VARIANTS`` below: the same kinds of
  change for every model) at ``TUNE_STEPS`` steps, each evaluated on the
  VALIDATION split with 16 samples; a model's best variant is the one with the
  lowest validation GED, once all its variants are done (``choices.json``);
- ``table``: each model's best variant at ``TABLE_STEPS`` steps, evaluated on the
  test split with 16 samples (``--seeds``, default 0): GED, HM-IoU, S_NCC, ECE,
  QUBIQ, sample diversity next to the readers', the empty-mask gap, GED by the
  number of readers who drew nothing, training images per second and CPU
  seconds, milliseconds per 100 samples of one image, parameters; the reference
  rows (majority vote, all-empty, the share-threshold oracle) on the same cases;
- ``study``: ``probunet study`` over the finished seed-0 table runs, on the test
  split and its shifted copy, once per shift in ``SHIFTS`` (noise, blur);
- ``figure``: the same test crops for every model, the readers first, then a row
  of samples per model;
- ``report``: ``docs/zoo_lidc.md`` (``--doc``) from whatever has finished; a row
  not done yet reads "pending" with the command that produces it;
- ``all``: tune, table (seed 0 for every model, then seeds 1 and 2 for the
  ``--top`` models by test GED), study, figure, report.

Variants (``VARIANTS``; ``base`` is the shipped config):

    prob_unet           v1 train.beta=0.3               v2 model.latent_dim=6
    unet                v1 model.soft_target=true       (no second knob)
    mc_dropout          v1 model.dropout=0.25           v2 model.dropout=0.1
    ensemble            v1 model.ensemble_size=2        v2 model.ensemble_size=8
    ensemble_prob_unet  v1 model.ensemble_size=2        v2 train.beta=0.3
    ssn                 v1 model.rank=5                 v2 model.rank=20
    hpu_net             v1 train.geco.goal_scale=0.25   v2 train.geco.step_size=1.0
    phiseg              v1 train.beta=0.5               v2 model.latent_channels=4

Two folders. ``--out`` (default runs/zoo_lidc) is the work space: every run as
``tune/<model>-<variant>/`` or ``table/s<seed>/<model>/`` (checkpoints, evaluation) with
``<name>.yaml`` (its config), ``<name>.log`` and ``<name>.time.json`` (CPU and wall
seconds of its commands) beside it, ``study/<model>/`` (its studies of both shifts: the second
samples only its shifted set), ``study/<shift>/<model>.log`` and ``choices.json``.
``--records`` (default docs/zoo_lidc_records, committed with the report) keeps what
the table is made of, small files that outlive the work space:

- ``tune/<name>.json``, ``table/s<seed>/<name>.json``: a finished run's record
  (commands, numbers, CPU seconds);
- ``study/<shift>/<model>.json``: one seed-0 model's answers of ``probunet study``
  (the study's questions are answered per model, so the models' pieces make one
  study however many sessions they took);
- ``figure/<model>.npz``: the model's samples on the figure's crops;
- ``references.json``, ``earlier_compute.json`` (CPU time of work whose records
  were transcribed from an earlier report: ``"transcribed"`` in such a record).

A run with a record is skipped; an interrupted training goes on from its last
checkpoint (``probunet train ... --resume``); a run whose config changed is an
error naming it. A seed-0 table run is studied and drawn right after its
evaluation, while its checkpoint is at hand; where the work space was lost, the
``study`` and ``figure`` stages train it again (and evaluate it again: the new record
keeps the old numbers under ``previous``). One training at a time, each
subprocess with ``OMP_NUM_THREADS=1`` (``--threads``). Stop it any time (Ctrl-C, or kill its
process group) and run the same command again; ``--records runs/zoo_lidc/records``
starts a table of your own from nothing::

    python scripts/zoo_lidc.py all --resume --lidc-data data/lidc_style      # everything, in the background
    python scripts/zoo_lidc.py table --resume --models ssn prob_unet --seeds 0 1 2
    python scripts/zoo_lidc.py report                                         # docs/zoo_lidc.md from what is done
    python scripts/zoo_lidc.py all --quick --out /tmp/z --doc /tmp/z/zoo.md   # a smoke run: tiny, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import resource
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common (also when loaded from its file)

import yaml  # noqa: E402

from _common import (REPO, NUM_SAMPLES, all_reference_rows, checkpoint_step, config_differences,  # noqa: E402
                     dataset_section, draw_samples, repo_env, run_logged, samples_figure, sampling_speed,
                     summary_row, train_speed)

MODELS = ["prob_unet", "unet", "mc_dropout", "ensemble", "ensemble_prob_unet", "ssn", "hpu_net", "phiseg"]
CONFIGS = Path("configs") / "zoo" / "lidc"  # relative to the repository
VARIANTS: dict[str, dict[str, list[str]]] = {
    "prob_unet": {"v1": ["train.beta=0.3"], "v2": ["model.latent_dim=6"]},
    "unet": {"v1": ["model.soft_target=true"]},
    "mc_dropout": {"v1": ["model.dropout=0.25"], "v2": ["model.dropout=0.1"]},
    "ensemble": {"v1": ["model.ensemble_size=2"], "v2": ["model.ensemble_size=8"]},
    "ensemble_prob_unet": {"v1": ["model.ensemble_size=2"], "v2": ["train.beta=0.3"]},
    "ssn": {"v1": ["model.rank=5"], "v2": ["model.rank=20"]},
    # v2: lambda (the reconstruction's weight, so 1 / the KL's) grows 100x faster: at 0.01 it moved 1.5x in
    # 500 steps on LIDC-style data and the latents collapsed (base and v1 alike)
    "hpu_net": {"v1": ["train.geco.goal_scale=0.25"], "v2": ["train.geco.step_size=1.0"]},
    "phiseg": {"v1": ["train.beta=0.5"], "v2": ["model.latent_channels=4"]},
}
TUNE_STEPS, TABLE_STEPS = 500, 2000
QUICK_TUNE_STEPS, QUICK_TABLE_STEPS = 3, 6
SHIFTS = [("noise", 2.0), ("blur", 2.0)]  # probunet.study.shift: noise sd 0.1, blur sigma 2 pixels on [0, 1] images
DEFAULT_DATA = "data/lidc_style"
FIGURE_CASES, FIGURE_SAMPLES = 4, 4
ME = "scripts/zoo_lidc.py"


class UserError(Exception):
    """A bad argument or state of --out: one line on stderr, exit 2."""


# ----------------------------------------------------------------------------- configs of the runs


def variants(model: str) -> dict[str, list[str]]:
    """``{"base": [], "v1": [...], ...}``: the variants of a model, the shipped config first."""
    return {"base": [], **VARIANTS.get(model, {})}


def variant_label(overrides: list[str]) -> str:
    return " ".join(overrides) if overrides else "as shipped"


def variant_change(model: str, variant: str) -> str:
    """What a model's variant changes from its shipped config, as the tables show it."""
    return variant_label(VARIANTS.get(model, {}).get(variant, []))


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_overrides(args, model: str, variant_overrides: list[str], *, steps: int, seed: int) -> list[str]:
    """The ``key=value`` overrides of a run on top of its shipped config (what the report shows)."""
    out = list(variant_overrides)
    if steps != TABLE_STEPS:
        out.append(f"train.steps={steps}")
    if seed != 0:
        out.append(f"train.seed={seed}")
    if args.lidc_data != DEFAULT_DATA:
        out.append(f"data.path={args.lidc_data}")
    if args.amp:
        out.append(f"train.amp={args.amp}")
    return out


def run_config(args, model: str, overrides: list[str]) -> dict:
    """The full config of a run: the shipped config with ``overrides`` (``--quick``: tiny model, data and
    bookkeeping on top). The data section is the LIDC benchmark's (``_common.dataset_section``), the
    path absolute so that the run's own config finds it from anywhere."""
    from probunet.config import apply_overrides, load_yaml

    raw = apply_overrides(load_yaml(REPO / CONFIGS / f"{model}.yaml"), overrides)
    data = dataset_section("lidc", Path(raw["data"]["path"]), False)
    data["path"] = str(resolve(raw["data"]["path"]))
    raw["data"] = data
    if args.quick:
        raw["data"] = dataset_section("synthetic", Path("."), True)
        raw["model"].update(features=[4, 8], latent_dim=2, fcomb_layers=2)
        if "latent_levels" in raw["model"]:
            raw["model"]["latent_levels"] = None  # the model's default, clipped to the two levels
        steps = raw["train"]["steps"]
        # no weight average: over a few steps it would keep the initial weights
        raw["train"].update(batch_size=4, log_every=1, val_every=steps, val_cases=4, val_samples=4,
                            checkpoint_every=QUICK_TUNE_STEPS, ema_decay=None)
        raw["eval"].update(batch_size=4)
    return raw


def resolve(path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (Path.cwd() / p)


def shell(cmd: list[str]) -> str:
    """A command as one shell line; paths in the repository (or the current folder) shown relative to it."""
    def shown(c):
        text = str(c)
        for base in (Path.cwd(), REPO):
            if text.startswith(str(base) + "/"):
                return text[len(str(base)) + 1:]
        return text
    return " ".join(shlex.quote(shown(c)) for c in cmd)


# ----------------------------------------------------------------------------- one run: train, evaluate, record


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data) -> None:
    from probunet.utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


class Run:
    """One training and its evaluation: ``<folder>/<name>/`` under ``--out``, with ``<name>.yaml``,
    ``<name>.log`` and ``<name>.json`` (the record, written last) beside it."""

    def __init__(self, args, stage: str, folder: str, name: str, model: str, variant: str, overrides: list[str],
                 *, steps: int, seed: int, split: str):
        self.args, self.stage, self.folder, self.name, self.model = args, stage, folder, name, model
        self.variant, self.steps, self.seed, self.split = variant, steps, seed, split
        self.overrides = run_overrides(args, model, overrides, steps=steps, seed=seed)
        self.config = run_config(args, model, self.overrides)
        folder = args.out / folder
        self.run_dir, self.cfg_path = folder / name, folder / f"{name}.yaml"
        self.log, self.record_path = folder / f"{name}.log", args.records / self.folder / f"{name}.json"
        self.summary_path = self.run_dir / f"eval_{split}" / "summary.json"

    @property
    def record(self):
        return read_json(self.record_path)

    @property
    def done(self) -> bool:
        """A record in ``--records`` for this run's settings (one for other settings is an error)."""
        rec = self.record
        if rec is None:
            return False
        if rec.get("overrides") != self.overrides:
            raise UserError(f"{self.record_path} records {self.folder}/{self.name} with "
                            f"{variant_label(rec.get('overrides') or [])}, the run now has "
                            f"{variant_label(self.overrides)}; remove that record to run it again")
        return True

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def trained(self) -> bool:
        """Its checkpoint at the run's budget is in the work space."""
        return checkpoint_step(self.checkpoint) == self.steps

    def reproduce(self) -> str:
        """The command that produces this run's numbers from a fresh checkout (the shipped config)."""
        out = f"runs/zoo_lidc/{self.folder}/{self.name}"
        train = ["probunet", "train", str(CONFIGS / f"{self.model}.yaml"), *self.overrides, "--out", out]
        ev = ["probunet", "evaluate", f"{out}/checkpoints/last.pt", "--num-samples", str(NUM_SAMPLES)]
        if self.split != "test":
            ev.append(f"eval.split={self.split}")
        return shell(train) + " && " + shell(ev)

    def check_config(self) -> None:
        """An earlier run in this folder must have been started with the same config."""
        if not self.cfg_path.is_file():
            return
        differ = config_differences(yaml.safe_load(self.cfg_path.read_text()), self.config)
        if differ:
            raise UserError(f"{self.cfg_path} holds another config than {self.folder}/{self.name} has now "
                            f"({'; '.join(differ[:3])}); choose a new --out or remove {self.run_dir} and that file")

    def execute(self) -> dict:
        """Train (or resume) up to ``steps``, evaluate, write the record; returns the record. A record
        written before (this run trained again, its work space lost) is kept under ``previous``."""
        before = self.record
        self.check_config()
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        if not self.cfg_path.is_file():
            from probunet.utils import atomic_write_text

            atomic_write_text(self.cfg_path, yaml.safe_dump(self.config, sort_keys=False))
        env = child_env(self.args.threads)
        py = [sys.executable, "-m", "probunet"]
        state = read_json(self.state_path) or {"train_cpu_s": 0.0, "train_wall_s": 0.0, "eval_cpu_s": 0.0,
                                               "eval_wall_s": 0.0, "attempts": 0}
        last = self.run_dir / "checkpoints" / "last.pt"
        step = checkpoint_step(last)
        if step is not None and step > self.steps:
            raise UserError(f"{last} is at step {step}, past this run's {self.steps}; remove {self.run_dir}")
        train_cmd = [*py, "train", str(self.cfg_path), "--out", str(self.run_dir), "--no-progress"]
        if step is None or step < self.steps:
            if step is not None:
                train_cmd.append("--resume")
                print(f"    resuming {self.folder}/{self.name} at step {step}", flush=True)
            state["attempts"] += 1
            self._timed(train_cmd, env, "train", state)
        # the checkpoint at the budget (a run folder alone would give best.pt, picked by validation GED)
        eval_cmd = [*py, "evaluate", str(last), "--num-samples", str(NUM_SAMPLES), "--out",
                    str(self.summary_path), "--no-progress", f"eval.split={self.split}"]
        if not self.summary_path.is_file():
            self._timed(eval_cmd, env, "eval", state)
        summary = json.loads(self.summary_path.read_text())
        record = {
            "stage": self.stage, "name": self.name, "model": self.model, "variant": self.variant,
            "overrides": self.overrides, "seed": self.seed, "steps": self.steps, "split": self.split,
            "run_dir": str(self.run_dir), "reproduce": self.reproduce(),
            "commands": [shell(train_cmd[1:]), shell(eval_cmd[1:])],
            "metrics": metrics_of(summary, self.run_dir / "metrics.jsonl"),
            "train_summary": read_json(self.run_dir / "train_summary.json"),
            **{k: state[k] for k in ("train_cpu_s", "train_wall_s", "eval_cpu_s", "eval_wall_s", "attempts")},
            "threads": self.args.threads,
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        if before:
            record["previous"] = {"finished": before.get("finished"), "transcribed": before.get("transcribed"),
                                  **{k: before.get("metrics", {}).get(k) for k in ("ged", "hm_iou")}}
        if self.stage == "table":
            record.update(model_facts(self.run_dir, self.config))
        record = json.loads(portable(self.args, json.dumps(record)))  # paths as --out was given
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.record_path, record)
        return record

    @property
    def state_path(self) -> Path:
        return self.run_dir.parent / f"{self.name}.time.json"

    def _timed(self, cmd: list[str], env: dict, what: str, state: dict) -> None:
        """Run ``cmd`` (logged); its CPU seconds (the child's user + system) and wall seconds are added to
        ``state``, which is saved (also when the command fails or is stopped)."""
        before, t0 = children_cpu_s(), time.perf_counter()
        try:
            run_logged(cmd, env, self.log)
        finally:
            state[f"{what}_cpu_s"] += children_cpu_s() - before
            state[f"{what}_wall_s"] += time.perf_counter() - t0
            write_json(self.state_path, state)


def child_env(threads: int = 1) -> dict:
    """Every subprocess: ``threads`` threads (OMP and MKL; one unless ``--threads``), this tree's probunet,
    unbuffered output."""
    return repo_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                    pythonpath=True)


def metrics_of(summary: dict, metrics_path: Path) -> dict:
    """The numbers of one evaluation: the table's (``_common.summary_row``), their standard errors,
    the empty-mask shares and gap, GED by the number of readers with an empty mask, the training speed."""
    m = summary["metrics"]
    row = summary_row(summary)
    row.update({f"{k}_sem": m[k]["sem"] for k in ("ged", "hm_iou") if k in m})
    for key in ("empty_samples", "empty_raters", "empty_gap"):
        if key in m:
            row[key] = m[key]["mean"]
    row["by_empty_raters"] = [{"empty_raters": g["empty_raters"], "num_raters": g["num_raters"],
                               "num_cases": g["num_cases"], "ged": g["ged"]["mean"], "ged_sem": g["ged"]["sem"]}
                              for g in summary.get("by_empty_raters", [])]
    row["num_cases"] = summary.get("num_cases")
    row["train_images_per_s"] = train_speed(metrics_path)
    return row


def model_facts(run_dir: Path, config: dict) -> dict:
    """Parameters and milliseconds per 100 samples of one image (this process, one thread; a random image
    of the data's size: the time does not depend on the content)."""
    import torch

    from probunet.models.checkpoint import load_model

    torch.set_num_threads(1)
    model, _, _ = load_model(run_dir / "checkpoints" / "last.pt")
    model.eval()
    size = 32 if config["data"].get("format") == "synthetic" else 64
    image = torch.rand(1, int(config["model"].get("in_channels", 1)), size, size,
                       generator=torch.Generator().manual_seed(0))
    return {"parameters": int(sum(p.numel() for p in model.parameters())),
            "ms_per_100_samples": sampling_speed(model, image)}


# ----------------------------------------------------------------------------- stages


def tune_runs(args) -> list[Run]:
    steps = args.tune_steps
    return [Run(args, "tune", "tune", f"{m}-{v}", m, v, ov, steps=steps, seed=0, split="val")
            for m in args.models for v, ov in variants(m).items()]


def choices(args, models: list[str] | None = None) -> dict:
    """Per model (of ``models``, default ``args.models``) whose variants are all tuned: the variant with
    the lowest validation GED."""
    out = {}
    for model in models or args.models:
        recs = {v: read_json(args.records / "tune" / f"{model}-{v}.json") for v in variants(model)}
        if all(recs.values()):
            best = min(recs, key=lambda v: recs[v]["metrics"]["ged"])
            out[model] = {"variant": best, "overrides": VARIANTS.get(model, {}).get(best, []),
                          "val_ged": {v: r["metrics"]["ged"] for v, r in recs.items()}}
    return out


def table_run(args, model: str, seed: int, choice: dict) -> Run:
    steps = args.table_steps
    return Run(args, "table", f"table/s{seed}", model, model, choice["variant"], choice["overrides"],
               steps=steps, seed=seed, split="test")


def table_record(args, model: str, seed: int = 0):
    return read_json(args.records / "table" / f"s{seed}" / f"{model}.json")


def recorded_table_run(args, rec: dict) -> Run:
    """The ``Run`` of a table record (its model, seed and variant)."""
    overrides = VARIANTS.get(rec["model"], {}).get(rec["variant"], [])
    return table_run(args, rec["model"], rec["seed"], {"variant": rec["variant"], "overrides": overrides})


def execute_all(runs: list[Run], failures: list[str]) -> None:
    todo = [r for r in runs if not r.done]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs done; {len(todo)} to go", flush=True)
    for i, run in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {run.folder}/{run.name}: {run.steps} steps, {run.split} split "
              f"({variant_label(run.overrides)}); log {run.log}", flush=True)
        t0 = time.perf_counter()
        try:
            rec = run.execute()
        except RuntimeError as exc:  # a failed run does not stop the others
            failures.append(f"{run.folder}/{run.name}: {exc}")
            print(f"    FAILED: {exc}", flush=True)
            continue
        print(f"    GED {rec['metrics']['ged']:.4f}, HM-IoU {rec['metrics']['hm_iou']:.4f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        if run.stage == "table" and run.seed == 0:  # study and draw it while its checkpoint is at hand
            extras_of(run, failures)


def stage_tune(args, failures) -> None:
    execute_all(tune_runs(args), failures)
    # every tuned model, not only this invocation's --models: a stream tuning one model must not drop
    # the others' choices from the file
    write_json(args.out / "choices.json", choices(args, MODELS))


def stage_table(args, failures, seeds=None, models=None) -> None:
    chosen = choices(args)
    models = models or args.models
    missing = [m for m in models if m not in chosen]
    if missing and not args.no_tune:
        print(f"table: tuning not finished for {', '.join(missing)}: their rows stay pending "
              f"(run tune first, or --no-tune for the shipped configs)", flush=True)
    runs = []
    for model in models:
        choice = chosen.get(model) or ({"variant": "base", "overrides": []} if args.no_tune else None)
        if choice is None:
            continue
        runs += [table_run(args, model, s, choice) for s in (seeds or args.seeds)]
    execute_all(runs, failures)


def top_models(args, n: int) -> list[str]:
    recs = finished_table(args)
    return [r["model"] for r in sorted(recs, key=lambda r: r["metrics"]["ged"])[:n]]


def finished_table(args, seed: int = 0) -> list[dict]:
    return [r for r in (table_record(args, m, seed) for m in args.models) if r]


def study_piece_path(args, kind: str, model: str) -> Path:
    return args.records / "study" / kind / f"{model}.json"


def figure_samples_path(args, model: str) -> Path:
    return args.records / "figure" / f"{model}.npz"


def missing_extras(args, model: str) -> list[str]:
    """What a finished seed-0 table run still lacks in ``--records``: its study pieces, its figure samples."""
    todo = [] if figure_samples_path(args, model).is_file() else ["figure samples"]
    return todo + [f"study {kind}" for kind, _ in SHIFTS if not study_piece_path(args, kind, model).is_file()]


def extras_of(run: Run, failures: list[str]) -> None:
    """The study pieces and figure samples of a finished seed-0 table run that ``--records`` lacks. Where
    its checkpoint is not in the work space (``--out`` lost since), the run is trained and evaluated again
    first (its record is replaced; the old numbers stay under ``previous``)."""
    args = run.args
    todo = missing_extras(args, run.model)
    if not todo:
        return
    try:
        if not run.trained:
            print(f"    {run.folder}/{run.name}: no checkpoint in {args.out_arg} for its {', '.join(todo)}; "
                  f"training it again (log {run.log})", flush=True)
            rec = run.execute()
            prev = rec.get("previous") or {}
            print(f"    GED {rec['metrics']['ged']:.4f} (recorded before: {_f(prev.get('ged'), 4)}), "
                  f"HM-IoU {rec['metrics']['hm_iou']:.4f} (before: {_f(prev.get('hm_iou'), 4)})", flush=True)
        if not figure_samples_path(args, run.model).is_file():  # seconds, where a study takes long
            figure_samples(run)
        for kind, severity in SHIFTS:
            if not study_piece_path(args, kind, run.model).is_file():
                study_piece(run, kind, severity)
    except RuntimeError as exc:
        failures.append(f"{run.folder}/{run.name} ({', '.join(todo)}): {exc}")
        print(f"    FAILED: {exc}", flush=True)


def study_piece(run: Run, kind: str, severity: float) -> dict:
    """``probunet study`` of one table run (test split and its ``kind`` shift) in the work space; its
    answers (the study answers every question per model) go to ``--records`` as the model's piece."""
    args = run.args
    out = args.out / "study" / run.model  # both shifts: the second samples only its shifted set
    cmd = ["probunet", "study", str(run.checkpoint), "--out", str(out), "--shift", kind, "--severity",
           f"{severity:g}", "--num-samples", str(NUM_SAMPLES), "--seed", "0", "--no-progress"]
    log = args.out / "study" / kind / f"{run.model}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"    study {kind} (severity {severity:g}) of {run.folder}/{run.name}; log {log}", flush=True)
    t0, before = time.perf_counter(), children_cpu_s()
    run_logged([sys.executable, "-m", "probunet", *cmd[1:]], child_env(args.threads), log)
    study = json.loads((out / "study.json").read_text())
    entry = study["settings"]["models"][0]
    name = entry["name"]
    piece = {"model": run.model, "variant": run.variant, "shift": kind, "severity": severity,
             "command": shell(cmd), "table_record": (run.record or {}).get("finished"),
             "settings": {k: v for k, v in study["settings"].items() if k != "models"},
             "entry": {**entry, "name": run.model},
             "results": {q: by_model[name] for q, by_model in study["results"].items() if name in by_model},
             "cpu_s": children_cpu_s() - before, "wall_s": time.perf_counter() - t0}
    piece = json.loads(portable(args, json.dumps(piece)))
    path = study_piece_path(args, kind, run.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, piece)
    return piece


# what ``probunet study`` writes to describe its risks and calibration, not settings (the transcribed pieces
# lack them)
STUDY_DESCRIPTIONS = ("risks", "calibration")


def settings_differ(a: dict, b: dict) -> bool:
    """Whether two study pieces were made with other settings (descriptions left aside)."""
    keys = (set(a) | set(b)) - set(STUDY_DESCRIPTIONS)
    return any(a.get(k) != b.get(k) for k in keys)


def study_of(args, kind: str) -> dict | None:
    """The study of the ``kind`` shift over every model with a piece in ``--records``, in the form
    ``probunet study`` writes (settings, results per question and model, the best scores)."""
    from probunet.study.pipeline import best_scores

    pieces = [p for p in (read_json(study_piece_path(args, kind, m)) for m in args.models) if p]
    if not pieces:
        return None
    results: dict = {}
    for piece in pieces:
        for question, values in piece["results"].items():
            results.setdefault(question, {})[piece["model"]] = values
    settings = {**pieces[0]["settings"], "models": [p["entry"] for p in pieces]}
    differ = [p["model"] for p in pieces[1:] if settings_differ(p["settings"], pieces[0]["settings"])]
    return {"settings": settings, "results": results, "best": best_scores(results),
            "commands": {p["model"]: p["command"] for p in pieces}, "settings_differ": differ,
            "earlier_run": [p["model"] for p in pieces if studied_an_earlier_run(p, table_record(args, p["model"]))]}


def studied_an_earlier_run(piece: dict, record: dict | None) -> bool:
    """Whether a study piece was made on an earlier run of its model's table command than the one its table
    row now reports (the row trained again since, its work space lost)."""
    return bool(record) and piece.get("table_record") != record.get("finished")


def stage_study(args, failures) -> None:
    """The study pieces and figure samples every finished seed-0 table run lacks (``extras_of``)."""
    recs = finished_table(args)
    if not recs:
        print("study: no finished table run yet", flush=True)
        return
    for rec in recs:
        run = recorded_table_run(args, rec)
        todo = missing_extras(args, run.model)
        print(f"study {run.model}: " + (f"to do: {', '.join(todo)}" if todo else "done"), flush=True)
        extras_of(run, failures)


def figure_cases(items: list[dict], n: int) -> list[dict]:
    """``n`` test crops where the readers disagree (some marked, not all the same), spread over the split
    in its order: the same crops for every model and every call."""
    import numpy as np

    from probunet.data import real_raters

    pick = []
    for item in items:
        r = np.asarray(real_raters(item)) > 0
        if r.any() and not all((r[0] == x).all() for x in r[1:]):
            pick.append(item)
    if len(pick) <= n:
        return pick or items[:n]
    return [pick[int(i * len(pick) / n)] for i in range(n)]


def test_items(args, config: dict) -> list[dict]:
    """The test split of a table run's config (loaded once per process)."""
    from probunet.config import from_dict
    from probunet.data import load_splits

    key = json.dumps(config["data"], sort_keys=True)
    cache = getattr(args, "_test_items", None)
    if cache is None or cache[0] != key:
        args._test_items = cache = (key, load_splits(from_dict(config))["test"])
    return cache[1]


def figure_samples(run: Run) -> Path:
    """A table run's samples (``FIGURE_SAMPLES`` per crop) on the figure's crops, into ``--records``."""
    import io

    import numpy as np
    import torch

    from probunet.models.checkpoint import load_model
    from probunet.utils import atomic_write_bytes

    torch.set_num_threads(1)
    model, _, _ = load_model(run.checkpoint)
    items = figure_cases(test_items(run.args, run.config), FIGURE_CASES)
    samples = draw_samples({run.model: model.eval()}, items, FIGURE_SAMPLES)[run.model]
    buf = io.BytesIO()
    np.savez_compressed(buf, samples=samples, case_ids=np.array([i["case_id"] for i in items]),
                        num_classes=np.array(int(model.num_classes)))
    path = figure_samples_path(run.args, run.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    print(f"    figure samples: {path}", flush=True)
    return path


def stage_figure(args, failures) -> None:
    """The figure (next to ``--doc``) from the samples in ``--records`` (``study`` draws them): readers,
    then a row per model."""
    import numpy as np

    recs = finished_table(args)
    stored = {}
    for rec in recs:
        path = figure_samples_path(args, rec["model"])
        if path.is_file():
            with np.load(path) as z:
                stored[rec["model"]] = {k: z[k] for k in z.files}
    if not stored:
        print("figure: no samples recorded yet", flush=True)
        return
    cases = [str(c) for c in next(iter(stored.values()))["case_ids"]]
    other = [m for m, z in stored.items() if [str(c) for c in z["case_ids"]] != cases]
    if other:
        raise UserError(f"figure: the samples of {', '.join(other)} are of other crops than "
                        f"{next(iter(stored))}'s; remove {figure_samples_path(args, other[0])} and run again")
    by_id = {i["case_id"]: i for i in test_items(args, recorded_table_run(args, recs[0]).config)}
    missing = [c for c in cases if c not in by_id]
    if missing:
        raise UserError(f"figure: the test split of --lidc-data {args.lidc_data} lacks the recorded crops "
                        f"{', '.join(missing)}")
    path = args.doc.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    samples_figure(path, {}, [by_id[c] for c in cases], FIGURE_SAMPLES,
                   samples={m: z["samples"] for m, z in stored.items()},
                   num_classes=max(int(z["num_classes"]) for z in stored.values()))
    write_json(args.records / "figure.json", {"models": list(stored), "cases": cases})
    print(f"figure: {path} ({len(stored)} models)", flush=True)


# ----------------------------------------------------------------------------- report


def _f(v, nd=3) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def references(args) -> dict | None:
    """The reference rows on the table's test split (cached in ``--records``/references.json, keyed by the
    data section less its path), once a table row is finished."""
    recs = finished_table(args)
    if not recs:
        return None
    data = recorded_table_run(args, recs[0]).config["data"]
    key = {k: v for k, v in data.items() if k != "path"}
    path = args.records / "references.json"
    cached = read_json(path)
    if cached and cached.get("data") == key:
        return cached["rows"]
    rows, _ = all_reference_rows({"data": data, "model": {"num_classes": 2}, "eval": {"split": "test"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"data": key, "rows": rows})
    return rows


def compute(args) -> dict:
    """CPU seconds spent so far, per stage: ``{stage: {"runs": records, "cpu_s": training + evaluation of
    every record's run (all attempts; an attempt killed with its driver is not counted), with the earlier
    work whose records were transcribed (``earlier_compute.json``)}}``."""
    earlier = read_json(args.records / "earlier_compute.json") or {}
    out = {}
    for stage, folders in (("tune", ["tune"]), ("table", [f"table/s{s}" for s in (0, 1, 2)]),
                           ("study", [f"study/{kind}" for kind, _ in SHIFTS])):
        recs = [read_json(p) for f in folders for p in sorted((args.records / f).glob("*.json"))]
        recs = [r for r in recs if r is not None]
        cpu = sum(float(r.get("train_cpu_s") or 0.0) + float(r.get("eval_cpu_s") or 0.0)
                  + float(r.get("cpu_s") or 0.0) for r in recs if not r.get("transcribed"))
        out[stage] = {"runs": len(recs), "cpu_s": cpu + float((earlier.get(stage) or {}).get("cpu_s", 0.0))}
    return out


def compute_lines(args) -> list[str]:
    """The report's compute section: what the table has cost so far."""
    c = compute(args)
    total = sum(v["cpu_s"] for v in c.values())
    lines = ["## Compute so far\n", "| stage | runs finished | CPU h (train + evaluate) |", "|---|---|---|"]
    for stage, v in c.items():
        lines.append(f"| {stage} | {v['runs']} | {v['cpu_s'] / 3600:.2f} |")
    lines.append(f"| **all** | {sum(v['runs'] for v in c.values())} | **{total / 3600:.2f}** |")
    lines.append("\nCPU hours of the runs' processes (one thread each), all attempts; wall time is about the "
                 "same per run on an idle core, and two runs share this 2-core machine.")
    earlier = read_json(args.records / "earlier_compute.json") or {}
    if earlier.get("note"):
        spent = sum(float((v or {}).get("cpu_s", 0.0)) for k, v in earlier.items() if k != "note")
        lines.append(f"These hours include {spent / 3600:.2f} CPU h of earlier work: {earlier['note']}")
    lines.append("")
    return lines


def transcribed_lines(records: list, table: bool = False) -> list[str]:
    """A line naming the records (of ``records``) transcribed from an earlier report, if any."""
    done = [r for r in records if r and r.get("transcribed")]
    if not done:
        return []
    line = (f"\nTranscribed from {done[0]['transcribed']} (their runs' work space is gone): "
            f"{', '.join(r['name'] for r in done)}.")
    if table:
        line += (f" Where the study or the figure needs one of these models, `python {ME} study --resume` trains "
                 "and evaluates it again, and its record then holds the new numbers.")
    return [line]


def retrained_lines(records: list) -> list[str]:
    """A line naming the runs trained again (their work space lost) with their new and earlier GED and
    HM-IoU: the same command and seed, rerun; the difference is how far a rerun moves a row."""
    again = [r for r in records if r and r.get("previous")]
    if not again:
        return []

    def pair(r: dict, key: str) -> str:
        return f"{_f(r['metrics'][key])} (before {_f(r['previous'].get(key))})"

    return ["\nTrained and evaluated again with the same command and seed (the earlier work space was gone), "
            "GED and HM-IoU now against before: " + "; ".join(
                f"{r['name']} {pair(r, 'ged')}, {pair(r, 'hm_iou')}" for r in again) + "."]


def cpu_lines(records: list) -> list[str]:
    """A line naming the CPU each record's training ran on (torch's kernel level and bf16 units, from its
    train summary): the timing columns compare only between rows of one CPU."""
    groups: dict[str, list[str]] = {}
    for r in records:
        if r:
            cpu = (r.get("train_summary") or {}).get("cpu_capability") or "not recorded"
            groups.setdefault(cpu, []).append(r["name"])
    if len(groups) < 2 and "not recorded" not in groups:
        return [f"\nTimings: one CPU for every row ({next(iter(groups))})."] if groups else []
    order = sorted(groups, key=lambda cpu: cpu == "not recorded")
    return ["\nTimings compare only between rows of one CPU. The CPU each row trained on (torch's kernel level, "
            "bf16 units): " + "; ".join(f"{cpu}: {', '.join(groups[cpu])}" for cpu in order) + "."]


README_BEGIN = "<!-- zoo_lidc table: written by python scripts/zoo_lidc.py report -->"
README_END = "<!-- end of the zoo_lidc table -->"


def readme_table(args, refs: dict | None) -> list[str]:
    """The README's short table: finished seed-0 rows by test GED, then the pending ones, then the majority
    vote (the score to beat)."""
    recs = sorted(finished_table(args), key=lambda r: r["metrics"]["ged"])
    readers = next((r["metrics"]["reference_diversity"] for r in recs), None)
    lines = [f"| model (`configs/zoo/lidc/`) | tuned change | test GED ↓ | HM-IoU ↑ | sample diversity "
             f"(readers {_f(readers)}) | train CPU h |", "|---|---|---|---|---|---|"]
    for r in recs:
        m = r["metrics"]
        lines.append(f"| `{r['model']}` | {variant_change(r['model'], r['variant'])} | "
                     f"{_f(m['ged'])} | {_f(m['hm_iou'])} | {_f(m['sample_diversity'])} | "
                     f"{_f(r['train_cpu_s'] / 3600, 2)} |")
    done, chosen = {r["model"] for r in recs}, choices(args)
    lines += [f"| `{m}` | {variant_label(chosen[m]['overrides']) if m in chosen else ''} | pending | | | |"
              for m in args.models if m not in done]
    vote = (refs or {}).get("majority vote")
    if vote:
        lines.append(f"| *majority vote* | reference | {_f(vote['ged'])} | {_f(vote['hm_iou'])} | "
                     f"{_f(vote['diversity'])} | |")
    return lines


def splice_readme(path: Path, lines: list[str]) -> bool:
    """Replace what stands between the README's zoo_lidc markers by ``lines``; False (and the file untouched)
    where the markers are missing."""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return False
    new = text[:start + len(README_BEGIN)] + "\n" + "\n".join(lines) + "\n" + text[end:]
    if new != text:
        from probunet.utils import atomic_write_text

        atomic_write_text(path, new)
    return True


def portable(args, text: str) -> str:
    """``text`` with this machine's path of --out (as given, and with its links resolved) written as
    --out was given: the study's command and tables name the runs as a user's clone has them."""
    for base in sorted({str(args.out), str(args.out.resolve())}, key=len, reverse=True):
        text = text.replace(base + "/", args.out_arg.rstrip("/") + "/")
    return text


def report(args) -> Path:
    """``--doc`` from what has finished (pending rows with their commands); the figure copied beside it."""
    quick = " --quick" if args.quick else ""
    data = f" --lidc-data {args.lidc_data}" if args.lidc_data != DEFAULT_DATA else ""
    out = f" --out {args.out_arg}" if args.out_arg != "runs/zoo_lidc" else ""
    cmd_all = f"python {ME} all --resume{data}{out}{quick}"
    lines = ["# The model zoo on LIDC-style data\n",
             "LIDC-IDRI readers' real masks (64x64 crops around every nodule slice) on CT-like images "
             "synthesised from them (`scripts/prepare_lidc.py --synthetic-images --crop-size 64`), split by "
             "the frozen patient manifest (`data.split.file: lidc-idri`). Every model: `configs/zoo/lidc/"
             "<model>.yaml`, batch 16, Adam at lr 3e-4 with a weight average (EMA 0.995), He-normal init, "
             f"features 32-64-128-192, {NUM_SAMPLES} samples per image. Numbers: CPU, one thread per run.\n",
             f"Everything here, resumable: `{cmd_all}` (then `python {ME} report{data}{out}{quick}`). "
             "Each row's own command is under its table. The table is made of its records "
             f"(`{args.records_arg}/`, each run's numbers, commands and CPU time): a run recorded there is not "
             "run again, and the trained runs themselves need not outlive the machine they ran on.\n"]

    # tuning
    tune = {r.name: r for r in tune_runs(args)}
    chosen = choices(args)
    lines += [f"## Tuning (validation split, {args.tune_steps} steps)\n",
              "| model | variant | change | val GED | val HM-IoU | E[d(S,S')] | readers E[d(Y,Y')] | chosen |",
              "|---|---|---|---|---|---|---|---|"]
    pending_cmds = []
    for name, run in tune.items():
        rec = run.record
        label = variant_change(run.model, run.variant)
        if rec:
            m = rec["metrics"]
            mark = "**yes**" if chosen.get(run.model, {}).get("variant") == run.variant else ""
            lines.append(f"| {run.model} | {run.variant} | {label} | {_f(m['ged'])} ± {_f(m.get('ged_sem'))} | "
                         f"{_f(m['hm_iou'])} | {_f(m['sample_diversity'])} | {_f(m['reference_diversity'])} | {mark} |")
        else:
            lines.append(f"| {run.model} | {run.variant} | {label} | pending | | | | |")
            pending_cmds.append(run)
    goals = [(r.name, (r.record.get("train_summary") or {}).get("geco_goal")) for r in tune.values() if r.record]
    goals = [(n, g) for n, g in goals if g]
    if goals:
        lines.append("\nGECO goals resolved from the training split (`train.geco.goal: auto`): " + "; ".join(
            f"{n}: {g['goal_scale']:g} x {g['rater_entropy']:.4f} nats = {g['goal']:.4f}" for n, g in goals) + ".")
    lines += transcribed_lines([r.record for r in tune.values()])
    lines.append("\nCommands (one per row):\n")
    lines += [f"- {r.name}: `{r.reproduce()}`" for r in tune.values()]
    lines.append("")

    # the table
    lines += [f"## Test split ({args.table_steps} steps, seed 0)\n"]
    head = ["model", "variant", "GED", "HM-IoU", "S_NCC", "ECE", "QUBIQ", "E[d(S,S')]", "readers E[d(Y,Y')]",
            "empty gap", "train img/s", "train CPU h", "ms / 100 samples", "parameters"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows_cmds, by_empty = [], {}
    for model in args.models:
        rec = table_record(args, model)
        choice = chosen.get(model)
        if rec:
            m = rec["metrics"]
            cells = [model, variant_change(model, rec["variant"]),
                     f"{_f(m['ged'])} ± {_f(m.get('ged_sem'))}", f"{_f(m['hm_iou'])} ± {_f(m.get('hm_iou_sem'))}",
                     _f(m["s_ncc"]), _f(m["ece"], 4), _f(m.get("qubiq")), _f(m["sample_diversity"]),
                     _f(m["reference_diversity"]), _f(m.get("empty_gap")), _f(m.get("train_images_per_s"), 1),
                     _f(rec["train_cpu_s"] / 3600, 2), _f(rec.get("ms_per_100_samples"), 0),
                     f"{rec.get('parameters', 0):,}"]
            rows_cmds.append((model, rec["reproduce"]))
            by_empty[model] = m.get("by_empty_raters", [])
        else:
            cells = [model, "pending" if choice is None else variant_label(choice["overrides"]), "pending"] + \
                [""] * (len(head) - 3)
            first = "" if choice else f"python {ME} tune --resume --models {model}{data}{out}{quick} && "
            rows_cmds.append((model, f"{first}python {ME} table --resume --models {model} --seeds 0{data}{out}{quick}"))
        lines.append("| " + " | ".join(cells) + " |")
    refs = references(args) if finished_table(args) else None
    for name, v in (refs or {}).items():
        lines.append(f"| *{name}* | reference | {_f(v['ged'])} ± {_f(v['ged_sem'])} | "
                     f"{_f(v['hm_iou'])} ± {_f(v['hm_iou_sem'])} | | | | {_f(v['diversity'])} | | | | | | |")
    if refs is None:
        lines.append("| *majority vote, all-empty, share threshold (oracle)* | reference | pending | | | | | | | | | | | |")
    lines.append("\nGED and HM-IoU: mean ± standard error over the test crops. The share-threshold oracle sees the "
                 "readers' masks (sample s marks the pixels at least s mod A + 1 of the A readers mark): a floor, "
                 "not a competitor. Train CPU h: CPU time of the training process(es), all attempts; train img/s: "
                 "the logged median, wall clock on a shared machine.\n")
    table_recs = [table_record(args, m) for m in args.models]
    lines += [line.lstrip("\n") + "\n" for line in transcribed_lines(table_recs, True) + retrained_lines(table_recs)
              + cpu_lines(table_recs)]
    lines.append("Commands (one per row):\n")
    lines += [f"- {model}: `{cmd}`" for model, cmd in rows_cmds]

    # GED by the number of empty readers
    groups = sorted({(g["empty_raters"], g["num_raters"]) for gs in by_empty.values() for g in gs})
    if groups:
        lines += ["\n### GED by the number of readers who drew nothing\n",
                  "| model | " + " | ".join(f"{k} of {a} empty" for k, a in groups) + " |",
                  "|" + "---|" * (len(groups) + 1)]
        for model, gs in by_empty.items():
            d = {(g["empty_raters"], g["num_raters"]): g for g in gs}
            lines.append(f"| {model} | " + " | ".join(
                f"{_f(d[k]['ged'])} ({d[k]['num_cases']})" if k in d else "" for k in groups) + " |")
        lines.append("\n(cases per group in brackets)\n")

    # seeds
    seeded = {}
    for model in args.models:
        recs = [table_record(args, model, s) for s in (0, 1, 2)]
        if any(recs[1:]):
            seeded[model] = recs
    lines.append("\n## Three seeds\n")
    if seeded:
        lines += ["| model | GED seeds 0 / 1 / 2 | HM-IoU seeds 0 / 1 / 2 |", "|---|---|---|"]
        for model, recs in seeded.items():
            ged = " / ".join(_f(r["metrics"]["ged"]) if r else "pending" for r in recs)
            hm = " / ".join(_f(r["metrics"]["hm_iou"]) if r else "pending" for r in recs)
            lines.append(f"| {model} | {ged} | {hm} |")
    top = top_models(args, args.top)
    lines.append(f"\nThe best {args.top} by seed-0 test GED get seeds 1 and 2"
                 + (f" (now: {', '.join(top)}): `python {ME} table --resume --seeds 1 2 --models {' '.join(top)}"
                    f"{data}{out}{quick}`" if top else " (pending)") + ".\n")

    # the study
    lines.append("## Uncertainty study (test split and a shifted copy)\n")
    lines.append("`probunet study` of each seed-0 table run (16 samples, seed 0; the study answers every "
                 "question per model): its command is under each table.\n")
    for kind, severity in SHIFTS:
        study = study_of(args, kind)
        lines.append(f"### Shift: {kind}, severity {severity:g}\n")
        if study is None:
            lines.append(f"pending: `python {ME} study --resume{data}{out}{quick}` (over the finished seed-0 runs)\n")
            continue
        from probunet.study.pipeline import markdown

        text = markdown(study)
        lines.append(text.replace("\n# ", "\n#### ").replace("\n## ", "\n#### ").lstrip("# ").strip() + "\n")
        if study["settings_differ"]:
            lines.append(f"Studied with other settings than {study['settings']['models'][0]['name']}: "
                         f"{', '.join(study['settings_differ'])}.\n")
        if study.get("earlier_run"):
            lines.append(f"Studied on an earlier run of the same command and seed, not on the rerun its table row now "
                         f"reports: {', '.join(study['earlier_run'])}.\n")
        lines.append("Commands:\n")
        by_cmd: dict[str, list[str]] = {}
        for model, cmd in study["commands"].items():  # a study of several models at once: its command once
            by_cmd.setdefault(cmd, []).append(model)
        lines += [f"- {', '.join(models)}: `{cmd}`" for cmd, models in by_cmd.items()]
        waiting = [r["model"] for r in finished_table(args) if r["model"] not in study["commands"]]
        if waiting:
            lines.append(f"- pending for {', '.join(waiting)}: `python {ME} study --resume{data}{out}{quick}`")
        lines.append("")

    lines += compute_lines(args)

    # the figure
    lines.append("## Samples\n")
    doc = args.doc
    doc.parent.mkdir(parents=True, exist_ok=True)
    fig, drawn = doc.with_suffix(".png"), read_json(args.records / "figure.json")
    if fig.is_file() and drawn:
        lines.append(f"![test crops: readers, then samples per model]({fig.name})\n")
        lines.append(f"Readers (top row), then {FIGURE_SAMPLES} samples per model ({', '.join(drawn['models'])}) "
                     f"on the same {len(drawn['cases'])} test crops where the readers disagree: "
                     f"`python {ME} figure --resume{data}{out}{quick}`.\n")
    else:
        lines.append(f"pending: `python {ME} figure --resume{data}{out}{quick}`\n")
    from probunet.utils import atomic_write_text

    atomic_write_text(doc, "\n".join(lines).rstrip() + "\n")
    print(f"written: {doc}", flush=True)
    if doc.resolve() == (REPO / "docs" / "zoo_lidc.md").resolve():  # the shipped report: the README's table too
        readme = REPO / "README.md"
        if splice_readme(readme, readme_table(args, refs)):
            print(f"written: {readme} (its zoo_lidc table)", flush=True)
        else:
            print(f"{readme}: no zoo_lidc markers, its table left alone", flush=True)
    return doc


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["tune", "table", "study", "figure", "report", "all"])
    p.add_argument("--out", default="runs/zoo_lidc", help="the runs and their records (default runs/zoo_lidc)")
    p.add_argument("--records", default=None,
                   help="the records of finished runs, study pieces and figure samples (default "
                        "docs/zoo_lidc_records, the shipped table's; with --quick OUT/records)")
    p.add_argument("--lidc-data", default=DEFAULT_DATA, help=f"the LIDC-style pickle folder (default {DEFAULT_DATA})")
    p.add_argument("--models", nargs="+", default=None, choices=MODELS, help="default: all")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="table: seeds (default 0)")
    p.add_argument("--top", type=int, default=3, help="all: this many models by test GED get seeds 1 and 2")
    p.add_argument("--no-tune", action="store_true", help="table: the shipped configs where tuning is not done")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default=None,
                   help="train.amp of every run (default: the configs' own)")
    p.add_argument("--tune-steps", type=int, default=None, help=f"tune: steps per run (default {TUNE_STEPS})")
    p.add_argument("--table-steps", type=int, default=None, help=f"table: steps per run (default {TABLE_STEPS})")
    p.add_argument("--doc", default=None,
                   help="report: the markdown file written (default docs/zoo_lidc.md; with --quick OUT/zoo_lidc.md)")
    p.add_argument("--resume", action="store_true", help="go on with the runs already in --out")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of each run's processes (default 1; 2 on an otherwise idle 2-core machine "
                        "takes a long run, such as the 8-member ensemble, through in less wall time)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny models and synthetic data, {QUICK_TUNE_STEPS} / {QUICK_TABLE_STEPS} steps (a smoke run)")
    return p


def check_args(args) -> None:
    args.out_arg = args.out
    args.out = resolve(args.out)
    args.doc = resolve(args.doc) if args.doc else (args.out / "zoo_lidc.md" if args.quick
                                                    else REPO / "docs" / "zoo_lidc.md")
    args.records_arg = args.records or (f"{args.out_arg}/records" if args.quick else "docs/zoo_lidc_records")
    args.records = resolve(args.records) if args.records else (args.out / "records" if args.quick
                                                                else REPO / "docs" / "zoo_lidc_records")
    args.models = args.models or list(MODELS)
    if args.tune_steps is None:
        args.tune_steps = QUICK_TUNE_STEPS if args.quick else TUNE_STEPS
    if args.table_steps is None:
        args.table_steps = QUICK_TABLE_STEPS if args.quick else TABLE_STEPS
    if min(args.tune_steps, args.table_steps) < 1:
        raise UserError("--tune-steps and --table-steps must be >= 1")
    if any(s < 0 for s in args.seeds):
        raise UserError("--seeds: seeds must be >= 0")
    if args.top < 0:
        raise UserError("--top must be >= 0")
    if args.threads < 1:
        raise UserError("--threads must be >= 1")
    writes = args.stage in ("tune", "table", "study", "all")
    if writes and args.out.is_dir() and any(args.out.iterdir()) and not args.resume:
        raise UserError(f"--out {args.out_arg} already holds runs; add --resume to go on with them "
                        f"(or choose a new --out)")
    if writes and not args.resume and any(args.records.glob("*/**/*.json")):
        raise UserError(f"--records {args.records_arg} already holds finished runs; add --resume to go on with "
                        f"them (or choose a new --records)")
    if not args.quick and args.stage in ("tune", "table", "all"):
        data = resolve(args.lidc_data)
        if not (data.is_dir() and any(data.glob("*.pickle"))):
            raise UserError(f"--lidc-data {args.lidc_data}: no *.pickle there; build it with python "
                            f"scripts/prepare_lidc.py --synthetic-images --crop-size 64 --out {args.lidc_data}")


def _stop(signum, frame):  # SIGTERM: stop like Ctrl-C, so that the running child is killed too
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        signal.signal(signal.SIGTERM, _stop)
        failures: list[str] = []
        t0 = time.perf_counter()
        if args.stage in ("tune", "all"):
            stage_tune(args, failures)
        if args.stage == "table":
            stage_table(args, failures)
        if args.stage == "all":
            stage_table(args, failures, seeds=[0])
            if args.top and len(finished_table(args)) == len(args.models):
                stage_table(args, failures, seeds=[1, 2], models=top_models(args, args.top))
            elif args.top:
                print("table: seeds 1 and 2 wait until every model's seed-0 row is done", flush=True)
        if args.stage in ("study", "all"):
            stage_study(args, failures)
        if args.stage in ("figure", "all"):
            stage_figure(args, failures)
        report(args)
    except UserError as exc:
        print(f"zoo_lidc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zoo_lidc: stopped; run the same command with --resume to go on", file=sys.stderr)
        return 130
    print(f"{time.perf_counter() - t0:.0f}s" + (f"; {len(failures)} failed:" if failures else ""), flush=True)
    for f in failures:
        print(f"  {f}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
