"""CPU threads for training: one step of a config's model at 1 thread against N threads, alternated in
one process, alone and beside busy processes (pure-Python loops this script starts and stops).

    OMP_NUM_THREADS=1 python scripts/benchmark_threads.py configs/synthetic.yaml --threads 1 2 --busy 0 1

Prints a row per (busy processes, threads): the median step time and its ratio to 1 thread in the
same phase. The load average of the machine before each phase is printed beside it: on a shared
machine other people's processes count too.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (probunet importable from a source checkout)


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def step_fn(config: str, overrides: list[str]):
    from probunet.config import load_config
    from probunet.data import MultiRaterDataset, load_splits
    from probunet.data.stream import BatchStream
    from probunet.runtime.distributed import DistInfo
    from probunet.models import LossForward, build_model
    from probunet.models.unet import to_channels_last
    from probunet.precision import amp_dtype, autocast, memory_format, uses_channels_last

    cfg = load_config(config, overrides)
    device = torch.device("cpu")
    dtype = amp_dtype(cfg.train.amp, device)
    cl = uses_channels_last(dtype, cfg.train.channels_last, spatial_dims=cfg.model.spatial_dims)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.train)
    if cl:
        model.to(memory_format=memory_format(cfg.model.spatial_dims))
    loss = LossForward(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
    stream = BatchStream(MultiRaterDataset(load_splits(cfg)["train"][:64]), cfg.train.batch_size, 0, DistInfo())
    image, labels, num = stream.batch(0)
    image = to_channels_last(image) if cl else image

    def step():
        t0 = time.perf_counter()
        with autocast(device, dtype):
            terms = loss(image, labels.long(), step=0, num_raters=num, generator=stream.rater_generator(0))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        return time.perf_counter() - t0

    label = ("bf16" if dtype == torch.bfloat16 else "fp32" if dtype is None else str(dtype)) + \
        ("+channels_last" if cl else "")
    return step, label, cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy processes started beside")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    step, label, cfg = step_fn(args.config, args.overrides)
    print(f"# {args.config} {' '.join(args.overrides)}: {label}, batch {cfg.train.batch_size}, "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print("| busy processes started | load avg 1m before | threads | step | vs 1 thread |")
    print("|---|---|---|---|---|")
    for busy in args.busy:
        stop = mp.Event()
        procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
        for pr in procs:
            pr.start()
        time.sleep(1.0)
        load = os.getloadavg()[0]
        try:
            for n in args.threads:  # warm-up at each thread count
                torch.set_num_threads(n)
                step()
            times = {n: [] for n in args.threads}
            for _ in range(args.repeats):
                for n in args.threads:
                    torch.set_num_threads(n)
                    times[n].append(step())
        finally:
            stop.set()
            for pr in procs:
                pr.join()
        base = statistics.median(times[args.threads[0]])
        for n in args.threads:
            t = statistics.median(times[n])
            print(f"| {busy} | {load:.1f} | {n} | {t * 1e3:.0f} ms | {t / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
