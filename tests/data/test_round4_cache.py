"""The preprocessing cache: a content digest in its key, damaged cache files refused naming the file,
and one-line errors for read-only, full or planted-link outputs (synth, preprocess, lock files)."""

import errno
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from probunet import guards
from probunet.cli import main
from probunet.config import load_config
from probunet.data import DataError
from probunet.data import preprocess as pp
from probunet.data.preprocess import cache_key, cached_items, preprocess, read_index

from test_reliability_runs import _one_line_error

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug.yaml")


def _cases(root: Path, n: int = 2, size: int = 16) -> Path:
    """QUBIQ folders with an uncompressed image.nii (a byte of its data can change in place) and 2 raters."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i}"
        d.mkdir(parents=True)
        nib.save(nib.Nifti1Image(rng.normal(size=(size, size)).astype(np.float32), np.eye(4)), str(d / "image.nii"))
        mask = np.zeros((size, size), np.uint8)
        mask[4:8, 4:8] = 1
        for r in (1, 2):
            nib.save(nib.Nifti1Image(mask, np.eye(4)), str(d / f"task01_seg{r:02d}.nii.gz"))
    return root


def _cfg(data: Path, cache: Path, *extra):
    return load_config(DEBUG, ["data.format=qubiq", f"data.path={data}", f"data.cache_dir={cache}",
                               "data.patch_size=[8,8]", *extra])


def _poke(path: Path, offset: int, value: bytes) -> None:
    """Overwrite bytes at ``offset`` keeping the size, then restore the modification time (as
    ``rsync -t`` or ``cp -p`` leave a changed file)."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(value)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


# ----------------------------------------------------------------------------- the key's content digest


def test_a_changed_image_with_the_same_size_and_mtime_rebuilds_the_cache(tmp_path):
    data = _cases(tmp_path / "data")
    cfg = _cfg(data, tmp_path / "cache")
    first = preprocess(cfg)
    image = data / "c0" / "image.nii"
    offset = int(nib.load(str(image)).dataobj.offset)  # the first voxel's float32
    _poke(image, offset, np.float32(1234.5).tobytes())
    second = preprocess(_cfg(data, tmp_path / "cache"))
    assert second != first
    # the new cache holds the new voxel (zscore-normalised: the largest value of the case by far)
    entry = read_index(second)["cases"]["c0"]
    cached = np.load(second / entry["image"])
    assert cached[0].argmax() == 0 and cached[0, 0, 0] > 5
    assert preprocess(_cfg(data, tmp_path / "cache")) == second  # and is reused


def test_a_large_file_digest_reads_sampled_blocks(tmp_path):
    """Above WHOLE_FILE_BYTES a change inside a sampled block changes the key; one confined to the bytes
    between the blocks does not (what docs/volumes.md says)."""
    data = tmp_path / "data"
    data.mkdir()
    big = data / "scan.raw"
    size = pp.WHOLE_FILE_BYTES + 3 * pp.BLOCK_BYTES + 12345
    big.write_bytes(np.random.default_rng(1).bytes(size))
    cfg = _cfg(data, tmp_path / "cache")
    key = cache_key(cfg)
    offsets = pp.digest_offsets(size)
    assert len(offsets) == pp.SAMPLED_BLOCKS + 2 and offsets[0] == 0 and offsets[-1] == size - pp.BLOCK_BYTES
    assert all(b - a >= pp.BLOCK_BYTES for a, b in zip(offsets, offsets[1:]))  # a gap between blocks
    for where in (offsets[7] + 100, offsets[-1] + pp.BLOCK_BYTES - 1, 3):  # inner, last and first block
        before = big.read_bytes()[where:where + 1]
        _poke(big, where, bytes([before[0] ^ 0xFF]))
        changed = cache_key(cfg)
        assert changed != key
        _poke(big, where, before)
        assert cache_key(cfg) == key  # the same content again: the same key
    gap = offsets[7] + pp.BLOCK_BYTES + 10  # between two sampled blocks: not read
    assert gap < offsets[8]
    _poke(big, gap, b"\x00\x01")
    assert cache_key(cfg) == key


def test_a_small_file_is_hashed_whole(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    f = data / "scan.raw"
    f.write_bytes(np.random.default_rng(2).bytes(pp.WHOLE_FILE_BYTES))  # at the threshold: whole
    cfg = _cfg(data, tmp_path / "cache")
    key = cache_key(cfg)
    gap = pp.WHOLE_FILE_BYTES // 2 + 3
    assert not any(o <= gap < o + pp.BLOCK_BYTES for o in pp.digest_offsets(pp.WHOLE_FILE_BYTES))
    _poke(f, gap, b"\x00\xff")
    assert cache_key(cfg) != key


# ----------------------------------------------------------------------------- a damaged cache


@pytest.fixture
def built(tmp_path):
    data = _cases(tmp_path / "data", n=3)
    cache = tmp_path / "cache"
    folder = preprocess(_cfg(data, cache))
    entry = read_index(folder)["cases"]["c0"]
    return data, cache, folder, folder / entry["image"], folder / entry["raters"]


def _damage(kind, image, raters):
    if kind == "truncated header":
        with open(image, "r+b") as fh:
            fh.truncate(50)
        return image
    if kind == "truncated data":
        with open(image, "r+b") as fh:
            fh.truncate(image.stat().st_size - 4)
        return image
    if kind == "other shape":
        np.save(image, np.zeros((1, 8, 16), np.float32))
        return image
    if kind == "other dtype":
        np.save(raters, np.load(raters).astype(np.int64))
        return raters
    if kind == "labels out of range":
        labels = np.load(raters)
        labels[1, 3, 3] = 7
        np.save(raters, labels)
        return raters
    if kind == "missing":
        image.unlink()
        return image
    raise AssertionError(kind)


KINDS = ["truncated header", "truncated data", "other shape", "other dtype", "labels out of range", "missing"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_cache_file_is_refused_naming_it(built, kind):
    data, cache, folder, image, raters = built
    bad = _damage(kind, image, raters)
    with pytest.raises(DataError) as info:
        cached_items(folder, _cfg(data, cache))
    msg = str(info.value)
    assert str(bad) in msg and f"delete the folder {folder}" in msg and "\n" not in msg, msg


def test_a_damaged_cache_is_one_line_from_the_cli_and_rebuilt_once_deleted(built, tmp_path, capsys):
    data, cache, folder, image, raters = built
    _damage("labels out of range", image, raters)
    argv = ["train", DEBUG, "--out", str(tmp_path / "run"), "data.format=qubiq", f"data.path={data}",
            f"data.cache_dir={cache}", "data.patch_size=[8,8]", "train.steps=1", "train.val_every=100",
            "train.device=cpu", "--no-progress"]
    assert main(argv) == 2
    _one_line_error(capsys, "train", str(raters), "label 7", "model.num_classes=2", "delete the folder")
    _damage("truncated header", image, raters)
    shutil.rmtree(tmp_path / "run")
    assert main(argv) == 2
    _one_line_error(capsys, "train", str(image), "unreadable header")
    shutil.rmtree(folder)  # what the message says to do
    assert len(cached_items(preprocess(_cfg(data, cache)), _cfg(data, cache))) == 3


# ----------------------------------------------------------------------------- read-only, full, planted links


def _mount_tmpfs(where: Path, options: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder no file can be created in: a read-only tmpfs (root), else mode 0500 where that binds,
    else (root without mount) every probe file in it refused with EROFS."""
    where = tmp_path / "ro"
    where.mkdir()
    if _mount_tmpfs(where, "ro,size=1m"):
        yield where
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
        return
    where.chmod(0o500)
    if not os.access(where, os.W_OK):
        yield where
        where.chmod(0o755)
        return
    where.chmod(0o755)
    real_mkdir, real_mkstemp = Path.mkdir, guards.tempfile.mkstemp

    def refuse(path):
        if Path(path).resolve().is_relative_to(where.resolve()) and Path(path).resolve() != where.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: refuse(self) or real_mkdir(self, *a, **k))
    monkeypatch.setattr(guards.tempfile, "mkstemp", lambda *a, dir=None, **k: refuse(Path(dir) / "x")
                        or real_mkstemp(*a, dir=dir, **k))
    yield where


def _ro_cause(line):
    assert "read-only file system" in line or "permission denied" in line, line


def test_read_only_outputs_are_one_line(read_only, tmp_path, capsys):
    data = _cases(tmp_path / "data")
    assert main(["synth", str(read_only / "syn"), "--num-cases", "2", "--size", "16"]) == 2
    _ro_cause(_one_line_error(capsys, "synth", str(read_only / "syn"), "cannot write"))
    common = ["data.format=qubiq", f"data.path={data}", "data.patch_size=[8,8]", "--no-progress"]
    assert main(["preprocess", DEBUG, "--out", str(read_only / "cache"), *common]) == 2
    _ro_cause(_one_line_error(capsys, "preprocess", str(read_only / "cache"), "cannot write"))
    assert main(["preprocess", DEBUG, f"data.cache_dir={read_only / 'cache'}", *common]) == 2
    _ro_cause(_one_line_error(capsys, "preprocess", f"data.cache_dir {read_only / 'cache'}", "cannot write"))


def test_a_complete_cache_in_a_read_only_folder_is_still_used(tmp_path):
    """Only building needs a writable folder: a shared, read-only cache is read as it is."""
    where = tmp_path / "shared"
    where.mkdir()
    if not _mount_tmpfs(where, "size=4m"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        data = _cases(tmp_path / "data")
        folder = preprocess(_cfg(data, where))
        assert subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True).returncode == 0
        assert not os.access(where, os.W_OK) or os.statvfs(where).f_flag & os.ST_RDONLY
        assert preprocess(_cfg(data, where)) == folder
        assert len(cached_items(folder, _cfg(data, where))) == 2
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize("how", ["np.save", "file write"])
def test_preprocess_on_a_full_disk_is_one_line_and_leaves_no_folder(tmp_path, capsys, monkeypatch, how):
    data = _cases(tmp_path / "data", n=3)
    cache = tmp_path / "cache"
    calls = []
    if how == "np.save":  # the array write fails
        real_save = np.save

        def save(fh, array, *a, **k):
            calls.append(1)
            if len(calls) < 3:
                return real_save(fh, array, *a, **k)
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(np, "save", save)
        cause = "no space left on device"
    else:  # the file's write fails part-way (a file-size limit: EFBIG), under the real np.save
        real_fdopen = os.fdopen

        class Failing:
            def __init__(self, fh):
                self.fh = fh

            def write(self, b):
                self.fh.write(bytes(b)[:10])
                raise OSError(errno.EFBIG, "File too large")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

        def fdopen(fd, *a, **k):
            calls.append(1)
            fh = real_fdopen(fd, *a, **k)
            return Failing(fh) if len(calls) == 3 else fh

        monkeypatch.setattr(pp.os, "fdopen", fdopen)
        cause = "file too large"
    assert main(["preprocess", DEBUG, "--out", str(cache), "data.format=qubiq", f"data.path={data}",
                 "data.patch_size=[8,8]", "--no-progress"]) == 2
    monkeypatch.undo()
    line = _one_line_error(capsys, "preprocess", "cannot write: " + cause, ".npy")
    key = cache_key(_cfg(data, cache))
    assert f"{cache / key / 'cases'}" in line  # the cache's own file, not its temporary folder
    assert list(cache.iterdir()) == []  # the half-built folder is removed


def test_synth_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name == "case_0001":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["synth", str(tmp_path / "syn"), "--num-cases", "2", "--size", "16"]) == 2
    _one_line_error(capsys, "synth", str(tmp_path / "syn" / "case_0001"), "no space left on device")


def test_a_settings_lock_symlink_is_one_line_and_not_followed(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(inp / "a.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere" / "planted"
    target.parent.mkdir()
    (out / ".probunet.settings.lock").symlink_to(target)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")  # refused later; the lock comes first
    assert main(["predict", str(ckpt), str(inp), str(out), "--num-samples", "2", "--no-progress"]) == 2
    _one_line_error(capsys, "predict", str(out / ".probunet.settings.lock"), "symbolic link")
    assert not target.exists()
