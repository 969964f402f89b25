"""Command line behaviour: help, synth, one-line user errors without tracebacks."""

import subprocess
import sys

import pytest

from probunet.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("synth", "train", "evaluate", "predict", "demo"):
        assert cmd in out


def test_synth_writes_qubiq_layout(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["synth", str(out), "--num-cases", "3", "--size", "16"]) == 0
    assert (out / "truth.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["case_0000", "case_0001", "case_0002"]
    assert "wrote 3 cases" in capsys.readouterr().out
    # Never writes into a folder with content.
    assert main(["synth", str(out), "--num-cases", "3", "--size", "16"]) == 2


@pytest.mark.parametrize("argv, needle", [
    (["train", "does/not/exist.yaml"], "not found"),
    (["train", "configs/debug.yaml", "train.bogus=1"], "train.bogus"),
    (["train", "configs/debug.yaml", "nonsense"], "key=value"),
])
def test_user_errors_are_one_line(argv, needle, capsys, tmp_path):
    rc = main(["--quiet", *argv, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_console_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "probunet", "train", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing.yaml" in proc.stderr


def test_train_trains_from_a_synth_folder(tmp_path):
    data = tmp_path / "ds"
    assert main(["synth", str(data), "--num-cases", "12", "--size", "32"]) == 0
    rc = main(["--quiet", "train", "configs/debug.yaml", f"data.path={data}", "train.steps=2",
               "train.val_every=100", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
