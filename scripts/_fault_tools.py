"""Pieces the fault_check families share: tmpfs mounts and the probe runner.

A probe is ``probunet ARGS`` in a child process (``python -c PROBE_RUNNER --quiet ARGS``) that
prints, last on stdout, ``@@RSS <peak MB> <seconds after imports>``; with the environment
variable ``PROBUNET_FAULT_MEMORY_CAP`` (bytes) set, probunet sees at most that much memory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PROBE_RUNNER = r"""
import os, resource, sys, time
cap = int(os.environ.get("PROBUNET_FAULT_MEMORY_CAP", "0"))
if cap:
    from probunet import guards
    real = guards.available_memory
    guards.available_memory = lambda device=None: min(real(device) or cap, cap)
import torch, probunet.batch, probunet.checkpoint, probunet.config, probunet.data.io, probunet.shift, probunet.train
from probunet.cli import main
t0 = time.perf_counter()  # imports done: what follows is the command's own work
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code if isinstance(exc.code, int) else 1
sys.stdout.flush()
sys.stderr.flush()
print(f"@@RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} {time.perf_counter() - t0:.3f}",
      flush=True)
sys.exit(rc)
"""


def probe_output(out: str) -> tuple[str, int, float]:
    """A probe's stdout -> (what it printed before the marker, peak MB, seconds after imports)."""
    tail = out.rsplit("@@RSS ", 1)[1].split() if "@@RSS " in out else ["0", "nan"]
    return out.split("@@RSS ")[0], int(tail[0]), float(tail[1])


def mount_tmpfs(where: Path, options: str) -> bool:
    """Mount a tmpfs with ``options`` at ``where`` (root only); False where that is not possible."""
    where.mkdir(parents=True, exist_ok=True)
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)
