"""Patient-level splits: deterministic, disjoint by group, from a user's file, written for others."""

import json

import numpy as np
import pytest

from probunet.config import ConfigError, SplitConfig, load_config
from probunet.data.splits import group_of, read_split_file, split_groups, split_items, write_split
from probunet.data.validate import DataError


def _items(num_patients=20, per_patient=(1, 4), seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for p in range(num_patients):
        for s in range(int(rng.integers(*per_patient))):
            items.append({"case_id": f"P{p:03d}_slice{s}", "meta": {"group": f"P{p:03d}"}})
    return items


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("n", [3, 5, 20, 101])
def test_never_shares_a_patient_and_is_deterministic(seed, n):
    items = _items(n, seed=seed)
    cfg = SplitConfig(seed=seed)
    a, b = split_items(items, cfg), split_items(items, cfg)
    assert {k: [i["case_id"] for i in v] for k, v in a.items()} == {k: [i["case_id"] for i in v] for k, v in b.items()}
    groups = {k: {group_of(i) for i in v} for k, v in a.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    assert sum(len(v) for v in a.values()) == len(items)
    assert all(groups[k] for k in ("train", "val", "test"))


def test_papers_protocol_fractions():
    groups = [f"S{i}" for i in range(100)]
    out = split_groups(groups, seed=3, test_fraction=0.2, val_fraction=0.2)
    assert (len(out["test"]), len(out["val"]), len(out["train"])) == (20, 16, 64)
    assert split_groups(groups[::-1], seed=3, test_fraction=0.2, val_fraction=0.2) == out  # order-free
    assert split_groups(groups, seed=4, test_fraction=0.2, val_fraction=0.2) != out


def test_split_file_json_csv_and_unlisted(tmp_path):
    items = _items(6, per_patient=(2, 3))
    (tmp_path / "s.json").write_text(json.dumps({"train": ["P000", "P001", "P002", "P003"], "val": ["P004"],
                                                 "test": ["P005_slice0", "P005_slice1"]}))
    out = split_items(items, SplitConfig(file=str(tmp_path / "s.json")))
    assert [len(out[k]) for k in ("train", "val", "test")] == [8, 2, 2]
    (tmp_path / "s.csv").write_text("case_id,split\nP000,train\nP001,val\nP002,test\n")
    with pytest.raises(DataError, match=r"s\.csv: 6 case\(s\) are in no split.*unlisted=ignore"):
        split_items(items, SplitConfig(file=str(tmp_path / "s.csv")))
    out = split_items(items, SplitConfig(file=str(tmp_path / "s.csv"), unlisted="ignore"))
    assert [len(out[k]) for k in ("train", "val", "test")] == [2, 2, 2]


def test_split_file_that_splits_a_patient_is_refused(tmp_path):
    items = _items(3, per_patient=(2, 3))
    (tmp_path / "s.json").write_text(json.dumps({"train": ["P000_slice0", "P001", "P002"],
                                                 "test": ["P000_slice1"]}))
    with pytest.raises(DataError, match="'P000' is in both train and test"):
        split_items(items, SplitConfig(file=str(tmp_path / "s.json")))


@pytest.mark.parametrize("text,match", [
    ('{"train": ["a"], "holdout": ["b"]}', "unknown split 'holdout'"),
    ('{"train": ["a"], "test": ["a"]}', "'a' is listed in both train and test"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_split_files(tmp_path, text, match):
    (tmp_path / "s.json").write_text(text)
    with pytest.raises(DataError, match=match):
        read_split_file(tmp_path / "s.json")
    with pytest.raises(DataError, match="split file not found"):
        read_split_file(tmp_path / "missing.json")


def test_written_split_reads_back(tmp_path):
    items = _items(10)
    out = split_items(items, SplitConfig(seed=5))
    write_split(out, tmp_path / "splits.json")
    back = split_items(items, SplitConfig(file=str(tmp_path / "splits.json")))
    assert {k: [i["case_id"] for i in v] for k, v in back.items()} == \
        {k: [i["case_id"] for i in v] for k, v in out.items()}
    data = json.loads((tmp_path / "splits.json").read_text())
    assert set(data) == {"train", "val", "test"} and {"case_id", "group"} <= set(data["train"][0])


def test_release_protocol():
    items = [{"case_id": f"{s}/P{i}/x", "meta": {"group": f"P{i}", "release_split": s}}
             for i, s in enumerate(["train", "train", "val", "test"])]
    out = split_items(items, SplitConfig(protocol="release"))
    assert [len(out[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    with pytest.raises(DataError, match="release"):
        split_items([{"case_id": "a", "meta": {}}], SplitConfig(protocol="release"))


def test_split_config_checks():
    with pytest.raises(ConfigError, match="data.split.protocol"):
        load_config(None, ["data.split.protocol=random"])
    with pytest.raises(ConfigError, match="data.split.test_fraction"):
        load_config(None, ["data.split.test_fraction=1.5"])
    with pytest.raises(ConfigError, match="data.split.file"):
        load_config(None, ["data.split.protocol=file"])
    assert load_config(None, ["data.split.file=x.csv"]).data.split.protocol == "file"
