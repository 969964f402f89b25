"""``probunet evaluate ... --report``: the static HTML report (structure in Python; behaviour in headless Chromium)."""

import math
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from probunet.cli import main
from probunet.config import load_config
from probunet.train.trainer import fit

from cdp import Browser, chromium_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A tiny trained run (configs/debug.yaml, 2 steps) evaluated with --report on 6 cases."""
    run = tmp_path_factory.mktemp("report") / "run"
    fit(load_config(ROOT / "configs" / "debug.yaml", ["train.steps=2", "train.device=cpu"]), run)
    assert main(["--quiet", "evaluate", str(run), "--num-samples", "4", "--report", "--no-progress", "--device",
                 "cpu"]) == 0
    return run / "eval" / "report.html"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self.scripts, self.ths = {}, [], 0, []
        self._table = None
        self._row = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = {"attrs": a, "cells": []}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = a
            self._row["cells"].append(a)
            if tag == "th":
                self.ths.append(a)
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def _parse(path):
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_report_structure(report):
    assert report.is_file()
    text = report.read_text(encoding="utf-8")
    page = _parse(report)
    # the summary table with each metric's meaning, and the conventions
    summary_rows = page.tables["summary"][1:]
    assert len(summary_rows) >= 10
    assert "d(a, b) = 1 - IoU" in text and "ordered pairs" in text and "lcm(S, A)" in text
    # the per-case table: one row per case, sortable columns, worst (largest GED) first
    rows = page.tables["cases"][1:]
    import csv

    with open(report.parent / "per_case.csv", newline="") as fh:
        per_case = list(csv.DictReader(fh))
    assert len(rows) == len(per_case) >= 4
    keys = [th.get("data-key") for th in page.ths if th.get("data-key")]
    assert {"ged", "hm_iou", "empty_gap"} <= set(keys)
    col = 2 + keys.index("ged")
    ged = [float(r["cells"][col]["data-v"]) for r in rows]
    assert ged == sorted(ged, reverse=True)
    by_case = {r["case_id"]: float(r["ged"]) for r in per_case}
    assert [r["attrs"]["data-case"] for r in rows] == sorted(by_case, key=lambda c: -by_case[c])
    # images: reliability figure and one per case, all present next to the page; nothing external
    assert "reliability.png" in page.imgs
    assert sum(src.startswith("report_files/") for src in page.imgs) == len(rows)
    for src in page.imgs:
        assert (report.parent / src).is_file(), src
    assert "http://" not in text and "https://" not in text
    assert page.scripts == 1
    # the debug config is a Probabilistic U-Net: one model whose spread is a latent, so the report
    # shows no epistemic map and says why, as `probunet study` does
    assert "No epistemic map for this model" in text and "train an ensemble of it" in text


def test_report_in_headless_chromium(report, tmp_path):
    binary = chromium_path()
    if binary is None:
        print("SKIP reason: chromium is not installed (apt-get install chromium); the report's structure is "
              "checked in test_report_structure")
        pytest.skip("chromium is not installed (apt-get install chromium); structure tested in Python")
    try:
        browser = Browser(binary, 1280, 900)
    except Exception as exc:  # pragma: no cover - depends on the machine
        print(f"SKIP reason: chromium cannot start here ({exc})")
        pytest.skip(f"chromium cannot start here ({exc})")
    try:
        browser.open(report)
        order = "Array.from(document.querySelectorAll('#cases tbody tr')).map(r => r.dataset.case)"
        values = ("Array.from(document.querySelectorAll('#cases tbody tr')).map(r => "
                  "parseFloat(r.cells[document.querySelector('th[data-key={}]').cellIndex].dataset.v))")
        assert browser.evaluate("document.querySelectorAll('#cases tbody tr').length") >= 4
        before = browser.evaluate(order)
        browser.evaluate("document.querySelector('th[data-key=hm_iou]').click()")
        after = browser.evaluate(order)
        hm = browser.evaluate(values.format("hm_iou"))
        assert sorted(after) == sorted(before)
        assert hm == sorted(hm)  # first click: ascending
        browser.evaluate("document.querySelector('th[data-key=hm_iou]').click()")
        assert browser.evaluate(values.format("hm_iou")) == sorted(hm, reverse=True)  # second click: reversed
        browser.evaluate("document.querySelector('th[data-key=ged]').click()")
        ged = browser.evaluate(values.format("ged"))
        assert ged == sorted(ged) and browser.evaluate(order) != before  # ascending GED: the reverse of worst first
        loaded = browser.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert loaded
        assert browser.errors() == []
        shot = browser.screenshot(tmp_path / "report.png")
        assert shot.stat().st_size > 10_000
    finally:
        browser.close()
    assert not any(math.isnan(v) for v in ged)


def test_case_figure_3d_busiest_slice_and_worst_first(tmp_path):
    import numpy as np
    import torch

    from probunet.evaluation.html_report import busiest_slice, case_figure, worst_first

    raters = np.zeros((2, 6, 8, 8), dtype=np.uint8)
    raters[:, 4, 2:5, 2:5] = 1  # slice 4 has the most foreground
    raters[0, 1, 0, 0] = 1
    assert busiest_slice(raters) == 4
    logits = torch.randn(3, 2, 6, 8, 8)
    path = case_figure(tmp_path / "c.png", np.random.rand(1, 6, 8, 8).astype(np.float32), raters, logits,
                       title="3d", spatial_dims=3)
    assert path.is_file() and path.stat().st_size > 1000
    rows = [{"case_id": "a", "ged": 0.2}, {"case_id": "b", "ged": float("nan")}, {"case_id": "c", "ged": 0.9}]
    assert [r["case_id"] for r in worst_first(rows)] == ["c", "a", "b"]


def test_case_figure_draws_only_the_maps_the_model_supports(tmp_path):
    """A latent model (one model draw) gets total and aleatoric panels; an ensemble of two members also
    the epistemic one: the figure is one panel (1.25 in at 80 dpi) wider."""
    import numpy as np
    import torch
    from PIL import Image

    from probunet.evaluation.html_report import case_figure
    from probunet.inference.uncertainty import ModelMaps

    raters = np.zeros((2, 8, 8), dtype=np.uint8)
    raters[:, 2:5, 2:5] = 1
    logits = torch.randn(4, 2, 8, 8)
    image = np.random.rand(1, 8, 8).astype(np.float32)
    latent = ModelMaps("prob_unet", "latent", ("total", "aleatoric"), why="a latent")
    members = ModelMaps("ensemble of unet", "members", ("total", "aleatoric", "epistemic"), groups=2)
    widths = [Image.open(case_figure(tmp_path / f"{n}.png", image, raters, logits, title=n, spatial_dims=2,
                                     maps_spec=spec)).size[0] for n, spec in (("l", latent), ("m", members))]
    assert widths[1] - widths[0] == pytest.approx(1.25 * 80, abs=2)
