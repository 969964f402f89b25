"""fault_check family ``export``: ensemble sampling in chunks, the exporter, option ranges.

Each probe is a ``python -m probunet ...`` process (a few run side by side):

- ``predict`` of an ensemble of Probabilistic U-Nets (``configs/zoo/ensemble_prob_unet.yaml``,
  made tiny) and (default sizes only) of an ensemble of U-Nets with ``--sample-chunk`` 3,
  automatic and (default sizes only) 1: the aleatoric and epistemic maps written must be
  equal (the members are assigned by the sample's global index).
- ``export --format torchscript`` of the ensemble of Probabilistic U-Nets: exit 0, and
  the file (loaded with ``torch.jit.load``) draws the model's samples for the same noise.
- ``export`` onto a full disk: a 16 KiB tmpfs where one can be mounted (root), else a
  file-size limit (RLIMIT_FSIZE): one line naming the file, exit 2, no temp file left.
- out-of-range options: ``predict --roi -4``, ``--sample-chunk -1``, ``--seed -1``,
  ``--workers 100000``; ``export --format bundle --roi -5``; ``export --num-samples
  100000``: one line naming the option, exit 2, nothing written.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common
from _common import REPO, repo_env  # noqa: E402

TIMEOUT_S = 300
S = 8  # samples per image; a multiple of both ensembles' sizes


def _env() -> dict:
    return repo_env(pythonpath=True, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _probunet(args: list[str], preexec=None) -> tuple[int, str]:
    """``python -m probunet --quiet ARGS``: exit status and stderr (124 on a time-out)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "probunet", "--quiet", *args], env=_env(), cwd=REPO,
                              capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=preexec)
    except subprocess.TimeoutExpired:
        return 124, f"hung: no exit within {TIMEOUT_S}s"
    return proc.returncode, proc.stderr


def _one_line(rc: int, err: str, command: str, *needles: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    return (rc == 2 and len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"probunet {command}: error:")
            and all(n in lines[0] for n in needles))


def _last(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def _checkpoints(work: Path) -> dict:
    """Untrained tiny ensembles (their members differ by their initialisation): the zoo's ensemble of
    Probabilistic U-Nets and an ensemble of U-Nets, as checkpoint files; and ``prob_unet.pt`` (the debug
    config), for when no trained run is given."""
    import torch

    from probunet.models.checkpoint import save_checkpoint
    from probunet.config import load_config
    from probunet.models import build_model

    small = ["model.features=[4,8]", "model.latent_dim=2", "data.synthetic.size=32", "data.normalize=none"]
    configs = {"ensemble of prob_unet": (REPO / "configs" / "zoo" / "ensemble_prob_unet.yaml", ["model.ensemble_size=4"]),
               "ensemble of unet": (REPO / "configs" / "zoo" / "ensemble.yaml", ["model.ensemble_size=4"])}
    out = {}
    cfg = load_config(str(REPO / "configs" / "debug.yaml"))
    torch.manual_seed(0)
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(), "step": 0},
                    work / "prob_unet.pt")
    for i, (name, (config, extra)) in enumerate(configs.items()):
        cfg = load_config(str(config), [*small, *extra])
        torch.manual_seed(i)
        model = build_model(cfg.model).eval()
        path = work / f"ckpt{i}.pt"
        save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, path)
        out[name] = (path, model, cfg)
    return out


def _read(path: Path):
    import nibabel as nib
    import numpy as np

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def _file_size_limit(limit_bytes: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


def run(work: Path, ckpt_run: Path, quick: bool) -> list[dict]:
    import nibabel as nib
    import numpy as np
    import torch

    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def add(what, expected, passed, got="", skip=False):
        rows.append({"input": what, "expected": expected, "ok": bool(passed), "got": str(got)[:200], "skip": skip})

    try:
        ckpts = _checkpoints(work)
    except Exception as exc:  # the checker's own setup failed: one failed row
        add("export family setup", "tiny ensemble checkpoints", False, f"{exc.__class__.__name__}: {exc}")
        return rows
    inp = work / "in"
    inp.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for n in ("c1", "c2"):
        nib.save(nib.Nifti1Image(rng.normal(size=(32, 32)).astype(np.float32), np.eye(4)), str(inp / f"{n}.nii.gz"))

    # -- every probe process, a few side by side
    chunks = ["1", "3", "auto"] if not quick else ["3", "auto"]
    ensembles = list(ckpts) if not quick else ["ensemble of prob_unet"]
    jobs: dict = {}
    for name in ensembles:
        path = ckpts[name][0]
        for c in chunks:
            out = work / f"pred-{name.split()[-1]}-{c}"
            jobs[("predict", name, c)] = ([
                "predict", str(path), str(inp), str(out), "--num-samples", str(S), "--seed", "3", "--device", "cpu",
                "--no-progress", "--output-format", "nii.gz", *([] if c == "auto" else ["--sample-chunk", c])], None)
    pu_path = ckpts["ensemble of prob_unet"][0]
    # the full disk and the option ranges on the debug run's checkpoint (a Probabilistic U-Net)
    base = ckpt_run / "checkpoints" / "last.pt"
    base = base if base.is_file() else work / "prob_unet.pt"
    ts = work / "ens.ts"
    jobs[("export",)] = (["export", str(pu_path), "--format", "torchscript", "--out", str(ts), "--num-samples",
                          str(S)], None)
    disk = work / "disk"
    disk.mkdir(exist_ok=True)
    mounted = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True).returncode == 0
    how = "16 KiB tmpfs" if mounted else "simulated: a 16 KiB file-size limit, no tmpfs can be mounted here"
    jobs[("disk",)] = (["export", str(base), "--format", "torchscript", "--out", str(disk / "s.ts")],
                       None if mounted else _file_size_limit(16 << 10))
    refusals = [
        ("predict --roi -4", "predict", ["--roi", "-4"], "--roi"),
        ("predict --sample-chunk -1", "predict", ["--sample-chunk", "-1"], "--sample-chunk"),
        ("predict --seed -1", "predict", ["--seed", "-1"], "--seed"),
        ("predict --workers 100000", "predict", ["--workers", "100000"], "--workers"),
        ("export --format bundle --roi -5", "bundle", ["--roi", "-5"], "--roi"),
        ("export --num-samples 100000", "torchscript", ["--num-samples", "100000"], "--num-samples"),
    ]
    for i, (what, kind, argv, _) in enumerate(refusals):
        out = work / f"refused{i}"
        if kind == "predict":
            jobs[("refuse", i)] = (["predict", str(base), str(inp), str(out), "--device", "cpu", "--no-progress",
                                    *argv], None)
        else:
            target = out if kind == "bundle" else out / "s.ts"
            jobs[("refuse", i)] = (["export", str(base), "--format", kind, "--out", str(target), *argv], None)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {key: pool.submit(_probunet, args, pre) for key, (args, pre) in jobs.items()}
            results = {key: f.result() for key, f in futures.items()}
        leftovers = sorted(p.name for p in disk.iterdir())
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)

    # -- ensemble maps across chunk sizes
    for name in ensembles:
        failed = [(c, results[("predict", name, c)]) for c in chunks if results[("predict", name, c)][0] != 0]
        what = f"predict {name} --sample-chunk {'/'.join(chunks)}"
        if failed:
            add(what, "maps equal across chunk sizes", False, f"chunk {failed[0][0]}: exit {failed[0][1][0]}: "
                f"{_last(failed[0][1][1])}")
            continue
        worst, epistemic = 0.0, []
        for case in ("c1", "c2"):
            for m in ("aleatoric", "epistemic"):
                ref = _read(work / f"pred-{name.split()[-1]}-auto" / case / f"{m}.nii.gz")
                if m == "epistemic":
                    epistemic.append(float(ref.mean()))
                for c in chunks[:-1]:
                    got = _read(work / f"pred-{name.split()[-1]}-{c}" / case / f"{m}.nii.gz")
                    worst = max(worst, float(np.abs(got - ref).max()))
        add(what, "aleatoric and epistemic maps equal (|diff| <= 1e-5)",
            worst <= 1e-5 and min(epistemic) > 0,
            f"max |diff| {worst:.2e}; mean epistemic {min(epistemic):.4f}..{max(epistemic):.4f}")

    # -- the zoo's ensemble of Probabilistic U-Nets exports and draws the model's samples
    rc, err = results[("export",)]
    ok, got = rc == 0 and ts.is_file(), f"exit {rc}: {_last(err)}"
    if ok:
        try:
            model = ckpts["ensemble of prob_unet"][1]
            sampler = torch.jit.load(str(ts))
            x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
            eps = torch.randn(1, S, 2, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                diff = float((sampler(x, noise=eps) - model.sample(x, S, noise=eps)).abs().max())
            ok, got = diff <= 1e-4, f"exit 0; max |file - model| {diff:.1e}"
        except Exception as exc:
            ok, got = False, f"{exc.__class__.__name__}: {exc}"
    add("export configs/zoo/ensemble_prob_unet.yaml (tiny) --format torchscript",
        "exit 0; the file draws the model's samples for the same noise", ok, got)

    # -- a full disk
    rc, err = results[("disk",)]
    add(f"export torchscript onto a full disk ({how})", "one line naming the file, exit 2, no temp file",
        _one_line(rc, err, "export", str(disk / "s.ts"), "cannot write") and not leftovers,
        f"exit {rc}: {_last(err)}; left: {leftovers}")

    # -- out-of-range options
    for i, (what, kind, _, flag) in enumerate(refusals):
        rc, err = results[("refuse", i)]
        command = "predict" if kind == "predict" else "export"
        add(what, f"refused: one line naming {flag} and its range, exit 2, nothing written",
            _one_line(rc, err, command, flag) and not (work / f"refused{i}").exists(), f"exit {rc}: {_last(err)}")
    return rows


if __name__ == "__main__":  # the family alone: python scripts/_faults_export.py [--quick]
    import tempfile

    sys.path.insert(0, str(REPO))
    where = Path(tempfile.mkdtemp(prefix="probunet-faults-export-"))
    try:
        t = time.perf_counter()
        result = run(where, where, "--quick" in sys.argv)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    for r in result:
        mark = "SKIP" if r.get("skip") else "PASS" if r["ok"] else "FAIL"
        print(f"{r['input']:<70} -> {r['expected']}  [{mark}]" + ("" if r["ok"] else f"\n    got: {r['got']}"))
    print(f"{time.perf_counter() - t:.0f}s")
    sys.exit(0 if all(r["ok"] for r in result) else 1)
