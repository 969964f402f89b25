"""Training: ``fit(cfg, run_dir)`` with mixed precision, checkpoints and exact resume.

Determinism: the batch of step ``k`` (cases, raters, augmentation) and the
model's random draws at step ``k`` depend only on ``train.seed`` and ``k``, so a
run resumed from a checkpoint ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from . import __version__
from .config import Config, from_dict, save_config
from .data import MultiRaterDataset, load_splits, train_transform
from .losses import beta_schedule, build_geco, elbo_loss
from .models import build_model
from .utils import atomic_save, atomic_write_text, resolve_device

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


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


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a probunet checkpoint with ``weights_only=True`` (no code runs from the file).

    Raises FileNotFoundError / ValueError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        cand = path / "checkpoints" / "best.pt"
        path = cand if cand.is_file() else path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors, truncated files, foreign formats
        raise ValueError(f"{path}: not a loadable probunet checkpoint ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a probunet checkpoint (no model weights and config)")
    ckpt["path"] = str(path)
    return ckpt


def load_model(path: str | Path, map_location="cpu"):
    """Model (eval mode) and its resolved config from a checkpoint or run directory."""
    ckpt = load_checkpoint(path, map_location)
    cfg = from_dict(ckpt["config"])
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg, ckpt


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


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63 - 1)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import os

        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


class BatchStream:
    """The training batches as a function of the step.

    Case order per epoch comes from a ``DistributedSampler`` (one replica unless
    running under torchrun) reshuffled each epoch; the rater of each image and the
    augmentation of step ``k`` are seeded by ``(seed, k)``.
    """

    def __init__(self, dataset: MultiRaterDataset, batch_size: int, seed: int, rater: str,
                 dist: DistInfo, transform=None):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rater = rater
        self.transform = transform
        self.sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.per_epoch = len(self.sampler)
        self._epoch = None
        self._order: list[int] = []
        items = dataset.items
        self.images = torch.stack([torch.as_tensor(i["image"]) for i in items])  # (N, C, *spatial)
        num_raters = max(i["labels"].shape[0] for i in items)
        self.labels = torch.stack([torch.as_tensor(_pad_raters(i["labels"], num_raters)) for i in items])
        self.num_raters = torch.tensor([i["labels"].shape[0] for i in items])  # (N,)

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
        """image (B, C, *spatial) float32, target (B', *spatial) int64 and the
        matching images: B' = B (one random rater each) or B * A (all raters)."""
        idx = torch.tensor(self._indices(step))
        g = torch.Generator().manual_seed(_step_seed(self.seed, step))
        images, labels = self.images[idx], self.labels[idx]  # (B, C, *sp), (B, A, *sp)
        if self.transform is not None:
            self.transform.set_random_state(seed=_step_seed(self.seed, step) % (2**32))
            outs = [self.transform({"image": im, "labels": lb}) for im, lb in zip(images, labels)]
            images = torch.stack([torch.as_tensor(o["image"]).float() for o in outs])
            labels = torch.stack([torch.as_tensor(o["labels"]).round().long() for o in outs])
        if self.rater == "all":
            a = labels.shape[1]
            images = images.repeat_interleave(a, dim=0)
            target = labels.flatten(0, 1)
            keep = (torch.arange(a).repeat(len(idx)) < self.num_raters[idx].repeat_interleave(a))
            return images[keep], target[keep]
        counts = self.num_raters[idx]
        choice = (torch.rand(len(idx), generator=g) * counts).long()  # uniform among the case's raters
        target = labels[torch.arange(len(idx)), choice]
        return images, target


def _pad_raters(labels: np.ndarray, num: int) -> np.ndarray:
    if labels.shape[0] == num:
        return labels
    pad = np.zeros((num - labels.shape[0], *labels.shape[1:]), dtype=labels.dtype)
    return np.concatenate([labels, pad])


def validation_ged(model, items: list[dict], cfg: Config, device: torch.device,
                   dtype: Optional[torch.dtype]) -> dict:
    """GED (and sample diversity) on a fixed validation subset, raters as references."""
    from . import metrics

    model.eval()
    g = torch.Generator(device=device).manual_seed(cfg.train.seed + 12345)
    geds, divs = [], []
    bs = max(1, cfg.eval.batch_size)
    for i in range(0, len(items), bs):
        chunk = items[i:i + bs]
        shapes = {c["labels"].shape for c in chunk}
        groups = [chunk] if len(shapes) == 1 else [[c] for c in chunk]
        for grp in groups:
            image = torch.stack([torch.as_tensor(c["image"]) for c in grp]).to(device)
            refs = torch.stack([torch.as_tensor(c["labels"]) for c in grp]).to(device)
            with autocast(device, dtype):
                logits = model.sample(image, cfg.train.val_samples, generator=g)
            samples = logits.argmax(dim=2)  # (B, S, *spatial)
            kw = {"num_classes": cfg.model.num_classes, "empty_iou": cfg.eval.empty_iou}
            geds.append(metrics.generalized_energy_distance(samples, refs, **kw).float().cpu())
            divs.append(metrics.sample_diversity(samples, **kw).float().cpu())
    model.train()
    ged = torch.cat(geds)
    return {"val_ged": float(torch.nanmean(ged)), "val_sample_diversity": float(torch.nanmean(torch.cat(divs)))}


# ----------------------------------------------------------------------------- fit


def fit(cfg: Config, run_dir: str | Path, *, resume: bool = False, progress: bool = False) -> dict:
    """Train the Probabilistic U-Net of ``cfg`` and write everything into ``run_dir``.

    ``RUN_DIR/config.yaml`` (resolved), ``RUN_DIR/splits.json``,
    ``RUN_DIR/metrics.jsonl``, TensorBoard events, ``RUN_DIR/checkpoints/last.pt``
    and ``best.pt`` (lowest validation GED). Returns a summary dict.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    dist = dist_info()
    last_path = ckpt_dir / "last.pt"
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last_path}")
    if not resume and last_path.exists():
        raise FileExistsError(f"run directory {run_dir} already holds a checkpoint; "
                              f"pass --resume to continue it or choose another --out")
    device = resolve_device(cfg.train.device)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    dtype = amp_dtype(cfg.train.amp, device)
    torch.manual_seed(cfg.train.seed)

    splits = load_splits(cfg, run_dir if dist.is_main else None)
    if not splits["train"]:
        raise ValueError("the training split is empty: add data or lower data.split.test_fraction/val_fraction")
    transform = train_transform(cfg.data, cfg.model.spatial_dims)
    stream = BatchStream(MultiRaterDataset(splits["train"]), cfg.train.batch_size, cfg.train.seed,
                         cfg.train.rater, dist, transform)
    val_items = splits["val"][: cfg.train.val_cases]

    model = build_model(cfg.model).to(device)
    if cfg.train.channels_last and cfg.model.spatial_dims == 2:
        model = model.to(memory_format=torch.channels_last)
    geco = build_geco(cfg.train.geco)
    if geco is not None:
        geco = geco.to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                 fused=fused or None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    start_step, best = 0, math.inf
    if resume:
        ckpt = load_checkpoint(last_path, map_location=device)
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

    train_model = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        try:
            train_model = torch.compile(train_model)
        except Exception as exc:  # compile is an optimisation: never fatal
            logger.warning("torch.compile failed (%s); training without it", exc)

    writer = None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception as exc:  # tensorboard is optional
            logger.warning("TensorBoard logging disabled (%s)", exc)
    metrics_path = run_dir / "metrics.jsonl"

    def save(name: str, step: int) -> None:
        if not dist.is_main:
            return
        atomic_save({
            "format": CHECKPOINT_FORMAT, "probunet_version": __version__,
            "model": model.state_dict(), "config": cfg.to_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "geco": geco.state_dict() if geco is not None else None,
            "step": step, "best_metric": best, "rng": _rng_state(),
        }, ckpt_dir / name)

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
    sums: dict[str, torch.Tensor] = {}
    count, bad_steps, t0 = 0, 0, time.perf_counter()
    last_val = {}
    step = start_step
    for step in range(start_step, cfg.train.steps):
        torch.manual_seed(_step_seed(cfg.train.seed, step))
        image, target = stream.batch(step)
        image = image.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if cfg.train.channels_last and cfg.model.spatial_dims == 2:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out = train_model(image, seg=target)
        beta = beta_schedule(cfg.train.beta, step, cfg.train.kl_warmup_steps)
        terms = geco(out.logits, target, out.kl) if geco is not None else \
            elbo_loss(out.logits, target, out.kl, beta=beta)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            bad_steps += 1
            optimizer.zero_grad(set_to_none=True)
            logger.warning("non-finite loss at step %d: step skipped", step)
            if bad_steps >= cfg.train.max_bad_steps:
                raise TrainingError(f"loss was NaN/Inf {bad_steps} times in a row, last at step {step}; "
                                    f"lower train.lr, set train.amp=off, or check the data")
            continue
        bad_steps = 0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()

        for k, v in terms.items():
            sums[k] = sums.get(k, 0) + v.detach().float()
        count += 1
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            record = {"step": done, **{f"train_{k}": float(v) / count for k, v in sums.items()},
                      "beta": beta, "images_per_s": count * image.shape[0] / (time.perf_counter() - t0)}
            record["train_sample_diversity"] = _batch_diversity(model, image[:4], cfg, device, dtype)
            sums, count, t0 = {}, 0, time.perf_counter()
            log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['train_loss']:.1f}", ce=f"{record['train_ce_mean']:.3f}",
                                kl=f"{record['train_kl']:.2f}", div=f"{record['train_sample_diversity']:.2f}")
        if val_items and (done % cfg.train.val_every == 0 or done == cfg.train.steps):
            last_val = validation_ged(model, val_items, cfg, device, dtype)
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
               "last_checkpoint": str(last_path), "figure": figure}
    if dist.is_main:
        atomic_write_text(run_dir / "train_summary.json", json.dumps(summary, indent=1))
    return summary


def _batch_diversity(model, image, cfg, device, dtype) -> float:
    """E[d(S,S')] of 4 prior samples on a few training images: near 0 means posterior collapse."""
    from .metrics import sample_diversity

    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        samples = model.sample(image, 4).argmax(dim=2)
    model.train(was_training)
    return float(sample_diversity(samples, num_classes=cfg.model.num_classes).mean())
