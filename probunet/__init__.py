"""probunet: the Probabilistic U-Net (Kohl et al. 2018) for segmentation under annotator variability."""

__version__ = "0.1.0"

import logging as _logging

from .config import Config, ConfigError, load_config
from .models import ProbabilisticUNet, ProbUNetOutput, UNet, build_model

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = ["Config", "ConfigError", "ProbUNetOutput", "ProbabilisticUNet", "UNet", "__version__",
           "build_model", "load_config"]
