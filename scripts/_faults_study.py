"""fault_check family ``study``: ``probunet study`` and ``evaluate`` never score the wrong cases or a
stale model, and the study never replaces a file it did not write.

Each probe is a ``python -m probunet`` command in its own process:

- a run trained on 24 cases of a folder, then 16 cases added: ``study RUN`` scores the run's
  recorded test split (never a re-split);
- the grown folder copied elsewhere: ``evaluate RUN data.path=COPY`` keeps the recorded split (the
  data is recognised by its case ids, not by its path);
- a user's ``study.csv`` in ``--out``, and ``--out`` a run's evaluation folder: refused in one line
  naming the file, which is left as it was;
- a config studied with ``--steps 1``, then again with ``--steps 2``: refused in one line naming the
  change and ``--retrain`` (never the old model's numbers under the new settings); without
  ``quick`` also ``--retrain``, which trains and scores the 2-step model.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, repo_env

DEBUG = str(REPO / "configs" / "debug.yaml")
FAST = ["train.steps=2", "train.val_every=2", "train.val_cases=2", "train.val_samples=2", "train.device=cpu"]
STUDY = ["--num-samples", "2", "--device", "cpu", "--no-progress"]
TIMEOUT_S = 300


def _probunet(*args: str) -> tuple[int, str]:
    """``python -m probunet --quiet ARGS``: exit status and stderr (a hang is exit None)."""
    env = repo_env(pythonpath=True, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        p = subprocess.run([sys.executable, "-m", "probunet", "--quiet", *args], env=env, cwd=str(REPO),
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, "hung"
    return p.returncode, p.stderr


def _one_line(rc, err: str, *needles: str) -> bool:
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("INFO", "WARNING"))]
    return rc == 2 and "Traceback" not in err and len(lines) == 1 and all(n in lines[0] for n in needles)


def _last(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def _studied(out: Path, model: str) -> list[str]:
    study = json.loads((out / "study.json").read_text())
    return sorted(k.split("/", 2)[2] for k in study["cases"] if k.startswith(f"{model}/test/"))


def run(work: Path, ckpt_run: Path, quick: bool) -> list[dict]:
    from probunet.data import synthetic

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def add(what, expected, passed, got=""):
        rows.append({"input": what, "expected": expected, "ok": bool(passed), "got": str(got)[:200]})

    # rows 1 and 5: a run of 24 cases whose folder gains 16
    full, data, run_dir = work / "full", work / "data", work / "run"
    synthetic.write_qubiq(synthetic.generate(num_cases=40, size=32), full)
    shutil.copytree(full, data)
    later = sorted(p.name for p in data.iterdir() if p.is_dir())[24:]
    for name in later:
        shutil.rmtree(data / name)
    rc, err = _probunet("train", DEBUG, f"data.path={data}", *FAST, "--out", str(run_dir), "--no-progress")
    if rc != 0:
        add("train a run on 24 cases of a folder", "exit 0", False, _last(err))
        return rows
    test_ids = sorted(e["case_id"] for e in json.loads((run_dir / "splits.json").read_text())["test"])
    for name in later:
        shutil.copytree(full / name, data / name)
    rc, err = _probunet("study", str(run_dir), "--out", str(work / "s1"), *STUDY)
    got = _studied(work / "s1", "run") if rc == 0 else _last(err)
    add("16 cases added, then study RUN", "the run's recorded test cases only",
        rc == 0 and got == test_ids and "16 case(s)" in err, got)

    moved = work / "moved"
    shutil.copytree(data, moved)
    ev = work / "ev"
    rc, err = _probunet("evaluate", str(run_dir), f"data.path={moved}", "--num-samples", "2", "--device", "cpu",
                        "--no-progress", "--out", str(ev) + "/")
    got = _last(err)
    if rc == 0:
        with open(ev / "per_case.csv", newline="") as fh:
            got = sorted(r["case_id"] for r in csv.DictReader(fh))
    add("evaluate RUN data.path=MOVED (moved and grown)", "the recorded test cases; one line on the new ones",
        rc == 0 and got == test_ids and "16 case(s)" in err, got)

    # row 2: files the study did not write
    user = work / "s2"
    user.mkdir()
    (user / "study.csv").write_text("the user's own\n")
    rc, err = _probunet("study", str(ckpt_run), "--out", str(user), *STUDY)
    add("a user's study.csv in study --out", "refused naming study.csv, exit 2; file kept",
        _one_line(rc, err, "study.csv", "refusing") and (user / "study.csv").read_text() == "the user's own\n"
        and not (user / "study.json").exists(), _last(err))
    if ev.is_dir():
        before = (ev / "reliability.png").read_bytes()
        rc, err = _probunet("study", str(run_dir), "--out", str(ev), *STUDY)
        add("study --out RUN's evaluation folder", "refused naming reliability.png, exit 2; file kept",
            _one_line(rc, err, "reliability.png") and (ev / "reliability.png").read_bytes() == before, _last(err))

    # row 3: another --steps never scores the old model
    s3 = work / "s3"
    rc, err = _probunet("study", DEBUG, "--out", str(s3), "--steps", "1", *STUDY)
    if rc != 0:
        add("study CONFIG --steps 1", "exit 0", False, _last(err))
        return rows
    first = (s3 / "study.json").read_bytes()
    rc, err = _probunet("study", DEBUG, "--out", str(s3), "--steps", "2", *STUDY)
    add("... the same --out with --steps 2", "refused naming train.steps and --retrain, exit 2",
        _one_line(rc, err, "train.steps 1 -> 2", "--retrain") and (s3 / "study.json").read_bytes() == first,
        _last(err))
    if not quick:
        rc, err = _probunet("study", DEBUG, "--out", str(s3), "--steps", "2", "--retrain", *STUDY)
        steps = json.loads((s3 / "study.json").read_text())["settings"]["steps"] if rc == 0 else None
        summary = json.loads((s3 / "runs" / "debug" / "train_summary.json").read_text()) if rc == 0 else {}
        trained = summary.get("steps")
        add("... --steps 2 --retrain", "trained again for 2 steps and scored",
            rc == 0 and steps == 2 and trained == 2, f"exit {rc}, study steps {steps}, trained {trained}")
    return rows


def main() -> int:
    import tempfile

    from _common import add_repo_to_path

    add_repo_to_path(always=True)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="probunet-faults-study-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        rc, err = _probunet("train", DEBUG, *FAST, "--out", str(ckpt), "--no-progress")
        assert rc == 0, err
        rows = run(Path(tmp) / "study", ckpt, quick="--quick" in sys.argv)
    for r in rows:
        print(f"{r['input']:<55} -> {r['expected']}  [{'PASS' if r['ok'] else 'FAIL'}]"
              + ("" if r["ok"] else f"\n    got: {r['got']}"))
    print(f"{time.perf_counter() - t:.0f}s")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
