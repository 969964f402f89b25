"""The fast paths give the same answers as the plain ones.

f_comb split into a feature term and a per-sample bias, the tiled CPU inference
schedule, chunked sampling, CPU threads, channels-last, the sync-free step with
its non-finite skip, bf16 autocast on CPU, DataLoader workers, the compile fallback.
"""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from probunet import ProbabilisticUNet
from probunet.config import load_config
from probunet.models.fcomb import Fcomb
from probunet.models.unet import cpu_parallel_map, to_channels_last
from probunet.train.step import backward_and_step
from probunet.train.trainer import fit

TINY = dict(features=(4, 8), latent_dim=3, fcomb_layers=3)


def concat_reference(fc: Fcomb, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """f_comb as in Kohl et al.: z tiled over space, concatenated, 1x1 convs with ReLU."""
    nd = features.dim() - 2
    zmap = z.reshape(*z.shape, *([1] * nd)).expand(-1, -1, *features.shape[2:])
    x = torch.cat([features, zmap], dim=1)  # (B, F + D, *spatial)
    w = fc.first.weight.reshape(*fc.first.weight.shape, *([1] * nd))
    h = (F.conv2d if nd == 2 else F.conv3d)(x, w, fc.first.bias)
    for m in fc.rest:
        h = torch.relu(h) if isinstance(m, torch.nn.ReLU) else m(h)
    return h


@pytest.mark.parametrize("spatial_dims, size", [(2, 12), (3, 6)])
@pytest.mark.parametrize("num_layers", [1, 2, 4])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_split_fcomb_equals_concatenation(spatial_dims, size, num_layers, num_classes):
    torch.manual_seed(0)
    fc = Fcomb(spatial_dims, 8, 5, num_classes, num_layers)
    feats = torch.randn(3, 8, *([size] * spatial_dims))
    z = torch.randn(3, 5)
    ref = concat_reference(fc, feats, z)
    out = fc(feats, z)  # training path (autograd)
    assert out.requires_grad and out.shape == (3, num_classes, *([size] * spatial_dims))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # CPU inference: the tiled schedule
        assert fc.uses_tiled_path(feats) == (num_layers > 1)
        torch.testing.assert_close(fc(feats, z), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile_rows", [7, 50, 144, 10_000])
def test_tiled_combine_equals_batched_for_any_tiling(tile_rows, monkeypatch):
    """Tiles of several samples, of part of an image, and units spread over threads."""
    torch.manual_seed(1)
    fc = Fcomb(2, 6, 4, 2, 4)
    feat_term = fc.feature_term(torch.randn(2, 6, 12, 12)).detach()
    z = torch.randn(2, 9, 4)
    with torch.no_grad():
        ref = fc._combine_batched(feat_term, z)
        monkeypatch.setattr(type(fc.rest), "tile_rows", tile_rows)
        monkeypatch.setattr(type(fc.rest), "unit_rows", 3 * tile_rows)
        tiled = fc.combine(feat_term, z)
        cl = fc.combine(feat_term.contiguous(memory_format=torch.channels_last), z)
        out = torch.full((2, 12, 2, 12, 12), float("nan"))
        fc.combine(feat_term, z, out=out[:, 2:11])
    assert tiled.is_contiguous() and tiled.shape == (2, 9, 2, 12, 12)
    torch.testing.assert_close(tiled, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cl, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, 2:11], ref, rtol=1e-5, atol=1e-6)
    assert torch.isnan(out[:, :2]).all() and torch.isnan(out[:, 11:]).all()  # nothing written outside


@pytest.mark.parametrize("spatial_dims, size", [(2, 16), (3, 8)])
def test_chunked_and_unchunked_sampling_agree(spatial_dims, size):
    torch.manual_seed(0)
    m = ProbabilisticUNet(spatial_dims=spatial_dims, **TINY).eval()
    x = torch.randn(3, 1, *([size] * spatial_dims))
    runs = {c: m.sample(x, 10, chunk_size=c, generator=torch.Generator().manual_seed(5)) for c in (None, 1, 3, 32)}
    ref = runs[None]
    assert ref.shape == (3, 10, 2, *([size] * spatial_dims))
    for c, out in runs.items():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, msg=f"chunk_size={c}")
        assert torch.equal(out.argmax(2), ref.argmax(2)), c
    # the same samples through the differentiable (batched) path: train mode with grad
    m.train()
    grad_path = m.sample(x, 10, chunk_size=4, generator=torch.Generator().manual_seed(5))
    assert grad_path.requires_grad
    torch.testing.assert_close(grad_path.detach(), ref, rtol=1e-4, atol=1e-5)


def test_sampling_is_the_same_on_one_thread_and_several():
    torch.manual_seed(0)
    m = ProbabilisticUNet(**TINY).eval()
    x = torch.randn(4, 1, 16, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = m.sample(x, 6, generator=torch.Generator().manual_seed(2))
        torch.set_num_threads(2)
        two = m.sample(x, 6, generator=torch.Generator().manual_seed(2))
        assert torch.get_num_threads() == 2  # the worker threads leave the caller's setting alone
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)


def test_cpu_parallel_map_keeps_order_and_modes():
    with torch.inference_mode():
        out = cpu_parallel_map(lambda i: (i, torch.is_inference_mode_enabled(), torch.get_num_threads()),
                               range(7), workers=3)
    assert [o[0] for o in out] == list(range(7))
    assert all(o[1] for o in out) and all(o[2] == 1 for o in out)
    from probunet.models.unet import flushes_denormals

    before = flushes_denormals()
    try:
        for flag in (True, False):  # the caller's denormal flushing carries over to the threads
            torch.set_flush_denormal(flag)
            assert cpu_parallel_map(lambda _: flushes_denormals(), range(4), workers=2) == [flag] * 4
    finally:
        torch.set_flush_denormal(before)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = cpu_parallel_map(lambda a: (a @ a).dtype, [torch.randn(4, 4)] * 3, workers=2)
    assert dtypes == [torch.bfloat16] * 3


def test_channels_last_view_of_one_channel_images():
    x = torch.randn(2, 1, 8, 8)
    y = to_channels_last(x)
    assert y.data_ptr() == x.data_ptr() and torch.equal(x, y)  # a view: no copy
    assert y.stride() == (64, 1, 8, 1)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    assert conv(y).is_contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(2, 3, 8, 8)
    assert to_channels_last(x3).is_contiguous(memory_format=torch.channels_last)


def test_channels_last_model_gives_the_same_training_output():
    torch.manual_seed(0)
    m = ProbabilisticUNet(**TINY)
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 2, (2, 16, 16))
    torch.manual_seed(3)
    ref = m(x, seg=y)
    m_cl = ProbabilisticUNet(**TINY).to(memory_format=torch.channels_last)
    m_cl.load_state_dict(m.state_dict())
    torch.manual_seed(3)
    out = m_cl(to_channels_last(x), seg=y)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.kl, ref.kl, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the step


def _tiny_step_setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, params, opt, scaler


def test_step_skips_non_finite_losses_without_touching_the_weights():
    model, params, opt, scaler = _tiny_step_setup()
    x = torch.randn(4, 3)
    before = [p.detach().clone() for p in params]
    bad = backward_and_step(model(x).sum() * float("nan"), opt, scaler, params)
    assert bad.dtype == torch.bool and bool(bad)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(float(s["step"]) == 0 for s in opt.state.values())  # the Adam step count did not move
    bad = backward_and_step(model(x).sum(), opt, scaler, params, grad_clip=1.0)
    assert not bool(bad)
    assert not all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(float(s["step"]) == 1 for s in opt.state.values())


@pytest.mark.parametrize("prior", ["conditional", "standard"])
def test_training_step_reads_nothing_back_to_the_host(monkeypatch, prior):
    """Forward with the posterior, ELBO, backward and the fused Adam step: no .item(),
    bool(), float() or .tolist() of a tensor (each a GPU sync), e.g. no argument
    validation of the distributions and no F.one_hot range check."""
    from probunet.models.losses import elbo_loss

    torch.manual_seed(0)
    m = ProbabilisticUNet(prior=prior, **TINY)
    params = list(m.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 2, (2, 16, 16))

    def forbidden(*a, **k):
        raise AssertionError("host sync inside the training step")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = m(x, seg=y)
    bad = backward_and_step(elbo_loss(out.logits, y, out.kl)["loss"], opt, scaler, params)
    monkeypatch.undo()
    assert not bool(bad)


def test_bf16_autocast_on_cpu_keeps_latents_and_kl_in_fp32():
    torch.manual_seed(0)
    m = ProbabilisticUNet(**TINY)
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 2, (2, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, seg=y)
    assert out.logits.dtype == torch.bfloat16
    assert out.kl.dtype == out.z.dtype == torch.float32
    assert out.prior.base_dist.loc.dtype == out.posterior.base_dist.scale.dtype == torch.float32
    with torch.no_grad():
        ref = m(x, seg=y)
    torch.testing.assert_close(out.kl, ref.kl, rtol=0.05, atol=1e-4)
    m.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = m.sample(x, 5, generator=torch.Generator().manual_seed(0))
    s32 = m.sample(x, 5, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.bfloat16
    torch.testing.assert_close(s.float(), s32, rtol=0.05, atol=0.05)


def test_bf16_training_on_cpu_stays_finite(tmp_path):
    cfg = load_config("configs/debug.yaml", ["train.steps=6", "train.amp=bf16", "train.log_every=3",
                                             "train.val_every=1000"])
    summary = fit(cfg, tmp_path / "run")
    assert summary["amp"] == "bfloat16"
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in recs if "train_loss" in r]
    assert len(losses) == 2 and all(v is not None and v == v for v in losses)


def test_dataloader_workers_give_the_same_batches(tmp_path):
    from probunet.data import MultiRaterDataset, load_splits
    from probunet.data.stream import BatchStream, batches
    from probunet.runtime.distributed import DistInfo

    cfg = load_config("configs/debug.yaml")
    stream = BatchStream(MultiRaterDataset(load_splits(cfg)["train"]), 4, 0, DistInfo())
    main = list(batches(stream, 3, 9, torch.device("cpu"), 0))
    workers = list(batches(stream, 3, 9, torch.device("cpu"), 2))
    assert [b[0] for b in main] == [b[0] for b in workers] == list(range(3, 9))
    for (_, a, t, n), (_, b, u, m) in zip(main, workers):
        assert torch.equal(a, b) and torch.equal(t, u) and torch.equal(n, m) and t.dtype == torch.int64


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, caplog):
    class Broken:
        def __init__(self, module):
            self.module = module

        def __call__(self, *a, **k):
            raise RuntimeError("backend exploded")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken(module))
    cfg = load_config("configs/debug.yaml", ["train.steps=2", "train.compile=true", "train.val_every=1000"])
    with caplog.at_level(logging.WARNING):
        fit(cfg, tmp_path / "run")
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)
    ref = tmp_path / "ref"
    fit(load_config("configs/debug.yaml", ["train.steps=2", "train.val_every=1000"]), ref)
    a = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the redone first step is the eager step
