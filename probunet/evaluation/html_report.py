"""A static HTML report of an evaluation: ``probunet evaluate ... --report``.

One file, ``report.html``, next to ``summary.json``, plus one PNG per case in
``report_files/``; it links the ``reliability.png`` (and ``lesions.png``)
evaluate writes beside it. No server and no JavaScript framework: a few lines of
inline JavaScript sort the per-case table when a column header is clicked.

The page holds:

- the summary table: every metric's mean ± standard error with its meaning and
  the protocol (the conventions of ``summary.json``);
- the reliability diagram and, on data with a known truth, the lesion presence figure;
- the per-case table (GED, HM-IoU, empty-gap, sample and rater diversity, ...),
  worst case (largest GED) first, sortable by any numeric column;
- per case, worst first: the image, the raters, the samples, the mean foreground
  probability and the uncertainty maps (total predictive entropy, its aleatoric
  part, the mean entropy of the samples, and the epistemic part, their mutual
  information; all in nats).

The samples shown are the ones evaluate scored: they are drawn again by the same
evaluation sampler (seeded per case, fp32).
"""

from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..utils import atomic_call, atomic_write_text
from .viz import PNG_SOFTWARE

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FILES_DIR = "report_files"
GENERATOR = "probunet evaluate --report"  # marks a report.html as probunet's own (overwrite checks)
# the per-case table's columns: (key, header, True when larger is worse)
CASE_COLUMNS = (("ged", "GED", True), ("hm_iou", "HM-IoU", False), ("empty_gap", "empty-gap", True),
                ("sample_diversity", "E[d(S,S')]", None), ("reference_diversity", "E[d(Y,Y')]", None),
                ("consensus_dice", "consensus Dice", False), ("ece", "ECE", True), ("qubiq", "QUBIQ", False))
SUMMARY_KEYS = ("ged", "ged_cross", "sample_diversity", "reference_diversity", "hm_iou", "s_ncc", "consensus_dice",
                "consensus_iou", "ece", "qubiq", "empty_samples", "empty_raters", "empty_gap")
MAX_SAMPLES_SHOWN = 6

_SORT_JS = """
document.querySelectorAll('th[data-key]').forEach(function (th) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], i = th.cellIndex;
    var asc = th.getAttribute('data-order') !== 'asc';
    th.setAttribute('data-order', asc ? 'asc' : 'desc');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = parseFloat(a.cells[i].getAttribute('data-v')), y = parseFloat(b.cells[i].getAttribute('data-v'));
      if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }
      return asc ? x - y : y - x;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
#summary td.l:last-child { white-space: normal; }
.scroll { max-height: 24em; overflow-y: auto; display: inline-block; }
th { background: #f0f0f0; } th[data-key] { cursor: pointer; } th[data-key]:hover { background: #dde; }
td.l, th.l { text-align: left; } .note { color: #555; font-size: 0.85em; max-width: 70em; }
.case { margin: 1.2em 0; } .case img { max-width: 100%; } figure { display: inline-block; margin: 0 1em 0 0; }
"""


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _cell(v) -> str:
    x = _num(v)
    shown = "n/a" if not math.isfinite(x) else f"{x:.4f}"
    return f'<td data-v="{x if math.isfinite(x) else "NaN"}">{shown}</td>'


def _stat(stat) -> str:
    if not isinstance(stat, dict) or stat.get("mean") is None or not math.isfinite(_num(stat.get("mean"))):
        return "n/a"
    sem = _num(stat.get("sem"))
    return f"{stat['mean']:.4f} ± {sem:.4f}" if math.isfinite(sem) else f"{stat['mean']:.4f}"


def worst_first(rows: list[dict]) -> list[dict]:
    """The cases by GED, largest (worst) first; cases without a finite GED last."""
    return sorted(rows, key=lambda r: (not math.isfinite(_num(r.get("ged"))), -_num(r.get("ged"))
                                       if math.isfinite(_num(r.get("ged"))) else 0.0, str(r.get("case_id"))))


def _slug(case_id: str, index: int) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(case_id))
    return f"case{index:04d}_{keep[:60]}"


def _view(a: np.ndarray, spatial_dims: int, pick: Optional[int] = None) -> np.ndarray:
    """A 2D view of (..., *spatial): a 3D volume's slice ``pick`` along its first axis."""
    if spatial_dims == 3:
        return a[..., a.shape[-3] // 2 if pick is None else pick, :, :]
    return a


def busiest_slice(raters: np.ndarray) -> int:
    """The index along the first spatial axis of raters (A, D, H, W) with the most rater foreground."""
    return int((raters != 0).reshape(raters.shape[0], raters.shape[1], -1).sum(axis=(0, 2)).argmax())


MAP_TITLES = {"total": "entropy (total)", "aleatoric": "aleatoric", "epistemic": "epistemic (MI)"}


def case_figure(path: Path, image: np.ndarray, raters: np.ndarray, logits: torch.Tensor, *, title: str,
                spatial_dims: int, maps_spec=None) -> Path:
    """One case: image (C, *sp), raters (A, *sp), sample logits (S, C, *sp) -> a PNG row of panels.

    ``maps_spec``: the model's :class:`probunet.inference.uncertainty.ModelMaps` (which uncertainty maps its
    samples support and how they group into model draws, as ``probunet study`` reads them); None
    reads every sample as its own model draw (all three maps).
    """
    from ..inference.uncertainty import MAPS, decompose
    from .viz import pyplot

    plt = pyplot()
    logits = logits.float()
    probs = torch.softmax(logits, dim=1)  # (S, C, *sp)
    samples = logits.argmax(1).numpy()  # (S, *sp)
    mean_fg = (1.0 - probs[:, 0].mean(0)).numpy()
    groups = None if maps_spec is None else maps_spec.groups_for(probs.shape[0])
    shown_maps = MAPS if maps_spec is None else maps_spec.maps
    maps = {k: v[0].numpy() for k, v in decompose(probs[None], groups=groups).items() if k in shown_maps}
    pick = busiest_slice(raters) if spatial_dims == 3 else None
    shown = samples[:MAX_SAMPLES_SHOWN]
    panels = [("image", _view(image[0], spatial_dims, pick), "gray", None)]
    panels += [(f"rater {a}", _view(r, spatial_dims, pick), "viridis", (0, max(1, int(raters.max()))))
               for a, r in enumerate(raters)]
    panels += [(f"sample {s}", _view(m, spatial_dims, pick), "viridis", (0, max(1, int(raters.max()))))
               for s, m in enumerate(shown)]
    hmax = math.log(probs.shape[1])
    panels += [("mean p(fg)", _view(mean_fg, spatial_dims, pick), "magma", (0, 1))]
    panels += [(MAP_TITLES[k], _view(maps[k], spatial_dims, pick), "inferno", (0, hmax)) for k in MAPS if k in maps]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.25 * len(panels), 1.75))
    for ax, (name, img, cmap, lim) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img, cmap=cmap, vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1],
                  interpolation="nearest")
        ax.set_title(name, fontsize=6)
        ax.axis("off")
    fig.suptitle(title, fontsize=7, x=0.01, y=0.99, ha="left", va="top")
    fig.tight_layout(pad=0.2, rect=(0, 0, 1, 0.88))  # room for the title above the panels' own
    out = atomic_call(path, lambda p: fig.savefig(p, dpi=80, format="png", metadata={"Software": PNG_SOFTWARE}), suffix=".png")
    plt.close(fig)
    return out


def case_logits(model, cfg, items: list[dict], *, num_samples: int, seed: int, device) -> dict:
    """{item index: logits (S, C, *spatial)} as evaluate's sampler draws them (the scored samples)."""
    from ..inference.sampler import evaluation_sampler
    from .validation import case_ids

    sampler = evaluation_sampler(model, cfg.eval, torch.device(device), seed=int(seed))
    out = {}
    for batch, result in sampler.sample_batches([it["image"] for it in items], case_ids(items), int(num_samples),
                                                keep_logits=True, pairwise=False,
                                                key=lambda i: tuple(np.shape(items[i]["image"]))):
        for j, index in enumerate(batch):
            out[index] = result.logits[j].cpu()
    return out


def check_report_outputs(folder: Path) -> None:
    """FileExistsError when ``report.html`` or a file in ``report_files/`` under ``folder`` exists and was
    not written by a probunet report (its generator tag, the PNGs' "Software" text); a directory where
    ``report.html`` goes, or anything but plain files in ``report_files/``, is refused too."""
    page, pngs = Path(folder) / REPORT_FILE, Path(folder) / FILES_DIR
    if page.is_symlink() or page.is_dir() or (page.exists() and not _head_has(page, GENERATOR.encode())):
        raise FileExistsError(f"{page} exists and was not written by probunet; refusing to overwrite it "
                              f"(--overwrite replaces it)")
    if pngs.is_symlink() or (pngs.exists() and not pngs.is_dir()):
        raise FileExistsError(f"{pngs} exists and is not probunet's report folder; refusing to overwrite it "
                              f"(--overwrite replaces it)")
    if pngs.is_dir():
        for p in sorted(pngs.iterdir()):
            if p.is_symlink() or not p.is_file() or not _head_has(p, b"Software\x00" + PNG_SOFTWARE.encode()):
                raise FileExistsError(f"{p} was not written by probunet; refusing to overwrite the report folder "
                                      f"{pngs} (--overwrite replaces it)")


def _head_has(path: Path, marker: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return marker in fh.read(1 << 16)
    except OSError:
        return False


def write_report(result: dict, model, cfg, items: list[dict], *, device="cpu", out_dir=None,
                 progress: bool = False) -> Path:
    """Write ``report.html`` (and ``report_files/*.png``) for :func:`probunet.evaluation.scoring.evaluate`'s ``result``.

    ``items`` are the evaluated items (in the order evaluate got them); ``out_dir`` defaults to the folder of
    the summary evaluate wrote. Returns the path of ``report.html``.
    """
    from ..data import real_raters

    folder = Path(out_dir) if out_dir is not None else Path(result["files"]["summary"]).parent \
        if result.get("files", {}).get("summary") else None
    if folder is None:
        raise ValueError("write_report: no out_dir and the evaluation wrote no files")
    rows = result["per_case"]
    if len(rows) != len(items):
        raise ValueError(f"write_report: {len(rows)} evaluated cases but {len(items)} items")
    from ..inference.uncertainty import model_maps

    files = folder / FILES_DIR
    spec = model_maps(model)
    result = dict(result, uncertainty_maps={"maps": list(spec.maps), "why": spec.why})
    logits = case_logits(model, cfg, items, num_samples=result["num_samples"], seed=result["seed"], device=device)
    ordered = worst_first(rows)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ordered), desc="report", unit="case", dynamic_ncols=True)
    pngs = {}
    nd = int(cfg.model.spatial_dims)
    try:
        for row in ordered:
            i = int(row["index"])
            name = _slug(row["case_id"], i) + ".png"
            title = (f"{row['case_id']}: GED {_num(row['ged']):.3f}, HM-IoU {_num(row['hm_iou']):.3f}, "
                     f"empty-gap {_num(row['empty_gap']):.2f}")
            case_figure(files / name, np.asarray(items[i]["image"]), real_raters(items[i]), logits[i], title=title,
                        spatial_dims=nd, maps_spec=spec)
            pngs[i] = f"{FILES_DIR}/{name}"
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    page = render(result, ordered, pngs, folder)
    path = atomic_write_text(folder / REPORT_FILE, page)
    logger.info("report: %s (%d cases)", path, len(rows))
    return path


def _maps_note(spec: Optional[dict]) -> str:
    """One sentence on the maps shown (as ``probunet study`` decides them), HTML-escaped."""
    if not spec or "epistemic" in spec.get("maps", ()):
        return ""
    return html.escape(f"No epistemic map for this model: {spec.get('why', '')}. ")


def render(result: dict, ordered: list[dict], pngs: dict, folder: Path) -> str:
    """The HTML page (see the module docstring)."""
    e = html.escape
    m = result.get("metrics", {})
    desc = result.get("descriptions", {})
    conv = result.get("conventions", {})
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta name="generator" content="{GENERATOR}">',
             f"<title>probunet evaluation: {e(str(result.get('split')))} split</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Evaluation: {e(str(result.get('checkpoint')))}</h1>",
             f"<p>{e(str(result.get('split')))} split, {result.get('num_cases')} cases, {result.get('num_samples')} "
             f"samples per image, seed {result.get('seed')}, {e(str(result.get('precision', '')))}; "
             f"probunet {e(str(result.get('probunet_version')))}.</p>"]
    for w in result.get("warnings", []) or []:
        parts.append(f'<p class="note"><b>warning:</b> {e(str(w))}</p>')
    parts += ["<h2>Summary</h2>", '<table id="summary"><thead><tr><th class="l">metric</th><th>mean ± s.e.</th>'
              '<th>n</th><th class="l">meaning</th></tr></thead><tbody>']
    for key in SUMMARY_KEYS:
        if key in m:
            parts.append(f'<tr><td class="l">{e(key)}</td><td>{_stat(m[key])}</td><td>{m[key].get("n", "")}</td>'
                         f'<td class="l">{e(str(desc.get(key, "")))}</td></tr>')
    cal = result.get("calibration", {})
    if cal:
        parts.append(f'<tr><td class="l">ECE (pooled)</td><td>{_num(cal.get("ece")):.4f}</td><td></td>'
                     f'<td class="l">over all pixels of the split, {cal.get("num_bins")} bins</td></tr>')
    truth = result.get("truth")
    if truth:
        for key, stat in truth.get("metrics", {}).items():
            parts.append(f'<tr><td class="l">{e(key)}</td><td>{_stat(stat)}</td><td>{stat.get("n", "")}</td>'
                         f'<td class="l">{e(str(truth.get("descriptions", {}).get(key, "")))}</td></tr>')
    parts.append("</tbody></table>")
    parts.append('<h3>Conventions</h3><ul class="note">')
    for key, value in conv.items():
        if key != "line":
            parts.append(f"<li><b>{e(str(key))}</b>: {e(str(value))}</li>")
    parts.append("</ul>")
    if conv.get("line"):
        parts.append(f'<p class="note">{e(conv["line"])}</p>')
    parts.append("<h2>Figures</h2><div>")
    for key, caption in (("reliability", "reliability: sampled vs. rater foreground frequency"),
                         ("lesions_plot", "lesion presence: sampled vs. true probability")):
        p = result.get("files", {}).get(key)
        if p and Path(p).is_file():
            rel = Path(p).name if Path(p).parent.resolve() == folder.resolve() else Path(p).as_uri()
            parts.append(f'<figure><img src="{e(rel)}" alt="{e(key)}" width="360"><figcaption class="note">'
                         f"{e(caption)}</figcaption></figure>")
    parts.append("</div>")
    parts += ['<h2 id="cases-title">Cases, worst first</h2>',
              '<p class="note">Ordered by GED, largest first. Click a column header to sort by it (again to '
              'reverse); the case name links to its maps.</p>',
              '<div class="scroll"><table id="cases"><thead><tr><th class="l">case</th><th>raters</th>']
    for key, header, _ in CASE_COLUMNS:
        parts.append(f'<th data-key="{key}" title="{e(str(desc.get(key, "")))}">{e(header)}</th>')
    parts.append("</tr></thead><tbody>")
    for row in ordered:
        i = int(row["index"])
        anchor = _slug(row["case_id"], i)
        parts.append(f'<tr data-case="{e(str(row["case_id"]))}"><td class="l"><a href="#{anchor}">'
                     f'{e(str(row["case_id"]))}</a></td><td>{row.get("num_raters", "")}</td>'
                     + "".join(_cell(row.get(key)) for key, _, _ in CASE_COLUMNS) + "</tr>")
    parts.append("</tbody></table></div>")
    parts.append('<h2>Per case</h2><p class="note">Each row: the image, the raters, up to '
                 f'{MAX_SAMPLES_SHOWN} samples, the mean foreground probability, and the uncertainty maps in nats: '
                 'total = H(mean_s p_s), aleatoric = mean over model draws of the entropy of their predictive '
                 'distribution, epistemic = their difference (mutual information). '
                 + _maps_note(result.get("uncertainty_maps"))
                 + '3D cases show the slice with the most rater foreground.</p>')
    for row in ordered:
        i = int(row["index"])
        if i in pngs:
            anchor = _slug(row["case_id"], i)
            parts.append(f'<div class="case" id="{anchor}"><img src="{e(pngs[i])}" alt="{e(str(row["case_id"]))}">'
                         f"</div>")
    parts.append(f"<script>{_SORT_JS}</script></body></html>")
    return "\n".join(parts) + "\n"


__all__ = ["CASE_COLUMNS", "REPORT_FILE", "case_figure", "case_logits", "render", "worst_first", "write_report"]
