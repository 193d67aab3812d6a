"""apa: active preference alignment of diffusion models with FKC-SMC and an online surrogate reward."""

from apa.priors.base import Prior, VEPrior
from apa.priors.gmm import GaussianMixturePrior
from apa.config import SamplerConfig
from apa.smc.sampler import SMCResult, SMCState, StepInfo, fkc_sample

__all__ = ["Prior", "VEPrior", "GaussianMixturePrior", "fkc_sample", "SamplerConfig", "SMCResult", "SMCState", "StepInfo"]
__version__ = "0.1.0"
