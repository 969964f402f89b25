"""Out-of-range sampling options of ``predict`` and ``export`` are refused with one line naming the option
and its allowed range, before anything is written."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probunet.models.checkpoint import save_checkpoint
from probunet.cli import main
from probunet.config import load_config
from probunet.models import build_model
from probunet.options import PredictOptions, parse_roi

DEBUG = str(Path(__file__).resolve().parents[1] / "configs" / "debug.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounds")
    cfg = load_config(DEBUG)
    torch.manual_seed(0)
    ckpt = tmp / "model.pt"
    save_checkpoint({"model": build_model(cfg.model).state_dict(), "config": cfg.to_dict(), "step": 1}, ckpt)
    inp = tmp / "in"
    inp.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)).save(inp / "a.png")
    return ckpt, inp


CASES = [
    ("predict", ["--roi", "-4"], ["--roi", "0 (always the whole image) or a size >= 1", "-4"]),
    ("predict", ["--roi", "16,-4"], ["--roi", "every size per axis", ">= 1"]),
    ("predict", ["--sample-chunk", "-1"], ["--sample-chunk", ">= 1", "0: automatic", "-1"]),
    ("predict", ["--seed", "-1"], ["--seed", "0..2**63-1", "-1"]),
    ("predict", ["--seed", str(2**63)], ["--seed", "0..2**63-1"]),
    ("predict", ["--workers", "100000"], ["--workers", "1..", "at most 4 I/O threads per CPU core", "100000"]),
    ("predict", ["--workers", "0"], ["--workers", "1.."]),
    ("bundle", ["--roi", "-5"], ["--roi", "0 (always the whole image) or a size >= 1", "-5"]),
    ("bundle", ["--seed", "-1"], ["--seed", "0..2**63-1"]),
    ("torchscript", ["--num-samples", "100000"], ["--num-samples", "1..1000", "100000"]),
    ("torchscript", ["--num-samples", "0"], ["--num-samples", "1..1000"]),
]


@pytest.mark.parametrize("kind, argv, needles", CASES, ids=[f"{c[0]}{''.join(c[1])}" for c in CASES])
def test_out_of_range_options_are_one_line_errors(setup, tmp_path, capsys, kind, argv, needles):
    ckpt, inp = setup
    out = tmp_path / "out"
    if kind == "predict":
        command = "predict"
        full = ["predict", str(ckpt), str(inp), str(out), "--device", "cpu", "--no-progress", *argv]
    else:
        command = "export"
        target = out if kind == "bundle" else out / "s.ts"
        full = ["export", str(ckpt), "--format", kind, "--out", str(target), *argv]
    assert main(full) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"probunet {command}: error: "), err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()  # refused before anything was written


def test_in_range_values_still_work(setup, tmp_path):
    """The bounds themselves are accepted: --roi 0, --sample-chunk 0 (automatic), the largest seed."""
    ckpt, inp = setup
    assert main(["predict", str(ckpt), str(inp), str(tmp_path / "p"), "--device", "cpu", "--no-progress",
                 "--roi", "0", "--sample-chunk", "0", "--seed", str(2**63 - 1), "--workers", "1",
                 "--num-samples", "2"]) == 0
    assert (tmp_path / "p" / "a").is_dir()
    assert main(["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "s.ts"),
                 "--num-samples", "1000"]) == 0
    assert parse_roi("0") == 0 and parse_roi([16, 16]) == [16, 16] and parse_roi(np.int64(8)) == 8
    PredictOptions(seed=np.int64(3), roi_size=(16, 16)).check()
    from probunet.options import max_workers

    assert max_workers() >= 64 and PredictOptions(workers=max_workers()).check().workers == max_workers()
