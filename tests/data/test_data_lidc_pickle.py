"""data.format: lidc_pickle: written with pickle, read back exactly; unsafe pickles refused unrun."""

import os
import pickle

import numpy as np
import pytest

from probunet.config import load_config
from probunet.data import lidc_pickle, load_splits, read_cases, safe_pickle
from probunet.data.splits import group_of
from probunet.data.validate import DataError


def _entries(n_series=3, slices=2, size=16, readers=4, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(n_series):
        for k in range(slices):
            masks = [(rng.random((size, size)) > 0.7).astype(np.uint8) for _ in range(readers)]
            out[f"LIDC-IDRI-{s + 1:04d}_slice{k}"] = {
                "image": rng.random((size, size)),  # float64 in [0, 1], as in the public pickle
                "masks": masks,
                "series_uid": f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{1000 + s}",
            }
    return out


def _cfg(path, *over):
    return load_config(None, ["data.format=lidc_pickle", f"data.path={path}", *over])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_round_trip_exact(tmp_path, protocol):
    entries = _entries()
    path = tmp_path / "data_lidc.pickle"
    with open(path, "wb") as fh:
        pickle.dump(entries, fh, protocol=protocol)
    items = read_cases(_cfg(path).data)
    assert [i["case_id"] for i in items] == list(entries)
    for item in items:
        e = entries[item["case_id"]]
        assert item["image"].dtype == np.float32 and item["image"].shape == (1, 16, 16)
        np.testing.assert_array_equal(item["image"][0], e["image"].astype(np.float32))
        assert item["labels"].dtype == np.int64
        np.testing.assert_array_equal(item["labels"], np.stack(e["masks"]))
        assert item["meta"]["series_uid"] == e["series_uid"]
        assert item["meta"]["patient"] == item["case_id"].split("_")[0]
        assert str(path) in item["meta"]["image_path"] and item["case_id"] in item["meta"]["image_path"]


def test_numpy1_module_names_are_admitted(tmp_path):
    """Pickles written by numpy 1.x name numpy.core.multiarray (numpy 2 renamed it _core)."""
    entries = _entries(1, 1)
    raw = pickle.dumps(entries, protocol=2)
    assert b"numpy._core" in raw or b"numpy.core" in raw
    raw = raw.replace(b"numpy._core", b"numpy.core")
    (tmp_path / "old.pickle").write_bytes(raw)
    (item,) = read_cases(_cfg(tmp_path / "old.pickle").data)
    np.testing.assert_array_equal(item["labels"], np.stack(entries[item["case_id"]]["masks"]))


def test_several_files_and_pickle_files_option(tmp_path):
    a, b = _entries(2, seed=1), _entries(2, seed=2)
    b = {k.replace("LIDC-IDRI-000", "LIDC-IDRI-010"): v for k, v in b.items()}
    lidc_pickle.write_pickle(a, tmp_path / "part1.pickle")
    lidc_pickle.write_pickle(b, tmp_path / "part2.pickle")
    assert len(read_cases(_cfg(tmp_path).data)) == 8
    only = read_cases(_cfg(tmp_path, "data.pickle_files=[part2.pickle]").data)
    assert [i["case_id"] for i in only] == list(b)
    lidc_pickle.write_pickle(a, tmp_path / "dup.pickle")
    with pytest.raises(DataError, match=r"part1\.pickle: key .* is also in .*dup\.pickle"):
        read_cases(_cfg(tmp_path).data)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    data = {"LIDC-IDRI-0001_s0": {"image": np.zeros((4, 4)), "masks": [_Evil(marker)], "series_uid": "1"}}
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    with pytest.raises(DataError, match=r"evil\.pickle: refused to load this pickle: it asks for .*system.*"
                                        r"nothing was executed"):
        read_cases(_cfg(path).data)
    assert not marker.exists()
    path.write_bytes(pickle.dumps([_EvalEvil()], protocol=protocol))
    with pytest.raises(DataError, match=r"it asks for .*builtins?_*\.eval"):
        lidc_pickle.safe_load(path)


def test_chunked_reading_of_large_files(tmp_path, monkeypatch):
    """Files over 2 GB are read in pieces; shrink the piece size to exercise that path."""
    entries = _entries(2, 2, size=64)
    lidc_pickle.write_pickle(entries, tmp_path / "big.pickle")
    monkeypatch.setattr(safe_pickle, "MAX_READ", 1000)
    items = read_cases(_cfg(tmp_path / "big.pickle").data)
    for item in items:
        np.testing.assert_array_equal(item["labels"], np.stack(entries[item["case_id"]]["masks"]))


def test_missing_raters_pad_or_error(tmp_path):
    entries = _entries(3, 2)
    key = list(entries)[1]
    entries[key]["masks"] = entries[key]["masks"][:2]
    lidc_pickle.write_pickle(entries, tmp_path / "d.pickle")
    cfg = _cfg(tmp_path / "d.pickle", "data.num_raters=4")
    splits = load_splits(cfg)
    item = [i for s in splits.values() for i in s if i["case_id"] == key][0]
    assert item["labels"].shape == (4, 16, 16) and item["labels"][2:].sum() == 0
    assert item["meta"]["rater_present"] == [True, True, False, False]
    with pytest.raises(DataError, match=rf"d\.pickle\[{key!r}\]: 2 rater masks, expected 4"):
        load_splits(_cfg(tmp_path / "d.pickle", "data.num_raters=4", "data.missing_raters=error"))


@pytest.mark.parametrize("bad,match", [
    ("notadict", r"expected a dict"),
    ("nomasks", r"\['image', 'series_uid'\]"),
    ("maskshape", r"mask 1 has shape"),
    ("nan", r"image contains NaN"),
    ("soft", r"mask 0: rater mask holds non-integer values"),
])
def test_structure_errors_name_file_and_key(tmp_path, bad, match):
    entries = _entries(3, 1)
    key = list(entries)[0]
    if bad == "notadict":
        entries = [1, 2]
    elif bad == "nomasks":
        del entries[key]["masks"]
    elif bad == "maskshape":
        entries[key]["masks"][1] = np.zeros((3, 3), np.uint8)
    elif bad == "nan":
        entries[key]["image"][0, 0] = np.nan
    else:
        entries[key]["masks"][0] = entries[key]["masks"][0] * 0.5
    lidc_pickle.write_pickle(entries, tmp_path / "x.pickle")
    with pytest.raises(DataError, match=r"x\.pickle.*" + match):
        load_splits(_cfg(tmp_path / "x.pickle"))


def test_not_a_pickle_and_empty_folder(tmp_path):
    (tmp_path / "junk.pickle").write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match=r"junk\.pickle: not a readable pickle"):
        read_cases(_cfg(tmp_path / "junk.pickle").data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        read_cases(_cfg(tmp_path / "empty").data)


def test_patient_level_split_never_shares_a_patient(tmp_path):
    entries = {}
    rng = np.random.default_rng(0)
    for p in range(12):
        for series in range(2 if p % 3 == 0 else 1):  # some patients have two CT series
            for k in range(3):
                entries[f"LIDC-IDRI-{p:04d}_{series}_slice{k}"] = {
                    "image": rng.random((8, 8)), "masks": [np.zeros((8, 8), np.uint8)] * 4,
                    "series_uid": f"1.2.{p}.{series}"}
    lidc_pickle.write_pickle(entries, tmp_path / "d.pickle")
    splits = load_splits(_cfg(tmp_path / "d.pickle"), run_dir=tmp_path / "run")
    patients = {name: {i["meta"]["patient"] for i in items} for name, items in splits.items()}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    assert sum(len(v) for v in splits.values()) == len(entries)
    assert all(len(v) for v in splits.values())
    assert (tmp_path / "run" / "splits.json").is_file()
    again = load_splits(_cfg(tmp_path / "d.pickle"))
    assert {k: [i["case_id"] for i in v] for k, v in again.items()} == \
        {k: [i["case_id"] for i in v] for k, v in splits.items()}
    # The written split can be given back as a split file.
    cfg = _cfg(tmp_path / "d.pickle", f"data.split.file={tmp_path / 'run' / 'splits.json'}")
    back = load_splits(cfg)
    assert {k: sorted(i["case_id"] for i in v) for k, v in back.items()} == \
        {k: sorted(i["case_id"] for i in v) for k, v in splits.items()}


def test_series_group_when_key_names_no_patient(tmp_path):
    entries = {f"slice{k}": {"image": np.zeros((4, 4)), "masks": [np.zeros((4, 4), np.uint8)],
                             "series_uid": f"1.2.3.{k // 2}"} for k in range(4)}
    lidc_pickle.write_pickle(entries, tmp_path / "d.pickle")
    items = read_cases(_cfg(tmp_path / "d.pickle").data)
    assert [group_of(i) for i in items] == ["1.2.3.0", "1.2.3.0", "1.2.3.1", "1.2.3.1"]
