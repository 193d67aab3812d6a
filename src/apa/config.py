"""Frozen configuration of one alignment session, one dataclass per stage, saved as JSON beside the run.

Defaults are the seed's (SPEC "Defaults the seed fixes") except where marked "measured": those
were chosen on the built-in MNIST default by the comparison the report shows; ``preset("seed")``
restores every seed value.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PriorConfig:
    name: str = "mnist"  # mnist | fashion | sd15 | gmm
    weights: str | None = None  # a DDPM safetensors file (default: the shipped one)
    model: str | None = None  # SD 1.5: a local diffusers folder (default: the Hugging Face cache)
    prompt: str = "a photo of a fruit"  # SD 1.5 conditioning
    negative_prompt: str = ""
    guidance_scale: float = 7.5  # classifier-free guidance (SD 1.5)
    height: int = 512
    width: int = 512
    device: str | None = None  # None: cuda when available, else cpu
    init: str = "noise"  # "noise" | "prompt" (the seed's start for SD 1.5)


REWARD_AT = ("xt", "tweedie")  # where r is read: the particle z_t itself, or its Tweedie estimate ẑ0
JACOBIANS = ("exact", "gaussian", "identity")  # ∂ẑ0/∂z in ∇_z r(ẑ0(z)): through the denoiser, s²/(s²+σ²), none
WEIGHTS = ("exact", "rate", "none")  # discrete-transition weights, the SPEC's continuous rate, or none (guidance)
RESAMPLE = ("systematic", "stratified", "residual", "multinomial", "none")


@dataclass(frozen=True)
class SamplerConfig:
    """How FKC-SMC samples: the one set of sampler settings, passed whole to ``fkc_sample``."""

    particles: int = 32  # n_particles (seed)
    steps: int = 25  # n_steps (seed)
    beta: tuple[float, float] = (2.0, 8.0)  # measured on MNIST (README, Results); seed: (0.5, 2.0)
    gamma: tuple[float, float] = (0.05, 0.0)  # γ linear (seed)
    beta_dot: float | None = None  # None: ∂β from the schedule; seed: 1.0 (rate weights only)
    diversity: bool = False  # L_div (seed: off for images)
    diversity_history: bool = False  # L_div also against particles shown in earlier rounds
    reward_at: str = "tweedie"  # r on ẑ0 (seed); "xt" reads r at z_t itself
    jacobian: str = "gaussian"  # measured; seed: "identity" (breaks a DDPM prior, see FINDINGS)
    weights: str = "exact"  # exact at any step count; seed: "rate" (the continuous-time rate, biased at 25 steps)
    resample: str = "systematic"  # seed: none
    ess_threshold: float = 0.5  # resample when ESS < threshold·N
    clamp: float | None = None  # seed: 100 (accumulated log-weights clamped to [−c, c])

    def __post_init__(self) -> None:
        _check(self.particles >= 1, f"--particles must be at least 1, got {self.particles}")
        _check(self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        for name in ("beta", "gamma"):
            pair = getattr(self, name)
            _check(len(pair) == 2 and all(math.isfinite(float(v)) for v in pair),
                   f"--{name} must be two finite numbers like 2,8, got {pair}")
        _check(self.beta_dot is None or math.isfinite(self.beta_dot), f"--beta-dot must be finite, got {self.beta_dot}")
        _choice("reward-at", self.reward_at, REWARD_AT)
        _choice("jacobian", self.jacobian, JACOBIANS)
        _choice("weights", self.weights, WEIGHTS)
        _choice("resample", self.resample, RESAMPLE)
        _check(0.0 <= self.ess_threshold <= 1.0, f"--ess-threshold must be in [0, 1], got {self.ess_threshold}")
        _check(self.clamp is None or self.clamp > 0, f"--clamp must be positive or none, got {self.clamp}")
        if self.reward_at == "tweedie" and self.jacobian == "identity":
            warnings.warn("jacobian='identity' applies ∇r(ẑ0) as if it were ∇_z r: the seed's literal reading, "
                          "which blows up the drift at high noise for DDPM priors; use 'exact' or 'gaussian'",
                          stacklevel=3)

    @property
    def guided(self) -> bool:
        """Whether the reward enters at all (β not identically zero)."""
        return self.beta[0] != 0.0 or self.beta[1] != 0.0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"--{flag} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class SurrogateConfig:
    kind: str = "features"  # measured; seed: "pixels" (LatentSurrogate)
    ensemble: int = 1  # members; >1 gives a spread for UCB acquisition
    epochs: int = 200  # seed
    batch_size: int = 32  # seed
    lr: float = 1e-3  # seed
    feature_t: int = 200  # timestep at which the prior's features are read
    ceiling: float | None = 0.5  # measured: r = min(r_θ, ceiling) on the [-1, 1] rating scale; seed: None


@dataclass(frozen=True)
class FeedbackConfig:
    name: str = "oracle"  # oracle | clip | imagenet | human
    prefer: tuple[int, ...] = (1, 4, 7, 9)  # oracle: preferred classes
    mode: str = "binary"  # oracle: PAPA's +1/-1, or "graded"
    oracle_weights: str | None = None
    users: tuple[str, ...] | None = None  # clip / imagenet users; None: the source's own default (clip: the seed's apple, grape, banana)
    temperature: float = 10.0  # clip softmax temperature (seed)
    label_noise: float = 0.0  # simulated users only: each answer is flipped on its scale with this probability
    clip_model: str = "ViT-L-14"
    clip_weights: str | None = None


@dataclass(frozen=True)
class SessionConfig:
    budget: int = 80  # B: ratings in all (seed)
    per_round: int = 8  # k_observe (seed)
    acquisition: str = "diverse"  # measured; seed: "weight" (the top-k weights). weight | random | ucb | diverse
    seed: int = 0
    eval_samples: int = 256  # final evaluation batch, resampled to equal weights
    final_start: str = "noise"  # "liked": the final batch restarts from the liked rated images; "noise": the noise end
    restart: float = 0.3  # with final_start="liked": the liked images are noised to the grid point that leaves
    #                       this fraction of the steps (25 steps: the last 8, from σ at t≈291 of 1000)


LEGACY = {("sampler", "weights"): "rate", ("session", "final_start"): "noise"}  # what a stored config
#         written before a field existed meant, so that an old session resumes to the same result


@dataclass(frozen=True)
class AlignConfig:
    prior: PriorConfig = field(default_factory=PriorConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    session: SessionConfig = field(default_factory=SessionConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AlignConfig":
        parts = {f.name: f.type for f in fields(cls)}
        kinds = {"prior": PriorConfig, "sampler": SamplerConfig, "surrogate": SurrogateConfig,
                 "feedback": FeedbackConfig, "session": SessionConfig}
        unknown = set(d) - set(parts)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected {sorted(parts)}")
        for (section, name), value in LEGACY.items():
            if section in d and name not in d[section]:  # stored before the field existed
                d = {**d, section: {**d[section], name: value}}
        return cls(**{name: _from(kinds[name], d.get(name, {})) for name in kinds})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "AlignConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _from(kind: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in fields(kind)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields {sorted(unknown)}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def preset(name: str, base: AlignConfig | None = None) -> AlignConfig:
    """``default``: this project's measured defaults. ``seed``: every value of the seed design."""
    base = base or AlignConfig()
    if name == "default":
        return base
    if name == "seed":
        return replace(base,
                       sampler=replace(base.sampler, reward_at="tweedie", jacobian="identity", resample="none", weights="rate",
                                       clamp=100.0, beta_dot=1.0, beta=(0.5, 2.0), gamma=(0.05, 0.0)),
                       feedback=replace(base.feedback, users=("apple", "grape", "banana"), temperature=10.0),
                       session=replace(base.session, acquisition="weight", final_start="noise"),
                       surrogate=replace(base.surrogate, kind="pixels", ensemble=1, epochs=200, batch_size=32,
                                         lr=1e-3, ceiling=None))
    raise ValueError(f"unknown preset {name!r}; choose 'default' or 'seed'")
