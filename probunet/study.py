"""``probunet study``: the uncertainty study of several models in one run (ValUES, Kahl et al. 2024).

For every model (a trained run, or a config that is trained here at one budget)
the study draws S samples per case of the run's test split, and of a shifted
set (``shift``: :mod:`probunet.shift` applied to those same cases, or ``ood``: a
folder of other scans), with the same seed, cases and number of samples for
every model. Per case it computes

- the uncertainty maps the model can give (:mod:`probunet.uncertainty`) and
  their image-level scores ``<map>.<aggregation>``;
- two risks: ``one_minus_dice`` (1 - Dice of the samples' majority against the
  raters' majority) and ``ged`` (D^2_GED of the samples against the raters);
- the calibration statistics of the sampled foreground frequency against the
  raters' foreground frequency (ECE bins, ACE / Brier histogram).

and answers, per model and score (:mod:`probunet.detection`):

- ``failure.<risk>.aurc`` / ``.e_aurc`` / ``.auroc``: failure detection on the
  test split (AUROC: failed = risk > the risk's threshold);
- ``ood.auroc``: shifted vs. test images by the score;
- ``performance``: Dice, GED (and their change on the shifted set), failed share;
- ``calibration``: ECE, ACE, Brier (test and shifted);
- ``mean_score`` / ``mean_score_shifted``: the scores' means.

Files in ``out``: ``study.json`` ({"cases": {"<model>/<set>/<case>": {map: {aggregation: score}}},
"risks": {"<model>/<set>/<case>": {risk: value}}, "results": {question: {model: {score: value}}},
"settings": ...}), ``study.md`` (one table per question, a row per model), ``study.csv`` (a row per
model, set and case), ``risk_coverage.png``, ``reliability.png``, ``ood.png``; ``runs/<model>/`` for
the configs trained here and ``cache/<model>.json`` per finished model, so a killed study resumes
where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import detection, metrics
from .shift import check_shift, shift_item
from .uncertainty import AGGREGATIONS, MAPS, check_maps, image_scores, model_maps, uncertainty_maps
from .utils import atomic_write_text

logger = logging.getLogger(__name__)

RISKS = {
    "one_minus_dice": "1 - Dice of the samples' majority vote against the raters' majority vote",
    "ged": "D^2_GED of the samples against the raters",
}
DEFAULT_FAILURE = {"one_minus_dice": 0.2, "ged": 0.3}
CACHE_VERSION = 1
TEST, SHIFTED = "test", "shifted"


@dataclass
class StudySettings:
    """Everything that changes the study's numbers (recorded in ``settings``; a cache is reused only when
    they are equal)."""

    num_samples: int = 16
    seed: int = 0
    steps: Optional[int] = None  # configs are trained for this many steps (None: the config's train.steps)
    shift: Optional[str] = None
    severity: float = 1.0
    ood: Optional[str] = None
    maps: Optional[tuple] = None  # None: every map each model gives
    aggregations: tuple = AGGREGATIONS
    threshold: float = 0.1  # above_threshold: nats
    patch_size: int = 8  # patch_max: voxels per axis
    failure: dict = field(default_factory=lambda: dict(DEFAULT_FAILURE))
    num_bins: int = 10
    device: str = "auto"

    def check(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.shift is not None and self.ood is not None:
            raise ValueError("--shift and --ood: give one shifted set, not both")
        if self.shift is not None:
            check_shift(self.shift, float(self.severity))
        if self.ood is not None and not Path(self.ood).is_dir():
            raise FileNotFoundError(f"--ood {self.ood}: not a folder")
        for risk in self.failure:
            if risk not in RISKS:
                raise ValueError(f"--fail {risk}: unknown risk; known: {', '.join(RISKS)}")
        for m in self.maps or ():
            if m not in MAPS:
                raise ValueError(f"--maps {m}: unknown map; known: {', '.join(MAPS)}")
        for a in self.aggregations:
            if a not in AGGREGATIONS:
                raise ValueError(f"--aggregations {a}: unknown; known: {', '.join(AGGREGATIONS)}")
        if self.patch_size < 1:
            raise ValueError(f"--patch-size must be >= 1, got {self.patch_size}")

    def cache_key(self) -> dict:
        d = asdict(self)
        d.pop("device")
        d.pop("steps")
        d["maps"] = None if self.maps is None else list(self.maps)
        d["aggregations"] = list(self.aggregations)
        d["failure"] = None  # thresholds only change the results, not the cached per-case values
        return d


def parse_failure(texts: Optional[Sequence[str]]) -> dict:
    """``["RISK=T", ...]`` (``--fail``) over the defaults -> ``{risk: threshold}``; ValueError in one line."""
    out = dict(DEFAULT_FAILURE)
    for text in texts or []:
        risk, sep, value = str(text).partition("=")
        try:
            if not sep:
                raise ValueError
            out[risk.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--fail {text}: expected RISK=THRESHOLD, e.g. one_minus_dice=0.2") from None
    return out


# ----------------------------------------------------------------------------- models


@dataclass
class StudyModel:
    name: str
    source: str
    run_dir: Path
    trained_here: bool


def _unique(name: str, taken: set) -> str:
    out, k = name, 2
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    taken.add(out)
    return out


def resolve_sources(sources: Sequence[str], out: Path) -> list[StudyModel]:
    """Each CONFIG_OR_RUN as a named model: a ``.yaml`` config is trained into ``out/runs/<stem>``; a run
    directory or checkpoint file is used as it is."""
    if not sources:
        raise ValueError("give at least one config or run directory")
    taken: set = set()
    models = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise FileNotFoundError(f"{src}: no such config, run directory or checkpoint")
        if p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
            name = _unique(p.stem, taken)
            models.append(StudyModel(name, str(p), out / "runs" / name, True))
        else:
            run = p if p.is_dir() else (p.parent.parent if p.parent.name == "checkpoints" else p.parent)
            models.append(StudyModel(_unique(run.name, taken), str(p), run if p.is_dir() else p, False))
    return models


def train_if_needed(model: StudyModel, settings: StudySettings, train=None, *, progress: bool) -> Path:
    """Train a config model into its run directory with ``train(cfg, run_dir, resume=, progress=)``
    (:func:`probunet.train.fit`; the CLI passes it, the library never imports the trainer), resuming a
    killed training; returns what to load."""
    if not model.trained_here:
        return model.run_dir
    run = model.run_dir
    if (run / "train_summary.json").is_file() and (run / "checkpoints" / "last.pt").is_file():
        logger.info("%s: already trained in %s", model.name, run)
        return run
    from .config import load_config

    if train is None:
        raise ValueError(f"{model.source}: a config must be trained first; pass train=probunet.train.fit "
                         f"or give its run directory")
    overrides = [] if settings.steps is None else [f"train.steps={settings.steps}"]
    cfg = load_config(model.source, overrides)
    if cfg.train.checkpoint_every > max(1, cfg.train.steps // 4):  # a killed study loses at most a quarter
        cfg = load_config(model.source, [*overrides, f"train.checkpoint_every={max(1, cfg.train.steps // 4)}"])
    resume = (run / "checkpoints" / "last.pt").is_file()
    logger.info("%s: training %s for %d steps into %s%s", model.name, model.source, cfg.train.steps, run,
                " (resumed)" if resume else "")
    train(cfg, run, resume=resume, progress=progress)
    return run


# ----------------------------------------------------------------------------- data


def _case_index(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"probunet-shift:{case_id}".encode()).digest()[:4], "little")


def study_sets(cfg, settings: StudySettings) -> dict[str, list[dict]]:
    """``{"test": the run's evaluation split, "shifted": its shifted copy or the --ood folder}``."""
    from .data import load_splits, prepare_items, read_cases

    split = cfg.eval.split
    test = load_splits(cfg)[split]
    if not test:
        raise ValueError(f"the {split} split of {cfg.data.path or 'the synthetic set'} is empty")
    sets = {TEST: test}
    if settings.shift is not None:
        sets[SHIFTED] = [shift_item(it, settings.shift, settings.severity, seed=settings.seed,
                                    index=_case_index(it["case_id"])) for it in test]
    elif settings.ood is not None:
        import copy

        ood_cfg = copy.deepcopy(cfg)
        ood_cfg.data.path = str(settings.ood)
        if ood_cfg.data.format == "synthetic" and not (Path(settings.ood) / "truth.json").is_file():
            ood_cfg.data.format = "qubiq"
        sets[SHIFTED] = prepare_items(read_cases(ood_cfg.data), ood_cfg)
    return sets


# ----------------------------------------------------------------------------- one model


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def score_set(model, spec, items: list[dict], cfg, settings: StudySettings, maps: tuple, device, *,
              desc: str, progress: bool) -> dict:
    """Per case scores, risks and calibration statistics of one set of ``items`` (see the module notes)."""
    from .data import real_raters
    from .inference import Sampler

    num_classes = int(cfg.model.num_classes)
    empty_iou = float(cfg.eval.empty_iou)
    sampler = Sampler(model, seed=settings.seed, device=device, batch_size=max(1, int(cfg.eval.batch_size)),
                      sample_chunk=cfg.eval.sample_chunk)
    refs = [real_raters(it) for it in items]
    ids = [it["case_id"] for it in items]
    cases, calibrations, hists = {}, [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=desc, unit="case", dynamic_ncols=True, leave=False)
    try:
        for idx, res in sampler.sample_batches([it["image"] for it in items], ids, settings.num_samples,
                                               references=refs, empty_iou=empty_iou, keep_logits=True):
            image = torch.stack([torch.as_tensor(items[i]["image"]) for i in idx]).float()
            umaps = uncertainty_maps(model, image, res.logits, maps)
            scores = image_scores(umaps, settings.aggregations, threshold=settings.threshold,
                                  patch_size=settings.patch_size)
            ref = torch.stack([torch.as_tensor(refs[i]) for i in idx]).to(res.labels.device).long()
            sam = res.labels.long()
            ged = res.ged()
            dice = metrics.consensus_scores(sam, ref, num_classes=num_classes)["dice"]
            cal = metrics.calibration(sam, ref, num_bins=settings.num_bins, num_classes=num_classes)
            calibrations.append(cal)
            pred = (sam != 0).double().mean(dim=1)  # (B, *sp) sampled foreground frequency
            obs = (ref != 0).double().mean(dim=1)  # (B, *sp) rater foreground frequency
            for j, i in enumerate(idx):
                hists.append(detection.calibration_histogram(pred[j].cpu().numpy(), obs[j].cpu().numpy()))
                cases[ids[i]] = {
                    "scores": {k: float(v[j]) for k, v in scores.items()},
                    "risks": {"one_minus_dice": 1.0 - float(dice[j]), "ged": float(ged[j])},
                    "ece": float(cal.ece[j]),
                }
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    pooled = metrics.aggregate_calibration(calibrations)
    hist = detection.merge_histograms(hists)
    return {
        "cases": {c: cases[c] for c in ids},
        "calibration": {
            "ece": float(pooled.ece), "ace": detection.ace_from_histogram(hist, settings.num_bins),
            "brier": detection.brier_from_histogram(hist),
            "bin_edges": pooled.bin_edges.tolist(), "counts": pooled.counts.tolist(),
            "mean_predicted": pooled.mean_predicted.tolist(), "mean_observed": pooled.mean_observed.tolist(),
        },
    }


def study_model(sm: StudyModel, settings: StudySettings, out: Path, train=None, *, progress: bool) -> dict:
    """Train (if a config), sample and score one model, or read its cached result."""
    from .checkpoint import load_model, resolve_checkpoint_path

    target = train_if_needed(sm, settings, train, progress=progress)
    ckpt_path = resolve_checkpoint_path(target)
    key = {"version": CACHE_VERSION, "settings": settings.cache_key(), "checkpoint": _fingerprint(ckpt_path)}
    cache = out / "cache" / f"{sm.name}.json"
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                logger.info("%s: results read from %s", sm.name, cache)
                return cached
        except ValueError:
            pass
        logger.info("%s: %s is stale (other settings or checkpoint); scoring again", sm.name, cache)
    model, cfg, _ = load_model(ckpt_path)
    spec = model_maps(model)
    maps = check_maps(spec, settings.maps) if settings.maps else spec.maps
    if spec.kind == "members" and settings.num_samples % spec.groups:
        raise ValueError(f"--num-samples {settings.num_samples}: {sm.name} is an ensemble of {spec.groups} members; "
                         f"use a multiple of {spec.groups} (the same for every model)")
    from .utils import resolve_device

    device = resolve_device(settings.device)
    sets = study_sets(cfg, settings)
    result = {"key": key, "model": sm.name, "source": sm.source, "checkpoint": str(ckpt_path),
              "model_name": cfg.model.name, "member": getattr(cfg.model, "member", None), "kind": spec.kind,
              "maps": list(maps), "why": spec.why, "sets": {}}
    for name, items in sets.items():
        result["sets"][name] = score_set(model, spec, items, cfg, settings, maps, device,
                                         desc=f"{sm.name} {name}", progress=progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(_finite(result)) + "\n")
    return result


# ----------------------------------------------------------------------------- results


def _finite(x):
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def _nan(v):
    return float("nan") if v is None else float(v)


def score_names(result: dict) -> list[str]:
    cases = result["sets"][TEST]["cases"]
    return list(next(iter(cases.values()))["scores"]) if cases else []


def answer(results_by_model: dict[str, dict], settings: StudySettings) -> dict:
    """``{question: {model: {score: value}}}`` from the per-model results (see the module notes)."""
    q: dict = {}

    def put(question, model, key, value):
        q.setdefault(question, {}).setdefault(model, {})[key] = value

    for name, res in results_by_model.items():
        test = res["sets"][TEST]["cases"]
        scores = score_names(res)
        risks = {r: np.array([_nan(c["risks"][r]) for c in test.values()]) for r in RISKS}
        for r, values in risks.items():
            thr = float(settings.failure.get(r, DEFAULT_FAILURE[r]))
            failed = values > thr
            put("performance", name, f"failed_share.{r}", float(failed.mean()))
            for s in scores:
                u = np.array([_nan(c["scores"][s]) for c in test.values()])
                ok = np.isfinite(u) & np.isfinite(values)
                put(f"failure.{r}.aurc", name, s, detection.aurc(u[ok], values[ok]))
                put(f"failure.{r}.e_aurc", name, s, detection.e_aurc(u[ok], values[ok]))
                put(f"failure.{r}.auroc", name, s, detection.auroc(u[ok], failed[ok]))
        put("performance", name, "dice", float(np.nanmean(1.0 - risks["one_minus_dice"])))
        put("performance", name, "ged", float(np.nanmean(risks["ged"])))
        for s in scores:
            put("mean_score", name, s, float(np.nanmean([_nan(c["scores"][s]) for c in test.values()])))
        cal = res["sets"][TEST]["calibration"]
        for k in ("ece", "ace", "brier"):
            put("calibration", name, k, _nan(cal[k]))
        shifted = res["sets"].get(SHIFTED)
        if shifted is None:
            continue
        sh = shifted["cases"]
        dice_s = float(np.nanmean([1.0 - _nan(c["risks"]["one_minus_dice"]) for c in sh.values()]))
        ged_s = float(np.nanmean([_nan(c["risks"]["ged"]) for c in sh.values()]))
        perf = q["performance"][name]
        put("performance", name, "dice_shifted", dice_s)
        put("performance", name, "ged_shifted", ged_s)
        put("performance", name, "dice_drop", perf["dice"] - dice_s)
        put("performance", name, "ged_rise", ged_s - perf["ged"])
        for k in ("ece", "ace", "brier"):
            put("calibration", name, f"{k}_shifted", _nan(shifted["calibration"][k]))
        for s in scores:
            u_in = [_nan(c["scores"][s]) for c in test.values()]
            u_out = [_nan(c["scores"][s]) for c in sh.values()]
            put("mean_score_shifted", name, s, float(np.nanmean(u_out)))
            u = np.array(u_in + u_out)
            lab = np.r_[np.zeros(len(u_in), bool), np.ones(len(u_out), bool)]
            ok = np.isfinite(u)
            put("ood.auroc", name, s, detection.auroc(u[ok], lab[ok]))
    return q


LOWER_IS_BETTER = ("aurc", "e_aurc")


def best_scores(questions: dict) -> dict:
    """For each detection question: the best score per model, and over the models (mean of the score's
    value over the models that give it; ``n`` of them)."""
    out = {}
    for question, by_model in questions.items():
        if not (question.startswith("failure.") or question.startswith("ood.")):
            continue
        lower = question.rsplit(".", 1)[-1] in LOWER_IS_BETTER
        pick = min if lower else max
        per_model = {}
        pooled: dict = {}
        for model, scores in by_model.items():
            finite = {s: v for s, v in scores.items() if v is not None and math.isfinite(v)}
            if finite:
                best = pick(finite, key=finite.get)
                per_model[model] = {"score": best, "value": finite[best]}
            for s, v in finite.items():
                pooled.setdefault(s, []).append(v)
        overall = None
        if pooled:
            means = {s: float(np.mean(v)) for s, v in pooled.items()}
            # scores every model gives first: a score given by few models is not comparable
            most = max(len(v) for v in pooled.values())
            full = {s: m for s, m in means.items() if len(pooled[s]) == most}
            best = pick(full, key=full.get)
            overall = {"score": best, "mean": full[best], "n_models": most,
                       "ranking": sorted(({"score": s, "mean": m, "n_models": len(pooled[s])}
                                          for s, m in means.items()), key=lambda d: d["mean"], reverse=not lower)}
        out[question] = {"per_model": per_model, "overall": overall}
    return out


# ----------------------------------------------------------------------------- files


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(study: dict) -> str:
    """study.md: one table per question, every model a row."""
    s = study["settings"]
    lines = ["# Uncertainty study", "",
             f"{len(s['models'])} models, {s['num_samples']} samples per case, seed {s['seed']}; test split "
             f"({s['num_cases'].get(TEST, 0)} cases)"
             + (f" and shifted set ({s['shifted_set']}, {s['num_cases'].get(SHIFTED, 0)} cases)"
                if s.get("shifted_set") else "") + ".",
             f"Scores `<map>.<aggregation>`: maps in nats; above_threshold at {s['threshold']} nats, "
             f"patch_max over {s['patch_size']}-voxel windows. Failure: "
             + ", ".join(f"{r} > {t}" for r, t in s["failure"].items()) + ".", ""]
    models = [m["name"] for m in s["models"]]
    lines += ["## Models", "", "| model | source | maps | decomposition |", "|---|---|---|---|"]
    for m in s["models"]:
        lines.append(f"| {m['name']} | {m['source']} | {', '.join(m['maps'])} | {m['kind']} |")
    lines.append("")
    best = study.get("best", {})
    if best:
        lines += ["## Best score per question", "", "| question | over the models (mean) | per model |", "|---|---|---|"]
        for question, b in best.items():
            o = b["overall"]
            overall = f"`{o['score']}` {_fmt(o['mean'])} (n={o['n_models']})" if o else "—"
            per = "; ".join(f"{m}: `{d['score']}` {_fmt(d['value'])}" for m, d in b["per_model"].items())
            lines.append(f"| {question} | {overall} | {per} |")
        lines.append("")
    for question, by_model in study["results"].items():
        cols = []
        for m in models:
            for k in by_model.get(m, {}):
                if k not in cols:
                    cols.append(k)
        lines += [f"## {question}", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for m in models:
            row = by_model.get(m, {})
            lines.append(f"| {m} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def csv_text(results_by_model: dict[str, dict]) -> str:
    """study.csv: a row per model, set and case: the risks, the case's ECE and every score."""
    scores: list = []
    for res in results_by_model.values():
        for s in score_names(res):
            if s not in scores:
                scores.append(s)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "set", "case_id", *RISKS, "ece", *scores])
    for name, res in results_by_model.items():
        for set_name, data in res["sets"].items():
            for cid, c in data["cases"].items():
                w.writerow([name, set_name, cid, *(_fmt_csv(c["risks"][r]) for r in RISKS), _fmt_csv(c["ece"]),
                            *(_fmt_csv(c["scores"].get(s)) for s in scores)])
    return buf.getvalue()


def _fmt_csv(v) -> str:
    return "" if v is None else repr(float(v))


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from .utils import atomic_call

    out = atomic_call(path, lambda p: fig.savefig(p, dpi=110, format="png"), suffix=".png")
    _plt().close(fig)
    return out


_MAP_COLOURS = {"total": "C0", "aleatoric": "C1", "epistemic": "C2"}
_AGG_STYLES = {"mean": "-", "sum": "-", "above_threshold": ":", "patch_max": "-."}


def risk_coverage_figure(path: Path, results_by_model: dict, questions: dict, risk: str = "one_minus_dice") -> Path:
    """A panel per model: selective risk against coverage for each map's ``mean`` score and the model's
    best score by AURC, with the optimal ranking and the random one (the mean risk)."""
    plt = _plt()
    names = list(results_by_model)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharey=True)
    aurcs = questions.get(f"failure.{risk}.aurc", {})
    for ax, name in zip(axes.flat, names):
        test = results_by_model[name]["sets"][TEST]["cases"]
        r = np.array([_nan(c["risks"][risk]) for c in test.values()])
        ok = np.isfinite(r)
        shown = [f"{m}.mean" for m in results_by_model[name]["maps"] if f"{m}.mean" in score_names(results_by_model[name])]
        finite = {s: v for s, v in aurcs.get(name, {}).items() if v is not None and math.isfinite(v)}
        if finite:
            best = min(finite, key=finite.get)
            if best not in shown:
                shown.append(best)
        for s in shown:
            u = np.array([_nan(c["scores"][s]) for c in test.values()])
            good = ok & np.isfinite(u)
            cov, sel = detection.risk_coverage(u[good], r[good])
            m, agg = s.split(".", 1)
            ax.plot(cov, sel, lw=1.2, color=_MAP_COLOURS.get(m), ls=_AGG_STYLES.get(agg, "-"),
                    label=f"{s} ({detection.aurc(u[good], r[good]):.3f})")
        if ok.any():
            rs = np.sort(r[ok])
            k = np.arange(1, rs.size + 1)
            ax.plot(k / rs.size, np.cumsum(rs) / k, "k--", lw=0.8, label=f"optimal ({detection.optimal_aurc(rs):.3f})")
            ax.axhline(rs.mean(), color="0.6", lw=0.8, ls=":", label=f"random ({rs.mean():.3f})")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("coverage")
        ax.legend(fontsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"selective risk ({risk})")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("risk-coverage on the test split (AURC in brackets)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def reliability_figure(path: Path, results_by_model: dict) -> Path:
    """Rater foreground frequency against sampled foreground frequency per bin, a line per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for name, res in results_by_model.items():
        cal = res["sets"][TEST]["calibration"]
        pred = np.array([_nan(v) for v in cal["mean_predicted"]])
        obs = np.array([_nan(v) for v in cal["mean_observed"]])
        ok = np.isfinite(pred) & np.isfinite(obs)
        ax.plot(pred[ok], obs[ok], "o-", ms=3, lw=1, label=f"{name} (ECE {_nan(cal['ece']):.3f}, "
                                                           f"ACE {_nan(cal['ace']):.3f})")
    ax.set_xlabel("sampled foreground frequency")
    ax.set_ylabel("rater foreground frequency")
    ax.set_title("calibration on the test split", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def ood_figure(path: Path, questions: dict) -> Optional[Path]:
    """OOD AUROC per model of each map's best aggregation."""
    by_model = questions.get("ood.auroc")
    if not by_model:
        return None
    plt = _plt()
    names = list(by_model)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1), 3.2))
    width = 0.8 / len(MAPS)
    for k, m in enumerate(MAPS):
        vals = []
        for name in names:
            v = [x for s, x in by_model[name].items() if s.startswith(m + ".") and x is not None and math.isfinite(x)]
            vals.append(max(v) if v else np.nan)
        ax.bar(np.arange(len(names)) + (k - 1) * width, vals, width, label=f"{m} (best aggregation)")
    ax.axhline(0.5, color="0.5", lw=0.8, ls=":")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("OOD AUROC")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def run_study(sources: Sequence[str], out: str | Path, settings: Optional[StudySettings] = None, *,
              train=None, progress: bool = False) -> dict:
    """The study of ``sources`` (configs or runs) into ``out``; returns what ``study.json`` holds.
    ``train``: the function that trains a config (:func:`probunet.train.fit`), needed for configs."""
    settings = settings or StudySettings()
    settings.check()
    out = Path(out)
    for src in sources:
        if Path(src).exists() and out.resolve() == Path(src).resolve():
            raise ValueError(f"--out {out}: is an input; choose another folder")
    models = resolve_sources(sources, out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(models), desc="study", unit="model", dynamic_ncols=True)
    try:
        for sm in models:
            if bar is not None:
                bar.set_postfix_str(sm.name)
            results[sm.name] = study_model(sm, settings, out, train, progress=progress)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    case_sets = {name: sorted(r["sets"][TEST]["cases"]) for name, r in results.items()}
    if len({tuple(v) for v in case_sets.values()}) > 1:
        logger.warning("the models' test splits hold different cases: their numbers are not paired")
    questions = answer(results, settings)
    first = next(iter(results.values()))
    shifted_set = (f"shift {settings.shift} severity {settings.severity}" if settings.shift
                   else f"folder {settings.ood}" if settings.ood else None)
    study = {
        "kind": "probunet-study",
        "cases": {f"{n}/{s}/{c}": _nested(v["scores"]) for n, r in results.items() for s, d in r["sets"].items()
                  for c, v in d["cases"].items()},
        "risks": {f"{n}/{s}/{c}": v["risks"] for n, r in results.items() for s, d in r["sets"].items()
                  for c, v in d["cases"].items()},
        "results": questions,
        "best": best_scores(questions),
        "settings": {
            **{k: v for k, v in asdict(settings).items() if k not in ("maps", "aggregations")},
            "maps": list(settings.maps) if settings.maps else "every map each model gives",
            "aggregations": list(settings.aggregations), "shifted_set": shifted_set,
            "num_cases": {s: len(d["cases"]) for s, d in first["sets"].items()},
            "risks": dict(RISKS),
            "calibration": "sampled foreground frequency against the raters' foreground frequency per voxel; "
                           f"ECE {settings.num_bins} equal-width bins (probunet.metrics.calibration), ACE "
                           f"{settings.num_bins} equal-mass bins, Brier mean squared difference; pooled over the "
                           "set's voxels",
            "models": [{"name": n, "source": r["source"], "checkpoint": r["checkpoint"],
                        "model_name": r["model_name"], "member": r["member"], "kind": r["kind"], "maps": r["maps"],
                        "why": r["why"]} for n, r in results.items()],
        },
    }
    study = _finite(study)
    files = {"json": out / "study.json", "md": out / "study.md", "csv": out / "study.csv",
             "risk_coverage": out / "risk_coverage.png", "reliability": out / "reliability.png"}
    risk_coverage_figure(files["risk_coverage"], results, questions)
    reliability_figure(files["reliability"], results)
    if ood_figure(out / "ood.png", questions) is not None:
        files["ood"] = out / "ood.png"
    study["files"] = {k: str(v) for k, v in files.items()}
    atomic_write_text(files["csv"], csv_text(results))
    atomic_write_text(files["md"], markdown(study) + "\n")
    atomic_write_text(files["json"], json.dumps(study, indent=1) + "\n")
    return study


def _nested(scores: dict) -> dict:
    """``{"<map>.<aggregation>": v}`` -> ``{map: {aggregation: v}}``."""
    out: dict = {}
    for k, v in scores.items():
        m, a = k.split(".", 1)
        out.setdefault(m, {})[a] = v
    return out


__all__ = ["RISKS", "StudySettings", "answer", "best_scores", "run_study"]
