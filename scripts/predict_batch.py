"""Batch prediction over a large tree with several worker processes / GPUs.

::

    python scripts/predict_batch.py CHECKPOINT INPUT_DIR OUTPUT_DIR --workers 4 --gpus 0,1 \\
        [any `probunet predict` option: --recursive --num-samples 32 --file-list L --overwrite ...]

Starts ``--workers`` processes of ``probunet predict ... --shard K/N``. Worker K
sees only ``CUDA_VISIBLE_DEVICES=<gpus[K % len(gpus)]>`` (several workers may
share one GPU; without ``--gpus`` they all run with the environment as is, e.g.
on CPUs). Shards are the sorted case list taken every N-th case, so the work is
balanced and each case lands in exactly one shard; samples are seeded per case,
so the outputs do not depend on the number of workers. Every worker writes its
cases and ``OUTPUT_DIR/summary.shard-K-of-N.csv``; at the end these are merged
into ``OUTPUT_DIR/summary.csv``.

A crashed or interrupted run is resumed by running the same command again:
completed cases (``case.json`` present) are skipped. Exit status: 0 when every
case was written, 1 when some failed (see ``summary.csv``), 2 on bad arguments.

On a cluster, run one ``probunet predict ... --shard K/N`` per job (e.g. a
Slurm array with ``K=$SLURM_ARRAY_TASK_ID``) and merge afterwards with
``probunet merge-shards OUTPUT_DIR`` (or ``python scripts/predict_batch.py --merge OUTPUT_DIR``,
which runs it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()
    stream.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT")
    p.add_argument("input_dir", nargs="?", metavar="INPUT_DIR")
    p.add_argument("output_dir", nargs="?", metavar="OUTPUT_DIR")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids shared round-robin by the workers")
    p.add_argument("--merge", metavar="OUTPUT_DIR", default=None,
                   help="only merge the shard summaries of OUTPUT_DIR into summary.csv (probunet merge-shards)")
    args, extra = p.parse_known_args(argv)

    if args.merge:
        from probunet.cli import main as probunet_main

        return probunet_main(["merge-shards", args.merge])
    from probunet.inference import merge_summaries

    if not (args.checkpoint and args.input_dir and args.output_dir):
        p.error("CHECKPOINT, INPUT_DIR and OUTPUT_DIR are required (or --merge OUTPUT_DIR)")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if any(a == "--shard" or a.startswith("--shard=") for a in extra):
        p.error("--shard is set per worker by this script")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    n = args.workers
    # the folder remembers the shard count and options of its run: workers of another N or other
    # options are refused (exit 2); --overwrite starts over and removes the other run's shard summaries
    procs, pumps = [], []
    t0 = time.perf_counter()
    for k in range(n):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
        cmd = [sys.executable, "-m", "probunet", "predict", args.checkpoint, args.input_dir, args.output_dir,
               "--shard", f"{k}/{n}", "--no-progress", *extra]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        t = threading.Thread(target=_pump, args=(proc.stdout, f"[worker {k}] ", sys.stdout), daemon=True)
        t.start()
        procs.append(proc)
        pumps.append(t)
    codes = [proc.wait() for proc in procs]
    for t in pumps:
        t.join()
    if any(c == 2 for c in codes):
        print(f"predict_batch: a worker stopped on a usage error (exit codes {codes})", file=sys.stderr)
        return 2
    try:
        path, rows = merge_summaries(args.output_dir)
    except (ValueError, FileNotFoundError) as exc:
        print(f"predict_batch: {exc} (worker exit codes {codes})", file=sys.stderr)
        return 2
    failed = [r for r in rows if r["status"] == "error"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    print(f"predict_batch: {len(rows)} case(s) with {n} worker(s) in {time.perf_counter() - t0:.1f}s: "
          f"{len(rows) - len(failed) - len(skipped)} written, {len(skipped)} skipped, {len(failed)} failed; "
          f"summary: {path}")
    for r in failed:
        print(f"predict_batch: failed: {r['case']}: {r['error']}", file=sys.stderr)
    return 1 if failed or any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
