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

NUM_TIMESTEPS = 1000  # training timesteps of every built-in prior (DDPM and SD 1.5): --feature-t is one of them
MIN_EVAL_SAMPLES = 2  # the final evaluation's statistics need at least two images


def _require(ok: bool, message: str) -> None:
    """Refuse a setting: ``message`` says which flag was wrong and what it must be."""
    if not ok:
        raise ValueError(message)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _at_least(flag: str, v: Any, low: int) -> None:
    _require(_whole(v) and v >= low, f"{flag} must be a whole number of at least {low}, got {v!r}")


def _finite(flag: str, v: Any) -> None:
    _require(_number(v) and math.isfinite(v), f"{flag} must be a finite number, got {v!r}")


def _choice(flag: str, v: Any, choices: tuple[str, ...]) -> None:
    _require(v in choices, f"unknown {flag} {v!r}; choose one of {', '.join(choices)}")


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

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name), f"--prior must name a prior, got {self.name!r}")
        _finite("--guidance-scale", self.guidance_scale)
        for flag, v in (("--height", self.height), ("--width", self.width)):
            _require(_whole(v) and v >= 8 and v % 8 == 0,
                     f"{flag} must be a positive multiple of 8 (pixels), got {v!r}")
        _choice("--init", self.init, ("noise", "prompt"))


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
        _at_least("--particles", self.particles, 1)
        _at_least("--steps", self.steps, 1)
        for flag, pair in (("--beta", self.beta), ("--gamma", self.gamma)):
            _require(len(pair) == 2 and all(_number(v) and math.isfinite(v) for v in pair),
                     f"{flag} must be two finite numbers like 2,8, got {pair}")
        _require(self.beta_dot is None or (_number(self.beta_dot) and math.isfinite(self.beta_dot)),
                 f"--beta-dot must be a finite number or none, got {self.beta_dot!r}")
        _choice("--reward-at", self.reward_at, REWARD_AT)
        _choice("--jacobian", self.jacobian, JACOBIANS)
        _choice("--weights", self.weights, WEIGHTS)
        _choice("--resample", self.resample, RESAMPLE)
        _require(_number(self.ess_threshold) and 0.0 <= self.ess_threshold <= 1.0,
                 f"--ess-threshold must be in [0, 1], got {self.ess_threshold!r}")
        _require(self.clamp is None or (_number(self.clamp) and self.clamp > 0),
                 f"--clamp must be a positive number or none, got {self.clamp!r}")
        if self.reward_at == "tweedie" and self.jacobian == "identity":
            warnings.warn("jacobian='identity' applies ∇r(ẑ0) as if it were ∇_z r: the seed's literal reading, "
                          "which blows up the drift at high noise for DDPM priors; use 'exact' or 'gaussian'",
                          stacklevel=3)

    @property
    def guided(self) -> bool:
        """Whether the reward enters at all (β not identically zero)."""
        return self.beta[0] != 0.0 or self.beta[1] != 0.0


@dataclass(frozen=True)
class SurrogateConfig:
    kind: str = "features"  # measured; seed: "pixels" (LatentSurrogate)
    ensemble: int = 1  # members; >1 gives a spread for UCB acquisition
    epochs: int = 200  # seed
    batch_size: int = 32  # seed
    lr: float = 1e-3  # seed
    feature_t: int = 200  # timestep at which the prior's features are read
    ceiling: float | None = 0.5  # measured: r = min(r_θ, ceiling) on the [-1, 1] rating scale; seed: None

    def __post_init__(self) -> None:
        _choice("--surrogate", self.kind, ("pixels", "features"))
        _at_least("--ensemble", self.ensemble, 1)
        _at_least("--epochs", self.epochs, 1)
        _at_least("--fit-batch-size", self.batch_size, 1)
        _require(_number(self.lr) and math.isfinite(self.lr) and self.lr > 0,
                 f"--lr must be a positive finite number, got {self.lr!r}")
        _require(_whole(self.feature_t) and 0 <= self.feature_t < NUM_TIMESTEPS,
                 f"--feature-t must be a timestep from 0 to {NUM_TIMESTEPS - 1}, got {self.feature_t!r}")
        if self.ceiling is not None:
            _finite("--ceiling", self.ceiling)


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

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name), f"--feedback must name a source, got {self.name!r}")
        _require(all(_whole(c) and c >= 0 for c in self.prefer),
                 f"--prefer must list class numbers from 0, like 1,4,7,9; got {self.prefer!r}")
        _choice("--mode", self.mode, ("binary", "graded"))
        _require(_number(self.temperature) and math.isfinite(self.temperature) and self.temperature > 0,
                 f"--temperature must be a positive finite number, got {self.temperature!r}")
        _require(_number(self.label_noise) and 0.0 <= self.label_noise < 0.5,
                 f"--label-noise must be a probability in [0, 0.5), got {self.label_noise!r}")


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

    def __post_init__(self) -> None:
        _at_least("--budget", self.budget, 1)
        _at_least("--per-round", self.per_round, 1)
        _require(isinstance(self.acquisition, str) and bool(self.acquisition),
                 f"--acquisition must name a rule, got {self.acquisition!r}")
        _require(_whole(self.seed) and self.seed >= 0, f"--seed must be a whole number from 0, got {self.seed!r}")
        _at_least("--eval-samples", self.eval_samples, MIN_EVAL_SAMPLES)
        _choice("--final-start", self.final_start, ("noise", "liked"))
        _require(_number(self.restart) and 0.0 < self.restart <= 1.0,
                 f"--restart must be a fraction of the steps in (0, 1], got {self.restart!r}")


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
