"""Metrics: pure functions of tensors, the same for every model.

- :mod:`.segmentation`: segmentation under annotator variability (IoU, the generalized
  energy distance, Hungarian-matched IoU, S_NCC, calibration, QUBIQ, consensus scores);
- :mod:`.detection`: does an uncertainty score find the failures and the shifted images
  (AUROC, AURC and E-AURC, ACE, Brier).

The public names of both are importable from ``probunet.metrics``.
"""

from .detection import *  # noqa: F401,F403
from .detection import __all__ as _detection_all
from .segmentation import *  # noqa: F401,F403
from .segmentation import __all__ as _segmentation_all
from .segmentation import mean_and_sem  # noqa: F401  (used across the package)

__all__ = [*_segmentation_all, *_detection_all, "mean_and_sem"]
