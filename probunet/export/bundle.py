"""A trained model as a MONAI Bundle: ``probunet export RUN --format bundle --out DIR``.

The folder follows MONAI's bundle specification::

    DIR/configs/metadata.json    the bundle's metadata (schema meta_schema_20240725), with inputs,
                                 outputs, the probunet version, training data and evaluation metrics
    DIR/configs/inference.json   reads a folder of NIfTI images, samples them with sliding windows,
                                 writes samples, the mean probability and the entropy per image
    DIR/models/model.ts          the TorchScript sampler (see probunet.export)
    DIR/docs/README.md           the model card
    DIR/LICENSE                  Apache-2.0 (the code); the weights follow their training data's terms

Run it with MONAI alone (no probunet needed)::

    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR \\
        --dataset_dir IMAGES --output_dir OUT

Per image ``IMAGES/<case>.nii.gz`` it writes ``OUT/<case>/<case>_samples.nii.gz`` (the S
sample label maps, uint8, on the last axis), ``<case>_probability.nii.gz`` (mean
foreground probability over the samples, 1 - p(background)), and
``<case>_entropy.nii.gz`` (predictive entropy of the mean distribution, nats), with
the input's affine. These are the numbers ``probunet predict CHECKPOINT IMAGES OUT
--seed K --num-samples S`` writes for the same images: the preprocessing is the
checkpoint's ``data.normalize`` (MONAI's NormalizeIntensityd / ScaleIntensityRanged),
the noise of sample s of a case is drawn from (seed, case id, s) by the same
SHA-256 rule (probunet.inference.case_noise / case_seed, re-stated in the
config), an image larger than the window is sampled by MONAI's
``sliding_window_inference`` (Gaussian blending) on the image padded to the
window with its per-channel minimum, every window sharing the whole image's prior
and noise, and the other images are sampled whole.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import __version__
from ..data import formats
from ..utils import atomic_write_text

logger = logging.getLogger(__name__)

# The metadata schema the bundle declares; the keys it requires are listed in REQUIRED_METADATA_KEYS.
METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20240725.json")
REQUIRED_METADATA_KEYS = ("schema", "version", "monai_version", "pytorch_version", "numpy_version",
                          "required_packages_version", "task", "description", "authors", "copyright",
                          "network_data_format")
REQUIRED_TENSOR_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")
BUNDLE_VERSION = "0.1.0"


def _versions() -> dict:
    import monai

    return {"monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": np.__version__}


def _roi(roi_size, cfg, spatial_dims: int, divisor: int) -> Optional[list]:
    from ..inference.sampler import resolve_roi
    from ..options import parse_roi
    from ..inference.predictor import config_roi

    roi = resolve_roi(config_roi(parse_roi(roi_size), cfg), spatial_dims, divisor)
    return None if roi is None else [int(r) for r in roi]


def _evaluation(source: Path, evaluation) -> Optional[dict]:
    """The run's evaluation summary.json (``evaluation``, or RUN/eval/summary.json), None when absent."""
    from ..evaluation.scoring import SUMMARY_KIND

    if evaluation is not None:
        path = Path(evaluation)
        if not path.is_file():
            raise FileNotFoundError(f"--evaluation: not found: {path}")
    else:
        run = source if source.is_dir() else (source.parent.parent if source.parent.name == "checkpoints"
                                              else source.parent)
        path = run / "eval" / "summary.json"
        if not path.is_file():
            return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--evaluation {path}: not readable JSON ({exc.__class__.__name__})") from None
    if not isinstance(summary, dict) or summary.get("kind") != SUMMARY_KIND:
        raise ValueError(f"--evaluation {path}: not a probunet evaluation summary")
    summary["_path"] = str(path)
    return summary


def _tensor(kind: str, fmt: str, channels: int, shape, dtype: str, value_range: list, patch: bool,
            channel_def: dict) -> dict:
    return {"type": kind, "format": fmt, "modality": "n/a", "num_channels": int(channels),
            "spatial_shape": shape, "dtype": dtype, "value_range": value_range, "is_patch_data": patch,
            "channel_def": {str(k): v for k, v in channel_def.items()}}


def metadata(model, cfg, ckpt: dict, meta: dict, *, num_samples: int, seed: int, roi: Optional[list],
             summary: Optional[dict]) -> dict:
    """``configs/metadata.json``."""
    nd, c, cin = int(model.spatial_dims), int(model.num_classes), int(model.in_channels)
    d = int(model.divisor)
    shape = [f"{d}*n"] * nd
    classes = {0: "background", **{k: f"class {k}" for k in range(1, c)}}
    data = cfg.data
    eval_metrics = {}
    if summary:
        for k, stat in summary.get("metrics", {}).items():
            if isinstance(stat, dict) and stat.get("mean") is not None:
                eval_metrics[k] = stat["mean"]
        eval_metrics["num_cases"] = summary.get("num_cases")
        eval_metrics["num_samples"] = summary.get("num_samples")
        eval_metrics["split"] = summary.get("split")
    name = meta["model"]
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by probunet {__version__} from {Path(str(ckpt.get('path'))).name} "
                                      f"(step {ckpt.get('step')})"},
        **_versions(),
        "required_packages_version": {"nibabel": _version_of("nibabel")},
        "name": f"probunet {name} ({nd}D)",
        "task": f"Sampling plausible {nd}D segmentations under annotator variability ({name}, {c} classes)",
        "description": (f"A {name} model trained with probunet {__version__}: for an image it draws {num_samples} "
                        f"segmentation samples, one per plausible rater, and from them the mean probability and "
                        f"the predictive entropy. See docs/README.md (the model card)."),
        "authors": "probunet export (fill in the model's authors)",
        "copyright": "Copyright (c) the model's authors (fill in)",
        "data_source": _data_source(data),
        "data_type": "nibabel",
        "image_classes": f"{cin} channel(s), intensities after data.normalize = {data.normalize}"
                         + (f" (window {list(data.ct_window)})" if data.normalize == "ct_window" else ""),
        "label_classes": "integer label maps of each rater: " + ", ".join(f"{k} {v}" for k, v in classes.items()),
        "pred_classes": f"{num_samples} samples x {c} class logits, sample-major (channel s*{c} + k is class k of "
                        f"sample s); the written outputs are the samples' label maps, the mean foreground "
                        f"probability and the entropy",
        "eval_metrics": eval_metrics,
        "intended_use": "Research on segmentation under annotator variability; not for clinical use.",
        "references": [
            "Kohl, S. A. A. et al. A Probabilistic U-Net for Segmentation of Ambiguous Images. NeurIPS 2018.",
        ],
        "network_data_format": {
            "inputs": {
                "image": _tensor("image", "magnitude", cin, shape, "float32", [], False,
                                 {k: f"image channel {k} after data.normalize" for k in range(cin)}),
            },
            "outputs": {
                "pred": _tensor("image", "logits", num_samples * c, shape, "float32", [], False,
                                {s * c + k: f"sample {s}, {classes[k]}" for s in range(num_samples)
                                 for k in range(c)}),
            },
            "post_processed_outputs": {
                "samples": _tensor("image", "segmentation", num_samples, shape, "uint8", [0, c - 1], False,
                                   {s: f"sample {s}" for s in range(num_samples)}),
                "probability": _tensor("image", "probabilities", 1, shape, "float32", [0, 1], False,
                                       {0: "mean foreground probability over the samples"}),
                "entropy": _tensor("image", "magnitude", 1, shape, "float32", [0, math.log(c)], False,
                                   {0: "predictive entropy of the mean distribution (nats)"}),
            },
        },
        "probunet": {
            "probunet_version": __version__,
            "model": name,
            "spatial_dims": nd,
            "divisor": d,
            "num_samples": num_samples,
            "seed": seed,
            "sliding_window": roi,
            "latent_dim": meta["latent_dim"],
            "training": {"data": cfg.to_dict()["data"], "steps_done": ckpt.get("step"),
                         "train": {k: cfg.to_dict()["train"][k] for k in ("steps", "batch_size", "lr", "seed")}},
            "checkpoint_digest": ckpt.get("digest"),
            "calibration": meta.get("calibration"),  # probunet calibrate's alpha and lambda, when the run has one
            "evaluation": None if not summary else {k: summary.get(k) for k in (
                "split", "num_cases", "num_samples", "seed", "metrics", "conventions")},
        },
    }


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def _data_source(data) -> str:
    if data.format == "synthetic" and not data.path:
        s = data.synthetic
        return (f"probunet's synthetic multi-rater set generated in memory ({s.num_cases} cases, {s.size} px, "
                f"{s.spatial_dims}D, {s.num_raters} raters, seed {s.seed})")
    return f"data.format {data.format} at {data.path}"


# ----------------------------------------------------------------------------- inference.json


def inference_config(meta: dict, *, num_samples: int, seed: int, roi: Optional[list], overlap: float,
                     blend: str, normalize: str, ct_window) -> dict:
    """``configs/inference.json``: MONAI components and short expressions, no probunet import."""
    c, latent = int(meta["num_classes"]), int(meta["latent_dim"])
    nifti = formats.get("nifti")  # the bundle reads and writes the NIfTI format's endings
    pre = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"
         if meta["in_channels"] == 1 else -1},
    ]
    if normalize == "zscore":
        pre.append({"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True})
    elif normalize == "ct_window":
        pre.append({"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": float(ct_window[0]),
                    "a_max": float(ct_window[1]), "b_min": 0.0, "b_max": 1.0, "clip": True})
    pre.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    # the seeding rule of probunet.inference: sha256 -> 63-bit seed of a torch.Generator
    h = "int.from_bytes(hashlib.sha256(({}).encode()).digest()[:8], 'little') & (2**63 - 1)"
    noise = ("$lambda case: torch.stack([torch.randn(@latent_dim, generator=torch.Generator().manual_seed("
             + h.format("'probunet-predict:%d:%s:%d' % (@seed, case, s)")
             + ")) for s in range(@num_samples)])[None] if @latent_dim > 0 else None")
    case_seed = "$lambda case: " + h.format("'probunet-sample:%d:%s' % (@seed, case)") + " if @latent_dim == 0 else -1"
    save = {"_target_": "SaveImaged", "output_dir": "@output_dir", "separate_folder": True, "resample": False,
            "output_ext": nifti.endings[0], "print_log": False}
    cfg = {
        "imports": ["$import glob", "$import os", "$import hashlib", "$import torch", "$import monai"],
        "bundle_root": ".",
        "dataset_dir": "/workspace/data",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "num_samples": int(num_samples),
        "seed": int(seed),
        "num_classes": c,
        "latent_dim": latent,
        "roi_size": roi if roi is not None else [],
        "sw_batch_size": 4,
        "overlap": float(overlap),
        "blend": blend,
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location='cpu')",
        "network": "$@network_def.to(@device).eval()",
        # the NIfTI files of dataset_dir, the case id their name without its ending (as probunet predict's)
        "datalist": "$[{'image': f, 'case': os.path.basename(f)[:-len(e)]} "
                    "for f in sorted(glob.glob(os.path.join(@dataset_dir, '*'))) "
                    f"for e in [next((x for x in {list(nifti.endings)!r} if f.endswith(x)), '')] if e]",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        # sample s of a case: latent noise eps_s (Probabilistic U-Net) or a generator's seed (the zoo);
        # every window restarts the generator, so all windows draw the same noise
        "case_noise": noise,
        "case_seed": case_seed,
        # the windows of one image share its noise and its image-level prior (net.sample_context)
        "generator": "$lambda seed: torch.Generator().manual_seed(seed) if seed >= 0 else None",
        "window_fn": "$lambda net, noise, seed, context: (lambda w: net(w, noise=noise, num_samples=@num_samples, "
                     "context=context).flatten(1, 2) if noise is not None else "
                     "torch.cat([net(w[i:i + 1], generator=@generator(seed), num_samples=@num_samples).flatten(1, 2) "
                     "for i in range(w.shape[0])]))",
        "crop": "$lambda y, shape: y[(slice(None), slice(None)) + tuple(slice((t - s) // 2, (t - s) // 2 + s) "
                "for t, s in zip(y.shape[2:], shape))]",
        "windows": "$lambda x, net, noise, seed: @crop(monai.inferers.sliding_window_inference("
                   "net.pad_min(x, @roi_size), @roi_size, @sw_batch_size, "
                   "@window_fn(net, noise, seed, net.sample_context(x)), overlap=@overlap, mode=@blend), "
                   "x.shape[2:]).reshape(x.shape[0], @num_samples, @num_classes, *x.shape[2:])",
        "slides": "$lambda x: len(@roi_size) > 0 and any(s > r for s, r in zip(x.shape[2:], @roi_size))",
        "sample_case": "$lambda x, net, case: @windows(x, net, @case_noise(case), @case_seed(case)) "
                       "if @slides(x) else net(x, noise=@case_noise(case), generator=@generator(@case_seed(case)), "
                       "num_samples=@num_samples)",
        # batch_size 1: the evaluator hands the case id of the batch's one image
        "inferer": "$lambda inputs, network, cases=None: @sample_case(inputs, network, cases[0] if cases else '')",
        "prepare_batch": {"_target_": "PrepareBatchExtraInput", "extra_keys": ["case"]},
        "postprocessing": {"_target_": "Compose", "transforms": [
            # pred (S, C, *spatial) logits -> samples (S, *spatial), probability and entropy (1, *spatial)
            {"_target_": "Lambda", "func": "$lambda d: dict(d, "
                                           "samples=monai.data.MetaTensor(d['pred'].argmax(1).to(torch.uint8), "
                                           "meta=d['image'].meta), "
                                           "mean=torch.softmax(d['pred'].float(), 1).mean(0))"},
            {"_target_": "Lambda", "func": "$lambda d: dict(d, "
                                           "probability=monai.data.MetaTensor((1.0 - d['mean'][:1]), "
                                           "meta=d['image'].meta), "
                                           "entropy=monai.data.MetaTensor(-(d['mean'] * torch.log(d['mean']"
                                           ".clamp(min=1e-12))).sum(0, keepdim=True), meta=d['image'].meta))"},
            {**save, "keys": "samples", "output_postfix": "samples", "output_dtype": "$numpy.uint8"},
            {**save, "keys": "probability", "output_postfix": "probability", "output_dtype": "$numpy.float32"},
            {**save, "keys": "entropy", "output_postfix": "entropy", "output_dtype": "$numpy.float32"},
        ]},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "prepare_batch": "@prepare_batch",
                      "postprocessing": "@postprocessing", "amp": False},
        "initialize": ["$torch.set_grad_enabled(False)"],
        "run": ["$@evaluator.run()"],
    }
    cfg["imports"].append("$import numpy")
    return cfg


# ----------------------------------------------------------------------------- model card


_SHARED_KEYS = ("name", "spatial_dims", "in_channels", "num_classes", "features", "convs_per_level", "norm", "init")


def model_card_keys(cfg) -> str:
    """The ``model.*`` keys that describe the config's model: the shared ones, then those its spec shows
    on the card (the config holds every model's keys)."""
    from ..models.registry import model_name, model_spec

    m = cfg.to_dict()["model"]
    spec = model_spec(model_name(cfg.model))
    keys = (*_SHARED_KEYS, *(k.name for k in spec.keys if k.card))
    return ", ".join(f"{k} {m[k]}" for k in keys if k in m)


def _fmt(stat) -> str:
    if not isinstance(stat, dict) or stat.get("mean") is None:
        return "n/a"
    sem = stat.get("sem")
    return f"{stat['mean']:.4f} ± {sem:.4f}" if isinstance(sem, (int, float)) else f"{stat['mean']:.4f}"


def model_card(model, cfg, ckpt: dict, meta: dict, *, num_samples: int, seed: int, roi, summary) -> str:
    """``docs/README.md``: what the model is, what it was trained on, how well it did, and its limits."""
    name, nd = meta["model"], meta["spatial_dims"]
    data, train = cfg.data, cfg.train
    split = data.split
    lines = [
        f"# probunet {name} ({nd}D): model card",
        "",
        f"Exported by probunet {__version__} from `{Path(str(ckpt.get('path'))).name}` "
        f"(training step {ckpt.get('step')}, checkpoint digest `{str(ckpt.get('digest'))[:16]}…`).",
        "",
        "## What it does",
        "",
        f"For an image it draws {num_samples} segmentation samples ({meta['num_classes']} classes, background "
        f"included), each a plausible annotation, and from them the mean probability and the predictive entropy. "
        f"The spread of the samples is the model's estimate of how much annotators disagree.",
        "",
        "## Input contract",
        "",
        f"- `image` ({meta['in_channels']} channel(s), {nd}D) after `data.normalize = {data.normalize}`"
        + {"none": " (raw intensities)", "zscore": " (per image and channel: (x - mean) / std)",
           "ct_window": f" (clip to {list(data.ct_window)}, scale to [0, 1])"}.get(data.normalize, "") + ".",
        f"- any spatial size: `models/model.ts` pads to a multiple of {meta['divisor']} with the per-channel "
        f"minimum and crops back; images larger than the window {roi} are sampled with sliding windows "
        f"that share the whole image's noise" + (" and prior" if meta["latent_dim"] else "") + ".",
        f"- noise: " + ("the latent draws eps (S, latent_dim = " + str(meta["latent_dim"]) + "), "
                        "z = mu + sigma * eps" if meta["latent_dim"] else
                        "a torch.Generator; the model draws its own noise from it in a fixed order")
        + f"; seed {seed}.",
        "",
        "## Training data and split",
        "",
        f"- data: {_data_source(data)}",
        f"- split: protocol `{split.protocol}`, seed {split.seed}, test fraction {split.test_fraction}, "
        f"validation fraction {split.val_fraction}" + (f", file {split.file}" if split.file else ""),
        f"- training patch: {meta.get('training_patch')}; augmentation: "
        f"{'on' if data.augment.enabled else 'off'}",
        "",
        "## Budget",
        "",
        f"- {train.steps} steps planned, {ckpt.get('step')} done; batch size {train.batch_size}, learning rate "
        f"{train.lr} ({train.lr_schedule}), seed {train.seed}, rater choice `{train.rater}`",
        f"- model: {model_card_keys(cfg)}",
        "",
        "## Evaluation",
        "",
    ]
    if summary:
        m = summary.get("metrics", {})
        conv = summary.get("conventions", {})
        desc = summary.get("descriptions", {})
        lines += [f"From `{summary.get('_path')}`: {summary.get('num_cases')} {summary.get('split')} cases, "
                  f"{summary.get('num_samples')} samples per image, seed {summary.get('seed')}; mean ± standard "
                  f"error over cases.", "", "| metric | value | meaning |", "|---|---|---|"]
        for key in ("ged", "hm_iou", "sample_diversity", "reference_diversity", "ged_cross", "consensus_dice",
                    "ece", "qubiq", "empty_gap"):
            if key in m:
                meaning = str(desc.get(key, "")).replace("|", "\\|")  # a bar would end the table cell
                lines.append(f"| {key} | {_fmt(m[key])} | {meaning} |")
        lines += ["", "Conventions:", ""]
        for key in ("distance", "empty_iou", "ged_pairs", "hm_iou", "calibration"):
            if key in conv:
                lines.append(f"- {key}: {conv[key]}")
        if conv.get("line"):
            lines += ["", conv["line"]]
        truth = summary.get("truth")
        if truth:
            t = truth.get("metrics", {})
            lines += ["", f"Against the true rater distribution (synthetic data): GED {_fmt(t.get('ged_true'))}, "
                          f"HM-IoU {_fmt(t.get('hm_iou_true'))}."]
    else:
        lines.append("No evaluation summary was found next to the run (`RUN/eval/summary.json`); run "
                     "`probunet evaluate RUN` and export again, or pass `--evaluation SUMMARY_JSON`.")
    lines += _calibration_card(meta.get("calibration"), num_samples)
    lines += [
        "",
        "## Limitations",
        "",
        "- Research model, not a medical device; not for clinical decisions.",
        "- It has seen only the data above: other scanners, protocols, resolutions or intensity ranges are out "
        "of distribution, and the samples' spread is then not a calibrated estimate of annotator disagreement.",
        "- The samples reproduce the disagreement of the training raters, not the truth; a model whose samples "
        "barely differ has collapsed to one annotation (see `sample_diversity` against `reference_diversity`).",
        f"- The bundle equals `probunet predict` on the same images and seed (float tolerance); it reads NIfTI "
        f"only, one image per batch.",
        "",
        "## Run",
        "",
        "```",
        "python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\",
        "    --dataset_dir IMAGES --output_dir OUT",
        "```",
        "",
        "Writes `OUT/<case>/<case>_samples.nii.gz` (the samples on the last axis), `<case>_probability.nii.gz` "
        "and `<case>_entropy.nii.gz`.",
        "",
    ]
    return "\n".join(lines)


def _calibration_card(cal: Optional[dict], num_samples: int) -> list[str]:
    """The model card's section on the calibrated region (``probunet calibrate``), empty without one."""
    if not cal:
        return []
    lines = ["", "## Calibrated region", "",
             f"Calibrated with `probunet calibrate` (conformal risk control, risk `{cal['risk']}`, alpha "
             f"{cal['alpha']:g}) on {cal['n']} {cal['split']} cases never trained on: lambda = {cal['lambda']:.4f}. "
             f"The region is {cal['region']}.", "",
             f"- Guarantee: {cal['guarantee']}.",
             f"- Assumption: {cal['assumption']}. Other scanners, protocols or populations void it.",
             "- It is marginal over cases (an average over new cases), not a promise for any single case.",
             f"- Multi-class models: {cal.get('class_mode')}."]
    if int(cal["num_samples"]) != int(num_samples):
        lines.append(f"- This export draws {num_samples} samples per image, the calibration used "
                     f"{cal['num_samples']}: export with `--num-samples {cal['num_samples']}` to apply it.")
    return lines


# ----------------------------------------------------------------------------- writer


def write_bundle(model, cfg, ckpt: dict, out: Path, meta: dict, *, num_samples: int, seed: int = 0,
                 roi_size="config", overlap: float = 0.25, blend: str = "gaussian", source: Optional[Path] = None,
                 evaluation=None) -> dict:
    """Write the bundle's configs, model card and licence into ``out`` (the caller writes
    ``models/model.ts``, see :func:`probunet.export.export_model`); ``meta`` is the export's metadata
    (:func:`probunet.export.export_metadata`). Returns {path: size in bytes} of every file written."""
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    if not 0 <= float(overlap) < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = _roi(roi_size, cfg, int(model.spatial_dims), int(model.divisor))
    summary = _evaluation(Path(source) if source is not None else Path(str(ckpt.get("path"))), evaluation)
    out = Path(out)
    files = {}
    texts = {
        "configs/metadata.json": json.dumps(metadata(model, cfg, ckpt, meta, num_samples=num_samples, seed=seed,
                                                     roi=roi, summary=summary), indent=2, default=str) + "\n",
        "configs/inference.json": json.dumps(inference_config(
            meta, num_samples=num_samples, seed=seed, roi=roi, overlap=overlap, blend=blend,
            normalize=str(cfg.data.normalize), ct_window=list(cfg.data.ct_window)), indent=2) + "\n",
        "docs/README.md": model_card(model, cfg, ckpt, meta, num_samples=num_samples, seed=seed, roi=roi,
                                     summary=summary),
        "LICENSE": "The code of this bundle (configs) is Apache-2.0, as probunet. The weights in models/ were "
                   "trained on the data named in docs/README.md and follow that data's terms.\n",
    }
    for rel, text in texts.items():
        p = atomic_write_text(out / rel, text)
        files[str(p)] = p.stat().st_size
    logger.info("bundle written to %s (%d files)", out, len(files))
    return files


__all__ = ["METADATA_SCHEMA", "REQUIRED_METADATA_KEYS", "REQUIRED_TENSOR_KEYS", "inference_config", "metadata",
           "model_card", "write_bundle"]
