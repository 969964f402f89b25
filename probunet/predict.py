"""Prediction, kept importable under its former name.

The code lives in three places: :mod:`probunet.predictor` (:class:`Predictor`,
inference on arrays in memory), :mod:`probunet.batch` (the folder batch job:
:func:`predict_folder`, scanning, writers, ``summary.csv``, sharding, locks) and
:mod:`probunet.cli` (``probunet predict``, :func:`predict_cli`). Every name this
module exported before is re-exported here.
"""

from __future__ import annotations

from .batch import (IMAGE_SUFFIXES, OUTPUT_FORMATS, SUMMARY_COLUMNS, InputCase, PredictSummary, case_statistics,
                    find_inputs, merge_summaries, output_suffixes, predict_folder, read_summary, write_prediction,
                    write_summary)
from .cli import predict_cli
from .options import PredictOptions
from .predictor import Prediction, Predictor

__all__ = ["IMAGE_SUFFIXES", "OUTPUT_FORMATS", "SUMMARY_COLUMNS", "InputCase", "PredictOptions", "Prediction",
           "PredictSummary", "Predictor", "case_statistics", "find_inputs", "merge_summaries", "output_suffixes",
           "predict_cli", "predict_folder", "read_summary", "write_prediction", "write_summary"]
