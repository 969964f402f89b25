"""``probunet train`` and ``probunet demo`` as library calls: a :class:`probunet.options.TrainOptions`
in, the run directory and :func:`probunet.train.fit`'s summary out; the demo's three steps
(synth -> train -> evaluate) as the options of each."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, load_config
from ..options import DemoOptions, EvaluateOptions, SynthOptions, TrainOptions
from ..runtime.resources import config_path
from .trainer import fit


def default_run_dir(config: str | Path) -> Path:
    """``runs/<config name>-<date>-<time>``: where ``probunet train`` writes without ``--out``."""
    return Path("runs") / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_command(options: TrainOptions, *, progress: bool = False) -> tuple[Path, dict]:
    """Train ``options.config`` with ``options.overrides`` into ``options.out`` (default
    :func:`default_run_dir`); returns the run directory and :func:`fit`'s summary."""
    cfg = load_config(options.config, list(options.overrides or []))
    run_dir = Path(options.out) if options.out else default_run_dir(options.config)
    return run_dir, fit(cfg, run_dir, resume=options.resume, progress=progress)


def train_lines(run_dir: Path, summary: dict) -> list[str]:
    """What ``probunet train`` prints of a finished run: where its files are, its validation, a collapse."""
    lines = [f"run directory: {run_dir}",
             f"  checkpoints: {run_dir / 'checkpoints'} (last.pt, best.pt)",
             f"  metrics:     {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tensorboard'})"]
    if summary.get("precision"):
        lines.append(f"  precision:   {summary['precision']}")
    if summary.get("figure"):
        lines.append(f"  samples:     {summary['figure']}")
    if summary.get("val_ged") is not None:
        lines.append(f"  validation GED {summary['val_ged']:.4f}, sample diversity "
                     f"{summary['val_sample_diversity']:.4f}")
    message = (summary.get("collapse") or {}).get("message")
    if message:
        lines.append(f"warning: {message}")
    return lines


@dataclass
class DemoPlan:
    """The demo's steps: the synthetic set it writes, the run it trains on it, the evaluation of that run."""

    out: Path
    config: Config
    synth: SynthOptions
    train: TrainOptions
    evaluate: EvaluateOptions


def demo_plan(options: DemoOptions) -> DemoPlan:
    """The steps of ``probunet demo`` into ``options.out`` (refused when it holds anything): the synthetic set
    of the config's ``data.synthetic`` in ``OUT/data``, trained into ``OUT/run`` (``options.config``, default
    the shipped ``synthetic.yaml``), evaluated on its test split."""
    out = Path(options.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; remove it or pass --out NEW_DIR")
    config = Path(options.config) if options.config else config_path("synthetic.yaml")
    data_dir, run_dir = out / "data", out / "run"
    overrides = list(options.overrides or [])
    if any(o.split("=", 1)[0].strip() in ("data", "data.path") for o in overrides):
        raise ValueError(f"data.path: the demo trains on the set it writes into {data_dir}; leave data.path out")
    cfg = load_config(config, overrides)
    s = cfg.data.synthetic
    return DemoPlan(out=out, config=cfg,
                    synth=SynthOptions(out=str(data_dir), num_cases=s.num_cases, size=s.size,
                                       spatial_dims=s.spatial_dims, num_raters=s.num_raters, seed=s.seed),
                    train=TrainOptions(config=str(config), overrides=[*overrides, f"data.path={data_dir}"],
                                       out=str(run_dir)),
                    evaluate=EvaluateOptions(checkpoint=str(run_dir), num_samples=options.num_samples))


__all__ = ["DemoPlan", "default_run_dir", "demo_plan", "train_command", "train_lines"]
