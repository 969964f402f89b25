"""The run directory of training: claiming it (marker, lock, stale temp files) and its metrics log.

"Written by probunet" means: the folder holds :data:`RUN_MARKER`, which every
run writes first. A folder with other files and no marker is refused; a run
directory from before markers existed is accepted with ``--resume`` (its
``checkpoints/last.pt`` must load as a probunet checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .. import __version__
from ..guards import ensure_writable_dir, write_failure
from ..utils import FolderLock, atomic_write_text, remove_stale_temps

logger = logging.getLogger(__name__)

RUN_MARKER = ".probunet-run"  # written first into every run directory: "probunet wrote this folder"


def foreign_files(run_dir: Path) -> list[str]:
    """Entries of an existing run directory that show probunet did not create it (no marker)."""
    if not run_dir.is_dir() or (run_dir / RUN_MARKER).is_file():
        return []
    return sorted(p.name for p in run_dir.iterdir())


def claim_run_dir(run_dir: Path, resume: bool) -> FolderLock:
    """Check that ``run_dir`` may be written, lock it, mark it as a probunet run, and
    remove the temporary files an interrupted run left. Returns the held lock."""
    last_path = run_dir / "checkpoints" / "last.pt"
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--out {run_dir} is a file, not a folder")
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last_path}")
    if not resume and last_path.exists():
        raise FileExistsError(f"run directory {run_dir} already holds a checkpoint; "
                              f"pass --resume to continue it or choose another --out")
    foreign = foreign_files(run_dir)
    if foreign and not resume:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FileExistsError(f"--out {run_dir} holds files probunet did not write ({shown}); train into a new "
                              f"or empty folder (or resume a probunet run with --resume)")
    ensure_writable_dir(run_dir, "--out")  # a read-only or full disk is refused before any work
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


def drop_metrics_after(metrics_path: Path, step: int) -> int:
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


class MetricsLog:
    """``RUN_DIR/metrics.jsonl`` (one JSON row per record) and TensorBoard scalars; a no-op when
    ``enabled`` is False (ranks other than 0). Rows after ``resumed_step`` are dropped first."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, resumed_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        drop_metrics_after(self.path, resumed_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception as exc:  # tensorboard is optional
            logger.warning("TensorBoard logging disabled (%s)", exc)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk: one line naming the file
            failure = write_failure(self.path, exc)
            if failure is None:
                raise
            raise failure from None
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k.replace("val_", "val/").replace("train_", "train/"), v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["MetricsLog", "RUN_MARKER", "claim_run_dir", "config_for_evaluation", "drop_metrics_after", "foreign_files",
           "run_dir_of"]


def run_dir_of(given: Path, checkpoint: Path) -> Path:
    """RUN_DIR: the given run folder, or RUN for RUN/checkpoints/x.pt, else the checkpoint's folder."""
    if given.is_dir():
        return given
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return checkpoint.parent


def config_for_evaluation(ckpt_config: dict, overrides: list[str]):
    """The checkpoint's resolved config with ``key=value`` overrides; ``model.*`` is fixed."""
    from ..config import ConfigError, apply_overrides, from_dict, parse_override

    for text in overrides or []:
        path, _ = parse_override(text)
        if path[0] == "model":
            raise ConfigError(f"override '{text}': the model is defined by the checkpoint; model.* cannot be "
                              f"changed at evaluation")
    return from_dict(apply_overrides(ckpt_config, list(overrides or [])))
