"""`probunet train` with the shipped data configs on tiny data of each format family (a few steps)."""

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np

from probunet.cli import main
from probunet.data import synthetic

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.features=[4,8]", "model.latent_dim=2", "model.fcomb_layers=2", "train.steps=2", "train.batch_size=2",
        "train.val_every=2", "train.val_cases=2", "train.val_samples=2", "train.log_every=1", "train.device=cpu",
        "train.checkpoint_every=2", "eval.num_samples=2"]


def _train(config, out, *over):
    rc = main(["--quiet", "train", "--no-progress", "--out", str(out), str(REPO / "configs" / config), *over, *TINY])
    assert rc == 0
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "splits.json").is_file()
    assert (out / "config.yaml").is_file()


def test_train_qubiq_config(tmp_path):
    synthetic.write_qubiq(synthetic.generate(6, 32, 2, 3, seed=0), tmp_path / "q")
    _train("qubiq.yaml", tmp_path / "run", f"data.path={tmp_path / 'q'}")


def test_train_lidc_pickle_config(tmp_path):
    rng = np.random.default_rng(0)
    entries = {f"LIDC-IDRI-{p:04d}_slice{k}": {"image": rng.random((32, 32)),
                                                "masks": [(rng.random((32, 32)) > 0.8).astype(np.uint8)] * 4,
                                                "series_uid": f"1.2.{p}"} for p in range(5) for k in range(2)}
    with open(tmp_path / "data_lidc.pickle", "wb") as fh:
        pickle.dump(entries, fh)
    _train("lidc.yaml", tmp_path / "run", f"data.path={tmp_path / 'data_lidc.pickle'}", "data.crop_size=32")


def test_train_folder3d_config(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(5):
        img = rng.normal(size=(12, 10, 8)).astype(np.float32)
        (tmp_path / "d" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "labels").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(tmp_path / "d" / "images" / f"c{c}.nii.gz"))
        for r in range(2):
            m = (rng.random((12, 10, 8)) > 0.7).astype(np.uint8)
            nib.save(nib.Nifti1Image(m, np.eye(4)), str(tmp_path / "d" / "labels" / f"c{c}_rater{r}.nii.gz"))
    _train("folder3d.yaml", tmp_path / "run", f"data.path={tmp_path / 'd'}", "data.crop_size=[8,8,8]",
           "train.amp=off")


def test_bad_data_is_a_one_line_error(tmp_path, capsys):
    synthetic.write_qubiq(synthetic.generate(3, 16, 2, 2, seed=0), tmp_path / "q")
    bad = tmp_path / "q" / "case_0001" / "task01_seg02.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16), 0.5, np.float32), np.eye(4)), str(bad))
    rc = main(["--quiet", "train", "--no-progress", "--out", str(tmp_path / "run"),
               str(REPO / "configs" / "qubiq.yaml"), f"data.path={tmp_path / 'q'}", *TINY])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(bad) in err and "non-integer" in err and "Traceback" not in err
