"""The model zoo: the stochastic segmentation models of the literature under one interface.

Importing this package imports every module in this folder (``_``-prefixed helpers aside),
and each registers its models' specs under their ``model.name``: ``unet``, ``mc_dropout``,
``ensemble`` (and the ensemble of any other model), ``ssn``, ``hpu_net``, ``phiseg``. A new
model is a new module here: nothing else needs to import it.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .ensemble import DeepEnsemble
from .hpu_net import HierarchicalProbUNet
from .mc_dropout import MCDropoutUNet
from .member_ensemble import MemberEnsemble
from .phiseg import PHiSeg
from .ssn import StochasticSegmentationNetwork
from .unet_baseline import UNetBaseline, pixelwise_samples



def import_all() -> list[str]:
    """Import every module of the zoo's folder(s) not starting with ``_``; returns their names."""
    names = sorted(m.name for m in _pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in names:
        _importlib.import_module(f"{__name__}.{name}")
    return names


import_all()

__all__ = ["DeepEnsemble", "HierarchicalProbUNet", "MCDropoutUNet", "MemberEnsemble", "PHiSeg",
           "StochasticSegmentationNetwork", "UNetBaseline", "import_all", "pixelwise_samples"]
