"""The registries of image file formats (probunet.data.formats) and dataset layouts (data.format):
a format or a layout registered here, in the test file, is used by the folder scan, predict's
outputs and --output-format, read_image / write_image and the config, with no other file touched."""

from __future__ import annotations

import numpy as np
import pytest

from probunet.cli import build_parser, parse_args
from probunet.config import ConfigError, from_dict
from probunet.data import formats, io, readers
from probunet.data.errors import DataError
from probunet.inference import find_inputs, output_suffixes
from probunet.options import PredictOptions, from_args
from probunet.utils import atomic_call


def _read_toy(path, max_voxels=None, allow_external_data_files=False):
    array = np.load(path, allow_pickle=False)
    if max_voxels is not None and array.size > max_voxels:
        raise DataError(f"{path}: {array.size} voxels, at most {max_voxels}")
    return array, {"format": "toy", "shape": list(array.shape), "dtype": str(array.dtype)}


def _write_toy(array, meta, path, ndim):
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array), allow_pickle=False)

    atomic_call(path, write, suffix=".toy")


@pytest.fixture
def toy():
    """A toy format (a .npy under the endings .toy.gz and .toy), registered for one test."""
    fmt = formats.register(formats.ImageFormat("toy", (".toy.gz", ".toy"), geometry=False, floats=True,
                                               read=_read_toy, write=_write_toy, output_choice=True))
    yield fmt
    formats.unregister("toy")


def test_a_registered_format_is_scanned_read_written_and_offered(toy, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    image = np.arange(12, dtype=np.float32).reshape(4, 3)
    io.write_image(image, None, inp / "a.toy")
    io.write_image(image * 2, None, inp / "b.toy.gz")
    (inp / "c.txt").write_text("not an image")
    # the scan takes both endings, the double one counted whole in the case id
    assert [(c.case_id, c.path.name) for c in find_inputs(inp)] == [("a", "a.toy"), ("b", "b.toy.gz")]
    assert io.full_suffix("x/b.TOY.GZ") == ".toy.gz" and io.strip_suffix("b.toy.gz") == "b"
    array, meta = io.read_image(inp / "b.toy.gz")
    np.testing.assert_array_equal(array, image * 2)
    assert meta["format"] == "toy"
    # predict's outputs: its own ending (it holds floats), and --output-format toy
    assert output_suffixes(inp / "a.toy") == (".toy", ".toy")
    assert output_suffixes(inp / "a.nii.gz", "toy") == (".toy", ".toy")
    assert "toy" in formats.output_choices() and "toy.gz" in formats.output_choices()
    args = parse_args(build_parser(), ["predict", "ck", "in", "out", "--output-format", "toy"])
    assert from_args(PredictOptions, args).output_format == "toy"
    # without geometry its spacing is not used
    assert not formats.keeps_geometry(inp / "a.toy")

    formats.unregister("toy")
    assert find_inputs(inp) == []  # the toy files are no images any more
    assert "toy" not in formats.output_choices()
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["predict", "ck", "in", "out", "--output-format", "toy"])
    with pytest.raises(DataError, match="cannot write extension '.toy'"):
        io.write_image(image, None, tmp_path / "d.toy")


def test_the_built_in_formats_keep_their_behaviour():
    assert formats.output_choices() == ("same", "nii.gz", "nii", "nrrd", "mha")
    expected = {"a.nii.gz": (".nii.gz", ".nii.gz"), "a.nii": (".nii", ".nii"), "a.nrrd": (".nrrd", ".nrrd"),
                "a.nhdr": (".nrrd", ".nrrd"), "a.mha": (".mha", ".mha"), "a.mhd": (".mha", ".mha"),
                "a.tif": (".tif", ".tif"), "a.tiff": (".tiff", ".tiff"), "a.png": (".png", ".tif"),
                "a.jpg": (".png", ".tif"), "a.jpeg": (".png", ".tif"), "a.bmp": (".png", ".tif"),
                "a.dcm": (".nii.gz", ".nii.gz"), "a.vtk": (".vtk", ".vtk"), "a.unknown": (".nii.gz", ".nii.gz")}
    assert {name: output_suffixes(name) for name in expected} == expected
    assert set(formats.scan_endings()) == {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif",
                                           ".tiff", ".jpg", ".jpeg", ".bmp", ".dcm"}
    assert [n for n in ("a.png", "a.jpg", "a.jpeg", "a.bmp", "a.nii", "a.tif") if not formats.keeps_geometry(n)] \
        == ["a.png", "a.jpg", "a.jpeg", "a.bmp"]
    with pytest.raises(ValueError, match="output format must be one of same, nii.gz, nii, nrrd, mha"):
        output_suffixes("a.nii", "png")


def test_a_declaration_that_cannot_work_is_refused_naming_the_format():
    with pytest.raises(ValueError, match="'dup'.*'.nrrd' belongs to 'nrrd'"):
        formats.register(formats.ImageFormat("dup", (".nrrd",), geometry=True, floats=True, read=_read_toy,
                                             write=_write_toy))
    with pytest.raises(ValueError, match="'nifti' is already registered"):
        formats.register(formats.get("nifti"))
    with pytest.raises(ValueError, match="'half'.*declare outputs"):  # cannot hold predict's float maps
        formats.register(formats.ImageFormat("half", (".half",), geometry=False, floats=False, read=_read_toy,
                                             write=_write_toy))
    with pytest.raises(ValueError, match="'upper'.*lower case"):
        formats.register(formats.ImageFormat("upper", (".UP",), geometry=False, floats=True, read=_read_toy,
                                             write=_write_toy))
    with pytest.raises(ValueError, match="'ro'.*--output-format choice must be writable"):
        formats.register(formats.ImageFormat("ro", (".ro",), geometry=True, floats=True, read=_read_toy,
                                             outputs=(".nii.gz", ".nii.gz"), output_choice=True))
    assert [f.name for f in formats.registered()].count("dup") == 0
    with pytest.raises(KeyError, match="no image format 'dup'"):
        formats.get("dup")


# ----------------------------------------------------------------------------- dataset layouts


def read_cases(data_cfg) -> list[dict]:
    """The toy layout's reader (this module is its module): one 4x4 case."""
    return [{"image": np.zeros((1, 4, 4), np.float32), "labels": np.zeros((1, 4, 4), np.int64),
             "case_id": f"toy:{data_cfg.path}", "meta": {}}]


def test_a_registered_dataset_layout_is_a_config_choice_and_is_read(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.format': 'toy_layout' is not one of: synthetic, .*folder"):
        from_dict({"data": {"format": "toy_layout", "path": str(tmp_path)}})
    readers.register_layout("toy_layout", __name__)
    try:
        cfg = from_dict({"data": {"format": "toy_layout", "path": str(tmp_path)}})
        assert [c["case_id"] for c in readers.read_cases(cfg.data)] == [f"toy:{tmp_path}"]
    finally:
        readers.unregister_layout("toy_layout")
    assert "toy_layout" not in readers.READERS
    with pytest.raises(DataError, match="unknown format 'toy_layout'.*known: synthetic"):
        readers.read_cases(cfg.data)
