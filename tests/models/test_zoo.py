"""The model zoo: every model meets the interface in 2D and 3D; the per-model checks of issue 13."""

import io
from types import SimpleNamespace

import pytest
import torch
from torch.distributions import LowRankMultivariateNormal, Normal, kl_divergence

from probunet.config import ConfigError, GecoConfig, TrainConfig
from probunet.models import SegmentationSampler, build_model, model_names
from probunet.models.zoo import DeepEnsemble, MCDropoutUNet, StochasticSegmentationNetwork, pixelwise_samples
from probunet.models.zoo.hpu_net import topk_pixels

MODELS = ["unet", "mc_dropout", "ensemble", "ssn", "hpu_net", "phiseg"]
EXTRA = {"ensemble": dict(ensemble_size=2), "ssn": dict(rank=3, mc_samples=4),
         "hpu_net": dict(latent_levels=2), "phiseg": dict(latent_levels=2)}
STOCHASTIC = ["unet", "mc_dropout", "ssn", "hpu_net", "phiseg"]  # samples depend on the generator


def cfg(name, spatial_dims=2, num_classes=2, features=(4, 8), **kw):
    opts = dict(EXTRA.get(name, {}))
    opts.update(kw)
    return SimpleNamespace(name=name, spatial_dims=spatial_dims, in_channels=1, num_classes=num_classes,
                           features=features, convs_per_level=1, norm=None, init="he_normal", **opts)


def make(name, seed=0, train_cfg=None, **kw):
    torch.manual_seed(seed)
    return build_model(cfg(name, **kw), train_cfg)


def data(spatial_dims=2, b=2, a=3, classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = (16, 16) if spatial_dims == 2 else (8, 8, 8)
    image = torch.randn(b, 1, *size, generator=g)
    labels = torch.randint(0, classes, (b, a, *size), generator=g)
    return image, labels


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_every_zoo_model_is_registered_and_meets_the_interface():
    assert set(MODELS) <= set(model_names())
    for name in MODELS:
        model = make(name)
        assert isinstance(model, SegmentationSampler), name
        assert (model.spatial_dims, model.in_channels, model.num_classes, model.divisor) == (2, 1, 2, 2), name


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("spatial_dims,classes", [(2, 2), (3, 3)])
def test_loss_and_sample_shapes(name, spatial_dims, classes):
    model = make(name, spatial_dims=spatial_dims, num_classes=classes)
    image, labels = data(spatial_dims, classes=classes)
    terms = model.training_loss(image, labels, step=0, num_raters=torch.tensor([3, 2]), generator=gen())
    assert terms["loss"].dim() == 0 and torch.isfinite(terms["loss"]), name
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    model.eval()
    out = model.sample(image, 3, generator=gen())
    assert out.shape == (2, 3, classes, *image.shape[2:]), name
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="divisible"):
        model.sample(image[..., :-1], 2)
    with pytest.raises(ValueError, match="channels"):
        model.sample(torch.cat([image, image], dim=1), 2)


def _structured(n=4, size=16):
    """Images with a bright square; raters mark the square, one of them a shifted copy."""
    g = torch.Generator().manual_seed(1)
    image = 0.3 * torch.randn(n, 1, size, size, generator=g)
    labels = torch.zeros(n, 3, size, size, dtype=torch.long)
    for i in range(n):
        y0, x0 = 2 + 2 * i, 3 + i
        image[i, 0, y0:y0 + 6, x0:x0 + 6] += 2.0
        labels[i, :, y0:y0 + 6, x0:x0 + 6] = 1
        labels[i, 2, y0:y0 + 6, x0 + 1:x0 + 7] = 1
    return image, labels


def _loss_at(model, image, labels, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(model.training_loss(image, labels, step=100, generator=gen(seed))["loss"])


@pytest.mark.parametrize("name", MODELS)
def test_loss_decreases_over_a_few_steps(name):
    model = make(name)
    image, labels = _structured()
    before = sum(_loss_at(model, image, labels, s) for s in range(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(20):
        opt.zero_grad()
        model.training_loss(image, labels, step=step, generator=gen(100 + step))["loss"].backward()
        opt.step()
    after = sum(_loss_at(model, image, labels, s) for s in range(3))
    assert after < 0.7 * before, (name, before, after)


@pytest.mark.parametrize("name", MODELS)
def test_sample_is_deterministic_given_a_generator(name):
    model = make(name).eval()
    image, _ = data()
    a = model.sample(image, 4, generator=gen(7))
    b = model.sample(image, 4, generator=gen(7))
    assert torch.equal(a, b)
    if name in STOCHASTIC:
        assert not torch.equal(a, model.sample(image, 4, generator=gen(8)))
        assert not torch.equal(a[:, 0], a[:, 1])


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name):
    model = make(name, seed=0).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = make(name, seed=1).eval()
    image, _ = data()
    ref = model.sample(image, 3, generator=gen(3))
    assert not torch.equal(other.sample(image, 3, generator=gen(3)), ref)  # another init: other samples
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.sample(image, 3, generator=gen(3)), ref)


# ----------------------------------------------------------------------------- unet


def test_unet_pixelwise_samples_follow_the_softmax_and_argmax_samples_are_equal():
    logits = torch.tensor([[[[0.0, 2.0]], [[1.0, -1.0]], [[0.5, 0.0]]]])  # (1, 3, 1, 2)
    draws = pixelwise_samples(logits, 20000, gen(0))
    assert draws.shape == (1, 20000, 3, 1, 2)
    labels = draws.argmax(dim=2)
    freq = torch.stack([(labels == c).float().mean(dim=1) for c in range(3)], dim=1)  # (1, 3, 1, 2)
    assert torch.allclose(freq, torch.softmax(logits, dim=1), atol=0.015)
    assert (torch.softmax(draws, dim=2).amax(dim=2) > 0.999).all()  # each sample is one class per pixel

    model = make("unet", sampling="argmax").eval()
    image, _ = data()
    out = model.sample(image, 3, generator=gen())
    assert torch.equal(out[:, 0], out[:, 2]) and torch.allclose(out[:, 0], model(image), atol=1e-5)


def test_unet_soft_target_is_the_ce_against_the_raters_mean():
    model = make("unet", soft_target=True)
    image, labels = data(a=3)
    num_raters = torch.tensor([3, 2])
    terms = model.training_loss(image, labels, step=0, num_raters=num_raters)
    logp = torch.log_softmax(model(image), dim=1)
    want = []
    for b in range(2):
        hot = torch.nn.functional.one_hot(labels[b, :num_raters[b]], 2).float().mean(0).movedim(-1, 0)
        want.append(-(hot * logp[b]).sum(0).mean())
    assert terms["loss"].item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------- mc_dropout


def test_mc_dropout_samples_differ_only_with_dropout_active():
    image, _ = data()
    on = make("mc_dropout", dropout=0.5).eval()
    s = on.sample(image, 4, generator=gen())
    assert not torch.equal(s[:, 0], s[:, 1])
    off = make("mc_dropout", dropout=0.5, mc_sampling=False).eval()
    s = off.sample(image, 4, generator=gen())
    assert torch.equal(s[:, 0], s[:, 1]) and torch.allclose(s[:, 0], off(image), atol=1e-5)  # eval forward: no dropout
    zero = make("mc_dropout", dropout=0.0).eval()
    s = zero.sample(image, 4, generator=gen())
    assert torch.equal(s[:, 0], s[:, 3])
    assert isinstance(on, MCDropoutUNet) and on.dropout == 0.5


# ----------------------------------------------------------------------------- ensemble


def test_ensemble_members_differ_and_sample_s_is_member_s_mod_m():
    model = make("ensemble", ensemble_size=3).eval()
    assert isinstance(model, DeepEnsemble) and model.num_members == 3
    w = [m.head.weight for m in model.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    image, labels = data()
    out = model.sample(image, 7)
    for s in range(7):
        assert torch.allclose(out[:, s], model.members[s % 3](image), atol=1e-5)
    assert not torch.allclose(out[:, 0], out[:, 1])
    # each member trains on its own resampled batch: the losses of the members differ
    model.train()
    terms = model.training_loss(image, labels, step=0, generator=gen())
    assert terms["ce_member_spread"] > 0


# ----------------------------------------------------------------------------- ssn


def _ssn_tiny(**kw):
    torch.manual_seed(0)
    return StochasticSegmentationNetwork(2, 1, 2, features=(4,), convs_per_level=1, rank=3, **kw).eval()


def test_ssn_samples_have_the_analytic_mean_and_covariance():
    model = _ssn_tiny()
    image = torch.randn(1, 1, 4, 4, generator=gen(0))
    mean, factor, diag = model.distribution(image)
    mu = mean.flatten().double()
    p = factor[0].flatten(1).t().double()  # (N*C, R)
    cov = p @ p.t() + torch.diag(diag.flatten().double())
    lr = LowRankMultivariateNormal(mean.flatten(), factor[0].flatten(1).t(), diag.flatten())
    assert torch.allclose(lr.covariance_matrix.double(), cov, rtol=1e-4, atol=1e-5)
    n = 40000
    draws = model.sample(image, n, generator=gen(1)).reshape(n, -1).double()  # (S, C*N), same layout
    emp_mean = draws.mean(0)
    sd = cov.diagonal().sqrt()
    assert ((emp_mean - mu).abs() / (sd / n ** 0.5)).max() < 5.0
    centered = draws - emp_mean
    emp_cov = centered.t() @ centered / (n - 1)
    se = ((cov.diagonal().outer(cov.diagonal()) + cov ** 2) / n).sqrt()
    assert ((emp_cov - cov).abs() / se).max() < 6.0
    # and the off-diagonal structure is there (a diagonal-only model would fail this)
    assert (cov - torch.diag(cov.diagonal())).abs().max() > 10 * se.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ssn_covariance_stays_positive_definite_in_half_precision(dtype):
    model = _ssn_tiny(diag_eps=1e-4)
    image = (5 * torch.randn(2, 1, 4, 4, generator=gen(2))).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        mean, factor, diag = model.distribution(image)
        terms = model.training_loss(image, torch.randint(0, 2, (2, 2, 4, 4)), step=0)
    assert mean.dtype == factor.dtype == diag.dtype == torch.float32
    assert (diag >= 1e-4).all()
    assert torch.isfinite(terms["loss"])
    for b in range(2):
        p = factor[b].flatten(1).t().double()
        cov = p @ p.t() + torch.diag(diag[b].flatten().double())
        assert torch.linalg.eigvalsh(cov).min() >= 0.99e-4
        assert torch.linalg.cholesky_ex(cov.float())[1] == 0


def test_ssn_region_of_interest_keeps_the_outside_deterministic():
    model = _ssn_tiny(roi="image", roi_dilation=1, diag_eps=1e-6)
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 1:3, 1:3] = 1.0
    roi = model.roi_mask(image)[0, 0]
    assert roi[0:4, 0:4].all() and roi.sum() == 16  # the 2x2 foreground dilated by 1
    mean, factor, diag = model.distribution(image)
    assert (factor[..., 5:, 5:] == 0).all() and torch.allclose(diag[..., 5:, 5:], torch.tensor(1e-6))
    s = model.sample(image, 8, generator=gen())
    assert (s[..., 5:, 5:] - mean[:, None, ..., 5:, 5:]).abs().max() < 1e-2
    assert (s[..., 1:3, 1:3] - mean[:, None, ..., 1:3, 1:3]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="roi"):
        _ssn_tiny(roi="brain")


# ----------------------------------------------------------------------------- hierarchical models


@pytest.mark.parametrize("name", ["hpu_net", "phiseg"])
def test_hierarchical_kl_is_the_sum_of_the_per_level_kls(name):
    model = make(name, latent_levels=2)
    image, labels = data()
    torch.manual_seed(3)
    out = model(image, labels[:, 0])
    assert len(out["prior"]) == len(out["posterior"]) == 2 and out["kl_levels"].shape == (2, 2)
    # the levels live at different scales (coarse to fine)
    assert out["posterior"][0][0].shape[2:] != out["posterior"][1][0].shape[2:]
    for level, (q, p) in enumerate(zip(out["posterior"], out["prior"])):
        want = kl_divergence(Normal(*q), Normal(*p)).flatten(1).sum(1)
        assert torch.allclose(out["kl_levels"][:, level], want, rtol=1e-5)
        assert (want > 0).all()
    assert torch.allclose(out["kl"], out["kl_levels"].sum(1))
    terms = model.training_loss(image, labels, step=0, generator=gen())
    assert terms["kl"].item() == pytest.approx(terms["kl_level0"].item() + terms["kl_level1"].item(), rel=1e-5)


@pytest.mark.parametrize("name", ["hpu_net", "phiseg"])
def test_hierarchical_prior_is_conditioned_on_the_latents_above(name):
    model = make(name, latent_levels=2)
    image, labels = data()
    torch.manual_seed(0)
    out = model(image, labels[:, 0])
    # feed other z_0 (teacher forcing): the prior of level 1 changes, that of level 0 does not
    z = [zl.clone() for zl in out["z"]]
    z[0] = z[0] + 3.0
    if name == "hpu_net":
        prior, _, _ = model.prior_net.decode(model.prior_net.encode(image), z=z)
    else:
        prior, _ = model.prior_net.latents(model.prior_net.encode(image), z=z)
    assert torch.equal(prior[0][0], out["prior"][0][0])
    assert not torch.allclose(prior[1][0], out["prior"][1][0])


def test_hpu_net_top_k_keeps_the_largest_ce_terms():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = torch.tensor([[4.0, -4.0], [1.0, 0.0]])
    target = torch.ones(1, 2, 2, dtype=torch.long)  # CE smallest at pixel 0, largest at pixel 1
    kept_logits, kept_target = topk_pixels(logits, target, 0.5)
    assert kept_logits.shape == (1, 2, 2) and kept_target.shape == (1, 2)
    assert sorted(kept_logits[0, 1].tolist()) == [-4.0, 0.0]
    full, _ = topk_pixels(logits, target, 1.0)
    assert full.shape == (1, 2, 4)
    model = make("hpu_net", topk_fraction=0.1)
    image, labels = data()
    torch.manual_seed(0)
    topk = model.training_loss(image, labels, step=0, generator=gen())
    model.topk_fraction = 1.0
    torch.manual_seed(0)
    every = model.training_loss(image, labels, step=0, generator=gen())
    assert topk["ce_mean"] > every["ce_mean"]  # the mean of the worst 10% pixels


def test_hpu_net_trains_with_geco_and_phiseg_refuses_it():
    train = TrainConfig(geco=GecoConfig(enabled=True, goal=0.3))
    model = make("hpu_net", train_cfg=train)
    image, labels = data()
    terms = model.training_loss(image, labels, step=0, generator=gen())
    assert "geco_lambda" in terms and torch.isfinite(terms["loss"])
    assert model.loss_settings.geco is not None
    assert not any(k.startswith("geco") or "lagmul" in k for k in model.state_dict())
    with pytest.raises(ConfigError, match="train.geco"):
        make("phiseg", train_cfg=train)


def test_phiseg_has_a_likelihood_at_each_level():
    model = make("phiseg", latent_levels=2)
    image, labels = data()
    out = model(image, labels[:, 0])
    assert len(out["level_logits"]) == 2
    assert all(o.shape == (2, 2, 16, 16) for o in out["level_logits"])
    terms = model.training_loss(image, labels, step=0, generator=gen())
    assert terms["loss"].item() > terms["ce_level0"].item() + terms["ce_level1"].item() - 1e-3
    assert terms["ce_sum"].item() == pytest.approx(terms["ce_level1"].item())


def test_bad_options_are_explained():
    with pytest.raises(ValueError, match="sampling"):
        make("unet", sampling="mode")
    with pytest.raises(ValueError, match="dropout"):
        make("mc_dropout", dropout=1.0)
    with pytest.raises(ValueError, match="ensemble_size"):
        make("ensemble", ensemble_size=0)
    with pytest.raises(ValueError, match="latent_levels"):
        make("hpu_net", latent_levels=3)
    with pytest.raises(ValueError, match="rank"):
        make("ssn", rank=0)


# ----------------------------------------------------------------------------- configs/zoo

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
# model.* keys the zoo reads that probunet.config.ModelConfig does not declare yet (the lead adds them)
ZOO_MODEL_KEYS = {"name", "sampling", "soft_target", "dropout", "mc_sampling", "ensemble_size", "ensemble_batch",
                  "rank", "mc_samples", "diag_eps", "roi", "roi_dilation", "roi_threshold", "latent_levels",
                  "latent_channels", "res_blocks", "topk_fraction"}


@pytest.mark.parametrize("name", MODELS + ["prob_unet"])
def test_zoo_config_builds_its_model_and_mirrors_the_synthetic_config(name):
    import dataclasses

    import yaml

    from probunet.config import ModelConfig, from_dict

    path = ROOT / "configs" / "zoo" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["model"]["name"] == name
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    extra = set(raw["model"]) - known
    assert extra <= ZOO_MODEL_KEYS, f"{path}: undeclared model keys {sorted(extra - ZOO_MODEL_KEYS)}"
    plain = dict(raw, model={k: v for k, v in raw["model"].items() if k in known})
    cfg = from_dict(plain)  # every other section is valid as it stands
    base = yaml.safe_load((ROOT / "configs" / "synthetic.yaml").read_text())
    assert raw["data"] == base["data"] and raw["eval"] == base["eval"]
    for key in ("steps", "batch_size", "lr", "seed", "rater"):
        assert raw["train"][key] == base["train"][key], key
    model_cfg = SimpleNamespace(**{**dataclasses.asdict(cfg.model), **raw["model"]})
    torch.manual_seed(0)
    model = build_model(model_cfg, cfg.train)
    size = cfg.data.synthetic.size
    image, labels = torch.randn(2, 1, size, size), torch.randint(0, 2, (2, 4, size, size))
    assert torch.isfinite(model.training_loss(image, labels, step=0)["loss"])
    assert model.eval().sample(image, 2).shape == (2, 2, 2, size, size)


@pytest.mark.parametrize("name", MODELS)
def test_trains_under_bf16_autocast_and_refuses_noise(name):
    model = make(name)
    image, labels = data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model.training_loss(image, labels, step=0, generator=gen())
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert model.noise_shape is None
    with pytest.raises(ValueError, match="noise"):
        model.eval().sample(image, 2, noise=torch.zeros(2, 2, 3))
