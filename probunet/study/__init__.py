"""The uncertainty study (:func:`run_study`, :mod:`.pipeline`): several models' uncertainty
maps and scores, failure detection and out-of-distribution detection on shifted copies of a
split (:mod:`.shift`)."""

from .pipeline import StudySettings, run_study, study_command  # noqa: F401
from .shift import SHIFTS, shift_image, shift_items  # noqa: F401
from .synth import synth_command  # noqa: F401

__all__ = ["SHIFTS", "StudySettings", "run_study", "shift_image", "shift_items", "study_command", "synth_command"]
