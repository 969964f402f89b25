"""``probunet export``: TorchScript (and ONNX) samplers that run without probunet and draw probunet's samples."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from probunet.models.checkpoint import save_checkpoint
from probunet.cli import main
from probunet.config import load_config
from probunet.data.transforms import normalize_image
from probunet.export.exporter import (build_sampler, export_model, onnx_refusal, read_torchscript_metadata, save_onnx,
                             script_sampler)
from probunet.inference.sampler import case_noise, case_seed
from probunet.models import build_model
from probunet.inference.predictor import Predictor

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug.yaml")
S = 5
SEED = 3
# every model of the zoo; sample_chunk 2 < S so that the chunked draws are exercised
MODELS = [("prob_unet", []), ("unet", []), ("unet", ["model.sampling=argmax"]), ("ensemble", ["model.ensemble_size=2"]),
          ("mc_dropout", []), ("ssn", ["model.roi=image"]), ("hpu_net", []), ("phiseg", []),
          ("ensemble", ["model.member=prob_unet", "model.ensemble_size=2"])]
# spatial sizes that are not multiples of the divisor (4): the sampler pads and crops as predict does
SHAPES = {2: (18, 21), 3: (10, 9, 12)}

# Loads each exported file with torch alone (importing probunet is made to fail) and writes its logits.
RUNNER = textwrap.dedent("""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "probunet" or name.startswith("probunet."):
                raise ImportError("probunet must not be imported here")
    sys.meta_path.insert(0, Block())
    import torch
    jobs = torch.load(sys.argv[1], weights_only=True)
    out = {}
    for key, job in jobs.items():
        m = torch.jit.load(job["file"])
        with torch.no_grad():
            if "noise" in job:
                out[key] = m(job["image"], noise=job["noise"])
            else:
                out[key] = m(job["image"], generator=torch.Generator().manual_seed(int(job["seed"])))
    torch.save(out, sys.argv[2])
    assert not any(k.split(".")[0] == "probunet" for k in sys.modules)
    print("ok", len(out))
""")


def _model(name, extra, nd, seed=0):
    cfg = load_config(DEBUG, [f"model.name={name}", f"model.spatial_dims={nd}", "model.features=[4,8,8]",
                              "data.normalize=none", *extra])
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    if hasattr(model, "sample_chunk"):
        model.sample_chunk = 2
    for net in getattr(model, "members", [model]):
        if type(net).__name__ == "ProbabilisticUNet":  # a prior with real spread, so that samples differ
            with torch.no_grad():
                net.prior_net.head.proj.weight.normal_(0, 0.5)
                net.prior_net.head.proj.bias[cfg.model.latent_dim:].fill_(0.5)
                net.fcomb.first.weight.mul_(5)
                net.fcomb.rest[-1].bias[1] += 6.0  # both classes in reach of the samples
    return model, cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every model in 2D and 3D exported to TorchScript and run in a subprocess without probunet;
    returns {key: (model, cfg, image, case id, logits of the exported file)}."""
    tmp = tmp_path_factory.mktemp("export")
    jobs, cases = {}, {}
    for nd in (2, 3):
        for i, (name, extra) in enumerate(MODELS):
            key = f"{nd}d-{name}-{i}"
            model, cfg = _model(name, extra, nd, seed=i)
            file = tmp / f"{key}.ts"
            torch.jit.save(script_sampler(model, cfg, num_samples=S), str(file))
            g = torch.Generator().manual_seed(100 + i)
            image = torch.randn(1, 1, *SHAPES[nd], generator=g)
            cid = f"case-{key}"
            job = {"file": str(file), "image": image}
            if model.noise_shape is not None:  # the Probabilistic U-Net and an ensemble of them
                job["noise"] = case_noise(SEED, cid, S, (cfg.model.latent_dim,))[None]
            else:
                job["seed"] = case_seed(SEED, cid)
            jobs[key] = job
            cases[key] = (model, cfg, image, cid)
    torch.save(jobs, tmp / "jobs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp / "jobs.pt"), str(tmp / "out.pt")], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")
    out = torch.load(tmp / "out.pt", weights_only=True)
    return {k: (*cases[k], out[k]) for k in cases}


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("index", range(len(MODELS)), ids=[m[0] + ("-" + m[1][0] if m[1] else "") for m in MODELS])
def test_exported_file_draws_the_predictors_samples(exported, nd, index):
    name = MODELS[index][0]
    model, cfg, image, cid, logits = exported[f"{nd}d-{name}-{index}"]
    assert logits.shape == (1, S, 2, *SHAPES[nd])
    predictor = Predictor(model, cfg, num_samples=S, seed=SEED, device="cpu", roi_size=0)
    ref = predictor.sampler.sample([cid], image, S, keep_logits=True, pairwise=False)
    assert torch.allclose(logits, ref.logits, atol=1e-4, rtol=1e-4), float((logits - ref.logits).abs().max())
    pred = predictor(image[0, 0].numpy(), case_id=cid)  # the public call: label maps and mean probability
    np.testing.assert_array_equal(logits[0].argmax(1).numpy(), pred.samples)
    np.testing.assert_allclose(torch.softmax(logits[0], 1).mean(0).numpy(), pred.probability, atol=1e-5)
    if (name in ("prob_unet", "unet", "mc_dropout", "ssn", "hpu_net", "phiseg") or "model.member=prob_unet" in
            MODELS[index][1]) and "argmax" not in str(MODELS[index]):
        assert len({tuple(s.reshape(-1).tolist()) for s in logits[0]}) > 1  # the samples differ


def test_prob_unet_batch_shared_noise_and_window_context():
    """A batch shares one noise row; a window sampled with the whole image's context equals that
    window of the whole image's logits where the U-Net's receptive field stays inside."""
    model, cfg = _model("prob_unet", [], 2)
    sm = script_sampler(model, cfg, num_samples=S)
    x = torch.randn(3, 1, 16, 16)
    eps = torch.randn(1, S, cfg.model.latent_dim)
    batch = sm(x, noise=eps)
    for i in range(3):
        assert torch.allclose(batch[i:i + 1], sm(x[i:i + 1], noise=eps), atol=1e-5)
    ctx = sm.sample_context(x[:1])
    assert ctx.shape == (1, 2, cfg.model.latent_dim)
    assert torch.allclose(ctx[:, 1], model.prior(x[:1]).base_dist.scale, atol=1e-6)
    # the window's own prior differs from the image's; with the image's context z is the image's z
    win = x[:1, :, :8, :8]
    own = sm(win, noise=eps)
    shared = sm(win, noise=eps, context=ctx)
    z_img = ctx[:, 0, None] + ctx[:, 1, None] * eps
    assert torch.allclose(shared, model.sample(win, S, noise=eps, context={"loc": ctx[:, 0], "scale": ctx[:, 1]}),
                          atol=1e-5)
    assert not torch.allclose(own, shared)
    assert z_img.shape == (1, S, cfg.model.latent_dim)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_generator_reproduces_also_in_a_later_export_of_the_same_process(tmp_path):
    model, cfg = _model("ssn", [], 2)
    sm = script_sampler(model, cfg, num_samples=4)
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(sm(x, generator=_g(5)), sm(x, generator=_g(5)))
    assert not torch.equal(sm(x, generator=_g(5)), sm(x, generator=_g(6)))
    assert sm(x, num_samples=7).shape == (1, 7, 2, 16, 16)  # no generator: torch's RNG, S overridden
    with pytest.raises(Exception, match="noise"):
        sm(x, noise=torch.zeros(1, 4, 2))
    # A second export after the first has run, saved and reloaded still draws the model's samples
    # (a torch.Generator made inside TorchScript was duplicated on saving: the seeded one was not drawn from).
    model.sample_chunk = 3
    path = tmp_path / "again.ts"
    torch.jit.save(script_sampler(model, cfg, num_samples=4), str(path))
    again = torch.jit.load(str(path))
    assert torch.allclose(again(x, generator=_g(3)), model.sample(x, 4, generator=_g(3)), atol=1e-5)


@pytest.mark.parametrize("mode,extra", [("zscore", []), ("ct_window", ["data.ct_window=[-100,300]"])])
def test_normalize_is_the_training_normalisation(mode, extra):
    cfg = load_config(DEBUG, [f"data.normalize={mode}", *extra])
    torch.manual_seed(0)
    sm = script_sampler(build_model(cfg.model), cfg, num_samples=2)
    raw = np.random.default_rng(0).normal(50, 200, size=(2, 1, 12, 10)).astype(np.float32)
    got = sm.normalize(torch.from_numpy(raw)).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], normalize_image(raw[b], cfg.data), atol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, cfg = _model("prob_unet", [], 2)
    path = tmp_path_factory.mktemp("export-ckpt") / "model.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "step": 7}, path)
    return path


def test_cli_torchscript_writes_metadata_and_refuses_overwriting(checkpoint, tmp_path, capsys):
    out = tmp_path / "sampler.ts"
    assert main(["--quiet", "export", str(checkpoint), "--format", "torchscript", "--out", str(out),
                 "--num-samples", "4"]) == 0
    assert "exported" in capsys.readouterr().out
    meta = read_torchscript_metadata(out)
    assert meta["model"] == "prob_unet" and meta["num_samples"] == 4 and meta["latent_dim"] == 2
    assert meta["divisor"] == 4 and meta["step"] == 7 and meta["normalize"] == "none"
    m = torch.jit.load(str(out))
    assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 4, 2, 32, 32)
    # an existing file needs --overwrite; the checkpoint itself is never overwritten
    for target, needle in ((out, "--overwrite"), (checkpoint, "checkpoint")):
        rc = main(["export", str(checkpoint), "--format", "torchscript", "--out", str(target)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0]
    rc = main(["export", str(tmp_path / "missing.pt"), "--format", "torchscript", "--out", str(tmp_path / "x.ts")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_refusals_name_the_reason():
    model, _ = _model("phiseg", [], 2)
    assert "phiseg" in onnx_refusal(model) and "torchscript" in onnx_refusal(model)
    assert onnx_refusal(_model("ensemble", [], 2)[0]) is None
    assert onnx_refusal(_model("unet", ["model.sampling=argmax"], 2)[0]) is None
    assert "pixelwise" in onnx_refusal(_model("unet", [], 2)[0])
    assert "torchscript" in onnx_refusal(_model("ensemble", ["model.member=prob_unet", "model.ensemble_size=2"], 2)[0])

    class Other(torch.nn.Module):
        spatial_dims, in_channels, num_classes, divisor = 2, 1, 2, 1

    with pytest.raises(ValueError, match="no sampler"):
        build_sampler(Other())


def _ort():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        pytest.skip("onnx / onnxruntime not installed (pip install 'probunet[onnx]'): the ONNX export is not checked")
    return onnxruntime


@pytest.mark.parametrize("nd", [2, 3])
def test_onnx_prob_unet_matches_torch_in_onnxruntime(nd, tmp_path):
    ort = _ort()
    model, cfg = _model("prob_unet", [], nd)
    path = save_onnx(model, tmp_path / "m.onnx", num_samples=S)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, s, size in ((1, S, 16), (2, 3, 12)):  # dynamic batch, samples and spatial size
        x = torch.randn(b, 1, *([size] * nd))
        eps = torch.randn(b, s, cfg.model.latent_dim)
        got = sess.run(["logits"], {"image": x.numpy(), "noise": eps.numpy()})[0]
        ref = model.sample(x, s, noise=eps).numpy()
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_onnx_deterministic_ensemble_and_refused_models(tmp_path, checkpoint):
    ort = _ort()
    model, _ = _model("ensemble", ["model.ensemble_size=2"], 2)
    path = save_onnx(model, tmp_path / "e.onnx", num_samples=3)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, 16, 16)
    np.testing.assert_allclose(sess.run(["logits"], {"image": x.numpy()})[0], model.sample(x, 3).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="ssn draws"):
        save_onnx(_model("ssn", [], 2)[0], tmp_path / "s.onnx", num_samples=3)
    result = export_model(checkpoint, "onnx", tmp_path / "cli.onnx", num_samples=2)
    assert result.size > 1000 and json.dumps(result.files)


def _export_argv(checkpoint, out):
    return ["export", str(checkpoint), "--format", "torchscript", "--out", str(out)]


def test_torchscript_onto_a_full_disk_is_one_line_and_leaves_no_temp_file(checkpoint, tmp_path, monkeypatch, capsys):
    """ENOSPC on the file write (patched): the export is serialised in memory and written through the
    atomic helper, so a failed write is one line and the temp file is removed."""
    import builtins
    import errno

    from probunet.export import exporter as export_module

    def full_disk_open(file, mode="r", *args, **kwargs):
        fh = builtins.open(file, mode, *args, **kwargs)
        if "w" in mode and ".probunet-" in str(file):
            real_write = fh.write

            def write(data):
                real_write(bytes(data)[:100])
                raise OSError(errno.ENOSPC, "No space left on device")

            fh.write = write
        return fh

    monkeypatch.setattr(export_module, "open", full_disk_open, raising=False)
    out = tmp_path / "out" / "sampler.ts"
    assert main(_export_argv(checkpoint, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"probunet export: error: {out}: cannot write: no space left on device"], err
    assert list(out.parent.iterdir()) == []


def test_torchscript_onto_a_real_full_disk_exits_with_one_line(checkpoint, tmp_path):
    """A 16 KiB tmpfs (root only): before, TorchScript's file writer aborted the process (exit 134) and
    left ``.probunet-*.tmp.ts`` behind."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; the patched-write test covers ENOSPC")
    try:
        proc = subprocess.run([sys.executable, "-m", "probunet", *_export_argv(checkpoint, disk / "s.ts")],
                              capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 2, proc.stderr[-500:]
        assert proc.stderr.strip().splitlines() == [
            f"probunet export: error: {disk / 's.ts'}: cannot write: no space left on device"]
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_cli_exports_the_zoos_ensemble_of_prob_unets(tmp_path, capsys):
    """configs/zoo/ensemble_prob_unet.yaml (made tiny): TorchScript and a bundle, whose sampler takes the
    members' latent noise."""
    cfg = load_config(str(ROOT / "configs" / "zoo" / "ensemble_prob_unet.yaml"),
                      ["model.features=[4,8]", "model.ensemble_size=2", "data.synthetic.size=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    ckpt = tmp_path / "ens.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "step": 1}, ckpt)
    out = tmp_path / "ens.ts"
    assert main(["--quiet", "export", str(ckpt), "--format", "torchscript", "--out", str(out),
                 "--num-samples", "4"]) == 0
    meta = read_torchscript_metadata(out)
    assert meta["model"] == "member_ensemble" and meta["latent_dim"] == cfg.model.latent_dim == 6
    sm = torch.jit.load(str(out))
    x = torch.randn(1, 1, 16, 16)
    eps = torch.randn(1, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(sm(x, noise=eps), model.sample(x, 4, noise=eps), atol=1e-5, rtol=1e-5)
    assert main(["--quiet", "export", str(ckpt), "--format", "bundle", "--out", str(tmp_path / "bundle"),
                 "--num-samples", "4"]) == 0
    inference = json.loads((tmp_path / "bundle" / "configs" / "inference.json").read_text())
    assert inference["latent_dim"] == 6
    capsys.readouterr()
