"""Networks: the model interface, base class and registry, the Probabilistic U-Net, its parts, and the generic conditional VAE."""

from .base import LossForward, LossSettings, SegmentationModel, SegmentationSampler, pick_raters
from .registry import build_model, model_names, model_spec, register_model, spec_of, unregister_model
from .spec import ModelKey, ModelSpec, Samples
from .fcomb import Fcomb
from .gaussian import GaussianHead, analytic_kl, diagonal_gaussian, standard_gaussian
from .prob_unet import LatentEncoder, ProbabilisticUNet, ProbUNetOutput  # registers "prob_unet"
from .unet import Encoder, UNet
from . import zoo  # noqa: E402,F401  imports and registers every model of the zoo

__all__ = [
    "Encoder", "Fcomb", "GaussianHead", "LatentEncoder", "LossForward", "LossSettings", "ModelKey", "ModelSpec",
    "ProbUNetOutput", "ProbabilisticUNet", "Samples", "SegmentationModel", "SegmentationSampler", "UNet",
    "analytic_kl", "build_model", "diagonal_gaussian", "model_names", "model_spec", "pick_raters", "register_model",
    "spec_of", "standard_gaussian", "unregister_model",
]
