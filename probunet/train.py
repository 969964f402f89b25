"""Training: ``fit(cfg, run_dir)`` with mixed precision, checkpoints and exact resume.

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
process group itself (NCCL on GPUs, gloo on CPUs), wraps the model in
DistributedDataParallel, gives each rank its shard of every epoch
(DistributedSampler), reduces the logged and validation metrics across ranks,
and lets rank 0 alone write files. Resume reads the checkpoint on rank 0 and
broadcasts it, so nodes need not share a file system for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from . import __version__
from .collapse import CollapseMonitor
from .config import Config, save_config
from .data import MultiRaterDataset, load_splits, real_raters, train_transform
from .losses import beta_schedule, build_geco, elbo_loss
from .models import build_model
from .models.unet import to_channels_last
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_model, non_finite, save_checkpoint
from .utils import FolderLock, atomic_write_text, remove_stale_temps, resolve_device

logger = logging.getLogger(__name__)

RUN_MARKER = ".probunet-run"  # written first into every run directory: "probunet wrote this folder"


class TrainingError(RuntimeError):
    """Training cannot go on (for example repeated non-finite losses)."""


# ----------------------------------------------------------------------------- checkpoints


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


# ----------------------------------------------------------------------------- helpers


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``train.amp`` on ``device``; None means full fp32."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _step_seed(seed: int, step: int, rank: int = 0) -> int:
    # Rank 0's seeds are those of a single-process run; other ranks get their own.
    return (seed * 1_000_003 + step + rank * 7_919_000_003) % (2**63 - 1)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """This process's place: from the process group when one is running, else from
    torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        return DistInfo()


def init_distributed(device_name: str = "auto") -> bool:
    """Start the default process group when launched by torchrun (``WORLD_SIZE`` > 1).

    NCCL when the run uses CUDA (each process on GPU ``LOCAL_RANK``), gloo on CPU;
    rendezvous from torchrun's environment (``env://``). Returns True when this
    call started it (the caller then destroys it). A script that trains several
    times in one torchrun launch calls this once first: ``fit`` then uses that
    group and leaves it running (a process group started again after being
    destroyed can meet the old one's keys in torchrun's store and hang).
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    device = resolve_device(device_name)
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def _broadcast_from_main(fn: Callable[[], object], dist: DistInfo):
    """Run ``fn`` on rank 0 and hand its result (or its exception) to every rank."""
    if dist.world_size <= 1:
        return fn()
    import torch.distributed as tdist

    box: list = [None]
    if dist.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # every rank raises the same error
            box[0] = ("error", exc)
    tdist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def _all_reduce(t: torch.Tensor, dist: DistInfo, op: str = "sum") -> torch.Tensor:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
    return t


def weights_digest(state_dict: dict) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a state dict's tensors
    (exact: equal only for bitwise-identical weights)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k]
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().cpu().contiguous().reshape(-1)  # logical (C) order, whatever the memory format
        h.update(f"{k}:{tuple(v.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class BatchStream:
    """The training batches as a function of the step.

    Case order per epoch comes from a ``DistributedSampler`` (one replica unless
    running under torchrun) reshuffled each epoch; the rater of each image and the
    augmentation of step ``k`` are seeded by ``(seed, k, rank)``. The whole split
    is cached as two arrays (labels as uint8 where the classes fit); a batch is
    gathered from them, one rater per image picked before the copy.
    """

    def __init__(self, dataset: MultiRaterDataset, batch_size: int, seed: int, rater: str,
                 dist: DistInfo, transform=None):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = dist.rank
        self.rater = rater
        self.transform = transform
        self.sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.per_epoch = len(self.sampler)
        self._epoch = None
        self._order: list[int] = []
        items = dataset.items
        self.images = torch.stack([torch.as_tensor(i["image"]) for i in items]).float()  # (N, C, *spatial)
        real = [real_raters(i) for i in items]  # padded-in raters are never training targets
        num_raters = max(r.shape[0] for r in real)
        labels = torch.stack([torch.as_tensor(_pad_raters(r, num_raters)) for r in real])
        small = labels.numel() == 0 or (int(labels.min()) >= 0 and int(labels.max()) < 256)
        self.labels = labels.to(torch.uint8) if small else labels.long()  # (N, A, *spatial)
        self.num_raters = torch.tensor([r.shape[0] for r in real])  # (N,) real raters per case

    def _indices(self, step: int) -> list[int]:
        out = []
        pos = step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, self.per_epoch)
            if epoch != self._epoch:
                self.sampler.set_epoch(epoch)
                self._order = list(iter(self.sampler))
                self._epoch = epoch
            take = min(self.batch_size - len(out), self.per_epoch - offset)
            out.extend(self._order[offset:offset + take])
            pos += take
        return out

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, C, *spatial) float32, target (B', *spatial) integer labels (uint8 when
        the classes fit, else int64) and the matching images: B' = B (one random rater
        each) or B * A (all raters)."""
        idx = torch.tensor(self._indices(step))
        seed = _step_seed(self.seed, step, self.rank)
        g = torch.Generator().manual_seed(seed)
        if self.transform is not None:
            images, labels = self.images[idx], self.labels[idx].long()  # (B, C, *sp), (B, A, *sp)
            self.transform.set_random_state(seed=seed % (2**32))
            outs = [self.transform({"image": im, "labels": lb}) for im, lb in zip(images, labels)]
            images = torch.stack([torch.as_tensor(o["image"]).float() for o in outs])
            labels = torch.stack([torch.as_tensor(o["labels"]).round().to(self.labels.dtype) for o in outs])
        elif self.rater == "all":
            images, labels = self.images[idx], self.labels[idx]
        else:
            images, labels = self.images[idx], None
        if self.rater == "all":
            a = labels.shape[1]
            images = images.repeat_interleave(a, dim=0)
            target = labels.flatten(0, 1)
            keep = (torch.arange(a).repeat(len(idx)) < self.num_raters[idx].repeat_interleave(a))
            return images[keep], target[keep]
        counts = self.num_raters[idx]
        choice = (torch.rand(len(idx), generator=g) * counts).long()  # uniform among the case's raters
        if labels is None:
            target = self.labels[idx, choice]  # gathers one rater per image only
        else:
            target = labels[torch.arange(len(idx)), choice]
        return images, target


class _StepBatches(torch.utils.data.Dataset):
    """``BatchStream`` as a map-style dataset over steps, for DataLoader workers."""

    def __init__(self, stream: BatchStream, steps: int):
        self.stream, self.steps = stream, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        return self.stream.batch(step)


def _batches(stream: BatchStream, start: int, stop: int, device: torch.device, num_workers: int):
    """(step, image, target) for steps ``start..stop-1``, on ``device``.

    With workers, DataLoader processes build the batches ahead (the batch of a
    step does not depend on which process builds it). On CUDA the batches are
    pinned and copied asynchronously.
    """
    pin = device.type == "cuda"
    if num_workers > 0 and stop > start:
        loader = torch.utils.data.DataLoader(
            _StepBatches(stream, stop), batch_size=None, sampler=range(start, stop), num_workers=num_workers,
            pin_memory=pin, prefetch_factor=4, persistent_workers=False)
        source = zip(range(start, stop), loader)
    else:
        source = ((step, stream.batch(step)) for step in range(start, stop))
    for step, (image, target) in source:
        if pin and not image.is_pinned():
            image, target = image.pin_memory(), target.pin_memory()
        yield step, image.to(device, non_blocking=True), target.to(device, non_blocking=True).long()


def _pad_raters(labels: np.ndarray, num: int) -> np.ndarray:
    if labels.shape[0] == num:
        return labels
    pad = np.zeros((num - labels.shape[0], *labels.shape[1:]), dtype=labels.dtype)
    return np.concatenate([labels, pad])


def validation_ged(model, items: list[dict], cfg: Config, device: torch.device,
                   dtype: Optional[torch.dtype], dist: Optional[DistInfo] = None) -> dict:
    """GED (and sample diversity) on a fixed validation subset, raters as references.

    Under DDP each rank evaluates its share of the batches and the sums are
    reduced, so every rank returns the same numbers; batch ``j`` is sampled with
    its own seed, so they do not depend on the number of ranks.
    """
    from . import metrics

    dist = dist or DistInfo()
    model.eval()
    bs = max(1, cfg.eval.batch_size)
    chunks = [items[i:i + bs] for i in range(0, len(items), bs)]
    groups: list[list[dict]] = []
    for chunk in chunks:
        shapes = {(c["image"].shape, real_raters(c).shape) for c in chunk}
        groups.extend([chunk] if len(shapes) == 1 else [[c] for c in chunk])
    # [GED sum, GED count, diversity sum, diversity count], NaN-aware
    acc = torch.zeros(4, dtype=torch.float64, device=device)
    g = torch.Generator(device=device)
    kw = {"num_classes": cfg.model.num_classes, "empty_iou": cfg.eval.empty_iou}
    for j in range(dist.rank, len(groups), dist.world_size):
        grp = groups[j]
        g.manual_seed(cfg.train.seed + 12345 + j)
        image = torch.stack([torch.as_tensor(c["image"]) for c in grp]).float().to(device)
        refs = torch.stack([torch.as_tensor(real_raters(c)) for c in grp]).to(device)
        with autocast(device, dtype):
            logits = model.sample(image, cfg.train.val_samples, generator=g)
        samples = logits.argmax(dim=2)  # (B, S, *spatial)
        for slot, values in ((0, metrics.generalized_energy_distance(samples, refs, **kw)),
                             (2, metrics.sample_diversity(samples, **kw))):
            values = values.double()
            ok = ~torch.isnan(values)
            acc[slot] += torch.where(ok, values, 0).sum()
            acc[slot + 1] += ok.sum()
    _all_reduce(acc, dist)
    model.train()
    ged, n_ged, div, n_div = acc.tolist()
    return {"val_ged": ged / n_ged if n_ged else float("nan"),
            "val_sample_diversity": div / n_div if n_div else float("nan")}


# ----------------------------------------------------------------------------- the step


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      params: list, *, grad_clip: Optional[float] = None,
                      dist: Optional[DistInfo] = None) -> torch.Tensor:
    """Backward pass and optimizer step without a host-device synchronisation.

    The step is skipped when the loss or a gradient is not finite: by the
    GradScaler with fp16 (which also skips, and backs off from, the overflows
    of its scaled gradients: those are not counted as bad), else by the fused
    Adam kernel's ``found_inf`` (an optimizer without it falls back to a
    synchronising check). Under DDP the verdict is the same on every rank.
    Returns the verdict, a bool tensor (True: non-finite loss or gradients)
    left on the device.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    bad = ~torch.isfinite(loss.detach().float())
    if grad_clip:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    elif not scaler.is_enabled():
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
    else:
        norm = None
    if norm is not None and not scaler.is_enabled():
        # fp16's scaled gradients overflow now and then by design: the scaler's business, not a bad step
        bad = bad | ~torch.isfinite(norm.float())
    if dist is not None and dist.world_size > 1:
        bad = _all_reduce(bad.float(), dist, "max") > 0
    if scaler.is_enabled():  # fp16: the scaler skips inf/NaN gradient steps and backs off its scale
        scaler.step(optimizer)
        scaler.update()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        # fused Adam: the kernel reads found_inf on the device and skips the update (and the step count)
        optimizer.grad_scale = None
        optimizer.found_inf = bad.float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(bad):  # other optimizers: one synchronisation per step
        optimizer.step()
    return bad


def _fused_adam_ok(device: torch.device) -> bool:
    return device.type in ("cuda", "cpu")


# ----------------------------------------------------------------------------- fit


def fit(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = False) -> dict:
    """Train the Probabilistic U-Net of ``cfg`` and write everything into ``run_dir``.

    ``RUN_DIR/config.yaml`` (resolved), ``RUN_DIR/splits.json``,
    ``RUN_DIR/metrics.jsonl``, TensorBoard events, ``RUN_DIR/checkpoints/last.pt``
    and ``best.pt`` (lowest validation GED). Returns a summary dict.

    Under torchrun it runs data-parallel (see the module notes); only rank 0
    writes, and every rank returns the summary.
    """
    started = init_distributed(cfg.train.device)
    try:
        return _fit(cfg, Path(run_dir), resume=resume, progress=progress)
    finally:
        if started:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def _foreign_files(run_dir: Path) -> list[str]:
    """Entries of an existing run directory that show probunet did not create it (no marker)."""
    if not run_dir.is_dir() or (run_dir / RUN_MARKER).is_file():
        return []
    return sorted(p.name for p in run_dir.iterdir())


def _claim_run_dir(run_dir: Path, resume: bool) -> FolderLock:
    """Check that ``run_dir`` may be written, lock it, mark it as a probunet run, and
    remove the temporary files an interrupted run left. Returns the held lock.

    "Written by probunet" means: the folder holds ``RUN_MARKER``, which every run
    writes first. A folder with other files and no marker is refused; a run
    directory from before markers existed is accepted with ``--resume`` (its
    ``checkpoints/last.pt`` must load as a probunet checkpoint).
    """
    last_path = run_dir / "checkpoints" / "last.pt"
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--out {run_dir} is a file, not a folder")
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last_path}")
    if not resume and last_path.exists():
        raise FileExistsError(f"run directory {run_dir} already holds a checkpoint; "
                              f"pass --resume to continue it or choose another --out")
    foreign = _foreign_files(run_dir)
    if foreign and not resume:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FileExistsError(f"--out {run_dir} holds files probunet did not write ({shown}); train into a new "
                              f"or empty folder (or resume a probunet run with --resume)")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(run_dir, what="run directory").acquire()
    try:
        if not (run_dir / RUN_MARKER).is_file():
            atomic_write_text(run_dir / RUN_MARKER, json.dumps({"probunet_version": __version__}) + "\n")
        remove_stale_temps(run_dir)
        remove_stale_temps(run_dir / "checkpoints")
    except BaseException:
        lock.release()
        raise
    return lock


def _drop_metrics_after(metrics_path: Path, step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (a resumed run logs the later
    steps again); unreadable lines (a write cut by a kill) go too. Returns rows dropped."""
    if not metrics_path.is_file():
        return 0
    keep, dropped = [], 0
    for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and int(rec["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(metrics_path, "".join(l + "\n" for l in keep))
        logger.info("%s: dropped %d row(s) after step %d (logged after the checkpoint resumed from)",
                    metrics_path, dropped, step)
    return dropped


def _fit(cfg: Config, run_dir: Path, *, resume: bool, progress: bool) -> dict:
    locks: list[FolderLock] = []
    try:
        return _fit_locked(cfg, run_dir, resume=resume, progress=progress, locks=locks)
    finally:
        for lock in locks:
            lock.release()


def _fit_locked(cfg: Config, run_dir: Path, *, resume: bool, progress: bool, locks: list) -> dict:
    ckpt_dir = run_dir / "checkpoints"
    dist = dist_info()
    last_path = ckpt_dir / "last.pt"
    device = resolve_device(cfg.train.device)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)

    def check_and_load():
        locks.append(_claim_run_dir(run_dir, resume))
        return load_checkpoint(last_path, map_location="cpu") if resume else None

    ckpt = _broadcast_from_main(check_and_load, dist)
    dtype = amp_dtype(cfg.train.amp, device)
    torch.manual_seed(cfg.train.seed)

    splits = load_splits(cfg, run_dir if dist.is_main else None)
    if not splits["train"]:
        raise ValueError("the training split is empty: add data or lower data.split.test_fraction/val_fraction")
    transform = train_transform(cfg.data, cfg.model.spatial_dims)
    stream = BatchStream(MultiRaterDataset(splits["train"]), cfg.train.batch_size, cfg.train.seed,
                         cfg.train.rater, dist, transform)
    val_items = splits["val"][: cfg.train.val_cases]

    # channels-last: ~1.3x on a GPU (cuDNN NHWC kernels); no gain measured for CPU training
    channels_last = cfg.model.spatial_dims == 2 and (
        cfg.train.channels_last if cfg.train.channels_last is not None else device.type == "cuda")
    model = build_model(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    geco = build_geco(cfg.train.geco)
    if geco is not None:
        geco = geco.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = _fused_adam_ok(device)
    optimizer = torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                 fused=fused or None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    start_step, best = 0, math.inf
    ckpt_loaded = ckpt is not None
    if ckpt is not None:
        if ckpt["config"]["model"] != cfg.to_dict()["model"]:
            raise ValueError(f"--resume: the model section of the config differs from {last_path}'s")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if geco is not None and ckpt.get("geco"):
            geco.load_state_dict(ckpt["geco"])
        start_step, best = int(ckpt["step"]), float(ckpt.get("best_metric", math.inf))
        _set_rng_state(ckpt["rng"])
        logger.info("resumed %s at step %d", last_path, start_step)
        del ckpt

    train_model = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    eager_model = train_model
    if cfg.train.compile:
        try:
            train_model = torch.compile(train_model, mode=cfg.train.compile_mode)
        except Exception as exc:  # compile is an optimisation: never fatal
            logger.warning("torch.compile failed (%s); training without it", exc)

    writer = None
    metrics_path = run_dir / "metrics.jsonl"
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _drop_metrics_after(metrics_path, start_step)
        save_config(cfg, run_dir / "config.yaml")
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception as exc:  # tensorboard is optional
            logger.warning("TensorBoard logging disabled (%s)", exc)
    saved = {"last.pt": start_step if ckpt_loaded else None}

    def save(name: str, step: int) -> None:
        if not dist.is_main:
            return
        try:
            save_checkpoint({
                "format": CHECKPOINT_FORMAT, "probunet_version": __version__,
                "model": model.state_dict(), "config": cfg.to_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "geco": geco.state_dict() if geco is not None else None,
                "step": step, "best_metric": best, "rng": _rng_state(),
            }, ckpt_dir / name)
        except CheckpointError as exc:
            raise TrainingError(f"step {step}: {exc}; training stopped, {_kept()}") from None
        saved[name] = step

    def _kept() -> str:
        if saved["last.pt"] is None:
            return "no checkpoint was written"
        return f"the last good checkpoint stays: {last_path} (step {saved['last.pt']})"

    def check_weights(done: int) -> None:
        """Stop when the weights themselves went non-finite (a step that was finite but too large)."""
        if bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()):
            return
        names = non_finite({"model": model.state_dict()})
        raise TrainingError(f"step {done}: the model weights are no longer finite (NaN/Inf in "
                            f"{names[0] if names else 'a parameter'}): the training cannot take a finite step; "
                            f"lower train.lr or check the data; training stopped, {_kept()}")

    def log(record: dict) -> None:
        if not dist.is_main:
            return
        with open(metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(k.replace("val_", "val/").replace("train_", "train/"), v, record["step"])

    bar = None
    if progress and dist.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    model.train()
    # Device-side bookkeeping: no host sync inside the step.
    sums: dict[str, torch.Tensor] = {}
    zero = torch.zeros((), device=device)
    good_steps, images_seen = zero.clone(), 0
    bad_run, bad_total = zero.clone(), zero.clone()
    trip_step, last_bad = torch.full((), -1.0, device=device), torch.full((), -1.0, device=device)
    check_every = max(1, min(cfg.train.log_every, cfg.train.max_bad_steps))
    t0 = time.perf_counter()
    last_val: dict = {}
    collapse = CollapseMonitor()
    compiled_first = cfg.train.compile and train_model is not eager_model

    def check_bad_steps(done: int) -> None:
        """The one place the host looks at the non-finite step counters."""
        nonlocal bad_total
        total, run, trip, last = (int(v) for v in torch.stack([bad_total, bad_run, trip_step, last_bad]).tolist())
        if total:
            logger.warning("non-finite loss or gradients: %d step(s) skipped up to step %d (last at step %d)",
                           total, done, last)
            bad_total = zero.clone()
        if trip >= 0:
            raise TrainingError(f"loss was NaN/Inf {cfg.train.max_bad_steps} times in a row, last at step {trip}; "
                                f"lower train.lr, set train.amp=off, or check the data; {_kept()}")
        check_weights(done)

    for step, image, target in _batches(stream, start_step, cfg.train.steps, device, cfg.data.num_workers):
        torch.manual_seed(_step_seed(cfg.train.seed, step, dist.rank))
        if channels_last:
            image = to_channels_last(image)
        beta = beta_schedule(cfg.train.beta, step, cfg.train.kl_warmup_steps)
        geco_state = ({k: v.clone() for k, v in geco.state_dict().items()}
                      if compiled_first and geco is not None else None)
        def one_step():
            with autocast(device, dtype):
                out = train_model(image, seg=target)
            fb = cfg.train.free_bits
            terms = geco(out.logits, target, out.kl, kl_dims=out.kl_dims, free_bits=fb) if geco is not None else \
                elbo_loss(out.logits, target, out.kl, beta=beta, kl_dims=out.kl_dims, free_bits=fb)
            bad = backward_and_step(terms["loss"], optimizer, scaler, params, grad_clip=cfg.train.grad_clip,
                                    dist=dist)
            return terms, bad

        try:
            terms, bad = one_step()
        except Exception as exc:
            if not compiled_first:
                raise
            # torch.compile compiles lazily, at the first step: fall back to eager and redo the step
            logger.warning("torch.compile failed at the first step (%s: %s); training without it",
                           exc.__class__.__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            train_model, compiled_first = eager_model, False
            if geco_state is not None:
                geco.load_state_dict(geco_state)
            torch.manual_seed(_step_seed(cfg.train.seed, step, dist.rank))
            terms, bad = one_step()
        compiled_first = False

        badf = bad.float()
        ok = 1.0 - badf
        for k, v in terms.items():
            v = v.detach().float()
            sums[k] = sums.get(k, zero) + torch.where(bad, zero, v)
        good_steps = good_steps + ok
        images_seen += image.shape[0]
        bad_run = bad_run * badf + badf
        bad_total = bad_total + badf
        last_bad = torch.where(bad, float(step), last_bad)
        trip_step = torch.where((bad_run >= cfg.train.max_bad_steps) & (trip_step < 0), float(step), trip_step)
        done = step + 1

        if done % check_every == 0 or done == cfg.train.steps:
            check_bad_steps(done)
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            keys = sorted(sums)
            packed = torch.stack([sums[k] for k in keys] + [good_steps]).double()
            _all_reduce(packed, dist)
            values = packed.tolist()
            n = values[-1]
            elapsed = time.perf_counter() - t0
            record = {"step": done, **{f"train_{k}": (v / n if n else None) for k, v in zip(keys, values)},
                      "beta": beta, "images_per_s": images_seen * dist.world_size / elapsed}
            if dist.is_main:
                record["train_sample_diversity"] = _batch_diversity(model, image[:4], cfg, device, dtype)
            sums, good_steps, images_seen, t0 = {}, zero.clone(), 0, time.perf_counter()
            if dist.is_main:
                warning = collapse.update(done, record.get("train_kl"), record.get("train_sample_diversity"))
                if warning:
                    logger.warning(warning)
            log(record)
            if bar is not None and record.get("train_loss") is not None:
                bar.set_postfix(loss=f"{record['train_loss']:.1f}", ce=f"{record['train_ce_mean']:.3f}",
                                kl=f"{record['train_kl']:.2f}", div=f"{record['train_sample_diversity']:.2f}")
        if val_items and (done % cfg.train.val_every == 0 or done == cfg.train.steps):
            last_val = validation_ged(model, val_items, cfg, device, dtype, dist)
            log({"step": done, **last_val})
            if last_val["val_ged"] < best:
                best = last_val["val_ged"]
                save("best.pt", done)
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
            save("last.pt", done)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()

    replicas = None
    if dist.world_size > 1:
        replicas = _replica_digests(model, dist)
        if len(set(replicas)) != 1:
            raise TrainingError(f"the {dist.world_size} DDP replicas hold different weights after training "
                                f"(SHA-256 per rank: {', '.join(d[:12] for d in replicas)})")
    figure = None
    show = (splits["test"] or splits["val"] or splits["train"])[:4]
    if dist.is_main and show and len({i["image"].shape for i in show}) == 1:
        from .viz import model_figure

        figure = str(model_figure(run_dir / "samples.png", model, show, seed=cfg.train.seed,
                                  spatial_dims=cfg.model.spatial_dims, device=device,
                                  title=f"{run_dir.name}: step {cfg.train.steps}, held-out cases"))
    if start_step >= cfg.train.steps and dist.is_main:
        logger.info("nothing to do: the checkpoint is already at step %d of %d", start_step, cfg.train.steps)
    summary = {"run_dir": str(run_dir), "steps": cfg.train.steps, "device": str(device),
               "amp": str(dtype).replace("torch.", "") if dtype else "off",
               "best_val_ged": best if math.isfinite(best) else None, **last_val,
               "last_checkpoint": str(last_path), "figure": figure, "world_size": dist.world_size,
               "collapse": collapse.report()}
    if replicas is not None:
        summary["replica_weights_sha256"] = replicas
    if dist.is_main:
        atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=1))
    return summary


def _replica_digests(model, dist: DistInfo) -> list[str]:
    """Every rank's :func:`weights_digest` of the model, gathered on all ranks."""
    import torch.distributed as tdist

    digests: list = [None] * dist.world_size
    tdist.all_gather_object(digests, weights_digest(model.state_dict()))
    return digests


def _batch_diversity(model, image, cfg, device, dtype) -> float:
    """E[d(S,S')] of 4 prior samples on a few training images: near 0 means posterior collapse."""
    from .metrics import sample_diversity

    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        samples = model.sample(image, 4).argmax(dim=2)
    model.train(was_training)
    return float(sample_diversity(samples, num_classes=cfg.model.num_classes).mean())
