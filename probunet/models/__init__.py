"""Networks: the Probabilistic U-Net, its parts, and the generic conditional VAE."""

from .fcomb import Fcomb
from .gaussian import GaussianHead, analytic_kl, diagonal_gaussian, standard_gaussian
from .prob_unet import LatentEncoder, ProbabilisticUNet, ProbUNetOutput, build_model
from .unet import Encoder, UNet

__all__ = [
    "Encoder", "Fcomb", "GaussianHead", "LatentEncoder", "ProbUNetOutput", "ProbabilisticUNet",
    "UNet", "analytic_kl", "build_model", "diagonal_gaussian", "standard_gaussian",
]
