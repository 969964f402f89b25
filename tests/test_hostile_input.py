"""Hostile and malformed input (issue 11): crafted pickles, out-of-range configs, odd argument
orders, complex images, binary config files. Every one is a one-line error naming the file or
key (CLI: exit 2), refused before anything large is built."""

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from probunet.data import lidc_pickle
from probunet.data.validate import DataError

ROOT = Path(__file__).resolve().parent.parent

try:
    from numpy._core import multiarray as _multiarray  # numpy >= 2
except ImportError:  # pragma: no cover
    from numpy.core import multiarray as _multiarray


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ----------------------------------------------------------------------------- crafted pickles
# Objects whose __reduce__ writes exactly the opcodes an attacker would (the pickler writes
# them; these classes never exist on the loading side).


class _Dtype:
    def __init__(self, spec, state=None, align=False, copy=True):
        self.args, self.state = (spec, align, copy), state

    def __reduce__(self):
        return (np.dtype, self.args) if self.state is None else (np.dtype, self.args, self.state)


class _Call:
    def __init__(self, func, *args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


_NO_REFS = (3, "|", None, None, None, -1, -1, 0)  # an object dtype's "holds references" flags cleared


def _lidc(series_uid, image=None, masks=None):
    return {"LIDC-IDRI-0001_s0": {"image": np.zeros((8, 8)) if image is None else image,
                                  "masks": [np.zeros((8, 8), np.uint8)] if masks is None else masks,
                                  "series_uid": series_uid}}


def _crafted() -> dict:
    """name -> (pickled bytes, text the refusal must contain)."""
    f8 = np.dtype("f8").__reduce__()[2]
    cases = {
        # issue 11 row 1: dtype('O8') with its flags cleared, then scalar(dtype, raw bytes) -> segfault
        "object_scalar": (_lidc(_Call(_multiarray.scalar, _Dtype("O8", _NO_REFS), b"AAAAAAAA")), "'O8'"),
        "object_dtype_plain": (_lidc(_Dtype("O8")), "'O8'"),
        "float_dtype_flags": (_lidc(_Call(_multiarray.scalar, _Dtype("f8", f8[:7] + (63,)), b"AAAAAAAA")),
                              "state numpy does not write"),
        "float_dtype_elsize": (_lidc(_Dtype("f8", f8[:5] + (64, 1, 0))), "state numpy does not write"),
        "void_dtype": (_lidc(_Call(_multiarray.scalar, _Dtype("V8"), b"AAAAAAAA")), "'V8'"),
        "structured_dtype": (_lidc(_Dtype([("a", "O")])), "dtype"),
        "datetime_dtype": (_lidc(_Dtype("M8")), "'M8'"),
        "string_dtype": (_lidc(_Call(_multiarray.scalar, _Dtype("U8"), b"A" * 32)), "'U8'"),
        # loads (a dtype is a valid value), but as a copy: the BUILD must not flip numpy's shared float64
        "shared_dtype_no_copy": (_lidc(_Dtype("f8", (3, ">", None, None, None, -1, -1, 0), copy=False)), "LOADED"),
        "scalar_short_bytes": (_lidc(_Call(_multiarray.scalar, _Dtype("f8", f8), b"AA")), "from 2 bytes"),
        "array_state_short": (_lidc("1", image=_Call(_multiarray._reconstruct, np.ndarray, (0,), b"b",
                                                     state=(1, (1000, 1000), np.dtype("f8"), False, b"x" * 8))),
                              "from 8 bytes"),
        "array_state_object": (_lidc("1", image=_Call(_multiarray._reconstruct, np.ndarray, (0,), b"b",
                                                      state=(1, (1,), _Dtype("O8", _NO_REFS), False, b"A" * 8))),
                               "'O8'"),
        "reconstruct_big": (_lidc("1", image=_Call(_multiarray._reconstruct, np.ndarray, (10**6, 10**6), b"b")),
                            "placeholder of shape"),
        "ndarray_called": (_lidc("1", image=_Call(np.ndarray, (4,), "f8", b"x")), "a call of ndarray"),
        "bytes_huge": (_lidc(_Call(bytes, 10**12)), "bytes() of a int"),
    }
    out = {}
    for name, (obj, needle) in cases.items():
        out[name] = (pickle.dumps(obj, protocol=2), needle)
    return out


_LOADER = textwrap.dedent("""
    import json, sys
    from probunet.config import load_config
    from probunet.data.lidc_pickle import read_cases
    from probunet.data.validate import DataError
    out = {}
    for path in sys.argv[1:]:
        try:
            read_cases(load_config(None, ["data.format=lidc_pickle", "data.path=" + path]).data)
            out[path] = "LOADED"
        except DataError as exc:
            out[path] = "DataError: " + str(exc)
        print(path, "done", file=sys.stderr, flush=True)
    import numpy as np
    out["float64"] = np.dtype("f8").str + " " + np.dtype(float).str
    print(json.dumps(out))
""")


def test_crafted_dtype_pickles_are_refused_in_a_subprocess(tmp_path):
    """Loaded in a child process: a regression that segfaults shows as a failure, not a dead pytest."""
    cases = _crafted()
    paths = {}
    for name, (raw, _) in cases.items():
        paths[name] = tmp_path / f"{name}.pickle"
        paths[name].write_bytes(raw)
    proc = subprocess.run([sys.executable, "-c", _LOADER, *map(str, paths.values())], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, f"loader died with {proc.returncode} after: {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, needle) in cases.items():
        msg = result[str(paths[name])]
        if needle == "LOADED":
            assert msg == "LOADED", (name, msg)
            continue
        assert msg.startswith("DataError: "), (name, msg)
        assert str(paths[name]) in msg and "refused to load this pickle" in msg, (name, msg)
        assert "\n" not in msg, (name, msg)
        if needle:
            assert needle in msg, (name, msg)
    # numpy's shared float64 dtype was never touched by a BUILD
    assert result["float64"] == f"{np.dtype('f8').str} {np.dtype('f8').str}"


def _evil_lidc_pickle(tmp_path) -> Path:
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(_lidc(_Call(_multiarray.scalar, _Dtype("O8", _NO_REFS), b"AAAAAAAA")),
                                  protocol=2))
    return path


def _one_line_exit_2(proc, needle):
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    lines = [ln for ln in proc.stderr.strip().splitlines() if "error:" in ln]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_and_evaluate_refuse_the_crafted_pickle_exit_2(tmp_path):
    evil = _evil_lidc_pickle(tmp_path)
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"data:\n  format: lidc_pickle\n  path: {evil}\n")
    train = subprocess.run([sys.executable, "-m", "probunet", "--quiet", "train", str(cfg), "--out",
                            str(tmp_path / "run_evil"), "--no-progress"],
                           capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    _one_line_exit_2(train, str(evil))
    assert "'O8'" in train.stderr
    # evaluate: a real (tiny) checkpoint, pointed at the crafted file
    from probunet.cli import main

    run = tmp_path / "run"
    assert main(["--quiet", "train", str(ROOT / "configs/debug.yaml"), "train.steps=1", "train.val_every=100",
                 "--out", str(run), "--no-progress"]) == 0
    ev = subprocess.run([sys.executable, "-m", "probunet", "--quiet", "evaluate", str(run),
                         "data.format=lidc_pickle", f"data.path={evil}", "--no-progress", "--num-samples", "2"],
                        capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    _one_line_exit_2(ev, str(evil))


# ----------------------------------------------------------------------------- legitimate pickles still load


def _arrays():
    rng = np.random.default_rng(0)
    image = rng.random((8, 8)).astype(np.float32)
    masks = [(rng.random((8, 8)) > 0.5).astype(np.uint8) for _ in range(3)]
    return image, masks


class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy's functions under their numpy 1.x module names (numpy.core.*)."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if not module.startswith("numpy._core"):
            return super().save_global(obj, name)
        module, name = module.replace("numpy._core", "numpy.core"), name or obj.__qualname__
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[type(textwrap.dedent)] = save_global  # Python functions (numeric._frombuffer)


def _numpy1_spelling(obj, protocol) -> bytes:
    import io

    buf = io.BytesIO()
    _Numpy1Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("spelling", ["numpy._core", "numpy.core"])
def test_plain_arrays_and_scalars_load_in_every_protocol(tmp_path, protocol, spelling):
    image, masks = _arrays()
    data = {"a": {"image": image, "masks": masks, "series_uid": "1.2.3"},
            "b": {"image": image.astype(">f8"), "masks": np.stack(masks).astype(bool),
                  "series_uid": np.float64(4.5)},
            "c": {"image": np.asfortranarray(image), "masks": [m.astype(np.int64) for m in masks],
                  "series_uid": "x", "extra": [np.float32(1.5), np.uint8(3), np.bool_(True), np.complex64(1j),
                                               np.zeros((0,), np.int16), (1, 2.0, None, b"b", {"s"})]}}
    raw = pickle.dumps(data, protocol=protocol)
    expected = pickle.loads(raw)  # as numpy itself reads it (a legitimate file: safe here)
    if spelling == "numpy.core":  # as numpy 1.x writes it
        raw = _numpy1_spelling(data, protocol)
        assert b"numpy.core" in raw and b"numpy._core" not in raw
    path = tmp_path / "ok.pickle"
    path.write_bytes(raw)
    back = lidc_pickle.safe_load(path)
    assert back.keys() == data.keys()
    np.testing.assert_array_equal(back["a"]["image"], image)
    assert back["a"]["image"].dtype == np.float32 and back["a"]["series_uid"] == "1.2.3"
    assert back["b"]["image"].dtype == expected["b"]["image"].dtype
    np.testing.assert_array_equal(back["b"]["image"], image.astype(np.float64))
    assert back["b"]["masks"].dtype == bool and back["b"]["series_uid"] == np.float64(4.5)
    assert back["c"]["image"].flags.f_contiguous
    np.testing.assert_array_equal(back["c"]["image"], image)
    extra = back["c"]["extra"]
    assert [type(v) for v in extra[:4]] == [np.float32, np.uint8, np.bool_, np.complex64]
    assert extra[:4] == [np.float32(1.5), np.uint8(3), np.bool_(True), np.complex64(1j)]
    assert extra[4].dtype == np.int16 and extra[4].shape == (0,)
    assert extra[5] == (1, 2.0, None, b"b", {"s"})
    for i, m in enumerate(masks):
        np.testing.assert_array_equal(back["a"]["masks"][i], m)
    assert np.dtype("f8").byteorder == "="  # the shared dtype is untouched


def test_a_length_in_the_file_never_allocates_more_than_the_file(tmp_path):
    """BINBYTES8 claiming 1 TiB: a short read (a readable error), not a 1 TiB buffer."""
    path = tmp_path / "huge.pickle"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc")
    with open(path, "rb") as fh:
        assert lidc_pickle._ChunkedFile(fh).read(2**40) == path.read_bytes()
    with pytest.raises(DataError, match=r"huge\.pickle: not a readable pickle"):
        lidc_pickle.safe_load(path)


def test_complex_image_in_a_pickle_is_refused(tmp_path):
    image, masks = _arrays()
    path = tmp_path / "cplx.pickle"
    lidc_pickle.write_pickle({"LIDC-IDRI-0001_s0": {"image": image.astype(np.complex64), "masks": masks,
                                                     "series_uid": "1"}}, path)
    with pytest.raises(DataError, match=r"cplx\.pickle\['LIDC-IDRI-0001_s0'\]: the image is complex-valued"):
        lidc_pickle.read_cases(type("D", (), {"path": str(path), "pickle_files": None, "binarize": False})())
