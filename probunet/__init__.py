"""probunet: the Probabilistic U-Net (Kohl et al. 2018) for segmentation under annotator variability.

The package is grouped by stage, each folder importing only the ones before it:

- ``probunet`` (this folder): the config, the command options, errors and small helpers,
  precision, and the command line (``cli``, which only parses and calls);
- ``runtime``: processes, memory, run directories, output-folder ownership, shipped files;
- ``data``, ``metrics``, ``models``: readers and splits; metric functions; the networks, their
  losses and checkpoints;
- ``inference``: the sampler, :class:`Predictor`, the folder job, uncertainty maps;
- ``evaluation``: scoring, reference rows, reports and figures, validation, calibration;
- ``train``: :func:`fit`;
- ``study``: the uncertainty study and dataset shifts;
- ``export``: TorchScript, ONNX and the MONAI Bundle.
"""

__version__ = "0.1.0"

import logging as _logging

from .config import Config, ConfigError, load_config
from .evaluation import calibrate_run, evaluate
from .export import export_model
from .inference import Prediction, Predictor, predict_folder
from .models import ProbabilisticUNet, ProbUNetOutput, UNet, build_model
from .models.checkpoint import load_model, save_checkpoint
from .study import run_study

_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def __getattr__(name: str):
    """``probunet.fit`` without importing the trainer on ``import probunet``."""
    if name == "fit":
        from .train import fit

        return fit
    raise AttributeError(f"module 'probunet' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "Prediction", "Predictor", "ProbUNetOutput", "ProbabilisticUNet", "UNet",
           "__version__", "build_model", "calibrate_run", "evaluate", "export_model", "fit", "load_config",
           "load_model", "predict_folder", "run_study", "save_checkpoint"]
