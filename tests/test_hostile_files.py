"""Hostile files and names (issue 30, rows 3-7, 9, 12 and 14): shared-reference structures in
checkpoints and pickles, headers that claim huge images, FIFOs and special files, detached data
files outside the scan's folder, YAML alias bombs and duplicate keys, file names that are not
UTF-8, out-of-range seeds and batch sizes. Everything that could hang before its fix runs in a
child process with a timeout, so a regression fails the test instead of stopping the suite."""

import gzip
import hashlib
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from probunet.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from probunet.config import ConfigError, _shown, load_config, load_yaml
from probunet.data import io
from probunet.data.errors import DataError
from probunet.inference.sampler import _seed_of, case_seed

# (names added with these checks are imported in the tests that use them, so that this file also
# runs, and fails test by test, against the code before them)

ROOT = Path(__file__).resolve().parent.parent
DEBUG = str(ROOT / "configs" / "debug.yaml")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _child(code: str, *args, timeout: float = 60, mem_gb: float | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (optionally with its address space limited); a hang is a
    TimeoutExpired, which fails the calling test."""
    prefix = ""
    if mem_gb:
        prefix = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({int(mem_gb * 2**30)}, "
                  f"{int(mem_gb * 2**30)}))\n")
    return subprocess.run([sys.executable, "-c", prefix + textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, env=_env(), timeout=timeout, cwd=str(ROOT))


def _shared(levels: int = 8, width: int = 10):
    x = []
    for _ in range(levels):
        x = [x] * width
    return x


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from probunet.models import build_model

    cfg = load_config(DEBUG, ["data.crop_size=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, path)
    return path


# ----------------------------------------------------------------------------- row 3: checkpoints


def test_shared_reference_checkpoint_is_refused_in_well_under_a_second(tiny_ckpt, tmp_path):
    state = torch.load(tiny_ckpt, weights_only=True)
    state["extra"] = _shared()  # 10**8 entries once unfolded, a few hundred bytes on disk
    bad = tmp_path / "shared.pt"
    torch.save(state, bad)  # its digest cannot even be computed by an unbounded walk
    assert bad.stat().st_size < 200_000
    proc = _child("""
        import sys, time
        from probunet.models.checkpoint import CheckpointError, load_checkpoint
        t = time.perf_counter()
        try:
            load_checkpoint(sys.argv[1])
            print("LOADED")
        except CheckpointError as exc:
            print(f"{time.perf_counter() - t:.3f}|{exc}")
    """, bad, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, msg = proc.stdout.strip().split("|", 1)
    assert float(seconds) < 0.5, seconds
    assert "shared.pt" in msg and "over-large structure" in msg and "\n" not in msg


def test_measure_visits_shared_containers_once():
    from probunet.models.checkpoint import measure

    x = _shared(8, 10)
    t = time.perf_counter()
    with pytest.raises(ValueError, match="more than 1,000,000 entries"):
        measure({"x": x})
    assert time.perf_counter() - t < 0.5
    entries, depth, _ = measure({"x": _shared(3, 10)})  # 1 + 10 + 100 lists + 1000 empty lists
    assert (entries, depth) == (1 + 10 + 100 + 1000, 4)
    deep = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ValueError, match="more than 64 levels"):
        measure(deep)
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError, match="contains itself"):
        measure(loop)


def test_digest_of_a_normal_checkpoint_is_unchanged(tiny_ckpt):
    """The walk unfolds as before: the digest written by save_checkpoint still verifies, and a state
    sharing one tuple between two entries (as optimizers share default betas) hashes both."""
    from probunet.models.checkpoint import state_digest

    load_checkpoint(tiny_ckpt)
    betas = (0.9, 0.999)
    shared = {"a": {"betas": betas}, "b": {"betas": betas}}
    fresh = {"a": {"betas": (0.9, 0.999)}, "b": {"betas": (0.9, 0.999)}}
    assert state_digest(shared) == state_digest(fresh)


def test_stride0_tensor_that_unfolds_past_the_file_is_refused(tiny_ckpt, tmp_path):
    state = torch.load(tiny_ckpt, weights_only=True)
    state["extra"] = torch.zeros(1).expand(200_000, 10_000)  # one float on disk, 8 GB to hash
    bad = tmp_path / "expanded.pt"
    torch.save(state, bad)
    proc = _child("""
        import sys
        from probunet.models.checkpoint import CheckpointError, load_checkpoint
        try:
            load_checkpoint(sys.argv[1])
            print("LOADED")
        except CheckpointError as exc:
            print(exc)
    """, bad, timeout=60, mem_gb=6)
    assert "expanded.pt" in proc.stdout and "far more than the file" in proc.stdout, proc.stdout + proc.stderr[-500:]


# ----------------------------------------------------------------------------- row 9: checkpoint size


def test_config_claiming_a_huge_model_is_refused_before_building(tiny_ckpt, tmp_path):
    state = torch.load(tiny_ckpt, weights_only=True)
    state["config"]["model"]["features"] = [4096]  # ~9e8 parameters over ~6000 stored values
    bad = tmp_path / "claims.pt"
    save_checkpoint(state, bad)  # a valid digest
    proc = _child("""
        import resource, sys, time
        from probunet.models.checkpoint import CheckpointError, load_model
        t = time.perf_counter()
        try:
            load_model(sys.argv[1])
            print("LOADED")
        except CheckpointError as exc:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{time.perf_counter() - t:.2f}|{peak:.0f}|{exc}")
    """, bad, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, peak_mb, msg = proc.stdout.strip().split("|", 2)
    assert "claims.pt" in msg and "nothing was built" in msg and "the file holds" in msg
    assert float(peak_mb) < 2000, peak_mb  # the 3.7 GB model was never allocated
    model, cfg, _ = load_model(tiny_ckpt)  # a matching checkpoint still loads
    assert tuple(cfg.model.features) == tuple(load_config(DEBUG).model.features)


# ----------------------------------------------------------------------------- row 4: LIDC pickles


def _lidc_file(path: Path, **entry) -> Path:
    base = {"image": np.zeros((4, 4)), "masks": [np.zeros((4, 4), np.uint8)], "series_uid": "1.2.3"}
    base.update(entry)
    path.write_bytes(pickle.dumps({"LIDC-IDRI-0001_s0": base}, protocol=4))
    return path


def test_lidc_series_uid_shared_structure_is_refused_fast(tmp_path):
    path = _lidc_file(tmp_path / "uid.pickle", series_uid=_shared())
    proc = _child("""
        import sys, time
        from probunet.config import load_config
        from probunet.data.lidc_pickle import read_cases
        from probunet.data.errors import DataError
        t = time.perf_counter()
        try:
            read_cases(load_config(None, ["data.format=lidc_pickle", "data.path=" + sys.argv[1]]).data)
            print("LOADED")
        except DataError as exc:
            print(f"{time.perf_counter() - t:.3f}|{exc}")
    """, path, timeout=60)
    seconds, msg = proc.stdout.strip().split("|", 1)
    assert float(seconds) < 1.0 and "uid.pickle" in msg and "'series_uid' is a list" in msg, msg


def test_lidc_300000_masks_are_refused_before_stacking(tmp_path):
    from probunet.data import lidc_pickle

    m = np.zeros((4, 4), np.uint8)
    path = _lidc_file(tmp_path / "many.pickle", masks=[m] * 300000)
    data = lidc_pickle.safe_load(path)
    t = time.perf_counter()
    with pytest.raises(DataError) as info:
        lidc_pickle.items_from_dict(data, str(path))
    assert time.perf_counter() - t < 0.5
    assert str(info.value) == f"{path}: case 'LIDC-IDRI-0001_s0': 300000 rater masks, at most 64"
    with pytest.raises(DataError, match="a rater mask is a list"):
        lidc_pickle.items_from_dict(lidc_pickle.safe_load(_lidc_file(tmp_path / "l.pickle", masks=[[[0]]])), "l")
    with pytest.raises(DataError, match="'image' is a list"):
        lidc_pickle.items_from_dict(lidc_pickle.safe_load(_lidc_file(tmp_path / "i.pickle", image=_shared(3))), "i")
    ok = lidc_pickle.items_from_dict(lidc_pickle.safe_load(_lidc_file(tmp_path / "ok.pickle", masks=[m] * 64)), "ok")
    assert ok[0]["labels"].shape == (64, 4, 4)


# ----------------------------------------------------------------------------- row 5: names not UTF-8


def test_seed_of_a_name_that_is_not_utf8_uses_its_bytes():
    name = os.fsdecode(b"bad\xff")  # as os.listdir returns it
    expected = int.from_bytes(hashlib.sha256(b"probunet-sample:0:bad\xff").digest()[:8], "little") & (2**63 - 1)
    assert case_seed(0, name) == expected
    ascii_expected = int.from_bytes(hashlib.sha256(b"probunet-sample:3:case1").digest()[:8], "little") & (2**63 - 1)
    assert case_seed(3, "case1") == ascii_expected  # valid names: the seeds of before
    assert _seed_of("\ud800") >= 0  # a lone surrogate that is no file name: no exception


def _nifti(path: Path, shape=(16, 16), seed=0) -> None:
    import nibabel as nib

    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), os.fsdecode(path))


def test_predict_with_a_name_that_is_not_utf8_and_a_fifo(tiny_ckpt, tmp_path):
    from probunet.inference.folder import predict_folder, read_summary

    inp = tmp_path / "in"
    inp.mkdir()
    _nifti(inp / "good.nii.gz")
    _nifti(os.path.join(os.fsencode(inp), b"bad\xff.nii.gz"), seed=1)  # a str with a surrogate escape
    os.mkfifo(inp / "pipe.nii.gz")
    summary = predict_folder(tiny_ckpt, inp, tmp_path / "out", num_samples=2, workers=1)
    rows = {r["case"]: r for r in read_summary(summary.summary_path)}
    assert rows["good"]["status"] == "ok"
    assert rows["bad\\xff"]["status"] == "ok"  # shown with its byte escaped in the UTF-8 summary
    assert rows["pipe"]["status"] == "error" and "a FIFO" in rows["pipe"]["error"]
    assert (tmp_path / "out" / os.fsdecode(b"bad\xff") / "case.json").is_file()


# ----------------------------------------------------------------------------- row 6: special files


def test_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "scan.nii.gz"
    os.mkfifo(fifo)
    proc = _child("""
        import sys
        from probunet.data import io
        from probunet.data.errors import DataError
        try:
            io.read_image(sys.argv[1])
            print("READ")
        except DataError as exc:
            print(exc)
    """, fifo, timeout=60)
    assert "a FIFO (named pipe), not a regular file" in proc.stdout and str(fifo) in proc.stdout


def test_special_files_are_refused(tmp_path):
    from probunet.data.guards import check_regular_file

    for path, needle in (("/dev/zero", "a character device"), ("/proc/self/mem", "special system file")):
        with pytest.raises(DataError, match=needle):
            io.read_image(path)
    with pytest.raises(DataError, match="a folder"):
        check_regular_file(tmp_path)
    assert check_regular_file(tmp_path, allow_dir=True)


def _mhd(path: Path, data_file: str, size=(4, 4)) -> Path:
    path.write_text(f"ObjectType = Image\nNDims = 2\nDimSize = {size[0]} {size[1]}\nElementType = MET_UCHAR\n"
                    f"ElementDataFile = {data_file}\n")
    return path


def test_mhd_data_file_outside_its_folder_is_refused_unless_allowed(tmp_path):
    (tmp_path / "secret.bin").write_bytes(bytes(range(16)))
    scans = tmp_path / "scans"
    scans.mkdir()
    hdr = _mhd(scans / "evil.mhd", "../secret.bin")
    with pytest.raises(DataError, match=r"its data file '.*secret.bin' lies outside the header's folder"):
        io.read_image(hdr)
    array, _ = io.read_image(hdr, allow_external_data_files=True)
    assert array.T.reshape(-1).tolist() == list(range(16))  # (x, y) order of io
    (scans / "own.raw").write_bytes(bytes(16))
    assert io.read_image(_mhd(scans / "own.mhd", "own.raw"))[0].shape == (4, 4)
    for target, needle in (("/dev/zero", "a character device"), ("pipe.raw", "a FIFO")):
        if target == "pipe.raw":
            os.mkfifo(scans / "pipe.raw")
        hdr = _mhd(scans / "z.mhd", target)
        with pytest.raises(DataError, match=needle):
            io.read_image(hdr, allow_external_data_files=True)


def test_detached_nrrd_and_list_headers_are_checked(tmp_path):
    from probunet.data.guards import check_data_files, detached_data_files

    nhdr = tmp_path / "a.nhdr"
    nhdr.write_text("NRRD0004\ntype: uint8\ndimension: 2\nsizes: 4 4\nencoding: raw\ndata file: /etc/hostname\n\n")
    assert detached_data_files(nhdr) == [Path("/etc/hostname")]
    with pytest.raises(DataError, match="outside the header's folder"):
        check_data_files(nhdr)
    lst = _mhd(tmp_path / "b.mhd", "LIST")
    with open(lst, "a") as fh:
        fh.write("s0.raw\n../../x.raw\n")
    assert detached_data_files(lst) == [tmp_path / "s0.raw", tmp_path / "../../x.raw"]
    assert detached_data_files(_mhd(tmp_path / "c.mha", "LOCAL")) == []


def test_file_list_fifo_nul_byte_and_proc(tmp_path):
    from probunet.inference.folder import find_inputs

    inp = tmp_path / "in"
    inp.mkdir()
    _nifti(inp / "a.nii.gz")
    fl = tmp_path / "list.txt"
    fl.write_bytes(b"a.nii.gz\nb\x00c.nii.gz\n")
    with pytest.raises(ValueError, match=r"list\.txt, line 2: a NUL byte"):
        find_inputs(inp, file_list=fl)
    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)
    with pytest.raises(ValueError, match="a FIFO"):
        find_inputs(inp, file_list=pipe)
    fl.write_bytes(b"a.nii.gz\n/proc/self/mem\n")
    cases = find_inputs(inp, file_list=fl)
    assert [c.path for c in cases] == [inp / "a.nii.gz", Path("/proc/self/mem")]
    with pytest.raises(DataError, match="special system file"):
        io.read_image(cases[1].path)


# ----------------------------------------------------------------------------- row 7: YAML


BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{p}' if p else 'lol'] * 9)}]\n"
               for p, a in zip([None, "a", "b", "c", "d", "e", "f", "g", "h"], "abcdefghi")) + "train:\n  steps: *i\n"


def test_yaml_alias_bomb_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 1024
    proc = _child("""
        import sys, time
        from probunet.config import ConfigError, load_config
        t = time.perf_counter()
        try:
            load_config(sys.argv[1])
            print("LOADED")
        except ConfigError as exc:
            print(f"{time.perf_counter() - t:.3f}|{exc}")
    """, path, timeout=60)
    seconds, msg = proc.stdout.strip().split("|", 1)
    assert float(seconds) < 1.0 and "bomb.yaml" in msg and "anchors and aliases are not allowed" in msg, msg
    with pytest.raises(ConfigError, match="override 'train.steps': refused: an alias"):
        load_config(DEBUG, ["train.steps=[*a]"])


def test_error_messages_show_a_short_prefix_of_a_value():
    t = time.perf_counter()
    text = _shown(_shared())
    assert len(text) <= 80 and time.perf_counter() - t < 0.1
    with pytest.raises(ConfigError) as info:
        load_config(DEBUG, ["data.split.protocol=" + "x" * 5000])
    assert "data.split.protocol" in str(info.value) and len(str(info.value)) < 300
    assert len(_shown(10 ** 5000)) <= 80  # past Python's digit limit: no ValueError


# ----------------------------------------------------------------------------- rows 12, 14: config ranges


def test_duplicate_keys_are_an_error_naming_the_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  steps: 3\n  batch_size: 2\n  steps: 5\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert str(info.value).startswith(f"config file {path}: refused: duplicate key 'train.steps' (lines 2 and 4)")
    path.write_text("train:\n  steps: 3\neval:\n  steps: 3\n")  # the same name in two sections is fine
    assert load_yaml(path)["eval"] == {"steps": 3}


@pytest.mark.parametrize("override,key", [
    ("train.batch_size=1e21", "train.batch_size"), ("eval.batch_size=1e21", "eval.batch_size"),
    ("train.seed=1e30", "train.seed"), ("train.seed=-1", "train.seed"), ("eval.seed=1e30", "eval.seed"),
    ("data.split.seed=1e30", "data.split.seed"), ("data.synthetic.seed=1e30", "data.synthetic.seed"),
    ("data.num_workers=1e9", "data.num_workers"), ("data.num_raters=100000", "data.num_raters"),
    ("data.max_voxels=0", "data.max_voxels"), ("data.crop_size=100000", "data.crop_size"),
])
def test_range_errors_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(DEBUG, [override])


def test_batch_size_1e21_cli_exit_2_without_a_hang(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "probunet", "train", DEBUG, "train.batch_size=1e21",
                           "--out", str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True,
                          env=_env(), timeout=120, cwd=str(ROOT))
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "train.batch_size" in lines[0], proc.stderr[-1000:]
    assert not (tmp_path / "run").exists()


def test_max_voxels_default_and_config_key():
    from probunet.data.guards import DEFAULT_MAX_VOXELS

    cfg = load_config(DEBUG)
    assert cfg.data.max_voxels == DEFAULT_MAX_VOXELS == 2**28
    assert load_config(DEBUG, ["data.max_voxels=1000", "data.crop_size=null"]).data.max_voxels == 1000


# ----------------------------------------------------------------------------- row 9: size-claiming headers


def _nifti_header_only(path: Path, shape=(32767, 32767)) -> Path:
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))
    return path


def _png_header_only(path: Path, width=20000, height=20000) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))
    return path


def test_headers_claiming_huge_images_are_refused_before_reading(tmp_path):
    nii = _nifti_header_only(tmp_path / "tiny.nii.gz")
    png = _png_header_only(tmp_path / "huge.png")
    assert nii.stat().st_size < 200 and png.stat().st_size < 200
    proc = _child("""
        import resource, sys
        from probunet.data import io
        from probunet.data.lidc_crops import read_png
        from probunet.data.errors import DataError
        for path in sys.argv[1:]:
            for read in (io.read_image, read_png) if path.endswith(".png") else (io.read_image,):
                try:
                    read(path)
                    print("READ", path)
                except DataError as exc:
                    print(exc)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """, nii, png, timeout=120, mem_gb=8)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4, proc.stdout + proc.stderr[-1000:]
    assert "tiny.nii.gz: its header claims 32767x32767 = 1,073,676,289 voxels, over data.max_voxels" in lines[0]
    assert all("huge.png: its header claims 20000x20000" in l and "data.max_voxels" in l for l in lines[1:3]), lines
    assert int(lines[3]) < 1500  # MB: nothing of the claimed size was allocated


def test_max_voxels_reaches_the_readers(tmp_path):
    from probunet.data.folder import read_cases

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    _nifti(tmp_path / "images" / "c1.nii.gz", shape=(32, 32))
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.uint8), np.eye(4)), str(tmp_path / "labels" / "c1_r0.nii.gz"))
    overrides = ["data.format=folder", f"data.path={tmp_path}", "data.image_pattern=images/{case}.nii.gz",
                 "data.mask_pattern=labels/{case}_r{rater}.nii.gz", "data.crop_size=null"]
    assert len(read_cases(load_config(DEBUG, overrides).data)) == 1
    with pytest.raises(DataError, match="32x32 = 1,024 voxels, over data.max_voxels = 1,000"):
        read_cases(load_config(DEBUG, overrides + ["data.max_voxels=1000"]).data)


def test_predict_max_voxels_option(tiny_ckpt, tmp_path):
    from probunet.inference.folder import predict_folder

    inp = tmp_path / "in"
    inp.mkdir()
    _nifti(inp / "a.nii.gz", shape=(16, 16))
    _nifti_header_only(inp / "claims.nii.gz")
    s = predict_folder(tiny_ckpt, inp, tmp_path / "out", num_samples=1, workers=1)
    assert [r["status"] for r in s.rows] == ["ok", "error"] and "data.max_voxels" in s.rows[1]["error"]
    s = predict_folder(tiny_ckpt, inp, tmp_path / "out2", num_samples=1, workers=1, max_voxels=100)
    assert s.rows[0]["status"] == "error" and "16x16 = 256 voxels, over data.max_voxels = 100" in s.rows[0]["error"]


# ----------------------------------------------------------------------------- row 14: native diagnostics


def test_native_library_diagnostics_stay_off_the_terminal(tmp_path):
    junk = {"junk.h5": b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 3,
            "junk.mha": b"ObjectType = Image\nNDims = 2\nDimSize = 4 4\n" + bytes(100),
            "junk.png": b"\x89PNG\r\n\x1a\n" + bytes(range(100))}
    for name, data in junk.items():
        (tmp_path / name).write_bytes(data)
    proc = _child("""
        import sys
        from probunet.data import io
        from probunet.data.errors import DataError
        for path in sys.argv[1:]:
            try:
                io.read_image(path)
            except DataError as exc:
                print("REFUSED", path)
    """, *(tmp_path / n for n in junk), timeout=120)
    assert proc.stdout.count("REFUSED") == 3, proc.stdout + proc.stderr
    for needle in ("HDF5-DIAG", "MetaImage", "libpng", "MetaObject"):
        assert needle not in proc.stderr and needle not in proc.stdout, proc.stderr[-2000:]


def test_batch_stream_refuses_a_huge_batch_before_gathering():
    from probunet.data.stream import BatchStream

    with pytest.raises(ValueError, match=r"train.batch_size: must be in \[1, 65536\]"):
        BatchStream(None, 10**21, 0, None)  # checked before the dataset is touched
