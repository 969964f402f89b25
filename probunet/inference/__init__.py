"""Inference: the one sampling path (:mod:`.sampler`), images in memory (:class:`Predictor`,
:mod:`.predictor`), the folder batch job (:func:`predict_folder`, :mod:`.folder`) and the
uncertainty maps of the samples (:mod:`.uncertainty`)."""

from .folder import (SUMMARY_COLUMNS, InputCase, PredictSummary,  # noqa: F401
                     case_statistics, find_inputs, merge_summaries, output_suffixes, predict_folder, read_summary,
                     write_prediction, write_summary)
from .predictor import Prediction, Predictor  # noqa: F401
from .sampler import Sampler, load_model  # noqa: F401
from .uncertainty import model_maps, uncertainty_maps  # noqa: F401

__all__ = ["SUMMARY_COLUMNS", "InputCase", "Prediction", "PredictSummary",
           "Predictor", "Sampler", "case_statistics", "find_inputs", "load_model", "merge_summaries", "model_maps",
           "output_suffixes", "predict_folder", "read_summary", "uncertainty_maps", "write_prediction",
           "write_summary"]
