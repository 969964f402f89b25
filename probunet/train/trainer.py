"""Training: ``fit(cfg, run_dir)`` with mixed precision, checkpoints and exact resume.

``fit`` reads as its steps: set up (:class:`Trainer`), then per step
``train_step``, ``log``, ``validate``, ``checkpoint``, and ``finish``. Each
concern lives in its own module:

- the batches of each step: :mod:`probunet.data.stream` (deterministic, resumable);
- the loss: the model's ``training_loss`` (:mod:`probunet.models.base`), wrapped in
  ``LossForward`` for DDP and ``torch.compile``; the step: :mod:`probunet.train.step`;
- the NaN guard: :class:`probunet.train.nonfinite.NonFiniteGuard`;
- precision: :mod:`probunet.precision` (``train.amp``); validation samples through
  :mod:`probunet.inference` as ``evaluate`` does (:mod:`probunet.evaluation.validation`);
- checkpoints: :mod:`probunet.models.checkpoint`; the run directory and metrics log:
  :mod:`probunet.runtime.rundir`; several processes: :mod:`probunet.runtime.distributed`.

Determinism: the batch of step ``k`` (cases, raters, augmentation) and the
model's random draws at step ``k`` depend only on ``train.seed``, ``k`` (and the
rank under DDP), so a run resumed from a checkpoint ends exactly where an
uninterrupted run would.

Speed: the step has no host-device synchronisation. Non-finite steps are
detected on the device (loss and gradient norm), skipped inside the fused Adam
kernel (``found_inf``), and counted on the device; the host looks at the count
every few steps (``train.log_every`` / ``train.max_bad_steps``). Batches come
from cached arrays, pinned and copied asynchronously (or from DataLoader
workers with ``data.num_workers``).

Several processes: under ``torchrun`` (``WORLD_SIZE`` > 1) ``fit`` starts the
process group itself (NCCL on GPUs, gloo on CPUs), wraps the loss in
DistributedDataParallel, gives each rank its shard of every epoch
(DistributedSampler), reduces the logged and validation metrics across ranks,
and lets rank 0 alone write files. Resume reads the checkpoint on rank 0 and
broadcasts it, so nodes need not share a file system for it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..models.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_model, save_checkpoint
from ..models.collapse import CollapseMonitor
from ..config import Config, save_config
from ..data import MultiRaterDataset, load_splits, train_transform
from ..data.recorded_split import CHECKPOINT_KEY as SPLIT_KEY, read_recorded_split, split_record_text
from ..data.stream import BatchStream, batches, step_seed
from ..runtime.distributed import (all_reduce, broadcast_from_main, destroy_distributed, dist_info,
                          init_distributed, rank_device, replica_digests)
from ..models import LossForward, build_model
from ..models.registry import DEFAULT_MODEL
from ..models.unet import to_channels_last
from .nonfinite import NonFiniteGuard, TrainingError
from ..precision import (Precision, amp_dtype, autocast, cpu_description, guard_bf16_convs, memory_format,
                        uses_channels_last)
from ..runtime.rundir import RUN_MARKER, MetricsLog, claim_run_dir
from .step import backward_and_step, fused_adam_ok, lr_at
from ..utils import atomic_write_text, resolve_device
from ..evaluation.validation import batch_diversity, validate
from .ema import WeightAverage
from ..guards import WriteError, check_free_space

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- RNG state (exact resume)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(obj):
    if isinstance(obj, tuple):
        return [_to_lists(o) for o in obj]
    return obj


def _to_tuples(obj):
    if isinstance(obj, list):
        return tuple(_to_tuples(o) for o in obj)
    return obj


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def batch_memory_bytes(loss_module, image_shape, num_raters: int, batch_size: int, device, dtype,
                       channels_last: bool = False) -> tuple[int, int]:
    """An estimate of the memory one training step at ``batch_size`` holds beyond the model's weights:
    ``(bytes, bytes per item)``.

    Measured, not guessed: one forward of ``loss_module`` (``LossForward``) on a batch of two zero
    images of ``image_shape (C, *spatial)`` records every tensor autograd saves for the backward pass
    (shared storages once, the parameters left out); the per-item figure is half of it. The backward
    pass allocates gradients of those activations while some are still held, so half is added
    (measured on CPU at 64x64 for the zoo's models: 0% to 20% above the step's peak; for the tiny
    debug model 20% under it), and each item's data is held twice (the gathered batch and its copy on the device): image
    float32, the raters' labels one byte each. The probe runs on a copy of the model (batch-norm
    statistics, GECO state and the random state are left as they were).
    """
    import copy

    probe = copy.deepcopy(loss_module)
    params = {p.untyped_storage().data_ptr() for p in probe.parameters()}
    seen: set = set()
    saved = [0]

    def pack(t):
        if isinstance(t, torch.Tensor):
            try:
                ptr = t.untyped_storage().data_ptr()
                size = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a wrapper)
                ptr, size = id(t), t.numel() * t.element_size()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                saved[0] += int(size)
        return t

    n = 2
    image = torch.zeros((n, *image_shape), device=device)
    if channels_last:
        image = to_channels_last(image)
    labels = torch.zeros((n, int(num_raters), *image_shape[1:]), dtype=torch.uint8, device=device)
    raters = torch.full((n,), int(num_raters), dtype=torch.long)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(device, dtype):
            terms = probe(image, labels, step=0, num_raters=raters, generator=torch.Generator().manual_seed(0))
    del terms, probe, image, labels
    data = int(np.prod(image_shape)) * 4 + int(num_raters) * int(np.prod(image_shape[1:]))
    per_item = saved[0] * 3 // (2 * n) + 2 * data
    return int(batch_size) * per_item, per_item


def checkpoint_bytes(params) -> int:
    """A checkpoint's size, estimated from the trained parameters: the weights, Adam's two moments,
    the averaged weights (at most), and 64 KB for the rest."""
    return 4 * sum(int(p.numel()) * p.element_size() for p in params) + (1 << 16)


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor of ``optimizer`` (Adam's moments) its parameter's memory
    layout. Checkpoints hold the standard layout, and the fused Adam kernel walks a parameter, its
    gradient and its moments as flat memory: a channels-last parameter with standard-layout moments
    would be updated with the wrong moments."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    moved = torch.empty_like(p, dtype=v.dtype)  # the parameter's strides
                    moved.copy_(v)
                    state[k] = moved


# ----------------------------------------------------------------------------- fit


def fit(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = False) -> dict:
    """Train the model of ``cfg`` (``model.name``) and write everything into ``run_dir``.

    ``RUN_DIR/config.yaml`` (resolved), ``RUN_DIR/splits.json``,
    ``RUN_DIR/metrics.jsonl``, TensorBoard events, ``RUN_DIR/checkpoints/last.pt``
    and ``best.pt`` (lowest validation GED). Returns a summary dict.

    Under torchrun it runs data-parallel (see the module notes); only rank 0
    writes, and every rank returns the summary.
    """
    started = init_distributed(cfg.train.device)
    trainer = None
    try:
        trainer = Trainer(cfg, Path(run_dir), resume=resume, progress=progress)
        for step, image, labels, num_raters in trainer.batches():
            done = trainer.train_step(step, image, labels, num_raters)
            if trainer.due(done, trainer.check_every):
                trainer.guard.check(done)
            if trainer.due(done, cfg.train.log_every):
                trainer.log(done)
            if trainer.val_items and trainer.due(done, cfg.train.val_every):
                trainer.validate(done)
            if trainer.due(done, cfg.train.checkpoint_every):
                trainer.checkpoint("last.pt", done)
            trainer.tick()
        return trainer.finish()
    finally:
        if trainer is not None:
            trainer.close()
            if trainer.dist.world_size > 1:
                del trainer
                gc.collect()  # the DDP reducers sat in reference cycles: free them before the group goes
        if started:
            destroy_distributed()


class Trainer:
    """The state of one training run and its named steps (see :func:`fit`).

    Construction claims the run directory (rank 0), loads the checkpoint to
    resume from, reads the splits, builds the model through the registry (with
    the loss settings of ``cfg.train``), the optimizer, the scaler, DDP and
    ``torch.compile`` wrappers, the metrics log and the NaN guard.
    """

    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool, progress: bool):
        self.cfg, self.run_dir = cfg, run_dir
        self.lock = self.bar = self.metrics = None
        try:
            self._setup(resume, progress)
        except BaseException:
            self.close()  # the run directory's lock is released on any failure
            raise

    def _setup(self, resume: bool, progress: bool) -> None:
        cfg, run_dir = self.cfg, self.run_dir
        self.dist = dist = dist_info()
        self.last_path = run_dir / "checkpoints" / "last.pt"
        self.device = device = rank_device(resolve_device(cfg.train.device), dist)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)
        ckpt = broadcast_from_main(lambda: self._claim(resume), dist)
        self.dtype = amp_dtype(cfg.train.amp, device)
        torch.manual_seed(cfg.train.seed)

        self.splits = self._load_splits(ckpt)
        self.config_comment = self._kept_comment(cfg) if ckpt is not None else ""
        if cfg.data.patch_size is not None and cfg.data.spacing == "median":
            cfg = self.cfg = self._resolve_median_spacing(cfg)
        self.geco_goal = None
        if cfg.train.geco.enabled and cfg.train.geco.goal == "auto" and self.splits["train"]:
            cfg = self.cfg = self._resolve_geco_goal(cfg)
        if not self.splits["train"]:
            raise ValueError("the training split is empty: add data or lower data.split.test_fraction/val_fraction")
        transform = train_transform(cfg.data, cfg.model.spatial_dims)
        if cfg.data.patch_size is not None:  # whole scans: patches from the memory-mapped cache
            from ..data.patches import PatchStream

            self.stream = PatchStream(self.splits["train"], cfg.data.patch_size, cfg.train.batch_size,
                                      cfg.train.seed, dist, foreground_oversample=cfg.data.foreground_oversample,
                                      transform=transform)
        else:
            self.stream = BatchStream(MultiRaterDataset(self.splits["train"]), cfg.train.batch_size,
                                      cfg.train.seed, dist, transform)
        self.val_items = self.splits["val"][: cfg.train.val_cases]

        # channels-last (channels-last-3d in 3D) with bf16, CPU and GPU (oneDNN's AMX and cuDNN's bf16
        # convolutions run fastest in it), and for 2D models on a GPU (~1.3x with cuDNN)
        self.model = model = build_model(cfg.model, cfg.train).to(device)
        self.dtype = guard_bf16_convs(model, self.dtype, cfg.train.amp, device, "train.amp")
        self.channels_last = uses_channels_last(self.dtype, cfg.train.channels_last, device_type=device.type,
                                                spatial_dims=cfg.model.spatial_dims)
        self.precision = Precision(self.dtype, self.channels_last,
                                   cpu_description() if device.type == "cpu" else "")
        if dist.is_main:
            logger.info("precision: %s (train.amp %s on %s%s)", self.precision.label, cfg.train.amp, device,
                        f", CPU {self.precision.cpu}" if self.precision.cpu else "")
        if self.channels_last:
            model.to(memory_format=memory_format(cfg.model.spatial_dims))
        # GECO's state (lambda, moving average) is the trainer's to move and save (see LossSettings)
        self.geco = getattr(getattr(model, "loss_settings", None), "geco", None)
        if self.geco is not None:
            self.geco.to(device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # the average of the weights (train.ema_decay): validated, sampled and saved as "model"
        self.ema = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                          fused=fused_adam_ok(device) or None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        if dist.is_main:  # room for the checkpoints before the first step (a full disk is one line now)
            copies = 1 if ckpt is not None else 3  # last.pt, best.pt and the temporary file of a write
            check_free_space(run_dir / "checkpoints", copies * checkpoint_bytes(self.params),
                             f"{'a checkpoint' if copies == 1 else 'last.pt, best.pt and a temporary file'}")
        self.start_step, self.best = 0, math.inf
        self.saved = {"last.pt": None}
        if ckpt is not None:
            self._resume_from(ckpt)
        self._check_batch_memory()
        self._wrap_for_training()

        self.metrics = MetricsLog(run_dir, enabled=dist.is_main, resumed_step=self.start_step)
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml", comment=self.config_comment)
        self.guard = NonFiniteGuard(device, cfg.train.max_bad_steps, self.params, model.state_dict, self._kept)
        self.check_every = max(1, min(cfg.train.log_every, cfg.train.max_bad_steps))
        self.collapse = CollapseMonitor()
        self.last_val: dict = {}
        self._zero = torch.zeros((), device=device)
        self._reset_sums()
        self._last_image = None
        self.bar = None
        if progress and dist.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=self.start_step, desc="train", unit="step",
                            dynamic_ncols=True)
        model.train()

    # -- set-up helpers

    def _claim(self, resume: bool):
        self.lock = claim_run_dir(self.run_dir, resume)
        if not resume:
            return None
        ckpt = load_checkpoint(self.last_path, map_location="cpu")
        # the split fixed when the run started (checked here, on rank 0, and sent to every rank)
        ckpt["_recorded_split"] = read_recorded_split(self.run_dir, ckpt)
        return ckpt

    def _load_splits(self, ckpt) -> dict:
        """A new run splits the data and writes ``splits.json``; a resumed run keeps its recorded
        split (new cases left out, missing ones an error) and never rewrites the file."""
        record, where = (ckpt or {}).get("_recorded_split") or (None, "")
        main = self.dist.is_main
        if ckpt is not None and record is None:
            logger.warning("%s: no recorded split (a run from before probunet kept one); the data is split again "
                           "by data.split", self.run_dir)
        splits = load_splits(self.cfg, self.run_dir if main and record is None else None, recorded=record,
                             recorded_from=where, hint=False)
        self.split_text = split_record_text(splits)
        return splits

    def _resolve_median_spacing(self, cfg: Config) -> Config:
        """A copy of ``cfg`` whose ``data.spacing: median`` is the numbers the preprocessed cache
        resolved it to (its ``index.json``), so that the run's ``config.yaml`` and checkpoints hold the
        spacing its model was trained at: what evaluate, predict and export of the run use."""
        import copy

        from ..data.preprocess import resolved_spacing

        spacing = resolved_spacing(cfg)
        cfg = copy.deepcopy(cfg)
        cfg.data.spacing = tuple(spacing)
        self.config_comment = (f"data.spacing was \"median\" in the config given to probunet train: the cases' "
                               f"per-axis median,\nresolved when the preprocessed cache was built to "
                               f"{[round(v, 6) for v in spacing]} mm.")
        logger.info("data.spacing: median resolved to %s mm (written into the run's config)", list(spacing))
        return cfg

    def _resolve_geco_goal(self, cfg: Config) -> Config:
        """A copy of ``cfg`` whose ``train.geco.goal: auto`` is the number it resolves to on this run's
        training split (:func:`probunet.models.losses.resolve_geco_goal`): written into the run's
        ``config.yaml`` (with a comment) and ``train_summary.json`` (``geco_goal``)."""
        import copy

        from ..data import real_raters
        from ..models.losses import resolve_geco_goal

        g = cfg.train.geco
        goal, entropy = resolve_geco_goal(g, (real_raters(i) for i in self.splits["train"]), cfg.model.num_classes)
        cfg = copy.deepcopy(cfg)
        cfg.train.geco.goal = goal
        self.geco_goal = {"goal": goal, "goal_scale": g.goal_scale, "rater_entropy": entropy,
                          "train_cases": len(self.splits["train"])}
        note = (f"train.geco.goal was \"auto\" in the config given to probunet train: goal_scale {g.goal_scale} x "
                f"the mean per-pixel\nentropy of the raters' label frequency over the {len(self.splits['train'])} "
                f"training cases ({entropy:.6g} nats) = {goal:.6g}.")
        self.config_comment = "\n".join(c for c in (self.config_comment, note) if c)
        logger.info("train.geco.goal: auto resolved to %.6g (goal_scale %g x rater entropy %.6g nats over %d "
                    "training cases)", goal, g.goal_scale, entropy, len(self.splits["train"]))
        return cfg

    def _kept_comment(self, cfg: Config) -> str:
        """The comment on a resolved ``median`` spacing at the top of a resumed run's ``config.yaml``,
        kept when the run resumes with the numbers it holds (e.g. from that file): the note of the
        original setting is not lost."""
        import yaml

        try:
            text = (self.run_dir / "config.yaml").read_text(encoding="utf-8")
            spacing = (yaml.safe_load(text) or {}).get("data", {}).get("spacing")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            return ""
        lines = []
        for line in text.splitlines():
            if not line.startswith("# "):
                break
            lines.append(line[2:])
        now = cfg.data.spacing
        if not lines or not lines[0].startswith("data.spacing was") or not isinstance(spacing, list) \
                or not isinstance(now, tuple) or [float(v) for v in spacing] != [float(v) for v in now]:
            return ""
        return "\n".join(lines)

    def _resume_from(self, ckpt: dict) -> None:
        stored = {"name": DEFAULT_MODEL, **ckpt["config"]["model"]}  # checkpoints from before model.name
        if stored != self.cfg.to_dict()["model"]:
            raise ValueError(f"--resume: the model section of the config differs from {self.last_path}'s")
        self.model.load_state_dict(ckpt.get("model_train") or ckpt["model"])
        if self.ema is not None:
            if ckpt.get("model_train") is not None:
                self.ema.load(ckpt["model"], int(ckpt.get("ema_updates", 0)))
            else:  # a checkpoint written without an average: start it from the weights
                self.ema = WeightAverage(self.model, self.cfg.train.ema_decay)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        match_param_layout(self.optimizer)  # checkpoints hold the standard layout; the model may not
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.geco is not None and ckpt.get("geco"):
            self.geco.load_state_dict(ckpt["geco"])
        self.start_step, self.best = int(ckpt["step"]), float(ckpt.get("best_metric", math.inf))
        self.saved["last.pt"] = self.start_step
        _set_rng_state(ckpt["rng"])
        logger.info("resumed %s at step %d", self.last_path, self.start_step)

    def _check_batch_memory(self) -> None:
        """Refuse a ``train.batch_size`` whose step would not fit the memory available, before any
        batch is gathered (:func:`batch_memory_bytes`; batches of 1 or 2 are not probed: the probe
        would cost as much as the step)."""
        from .. import guards

        batch = int(self.cfg.train.batch_size)
        if batch <= 2:
            return
        first = self.splits["train"][0]
        channels, raters = int(np.shape(first["image"])[0]), int(np.shape(first["labels"])[0])
        patch = getattr(self.stream, "patch", None)
        spatial = tuple(int(s) for s in (patch if patch is not None else np.shape(first["image"])[1:]))
        need, per_item = batch_memory_bytes(LossForward(self.model), (channels, *spatial), raters, batch,
                                            self.device, self.dtype, self.channels_last)
        have = guards.available_memory(self.device)
        if have is not None and need > have:
            size = "x".join(str(s) for s in spatial)
            raise ValueError(f"train.batch_size {batch} needs about {guards.size_text(need)} of memory for a training "
                             f"step ({guards.size_text(per_item)} per {size} item: activations and data), "
                             f"{guards.size_text(have)} are available; lower train.batch_size (at most "
                             f"{max(1, have // max(1, per_item))} fits)")

    def _wrap_for_training(self) -> None:
        """``LossForward(model)``, in DDP under torchrun, then ``torch.compile`` when asked."""
        self.loss_module = LossForward(self.model)
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            dev = self.device
            self.loss_module = DDP(self.loss_module, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.eager_loss = self.loss_module
        if self.cfg.train.compile:
            try:
                self.loss_module = torch.compile(self.loss_module, mode=self.cfg.train.compile_mode)
            except Exception as exc:  # compile is an optimisation: never fatal
                logger.warning("torch.compile failed (%s); training without it", exc)
        self.compiled_first = self.cfg.train.compile and self.loss_module is not self.eager_loss

    def _kept(self) -> str:
        if self.saved["last.pt"] is None:
            return "no checkpoint was written"
        return f"the last good checkpoint stays: {self.last_path} (step {self.saved['last.pt']})"

    def _reset_sums(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.good_steps, self.images_seen, self.t0 = self._zero.clone(), 0, time.perf_counter()

    # -- the named steps

    def batches(self):
        """(step, image, labels, num_raters) from the resumed step to ``train.steps``."""
        return batches(self.stream, self.start_step, self.cfg.train.steps, self.device, self.cfg.data.num_workers)

    def due(self, done: int, every: int) -> bool:
        return done % every == 0 or done == self.cfg.train.steps

    def train_step(self, step: int, image: torch.Tensor, labels: torch.Tensor, num_raters: torch.Tensor) -> int:
        """One optimizer step on the model's ``training_loss``; the bookkeeping stays on the device.
        Returns the number of steps done."""
        if self.channels_last:
            image = to_channels_last(image)  # (channels-last-3d for a 5D batch)
        try:
            terms, bad = self._loss_and_step(step, image, labels, num_raters)
        except Exception as exc:
            if not self.compiled_first:
                raise
            # torch.compile compiles lazily, at the first step: fall back to eager and redo the step
            logger.warning("torch.compile failed at the first step (%s: %s); training without it",
                           exc.__class__.__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            self.loss_module, self.compiled_first = self.eager_loss, False
            if self._geco_before is not None:
                self.geco.load_state_dict(self._geco_before)
            terms, bad = self._loss_and_step(step, image, labels, num_raters)
        self.compiled_first = False
        zero = self._zero
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, zero) + torch.where(bad, zero, v.detach().float())
        self.good_steps = self.good_steps + (1.0 - bad.float())
        self.images_seen += image.shape[0]
        self.guard.record(bad, step)
        if self.ema is not None:
            self.ema.update(self.model)
        self._last_image = image
        return step + 1

    def _loss_and_step(self, step, image, labels, num_raters):
        self._geco_before = ({k: v.clone() for k, v in self.geco.state_dict().items()}
                             if self.compiled_first and self.geco is not None else None)
        torch.manual_seed(step_seed(self.cfg.train.seed, step, self.dist.rank))
        with autocast(self.device, self.dtype):
            terms = self.loss_module(image, labels, step=step, num_raters=num_raters,
                                     generator=self.stream.rater_generator(step))
        t = self.cfg.train
        lr = lr_at(step, t.steps, t.lr, t.lr_schedule, t.lr_final_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        bad = backward_and_step(terms["loss"], self.optimizer, self.scaler, self.params,
                                grad_clip=self.cfg.train.grad_clip, dist=self.dist)
        return terms, bad

    def log(self, done: int) -> None:
        """Mean loss terms since the last log (reduced over ranks), speed, sample diversity, collapse check."""
        keys = sorted(self.sums)
        packed = torch.stack([self.sums[k] for k in keys] + [self.good_steps]).double()
        values = all_reduce(packed, self.dist).tolist()
        n = values[-1]
        record = {"step": done, **{f"train_{k}": (v / n if n else None) for k, v in zip(keys, values)}}
        beta_at = getattr(self.model, "beta_at", None)
        if beta_at is not None:
            record["beta"] = beta_at(done - 1)
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["images_per_s"] = self.images_seen * self.dist.world_size / (time.perf_counter() - self.t0)
        if self.dist.is_main:
            record["train_sample_diversity"] = batch_diversity(
                self.model, self._last_image[:4], self.cfg.model.num_classes, self.device, seed=self.cfg.train.seed)
            warning = self.collapse.update(done, record.get("train_kl"), record.get("train_sample_diversity"))
            if warning:
                logger.warning(warning)
        self._reset_sums()
        self.metrics.write(record)
        if self.bar is not None and record.get("train_loss") is not None:
            shown = {"loss": ("train_loss", ".1f"), "ce": ("train_ce_mean", ".3f"), "kl": ("train_kl", ".2f"),
                     "div": ("train_sample_diversity", ".2f")}
            self.bar.set_postfix({k: format(record[key], fmt) for k, (key, fmt) in shown.items()
                                  if record.get(key) is not None})

    def sampling_weights(self):
        """A ``with`` block in which the model holds the weights that are sampled and saved
        (the average with ``train.ema_decay``, else the trained weights)."""
        return self.ema.applied(self.model) if self.ema is not None else nullcontext(self.model)

    def validate(self, done: int) -> None:
        """Validation GED (the samples ``evaluate`` draws); a new best is saved as ``best.pt``."""
        with self.sampling_weights():
            self.last_val = validate(self.model, self.val_items, self.cfg, self.device, self.dist)
        self.model.train()
        self.metrics.write({"step": done, **self.last_val})
        if self.last_val["val_ged"] < self.best:
            self.best = self.last_val["val_ged"]
            self.checkpoint("best.pt", done)

    def checkpoint(self, name: str, step: int) -> None:
        """Write ``checkpoints/NAME`` atomically (rank 0); a non-finite state is never written."""
        if not self.dist.is_main:
            return
        geco, ema = self.geco, self.ema
        extra = {} if ema is None else {"model_train": self.model.state_dict(), "ema_updates": ema.updates}
        try:
            save_checkpoint({
                "format": CHECKPOINT_FORMAT, "probunet_version": __version__,
                "model": ema.state_dict() if ema is not None else self.model.state_dict(), **extra,
                "config": self.cfg.to_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "geco": geco.state_dict() if geco is not None else None,
                "step": step, "best_metric": self.best, "rng": _rng_state(), SPLIT_KEY: self.split_text,
            }, self.run_dir / "checkpoints" / name)
        except (CheckpointError, WriteError) as exc:
            raise TrainingError(f"step {step}: {exc}; training stopped, {self._kept()}") from None
        self.saved[name] = step

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def finish(self) -> dict:
        """Replica check (DDP), the samples figure, ``train_summary.json``; returns the summary."""
        cfg, dist = self.cfg, self.dist
        self.close(keep_lock=True)  # the run directory stays locked until the summary is written
        replicas = None
        if dist.world_size > 1:
            replicas = replica_digests(self.model, dist)
            if len(set(replicas)) != 1:
                raise TrainingError(f"the {dist.world_size} DDP replicas hold different weights after training "
                                    f"(SHA-256 per rank: {', '.join(d[:12] for d in replicas)})")
        figure = None
        show = (self.splits["test"] or self.splits["val"] or self.splits["train"])[:4]
        if cfg.data.patch_size is not None:  # whole scans: a patch around each case's lesions
            from ..data.patches import foreground_crops

            show = foreground_crops(show, cfg.data.patch_size)
        if dist.is_main and show and len({i["image"].shape for i in show}) == 1:
            from ..evaluation.viz import model_figure

            with self.sampling_weights():
                figure = str(model_figure(self.run_dir / "samples.png", self.model, show, seed=cfg.train.seed,
                                          spatial_dims=cfg.model.spatial_dims, device=self.device,
                                          title=f"{self.run_dir.name}: step {cfg.train.steps}, held-out cases"))
        if self.start_step >= cfg.train.steps and dist.is_main:
            logger.info("nothing to do: the checkpoint is already at step %d of %d", self.start_step, cfg.train.steps)
        summary = {"run_dir": str(self.run_dir), "steps": cfg.train.steps, "device": str(self.device),
                   "amp": str(self.dtype).replace("torch.", "") if self.dtype else "off",
                   "precision": self.precision.label, "cpu_capability": self.precision.cpu or None,
                   "best_val_ged": self.best if math.isfinite(self.best) else None, **self.last_val,
                   "last_checkpoint": str(self.last_path), "figure": figure, "world_size": dist.world_size,
                   "collapse": self.collapse.report()}
        if self.geco_goal is not None:
            summary["geco_goal"] = self.geco_goal
        if replicas is not None:
            summary["replica_weights_sha256"] = replicas
        if dist.is_main:
            atomic_write_text(self.run_dir / "train_summary.json", json.dumps(summary, indent=1))
        return summary

    def close(self, keep_lock: bool = False) -> None:
        """Close the progress bar and the log, release the run directory's lock, drop the
        training wrappers (idempotent).

        Under torchrun the DDP wrapper's reducer holds the process group; dropped here (and
        the cycles it sat in collected by :func:`fit`), it goes while the group and the
        interpreter are alive, not at interpreter exit, where gloo's threads were seen to
        abort a finished run now and then (``terminate called without an active exception``).
        """
        self.loss_module = self.eager_loss = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None and not keep_lock:
            self.lock.release()
            self.lock = None


__all__ = ["RUN_MARKER", "Trainer", "TrainingError", "fit", "load_checkpoint", "load_model"]
