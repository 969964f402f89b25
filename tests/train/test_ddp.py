"""Data-parallel training under torchrun: 2 processes, gloo on CPU.

One launch (process start-up is most of the cost) runs, in both processes:
``probunet train`` through the CLI for 4 steps, then a 2-step run resumed to 4
(the process group is started once by the driver, as ``fit`` would).
The test then checks what only a real multi-process run shows: both replicas
end with bitwise-identical weights (their digests are gathered inside ``fit``
and compared here with the digest of rank 0's checkpoint), only rank 0 wrote,
the validation metrics are the reduction over both ranks' shares, and resume
under DDP ends exactly where the uninterrupted run did.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from probunet.config import load_config
from probunet.models.checkpoint import load_checkpoint, load_model
from probunet.runtime.distributed import weights_digest
from probunet.evaluation.validation import validate

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

OVERRIDES = ["train.steps=4", "train.checkpoint_every=2", "train.val_every=2", "train.log_every=2",
             "eval.batch_size=2"]

DRIVER = textwrap.dedent("""
    import gc, json, sys
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from probunet.cli import main
    from probunet.config import load_config
    from probunet.runtime.distributed import dist_info, init_distributed
    from probunet.train import fit

    # Several runs in one launch: the group is started once here (fit then leaves it
    # alone); fit starts and ends it itself when nothing has.
    assert init_distributed("cpu")
    config, full, part, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    rc = main(["--quiet", "train", config, *overrides, "--out", full, "--no-progress"])
    assert rc == 0, rc
    short = [o for o in overrides if not o.startswith("train.steps=")] + ["train.steps=2"]
    fit(load_config(config, short), part)  # a run "killed" after step 2 ...
    rc = main(["--quiet", "train", config, *overrides, "--out", part, "--resume", "--no-progress"])  # ... resumed
    assert rc == 0, rc
    # fit freed its DDP wrappers (whose reducers hold the group) before returning, not at interpreter exit
    assert not any(isinstance(o, DistributedDataParallel) for o in gc.get_objects()), "DDP wrappers alive after fit"
    print(f"rank {dist_info().rank} done")
    dist.barrier()  # both ranks done before the group goes: no peer torn down mid-call
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    full, part = root / "full", root / "part"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), "configs/debug.yaml", str(full), str(part), json.dumps(OVERRIDES)]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 done" in proc.stdout and "rank 1 done" in proc.stdout
    return full, part


def test_two_replicas_end_with_identical_weights(ddp_runs):
    full, _ = ddp_runs
    summary = json.loads((full / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["replica_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    ckpt = load_checkpoint(full / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4
    assert weights_digest(ckpt["model"]) == digests[0]  # rank 0's checkpoint is the common state


def test_only_rank_zero_writes(ddp_runs):
    full, _ = ddp_runs
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train_loss" in r]
    val_steps = [r["step"] for r in records if "val_ged" in r]
    assert train_steps == [2, 4] and val_steps == [2, 4]  # one line per step, not one per rank
    assert all(r["images_per_s"] > 0 for r in records if "train_loss" in r)
    for rel in ("config.yaml", "splits.json", "checkpoints/best.pt", "samples.png"):
        assert (full / rel).is_file(), rel


def test_validation_is_reduced_over_both_ranks(ddp_runs):
    """eval.batch_size=2 over 4 validation cases: each rank evaluates one batch; the
    logged GED must equal a single process's GED over both batches."""
    full, _ = ddp_runs
    model, cfg, _ = load_model(full / "checkpoints" / "last.pt")
    from probunet.data import load_splits

    val_items = load_splits(cfg)["val"][: cfg.train.val_cases]
    assert len(val_items) > cfg.eval.batch_size  # both ranks had work
    single = validate(model, val_items, cfg, torch.device("cpu"), None)
    logged = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in logged if "val_ged" in r][-1]
    assert last_val["val_ged"] == pytest.approx(single["val_ged"], rel=1e-6, abs=1e-9)


def test_resume_under_ddp_equals_uninterrupted(ddp_runs):
    full, part = ddp_runs
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(part / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    summary = json.loads((part / "train_summary.json").read_text())
    assert summary["replica_weights_sha256"][0] == summary["replica_weights_sha256"][1]


def test_config_model_matches(ddp_runs):
    full, _ = ddp_runs
    cfg = load_config("configs/debug.yaml", OVERRIDES)
    assert load_checkpoint(full / "checkpoints" / "last.pt")["config"]["model"] == cfg.to_dict()["model"]
