"""fault_check family "shift": input bounds that used to be accepted silently or took minutes.

Each probe is a ``probunet`` command in its own process with a time limit: a huge blur severity
(refused at once, not minutes of filtering), a noise severity of 1e308 (refused, never infinite
images and NaN scores), ``--severity`` without ``--shift``, an override given twice, a YAML merge
key, a NaN voxel spacing (train on a folder; and predict, without --quick), and a training batch
far past the memory (refused before a batch is gathered: the probe caps the memory it sees at
8 GB and checks the peak memory of the process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROBE_RUNNER, REPO, probe_output, repo_env  # noqa: E402

DEBUG = str(REPO / "configs" / "debug.yaml")
TIMEOUT_S = 120.0
CAP_BYTES = 8 << 30  # the memory the batch-size probe may see



def _probe(args: list[str], cap: int = 0) -> dict:
    env = repo_env(pythonpath=True, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if cap:
        env["PROBUNET_FAULT_MEMORY_CAP"] = str(cap)
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE_RUNNER, "--quiet", *args], env=env, cwd=str(REPO),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"rc": None, "err": "", "lines": [], "seconds": time.perf_counter() - t, "mb": 0, "hung": True,
                "work": float("nan")}
    _, mb, work = probe_output(proc.stdout)
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("INFO", "WARNING"))]
    return {"rc": proc.returncode, "err": proc.stderr, "lines": lines, "seconds": time.perf_counter() - t,
            "mb": mb, "work": work, "hung": False}


def _got(r: dict) -> str:
    if r["hung"]:
        return f"hung (killed after {TIMEOUT_S:.0f}s)"
    line = r["lines"][0] if r["lines"] else r["err"].strip()[-200:]
    return f"exit {r['rc']} in {r['seconds']:.1f}s ({r['work']:.1f}s after imports), {r['mb']} MB: {line[:200]}"


def _refused(r: dict, *names: str, rc: int = 2) -> bool:
    """Exit ``rc``, one line on stderr (log lines aside) naming every one of ``names``, no traceback."""
    return (not r["hung"] and r["rc"] == rc and len(r["lines"]) == 1 and "Traceback" not in r["err"]
            and all(n in r["lines"][0] for n in names))


def _nifti_nan_spacing(path: Path, shape=(32, 32), mask: bool = False) -> None:
    import nibabel as nib
    import numpy as np

    h = nib.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(np.uint8 if mask else np.float32)
    h["pixdim"] = [1, float("nan"), 1, 1, 1, 1, 1, 1]
    h["qform_code"], h["sform_code"] = 1, 0
    data = np.zeros(shape, np.uint8 if mask else np.float32)
    data[8:16, 8:16] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, None, header=h), str(path))


def run(work: Path, ckpt_run: Path, quick: bool) -> list[dict]:
    """The family's rows (``input``, ``expected``, ``ok``, ``got``); the probes run two or more at a time."""
    from concurrent.futures import ThreadPoolExecutor

    work.mkdir(parents=True, exist_ok=True)
    probes = []  # (input, expected, args, memory cap, check of the result)

    def probe(what, expected, args, check, cap=0):
        probes.append((what, expected, args, cap, check))

    probe("synth --shift blur --severity 1e6 (two 64x64 images)", "refused at once (< 5 s), names --severity 0..64",
          ["synth", str(work / "blur"), "--num-cases", "2", "--size", "64", "--shift", "blur", "--severity", "1e6"],
          lambda r: _refused(r, "--severity", "0..64") and r["work"] < 5 and not (work / "blur").exists())
    probe("synth --shift noise --severity 1e308", "refused, names --severity and 0..1000",
          ["synth", str(work / "noise"), "--num-cases", "2", "--size", "32", "--shift", "noise", "--severity", "1e308"],
          lambda r: _refused(r, "--severity", "0..1000") and not (work / "noise").exists())
    probe("synth --severity 5 without --shift", "refused, names --shift",
          ["synth", str(work / "nosh"), "--num-cases", "2", "--size", "32", "--severity", "5"],
          lambda r: _refused(r, "--severity", "--shift") and not (work / "nosh").exists())
    probe("train ... train.steps=2 train.steps=3", "refused, names train.steps, no run folder",
          ["train", DEBUG, "--out", str(work / "dup"), "train.steps=2", "train.steps=3"],
          lambda r: _refused(r, "train.steps", "twice") and not (work / "dup").exists())

    merge = work / "merge.yaml"
    merge.write_text("model:\n  features: [4, 8]\ntrain:\n  <<: {steps: 2}\n  batch_size: 2\n", encoding="utf-8")
    probe("train CONFIG with a YAML merge key (<<:)", "refused, names the file, merge keys",
          ["train", str(merge), "--out", str(work / "merge")],
          lambda r: _refused(r, str(merge), "merge key") and not (work / "merge").exists())

    data = work / "nan_spacing"
    for case in ("a", "b", "c", "d"):
        _nifti_nan_spacing(data / "images" / f"{case}.nii")
        _nifti_nan_spacing(data / "labels" / f"{case}_rater1.nii", mask=True)
    probe("train on NIfTI files whose spacing is NaN", "refused, names the file, spacing not finite",
          ["train", DEBUG, "--out", str(work / "nanrun"), "data.format=folder", f"data.path={data}",
           "data.image_pattern=images/{case}.nii", "data.mask_pattern=labels/{case}_rater{rater}.nii",
           "--no-progress"],
          lambda r: _refused(r, str(data / "images"), "spacing", "not finite"))

    if not quick and (ckpt_run / "checkpoints" / "last.pt").is_file():
        scans = work / "nan_scans"
        _nifti_nan_spacing(scans / "x.nii")

        def predicted(r):
            failed = [l for l in r["lines"] if l.startswith("probunet predict: failed:")]
            return r["rc"] == 1 and len(failed) == 1 and "x.nii" in failed[0] and "not finite" in failed[0]

        probe("predict a NIfTI whose spacing is NaN", "exit 1, the case failed: spacing not finite",
              ["predict", str(ckpt_run), str(scans), str(work / "pred"), "--num-samples", "2", "--no-progress"],
              predicted)

    probe("train debug.yaml train.batch_size=65536 (8 GB available)",
          "refused before allocating (< 2 GB peak), names train.batch_size",
          ["train", DEBUG, "--out", str(work / "big"), "train.batch_size=65536", "--no-progress"],
          lambda r: _refused(r, "train.batch_size 65536", "8.0 GB are available") and r["mb"] < 2048
          and not (work / "big" / "checkpoints" / "last.pt").exists(), cap=CAP_BYTES)

    with ThreadPoolExecutor(max_workers=max(2, min(4, (os.cpu_count() or 2) // 2))) as pool:
        results = list(pool.map(lambda p: _probe(p[2], p[3]), probes))
    return [{"input": what, "expected": expected, "ok": not r["hung"] and bool(check(r)), "got": _got(r)}
            for (what, expected, _, _, check), r in zip(probes, results)]


if __name__ == "__main__":  # a quick look: python scripts/_faults_shift.py [--full]
    import tempfile

    with tempfile.TemporaryDirectory(prefix="probunet-faults-shift-") as tmp:
        t0 = time.perf_counter()
        result = run(Path(tmp), Path(tmp) / "no-run", quick="--full" not in sys.argv)
        for row in result:
            print(f"{'PASS' if row['ok'] else 'FAIL'}  {row['input']:<62} -> {row['expected']}\n      {row['got']}")
        print(f"{time.perf_counter() - t0:.0f}s")
    sys.exit(0 if all(r["ok"] for r in result) else 1)
