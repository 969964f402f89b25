import json

import numpy as np
import pytest

from probunet.data import synthetic


def test_deterministic_given_seed_and_independent_of_count():
    a = synthetic.generate(6, 32, seed=3)
    b = synthetic.generate(3, 32, seed=3)
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"])
        assert np.array_equal(x["labels"], y["labels"])
    c = synthetic.generate(3, 32, seed=4)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_and_types(spatial_dims):
    items = synthetic.generate(2, 16, spatial_dims=spatial_dims, num_raters=3)
    for it in items:
        assert it["image"].shape == (1,) + (16,) * spatial_dims and it["image"].dtype == np.float32
        assert it["labels"].shape == (3,) + (16,) * spatial_dims and it["labels"].dtype == np.int64
        assert set(np.unique(it["labels"])) <= {0, 1}
        assert 1 <= len(it["meta"]["truth"]["lesions"]) <= 3


def test_tight_raters_draw_inside_loose_raters():
    # Same lesion present for both: the tighter threshold's mask is a subset.
    for it in synthetic.generate(20, 32):
        truth = it["meta"]["truth"]
        L = len(truth["lesions"])
        masks = synthetic.masks_from(truth, [0.3, 0.7], np.ones((2, L), dtype=bool))
        assert np.all(masks[1] <= masks[0])
        assert masks[0].sum() > masks[1].sum()


def test_presence_probability_rises_with_contrast():
    ps = [synthetic.presence_probability(c) for c in np.linspace(0.1, 0.9, 9)]
    assert all(a < b for a, b in zip(ps, ps[1:]))
    assert ps[0] < 0.05 and ps[-1] > 0.99


def test_rater_statistics_match_the_recorded_truth():
    items = synthetic.generate(400, 24, seed=1)
    pairs = [(l["presence_probability"], p)
             for it in items
             for l, p in zip(it["meta"]["truth"]["lesions"], np.array(it["meta"]["truth"]["rater_presence"]).T)]
    probs = np.array([p for p, _ in pairs])
    marked = np.array([m.mean() for _, m in pairs])  # fraction of the 4 raters marking the lesion
    for lo, hi in [(0.0, 0.2), (0.2, 0.8), (0.8, 1.01)]:
        sel = (probs >= lo) & (probs < hi)
        assert sel.sum() > 30
        assert abs(marked[sel].mean() - probs[sel].mean()) < 0.06, (lo, hi)


def test_fresh_references_follow_the_truth():
    it = synthetic.generate(1, 32, seed=7)[0]
    truth = it["meta"]["truth"]
    refs = synthetic.draw_references(truth, 4000, np.random.default_rng(0))
    pres = synthetic.lesion_presence(refs, truth).mean(0)
    expected = np.array([l["presence_probability"] for l in truth["lesions"]])
    # Overlapping lesions can mark each other's core: allow only upward deviations beyond noise.
    assert np.all(pres >= expected - 0.03)
    assert np.all(np.abs(pres - expected) < 0.03) or len(expected) > 1


def test_lesion_presence_reads_the_recorded_raters():
    hits = total = 0
    for it in synthetic.generate(60, 32, seed=2):
        truth = it["meta"]["truth"]
        got = synthetic.lesion_presence(it["labels"], truth)
        want = np.array(truth["rater_presence"], dtype=bool)
        hits += (got == want).sum()
        total += want.size
    assert hits / total > 0.93  # misses only where lesions overlap


def test_write_qubiq_layout_and_truth(tmp_path):
    nib = pytest.importorskip("nibabel")
    items = synthetic.generate(2, 16, num_raters=3)
    synthetic.write_qubiq(items, tmp_path / "ds", params={"seed": 0})
    case = tmp_path / "ds" / "case_0000"
    assert sorted(p.name for p in case.iterdir()) == [
        "image.nii.gz", "task01_seg01.nii.gz", "task01_seg02.nii.gz", "task01_seg03.nii.gz"]
    img = nib.load(case / "image.nii.gz").get_fdata()
    assert np.allclose(img, items[0]["image"][0])
    seg = np.asarray(nib.load(case / "task01_seg02.nii.gz").dataobj)
    assert np.array_equal(seg, items[0]["labels"][1])
    truth = json.loads((tmp_path / "ds" / "truth.json").read_text())
    assert truth["cases"]["case_0001"]["rater_thresholds"] == items[1]["meta"]["truth"]["rater_thresholds"]
    with pytest.raises(FileExistsError):
        synthetic.write_qubiq(items, tmp_path / "ds")
