"""The single inference path: loading, precision, per-case seeding, batching, windows, reductions."""

import math

import numpy as np
import pytest
import torch

from probunet.metrics import segmentation as metrics
from probunet.config import Config
from probunet.inference.sampler import (SampleReducer, Sampler, case_noise, case_seed, group_by_shape, inference_dtype,
                                load_model, pad_to)
from probunet.models import ProbabilisticUNet, build_model
from probunet.utils import atomic_save


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(spatial_dims=2, in_channels=1, num_classes=2, features=(4, 8), latent_dim=3, fcomb_layers=2,
                convs_per_level=1)
    args.update(kw)
    model = ProbabilisticUNet(**args)
    with torch.no_grad():  # a prior with real spread, so that samples differ
        model.prior_net.head.proj.weight.normal_(0, 0.3)
        model.prior_net.head.proj.bias[3:].fill_(0.5)
        model.fcomb.first.weight.mul_(5)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = Config()
    cfg.model.features = (4, 8)
    cfg.model.latent_dim = 3
    cfg.model.fcomb_layers = 2
    cfg.model.convs_per_level = 1
    model = build_model(cfg.model)
    torch.manual_seed(1)
    with torch.no_grad():
        model.prior_net.head.proj.weight.normal_(0, 0.3)
        model.fcomb.first.weight.mul_(5)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    atomic_save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


def images(n=5, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, size, size, generator=g) for _ in range(n)]


def test_load_model_through_the_registry(checkpoint):
    model, cfg, ckpt = load_model(checkpoint)
    assert isinstance(model, ProbabilisticUNet) and not model.training
    assert cfg.model.latent_dim == 3 and ckpt["path"] == str(checkpoint)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_model(checkpoint.parent / "nowhere.pt")


def test_precision_policy_is_fp32_unless_asked(monkeypatch):
    from probunet import precision

    cpu = torch.device("cpu")
    assert inference_dtype(None, cpu) is None
    assert inference_dtype("off", cpu) is None
    monkeypatch.setattr(precision, "cpu_capability", lambda: "none")
    assert inference_dtype("auto", cpu) is None  # auto: fp32 on a CPU without bf16 units
    monkeypatch.setattr(precision, "cpu_capability", lambda: "amx_bf16")
    assert inference_dtype("auto", cpu) == torch.bfloat16  # bf16 where it is fast
    assert inference_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="amp must be one of"):
        inference_dtype("half", cpu)


def test_amp_sampler_really_runs_under_autocast():
    model = tiny_model()
    seen = []
    model.fcomb.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    model.unet.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    Sampler(model, amp="bf16").sample(["a"], images(1)[0][None], 2)
    assert torch.bfloat16 in seen
    seen.clear()
    Sampler(model).sample(["a"], images(1)[0][None], 2)
    assert seen and torch.bfloat16 not in seen


def test_case_seeding_depends_on_seed_case_and_sample_only():
    a = case_noise(0, "case1", 4, (3,))
    assert a.shape == (4, 3)
    assert torch.equal(case_noise(0, "case1", 8, (3,))[:4], a)  # more samples extend the first ones
    assert not torch.equal(case_noise(0, "case2", 4, (3,)), a)
    assert not torch.equal(case_noise(1, "case1", 4, (3,)), a)
    assert case_seed(0, "x") == case_seed(0, "x") != case_seed(0, "y")


def test_case_noise_equals_the_former_predict_latents():
    """The draws predict used before the single inference path stay the same numbers (the former
    ``predict.latent_eps``, written out here)."""
    import hashlib

    rows = []
    for s in range(5):
        digest = hashlib.sha256(f"probunet-predict:3:sub/c:{s}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        rows.append(torch.randn(6, generator=g))
    assert torch.equal(case_noise(3, "sub/c", 5, (6,)), torch.stack(rows))


def test_same_samples_whichever_batch_the_case_is_in(checkpoint):
    model, _, _ = load_model(checkpoint)
    imgs, ids = images(5), [f"c{i}" for i in range(5)]
    alone = {}
    for i in range(5):
        r = Sampler(model, seed=7, batch_size=1).sample([ids[i]], imgs[i][None], 6, keep_logits=True)
        alone[ids[i]] = r
    # other batch sizes, another order, another chunking of the samples
    for batch_size, order, chunk in ((4, [0, 1, 2, 3, 4], None), (3, [4, 2, 0, 3, 1], 4), (5, [3, 1, 4, 0, 2], 1)):
        sampler = Sampler(model, seed=7, batch_size=batch_size, sample_chunk=chunk)
        seen = 0
        for idx, r in sampler.sample_batches([imgs[o] for o in order], [ids[o] for o in order], 6,
                                             keep_logits=True):
            for j, k in enumerate(idx):
                ref = alone[ids[order[k]]]
                assert torch.equal(r.labels[j], ref.labels[0])
                torch.testing.assert_close(r.logits[j], ref.logits[0], rtol=1e-5, atol=1e-5)
                seen += 1
        assert seen == 5
    # samples differ between cases, samples and seeds: the test above compares real draws
    assert not torch.equal(alone["c0"].logits[0, 0], alone["c0"].logits[0, 1])
    other = Sampler(model, seed=8).sample(["c0"], imgs[0][None], 6, keep_logits=True)
    assert not torch.allclose(other.logits, alone["c0"].logits)


def test_sampler_uses_the_model_interface_only():
    """A model that is not a Probabilistic U-Net (no unet/fcomb/prior) runs through the Sampler."""

    class Toy(torch.nn.Module):
        spatial_dims, in_channels, num_classes, divisor = 2, 1, 3, 4

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def sample(self, image, num_samples, *, generator=None):
            b = image.shape[0]
            noise = torch.randn(b, num_samples, self.num_classes, *image.shape[2:], generator=generator)
            return image[:, None] * self.w + noise

    toy = Toy()
    imgs = images(3, size=8)
    one = [Sampler(toy, seed=1).sample([f"t{i}"], imgs[i][None], 4, keep_logits=True) for i in range(3)]
    both = next(Sampler(toy, seed=1, batch_size=3).sample_batches(imgs, ["t0", "t1", "t2"], 4, keep_logits=True))[1]
    for i in range(3):
        assert torch.equal(both.logits[i], one[i].logits[0])


def test_group_by_shape_keeps_order_and_size():
    shapes = [(1, 8, 8), (1, 8, 8), (1, 8, 8), (1, 4, 4), (1, 8, 8), (1, 8, 8)]
    items = [torch.zeros(s) for s in shapes]
    assert group_by_shape(items, 2) == [[0, 1], [2], [3], [4, 5]]
    assert group_by_shape(items, 10) == [[0, 1, 2], [3], [4, 5]]


def test_pad_uses_per_channel_minimum_and_crops_back():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3) + 5
    out, crop = pad_to(x, (6, 4))
    assert out.shape == (1, 2, 6, 4)
    assert torch.equal(out[crop], x)
    assert out[0, 0, 0, 0] == 5 and out[0, 1, 0, 0] == 14  # each channel's minimum


def test_reducer_matches_hand_computed_values():
    # two images, three samples, two raters, 1x4 images, two classes
    lab = torch.tensor([[[[0, 1, 1, 0]], [[0, 1, 0, 0]], [[1, 1, 0, 0]]],
                        [[[0, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 1, 1]]]])  # (2, 3, 1, 4)
    refs = torch.tensor([[[[0, 1, 1, 0]], [[0, 0, 0, 0]]],
                         [[[0, 0, 1, 1]], [[0, 0, 1, 0]]]])  # (2, 2, 1, 4)
    logits = torch.where(torch.stack([lab == 0, lab == 1], dim=2), 2.0, -2.0)  # (2, 3, 2, 1, 4)
    red = SampleReducer(2, 3, 2, (1, 4), references=refs)
    red.add(logits[:, 2:], 2)  # chunks out of order
    red.add(logits[:, :2], 0)
    r = red.result()
    assert torch.equal(r.labels.long(), lab)
    p_hit = math.exp(2) / (math.exp(2) + math.exp(-2))
    # image 0, pixel 1: every sample says 1 -> p(1) = p_hit; pixel 0: one of three
    torch.testing.assert_close(r.mean_probability[0, 1, 0, 1], torch.tensor(p_hit))
    torch.testing.assert_close(r.mean_probability[0, 1, 0, 0], torch.tensor((p_hit + 2 * (1 - p_hit)) / 3))
    # consensus: strict majority (2 of 3)
    assert r.consensus[0, 0].tolist() == [0, 1, 0, 0] and r.consensus[1, 0].tolist() == [0, 0, 0, 0]
    # entropy of the mean distribution at image 0 pixel 1
    p = p_hit
    torch.testing.assert_close(r.entropy[0, 0, 1], torch.tensor(-(p * math.log(p) + (1 - p) * math.log(1 - p))))
    # distances by hand (d = 1 - IoU, empty vs empty = 0): image 0 samples {1,2}, {1}, {0,1}
    d_ss0 = torch.tensor([[0, 0.5, 2 / 3], [0.5, 0, 0.5], [2 / 3, 0.5, 0]])
    torch.testing.assert_close(r.d_ss[0].float(), d_ss0)
    d_sy0 = torch.tensor([[0, 1], [0.5, 1], [2 / 3, 1]])
    torch.testing.assert_close(r.d_sy[0].float(), d_sy0)
    ged0 = 2 * d_sy0.mean() - d_ss0.mean() - torch.tensor([[0, 1], [1, 0.0]]).mean()
    torch.testing.assert_close(r.ged()[0].float(), ged0)
    # and the same as probunet.metrics on the whole set at once
    comp = metrics.ged_components(lab, refs)
    torch.testing.assert_close(r.ged(), metrics.ged_from_components(comp))
    torch.testing.assert_close(r.hm_iou(), metrics.hungarian_matched_iou_from_iou(1 - comp.d_sy))
    torch.testing.assert_close(r.sample_diversity, metrics.sample_diversity(lab))


def test_reducer_multiclass_consensus_ties_go_to_the_lower_label():
    lab = torch.tensor([[[[2, 1, 0]], [[2, 2, 1]], [[1, 0, 2]], [[0, 1, 2]]]])  # (1, 4, 1, 3)
    logits = torch.stack([(lab == k).float() * 4 for k in range(3)], dim=2)
    red = SampleReducer(1, 4, 3, (1, 3))
    red.add(logits, 0)
    assert red.result().consensus[0, 0].tolist() == [2, 1, 2]


def test_reducer_refuses_missing_samples():
    red = SampleReducer(1, 3, 2, (2, 2))
    red.add(torch.zeros(1, 2, 2, 2, 2), 0)
    with pytest.raises(ValueError, match=r"samples \[2\] were never added"):
        red.result()


def test_sliding_windows_equal_the_whole_image_where_the_model_allows():
    """With one window covering the whole image, and with the context from the whole
    image and a model whose U-Net sees only one pixel (1x1 convs, one level), windows
    give the whole-image result (up to the float rounding of the blending)."""
    model = tiny_model(features=(4,), convs_per_level=1)
    for m in model.modules():  # make every conv 1x1-like: the output at a pixel depends on that pixel only
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            with torch.no_grad():
                centre = m.weight[:, :, 1, 1].clone()
                m.weight.zero_()
                m.weight[:, :, 1, 1] = centre
    imgs = images(2, size=20)
    x = torch.stack(imgs)
    whole = Sampler(model, seed=3, batch_size=4).sample(["a", "b"], x, 5, keep_logits=True)
    for roi, blend in ((8, "constant"), ((12, 6), "gaussian")):
        win = Sampler(model, seed=3, batch_size=3, roi_size=roi, overlap=0.5, blend=blend)
        assert win.uses_window((20, 20))
        r = win.sample(["a", "b"], x, 5, keep_logits=True)
        torch.testing.assert_close(r.logits, whole.logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(r.labels, whole.labels)


def test_sliding_windows_share_the_draw_of_each_sample():
    """Every window of an image uses the image's latent of sample s (same noise, prior of the
    whole image): away from the window borders, each sample equals the whole-image one."""
    model = tiny_model(features=(4,), convs_per_level=1)
    x = torch.stack(images(1, size=16))
    r = Sampler(model, seed=0, roi_size=8, overlap=0.25, blend="constant").sample(["c"], x, 3, keep_logits=True)
    big = Sampler(model, seed=0).sample(["c"], x, 3, keep_logits=True)
    # the model's U-Net has 3x3 context so borders differ; the interior of each window does not
    torch.testing.assert_close(r.logits[..., 2:6, 2:6], big.logits[..., 2:6, 2:6], rtol=1e-4, atol=1e-4)


def test_sampler_argument_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="blend"):
        Sampler(model, blend="max")
    with pytest.raises(ValueError, match="overlap"):
        Sampler(model, overlap=1.0)
    with pytest.raises(ValueError, match="case ids"):
        Sampler(model).sample(["a"], torch.zeros(2, 1, 8, 8), 2)
    with pytest.raises(ValueError, match="images must be"):
        Sampler(model).sample(["a"], torch.zeros(1, 2, 8, 8), 2)


def test_sampler_restores_training_mode():
    model = tiny_model().train()
    Sampler(model).sample(["a"], images(1)[0][None], 2)
    assert model.training


def test_reductions_of_a_real_model_match_metrics(checkpoint):
    model, _, _ = load_model(checkpoint)
    imgs = images(3)
    g = torch.Generator().manual_seed(0)
    refs = [torch.randint(0, 2, (3, 16, 16), generator=g) for _ in range(3)]
    for idx, r in Sampler(model, seed=0, batch_size=3, sample_chunk=2).sample_batches(
            imgs, ["a", "b", "c"], 5, references=refs, keep_logits=True):
        lab = r.logits.argmax(dim=2)
        assert torch.equal(r.labels.long(), lab)
        ref = torch.stack([refs[i] for i in idx])
        torch.testing.assert_close(r.ged(), metrics.generalized_energy_distance(lab, ref))
        torch.testing.assert_close(r.mean_probability, torch.softmax(r.logits, dim=2).mean(dim=1))
        torch.testing.assert_close(r.entropy, metrics.predictive_entropy(r.logits))
        np.testing.assert_array_equal(r.d_ss.diagonal(dim1=1, dim2=2).numpy(), 0)
