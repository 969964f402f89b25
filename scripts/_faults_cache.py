"""fault_check family ``cache``: the preprocessing cache and the outputs that cannot be written.

Each probe is a ``python -m probunet ...`` process:

- a stale image: an uncompressed ``image.nii`` changed by one voxel with its size and
  modification time kept (as ``rsync -t`` or ``cp -p`` leave it): ``preprocess`` must build a
  new cache holding the new voxel. A file above the digest's whole-file size changed inside
  a sampled block must change the cache key (a library call).
- a damaged cache: a truncated ``.npy`` and raters' labels out of range: ``train`` must stop
  with one line naming the damaged file and saying to delete the cache folder, exit 2.
- outputs that cannot be written: ``synth OUT``, ``preprocess --out`` and ``data.cache_dir``
  in a read-only folder (a read-only tmpfs as root; elsewhere a folder of mode 0500 where
  that binds, else the rows are skipped); ``preprocess`` onto a full disk (a 256 KiB tmpfs
  as root, else a file-size limit, RLIMIT_FSIZE); a ``.probunet.settings.lock`` symbolic
  link in predict's OUTPUT_DIR: one line naming the path and the cause, exit 2, nothing
  written through the link, no half-built cache left.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common
from _common import REPO, add_repo_to_path, mount_tmpfs, repo_env, umount  # noqa: E402

add_repo_to_path(always=True)  # this tree's probunet, as the children get it through PYTHONPATH

TIMEOUT_S = 300
DEBUG = str(REPO / "configs" / "debug.yaml")


def _env() -> dict:
    return repo_env(pythonpath=True, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _probunet(args: list[str], *, fsize: int | None = None) -> tuple[int, str, str]:
    """``python -m probunet --quiet ARGS``: exit code, stdout, stderr (``fsize``: a file-size limit)."""
    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    try:
        p = subprocess.run([sys.executable, "-m", "probunet", "--quiet", *args], capture_output=True, text=True,
                           env=_env(), cwd=str(REPO), timeout=TIMEOUT_S, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return -1, "", f"hung: no exit within {TIMEOUT_S}s"
    return p.returncode, p.stdout, p.stderr


def _one_line(rc: int, err: str, command: str, *needles: str) -> bool:
    """Exit 2, no traceback, exactly one ``probunet COMMAND: error:`` line holding every needle."""
    lines = [line for line in err.splitlines() if line.startswith(f"probunet {command}: error:")]
    return rc == 2 and "Traceback" not in err and len(lines) == 1 and all(n in lines[0] for n in needles)


def _last(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _cases(root: Path, n: int = 3, size: int = 32) -> Path:
    """QUBIQ case folders with an uncompressed image.nii (a voxel can change in place) and 2 raters."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i}"
        d.mkdir(parents=True)
        nib.save(nib.Nifti1Image(rng.normal(size=(size, size)).astype(np.float32), np.eye(4)), str(d / "image.nii"))
        mask = np.zeros((size, size), np.uint8)
        mask[8:14, 8:14] = 1
        for r in (1, 2):
            nib.save(nib.Nifti1Image(mask, np.eye(4)), str(d / f"task01_seg{r:02d}.nii.gz"))
    return root


def _poke(path: Path, offset: int, value: bytes) -> None:
    """Overwrite bytes in place, keeping the size and the modification time."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(value)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


_INTO = re.compile(r"preprocessed \d+ cases into (\S+) in ")


def _row(what, expected, passed, got="", skip=False) -> dict:
    return {"input": what, "expected": expected, "ok": bool(passed), "got": str(got)[:200],
            **({"skip": True} if skip else {})}


def _stale_and_damaged(work: Path) -> list[dict]:
    """A stale image rebuilt; then the cache it built damaged twice, each refused naming the file."""
    import nibabel as nib
    import numpy as np

    from probunet.config import load_config
    from probunet.data import preprocess as pp

    rows = []
    data = _cases(work / "data")
    cache = work / "cache"
    data_args = ["data.format=qubiq", f"data.path={data}", "data.patch_size=[16,16]", "--no-progress"]
    rc, out, err = _probunet(["preprocess", DEBUG, "--out", str(cache), *data_args])
    m = _INTO.search(out)
    first = Path(m.group(1)) if m else None
    image = data / "c0" / "image.nii"
    _poke(image, int(nib.load(str(image)).dataobj.offset), np.float32(1000.0).tobytes())
    rc2, out2, err2 = _probunet(["preprocess", DEBUG, "--out", str(cache), *data_args])
    m2 = _INTO.search(out2)
    second = Path(m2.group(1)) if m2 else None
    rebuilt = False
    if first and second and second != first:
        cached = np.load(second / "cases" / "c0.image.npy")
        rebuilt = bool(cached[0].argmax() == 0 and cached[0, 0, 0] > 5)
    rows.append(_row("image changed, same size and mtime (rsync -t / cp -p)",
                     "preprocess builds a new cache with the change", rc == 0 and rc2 == 0 and rebuilt,
                     f"{first} -> {second}: {_last(err + err2)}"))

    big_dir = work / "big"
    big_dir.mkdir(parents=True)
    big = big_dir / "scan.raw"
    size = pp.WHOLE_FILE_BYTES + 5 * pp.BLOCK_BYTES + 777
    big.write_bytes(np.random.default_rng(1).bytes(size))
    cfg = load_config(DEBUG, ["data.format=qubiq", f"data.path={big_dir}"])
    key = pp.cache_key(cfg)
    offsets = pp.digest_offsets(size)
    _poke(big, offsets[len(offsets) // 2] + pp.BLOCK_BYTES // 2, b"\xff\x00\xff")
    rows.append(_row(f"{size >> 20} MB file, a sampled block changed (same size, mtime)", "the cache key changes",
                     pp.cache_key(cfg) != key, f"key {key} unchanged"))

    if second is None:
        return rows + [_row("damaged cache", "a cache to damage", False, "the first preprocess did not build one")]
    entry = pp.read_index(second)["cases"]["c1"]
    raters, img = second / entry["raters"], second / entry["image"]
    labels = np.load(raters)
    labels[0, 5, 5] = 9
    np.save(raters, labels)
    train = ["train", DEBUG, "--out", str(work / "run"), f"data.cache_dir={cache}", "train.steps=1",
             "train.val_every=100", "train.device=cpu", *data_args]
    rc, _, err = _probunet(train)
    rows.append(_row("cached raters' labels out of range (label 9, 2 classes)", "one line naming the file, exit 2",
                     _one_line(rc, err, "train", str(raters), "delete the folder"), _last(err)))
    with open(img, "r+b") as fh:
        fh.truncate(60)
    shutil.rmtree(work / "run", ignore_errors=True)
    rc, _, err = _probunet(train)
    rows.append(_row("cached image .npy truncated inside its header", "one line naming the file, exit 2",
                     _one_line(rc, err, "train", str(img), "delete the folder"), _last(err)))
    return rows


def _read_only_folder(ro: Path) -> str | None:
    """Make ``ro`` a folder no file can be created in; how, or None where that cannot be had."""
    if mount_tmpfs(ro, "ro,size=1m"):
        return "read-only tmpfs"
    ro.mkdir(parents=True, exist_ok=True)
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return None if os.access(ro, os.W_OK) else "mode 0500"


def _read_only_probe(ro: Path, how: str | None, data: Path, name: str) -> dict:
    data_args = ["data.format=qubiq", f"data.path={data}", "data.patch_size=[16,16]", "--no-progress"]
    args, command, needle = {
        "synth OUT": (["synth", str(ro / "syn"), "--num-cases", "2", "--size", "16"], "synth", str(ro / "syn")),
        "preprocess --out": (["preprocess", DEBUG, "--out", str(ro / "c1"), *data_args], "preprocess",
                             str(ro / "c1")),
        "data.cache_dir": (["preprocess", DEBUG, f"data.cache_dir={ro / 'c2'}", *data_args], "preprocess",
                           f"data.cache_dir {ro / 'c2'}")}[name]
    if how is None:
        return _row(f"{name} in a read-only folder", "not run: no read-only folder can be made here", True,
                    skip=True)
    rc, _, err = _probunet(args)
    cause = "read-only file system" if how.startswith("read-only") else "permission denied"
    return _row(f"{name} in a read-only folder ({how})", "one line naming it and the cause, exit 2",
                _one_line(rc, err, command, needle, cause), _last(err))


def _full_disk(work: Path) -> dict:
    from probunet.data import synthetic

    syn = work / "syn64"  # 12 cases of 64^2, 4 raters: about 400 KB of cache, more than the disk or limit holds
    synthetic.write_qubiq(synthetic.generate(num_cases=12, size=64), syn)
    disk = work / "disk"
    mounted = mount_tmpfs(disk, "size=256k")
    try:
        target = disk / "cache"
        how = "256 KiB tmpfs" if mounted else "file-size limit 16 KiB"
        rc, _, err = _probunet(["preprocess", DEBUG, "--out", str(target), "data.format=synthetic",
                                f"data.path={syn}", "data.patch_size=[16,16]", "--no-progress"],
                               fsize=None if mounted else 16 << 10)
        cause = "no space left on device" if mounted else "file too large"
        left = [p.name for p in target.iterdir()] if target.is_dir() else []
        return _row(f"preprocess onto a full disk ({how})", "one line naming the .npy, exit 2, no cache folder left",
                    _one_line(rc, err, "preprocess", ".npy: cannot write", cause) and not left,
                    f"{_last(err)} left: {left}")
    finally:
        if mounted:
            umount(disk)


def _lock_link(work: Path, ckpt_run: Path) -> dict:
    import nibabel as nib
    import numpy as np

    inp = work / "in"
    inp.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), str(inp / "a.nii.gz"))
    pred = work / "pred"
    pred.mkdir()
    planted = work / "elsewhere" / "planted"
    planted.parent.mkdir()
    (pred / ".probunet.settings.lock").symlink_to(planted)
    rc, _, err = _probunet(["predict", str(ckpt_run), str(inp), str(pred), "--num-samples", "2", "--no-progress"])
    return _row("predict: OUTPUT_DIR/.probunet.settings.lock a symbolic link", "one line naming it, exit 2, "
                "not followed", _one_line(rc, err, "predict", ".probunet.settings.lock", "symbolic link")
                and not planted.exists(), _last(err))


def run(work: Path, ckpt_run: Path, quick: bool) -> list[dict]:
    """The family's rows; the independent probes run side by side (the same probes at every size)."""
    from concurrent.futures import ThreadPoolExecutor

    work.mkdir(parents=True, exist_ok=True)
    ro = work / "ro"
    how = _read_only_folder(ro)
    data = _cases(work / "data_ro")
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            stale = pool.submit(_stale_and_damaged, work / "stale")
            others = [pool.submit(_read_only_probe, ro, how, data, name)
                      for name in ("synth OUT", "preprocess --out", "data.cache_dir")]
            others += [pool.submit(_full_disk, work / "full"), pool.submit(_lock_link, work / "lock", ckpt_run)]
            rows = []
            for f in (stale, *others):
                try:
                    got = f.result()
                except Exception as exc:  # the checker's own failure: a failed row, not a crash
                    got = _row("cache family probe", "no exception", False, f"{exc.__class__.__name__}: {exc}")
                rows += got if isinstance(got, list) else [got]
    finally:
        if how == "read-only tmpfs":
            umount(ro)
        elif ro.exists():
            ro.chmod(0o755)
    return rows


if __name__ == "__main__":  # python scripts/_faults_cache.py RUN_DIR [WORK]: this family alone
    import tempfile

    t0 = time.perf_counter()
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="probunet-faults-cache-"))
    result = run(work, Path(sys.argv[1]), quick=True)
    for r in result:
        mark = "SKIP" if r.get("skip") else "PASS" if r["ok"] else "FAIL"
        print(f"{r['input']:<62} -> {r['expected']}  [{mark}]" + ("" if r["ok"] else f"\n    got: {r['got']}"))
    print(f"{time.perf_counter() - t0:.0f}s")
    sys.exit(0 if all(r["ok"] for r in result) else 1)
