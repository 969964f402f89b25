"""Evaluation, kept importable under its former name.

The code lives in four places: :mod:`probunet.scoring` (:func:`evaluate`: samples
scored against the raters, the summary), :mod:`probunet.report` (the files it
writes: ``summary.json``, ``per_case.csv``, ``lesions.csv``), :mod:`probunet.viz`
(the figures, :func:`lesion_scatter` among them) and :mod:`probunet.cli`
(``probunet evaluate``: :func:`evaluate_checkpoint`, :func:`evaluate_cli`). Every
public name this module had before is re-exported here.
"""

from __future__ import annotations

from .cli import evaluate_checkpoint, evaluate_cli
from .rundir import config_for_evaluation, run_dir_of
from .report import LESION_COLUMNS, output_paths
from .scoring import (CASE_METRICS, NUM_BINS, SUMMARY_KIND, TRUTH_METRICS, by_empty_raters, conventions_line,
                      evaluate, mean_and_sem)
from .viz import lesion_scatter

__all__ = ["CASE_METRICS", "LESION_COLUMNS", "NUM_BINS", "SUMMARY_KIND", "TRUTH_METRICS", "by_empty_raters",
           "config_for_evaluation", "conventions_line", "evaluate", "evaluate_checkpoint", "evaluate_cli",
           "lesion_scatter", "mean_and_sem", "output_paths", "run_dir_of"]
