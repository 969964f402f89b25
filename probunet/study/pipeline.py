"""``probunet study``: the uncertainty study of several models in one run (ValUES, Kahl et al. 2024).

For every model (a trained run, or a config that is trained here at one budget)
the study draws S samples per case of the run's test split, and of a shifted
set (``shift``: :mod:`probunet.study.shift` applied to those same cases, or ``ood``: a
folder of other scans), with the same seed, cases and number of samples for
every model. Per case it computes

- the uncertainty maps the model can give (:mod:`probunet.inference.uncertainty`) and
  their image-level scores ``<map>.<aggregation>``;
- two risks: ``one_minus_dice`` (1 - Dice of the samples' majority against the
  raters' majority) and ``ged`` (D^2_GED of the samples against the raters);
- the calibration statistics of the sampled foreground frequency against the
  raters' foreground frequency (ECE bins, ACE / Brier histogram).

and answers, per model and score (:mod:`probunet.metrics.detection`):

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
the configs trained here, ``cache/<model>.json`` per finished model and ``cache/<model>.<set>.json``
per scored set, so a killed study resumes where it stopped, and a study of another shift (or ``--ood``)
into the same folder scores only the shifted set again: the test split's scores do not depend on it.

The study scores the test split each run recorded when it started (``RUN/splits.json`` or the
checkpoint's record, as ``probunet evaluate`` does): cases added to the data folder since are left out
(with a warning), missing ones are an error. ``out`` is the study's own: ``.probunet-study.json``
lists every file the study wrote there (with its SHA-256) and the settings each config in ``runs/``
was trained with; a file the study did not write (or that changed since) is never replaced, a run
trained with other settings (``--steps``, an edited config) is never reused (``retrain`` trains it
again), and a cached result is reused only for the same settings, checkpoint and data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .. import __version__
from ..metrics import detection
from ..options import StudyOptions
from ..metrics import segmentation as metrics
from ..runtime.output_folder import read_json_marker
from .shift import check_shift, severity_of, shift_item
from ..inference.uncertainty import AGGREGATIONS, MAPS, check_maps, image_scores, model_maps, uncertainty_maps
from ..utils import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

RISKS = {
    "one_minus_dice": "1 - Dice of the samples' majority vote against the raters' majority vote",
    "ged": "D^2_GED of the samples against the raters",
}
DEFAULT_FAILURE = {"one_minus_dice": 0.2, "ged": 0.3}
CACHE_VERSION = 2
TEST, SHIFTED = "test", "shifted"
# settings that change only the shifted set: the test split's scores do not depend on them
SHIFT_SETTINGS = ("shift", "severity", "ood")


@dataclass
class StudySettings:
    """Everything that changes the study's numbers (recorded in ``settings``; a cache is reused only when
    they are equal). The defaults are ``probunet study``'s (:class:`probunet.options.StudyOptions`)."""

    num_samples: int = StudyOptions.num_samples
    seed: int = StudyOptions.seed
    steps: Optional[int] = StudyOptions.steps  # configs are trained for this many steps (None: train.steps)
    shift: Optional[str] = StudyOptions.shift
    severity: float = 1.0
    ood: Optional[str] = StudyOptions.ood
    maps: Optional[tuple] = StudyOptions.maps  # None: every map each model gives
    aggregations: tuple = AGGREGATIONS
    threshold: float = StudyOptions.threshold  # above_threshold: nats
    patch_size: int = StudyOptions.patch_size  # patch_max: voxels per axis
    failure: dict = field(default_factory=lambda: dict(DEFAULT_FAILURE))
    num_bins: int = 10
    device: str = StudyOptions.device

    @classmethod
    def from_options(cls, options: StudyOptions) -> "StudySettings":
        """The settings of ``probunet study`` (``--severity`` only with ``--shift``; ``--fail`` over the
        default thresholds)."""
        return cls(num_samples=options.num_samples, seed=options.seed, steps=options.steps, shift=options.shift,
                   severity=severity_of(options.shift, options.severity), ood=options.ood,
                   maps=tuple(options.maps) if options.maps else None, threshold=options.threshold,
                   patch_size=options.patch_size, failure=parse_failure(options.fail), device=options.device)

    def check(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if not math.isfinite(float(self.threshold)):
            raise ValueError(f"--threshold must be a finite number of nats, got {self.threshold}")
        if not math.isfinite(float(self.severity)):
            raise ValueError(f"--severity must be a finite number, got {self.severity}")
        if self.shift is not None and self.ood is not None:
            raise ValueError("--shift and --ood: give one shifted set, not both")
        if self.shift is not None:
            check_shift(self.shift, float(self.severity))
        if self.ood is not None and not Path(self.ood).is_dir():
            raise FileNotFoundError(f"--ood {self.ood}: not a folder")
        for risk, value in self.failure.items():
            if risk not in RISKS:
                raise ValueError(f"--fail {risk}: unknown risk; known: {', '.join(RISKS)}")
            if not math.isfinite(float(value)):
                raise ValueError(f"--fail {risk}={value}: the threshold must be a finite number")
        for m in self.maps or ():
            if m not in MAPS:
                raise ValueError(f"--maps {m}: unknown map; known: {', '.join(MAPS)}")
        for a in self.aggregations:
            if a not in AGGREGATIONS:
                raise ValueError(f"StudySettings.aggregations: {a!r} is not an aggregation; known: "
                                 f"{', '.join(AGGREGATIONS)}")
        if self.patch_size < 1:
            raise ValueError(f"--patch-size must be >= 1, got {self.patch_size}")

    def cache_key(self) -> dict:
        d = asdict(self)
        d.pop("device")
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


# ----------------------------------------------------------------------------- the output folder

STUDY_MARKER = ".probunet-study.json"
STUDY_KIND = "probunet-study-output"


def _sha256(path: Path) -> Optional[str]:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _json_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class StudyFolder:
    """``out`` of a study and its manifest :data:`STUDY_MARKER`: every file the study wrote there
    (relative path -> SHA-256), the runs it trains in ``runs/`` and the config each was trained with.

    A file at one of the study's paths is replaced only when the manifest holds its current digest
    (the study wrote it and nobody changed it since); anything else is refused with one line naming
    it, before any work. A write records the new digest beside the old one first, so a study killed
    between the two manifest updates still owns whichever file is there."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self._manifest: Optional[dict] = None

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = self._read()
        return self._manifest

    def _read(self) -> dict:
        exists, data = read_json_marker(self.out / STUDY_MARKER)
        if not exists:
            return {"kind": STUDY_KIND, "probunet_version": __version__, "files": {}, "runs": {}}
        if not isinstance(data, dict) or data.get("kind") != STUDY_KIND or not isinstance(data.get("files"), dict) \
                or not isinstance(data.get("runs"), dict):
            raise FileExistsError(f"--out {self.out}: {STUDY_MARKER} is not a probunet study manifest; choose "
                                  f"another --out")
        return data

    def _save(self) -> None:
        atomic_write_text(self.out / STUDY_MARKER, json.dumps(self.manifest, indent=1, sort_keys=True) + "\n")

    def owns(self, rel: str) -> bool:
        """Whether the file ``out/rel`` is one the study wrote, unchanged since (or absent)."""
        p = self.out / rel
        if not (p.exists() or p.is_symlink()):
            return True
        if p.is_symlink() or not p.is_file():
            return False
        return _sha256(p) in self.manifest["files"].get(rel, [])

    def check(self, files: Sequence[str], runs: Sequence[str] = ()) -> None:
        """FileExistsError (one line) for the first of ``files`` (paths relative to ``out``) that exists
        and is not the study's, or the first of ``runs`` (model names) whose ``runs/<name>`` exists and
        was not trained by a study into this folder."""
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out {self.out} is a file, not a folder")
        for rel in files:
            if not self.owns(rel):
                raise FileExistsError(f"--out {self.out}: {rel} exists and was not written by probunet study (or "
                                      f"was changed since); refusing to overwrite it: move it away or choose "
                                      f"another --out")
        for name in runs:
            p = self.out / "runs" / name
            if (p.exists() or p.is_symlink()) and name not in self.manifest["runs"]:
                raise FileExistsError(f"--out {self.out}: runs/{name} exists and was not trained by probunet study "
                                      f"into this folder; refusing to train into it: move it away or choose "
                                      f"another --out")

    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write ``out/rel`` atomically, if the study owns it (:meth:`owns`), recording its digest."""
        self.check([rel])
        path = self.out / rel
        files = self.manifest["files"]
        now = _sha256(path) if path.is_file() else None
        new = hashlib.sha256(data).hexdigest()
        files[rel] = [d for d in (now, new) if d is not None]
        self._save()
        atomic_write_bytes(path, data)
        files[rel] = [new]
        self._save()
        return path

    def write_text(self, rel: str, text: str) -> Path:
        return self.write_bytes(rel, text.encode("utf-8"))

    def training(self, name: str) -> Optional[dict]:
        return self.manifest["runs"].get(name)

    def set_training(self, name: str, record: dict) -> None:
        self.manifest["runs"][name] = record
        self._save()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_change(old: dict, new: dict) -> str:
    a, b = _flat(old), _flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def train_if_needed(model: StudyModel, settings: StudySettings, train=None, *, progress: bool,
                    folder: Optional[StudyFolder] = None, retrain: bool = False) -> Path:
    """Train a config model into its run directory ``OUT/runs/<name>`` with ``train(cfg, run_dir, resume=,
    progress=)`` (:func:`probunet.train.fit`; the CLI passes it, the library never imports the trainer),
    resuming a killed training; returns what to load.

    The config it is trained with (the file with ``train.steps`` from ``settings.steps``) is recorded in
    the study folder's manifest; a run trained (or started) with another config is never reused or
    resumed: a ValueError names what changed, or with ``retrain`` the run is removed and trained again."""
    if not model.trained_here:
        return model.run_dir
    from ..config import load_config

    run = model.run_dir
    folder = folder or StudyFolder(run.parent.parent)
    folder.check([], [model.name])
    overrides = [] if settings.steps is None else [f"train.steps={settings.steps}"]
    cfg = load_config(model.source, overrides)
    if cfg.train.checkpoint_every > max(1, cfg.train.steps // 4):  # a killed study loses at most a quarter
        cfg = load_config(model.source, [*overrides, f"train.checkpoint_every={max(1, cfg.train.steps // 4)}"])
    asked = json.loads(json.dumps(cfg.to_dict(), default=str))  # as the manifest holds it
    record = {"source": str(model.source), "config": asked, "digest": _json_digest(asked)}
    last = run / "checkpoints" / "last.pt"
    before = folder.training(model.name)
    if last.is_file() and (before is None or before.get("digest") != record["digest"]):
        change = (f"its config changed: {_config_change(before.get('config') or {}, asked)}" if before
                  else "the settings it was trained with are not recorded")
        if not retrain:
            raise ValueError(f"{model.name}: {run} was trained for another study ({change}); pass --retrain to "
                             f"train it again, or choose a fresh --out")
        logger.info("%s: %s; training it again (--retrain)", model.name, change)
        shutil.rmtree(run)
    if (run / "train_summary.json").is_file() and last.is_file():
        logger.info("%s: already trained in %s", model.name, run)
        return run
    if train is None:
        raise ValueError(f"{model.source}: a config must be trained first; pass train=probunet.train.fit "
                         f"or give its run directory")
    resume = last.is_file()
    if before != record:
        folder.set_training(model.name, record)
    logger.info("%s: training %s for %d steps into %s%s", model.name, model.source, cfg.train.steps, run,
                " (resumed)" if resume else "")
    train(cfg, run, resume=resume, progress=progress)
    return run


# ----------------------------------------------------------------------------- data


def _case_index(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"probunet-shift:{case_id}".encode()).digest()[:4], "little")


def study_sets(cfg, settings: StudySettings, *, run_dir: Optional[Path] = None,
               checkpoint: Optional[dict] = None) -> dict[str, list[dict]]:
    """``{"test": the run's evaluation split, "shifted": its shifted copy or the --ood folder}``.

    With the run's ``checkpoint`` (and ``run_dir``), the split is the one the run recorded when it started
    (:func:`probunet.data.recorded_split.run_split_for`), as ``probunet evaluate`` uses it: cases added
    to the data since are left out (a warning), cases gone missing are an error."""
    from ..data import load_splits, prepare_items, read_cases

    split = cfg.eval.split
    kwargs: dict = {}
    if checkpoint is not None:
        from ..config import from_dict
        from ..data.recorded_split import run_split_for

        trained = from_dict(checkpoint["config"]).to_dict()["data"]
        record, where, by_ids = run_split_for(run_dir, checkpoint, cfg.to_dict()["data"], trained)
        kwargs = {"recorded": record, "recorded_from": where, "by_case_ids": by_ids, "hint": False}
    test = load_splits(cfg, **kwargs)[split]
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
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _sets_digest(sets: dict[str, list[dict]]) -> dict:
    """Per set: its case ids and a digest of their images and rater masks (a cached result is stale
    when the scored data changed)."""
    out = {}
    for name, items in sets.items():
        h = hashlib.blake2b(digest_size=16)
        for it in items:
            h.update(str(it["case_id"]).encode() + b"\0")
            for key in ("image", "labels"):
                a = np.ascontiguousarray(np.asarray(it[key]))
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(memoryview(a).cast("B"))
        out[name] = {"cases": len(items), "digest": h.hexdigest()}
    return out


def _run_dir_of(target: Path, ckpt_path: Path) -> Optional[Path]:
    if target.is_dir():
        return target
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None


def score_set(model, spec, items: list[dict], cfg, settings: StudySettings, maps: tuple, device, *,
              desc: str, progress: bool) -> dict:
    """Per case scores, risks and calibration statistics of one set of ``items`` (see the module notes)."""
    from ..data import real_raters
    from ..inference.sampler import Sampler

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


def study_model(sm: StudyModel, settings: StudySettings, out: Path, train=None, *, progress: bool,
                folder: Optional[StudyFolder] = None, retrain: bool = False) -> dict:
    """Train (if a config), sample and score one model, or read its cached result (the same settings,
    checkpoint, config and scored data)."""
    from ..models.checkpoint import load_model, resolve_checkpoint_path

    folder = folder or StudyFolder(out)
    target = train_if_needed(sm, settings, train, progress=progress, folder=folder, retrain=retrain)
    ckpt_path = resolve_checkpoint_path(target)
    model, cfg, ckpt = load_model(ckpt_path)
    sets = study_sets(cfg, settings, run_dir=_run_dir_of(Path(target), Path(ckpt["path"])), checkpoint=ckpt)
    key = {"version": CACHE_VERSION, "settings": settings.cache_key(), "checkpoint": _fingerprint(ckpt_path),
           "config": _json_digest(ckpt["config"]), "data": _sets_digest(sets)}
    del ckpt
    rel = f"cache/{sm.name}.json"
    cache = out / rel
    if cache.is_file() and folder.owns(rel):
        cached = _read_cache(cache, key)
        if cached is not None:
            logger.info("%s: results read from %s", sm.name, cache)
            return cached
        logger.info("%s: %s is stale (other settings, checkpoint or data); scoring again", sm.name, cache)
    spec = model_maps(model)
    maps = check_maps(spec, settings.maps) if settings.maps else spec.maps
    if spec.kind == "members" and settings.num_samples % spec.groups:
        raise ValueError(f"--num-samples {settings.num_samples}: {sm.name} is an ensemble of {spec.groups} members; "
                         f"use a multiple of {spec.groups} (the same for every model)")
    from ..utils import resolve_device

    device = resolve_device(settings.device)
    result = {"key": key, "model": sm.name, "source": sm.source, "checkpoint": str(ckpt_path),
              "model_name": cfg.model.name, "member": getattr(cfg.model, "member", None), "kind": spec.kind,
              "maps": list(maps), "why": spec.why, "sets": {}}
    for name, items in sets.items():
        set_rel, skey = set_cache_path(sm.name, name), set_cache_key(key, name)
        scored = (_read_cache(out / set_rel, skey) or {}).get("scored") if folder.owns(set_rel) else None
        if scored is not None:
            logger.info("%s: its %s set read from %s", sm.name, name, out / set_rel)
        else:
            scored = score_set(model, spec, items, cfg, settings, maps, device, desc=f"{sm.name} {name}",
                               progress=progress)
            folder.write_text(set_rel, json.dumps(_finite({"key": skey, "scored": scored})) + "\n")
        result["sets"][name] = scored
    folder.write_text(rel, json.dumps(_finite(result)) + "\n")
    return result


def set_cache_path(model: str, set_name: str) -> str:
    """``cache/<model>.<set>.json``: one set's scores (relative to the study folder)."""
    return f"cache/{model}.{set_name}.json"


def set_cache_key(key: dict, set_name: str) -> dict:
    """The cache key of one set's scores: the model's ``key`` with that set's data only and, for the test
    split, without the shift settings, so a study of another shift (or ``--ood``) into the same folder
    reuses the test split's scores."""
    settings = dict(key["settings"])
    if set_name == TEST:
        for k in SHIFT_SETTINGS:
            settings.pop(k, None)
    return {**key, "set": set_name, "settings": settings, "data": key["data"][set_name]}


def _read_cache(path: Path, key: dict) -> Optional[dict]:
    """The JSON object cached at ``path`` when its ``"key"`` is ``key``; None when absent, unreadable or
    written under another key (stale)."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except ValueError:
        return None
    return cached if isinstance(cached, dict) and cached.get("key") == key else None


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


def _save(fig, path: Path, folder: Optional[StudyFolder] = None) -> Path:
    """The figure as a PNG at ``path``; through ``folder`` (the study's output folder), which records it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=110, format="png")
    finally:
        _plt().close(fig)
    if folder is not None:
        return folder.write_bytes(path.relative_to(folder.out).as_posix(), buf.getvalue())
    return atomic_write_bytes(path, buf.getvalue())


_MAP_COLOURS = {"total": "C0", "aleatoric": "C1", "epistemic": "C2"}
_AGG_STYLES = {"mean": "-", "sum": "-", "above_threshold": ":", "patch_max": "-."}


def risk_coverage_figure(path: Path, results_by_model: dict, questions: dict, risk: str = "one_minus_dice",
                         folder: Optional[StudyFolder] = None) -> Path:
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
    return _save(fig, path, folder)


def reliability_figure(path: Path, results_by_model: dict, folder: Optional[StudyFolder] = None) -> Path:
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
    return _save(fig, path, folder)


def ood_figure(path: Path, questions: dict, folder: Optional[StudyFolder] = None) -> Optional[Path]:
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
    return _save(fig, path, folder)


OUTPUT_FILES = ("study.json", "study.md", "study.csv", "risk_coverage.png", "reliability.png", "ood.png")


def run_study(sources: Sequence[str], out: str | Path, settings: Optional[StudySettings] = None, *,
              train=None, progress: bool = False, retrain: bool = False) -> dict:
    """The study of ``sources`` (configs or runs) into ``out``; returns what ``study.json`` holds.
    ``train``: the function that trains a config (:func:`probunet.train.fit`), needed for configs;
    ``retrain``: train again a config whose run in ``out/runs`` was trained with other settings
    (otherwise that is a ValueError). Files in ``out`` the study did not write are never replaced
    (:class:`StudyFolder`)."""
    from ..guards import ensure_writable_dir
    from ..utils import FolderLock

    settings = settings or StudySettings()
    settings.check()
    out = Path(out)
    for src in sources:
        if Path(src).exists() and out.resolve() == Path(src).resolve():
            raise ValueError(f"--out {out}: is an input; choose another folder")
    models = resolve_sources(sources, out)
    folder = StudyFolder(out)
    # every path the study may write, checked before any work
    folder.check([*OUTPUT_FILES, *(f"cache/{sm.name}.json" for sm in models),
                  *(set_cache_path(sm.name, name) for sm in models for name in (TEST, SHIFTED))],
                 [sm.name for sm in models if sm.trained_here])
    ensure_writable_dir(out, "--out")  # a read-only or missing folder: one line, before the work
    lock = FolderLock(out, what="study folder").acquire()
    try:
        return _run_study(models, out, settings, folder, train=train, progress=progress, retrain=retrain)
    finally:
        lock.release()


def study_command(options: StudyOptions, *, train=None, progress: bool = False) -> dict:
    """``probunet study``: :func:`run_study` of ``options.sources`` into ``options.out`` with the settings of
    ``options`` (:meth:`StudySettings.from_options`); ``train`` as there."""
    return run_study(options.sources, options.out, StudySettings.from_options(options), train=train,
                     progress=progress, retrain=options.retrain)


def study_lines(study: dict, seconds: float) -> list[str]:
    """What ``probunet study`` prints of :func:`run_study`'s result (``seconds``: how long it took)."""
    lines = [f"study of {len(study['settings']['models'])} models in {seconds:.0f}s"]
    for question, best in study["best"].items():
        o = best["overall"]
        if o:
            lines.append(f"  {question:32s} best score {o['score']} ({o['mean']:.4f}, mean over {o['n_models']} "
                         f"models)")
    lines.extend(f"  {name + ':':15s}{path}" for name, path in study["files"].items())
    return lines


def _run_study(models: list[StudyModel], out: Path, settings: StudySettings, folder: StudyFolder, *, train,
               progress: bool, retrain: bool) -> dict:
    results: dict = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(models), desc="study", unit="model", dynamic_ncols=True)
    try:
        for sm in models:
            if bar is not None:
                bar.set_postfix_str(sm.name)
            results[sm.name] = study_model(sm, settings, out, train, progress=progress, folder=folder,
                                           retrain=retrain)
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
    risk_coverage_figure(files["risk_coverage"], results, questions, folder=folder)
    reliability_figure(files["reliability"], results, folder=folder)
    if ood_figure(out / "ood.png", questions, folder=folder) is not None:
        files["ood"] = out / "ood.png"
    study["files"] = {k: str(v) for k, v in files.items()}
    folder.write_text("study.csv", csv_text(results))
    folder.write_text("study.md", markdown(study) + "\n")
    folder.write_text("study.json", json.dumps(study, indent=1) + "\n")
    return study


def _nested(scores: dict) -> dict:
    """``{"<map>.<aggregation>": v}`` -> ``{map: {aggregation: v}}``."""
    out: dict = {}
    for k, v in scores.items():
        m, a = k.split(".", 1)
        out.setdefault(m, {})[a] = v
    return out


__all__ = ["RISKS", "StudySettings", "answer", "best_scores", "run_study", "study_command", "study_lines"]
