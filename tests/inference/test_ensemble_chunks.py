"""An ensemble takes sample s from member s mod M, s the sample's index among all of the image's samples:
the samples and the uncertainty maps do not depend on how the sampler chunks them."""

from pathlib import Path

import pytest
import torch

from probunet.config import load_config
from probunet.export.exporter import script_sampler
from probunet.inference.sampler import Sampler, case_noise
from probunet.models import build_model
from probunet.inference.predictor import Predictor
from probunet.inference.uncertainty import uncertainty_maps

DEBUG = str(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml")
M, S, SEED = 4, 8, 5
KINDS = {"unet": [], "prob_unet": ["model.member=prob_unet"]}


def _ensemble(kind):
    cfg = load_config(DEBUG, ["model.name=ensemble", f"model.ensemble_size={M}", "data.normalize=none", *KINDS[kind]])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():  # members that disagree clearly (their last layers), so a wrong member shows
        for m, member in enumerate(model.members):
            for p in list(member.parameters())[-2:]:
                p.add_(0.5 * m * torch.randn_like(p))
    return model, cfg


@pytest.fixture(scope="module", params=list(KINDS))
def ensemble(request):
    return request.param, *_ensemble(request.param)


def _draw(model, x, chunk, roi=None):
    out = Sampler(model, seed=SEED, sample_chunk=chunk, roi_size=roi).sample(
        ["case-7"], x, S, keep_logits=True, pairwise=False, groups=M)
    return out.logits, out.aleatoric, uncertainty_maps(model, x, out.logits)


@pytest.mark.parametrize("roi", [None, 16], ids=["whole", "windows"])
def test_samples_and_maps_do_not_depend_on_the_chunk_size(ensemble, roi):
    kind, model, _ = ensemble
    x = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    ref_logits, ref_streamed, ref_maps = _draw(model, x, None, roi)
    assert float(ref_maps["epistemic"].mean()) > 1e-3  # the members disagree: a misassignment would show
    torch.testing.assert_close(ref_streamed, ref_maps["aleatoric"], atol=1e-6, rtol=1e-5)
    for chunk in (1, 3, M, S) if roi is None else (1, 3):
        logits, streamed, maps = _draw(model, x, chunk, roi)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5, msg=f"chunk {chunk}")
        torch.testing.assert_close(streamed, ref_streamed, atol=1e-6, rtol=1e-6, msg=f"chunk {chunk}")
        for name in ("total", "aleatoric", "epistemic"):
            torch.testing.assert_close(maps[name], ref_maps[name], atol=1e-6, rtol=1e-6, msg=f"{name}, chunk {chunk}")


def test_predicts_streamed_maps_do_not_depend_on_the_chunk_size(ensemble):
    kind, model, cfg = ensemble
    image = torch.randn(20, 20, generator=torch.Generator().manual_seed(2)).numpy()
    preds = [Predictor(model, cfg, num_samples=S, seed=SEED, device="cpu", roi_size=0, sample_chunk=c)(
        image, case_id="c") for c in (None, 1, 3)]
    for pred in preds[1:]:
        for name in ("aleatoric", "epistemic"):
            torch.testing.assert_close(torch.from_numpy(pred.maps[name]), torch.from_numpy(preds[0].maps[name]),
                                       atol=1e-6, rtol=1e-6)
        assert (pred.samples == preds[0].samples).all()


def test_member_of_a_sample_is_its_global_index_mod_m():
    from probunet.models.zoo.ensemble import member_of_samples

    assert member_of_samples(0, 6, 4) == [0, 1, 2, 3, 0, 1]
    assert member_of_samples(3, 4, 4) == [3, 0, 1, 2]  # a chunk of 4 starting at sample 3
    assert member_of_samples(5, 1, 4) == [1]
    model, _ = _ensemble("unet")
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        own = [member(x) for member in model.members]
        got = model.sample(x, 3, start=6)  # samples 6, 7, 8 -> members 2, 3, 0
    for j, m in enumerate((2, 3, 0)):
        assert torch.equal(got[:, j], own[m])
    assert torch.equal(model.sample(x, 5), model.sample(x, 5, start=0))
    with pytest.raises(ValueError, match="start"):
        model.sample(x, 2, start=-1)


def test_member_ensemble_gives_each_member_its_samples_noise_rows():
    model, _ = _ensemble("prob_unet")
    x = torch.randn(1, 1, 16, 16)
    eps = torch.randn(1, 3, 2)
    got = model.sample(x, 3, noise=eps, start=5)  # samples 5, 6, 7 -> members 1, 2, 3
    for j, m in enumerate((1, 2, 3)):
        torch.testing.assert_close(got[:, j], model.members[m].sample(x, 1, noise=eps[:, j:j + 1])[:, 0])
    assert model.noise_shape == (2,)
    assert len(model.sample_context(x)) == M


@pytest.mark.parametrize("kind", list(KINDS))
def test_exported_sampler_equals_the_chunked_predictor(kind):
    model, cfg = _ensemble(kind)
    sm = script_sampler(model, cfg, num_samples=S)
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    chunked = Sampler(model, seed=SEED, sample_chunk=3).sample(["c"], x, S, keep_logits=True, pairwise=False).logits
    with torch.no_grad():
        got = sm(x, noise=case_noise(SEED, "c", S, (2,))[None]) if model.noise_shape else sm(x)
    torch.testing.assert_close(got, chunked, atol=1e-5, rtol=1e-5)
    if kind == "prob_unet":  # a window sampled with the whole image's priors, and the generator path
        win = x[..., :8, :8]
        eps = torch.randn(1, S, 2)
        ctx = sm.sample_context(x)
        assert ctx.shape == (1, M, 2, 2)
        with torch.no_grad():
            ref = model.sample(win, S, noise=eps, context=model.sample_context(x))
            torch.testing.assert_close(sm(win, noise=eps, context=ctx), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sm(x, generator=torch.Generator().manual_seed(4)),
                                       model.sample(x, S, generator=torch.Generator().manual_seed(4)),
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sm(win, generator=torch.Generator().manual_seed(4), context=ctx),
                                       model.sample(win, S, generator=torch.Generator().manual_seed(4),
                                                    context=model.sample_context(x)), atol=1e-5, rtol=1e-5)
