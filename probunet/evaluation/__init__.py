"""Evaluation: a trained model's samples scored against the readers over a split
(:func:`evaluate`, :mod:`.scoring`), the reference rows (:mod:`.reference`), the files and
figures it writes (:mod:`.report`, :mod:`.viz`, :mod:`.html_report`), ``probunet evaluate`` of a
checkpoint or run (:func:`evaluate_checkpoint`, :mod:`.command`), validation during
training (:mod:`.validation`) and the conformal calibration of regions (:mod:`.calibration`)."""

from .calibration import calibrate_run  # noqa: F401
from .command import evaluate_checkpoint  # noqa: F401
from .reference import reference_rows  # noqa: F401
from .report import LESION_COLUMNS, output_paths  # noqa: F401
from .scoring import CASE_METRICS, SUMMARY_KIND, TRUTH_METRICS, evaluate  # noqa: F401
from .viz import lesion_scatter  # noqa: F401

__all__ = ["CASE_METRICS", "LESION_COLUMNS", "SUMMARY_KIND", "TRUTH_METRICS", "calibrate_run", "evaluate",
           "evaluate_checkpoint", "lesion_scatter", "output_paths", "reference_rows"]
