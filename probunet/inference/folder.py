"""The folder batch job: a trained checkpoint over a folder of scans.

:func:`predict_folder` scans ``INPUT_DIR``, runs :class:`probunet.inference.predictor.Predictor`
on every image and writes its outputs and ``summary.csv``; sharding (``--shard K/N``,
:func:`merge_summaries`) and the folder locks live here too. ``probunet predict
CHECKPOINT INPUT_DIR OUTPUT_DIR [--num-samples N]`` is its thin wrapper in :mod:`probunet.cli`.

Per input image (NIfTI, NRRD, MHA/MHD, TIFF, DICOM files and series folders, ...,
PNG/JPEG for 2D models: the formats of :mod:`probunet.data.formats`) a folder ``OUTPUT_DIR/<case>/`` holds, in the input's format and
geometry (same shape, spacing, origin, direction / affine)::

    sample_000 ... sample_{N-1}   label maps drawn from the prior (uint8)
    probability                   mean foreground probability over the samples
                                  (1 - p(background)); multi-class models add
                                  probability_class1 ... probability_class{C-1}
    entropy                       predictive entropy of the mean distribution (nats): the
                                  total uncertainty
    aleatoric, epistemic          models with an epistemic map only (MC dropout, ensembles):
                                  the decomposition total = aleatoric + epistemic (nats,
                                  see probunet.inference.uncertainty); for the other models the
                                  aleatoric map is the entropy itself
    consensus                     majority vote of the samples (the most frequent
                                  label per voxel; ties go to the lower label, so
                                  for binary models: foreground iff > S/2 samples)
    region                        when the run has a calibration.json (``probunet calibrate``)
                                  for this checkpoint and number of samples: 1 where at least
                                  min_votes of the S samples mark foreground (the calibrated
                                  region C_lambda = {f >= 1 - lambda}, see probunet.evaluation.calibration)
    case.json                     settings and statistics (and ``resampling``: the model's
                                  spacing and shape when the scan was resampled to the
                                  training spacing; the maps are still on the scan's grid);
                                  written last, it marks the case as complete

and ``OUTPUT_DIR/summary.csv`` one row per case (see :data:`SUMMARY_COLUMNS`).
Label maps keep their format's extension; each format declares what is written
for it where it cannot hold the maps: for formats without a float pixel type or
geometry (PNG, JPEG, BMP) the label maps are PNG and the float maps TIFF; DICOM
(files and series, whose geometry is kept) and two-file inputs (``.mhd``,
``.nhdr``) are written as NIfTI, MHA and NRRD.

How each image is sampled (preprocessing, whole image, sliding window, slice by slice)
is :mod:`probunet.inference.predictor`.

Robustness: a case that fails (unreadable file, wrong channel count, NaN) gets a
summary row with status ``error`` and the message, is logged, and the others go
on; :func:`predict_folder` reports the number of failures and the CLI exits 1.
A case folder that holds a ``case.json`` is skipped (status ``skipped``, its
statistics carried over) unless ``overwrite``; a non-empty folder without one
(an interrupted run) is an error unless ``overwrite``. Nothing is written under
the input folder (an output folder inside it, or containing it, is refused) nor
outside OUTPUT_DIR (a case whose output folder resolves elsewhere, e.g. a
``../`` entry of a file list, is an error row), and every file is written
atomically (temporary file + rename). One run at a time per OUTPUT_DIR: the run
holds an OS file lock on ``OUTPUT_DIR/.probunet.lock`` (shared by the shards of
one ``--shard`` run), and a folder that cannot be written is refused before the
model is loaded.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import math
import os
import re
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import __version__
from ..models.checkpoint import resolve_checkpoint_path
from ..data import formats, io
from ..data.errors import DataError
from ..data.guards import check_regular_file
from ..options import PredictOptions, with_overrides
from .predictor import Prediction, Predictor, Resampling
from ..runtime import output_folder
from ..guards import ensure_writable_dir
from ..utils import FolderLock, atomic_write_text

logger = logging.getLogger(__name__)

_OUR_FILE = re.compile(r"^(sample_\d+|probability(_class\d+)?|entropy|aleatoric|epistemic|consensus|region)\.")

SUMMARY_COLUMNS = (
    "case",  # case id = output sub-folder (relative path of the input without extension)
    "status",  # ok | error | skipped (complete outputs existed)
    "error",  # why a case failed
    "input",
    "output",
    "mode",  # whole | sliding_window | slices(axis=K) [+ sliding_window]
    "shape",  # spatial shape of the input, e.g. 64x64x32
    "spacing",  # voxel size in mm (empty for formats without geometry)
    "num_samples",
    "volume_unit",  # mm3 / mm2 where spacing is known, else voxels / pixels
    "consensus_volume",  # foreground (any class != 0) volume of the consensus
    "sample_volume_min",  # foreground volume across the samples
    "sample_volume_median",
    "sample_volume_max",
    "mean_entropy_in_union",  # mean predictive entropy (nats) over the union of the samples' foreground
    "sample_diversity",  # E[d(S,S')], d = 1 - IoU (probunet.metrics.sample_diversity)
    "seconds",
)


# ----------------------------------------------------------------------------- results


@dataclass
class PredictSummary:
    """What :func:`predict_folder` returns: one row (dict of SUMMARY_COLUMNS) per case."""

    rows: list
    summary_path: Path
    output_dir: Path

    @property
    def failed(self) -> list:
        return [r for r in self.rows if r["status"] == "error"]

    @property
    def skipped(self) -> list:
        return [r for r in self.rows if r["status"] == "skipped"]


@dataclass
class InputCase:
    """An input image: ``case_id`` (posix relative path, the output sub-folder) and its ``path``."""

    case_id: str
    path: Path


# ----------------------------------------------------------------------------- inputs and outputs


def find_inputs(input_dir: str | Path, *, recursive: bool = False,
                file_list: Optional[str | Path] = None) -> list[InputCase]:
    """The images to predict, sorted by relative path.

    Without ``file_list``: every file in ``input_dir`` (with ``recursive``, in its
    sub-folders too) whose ending a registered format takes
    (:func:`probunet.data.formats.scan_endings`), and every sub-folder that a folder
    format claims (a DICOM series: DICOM files, by their ``.dcm`` ending or the
    ``DICM`` magic, and no image of another format), as one case whose id is the
    folder's path; a series folder is not looked into further. Hidden files and
    folders are ignored. With ``file_list``: a text file with one path per line
    (relative to ``input_dir`` or absolute; blank lines and ``#`` comments ignored;
    a DICOM series folder is allowed); a missing file becomes an error row, not an
    exception. The case id is the path relative to ``input_dir`` without its
    extension (the file name for paths outside it; a folder keeps its whole name);
    two inputs with the same id (``a.nii.gz`` and ``a.nrrd``) keep their extension
    as ``a_nrrd``.
    """
    root = Path(input_dir)
    if not root.exists():
        raise FileNotFoundError(f"input folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"INPUT_DIR must be a folder: {root}")
    paths: list[Path] = []
    if file_list is not None:
        fl = Path(file_list)
        if not fl.exists():
            raise FileNotFoundError(f"--file-list: not found: {fl}")
        try:
            check_regular_file(fl, "--file-list")
        except DataError as exc:
            raise ValueError(str(exc)) from None
        for number, raw in enumerate(fl.read_bytes().splitlines(), 1):
            line = os.fsdecode(raw).strip()  # the bytes of the names, UTF-8 or not
            if not line or line.startswith("#"):
                continue
            if "\0" in line:
                raise ValueError(f"--file-list {fl}, line {number}: a NUL byte in the path; no file name holds one")
            p = Path(line)
            paths.append(p if p.is_absolute() else root / p)
    else:
        paths = _scan(root, recursive)
    cases, seen = [], {}
    for p in paths:
        try:
            rel = p.relative_to(root)
        except ValueError:
            rel = Path(p.name)
        cid = (rel.parent / io.strip_suffix(rel)).as_posix() if io.full_suffix(rel) and not p.is_dir() \
            else rel.as_posix()
        cases.append([cid, p, rel])
        seen[cid] = seen.get(cid, 0) + 1
    out = []
    for cid, p, rel in cases:
        if seen[cid] > 1:
            cid = (rel.parent / rel.name.replace(".", "_")).as_posix()
        out.append(InputCase(cid, p))
    out.sort(key=lambda c: c.case_id)
    ids = [c.case_id for c in out]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"two inputs map to the same output folder: {', '.join(dup[:5])}")
    return out


def _scan(root: Path, recursive: bool) -> list[Path]:
    """The image files and image folders (a DICOM series) of ``root`` (with ``recursive``, below it too)."""
    found, folders = [], [root]
    while folders:
        folder = folders.pop()
        for p in sorted(folder.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                if formats.folder_format(p) is not None:
                    found.append(p)  # one case; its files are the image's
                elif recursive and not p.is_symlink():  # (a linked folder is not entered: no loops)
                    folders.append(p)
                else:
                    logger.debug("predict: ignoring the folder %s (not an image folder)", p)
            elif not (p.is_file() or p.exists()):
                continue  # a dangling link
            elif formats.is_scanned_file(p):
                found.append(p)  # a FIFO or device with an image's name is kept: an error row, never opened
            else:
                logger.debug("predict: ignoring %s (not an image extension)", p)
    return found


def output_suffixes(input_path: str | Path, output_format: str = "same") -> tuple[str, str]:
    """(label suffix, float suffix) for an input: its own format where it can hold both
    (:func:`probunet.data.formats.output_endings`)."""
    return formats.output_endings(input_path, output_format)


def _check_folders(input_dir: Path, output_dir: Path, cases: list[InputCase]) -> None:
    inp, out = input_dir.resolve(), output_dir.resolve()
    if out == inp or out.is_relative_to(inp):
        raise ValueError(f"OUTPUT_DIR {output_dir} is inside INPUT_DIR {input_dir}: the input folder is never "
                         f"written to; choose an output folder elsewhere")
    if inp.is_relative_to(out):
        raise ValueError(f"INPUT_DIR {input_dir} is inside OUTPUT_DIR {output_dir}; choose another output folder")
    for c in cases:
        if c.path.resolve().is_relative_to(out):
            raise ValueError(f"input {c.path} lies inside OUTPUT_DIR {output_dir}; choose another output folder")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.8g}"
    return _printable(str(v))


def _printable(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a file name that is not UTF-8 (held as surrogate
    escapes) are shown as ``\\xff``, so the summary can be written."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


def case_statistics(pred: Prediction, meta: dict, num_classes: int, *, has_geometry: bool) -> dict:
    """Summary values of one prediction (see :data:`SUMMARY_COLUMNS`)."""
    from ..metrics.segmentation import sample_diversity

    s = pred.samples.shape[0]
    spatial = pred.consensus.shape
    nd = len(spatial)
    spacing = meta.get("spacing") if has_geometry else None
    if spacing is not None and len(spacing) == nd:
        voxel = float(np.prod(spacing))
        unit = f"mm{nd}"
    else:
        voxel, unit = 1.0, "voxels" if nd == 3 else "pixels"
    fg = pred.samples.reshape(s, -1) != 0  # (S, N)
    vols = fg.sum(axis=1) * voxel
    union = fg.any(axis=0)
    ent = pred.entropy.reshape(-1)
    div = sample_diversity(torch.from_numpy(pred.samples[None].astype(np.int64)), num_classes=num_classes)
    row = {
        "mode": pred.mode,
        "shape": "x".join(str(v) for v in spatial),
        "spacing": "x".join(f"{v:.6g}" for v in spacing) if spacing is not None else "",
        "num_samples": s,
        "volume_unit": unit,
        "consensus_volume": float((pred.consensus != 0).sum() * voxel),
        "sample_volume_min": float(vols.min()),
        "sample_volume_median": float(np.median(vols)),
        "sample_volume_max": float(vols.max()),
        "mean_entropy_in_union": float(ent[union].mean()) if union.any() else float("nan"),
        "sample_diversity": float(div[0]),
    }
    for k in range(1, num_classes) if num_classes > 2 else ():
        row[f"consensus_volume_class{k}"] = float((pred.consensus == k).sum() * voxel)
    return row


def write_prediction(pred: Prediction, meta: dict, case_dir: Path, suffixes: tuple[str, str]) -> list[str]:
    """Write the maps of one case into ``case_dir`` (atomically, file by file); returns the file names."""
    label_suffix, float_suffix = suffixes
    out_meta = {k: v for k, v in meta.items() if k != "num_components"}
    out_meta["shape"] = list(pred.consensus.shape)
    num_classes = pred.probability.shape[0]
    ldtype = np.uint8 if num_classes <= 255 else np.uint16
    names = []

    def put(name: str, array: np.ndarray, suffix: str) -> None:
        io.write_image(array, out_meta, case_dir / f"{name}{suffix}")
        names.append(f"{name}{suffix}")

    width = max(3, len(str(pred.samples.shape[0] - 1)))
    for s, sample in enumerate(pred.samples):
        put(f"sample_{s:0{width}d}", sample.astype(ldtype), label_suffix)
    put("probability", pred.foreground, float_suffix)
    if num_classes > 2:
        for k in range(1, num_classes):
            put(f"probability_class{k}", pred.probability[k].astype(np.float32), float_suffix)
    put("entropy", pred.entropy.astype(np.float32), float_suffix)
    for name, umap in pred.maps.items():  # aleatoric, epistemic: models with an epistemic map
        put(name, umap.astype(np.float32), float_suffix)
    put("consensus", pred.consensus.astype(ldtype), label_suffix)
    return names


def read_summary(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_summary(rows: list[dict], path: str | Path) -> Path:
    """Write rows as CSV (atomically): :data:`SUMMARY_COLUMNS`, then any extra columns in order."""
    columns = list(SUMMARY_COLUMNS)
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in columns})
    return atomic_write_text(path, buf.getvalue())


def merge_summaries(output_dir: str | Path) -> tuple[Path, list[dict]]:
    """Merge the shard summaries ``summary.shard-K-of-N.csv`` of ``output_dir``
    into ``summary.csv`` (sorted by case); returns its path and rows."""
    output_dir = Path(output_dir)
    parts = sorted(output_dir.glob("summary.shard-*-of-*.csv"))
    if not parts:
        raise FileNotFoundError(f"no shard summaries (summary.shard-K-of-N.csv) in {output_dir}")
    output_folder.check_mergeable(output_dir, parts, read_summary)  # one run's shards, never mixed
    rows = [r for p in parts for r in read_summary(p)]
    rows.sort(key=lambda r: r["case"])
    return write_summary(rows, output_dir / "summary.csv"), rows


# ----------------------------------------------------------------------------- the folder loop


@dataclass
class _Prepared:
    case: InputCase
    row: dict
    t0: float
    meta: dict = field(default_factory=dict)
    units: Optional[torch.Tensor] = None  # (N, C, *unit_spatial); released once stacked for the model
    axis: Optional[int] = None
    resampling: Optional[Resampling] = None  # the image was resampled to the training spacing
    mode: str = ""
    error: Optional[str] = None
    skip: bool = False


def _error_message(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    msg = msg[0] if msg else ""
    return msg if isinstance(exc, (DataError, OSError)) and msg else f"{exc.__class__.__name__}: {msg}"


def _shard(spec: Optional[str]) -> Optional[tuple[int, int]]:
    if spec is None:
        return None
    if isinstance(spec, (tuple, list)):
        k, n = (int(v) for v in spec)
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
        if not m:
            raise ValueError(f"--shard: expected K/N (0 <= K < N), got {spec!r}")
        k, n = int(m.group(1)), int(m.group(2))
    if not 0 <= k < n:
        raise ValueError(f"--shard: expected K/N with 0 <= K < N, got {k}/{n}")
    return k, n


def predict_folder(checkpoint, input_dir: str | Path, output_dir: str | Path,
                   options: Optional[PredictOptions] = None, *, progress: bool = False, **kwargs) -> PredictSummary:
    """Predict every image of ``input_dir`` into ``output_dir`` (see the module docstring).

    Args:
        checkpoint: a checkpoint file, a run directory, or a :class:`Predictor` (whose
            sampling settings are then used).
        options: a :class:`probunet.options.PredictOptions`; keyword arguments of the same
            names override single fields. Besides the sampling fields (see :class:`Predictor`):
            ``recursive``, ``file_list`` (which inputs, see :func:`find_inputs`),
            ``overwrite`` (recompute cases whose output folder exists), ``output_format``
            (``same``: the input's, or nii.gz, nii, nrrd, mha), ``workers`` (threads reading
            and writing images while the model runs), ``shard`` (``"K/N"``: only cases K,
            K+N, ... of the sorted list; the summary is then ``summary.shard-K-of-N.csv``,
            see :func:`merge_summaries`).
        progress: a tqdm bar on stderr.

    Returns:
        :class:`PredictSummary`; failed cases are rows with status ``error``
        (the function raises only for problems with the arguments).
    """
    opts = with_overrides(options, PredictOptions, **kwargs).check()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not isinstance(checkpoint, Predictor):
        resolve_checkpoint_path(checkpoint)  # a missing checkpoint first; it is loaded once OUTPUT_DIR is ours
    cases = find_inputs(input_dir, recursive=opts.recursive, file_list=opts.file_list)
    shard = _shard(opts.shard)
    if not cases:
        where = f"{opts.file_list}" if opts.file_list else \
            f"{input_dir}" + ("" if opts.recursive else " (try --recursive)")
        raise ValueError(f"no input images found in {where}; extensions read: {', '.join(formats.scan_endings())}"
                         f" and DICOM series folders")
    if shard is not None:
        cases = cases[shard[0]::shard[1]]  # may be empty: more shards than cases
    _check_folders(input_dir, output_dir, cases)
    choices = formats.output_choices()
    if (opts.output_format or "same") not in choices:
        raise ValueError(f"output format must be one of {', '.join(choices)}, got {opts.output_format!r}")
    ensure_writable_dir(output_dir, "OUTPUT_DIR")  # created and probed before any model is loaded or run
    name = "summary.csv" if shard is None else f"summary.shard-{shard[0]}-of-{shard[1]}.csv"
    # a folder probunet did not create, or a user's summary.csv, is refused before anything is written
    output_folder.check_output_dir(output_dir, SUMMARY_COLUMNS, [name])
    with ExitStack() as locks:
        # One run per OUTPUT_DIR (exclusive lock); the shards of one run share it, each shard alone.
        locks.enter_context(FolderLock(output_dir, shared=shard is not None, what="OUTPUT_DIR"))
        if shard is not None:
            locks.enter_context(FolderLock(output_dir, what=f"OUTPUT_DIR (shard {shard[0]}/{shard[1]})",
                                           name=f".probunet.shard-{shard[0]}-of-{shard[1]}.lock"))
        if shard is not None and not cases:  # more shards than cases: nothing to do, nothing written
            return PredictSummary([], output_dir / name, output_dir)
        # the folder remembers the shard count and settings of a sharded run (another N is refused)
        output_folder.claim_output_dir(output_dir, shard=shard, settings=_run_settings(checkpoint, input_dir, opts),
                                       overwrite=opts.overwrite)
        # only predict's own temporary files, only where it writes: OUTPUT_DIR and this run's case folders
        # (each case belongs to one shard, whose lock this process holds)
        output_folder.remove_own_temps([output_dir, *(output_dir / c.case_id for c in cases
                                                      if ".." not in Path(c.case_id).parts)])
        predictor = checkpoint if isinstance(checkpoint, Predictor) else Predictor.from_checkpoint(checkpoint, opts)
        run = _FolderRun(predictor, "" if isinstance(checkpoint, Predictor) else str(checkpoint), output_dir,
                         overwrite=opts.overwrite, output_format=opts.output_format or "same")
        from .regions import region_rule

        run.calibration = region_rule(checkpoint, predictor)  # the run's calibration.json, for this checkpoint
        if run.calibration is not None:
            run.settings["region"] = {k: run.calibration[k] for k in ("alpha", "risk", "lambda", "min_votes")}
        run.read_kw = {"max_voxels": opts.max_voxels if opts.max_voxels is not None else
                       getattr(predictor.cfg.data, "max_voxels", None),
                       "allow_external_data_files": bool(opts.allow_external_data_files)}
        logger.info("predict: %d case(s) from %s -> %s (%d samples, device %s, roi %s, batch %d)", len(cases),
                    input_dir, output_dir, predictor.num_samples, predictor.device, predictor.roi_size,
                    predictor.batch_size)
        rows = run.run(cases, workers=max(1, int(opts.workers)), progress=progress)
    path = write_summary(rows, output_dir / name)
    summary = PredictSummary(rows, path, output_dir)
    logger.info("predict: %d ok, %d skipped, %d failed; summary %s", len(rows) - len(summary.failed)
                - len(summary.skipped), len(summary.skipped), len(summary.failed), path)
    return summary


def _run_settings(checkpoint, input_dir: Path, opts: PredictOptions) -> dict:
    """What a sharded run's outputs depend on: the checkpoint, the inputs, the sampling options."""
    settings = {"checkpoint": "" if isinstance(checkpoint, Predictor) else str(Path(checkpoint).resolve()),
                "input_dir": str(input_dir.resolve()), "recursive": bool(opts.recursive),
                "file_list": str(Path(opts.file_list).resolve()) if opts.file_list else None,
                "output_format": opts.output_format or "same"}
    src = checkpoint.options if isinstance(checkpoint, Predictor) else opts
    for key in ("num_samples", "seed", "amp", "roi_size", "overlap", "blend", "prior_window", "axis"):
        value = getattr(src, key)
        settings[key] = list(value) if isinstance(value, tuple) else value
    return json.loads(json.dumps(settings, default=str))


def _keeps_geometry(ending: str) -> bool:
    fmt = formats.for_ending(ending)
    return fmt is None or fmt.geometry


def _case_dir(output_dir: Path, case: InputCase) -> Path:
    """``OUTPUT_DIR/<case id>``; DataError when it resolves outside OUTPUT_DIR (``..`` in a
    --file-list entry, a symlink): nothing is ever written outside OUTPUT_DIR."""
    case_dir = output_dir / case.case_id
    root = output_dir.resolve()
    resolved = case_dir.resolve()
    if resolved == root or not resolved.is_relative_to(root) or ".." in Path(case.case_id).parts:
        raise DataError(f"{case.path}: its output folder {case_dir} lies outside OUTPUT_DIR {output_dir} "
                        f"(a '..' in the file list?); skipped")
    return case_dir


class _FolderRun:
    """The folder loop: reader threads prepare cases ahead, the model runs on groups of
    units of one shape (up to ``batch_size``), writer threads write each case's files."""

    def __init__(self, predictor: Predictor, checkpoint: str, output_dir: Path, *, overwrite: bool,
                 output_format: str):
        self.predictor, self.output_dir = predictor, output_dir
        self.overwrite, self.output_format = overwrite, output_format
        self.settings = {"checkpoint": checkpoint, "probunet_version": __version__,
                         "num_samples": predictor.num_samples, "seed": predictor.seed,
                         "roi_size": list(predictor.roi_size) if predictor.roi_size else None,
                         "amp": str(predictor.dtype).replace("torch.", "") if predictor.dtype else "off"}
        self.rows: dict[str, dict] = {}
        self.bar = None
        self.read_kw: dict = {}  # io.read_image's limits (max_voxels, allow_external_data_files)
        self.calibration: Optional[dict] = None  # a calibration.json: the region map is written too

    # -- per case, on the threads

    def prepare(self, case: InputCase) -> _Prepared:
        """Read and preprocess one case (or mark it skipped / failed); never raises."""
        row = {"case": case.case_id, "input": str(case.path), "output": ""}
        item = _Prepared(case, row, time.perf_counter())
        try:
            case_dir = _case_dir(self.output_dir, case)
            row["output"] = str(case_dir)
            if not self.overwrite and (case_dir / "case.json").is_file():
                self._skip(item, case_dir)
                return item
            if not self.overwrite and case_dir.is_dir() and any(case_dir.iterdir()):
                raise FileExistsError(f"{case_dir} exists without case.json (an interrupted run?); "
                                      f"pass --overwrite to recompute it")
            array, meta = io.read_image(case.path, **self.read_kw)
            image = self.predictor.to_channels_first(array, meta, where=str(case.path))
            item.meta = meta
            # PNG/JPEG/BMP hold no spacing (the reader's 1.0 is a default): they are predicted as they are
            spacing = meta.get("spacing") if formats.keeps_geometry(case.path) else None
            image, item.resampling = self.predictor.resample_for_model(image, spacing, where=f"case {case.case_id}")
            item.units, item.axis = self.predictor.prepare(
                image, meta.get("spacing") if item.resampling is None else item.resampling.target)
            item.mode = self.predictor.mode_of(item.units.shape[2:], item.axis)
        except Exception as exc:  # one bad case never stops the others
            item.error = _error_message(exc)
        return item

    def _skip(self, item: _Prepared, case_dir: Path) -> None:
        old = json.loads((case_dir / "case.json").read_text(encoding="utf-8"))
        item.row.update({k: v for k, v in old.get("summary", {}).items() if k not in ("status", "error")})
        item.row.update(status="skipped", error="", case=item.case.case_id, output=str(case_dir))
        if old.get("num_samples") != self.predictor.num_samples or old.get("seed") != self.predictor.seed:
            logger.warning("%s: existing outputs (%s samples, seed %s) kept; pass --overwrite to recompute",
                           case_dir, old.get("num_samples"), old.get("seed"))
        item.skip = True

    def finish(self, item: _Prepared, mean_prob, labels, seconds: float, aleatoric=None) -> dict:
        """Write one case's maps and case.json; returns its summary row (status ok or error)."""
        row, case_dir = item.row, self.output_dir / item.case.case_id
        try:
            pred = self.predictor.finish(mean_prob, labels, item.axis, item.mode, aleatoric, item.resampling)
            suffixes = output_suffixes(item.case.path, self.output_format)
            row.update(case_statistics(pred, item.meta, self.predictor.num_classes,
                                       has_geometry=_keeps_geometry(suffixes[0])))
            if self.overwrite and (case_dir / "case.json").exists():
                (case_dir / "case.json").unlink()  # incomplete until rewritten
            names = write_prediction(pred, item.meta, case_dir, suffixes)
            if self.calibration is not None:
                from .regions import write_region

                names.append(write_region(pred, item.meta, case_dir, suffixes[0], self.calibration))
            for p in case_dir.iterdir() if self.overwrite else ():
                if p.is_file() and _OUR_FILE.match(p.name) and p.name not in names:
                    p.unlink()  # stale output of an earlier run (other sample count or format)
            row.update(status="ok", error="", seconds=round(seconds + time.perf_counter() - item.t0, 3))
            record = {"case": item.case.case_id, "input": str(item.case.path), **self.settings,
                      "axis": item.axis, "resampling": pred.resampling, "outputs": names, "summary": row}
            atomic_write_text(case_dir / "case.json", json.dumps(record, indent=1, default=str))
        except Exception as exc:
            row.update(status="error", error=_error_message(exc))
            logger.error("predict: case %s failed: %s", item.case.case_id, row["error"])
        return row

    # -- bookkeeping, on the main thread

    def record(self, row: dict) -> None:
        self.rows[row["case"]] = row
        if self.bar is not None:
            self.bar.update(1)

    def fail(self, item: _Prepared, message: str) -> None:
        item.row.update(status="error", error=message)
        logger.error("predict: case %s failed: %s", item.case.case_id, message)
        self.record(item.row)

    def sample(self, group: list, pool: ThreadPoolExecutor) -> list[Future]:
        """Run the model on a group of prepared cases; their writes go to the pool."""
        if not group:
            return []
        t0 = time.perf_counter()
        try:
            counts = [g.units.shape[0] for g in group]
            units = torch.cat([g.units for g in group])
            ids = [g.case.case_id for g, n in zip(group, counts) for _ in range(n)]  # slices share their case's
            for g in group:
                g.units = None  # only the stacked copy is kept
            mean_prob, labels, aleatoric = self.predictor.run(units, ids)
        except Exception as exc:  # e.g. out of memory: these cases fail, the rest go on
            for g in group:
                self.fail(g, _error_message(exc))
            return []
        share = (time.perf_counter() - t0) / units.shape[0]
        writes, i = [], 0
        for g, n in zip(group, counts):
            writes.append(pool.submit(self.finish, g, mean_prob[i:i + n], labels[i:i + n], share * n,
                                      None if aleatoric is None else aleatoric[i:i + n]))
            i += n
        return writes

    def _fits(self, group: list, item: _Prepared) -> bool:
        return not group or (group[0].units.shape[1:] == item.units.shape[1:] and sum(
            g.units.shape[0] for g in group) + item.units.shape[0] <= self.predictor.batch_size)

    def run(self, cases: list[InputCase], *, workers: int, progress: bool) -> list[dict]:
        """Every case's summary row, in the order of ``cases``."""
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=len(cases), desc="predict", unit="case", dynamic_ncols=True)
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probunet-io") as pool:
                pending: deque[Future] = deque(pool.submit(self.prepare, c) for c in cases[:max(2 * workers, 2)])
                queue = iter(cases[len(pending):])
                group: list[_Prepared] = []
                writes: list[Future] = []
                while pending:
                    item = pending.popleft().result()
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending.append(pool.submit(self.prepare, nxt))
                    if item.skip or item.error is not None:
                        self.record(item.row) if item.skip else self.fail(item, item.error)
                        continue
                    if not self._fits(group, item):
                        writes += self.sample(group, pool)
                        group = []
                    group.append(item)
                    for w in [w for w in writes if w.done()]:
                        writes.remove(w)
                        self.record(w.result())
                writes += self.sample(group, pool)
                for w in writes:
                    self.record(w.result())
        finally:
            if self.bar is not None:
                self.bar.close()
        return [self.rows[c.case_id] for c in cases]


__all__ = ["SUMMARY_COLUMNS", "InputCase", "PredictSummary", "case_statistics",
           "find_inputs", "merge_summaries", "output_suffixes", "predict_folder", "read_summary", "write_prediction",
           "write_summary"]
