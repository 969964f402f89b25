"""Every model of the zoo through the command line: train, evaluate and predict a few steps,
the zoo's config keys, and the model comparison script."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from probunet.cli import main
from probunet.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ZOO = sorted((REPO / "configs" / "zoo").glob("*.yaml"))
TINY = ["model.features=[4,8]", "model.latent_levels=null", "data.synthetic.num_cases=20", "data.synthetic.size=16", "train.steps=2",
        "train.batch_size=4", "train.log_every=1", "train.val_every=2", "train.val_cases=2", "train.val_samples=2",
        "train.checkpoint_every=2"]


def test_every_model_name_has_a_zoo_config():
    from probunet.models import model_names

    names = {load_config(p).model.name for p in ZOO}
    registered = {n for n in model_names() if not n.startswith("_")}  # tests may register toys
    assert names == registered >= {"prob_unet", "unet", "mc_dropout", "ensemble", "ssn", "hpu_net", "phiseg"}


@pytest.mark.parametrize("config", ZOO, ids=lambda p: p.stem)
def test_train_evaluate_predict_through_the_cli(config, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(config), *TINY, "--out", str(run), "--no-progress"]) == 0
    assert (run / "checkpoints" / "last.pt").is_file()
    assert main(["evaluate", str(run), "--num-samples", "3", "--no-progress"]) == 0
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["num_samples"] == 3 and np.isfinite(summary["metrics"]["ged"]["mean"])
    assert 0.0 <= summary["metrics"]["qubiq"]["mean"] <= 1.0
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((16, 16)).astype(np.float32), np.eye(4)), str(inp / "c1.nii.gz"))
    assert main(["predict", str(run / "checkpoints" / "last.pt"), str(inp), str(out), "--num-samples", "3"]) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok"]


@pytest.mark.parametrize("override, key", [
    ("model.sampling=mode", "model.sampling"), ("model.dropout=1.0", "model.dropout"),
    ("model.ensemble_size=0", "model.ensemble_size"), ("model.rank=0", "model.rank"),
    ("model.diag_eps=0", "model.diag_eps"), ("model.roi=lungs", "model.roi"),
    ("model.latent_levels=9", "model.latent_levels"), ("model.topk_fraction=1.5", "model.topk_fraction"),
    ("model.name=vae", "model.name"),
])
def test_zoo_keys_are_range_checked(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs" / "zoo" / "ssn.yaml", [override])


def test_compare_models_quick(tmp_path):
    out = tmp_path / "cmp"
    configs = [str(REPO / "configs" / "zoo" / f"{n}.yaml") for n in ("prob_unet", "unet", "ssn")]
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_models.py"), *configs, "--quick",
                           "--num-samples", "4", "--out", str(out)], capture_output=True, text=True,
                          encoding="utf-8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [r["model"] for r in rows] == ["prob_unet", "unet", "ssn"]
    for r in rows:
        assert float(r["ged"]) >= 0 and float(r["parameters"]) > 0 and float(r["ms_per_100_samples"]) > 0
        assert r["ged_true"] != "" and r["qubiq"] != ""
    assert "| prob_unet |" in (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 1000


ZOO_DDP_DRIVER = """
import gc, json, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from probunet.cli import main
from probunet.runtime.distributed import dist_info, init_distributed

assert init_distributed("cpu")
out, configs, overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for config in configs:
    name = config.rsplit("/", 1)[-1][:-5]
    rc = main(["--quiet", "train", config, *overrides, "--out", f"{out}/{name}", "--no-progress"])
    assert rc == 0, (name, rc)
    # fit freed its DDP wrapper (whose reducer holds the group) before returning, not at interpreter exit
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    assert alive == 0, (name, alive, "DDP wrappers still alive after fit")
print(f"rank {dist_info().rank} done")
dist.barrier()  # both ranks done before the group goes: no peer torn down mid-call
dist.destroy_process_group()
"""


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="torch.distributed unavailable")
def test_every_zoo_model_trains_data_parallel(tmp_path):
    """Two processes (gloo): every zoo model trains under DistributedDataParallel and both replicas end
    with bitwise-identical weights (fit gathers their digests)."""
    driver = tmp_path / "driver.py"
    driver.write_text(ZOO_DDP_DRIVER)
    configs = [str(p) for p in ZOO if p.stem != "prob_unet"]  # prob_unet: tests/train/test_ddp.py
    overrides = [o for o in TINY if not o.startswith("train.val")] + ["train.val_every=1000"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(driver), str(tmp_path / "runs"), json.dumps(configs), json.dumps(overrides)],
                          cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for config in configs:
        summary = json.loads((tmp_path / "runs" / Path(config).stem / "train_summary.json").read_text())
        digests = summary["replica_weights_sha256"]
        assert summary["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1], config
