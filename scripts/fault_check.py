"""Fault injection for probunet: kills, damaged files, non-finite numbers, hostile inputs.

::

    python scripts/fault_check.py            # default sizes: 20 kills, 1000 fuzzed files per kind
    python scripts/fault_check.py --quick    # a small version (the test suite runs it)

Parts, one table at the end (exit 0 when every figure is as required):

1. kills: a small training run (configs/debug.yaml) is killed with SIGKILL at N
   moments, half at random times and half in the middle of a checkpoint write
   (the worker writes checkpoints in slow chunks and announces them), then
   resumed (``--resume``; a fresh start when no checkpoint existed yet). Every
   checkpoint left by the kill must load; the final weights and optimizer state
   must be bit-identical to an uninterrupted run; ``metrics.jsonl`` must list
   the same steps; no temporary file may remain.
2. fuzz: N mutated copies each of a valid LIDC pickle, checkpoint and NIfTI
   (random byte flips, truncations, inserted pickle opcodes), loaded one by one in
   worker processes. A worker reports each file before loading it, so a crash or
   hang is charged to that file and a new worker goes on with the next. Outcomes:
   loaded (for checkpoints: with the original weights), refused with a one-line
   error naming the file, other errors, crashed/hung (must be 0).
3. non-finite injection: NaN/Inf in the loss, the gradients, the weights and the
   optimizer state at chosen steps, and an infinite learning rate: no checkpoint
   with a non-finite tensor may be written, ever.
4. hostile inputs (the list in docs/safety.md), each with its expected outcome.
5. full and read-only disks: train, predict and evaluate on a 2 MB tmpfs filled up (before the
   run, and after the first checkpoint) and into a read-only tmpfs, where the machine allows
   mounting one (root); elsewhere a full disk is simulated (every rename fails with ENOSPC) and
   the read-only case is skipped. Each must end with one line naming the path and the cause.
6. data changed between train and evaluate: cases added to and removed from a run's data
   folder; evaluate and ``--resume`` must keep the run's recorded split.
7. hostile files: shared-reference and oversized structures in checkpoints and
   pickles, headers claiming huge images, FIFOs and special files, YAML bombs; each probe is a
   ``probunet`` command in its own process with a time limit (a hang is reported as "hung") and
   its peak memory. ``python scripts/fault_check.py files [CHECKPOINT]`` runs this part alone.
8. study: ``probunet study`` keeps a run's recorded split on a grown folder, never replaces a file it
   did not write, never scores a model trained with other ``--steps``; evaluate keeps the recorded
   split on a moved and grown folder (``scripts/_faults_study.py``).
9. cache (scripts/_faults_cache.py): a stale image with the same size and mtime rebuilt, damaged cache files
   refused naming the file, read-only/full outputs of synth and preprocess and a lock symlink: one line.
10. export and ensemble sampling (``scripts/_faults_export.py``): ensemble maps equal across
   ``--sample-chunk``, the zoo's ensemble of Probabilistic U-Nets exports, export onto a full
   disk is one line with no temp file, out-of-range predict/export options are refused.
11. input bounds (``scripts/_faults_shift.py``): huge and infinite shift severities, --severity without
    --shift, an override given twice, YAML merge keys, NaN spacings, a batch size past the memory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common (also when loaded from its file)
from _common import PROBE_RUNNER, REPO, add_repo_to_path, mount_tmpfs, probe_output, repo_env, umount  # noqa: E402

add_repo_to_path(always=True)  # this tree's probunet, as the children get it through PYTHONPATH
DEBUG = str(REPO / "configs" / "debug.yaml")
TRAIN_ARGS = ["train.steps=12", "train.checkpoint_every=2", "train.log_every=1", "train.val_every=4",
              "train.val_cases=2", "train.val_samples=2"]
HANG_S = 60.0
# the families after part 7, each in scripts/_faults_<name>.py: (name, title in the report)
FAMILIES = (("study", "8. study: recorded split, output ownership, stale runs"),
            ("cache", "9. preprocessing cache and unwritable outputs"),
            ("export", "10. export and ensemble sampling"),
            ("shift", "11. input bounds: shifts, overrides, spacing, batch memory"))


def _env() -> dict:
    return repo_env(pythonpath=True, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# ============================================================================ workers (subprocesses)


def _worker_train(argv: list[str]) -> int:
    """``_train``: ``probunet train`` with checkpoint writes slowed down and announced on stdout."""
    import torch

    real_save = torch.save

    def slow_save(obj, f, *a, **kw):
        if not isinstance(f, (str, os.PathLike)):
            return real_save(obj, f, *a, **kw)
        buf = io.BytesIO()
        real_save(obj, buf, *a, **kw)
        data = buf.getvalue()
        print(f"SAVE {f}", flush=True)
        with open(f, "wb") as fh:
            n = max(1, len(data) // 4)
            for i in range(0, len(data), n):
                fh.write(data[i:i + n])
                fh.flush()
                time.sleep(0.01)

    torch.save = slow_save
    from probunet.cli import main

    return main(["--quiet", "train", *argv, "--no-progress"])


def _load_one(kind: str, path: str, ref_digest: str) -> tuple[str, str]:
    from probunet.models.checkpoint import load_model, state_digest
    from probunet.data import io as pio
    from probunet.data import lidc_pickle

    try:
        if kind == "pickle":
            items = lidc_pickle.items_from_dict(lidc_pickle.safe_load(path), path)
            return "ok", f"{len(items)} item(s)"
        if kind == "nifti":
            array, meta = pio.read_image(path)
            return "ok", f"{array.shape}"
        model, cfg, ckpt = load_model(path)
        same = state_digest({"model": model.state_dict()}) == ref_digest
        return ("ok" if same else "altered"), ""
    except BaseException as exc:  # noqa: BLE001 - classifying every outcome is the point
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        msg = str(exc).strip()
        one_line = bool(msg) and "\n" not in msg and Path(path).name in msg
        return ("refused" if one_line else "other_error"), f"{exc.__class__.__name__}: {msg[:300]}"


def _worker_load(argv: list[str]) -> int:
    """``_load JOBS START REF_DIGEST``: load jobs[START:] one by one, reporting each."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a giant allocation fails, not the machine
    jobs = json.loads(Path(argv[0]).read_text())
    start, ref = int(argv[1]), argv[2]
    import logging

    logging.disable(logging.CRITICAL)
    for i in range(start, len(jobs)):
        kind, path = jobs[i]
        print(f"START {i}", flush=True)
        outcome, msg = _load_one(kind, path, ref)
        print("DONE " + json.dumps([i, outcome, msg]), flush=True)
    return 0


# ============================================================================ 1. kills


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, **kw)


def _train_cmd(run_dir: Path, resume: bool = False) -> list[str]:
    return [sys.executable, __file__, "_train", DEBUG, *TRAIN_ARGS, "--out", str(run_dir),
            *(["--resume"] if resume else [])]


def _final_digest(run_dir: Path) -> str:
    from probunet.models.checkpoint import load_checkpoint, state_digest

    c = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    return state_digest({"model": c["model"], "optimizer": c["optimizer"], "step": c["step"]})


def _metric_steps(run_dir: Path) -> list:
    p = run_dir / "metrics.jsonl"
    return [(json.loads(l)["step"], sorted(json.loads(l))) for l in p.read_text().splitlines()] if p.is_file() else []


def kills(n: int, work: Path, rng: random.Random) -> dict:
    from probunet.models.checkpoint import load_checkpoint

    ref = work / "ref"
    t0 = time.perf_counter()
    r = _run(_train_cmd(ref))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"fault_check: the reference training run failed:\n{r.stderr[-2000:]}")
    ref_digest, ref_steps = _final_digest(ref), _metric_steps(ref)
    saves = sum(1 for l in r.stdout.splitlines() if l.startswith("SAVE "))
    res = {"tried": 0, "survived": 0, "during_write": 0, "checkpoints_checked": 0, "unloadable": 0,
           "failures": [], "ref_seconds": wall}
    for k in range(n):
        run_dir = work / f"kill{k:03d}"
        during_write = k % 2 == 0  # --quick's single kill lands in a write
        proc = subprocess.Popen(_train_cmd(run_dir), env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        if during_write:  # in the middle of the j-th checkpoint write
            target, seen = rng.randint(1, max(1, saves)), 0
            deadline = time.monotonic() + 10 * wall + 30
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                seen += line.startswith("SAVE ")
                if seen >= target:
                    time.sleep(rng.uniform(0.0, 0.025))
                    break
        else:
            time.sleep(rng.uniform(0.2, wall))
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        res["tried"] += 1
        res["during_write"] += int(killed and during_write)
        problems = []
        for pt in sorted(run_dir.rglob("*.pt")):
            res["checkpoints_checked"] += 1
            try:
                load_checkpoint(pt)
            except Exception as exc:  # noqa: BLE001
                res["unloadable"] += 1
                problems.append(f"{pt.name} unloadable after the kill: {exc}")
        resume = (run_dir / "checkpoints" / "last.pt").is_file()
        r = _run(_train_cmd(run_dir, resume=resume))
        if r.returncode != 0:
            problems.append(f"{'resume' if resume else 'restart'} failed: {r.stderr.strip()[-300:]}")
        else:
            if _final_digest(run_dir) != ref_digest:
                problems.append("final weights/optimizer differ from the uninterrupted run")
            if _metric_steps(run_dir) != ref_steps:
                problems.append("metrics.jsonl rows differ from the uninterrupted run")
            temps = [p.name for p in run_dir.rglob(".*.tmp*")]
            if temps:
                problems.append(f"temporary files left: {temps}")
        if problems:
            res["failures"].append(f"kill {k} ({'write' if during_write else 'random'}): " + "; ".join(problems))
        else:
            res["survived"] += 1
        shutil.rmtree(run_dir, ignore_errors=True)
    return res


# ============================================================================ 2. fuzz


OPCODES = [b"c__builtin__\neval\n", b"cos\nsystem\n(S'echo pwned'\ntR.", b"\x93", b"R", b"b", b"\x81", b"\x92",
           b"i", b"o", b"(", b"t", b"\x8c\x05numpy\x8c\x05dtype\x93", b"cnumpy\ndtype\n(S'O8'\nK\x00K\x01\x87R",
           b"\x94", b"h\x00", b"\x95\xff\xff\xff\xff\xff\xff\xff\x7f", b"J\xff\xff\xff\x7f", b"0", b"2", b"s", b"u"]


def _mutate(data: bytes, rng: random.Random, how: str) -> bytes:
    b = bytearray(data)
    if how == "flip":
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if how == "truncate":
        return bytes(b[:rng.randrange(len(b))])
    pos = rng.randrange(len(b) + 1)
    return bytes(b[:pos] + bytearray(rng.choice(OPCODES)) + b[pos:])


def _mutate_checkpoint(data: bytes, rng: random.Random, how: str) -> bytes:
    """Byte-level for flips/truncations half the time; else inside the zip member holding the pickle."""
    if how != "insert" and rng.random() < 0.5:
        return _mutate(data, rng, how)
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            content = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                content = _mutate(content, rng, how)
            dst.writestr(info.filename, content)
    return out.getvalue()


def _base_files(work: Path, ckpt: Path) -> dict:
    import nibabel as nib
    import numpy as np

    from probunet.data.lidc_pickle import write_pickle

    rng = np.random.default_rng(0)
    pkl = write_pickle({f"LIDC-IDRI-0001_slice{i}": {
        "image": rng.normal(size=(32, 32)).astype(np.float32),
        "masks": [(rng.random((32, 32)) > 0.7).astype(np.uint8) for _ in range(4)],
        "series_uid": "1.3.6.1.4.1.14519.5.2.1.6279.6001.1"} for i in range(2)}, work / "base.pickle")
    nii = work / "base.nii"
    nib.save(nib.Nifti1Image(rng.normal(size=(32, 32, 8)).astype(np.float32), np.diag([0.7, 0.7, 2.5, 1])),
             str(nii))
    return {"pickle": pkl, "checkpoint": ckpt, "nifti": nii}


def fuzz(n: int, work: Path, ckpt: Path, rng: random.Random) -> dict:
    from probunet.models.checkpoint import load_checkpoint, state_digest

    ref_digest = state_digest({"model": load_checkpoint(ckpt)["model"]})
    (work / "base").mkdir(parents=True)
    base = _base_files(work / "base", ckpt)
    jobs = []
    for kind, path in base.items():
        data = path.read_bytes()
        suffix = "".join(path.suffixes)
        for i in range(n):
            how = ("flip", "truncate", "insert")[i % 3]
            if kind == "nifti" and how == "insert":
                how = "flip" if i % 2 else "truncate"
            mutated = _mutate_checkpoint(data, rng, how) if kind == "checkpoint" else _mutate(data, rng, how)
            p = work / "fuzz" / kind / f"{i:05d}_{how}{suffix}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(mutated)
            jobs.append((kind, str(p)))
    jobs_file = work / "fuzz" / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    counts = {k: {"ok": 0, "refused": 0, "other_error": 0, "altered": 0, "crashed": 0, "hung": 0} for k in base}
    examples: list[str] = []
    i = 0
    while i < len(jobs):
        proc = subprocess.Popen([sys.executable, __file__, "_load", str(jobs_file), str(i), ref_digest],
                                env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        current, last_news = i, time.monotonic()
        buf = ""
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
                if not chunk:  # the worker died
                    proc.wait()
                    if current < len(jobs):
                        counts[jobs[current][0]]["crashed"] += 1
                        examples.append(f"crashed (exit {proc.returncode}): {jobs[current][1]}")
                    i = current + 1
                    break
                buf += chunk
                *lines, buf = buf.split("\n")
                for line in lines:
                    if line.startswith("START "):
                        current, last_news = int(line[6:]), time.monotonic()
                    elif line.startswith("DONE "):
                        j, outcome, msg = json.loads(line[5:])
                        counts[jobs[j][0]][outcome] += 1
                        if outcome in ("other_error", "altered") and len(examples) < 12:
                            examples.append(f"{outcome}: {jobs[j][1]}: {msg[:200]}")
                        current = j + 1
            elif time.monotonic() - last_news > HANG_S:
                proc.kill()
                proc.wait()
                counts[jobs[current][0]]["hung"] += 1
                examples.append(f"hung: {jobs[current][1]}")
                i = current + 1
                break
        proc.stdout.close()
    return {"counts": counts, "examples": examples}


# ============================================================================ 3. non-finite injection


def nonfinite(work: Path) -> list[dict]:
    import torch

    from probunet.train import trainer as T
    from probunet.models.checkpoint import non_finite
    from probunet.config import ConfigError, load_config
    from probunet.models import prob_unet
    from probunet.train.nonfinite import TrainingError

    def loss_at(steps, value):
        real, calls = prob_unet.elbo_loss, {"n": 0}  # the loss the model's training_loss computes

        def f(*a, **kw):
            out = real(*a, **kw)
            calls["n"] += 1
            if calls["n"] in steps:
                out = {k: v * value if k == "loss" else v for k, v in out.items()}
            return out
        return prob_unet, "elbo_loss", f

    def around_step(steps, action):
        real, calls = T.backward_and_step, {"n": 0}

        def f(loss, optimizer, *a, **kw):
            calls["n"] += 1
            p = optimizer.param_groups[0]["params"][0]
            hook = p.register_hook(lambda g: g * float("nan")) if action == "grad_nan" and calls["n"] in steps else None
            hook = p.register_hook(lambda g: g + float("inf")) if action == "grad_inf" and calls["n"] in steps else hook
            bad = real(loss, optimizer, *a, **kw)
            if hook is not None:
                hook.remove()
            if calls["n"] in steps:
                with torch.no_grad():
                    if action == "weight_nan":
                        p.view(-1)[0] = float("nan")
                    elif action == "weight_inf":
                        p.view(-1)[-1] = float("inf")
                    elif action == "adam_nan":
                        optimizer.state[p]["exp_avg"].view(-1)[0] = float("nan")
            return bad
        return T, "backward_and_step", f  # the step the trainer calls

    cases = [("loss NaN at steps 2, 5", loss_at({2, 5}, float("nan")), [], "completes"),
             ("loss +Inf at step 3", loss_at({3}, float("inf")), [], "completes"),
             ("gradient NaN at step 3", around_step({3}, "grad_nan"), [], "completes"),
             ("gradient Inf at steps 2, 4", around_step({2, 4}, "grad_inf"), [], "completes"),
             ("weight NaN after step 3", around_step({3}, "weight_nan"), [], "stops"),
             ("weight Inf after step 5", around_step({5}, "weight_inf"), ["train.log_every=1000"], "stops"),
             ("Adam state NaN after step 4", around_step({4}, "adam_nan"), ["train.log_every=1000"], "stops"),
             ("train.lr=.inf", None, ["train.lr=.inf"], "stops")]
    rows = []
    for k, (name, patch, extra, expected) in enumerate(cases):
        run_dir = work / f"nf{k}"
        saved = {}
        if patch is not None:
            module, attr, fn = patch
            saved[(module, attr)] = getattr(module, attr)
            setattr(module, attr, fn)
        try:
            cfg = load_config(DEBUG, ["train.steps=6", "train.checkpoint_every=1", "train.val_every=3",
                                      "train.val_cases=2", "train.val_samples=2", "train.log_every=2", *extra])
            T.fit(cfg, run_dir)
            outcome = "completes"
        except (TrainingError, ConfigError) as exc:
            outcome = "stops" if isinstance(exc, TrainingError) else "refused (config)"
        finally:
            for (module, attr), fn in saved.items():
                setattr(module, attr, fn)
        pts = sorted(run_dir.rglob("*.pt")) if run_dir.exists() else []
        bad = [p.name for p in pts if non_finite({s: v for s, v in torch.load(p, weights_only=True).items()
                                                   if s in ("model", "optimizer", "scaler", "geco")})]
        ok = not bad and (outcome == expected or (expected == "stops" and outcome == "refused (config)"))
        rows.append({"injection": name, "expected": expected, "outcome": outcome, "checkpoints": len(pts),
                     "non_finite_checkpoints": len(bad), "ok": ok})
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows


# ============================================================================ 4. hostile inputs


def _cli(args: list[str]) -> tuple[int, str]:
    from probunet.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["--quiet", *args])
    return rc, err.getvalue()


def _one_line(err: str, name: str) -> bool:
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("INFO", "WARNING"))]
    return len(lines) == 1 and "Traceback" not in err and name in lines[0]


def hostile(work: Path, ckpt_run: Path, kill_failures: list[str]) -> list[dict]:
    import logging

    import nibabel as nib
    import numpy as np
    import torch

    from probunet import utils
    from probunet.models.checkpoint import save_checkpoint
    from probunet.utils import FolderLock

    logging.disable(logging.WARNING)
    rows = []

    def add(row, what, expected, passed, got=""):
        rows.append({"row": row, "input": what, "expected": expected, "ok": bool(passed), "got": got[:160]})

    last = ckpt_run / "checkpoints" / "last.pt"
    inp = work / "in"
    inp.mkdir()
    for n in ("c1", "c2"):
        nib.save(nib.Nifti1Image(np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32), np.eye(4)),
                 str(inp / f"{n}.nii.gz"))
    before = sorted(p.name for p in inp.rglob("*"))

    # row 1: a crafted LIDC pickle whose series_uid is an object scalar read from raw bytes (a segfault
    # when built); loaded in a child process, so a crash shows as an exit status, not a dead checker
    class _Dtype:
        def __init__(self, spec, state):
            self.spec, self.state = spec, state

        def __reduce__(self):
            return (np.dtype, (self.spec, False, True), self.state)

    class _Call:
        def __init__(self, fn, *args):
            self.fn, self.args = fn, args

        def __reduce__(self):
            return (self.fn, self.args)

    from numpy._core import multiarray

    crafted = work / "crafted.pickle"
    crafted.write_bytes(pickle.dumps({"LIDC-IDRI-0001_s0": {
        "image": np.zeros((8, 8)), "masks": [np.zeros((8, 8), np.uint8)],
        "series_uid": _Call(multiarray.scalar, _Dtype("O8", (3, "|", None, None, None, -1, -1, 0)), b"AAAAAAAA")}},
        protocol=2))
    proc = subprocess.run([sys.executable, "-m", "probunet", "--quiet", "train", DEBUG, "data.format=lidc_pickle",
                           f"data.path={crafted}", "--out", str(work / "run1"), "--no-progress"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=str(REPO))
    add(1, "lidc_pickle with an O8 numpy scalar built from file bytes", "refused before building, exit 2",
        proc.returncode == 2 and _one_line(proc.stderr, "crafted.pickle"), f"exit {proc.returncode}")

    # rows 5 and 6: out-of-range config values; options after the overrides
    for override, key in (("train.checkpoint_every=0", "train.checkpoint_every"), ("train.device=tpu", "train.device"),
                          ("model.num_classes=1000000", "model.num_classes"), ("model.latent_dim=1e9", "latent_dim")):
        rc, err = _cli(["train", DEBUG, override, "--out", str(work / "run5"), "--no-progress"])
        add(5, f"train {override}", "one-line error naming the key, exit 2, nothing allocated",
            rc == 2 and _one_line(err, key) and not (work / "run5").exists(), err.strip()[:120])
    rc, err = _cli(["train", DEBUG, "--out", str(work / "run6"), "train.steps=2", "train.val_every=1000",
                    "--no-progress"])
    add(6, "train CONFIG --out R train.steps=2 (options before overrides)", "runs, exit 0",
        rc == 0 and (work / "run6" / "checkpoints" / "last.pt").is_file(), f"exit {rc}: {err.strip()[:100]}")

    # row 2: a file list entry escaping OUTPUT_DIR
    fl = work / "list.txt"
    fl.write_text("c1.nii.gz\n../in/c2.nii.gz\n")
    rc, err = _cli(["predict", str(last), str(inp), str(work / "out2"), "--file-list", str(fl), "--num-samples", "2",
                    "--no-progress"])
    summary = (work / "out2" / "summary.csv").read_text() if (work / "out2" / "summary.csv").is_file() else ""
    add(2, "--file-list with ../in/c2.nii.gz", "error row, input folder untouched, exit 1",
        rc == 1 and "outside OUTPUT_DIR" in summary and sorted(p.name for p in inp.rglob("*")) == before, f"exit {rc}")

    # row 3: an infinite learning rate
    out3 = work / "run3"
    rc, err = _cli(["train", DEBUG, "train.lr=.inf", "train.steps=3", "train.val_every=1000", "--out", str(out3),
                    "--no-progress"])
    pts = list(out3.rglob("*.pt")) if out3.exists() else []
    finite = all(all(bool(torch.isfinite(t).all()) for t in torch.load(p, weights_only=True)["model"].values())
                 for p in pts)
    add(3, "train train.lr=.inf train.steps=3", "one-line error, exit != 0, no non-finite checkpoint",
        rc != 0 and _one_line(err, "") and finite, f"exit {rc}: {err.strip()[:120]}")

    # row 4: flipped bytes in a weight and in the optimizer state
    for what, pick in (("weight", lambda s: max(s["model"].values(), key=lambda t: t.numel())),
                       ("optimizer", lambda s: s["optimizer"]["state"][0]["exp_avg_sq"])):
        run4 = work / f"run4_{what}"
        shutil.copytree(ckpt_run, run4)
        p = run4 / "checkpoints" / "last.pt"
        raw = pick(torch.load(p, weights_only=True)).contiguous().numpy().tobytes()
        data = bytearray(p.read_bytes())
        data[data.find(raw) + len(raw) // 2] ^= 0x40
        p.write_bytes(bytes(data))
        (run4 / "checkpoints" / "best.pt").unlink(missing_ok=True)
        rc1, err1 = _cli(["evaluate", str(p)])
        rc2, err2 = _cli(["train", DEBUG, *TRAIN_ARGS[1:], "train.steps=14", "--out", str(run4), "--resume",
                          "--no-progress"])
        add(4, f"one byte flipped in a {what} tensor; evaluate, --resume", "one-line error naming the file, exit 2",
            rc1 == rc2 == 2 and _one_line(err1, "last.pt") and _one_line(err2, "last.pt"), err1.strip()[:120])

    # row 5 (checkpoint parts)
    empty = work / "empty.pt"
    empty.write_bytes(b"")
    rc, err = _cli(["evaluate", str(empty)])
    add(5, "0-byte checkpoint", "one-line error naming the file, exit 2", rc == 2 and _one_line(err, "empty.pt"),
        err.strip()[:120])
    state = torch.load(last, weights_only=True)
    state["config"]["model"]["features"] = [8, 16]
    save_checkpoint(state, work / "mismatch.pt")
    rc, err = _cli(["evaluate", str(work / "mismatch.pt")])
    add(5, "weights that do not match the stored config", "one-line error naming the file, exit 2",
        rc == 2 and _one_line(err, "mismatch.pt"), err.strip()[:120])
    state = torch.load(last, weights_only=True)
    state["config"]["model"]["latent_dim"] = 0
    save_checkpoint(state, work / "absurd.pt")
    rc, err = _cli(["evaluate", str(work / "absurd.pt")])
    add(5, "stored config model.latent_dim=0", "one-line error naming the file, exit 2",
        rc == 2 and _one_line(err, "absurd.pt"), err.strip()[:120])

    # row 7: a second predict on a busy OUTPUT_DIR
    out7 = work / "out7"
    out7.mkdir()
    with FolderLock(out7):
        rc, err = _cli(["predict", str(last), str(inp), str(out7), "--num-samples", "2", "--no-progress"])
    add(7, "predict into an OUTPUT_DIR another run holds", "one-line refusal, exit 2, nothing written",
        rc == 2 and _one_line(err, "in use") and not (out7 / "c1").exists(), err.strip()[:120])

    # row 8: --out a folder of the user's
    own = work / "own"
    own.mkdir()
    (own / "config.yaml").write_text("mine\n")
    (own / "splits.json").write_text("{}")
    rc, err = _cli(["train", DEBUG, "train.steps=1", "--out", str(own), "--no-progress"])
    add(8, "train --out a folder holding the user's config.yaml, splits.json", "one-line refusal, files untouched",
        rc == 2 and _one_line(err, "did not write") and (own / "config.yaml").read_text() == "mine\n"
        and sorted(p.name for p in own.iterdir()) == ["config.yaml", "splits.json"], err.strip()[:120])

    # row 9 (run parts)
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {work / 'owned'}",))

    torch.save({"model": {}, "config": {}, "x": Evil()}, work / "evil.pt")
    rc, err = _cli(["evaluate", str(work / "evil.pt")])
    add(9, "checkpoint whose pickle calls os.system", "refused, nothing run, no weights_only=False advice",
        rc == 2 and _one_line(err, "evil.pt") and "weights_only" not in err and not (work / "owned").exists(),
        err.strip()[:120])
    out9 = work / "out9"
    out9.mkdir()
    real_mkstemp = utils.tempfile.mkstemp

    def refuse(*a, dir=None, **kw):  # a read-only folder, also for root
        if dir is not None and Path(dir) == out9:
            raise PermissionError(13, "Permission denied", str(out9))
        return real_mkstemp(*a, dir=dir, **kw)

    utils.tempfile.mkstemp = refuse
    try:
        t0 = time.perf_counter()
        rc, err = _cli(["predict", str(last), str(inp), str(out9), "--num-samples", "2", "--no-progress"])
    finally:
        utils.tempfile.mkstemp = real_mkstemp
    add(9, "read-only OUTPUT_DIR", "refused before the model is loaded, exit 2",
        rc == 2 and _one_line(err, "cannot write") and not (out9 / "c1").exists(),
        f"{err.strip()[:100]} ({time.perf_counter() - t0:.2f}s)")
    add(9, "--resume after a kill: metrics.jsonl rows, stale .tmp files", "no duplicate rows, temps removed",
        not any("metrics" in x or "temporary" in x for x in kill_failures), "checked after every kill (part 1)")
    logging.disable(logging.NOTSET)
    return rows


# ============================================================================ 5. full disk (issue 30)


def _fill(disk: Path, leave: int) -> None:
    free = shutil.disk_usage(disk).free
    with open(disk / f"filler{len(list(disk.glob('filler*')))}", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def _empty(disk: Path) -> None:
    for p in disk.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def full_disk(work: Path, ckpt_run: Path) -> tuple[list[dict], str]:
    """train, predict and evaluate on a full 2 MB tmpfs and into a read-only one; each must end with one
    line naming the path and the cause (exit 2), no traceback, the last good checkpoint kept. Where no
    tmpfs can be mounted (not root), the full disk is simulated by making every rename fail with ENOSPC."""
    import errno
    import logging

    import nibabel as nib
    import numpy as np

    from probunet.train import trainer as train_mod
    from probunet import utils
    from probunet.models.checkpoint import load_checkpoint

    logging.disable(logging.WARNING)
    rows = []

    def add(what, expected, passed, got=""):
        rows.append({"input": what, "expected": expected, "ok": bool(passed), "got": got[:160]})

    last = ckpt_run / "checkpoints" / "last.pt"
    inp = work / "in"
    inp.mkdir(parents=True)
    for n in ("c1", "c2"):
        nib.save(nib.Nifti1Image(np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32), np.eye(4)),
                 str(inp / f"{n}.nii.gz"))
    disk, ro = work / "disk", work / "ro"
    mounted = mount_tmpfs(disk, "size=2m")
    how = "2 MB tmpfs" if mounted else "simulated ENOSPC: no tmpfs can be mounted here"
    real_replace, real_save = utils.os.replace, train_mod.save_checkpoint

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        if mounted:
            _fill(disk, 100 << 10)
        else:
            utils.os.replace = no_space
        rc, err = _cli(["train", DEBUG, "--out", str(disk / "run"), *TRAIN_ARGS[:1], "--no-progress"])
        add(f"train on a full disk ({how})", "one line, exit 2, no checkpoint",
            rc == 2 and _one_line(err, "no space left on device")
            and not (disk / "run" / "checkpoints" / "last.pt").exists(), err.strip())
        if mounted:
            _empty(disk)
            calls = []

            def save_then_fill(state, path):
                calls.append(path)
                if len(calls) == 2:
                    _fill(disk, 0)
                return real_save(state, path)

            train_mod.save_checkpoint = save_then_fill
            rc, err = _cli(["train", DEBUG, "--out", str(disk / "run"), "train.steps=4", "train.checkpoint_every=1",
                            "train.val_every=100", "--no-progress"])
            train_mod.save_checkpoint = real_save
            kept = load_checkpoint(disk / "run" / "checkpoints" / "last.pt")["step"] == 1
            add("disk full after the first checkpoint (2 MB tmpfs)", "one line, exit 2, step 1 kept",
                rc == 2 and _one_line(err, "no space left on device") and kept, err.strip())
            _empty(disk)
            _fill(disk, 8 << 10)
        rc, err = _cli(["predict", str(last), str(inp), str(disk / "pred"), "--num-samples", "2", "--no-progress"])
        lines = [l for l in err.splitlines() if l.startswith("probunet predict: error:")]
        add(f"predict onto a full disk ({how})", "cases fail as rows; one error line, exit 2",
            rc == 2 and len(lines) == 1 and "no space left on device" in lines[0] and "Traceback" not in err,
            err.strip().splitlines()[-1] if err.strip() else "")
        if mounted:
            _empty(disk)
            _fill(disk, 16 << 10)
        rc, err = _cli(["evaluate", str(ckpt_run), "--num-samples", "2", "--out", str(disk / "ev") + "/",
                        "--no-progress"])
        add(f"evaluate onto a full disk ({how})", "one line, exit 2",
            rc == 2 and _one_line(err, "no space left on device"), err.strip())
    except Exception as exc:  # a crash of the checker's own run: counted as a failure
        add(f"full disk ({how})", "no exception", False, f"{exc.__class__.__name__}: {exc}")
    finally:
        utils.os.replace, train_mod.save_checkpoint = real_replace, real_save
        if mounted:
            umount(disk)
    ro_ok = mount_tmpfs(ro, "ro,size=1m")
    if ro_ok:
        try:
            for cmd in (["train", DEBUG, "--out", str(ro / "run"), "--no-progress"],
                        ["evaluate", str(ckpt_run), "--out", str(ro / "ev") + "/", "--no-progress"]):
                t0 = time.perf_counter()
                rc, err = _cli(cmd)
                add(f"{cmd[0]} into a read-only --out (read-only tmpfs)", "one line before the work, exit 2",
                    rc == 2 and _one_line(err, "read-only file system"),
                    f"{err.strip()} ({time.perf_counter() - t0:.1f}s)")
        finally:
            umount(ro)
    else:
        rows.append({"input": "train / evaluate into a read-only --out", "expected": "not run: no read-only tmpfs "
                     "can be mounted here", "ok": True, "skip": True, "got": ""})
    logging.disable(logging.NOTSET)
    return rows, how


# ============================================================================ 6. changed data (issue 30)


def changed_data(work: Path) -> list[dict]:
    """A run trained on 24 cases of a folder; then 16 cases are added and one removed. Evaluate and
    --resume must keep the run's split (never re-split), report new cases in one line and refuse
    missing ones by name; --resume never rewrites splits.json."""
    import csv as _csv
    import logging

    from probunet.data import synthetic

    logging.disable(logging.NOTSET)
    rows = []

    def add(what, expected, passed, got=""):
        rows.append({"input": what, "expected": expected, "ok": bool(passed), "got": got[:160]})

    class Said(logging.Handler):  # the warnings of each command, as the user sees them
        lines: list = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    said_handler = Said(logging.WARNING)
    logging.getLogger("probunet").addHandler(said_handler)
    full, data, run = work / "full", work / "data", work / "run"
    synthetic.write_qubiq(synthetic.generate(num_cases=40, size=32), full)
    shutil.copytree(full, data)
    later = sorted(p.name for p in data.iterdir() if p.is_dir())[24:]
    for name in later:
        shutil.rmtree(data / name)
    args = [f"data.path={data}", "train.steps=2", "train.val_every=2", "train.val_cases=2", "train.val_samples=2"]
    try:
        rc, err = _cli(["train", DEBUG, *args, "--out", str(run), "--no-progress"])
        record = json.loads((run / "splits.json").read_text())
        test_ids = sorted(e["case_id"] for e in record["test"])
        before = (run / "splits.json").read_bytes()
        for name in later:
            shutil.copytree(full / name, data / name)

        def evaluated(out):
            with open(out / "per_case.csv", newline="") as fh:
                return sorted(r["case_id"] for r in _csv.DictReader(fh))

        Said.lines.clear()
        rc, err = _cli(["evaluate", str(run), "--num-samples", "2", "--out", str(work / "ev") + "/", "--no-progress"])
        said = [l for l in Said.lines if "new since the run's split was fixed" in l]
        add("16 cases added, then evaluate RUN", "the run's test cases only; one line on the new ones",
            rc == 0 and evaluated(work / "ev") == test_ids and len(said) == 1, said[0] if said else err.strip())
        rc, err = _cli(["evaluate", str(run), "--num-samples", "2", "--include-new-cases", "--out",
                        str(work / "ev_new") + "/", "--no-progress"])
        add("... evaluate RUN --include-new-cases", "the test cases and the 16 new ones",
            rc == 0 and evaluated(work / "ev_new") == sorted(test_ids + later), err.strip()[-160:])
        rc, err = _cli(["train", str(run / "config.yaml"), "--out", str(run), "--resume", "train.steps=3",
                        "--no-progress"])
        add("... train --resume", "splits.json unchanged, training on the recorded cases",
            rc == 0 and (run / "splits.json").read_bytes() == before, err.strip()[-160:])
        rc, err = _cli(["evaluate", str(run), "data.split.seed=9", "--out", str(work / "ev2") + "/", "--no-progress"])
        add("... evaluate with data.split.seed changed", "refused: the split is fixed, exit 2",
            rc == 2 and _one_line(err, "data.split.seed"), err.strip())
        gone = record["train"][0]["case_id"]
        shutil.rmtree(data / gone)
        rc, err = _cli(["evaluate", str(run), "--num-samples", "2", "--out", str(work / "ev3") + "/", "--no-progress"])
        add("a training case removed, then evaluate RUN", "one line naming the case, exit 2",
            rc == 2 and _one_line(err, gone), err.strip())
        rc, err = _cli(["train", str(run / "config.yaml"), "--out", str(run), "--resume", "train.steps=4",
                        "--no-progress"])
        add("... train --resume", "one line naming the case, exit 2", rc == 2 and _one_line(err, gone), err.strip())
    except Exception as exc:
        add("changed data", "no exception", False, f"{exc.__class__.__name__}: {exc}")
    finally:
        logging.getLogger("probunet").removeHandler(said_handler)
    return rows


def _family_lines(title: str, rows: list[dict], seconds: float) -> tuple[list[str], bool]:
    """The report lines of one family of checks and whether all passed."""
    out = [f"{title} ({seconds:.0f}s)"]
    ok = True
    for r in rows:
        ok &= r["ok"]
        mark = "SKIP" if r.get("skip") else "PASS" if r["ok"] else "FAIL"
        out.append(f"   {r['input']:<62} -> {r['expected']}  [{mark}]")
        if not r["ok"]:
            out.append(f"       got: {r['got']}")
    return out, ok


# ============================================================================ 7. hostile files (issue 30)
#
# Four families, each probe in its own process with a time limit (a hang is reported as "hung",
# never a stuck checker) and its peak memory measured: shared-reference and oversized structures
# in pickles and checkpoints; headers claiming huge images; FIFOs and special files; YAML bombs.

PROBE_TIMEOUT_S = 120.0



def _probe(args: list[str], timeout: float = PROBE_TIMEOUT_S, stdin=None) -> dict:
    """``probunet ARGS`` in a child process: exit status, stderr lines, seconds, peak MB, or hung."""
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE_RUNNER, "--quiet", *args], env=_env(), cwd=REPO,
                              capture_output=True, timeout=timeout, stdin=stdin)
    except subprocess.TimeoutExpired:
        return {"rc": None, "hung": True, "err": "", "out": "", "seconds": time.perf_counter() - t, "mb": 0,
                "work": float("nan")}
    out, mb, work = probe_output(proc.stdout.decode("utf-8", "replace"))
    return {"rc": proc.returncode, "hung": False, "err": proc.stderr.decode("utf-8", "replace"),
            "out": out, "seconds": time.perf_counter() - t, "mb": mb, "work": work}


def _file_row(rows: list, family: str, what: str, expected: str, r: dict, ok: bool) -> None:
    if r["hung"]:
        outcome = "hung"
    elif r["rc"] not in (0, 1, 2):
        outcome = f"crashed (exit {r['rc']})"
    else:
        outcome = f"exit {r['rc']}"
    lines = [l for l in r["err"].splitlines() if l.strip() and not l.startswith(("INFO", "WARNING", "ERROR"))]
    rows.append({"family": family, "input": what, "expected": expected, "outcome": outcome,
                 "seconds": r["seconds"], "work": r["work"], "mb": r["mb"], "ok": bool(ok) and not r["hung"],
                 "got": (lines[0] if lines else r["err"].strip()[-200:])[:200]})


def _refused(r: dict, name: str, rc: int = 2) -> bool:
    """Exit ``rc`` with one line on stderr (besides log lines) naming ``name``, no traceback."""
    return not r["hung"] and r["rc"] == rc and _one_line(
        "\n".join(l for l in r["err"].splitlines() if not l.startswith("ERROR")), name)


def _summary_rows(out: Path) -> dict:
    import csv as _csv

    p = out / "summary.csv"
    if not p.is_file():
        return {}
    with open(p, newline="", encoding="utf-8") as fh:
        return {r["case"]: r for r in _csv.DictReader(fh)}


def _shared_list(levels: int = 8, width: int = 10):
    x = []
    for _ in range(levels):
        x = [x] * width
    return x


def files_structures(work: Path, last: Path, quick: bool = False) -> list[dict]:
    """Shared-reference and oversized structures in checkpoints and LIDC pickles."""
    import numpy as np
    import torch

    from probunet.models.checkpoint import save_checkpoint

    rows, fam = [], "structures"
    work.mkdir(parents=True, exist_ok=True)
    state = torch.load(last, weights_only=True)
    cases = {
        "shared.pt": ("checkpoint with x=[x]*10 nested 8 times (150 KB, 1e8 entries unfolded)",
                      lambda s: s.update(extra=_shared_list())),
        "selfref.pt": ("checkpoint with a list that contains itself", None),
        "expanded.pt": ("checkpoint with a stride-0 tensor of 2e9 floats over one stored float",
                        lambda s: s.update(extra=torch.zeros(1).expand(200_000, 10_000))),
    }
    for name, (what, change) in list(cases.items())[:1 if quick else None]:
        s = torch.load(last, weights_only=True)
        if change is None:
            loop: list = []
            loop.append(loop)
            s["extra"] = loop
        else:
            change(s)
        torch.save(s, work / name)
        r = _probe(["evaluate", str(work / name)])
        _file_row(rows, fam, what, "refused, one line, exit 2, < 5 s of work", r, _refused(r, name) and r["work"] < 5)
    if quick:
        return rows
    big = dict(state)
    big["config"] = json.loads(json.dumps(state["config"]))
    big["config"]["model"]["features"] = [4096]
    save_checkpoint(big, work / "claims.pt")
    r = _probe(["evaluate", str(work / "claims.pt")])
    _file_row(rows, fam, "checkpoint (valid digest) whose config says features=[4096]",
              "refused before building (no 3.7 GB model), exit 2", r,
              _refused(r, "claims.pt") and "nothing was built" in r["err"] and r["mb"] < 2500)

    m = np.zeros((8, 8), np.uint8)
    for name, what, entry in (
            ("uid.pickle", "LIDC pickle whose series_uid is x=[x]*10 nested 8 times", {"series_uid": _shared_list()}),
            ("masks.pickle", "LIDC pickle with masks=[m]*300000", {"masks": [m] * 300000})):
        base = {"image": np.zeros((8, 8)), "masks": [m], "series_uid": "1.2.3"}
        base.update(entry)
        (work / name).write_bytes(pickle.dumps({"LIDC-IDRI-0001_s0": base}, protocol=4))
        r = _probe(["train", DEBUG, "data.format=lidc_pickle", f"data.path={work / name}", "--out",
                    str(work / f"run_{name}"), "--no-progress"])
        _file_row(rows, fam, what, "refused before converting, one line, exit 2", r,
                  _refused(r, name) and not (work / f"run_{name}" / "checkpoints").exists())
    return rows


def _png_20000(path: Path) -> None:
    """A real 20000 x 20000 grey PNG of zeros (~390 KB): its header claims 400 million pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row, parts = zlib.compressobj(9), b"\0" * 20001, []
    for _ in range(20000):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))


def files_headers(work: Path, last: Path, quick: bool = False) -> list[dict]:
    """Headers that claim huge images: checked against data.max_voxels before reading."""
    import gzip

    import nibabel as nib
    import numpy as np

    rows, fam = [], "headers"
    inp = work / "in"
    inp.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32), np.eye(4)),
             str(inp / "good.nii.gz"))
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((32767, 32767))
    hdr.set_data_dtype(np.float32)
    (inp / "claims.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))
    _png_20000(inp / "huge.png")
    (inp / "zero.mhd").write_text("ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_UCHAR\n"
                                  "ElementDataFile = /dev/zero\n")
    (inp / "wide.raw").write_bytes(bytes(64))
    (inp / "wide.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\n"
                                  "ElementType = MET_FLOAT\nElementDataFile = wide.raw\n")
    out = work / "out"
    r = _probe(["predict", str(last), str(inp), str(out), "--num-samples", "2", "--no-progress",
                "--allow-external-data-files"])
    rows_ = _summary_rows(out)
    sizes = {"claims": inp / "claims.nii.gz", "huge": inp / "huge.png", "zero": inp / "zero.mhd",
             "wide": inp / "wide.mhd"}
    labels = {"claims": ".nii.gz header claiming 32767x32767", "huge": "PNG 20000x20000",
              "zero": ".mhd whose data file is /dev/zero (external files allowed)",
              "wide": ".mhd claiming 1e15 voxels over a 64-byte raw file"}
    for case, what in labels.items():
        row = rows_.get(case, {})
        need = "a character device" if case == "zero" else "data.max_voxels"
        what = f"{what} ({sizes[case].stat().st_size:,} B)"
        _file_row(rows, fam, what, "error row naming the file; others written; peak < 2.5 GB", r,
                  row.get("status") == "error" and need in row.get("error", "")
                  and rows_.get("good", {}).get("status") == "ok" and r["rc"] == 1 and r["mb"] < 2500)
    return rows


def files_special(work: Path, last: Path, quick: bool = False) -> list[dict]:
    """FIFOs, devices, /proc files, data files outside the scan's folder."""
    import nibabel as nib
    import numpy as np

    rows, fam = [], "special files"
    inp = work / "in"
    (inp / "sub").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32), np.eye(4)),
             str(inp / "good.nii.gz"))
    os.mkfifo(inp / "pipe.nii.gz")
    (work / "secret.bin").write_bytes(bytes(16))
    (inp / "sub" / "evil.mhd").write_text("ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_UCHAR\n"
                                          f"ElementDataFile = ../../secret.bin\n")
    os.mkfifo(inp / "sub" / "fifo.raw")
    (inp / "sub" / "tofifo.mhd").write_text("ObjectType = Image\nNDims = 2\nDimSize = 4 4\n"
                                            "ElementType = MET_UCHAR\nElementDataFile = fifo.raw\n")
    out = work / "out"
    r = _probe(["predict", str(last), str(inp), str(out), "--num-samples", "2", "--recursive", "--no-progress"])
    rows_ = _summary_rows(out)
    for case, what, need in (("pipe", "a FIFO named pipe.nii.gz in INPUT_DIR", "a FIFO"),
                             ("sub/evil", ".mhd whose data file is ../../secret.bin", "outside the header's folder"),
                             ("sub/tofifo", ".mhd whose data file is a FIFO", "a FIFO")):
        row = rows_.get(case, {})
        _file_row(rows, fam, what, "error row, never opened; the others and summary.csv written", r,
                  row.get("status") == "error" and need in row.get("error", "")
                  and rows_.get("good", {}).get("status") == "ok")
    if quick:
        return rows
    fl = work / "list.txt"
    fl.write_text("good.nii.gz\n/proc/self/mem\n/dev/zero\n")
    out = work / "out_list"
    r = _probe(["predict", str(last), str(inp), str(out), "--file-list", str(fl), "--num-samples", "2",
                "--no-progress"])
    rows_ = _summary_rows(out)
    _file_row(rows, fam, "--file-list naming /proc/self/mem and /dev/zero", "error rows, others written, exit 1",
              r, r["rc"] == 1 and "special system file" in rows_.get("mem", {}).get("error", "")
              and "character device" in rows_.get("zero", {}).get("error", "")
              and rows_.get("good", {}).get("status") == "ok")
    os.mkfifo(work / "list.fifo")
    r = _probe(["predict", str(last), str(inp), str(work / "out_fifo"), "--file-list", str(work / "list.fifo"),
                "--no-progress"])
    _file_row(rows, fam, "--file-list is a FIFO", "refused, one line, exit 2", r, _refused(r, "list.fifo"))
    fl.write_bytes(b"good.nii.gz\nba\x00d.nii.gz\n")
    r = _probe(["predict", str(last), str(inp), str(work / "out_nul"), "--file-list", str(fl), "--no-progress"])
    _file_row(rows, fam, "--file-list with a NUL byte on line 2", "refused naming file and line, exit 2", r,
              _refused(r, "list.txt, line 2"))
    os.mkfifo(work / "config.fifo")
    r = _probe(["train", str(work / "config.fifo"), "--out", str(work / "run_fifo"), "--no-progress"])
    _file_row(rows, fam, "train CONFIG where CONFIG is a FIFO", "refused, one line, exit 2", r,
              _refused(r, "config.fifo"))
    for target in ("/dev/zero", "/proc/self/mem"):
        r = _probe(["evaluate", target])
        _file_row(rows, fam, f"evaluate {target} (as a checkpoint)", "refused, one line, exit 2", r,
                  _refused(r, target))
    return rows


def files_yaml(work: Path, last: Path, quick: bool = False) -> list[dict]:
    """YAML bombs and other hostile configs."""
    rows, fam = [], "YAML"
    work.mkdir(parents=True, exist_ok=True)
    names = "abcdefghi"
    bomb = "".join(f"{a}: &{a} [{', '.join([('*' + names[i - 1]) if i else 'lol'] * 9)}]\n"
                   for i, a in enumerate(names)) + "train:\n  steps: *i\n"
    (work / "bomb.yaml").write_text(bomb)
    r = _probe(["train", str(work / "bomb.yaml"), "--out", str(work / "run_bomb"), "--no-progress"])
    _file_row(rows, fam, f"billion-laughs alias chain as train.steps ({len(bomb)} B, 9**9 items)",
              "refused naming the file, exit 2, no run folder", r,
              _refused(r, "bomb.yaml") and not (work / "run_bomb").exists())
    if quick:
        return rows
    r = _probe(["train", DEBUG, "train.steps=[*a]", "--out", str(work / "run_alias"), "--no-progress"])
    _file_row(rows, fam, "an alias in an override value", "refused naming the override, exit 2", r,
              _refused(r, "train.steps"))
    (work / "dup.yaml").write_text("train:\n  steps: 3\n  steps: 5\n")
    r = _probe(["train", str(work / "dup.yaml"), "--out", str(work / "run_dup"), "--no-progress"])
    _file_row(rows, fam, "a duplicate key train.steps", "refused naming the key, exit 2", r,
              _refused(r, "train.steps"))
    (work / "huge.yaml").write_text("train:\n  steps: 3\n" + "# padding\n" * 200_000)
    r = _probe(["train", str(work / "huge.yaml"), "--out", str(work / "run_huge"), "--no-progress"])
    _file_row(rows, fam, "a 2 MB config file", "refused naming the file, exit 2", r, _refused(r, "huge.yaml"))
    for override, key in (("train.batch_size=1e21", "train.batch_size"), ("train.seed=1e30", "train.seed"),
                          ("data.split.protocol=" + "x" * 100_000, "data.split.protocol")):
        r = _probe(["train", DEBUG, override, "--out", str(work / "run_range"), "--no-progress"])
        shown = override if len(override) < 40 else override[:30] + "... (100 kB)"
        _file_row(rows, fam, shown, "one short line naming the key, exit 2", r,
                  _refused(r, key) and len(r["err"]) < 500)
    return rows


FILE_FAMILIES = (("shared-reference and oversized structures", files_structures),
                 ("size-claiming headers", files_headers), ("FIFOs and special files", files_special),
                 ("YAML bombs", files_yaml))


def hostile_files(work: Path, last: Path, quick: bool = False) -> list[dict]:
    """Every probe of the four families (``quick``: one process per family)."""
    rows = []
    for i, (_, fn) in enumerate(FILE_FAMILIES):
        rows += fn(work / f"family{i}", last, quick)
    return rows


def format_files(rows: list[dict], seconds: float, quick: bool = False) -> tuple[list[str], bool]:
    out = [f"7. hostile files, each probe in its own process, {PROBE_TIMEOUT_S:.0f} s limit ({seconds:.0f}s"
           + (", --quick: one process per family)" if quick else ")"),
           "   (s: the whole process, with ~20 s of imports on a busy machine; work s: the command after its "
           "imports)",
           f"   {'family':<15}{'input':<72}{'outcome':<9}{'s':>6}{'work s':>8}{'peak MB':>9}"]
    ok = True
    for r in rows:
        ok &= r["ok"]
        out.append(f"   {r['family']:<15}{r['input'][:71]:<72}{r['outcome']:<9}{r['seconds']:>6.1f}{r['work']:>8.2f}"
                   f"{r['mb']:>9}  "
                   f"[{'PASS' if r['ok'] else 'FAIL'}]")
        if not r["ok"]:
            out.append(f"       expected: {r['expected']}; got: {r['got']}")
    hung = sum(r["outcome"] == "hung" or r["outcome"].startswith("crashed") for r in rows)
    out.append(f"   crashed or hung: {hung}  [{'PASS' if hung == 0 else 'FAIL'}]")
    return out, ok and hung == 0


# ============================================================================ main


def _main_files(argv: list[str]) -> int:
    """``fault_check.py files [CHECKPOINT]``: part 5 alone (a 2-step debug run is trained when no
    checkpoint is given)."""
    work = Path(tempfile.mkdtemp(prefix="probunet-fault-files-"))
    try:
        if argv:
            last = Path(argv[0])
        else:
            proc = _run([sys.executable, "-m", "probunet", "--quiet", "train", DEBUG, "train.steps=2",
                         "train.val_every=1000", "--out", str(work / "ref"), "--no-progress"])
            if proc.returncode != 0:
                print(proc.stderr[-2000:])
                return 1
            last = work / "ref" / "checkpoints" / "last.pt"
        t = time.perf_counter()
        rows = hostile_files(work / "files", last)
        lines, ok = format_files(rows, time.perf_counter() - t)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_train":
        return _worker_train(argv[1:])
    if argv and argv[0] == "_load":
        return _worker_load(argv[1:])
    if argv and argv[0] == "files":
        return _main_files(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=None, help="training runs to kill (default 20; --quick 1)")
    p.add_argument("--fuzz", type=int, default=None, help="mutated files per kind (default 1000; --quick 20)")
    p.add_argument("--quick", action="store_true", help="small sizes, for the test suite")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    n_kills = args.kills if args.kills is not None else (1 if args.quick else 20)
    n_fuzz = args.fuzz if args.fuzz is not None else (20 if args.quick else 1000)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="probunet-fault-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        t = time.perf_counter()
        k = kills(n_kills, work / "kills", rng)
        t_kill = time.perf_counter() - t
        ckpt_run = work / "kills" / "ref"
        t = time.perf_counter()
        f = fuzz(n_fuzz, work / "fuzz", ckpt_run / "checkpoints" / "last.pt", rng)
        t_fuzz = time.perf_counter() - t
        t = time.perf_counter()
        nf = nonfinite(work / "nonfinite")
        t_nf = time.perf_counter() - t
        t = time.perf_counter()
        (work / "hostile").mkdir(exist_ok=True)
        h = hostile(work / "hostile", ckpt_run, k["failures"])
        t_h = time.perf_counter() - t
        t = time.perf_counter()
        disk_rows, disk_how = full_disk(work / "disk", ckpt_run)
        t_disk = time.perf_counter() - t
        t = time.perf_counter()
        data_rows = changed_data(work / "changed")
        t_data = time.perf_counter() - t
        t = time.perf_counter()
        hf = hostile_files(work / "files", ckpt_run / "checkpoints" / "last.pt", quick=args.quick)
        t_hf = time.perf_counter() - t
        family_rows = {}
        for name, _ in FAMILIES:  # parts 8 on: scripts/_faults_<name>.py, run(work, ckpt_run, quick) -> rows
            t = time.perf_counter()
            rows = __import__(f"_faults_{name}").run(work / name, ckpt_run, args.quick)
            family_rows[name] = (rows, time.perf_counter() - t)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    ok = True
    out = ["", "probunet fault_check" + (" (--quick)" if args.quick else "") + f", seed {args.seed}", ""]
    out.append(f"1. kill -9 and resume ({t_kill:.0f}s; uninterrupted run {k['ref_seconds']:.1f}s)")
    kill_ok = k["survived"] == k["tried"] and k["unloadable"] == 0
    ok &= kill_ok
    out.append(f"   kills survived / tried: {k['survived']} / {k['tried']}  ({k['during_write']} killed during a "
               f"checkpoint write); checkpoints after a kill that load: "
               f"{k['checkpoints_checked'] - k['unloadable']} / {k['checkpoints_checked']}  "
               f"[{'PASS' if kill_ok else 'FAIL'}]")
    out += [f"     {x}" for x in k["failures"]]
    out.append(f"2. fuzzed files ({t_fuzz:.0f}s)")
    out.append(f"   {'kind':<11}{'files':>7}{'loaded':>8}{'refused (one line)':>20}{'other error':>13}"
               f"{'loaded altered':>16}{'crashed':>9}{'hung':>6}")
    for kind, c in f["counts"].items():
        total = sum(c.values())
        out.append(f"   {kind:<11}{total:>7}{c['ok']:>8}{c['refused']:>20}{c['other_error']:>13}{c['altered']:>16}"
                   f"{c['crashed']:>9}{c['hung']:>6}")
        ok &= c["crashed"] == 0 and c["hung"] == 0 and c["altered"] == 0
    crashes = sum(c["crashed"] + c["hung"] for c in f["counts"].values())
    out.append(f"   crashed or hung: {crashes}  [{'PASS' if crashes == 0 else 'FAIL'}]")
    out += [f"     {x}" for x in f["examples"][:12]]
    out.append(f"3. non-finite injection ({t_nf:.0f}s)")
    out.append(f"   {'injection':<30}{'expected':<11}{'outcome':<18}{'checkpoints':>12}{'non-finite':>11}")
    for r in nf:
        ok &= r["ok"]
        out.append(f"   {r['injection']:<30}{r['expected']:<11}{r['outcome']:<18}{r['checkpoints']:>12}"
                   f"{r['non_finite_checkpoints']:>11}  [{'PASS' if r['ok'] else 'FAIL'}]")
    bad_ckpts = sum(r["non_finite_checkpoints"] for r in nf)
    out.append(f"   checkpoints with a non-finite tensor: {bad_ckpts}")
    out.append(f"4. hostile inputs ({t_h:.0f}s)")
    for r in h:
        ok &= r["ok"]
        out.append(f"   row {r['row']}: {r['input']:<60} -> {r['expected']}  [{'PASS' if r['ok'] else 'FAIL'}]")
        if not r["ok"]:
            out.append(f"       got: {r['got']}")
    for title, rows, seconds in ((f"5. full and read-only disks ({disk_how})", disk_rows, t_disk),
                                 ("6. data changed between train and evaluate", data_rows, t_data)):
        lines, passed = _family_lines(title, rows, seconds)
        out += lines
        ok &= passed
    lines, files_ok = format_files(hf, t_hf, args.quick)
    out += lines
    ok &= files_ok
    for name, title in FAMILIES:
        lines, passed = _family_lines(title, *family_rows[name])
        out += lines
        ok &= passed
    out.append("")
    out.append(f"total {time.perf_counter() - t_all:.0f}s: {'ALL PASS' if ok else 'FAILURES'}")
    print("\n".join(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
