"""Hostile and malformed input: crafted pickles, out-of-range configs, odd argument
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
        assert lidc_pickle.ChunkedFile(fh).read(2**40) == path.read_bytes()
    with pytest.raises(DataError, match=r"huge\.pickle: not a readable pickle"):
        lidc_pickle.safe_load(path)


def test_complex_image_in_a_pickle_is_refused(tmp_path):
    image, masks = _arrays()
    path = tmp_path / "cplx.pickle"
    lidc_pickle.write_pickle({"LIDC-IDRI-0001_s0": {"image": image.astype(np.complex64), "masks": masks,
                                                     "series_uid": "1"}}, path)
    with pytest.raises(DataError, match=r"cplx\.pickle\['LIDC-IDRI-0001_s0'\]: the image is complex-valued"):
        lidc_pickle.read_cases(type("D", (), {"path": str(path), "pickle_files": None, "binarize": False})())


# ----------------------------------------------------------------------------- config ranges and model size

from probunet.config import ConfigError, ModelConfig, from_dict, load_config  # noqa: E402
from probunet.models.registry import MAX_MODEL_PARAMETERS, estimate_model_parameters  # noqa: E402


@pytest.mark.parametrize("kw", [
    {},
    {"features": (4, 8), "latent_dim": 2, "fcomb_layers": 2},
    {"spatial_dims": 3, "features": (4, 8, 16), "norm": "batch"},
    {"norm": "group", "features": (8, 16), "prior": "standard", "fcomb_layers": 1, "num_classes": 3,
     "in_channels": 2, "convs_per_level": 2},
    {"norm": "instance", "features": (8, 16, 24), "latent_dim": 11},
])
def test_parameter_estimate_equals_the_built_model(kw):
    from probunet.models import build_model

    m = ModelConfig(**kw)
    assert estimate_model_parameters(m) == sum(p.numel() for p in build_model(m).parameters())


@pytest.mark.parametrize("override, key", [
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.log_every=0", "train.log_every"),
    ("train.val_every=-3", "train.val_every"),
    ("train.device=tpu", "train.device"),
    ("train.device=cuda:x", "train.device"),
    ("train.steps=0", "train.steps"),
    ("train.steps=.nan", "train.steps"),
    ("train.steps=.inf", "train.steps"),
    ("train.steps=1e400", "train.steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.grad_clip=.nan", "train.grad_clip"),
    ("train.beta=-1", "train.beta"),
    ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("model.num_classes=1000000", "model.num_classes"),
    ("model.num_classes=1", "model.num_classes"),
    ("model.latent_dim=0", "model.latent_dim"),
    ("model.latent_dim=1e9", "model.latent_dim"),
    ("model.fcomb_layers=0", "model.fcomb_layers"),
    ("model.convs_per_level=0", "model.convs_per_level"),
    ("model.convs_per_level=1000", "model.convs_per_level"),
    ("model.in_channels=0", "model.in_channels"),
    ("model.features=[a,b]", "model.features"),
    ("model.features=[]", "model.features"),
    ("model.features=[0,4]", "model.features"),
    ("model.features=[4.5,8]", "model.features"),
    ("model.features=[100000]", "model.features"),
    ("model.features=[4,4,4,4,4,4,4,4,4,4,4]", "model.features"),
    ("data.ct_window=[a,1]", "data.ct_window"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("data.augment.prob=2", "data.augment.prob"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as exc:
        load_config(ROOT / "configs/debug.yaml", [override])
    msg = str(exc.value)
    assert f"'{key}'" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_valid_devices_pass_validation(device):
    assert load_config(None, [f"train.device={device}"]).train.device == device


def test_a_model_too_large_is_refused_from_its_config_alone(monkeypatch):
    import probunet.models as models

    def never(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("build_model called")

    monkeypatch.setattr(models, "build_model", never)
    with pytest.raises(ConfigError, match=r"'model\.features': the model would have .* parameters .* GB"):
        load_config(None, ["model.features=[8192, 8192, 8192, 8192]"])
    with pytest.raises(ConfigError, match=r"'model\.features': the model would have"):
        load_config(None, ["model.spatial_dims=3", "model.features=[2048, 2048]", "model.convs_per_level=8"])
    m = load_config(None, ["model.features=[1024, 2048, 4096]"]).model  # large but under the limit
    assert estimate_model_parameters(m) < MAX_MODEL_PARAMETERS
    # a config stored in a checkpoint goes through the same checks
    stored = load_config(ROOT / "configs/debug.yaml").to_dict()
    stored["model"]["latent_dim"] = 1e9
    with pytest.raises(ConfigError, match=r"'model\.latent_dim': must be in \[1, 4096\], got 1000000000"):
        from_dict(stored)


def test_binary_config_file_names_the_file(tmp_path, capsys):
    from probunet.cli import main

    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" + bytes(range(256)))
    with pytest.raises(ConfigError, match=r"weights\.yaml: not a YAML text file"):
        load_config(path)
    assert main(["--quiet", "train", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights.yaml" in err and "Traceback" not in err


@pytest.mark.parametrize("override, key", [
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.device=tpu", "train.device"),
    ("model.num_classes=1000000", "model.num_classes"),
    ("model.features=[a,b]", "model.features"),
    ("train.steps=.nan", "train.steps"),
    ("train.lr=.inf", "train.lr"),
])
def test_cli_range_errors_exit_2_one_line(tmp_path, capsys, override, key):
    from probunet.cli import main

    rc = main(["--quiet", "train", str(ROOT / "configs/debug.yaml"), "--out", str(tmp_path / "r"), override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"'{key}'" in err, err
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- options and overrides in any order


def test_options_and_overrides_in_any_order(tmp_path):
    import yaml

    from probunet.cli import main

    debug = str(ROOT / "configs/debug.yaml")
    fast = ["train.val_every=100", "train.checkpoint_every=100"]
    runs = {
        "after": ["train", debug, "--out", str(tmp_path / "after"), "train.steps=2", *fast, "--no-progress"],
        "between": ["train", debug, "train.steps=2", "--out", str(tmp_path / "between"), fast[0], "--no-progress",
                    fast[1]],
        "before": ["train", debug, "train.steps=2", *fast, "--out", str(tmp_path / "before"), "--no-progress"],
    }
    for name, argv in runs.items():
        assert main(["--quiet", *argv]) == 0, name
        saved = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert saved["train"]["steps"] == 2 and saved["train"]["val_every"] == 100, name
        assert saved["train"]["checkpoint_every"] == 100, name
    # a key given twice, across the options, is refused (which one was meant?) and starts nothing
    assert main(["--quiet", "train", debug, "train.steps=5", "--out", str(tmp_path / "last"), "train.steps=1",
                 *fast, "--no-progress"]) == 2
    assert not (tmp_path / "last" / "config.yaml").exists()
    run = tmp_path / "after"
    for name, argv in {
        "ev_after": ["evaluate", str(run), "--num-samples", "2", "--out", str(tmp_path / "ev_after.json"),
                     "eval.split=val", "--no-progress"],
        "ev_before": ["evaluate", str(run), "eval.split=val", "--num-samples", "2", "--no-progress", "--out",
                      str(tmp_path / "ev_before.json")],
    }.items():
        assert main(["--quiet", *argv]) == 0, name
        summary = json.loads((tmp_path / f"{name}.json").read_text())
        assert summary["split"] == "val" and summary["num_samples"] == 2, name
    # once through the console entry point, overrides after the options
    proc = subprocess.run([sys.executable, "-m", "probunet", "--quiet", "evaluate", str(run), "--num-samples", "2",
                           "--out", str(tmp_path / "ev_cli.json"), "--no-progress", "eval.split=train"],
                          capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "ev_cli.json").read_text())["split"] == "train"
    proc = subprocess.run([sys.executable, "-m", "probunet", "--quiet", "train", debug, "--out",
                           str(tmp_path / "cli"), "train.steps=1", *fast, "--no-progress"],
                          capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["train"]["steps"] == 1


def test_unknown_options_are_still_refused(capsys):
    from probunet.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "configs/debug.yaml", "train.steps=2", "--bogus"])
    assert exc.value.code == 2 and "--bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # predict takes no overrides
        main(["predict", "ck.pt", "in", "out", "train.steps=2"])
    assert exc.value.code == 2 and "train.steps=2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- complex images


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_complex_images_are_refused_naming_the_file(tmp_path, suffix):
    from probunet.data.io import read_image

    array = (np.arange(16 * 16).reshape(16, 16) * (1 + 2j)).astype(np.complex64)
    path = tmp_path / f"cplx{suffix}"
    if suffix == ".nii.gz":
        import nibabel as nib

        nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    else:
        import SimpleITK as sitk

        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(DataError, match=rf"cplx{suffix.replace('.', '[.]')}: the image is complex-valued") as exc:
        read_image(path)
    assert "\n" not in str(exc.value)
    real = tmp_path / f"real{suffix}"
    if suffix == ".nii.gz":
        nib.save(nib.Nifti1Image(array.real.copy(), np.eye(4)), str(real))
    else:
        sitk.WriteImage(sitk.GetImageFromArray(array.real.copy()), str(real))
    assert read_image(real)[0].dtype == np.float32
