"""The model zoo: the stochastic segmentation models of the literature under one interface.

Importing this package registers every model under its ``model.name``:
``unet``, ``mc_dropout``, ``ensemble``, ``ssn``, ``hpu_net`` and ``phiseg``.
"""

from .unet_baseline import UNetBaseline, pixelwise_samples  # registers "unet"

__all__ = ["UNetBaseline", "pixelwise_samples"]
from .mc_dropout import MCDropoutUNet  # noqa: E402  registers "mc_dropout"
from .ensemble import DeepEnsemble  # noqa: E402  registers "ensemble"
from .member_ensemble import MemberEnsemble  # noqa: E402  registers the ensemble of other models

__all__ += ["MCDropoutUNet", "DeepEnsemble", "MemberEnsemble"]
from .ssn import StochasticSegmentationNetwork  # noqa: E402  registers "ssn"

__all__ += ["StochasticSegmentationNetwork"]
from .hpu_net import HierarchicalProbUNet  # noqa: E402  registers "hpu_net"

__all__ += ["HierarchicalProbUNet"]
from .phiseg import PHiSeg  # noqa: E402  registers "phiseg"

__all__ += ["PHiSeg"]
