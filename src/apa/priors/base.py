"""① The frozen diffusion model behind one small contract.

Every prior is presented to the sampler in variance-exploding (VE) form, the convention of SPEC
("The mathematics"): a state z at noise level σ is data plus σ·noise, the forward drift is
f = 0 and g²·ds = dσ², the score is −ε/σ and the Tweedie estimate is ẑ0 = z − σ·ε. A
variance-preserving (DDPM) model with x_t = √ᾱ·x0 + √(1−ᾱ)·ε enters by z = x/√ᾱ,
σ² = (1−ᾱ)/ᾱ, and is called on x = z/√(1+σ²) (what EulerAncestral does for SD).

A backend implements four things (``event_shape``, ``sigmas``, ``sample_initial``, ``eps``)
and ``decode``; :class:`VEPrior` derives from ``eps`` the score, the Tweedie estimate, the
forward drift and diffusion, and the stochastic (ancestral) transition. What else a prior offers
(its device, its class names, denoiser features) is declared as data with a default on
:class:`VEPrior`, never found by probing; a wrapper (:class:`PriorWrapper`) forwards each one.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from apa.types import Particles


@runtime_checkable
class Prior(Protocol):
    """What the sampler needs from a diffusion model. Shapes: particles [N, *event_shape]."""

    event_shape: tuple[int, ...]
    data_std: float  # per-coordinate std of the data: the Gaussian-data Jacobian s²/(s²+σ²)
    name: str  # the registry name ("mnist", "gmm", "sd15", ...)
    class_names: tuple[str, ...]  # the names of the data's classes; () for a prior without classes
    device: torch.device  # where the networks run; a run keeps every per-step tensor there, so
    #                       eps/tweedie/transition see particles on it (``smc.sampler.device_of``)
    features: Callable[..., torch.Tensor] | None  # :class:`HasFeatures`' method; None: no denoiser features
    encode: Callable[[torch.Tensor], Particles] | None  # what a user sees -> clean particles (decode's inverse
    #                                                    on the data); None: the prior cannot take given images

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """Noise levels of the time grid, [num_steps + 1], decreasing, the last one 0."""

    def sample_initial(self, n: int, sigma: float, generator: torch.Generator | None) -> Particles:
        """n draws from the marginal at noise level ``sigma`` (the noise end). -> [n, *event]."""

    def eps(self, z: Particles, sigma: float) -> Particles:
        """The model's noise prediction ε̂(z, σ), differentiable in z. [N, *event] -> [N, *event]."""

    def decode(self, z0: Particles) -> torch.Tensor:
        """Clean particles -> what a user sees (images [N, C, H, W] in [0, 1], or the data itself)."""

    def score(self, z: Particles, sigma: float, eps: Particles | None = None) -> Particles:
        """∇ log p_σ(z) = −ε/σ."""

    def tweedie(self, z: Particles, sigma: float, eps: Particles | None = None) -> Particles:
        """ẑ0 = E[z0 | z] = z + σ²·score = z − σ·ε."""

    def forward_drift(self, z: Particles, sigma: float, sigma_next: float) -> Particles:
        """f·ds of the forward SDE over the step σ -> σ_next; zero in VE form."""

    def g2_ds(self, sigma: float, sigma_next: float) -> float:
        """g²·ds over one step of generation time: σ² − σ_next²."""

    def transition(self, z: Particles, eps: Particles, sigma: float, sigma_next: float,
                   noise: Particles, shift: Particles | None = None) -> Particles:
        """One stochastic step σ -> σ_next with injected standard-normal ``noise`` [N, *event]."""

    def transition_variance(self, sigma: float, sigma_next: float) -> float:
        """Per-coordinate variance v of :meth:`transition`'s noise (0 for a deterministic step)."""


@runtime_checkable
class HasFeatures(Protocol):
    """A prior whose denoiser gives features of clean images (the features surrogate reads them).

    A prior without them declares ``features = None``, which ``isinstance`` reads as absent (a
    protocol method set to None is blocked); ``prior.features is not None`` says the same.
    """

    def features(self, z0: Particles, t: int = 200) -> torch.Tensor:
        """Clean particles [N, *event] -> features [N, D], differentiable in z0."""


class VEPrior:
    """Shared VE-form numerics; subclasses provide event_shape, data_std, sigmas, sample_initial, eps, decode."""

    event_shape: tuple[int, ...]
    data_std: float = 1.0
    name: str
    class_names: tuple[str, ...] = ()
    device: torch.device = torch.device("cpu")  # where the networks run; the sampler keeps its particles there
    features: Callable[..., torch.Tensor] | None = None  # a backend with denoiser features defines the method
    encode: Callable[[torch.Tensor], Particles] | None = None  # a backend that can take a person's images defines it
    # backend parts some callers read, None where a backend has none:
    model: torch.nn.Module | None = None  # the ε-network as one module (DDPM): fine-tuning copies it
    sigma_of_t: Callable[[torch.Tensor], torch.Tensor] | None = None  # training timestep t -> σ_t (DDPM, SD)
    # the split network (DDPM): ε and the features as network calls apart from their inputs (``eps_input``,
    # ``features_input``), which ``priors.batching`` makes once for many sessions; None: called whole
    eps_network: Callable[..., torch.Tensor] | None = None
    features_network: Callable[..., torch.Tensor] | None = None

    def score(self, z: Particles, sigma: float, eps: Particles | None = None) -> Particles:
        eps = self.eps(z, sigma) if eps is None else eps
        return -eps / sigma  # SPEC: score = −ε/σ

    def tweedie(self, z: Particles, sigma: float, eps: Particles | None = None) -> Particles:
        eps = self.eps(z, sigma) if eps is None else eps
        return z - sigma * eps  # ẑ0 = z + σ²·score = z − σ·ε

    def forward_drift(self, z: Particles, sigma: float, sigma_next: float) -> Particles:
        return torch.zeros_like(z)  # VE form: f = 0

    def g2_ds(self, sigma: float, sigma_next: float) -> float:
        return sigma**2 - sigma_next**2  # g²·ds = dσ² over the step

    def transition(self, z: Particles, eps: Particles, sigma: float, sigma_next: float,
                   noise: Particles, shift: Particles | None = None) -> Particles:
        """The ancestral (posterior) step of the VE bridge, plus an optional drift ``shift``.

        z' = ẑ0 + (σ'²/σ²)(z − ẑ0) + σ'·√(1 − σ'²/σ²)·ξ. Its mean equals the Euler–Maruyama
        mean z + (σ² − σ'²)·score; its variance is the DDPM posterior's (EulerAncestral's σ_up²).
        """
        ratio = (sigma_next / sigma) ** 2
        x0 = self.tweedie(z, sigma, eps)
        out = x0 + ratio * (z - x0) + sigma_next * (1.0 - ratio) ** 0.5 * noise
        return out if shift is None else out + shift

    def transition_variance(self, sigma: float, sigma_next: float) -> float:
        """Per-coordinate variance of :meth:`transition`'s noise: σ'²(1 − σ'²/σ²)."""
        return sigma_next**2 * (1.0 - (sigma_next / sigma) ** 2)


class PriorWrapper:
    """A prior around ``inner`` that changes how some of its calls are made (``priors.batching``,
    ``smc.distributed``): the contract and its declared capabilities are the inner prior's, each
    forwarded by name; a subclass overrides :meth:`eps` and may set ``features``."""

    def __init__(self, inner: Prior):
        self.inner = inner
        self.event_shape, self.data_std = inner.event_shape, inner.data_std
        self.name, self.class_names, self.features = inner.name, inner.class_names, inner.features
        self.encode = inner.encode
        self.sigmas, self.sample_initial, self.decode = inner.sigmas, inner.sample_initial, inner.decode
        self.score, self.tweedie, self.forward_drift = inner.score, inner.tweedie, inner.forward_drift
        self.g2_ds, self.transition = inner.g2_ds, inner.transition
        self.transition_variance = inner.transition_variance

    @property
    def device(self) -> torch.device:
        """The inner prior's, read when asked (its networks may be moved)."""
        return self.inner.device

    def eps(self, z: Particles, sigma: float) -> Particles:
        return self.inner.eps(z, sigma)
