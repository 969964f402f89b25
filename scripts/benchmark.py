"""Speed benchmark of the Probabilistic U-Net: training, sampling, evaluation, memory.

Defaults are the LIDC setting: 1x128x128 images, features (32, 64, 128, 192),
latent_dim 6, 4 f_comb layers, batch 8 on a CPU / 32 on a GPU, 100 samples per
image. Every figure is the median of several repeats after warm-up, with
``torch.cuda.synchronize`` around GPU timings; the two sides of each ratio are
timed in alternation so that a change in machine load hits both.

Rows:
  train   Probabilistic U-Net step (forward with the posterior, ELBO, backward,
          Adam) and the same U-Net alone as a deterministic segmenter (same
          features, 1x1 head, cross-entropy), same optimizer and precision; their
          step-time ratio (the prior and posterior encoders make ~1.7 the floor).
  sample  ``model.sample(image, 1)`` (U-Net + prior + one f_comb pass) and
          ``model.sample(image, 100)``; per additional sample = (t100 - t1) / 99.
  eval    GED + HM-IoU of 100 samples x 4 raters (scripts/benchmark_metrics.py).
  memory  peak resident memory (CPU) or peak CUDA allocation, per stage.
  precision (``--precisions``, in place of the rows above) the Probabilistic U-Net's
          training step and ``sample(image, 100)`` in fp32, bf16 autocast and
          bf16 + channels-last (model and batch), 2D at the sizes above and 3D
          (``--size-3d``, ``--batch-3d``), the variants alternated, with the speed-up
          over fp32; and the end-to-end images/s of ``probunet train`` runs of
          ``--e2e-config`` (data loading included) at ``train.amp=off`` and ``auto``.
  data    (``--pipeline CONFIG``, in place of the rows above) whole scans: the time
          to build one batch of patches from the memory-mapped cache
          (``data.patch_size``, foreground oversampling, augmentation) against the
          time of one training step of the config's model on it; with
          ``data.num_workers`` also the wait per batch behind DataLoader workers.

    python scripts/benchmark.py --quick              # CPU, < 2 minutes
    python scripts/benchmark.py --device cuda        # bf16 autocast; also times fp32 for the speed-up
    python scripts/benchmark.py --device cuda --dtype fp16 --compile
    python scripts/benchmark.py --pipeline configs/volumes3d.yaml data.path=data/synth3d
    OMP_NUM_THREADS=1 python scripts/benchmark.py --device cpu --threads 1 --precisions
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/_common, benchmark_metrics
import _common  # noqa: E402,F401  (probunet importable from a source checkout)

LIDC = {"size": 128, "features": (32, 64, 128, 192), "latent_dim": 6, "fcomb_layers": 4, "num_samples": 100}
TARGETS = {  # the targets, checked only at the LIDC sizes
    "cpu": {"batch": 8, "train_images_per_s": 8.0, "sample_100_s": 1.5},
    "cuda": {"batch": 32, "train_images_per_s": 1500.0, "sample_100_s": 0.050, "amp_speedup": 2.0},
}
RATIO_FLOOR = 1.7


# ----------------------------------------------------------------------------- measuring


class Meter:
    """Timing and peak memory on one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], n: int = 1) -> float:
        """Seconds for ``n`` calls of ``fn`` (synchronised at both ends), per call."""
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / n

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak (not per stage)


def alternate(fns: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, float]:
    """Warm each up, then time them in turn ``repeats`` times; medians."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            runs[k].append(fn())
    return {k: statistics.median(v) for k, v in runs.items()}


# ----------------------------------------------------------------------------- workloads


def make_batch(batch: int, size: int, device: torch.device, seed: int = 0):
    """Images (B, 1, H, W) and lesion-like binary targets (B, H, W)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.rand(batch, 2, generator=g) * size * 0.5 + size * 0.25
    radius = torch.rand(batch, generator=g) * size * 0.1 + size * 0.05
    d2 = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
    target = (d2 <= radius[:, None, None] ** 2).long()
    return image.to(device), target.to(device)


def autocast_ctx(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_batch_3d(batch: int, size: int, device: torch.device, seed: int = 0):
    """Volumes (B, 1, D, H, W) and ball-shaped binary targets (B, D, H, W)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, size, size, size, generator=g)
    ax = torch.arange(size).float()
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    d2 = (zz - size / 2) ** 2 + (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    target = (d2 <= (size / 5) ** 2).long().expand(batch, -1, -1, -1).contiguous()
    return image.to(device), target.to(device)


def train_steps(args, device, dtype, image, target, channels_last: bool, spatial_dims: int = 2):
    """Step functions of the Probabilistic U-Net and of the deterministic U-Net."""
    from probunet.models.losses import cross_entropy_terms, elbo_loss
    from probunet.models import ProbabilisticUNet
    from probunet.models.unet import UNet, to_channels_last
    from probunet.precision import memory_format
    from probunet.train.step import backward_and_step

    torch.manual_seed(0)
    prob = ProbabilisticUNet(spatial_dims=spatial_dims, features=args.features, latent_dim=args.latent_dim,
                             fcomb_layers=args.fcomb_layers).to(device)
    unet = UNet(spatial_dims, 1, args.features, num_classes=2).to(device)
    if channels_last:
        fmt = memory_format(spatial_dims)
        prob, unet = prob.to(memory_format=fmt), unet.to(memory_format=fmt)
        image = to_channels_last(image)
    prob_fwd, unet_fwd = prob, unet
    if args.compile:
        prob_fwd, unet_fwd = torch.compile(prob, mode=args.compile_mode), torch.compile(unet, mode=args.compile_mode)
    fused = device.type in ("cuda", "cpu")

    def setup(model):
        params = list(model.parameters())
        opt = torch.optim.Adam(params, lr=1e-4, fused=fused or None)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        return params, opt, scaler

    p_params, p_opt, p_scaler = setup(prob)
    u_params, u_opt, u_scaler = setup(unet)

    def prob_step():
        with autocast_ctx(device, dtype):
            out = prob_fwd(image, seg=target)
        loss = elbo_loss(out.logits, target, out.kl, beta=1.0)["loss"]
        return backward_and_step(loss, p_opt, p_scaler, p_params)

    def unet_step():
        with autocast_ctx(device, dtype):
            logits = unet_fwd(image)
        ce_sum, _ = cross_entropy_terms(logits, target)
        return backward_and_step(ce_sum.mean(), u_opt, u_scaler, u_params)

    return prob, prob_step, unet_step


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


# ----------------------------------------------------------------------------- main


def run(args) -> dict:
    from probunet.precision import amp_dtype

    from probunet.utils import resolve_device

    try:  # as training and evaluation do it (on a CPU: flushing of denormal floats, too)
        device = resolve_device(args.device)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = amp_dtype({"auto": "auto", "fp32": "off", "bf16": "bf16", "fp16": "fp16"}[args.dtype], device)
    dname = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    batch = args.batch_size or TARGETS["cuda" if device.type == "cuda" else "cpu"]["batch"]
    # as fit() does: channels-last training with bf16 and on GPUs (sample() uses it on CPUs by itself)
    from probunet.precision import uses_channels_last

    channels_last = args.channels_last == "on" or (
        args.channels_last == "auto" and uses_channels_last(dtype, device_type=device.type))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2) + (2 if device.type == "cuda" else 0)
    repeats = args.repeats or (3 if args.quick else 5)
    per = 10 if device.type == "cuda" else 1  # steps per timed repeat on a GPU (keeps the CPU ahead as in training)
    meter = Meter(device)
    rows: list[dict] = []
    memory: dict[str, float] = {}

    def row(section, name, seconds=None, images_per_s=None, value=None, unit="", note=""):
        rows.append({"section": section, "name": name, "seconds": seconds, "images_per_s": images_per_s,
                     "value": value, "unit": unit, "note": note})

    image, target = make_batch(batch, args.size, device)
    t_start = time.perf_counter()

    # --- training -------------------------------------------------------------------------
    meter.reset_peak()
    prob, prob_step, unet_step = train_steps(args, device, dtype, image, target, channels_last)
    fns = {"prob": lambda: meter.time(prob_step, per), "unet": lambda: meter.time(unet_step, per)}
    compare = device.type == "cuda" and dtype is not None and not args.no_compare
    if compare:
        _, prob32_step, _ = train_steps(args, device, None, image, target, channels_last)
        fns["prob_fp32"] = lambda: meter.time(prob32_step, per)
    t = alternate(fns, warmup, repeats)
    memory["train"] = meter.peak_mib()
    row("train", "Prob. U-Net step", t["prob"], batch / t["prob"], note=f"batch {batch}, {dname}")
    row("train", "U-Net step (deterministic, CE)", t["unet"], batch / t["unet"], note=f"batch {batch}, {dname}")
    row("train", "ratio Prob. U-Net / U-Net", value=t["prob"] / t["unet"], unit="x",
        note=f"structural floor ~{RATIO_FLOOR}")
    if compare:
        row("train", "Prob. U-Net step, fp32", t["prob_fp32"], batch / t["prob_fp32"], note="same code, no autocast")
        row("train", f"speed-up {dname} / fp32", value=t["prob_fp32"] / t["prob"], unit="x")

    # --- sampling -------------------------------------------------------------------------
    del fns
    prob.eval()
    s = args.num_samples
    sample_image = image.contiguous()

    def sampler(num, ctx_dtype):
        def fn():
            with torch.inference_mode(), autocast_ctx(device, ctx_dtype):
                return prob.sample(sample_image, num, chunk_size=args.chunk_size)
        return fn

    meter.reset_peak()
    fns = {"one": lambda: meter.time(sampler(1, dtype), per), "many": lambda: meter.time(sampler(s, dtype), per)}
    if compare:
        fns["many_fp32"] = lambda: meter.time(sampler(s, None), per)
    t = alternate(fns, warmup, repeats)
    memory["sample"] = meter.peak_mib()
    row("sample", "first sample (U-Net + prior + f_comb)", t["one"], batch / t["one"], note=f"batch {batch}")
    row("sample", "per additional sample", (t["many"] - t["one"]) / (s - 1) if s > 1 else float("nan"),
        note=f"whole batch of {batch}")
    row("sample", f"{s} samples per image", t["many"], batch / t["many"],
        note=f"batch {batch}, chunk {args.chunk_size}, {dname}")
    row("sample", f"ratio {s} samples / 1 sample", value=t["many"] / t["one"], unit="x")
    if compare:
        row("sample", f"{s} samples per image, fp32", t["many_fp32"], batch / t["many_fp32"])
    del fns

    # --- evaluation -----------------------------------------------------------------------
    if not args.no_eval:
        meter.reset_peak()
        try:
            import benchmark_metrics

            for r in benchmark_metrics.run(quick=args.quick, device=str(device)):
                row("eval", r["name"], r["seconds"], r["images"] / r["seconds"],
                    note=f"{r['images']} images x {r['samples']} samples x {r['raters']} raters, "
                         f"{r['device']}, speed-up vs loop {r['ratio']:.1f}x")
        except ImportError as exc:  # the metrics benchmark is another script; report, do not fail
            row("eval", "GED + HM-IoU", note=f"skipped: {exc}")
        memory["eval"] = meter.peak_mib()

    for stage, mib in memory.items():
        row("memory", f"peak {'CUDA allocated' if device.type == 'cuda' else 'RSS'}: {stage}", value=mib, unit="MiB")

    return {"rows": rows, "env": environment(device, dname, batch, args, channels_last, warmup, repeats, per),
            "targets": check_targets(rows, device, batch, args, dname), "wall_s": time.perf_counter() - t_start}


PRECISIONS = {"fp32": (None, False), "bf16": (torch.bfloat16, False), "bf16+channels_last": (torch.bfloat16, True)}


def run_precisions(args) -> dict:
    """The precision table (see the module notes): each variant on the same weights and batch, alternated."""
    from probunet.precision import cpu_description
    from probunet.utils import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    meter = Meter(device)
    warmup, repeats = (args.warmup if args.warmup is not None else 1), args.repeats or (3 if args.quick else 5)
    rows: list[dict] = []
    t_start = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    def row(section, name, seconds=None, images_per_s=None, value=None, unit="", note=""):
        rows.append({"section": section, "name": name, "seconds": seconds, "images_per_s": images_per_s,
                     "value": value, "unit": unit, "note": note})

    shapes = [(2, args.batch_size or TARGETS["cpu"]["batch"], args.size)]
    if args.size_3d:
        shapes.append((3, args.batch_3d, args.size_3d))
    for dims, batch, size in shapes:
        image, target = (make_batch if dims == 2 else make_batch_3d)(batch, size, device)
        shape = f"{dims}D, B={batch}, {size}^{dims}"
        steps, samplers = {}, {}
        for name, (dtype, cl) in PRECISIONS.items():
            prob, step, _ = train_steps(args, device, dtype, image, target, cl, spatial_dims=dims)
            steps[name] = (lambda fn=step: meter.time(fn))
            prob.eval()
            x = image.contiguous()
            if cl:
                from probunet.models.unet import to_channels_last

                x = to_channels_last(x)

            def sample(prob=prob, x=x, dtype=dtype):
                with torch.inference_mode(), autocast_ctx(device, dtype):
                    return prob.sample(x, args.num_samples, chunk_size=args.chunk_size)
            samplers[name] = (lambda fn=sample: meter.time(fn))
        t = alternate(steps, warmup, repeats)
        for name in PRECISIONS:
            row("train", f"Prob. U-Net step, {name}", t[name], batch / t[name], value=t["fp32"] / t[name], unit="x",
                note=shape)
        del steps
        t = alternate(samplers, warmup, repeats)
        for name in PRECISIONS:
            row("sample", f"{args.num_samples} samples, {name}", t[name], batch / t[name],
                value=t["fp32"] / t[name], unit="x", note=shape)
        del samplers
    if args.e2e_config:
        for amp in ("off", "auto"):
            ips, label = e2e_images_per_s(args.e2e_config, amp, args.e2e_steps)
            row("e2e", f"probunet train, train.amp={amp} ({label})", images_per_s=ips,
                note=f"{args.e2e_config}, {args.e2e_steps} steps, data loading included (second half)")
        get = {r["name"]: r for r in rows if r["section"] == "e2e"}
        a, b = (get[k]["images_per_s"] for k in sorted(get, key=lambda k: "auto" in k))
        rows[-1]["value"], rows[-1]["unit"] = b / a, "x"
    env = {"device": f"CPU ({platform.processor() or platform.machine()}, {cpu_description()})"
           if device.type == "cpu" else torch.cuda.get_device_name(device),
           "torch": torch.__version__, "dtype": "see rows", "threads": torch.get_num_threads(), "size": args.size,
           "features": list(args.features), "latent_dim": args.latent_dim, "fcomb_layers": args.fcomb_layers,
           "channels_last": "see rows", "compile": False, "warmup": warmup, "repeats": repeats,
           "steps_per_repeat": 1, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if hasattr(os, "getloadavg"):
        env["cpus"], env["load_average_1m"] = os.cpu_count(), load_before
        env["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    return {"rows": rows, "env": env, "targets": [], "wall_s": time.perf_counter() - t_start}


def e2e_images_per_s(config: str, amp: str, steps: int) -> tuple[float, str]:
    """images/s of a ``probunet train`` run of ``config`` (data loading included) over its second half,
    and the precision it resolved."""
    import tempfile

    half = max(1, steps // 2)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        _common.run_logged([sys.executable, "-m", "probunet", "--quiet", "train", str(Path(config).resolve()),
                            "--out", str(run), "--no-progress", f"train.steps={2 * half}", f"train.amp={amp}",
                            f"train.log_every={half}", "train.val_every=1000000",
                            "train.checkpoint_every=1000000"], _common.repo_env(pythonpath=True),
                           Path(tmp) / "train.log")
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run / "train_summary.json").read_text())
    ips = [r["images_per_s"] for r in recs if "images_per_s" in r]
    return ips[-1], summary["precision"]


def run_pipeline(args) -> dict:
    """The data-pipeline rows: patch batch time vs model step time (see the module notes)."""
    from probunet.config import load_config
    from probunet.data import train_transform
    from probunet.data.patches import PatchStream
    from probunet.data import load_splits
    from probunet.data.stream import batches
    from probunet.runtime.distributed import DistInfo
    from probunet.models import LossForward, build_model
    from probunet.precision import amp_dtype, autocast
    from probunet.utils import resolve_device

    cfg = load_config(args.pipeline, list(args.overrides))
    if cfg.data.patch_size is None:
        raise SystemExit("error: --pipeline needs a config with data.patch_size")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    meter = Meter(device)
    t_start = time.perf_counter()
    train = load_splits(cfg)["train"]
    stream = PatchStream(train, cfg.data.patch_size, cfg.train.batch_size, cfg.train.seed, DistInfo(),
                         foreground_oversample=cfg.data.foreground_oversample,
                         transform=train_transform(cfg.data, cfg.model.spatial_dims))
    n = args.repeats or (5 if args.quick else 20)
    t_batch = [meter.time(lambda k=k: stream.batch(1000 + k)) for k in range(n)]  # fresh steps: other patches
    model = build_model(cfg.model, cfg.train).to(device)
    loss = LossForward(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    dtype = amp_dtype(cfg.train.amp, device)
    image, labels, num = stream.batch(0)
    image, labels, num = image.to(device), labels.to(device).long(), num.to(device)

    def step():
        with autocast(device, dtype):
            terms = loss(image, labels, step=0, num_raters=num, generator=stream.rater_generator(0))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()

    step()
    t_step = [meter.time(step) for _ in range(max(3, n // 4))]
    tb, ts = statistics.median(t_batch), statistics.median(t_step)
    patch = "x".join(str(p) for p in stream.patch)
    rows = []

    def row(name, seconds=None, value=None, unit="", note=""):
        rows.append({"section": "data", "name": name, "seconds": seconds,
                     "images_per_s": cfg.train.batch_size / seconds if seconds else None, "value": value,
                     "unit": unit, "note": note})

    note = f"batch {cfg.train.batch_size} x {patch}, {len(train)} training cases"
    row("patch batch from the cache (1 process)", tb, note=note + ", with augmentation"
        if stream.transform is not None else note)
    row("model training step on it", ts, note=f"{cfg.model.name}, features {list(cfg.model.features)}")
    row("ratio batch / model step", value=tb / ts, unit="x", note="under 1: loading keeps up without workers")
    if cfg.data.num_workers > 0:
        it = batches(stream, 2000, 2000 + n + 4, device, cfg.data.num_workers)
        next(it)  # workers start
        t0 = time.perf_counter()
        got = sum(1 for _ in it)
        row(f"batch wait behind {cfg.data.num_workers} workers", (time.perf_counter() - t0) / max(got, 1),
            note="no model step in between: the pipeline's own throughput")
    env = {"device": str(device), "torch": torch.__version__, "dtype": str(dtype), "threads": torch.get_num_threads(),
           "config": args.pipeline, "overrides": list(args.overrides), "repeats": n}
    return {"rows": rows, "env": env, "targets": [], "wall_s": time.perf_counter() - t_start}


def environment(device, dname, batch, args, channels_last, warmup, repeats, per) -> dict:
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
           "torch": torch.__version__, "dtype": dname, "batch": batch, "size": args.size,
           "features": list(args.features), "latent_dim": args.latent_dim, "fcomb_layers": args.fcomb_layers,
           "num_samples": args.num_samples, "chunk_size": args.chunk_size, "channels_last": channels_last,
           "compile": args.compile_mode if args.compile else False, "threads": torch.get_num_threads(), "warmup": warmup,
           "repeats": repeats, "steps_per_repeat": per}
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        env["cpus"] = os.cpu_count()
        env["load_average_1m"] = round(os.getloadavg()[0], 2)
    return env


def check_targets(rows, device, batch, args, dname) -> list[dict]:
    kind = "cuda" if device.type == "cuda" else "cpu"
    tgt = TARGETS[kind]
    lidc = (args.size == LIDC["size"] and tuple(args.features) == LIDC["features"] and batch == tgt["batch"]
            and args.latent_dim == LIDC["latent_dim"] and args.fcomb_layers == LIDC["fcomb_layers"]
            and args.num_samples == LIDC["num_samples"])
    if not lidc:
        return []
    get = {r["name"]: r for r in rows}
    out = []
    ips = get["Prob. U-Net step"]["images_per_s"]
    out.append({"target": f"training >= {tgt['train_images_per_s']:g} images/s ({dname})",
                "measured": f"{ips:.1f} images/s", "met": ips >= tgt["train_images_per_s"]})
    ratio = get["ratio Prob. U-Net / U-Net"]["value"]
    out.append({"target": f"Prob. U-Net / U-Net step time <= {RATIO_FLOOR}", "measured": f"{ratio:.2f}x",
                "met": ratio <= RATIO_FLOOR})
    t100 = get[f"{args.num_samples} samples per image"]["seconds"]
    out.append({"target": f"100 samples for {batch} images < {fmt_s(tgt['sample_100_s'])}",
                "measured": fmt_s(t100), "met": t100 < tgt["sample_100_s"]})
    sp = get.get(f"speed-up {dname} / fp32")
    if "amp_speedup" in tgt and sp is not None:
        out.append({"target": f"{dname} >= {tgt['amp_speedup']:g}x the fp32 training step",
                    "measured": f"{sp['value']:.2f}x", "met": sp["value"] >= tgt["amp_speedup"]})
    return out


def print_report(res: dict) -> None:
    env = res["env"]
    if "config" in env:  # the data-pipeline rows
        print(f"# probunet data pipeline: {env['config']} {' '.join(env['overrides'])}; {env['device']}, "
              f"{env['threads']} threads, median of {env['repeats']}")
        for r in res["rows"]:
            t = fmt_s(r["seconds"]) if r["seconds"] is not None else ""
            val = f"{r['value']:.3f} {r['unit']}" if r["value"] is not None else ""
            print(f"| data | {r['name']:<40} | {t:>10} | {val:>10} | {r['note']}")
        return
    print(f"# probunet benchmark: {env['device']}, torch {env['torch']}, {env['dtype']}, "
          f"{env['threads']} threads" + (f", load average {env['load_average_1m']} on {env['cpus']} CPUs"
                                         if "load_average_1m" in env else ""))
    print(f"# 1x{env['size']}x{env['size']}, features {tuple(env['features'])}, latent {env['latent_dim']}, "
          f"f_comb {env['fcomb_layers']} layers, channels_last {env['channels_last']}, compile {env['compile']}; "
          f"median of {env['repeats']} repeats ({env['steps_per_repeat']} step(s) each) after {env['warmup']} warm-up")
    head = f"| {'section':<7} | {'measure':<40} | {'time':>10} | {'images/s':>9} | {'value':>12} | note"
    print(head)
    print("|" + "-" * 9 + "|" + "-" * 42 + "|" + "-" * 12 + "|" + "-" * 11 + "|" + "-" * 14 + "|------")
    for r in res["rows"]:
        t = fmt_s(r["seconds"]) if r["seconds"] is not None else ""
        ips = f"{r['images_per_s']:.1f}" if r["images_per_s"] is not None else ""
        val = f"{r['value']:.2f} {r['unit']}" if r["value"] is not None else ""
        print(f"| {r['section']:<7} | {r['name']:<40} | {t:>10} | {ips:>9} | {val:>12} | {r['note']}")
    if res["targets"]:
        print("\n| target | measured | met |\n|---|---|---|")
        for t in res["targets"]:
            print(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    print(f"\n(benchmark wall time {res['wall_s']:.0f} s)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto: as train.amp (bf16 on GPUs that support it, else fp16; on a CPU "
                        "bf16 with AMX / AVX512-BF16 units, else fp32)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 32 on GPU")
    p.add_argument("--size", type=int, default=LIDC["size"])
    p.add_argument("--features", type=lambda s: tuple(int(x) for x in s.split(",")), default=LIDC["features"])
    p.add_argument("--latent-dim", type=int, default=LIDC["latent_dim"])
    p.add_argument("--fcomb-layers", type=int, default=LIDC["fcomb_layers"])
    p.add_argument("--num-samples", type=int, default=LIDC["num_samples"])
    p.add_argument("--chunk-size", type=int, default=32, help="samples per batched f_comb call")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="channels-last training models; auto: with bf16 and on a GPU (as train.channels_last)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training models")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead, ...)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="fewer repeats; the quick metrics benchmark")
    p.add_argument("--no-eval", action="store_true", help="skip the GED + HM-IoU rows")
    p.add_argument("--no-compare", action="store_true", help="GPU: skip the fp32 comparison runs")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--pipeline", metavar="CONFIG", default=None,
                   help="only the data-pipeline rows, for this whole-scan config (data.patch_size)")
    p.add_argument("--precisions", action="store_true",
                   help="only the precision table: fp32 / bf16 / bf16 + channels-last, training and sampling")
    p.add_argument("--size-3d", type=int, default=32, help="--precisions: 3D volume side (0: no 3D rows)")
    p.add_argument("--batch-3d", type=int, default=2, help="--precisions: 3D batch size")
    p.add_argument("--e2e-config", default=None, help="--precisions: also time `probunet train` runs of this config")
    p.add_argument("--e2e-steps", type=int, default=40, help="--precisions: steps of each end-to-end run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="with --pipeline: dotted config overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run_pipeline(args) if args.pipeline else run_precisions(args) if args.precisions else run(args)
    print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
