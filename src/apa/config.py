"""Frozen configuration of one alignment session, one dataclass per stage, saved as JSON beside the run.

Defaults are the seed's (SPEC "Defaults the seed fixes") except where marked "measured": those
were chosen on the built-in MNIST default by the comparison the report shows; ``preset("seed")``
restores every seed value.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from apa.knobs import at_least as _at_least
from apa.knobs import between as _between
from apa.knobs import choice as _choice
from apa.knobs import finite as _finite
from apa.knobs import knob
from apa.knobs import number as _number
from apa.knobs import require as _require
from apa.knobs import whole as _whole
from apa.priors.sd_options import SD15Options
from apa.registry import ACQUISITIONS, FEEDBACK, PRIORS

TASTE_RE = re.compile(r"style:[^:,]+:(thick|thin|slant-right|slant-left|large|small)|like:\d+(,\d+)*")

NUM_TIMESTEPS = 1000  # training timesteps of every built-in prior (DDPM and SD 1.5): --feature-t is one of them
MIN_EVAL_SAMPLES = 2  # the final evaluation's statistics need at least two images
MAX_POPULATION = 2**16  # a session's particles in a round, images in its final batch: past this, memory runs out
MAX_SEED = 2**32 - 1  # seeds derive generators as seed·1000003 + ..., which must fit in 64 bits
DEVICE_RE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")  # what --device may name (torch.device's spelling)


@dataclass(frozen=True)
class PriorConfig(SD15Options):
    """① The frozen diffusion model: the fields every prior reads, and each backend's own options,
    declared by the backend (``priors/sd_options.SD15Options``) and kept flat, one flag a field."""

    name: str = knob("mnist", "the frozen diffusion model", flag="prior", choices=PRIORS)
    weights: str | None = knob(None, "a DDPM safetensors file (none: the shipped one)", flag="prior_weights")
    device: str | None = knob(None, "where the networks run, e.g. cuda or cpu (none: cuda when available)")

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name), f"--prior must name a prior, got {self.name!r}")
        super().__post_init__()
        _require(self.device is None or (isinstance(self.device, str) and DEVICE_RE.fullmatch(self.device) is not None),
                 f"--device must be cpu, cuda, cuda:N, mps or none, got {self.device!r}")


REWARD_AT = ("xt", "tweedie")  # where r is read: the particle z_t itself, or its Tweedie estimate ẑ0
JACOBIANS = ("exact", "gaussian", "identity")  # ∂ẑ0/∂z in ∇_z r(ẑ0(z)): through the denoiser, s²/(s²+σ²), none
WEIGHTS = ("exact", "rate", "none")  # discrete-transition weights, the SPEC's continuous rate, or none (guidance)
FINAL_STARTS = ("noise", "liked", "balanced")  # where the final batch starts
SEARCHES = ("tilt", "plain", "farthest")  # what the rounds show until something is liked
BETA_SCHEDULES = ("linear", "signal")  # β over the grid: linear in the step, or with the signal share of ẑ0
RESAMPLE = ("systematic", "stratified", "residual", "multinomial", "none")


@dataclass(frozen=True)
class SamplerConfig:
    """How FKC-SMC samples: the one set of sampler settings, passed whole to ``fkc_sample``."""

    particles: int = knob(32, "particles sampled per round (seed: 32)")
    steps: int = knob(25, "sampling steps from noise to data (seed: 25)")
    beta: tuple[float, float] = knob((0.0, 2.0), "tilt strength β from start to end over the steps (measured on "
                                     "MNIST with the logistic surrogate; seed: 0.5,2)")
    beta_schedule: str = knob("signal", "how β goes from start to end: linear over the steps (seed), or with the "
                              "signal share s²/(s²+σ²) of the Tweedie estimate, so the tilt acts once ẑ0 is "
                              "informative (measured)", choices=BETA_SCHEDULES)
    gamma: tuple[float, float] = knob((0.05, 0.0), "diversity weight γ, linear from start to end (seed)")
    beta_dot: float | None = knob(None, "a constant ∂β for the rate weights (seed: 1; none: from the β schedule)")
    diversity: bool = knob(False, "add the diversity term L_div to the potential (seed: off for images)")
    diversity_history: bool = knob(False, "L_div also against the particles shown in earlier rounds")
    reward_at: str = knob("tweedie", "where the reward is read: the Tweedie estimate ẑ0 (seed) or z_t itself",
                          choices=REWARD_AT)
    jacobian: str = knob("gaussian", "∂ẑ0/∂z in the reward's gradient: through the denoiser, s²/(s²+σ²) "
                         "(measured), or none (the seed's literal reading; breaks a DDPM prior)", choices=JACOBIANS)
    weights: str = knob("exact", "SMC weights: exact for the discrete steps (default), the seed's continuous rate "
                        "(biased at 25 steps), or none (guidance alone)", choices=WEIGHTS)
    drift: float = knob(1.0, "scale of the FKC drift (g²·ds/2)·∇φ that moves the particles toward the reward; "
                        "0: the prior's own kernel, steered by resampling alone (no reward gradient). With exact "
                        "weights any scale has the same target")
    reweight_every: int = knob(1, "evaluate the potential (reward features and, with a drift, their gradient), "
                               "reweight and resample at every k-th step only, counted back from the last; the "
                               "steps between are the prior's own moves (ε alone). With exact weights the target "
                               "is the same for any k")
    resample: str = knob("systematic", "resampling scheme (seed: none)", choices=RESAMPLE)
    ess_threshold: float = knob(0.5, "resample when the ESS falls below this fraction of the particles")
    clamp: float | None = knob(None, "clamp accumulated log-weights to [-c, c] (seed: 100; none: no clamp)")

    def __post_init__(self) -> None:
        _at_least("--particles", self.particles, 1)
        _at_least("--steps", self.steps, 1)
        for flag, pair in (("--beta", self.beta), ("--gamma", self.gamma)):
            _require(len(pair) == 2 and all(_number(v) and math.isfinite(v) for v in pair),
                     f"{flag} must be two finite numbers like 2,8, got {pair}")
        _require(self.beta_dot is None or (_number(self.beta_dot) and math.isfinite(self.beta_dot)),
                 f"--beta-dot must be a finite number or none, got {self.beta_dot!r}")
        _choice("--beta-schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("--reward-at", self.reward_at, REWARD_AT)
        _choice("--jacobian", self.jacobian, JACOBIANS)
        _choice("--weights", self.weights, WEIGHTS)
        _choice("--resample", self.resample, RESAMPLE)
        _require(_number(self.drift) and math.isfinite(self.drift) and self.drift >= 0,
                 f"--drift must be a finite number from 0, got {self.drift!r}")
        _require(self.drift == 1.0 or self.weights == "exact",
                 f"--drift {self.drift:g} needs --weights exact (the other weights assume the full drift)")
        _at_least("--reweight-every", self.reweight_every, 1)
        _require(self.reweight_every == 1 or self.weights == "exact",
                 f"--reweight-every {self.reweight_every} needs --weights exact (the other weights are rates per step)")
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
    """⑤ The surrogate reward r_θ, refit on all ratings after every round."""

    kind: str = knob("features", "the surrogate's input: the prior's own denoiser features (measured) or pixels "
                     "(the seed's LatentSurrogate)", flag="surrogate", choices=("features", "pixels"))
    ensemble: int = knob(1, "ensemble members (more than 1 gives the spread UCB acquisition uses)")
    epochs: int = knob(200, "training epochs per refit, over all ratings (seed: 200)")
    batch_size: int = knob(32, "training batch size (seed: 32)", flag="fit_batch_size")
    lr: float = knob(1e-3, "Adam learning rate (seed: 1e-3)")
    feature_t: int = knob(200, "the training timestep at which the prior's features are read")
    loss: str = knob("logistic", "what the surrogate learns: P(liked | x) by cross-entropy, tilting by "
                     "r = log P(liked | x) (measured), or the rating on [-1, 1] by squared error (the seed's)",
                     flag="surrogate_loss",
                     choices=("mse", "logistic"))
    discount: float = knob(1.0, "each round of age multiplies a rating's weight in the refit by this (1: every "
                           "rating counts forever; below 1 follows a taste that changes)")
    window: int | None = knob(None, "refit on the last N ratings only (none: all of them)")
    ceiling: float | None = knob(0.5, "with --surrogate-loss mse: cap r at this value on the [-1, 1] rating scale "
                                 "(measured; none: no cap)")

    def __post_init__(self) -> None:
        _choice("--surrogate", self.kind, ("pixels", "features"))
        _choice("--surrogate-loss", self.loss, ("mse", "logistic"))
        _at_least("--ensemble", self.ensemble, 1)
        _at_least("--epochs", self.epochs, 1)
        _at_least("--fit-batch-size", self.batch_size, 1)
        _require(_number(self.discount) and 0.0 < self.discount <= 1.0,
                 f"--discount must be in (0, 1], got {self.discount!r}")
        _require(self.window is None or (_whole(self.window) and self.window >= 1),
                 f"--window must be a whole number of ratings from 1, or none; got {self.window!r}")
        _require(_number(self.lr) and math.isfinite(self.lr) and self.lr > 0,
                 f"--lr must be a positive finite number, got {self.lr!r}")
        _require(_whole(self.feature_t) and 0 <= self.feature_t < NUM_TIMESTEPS,
                 f"--feature-t must be a timestep from 0 to {NUM_TIMESTEPS - 1}, got {self.feature_t!r}")
        if self.ceiling is not None:
            _finite("--ceiling", self.ceiling)


@dataclass(frozen=True)
class FeedbackConfig:
    """④ Who rates the images."""

    name: str = knob("oracle", "who rates: a classifier oracle, an OpenCLIP prompt bank, an ImageNet classifier, "
                     "or a person (through `apa serve`)", flag="feedback", choices=FEEDBACK)
    prefer: tuple[int | str, ...] = knob((1, 4, 7, 9), "the oracle's preferred classes, by number or by name "
                                          "(e.g. sandal,sneaker,ankle-boot)")
    mode: str = knob("binary", "the oracle's answers: +1/-1 (PAPA's) or graded", choices=("binary", "graded"))
    oracle_weights: str | None = knob(None, "an oracle's safetensors (none: the shipped one)")
    users: tuple[str, ...] | None = knob(None, "CLIP or ImageNet users (none: the source's own; CLIP: the seed's "
                                         "apple,grape,banana)")
    temperature: float = knob(10.0, "CLIP softmax temperature over the prompt bank (seed: 10)")
    label_noise: float = knob(0.0, "simulated users only: flip each answer on its scale with this probability")
    drift_to: tuple[int | str, ...] | None = knob(None, "a simulated user whose taste changes: the oracle's preferred "
                                                  "classes from rating --drift-at on (none: a fixed taste)")
    drift_at: int | None = knob(None, "the number of ratings after which the taste changes to --drift-to")
    drift_span: int = knob(0, "ratings over which the change is gradual, the two tastes mixed (0: abrupt)")
    taste: str | None = knob(None, "a simulated taste no class names, instead of --prefer: style:CLASS:MEASURE "
                             "(thick, thin, slant-right, slant-left, large, small) or like:I,J,... (held-out images)")
    taste_share: float = knob(0.02, "the share of the prior's samples the --taste holds (its threshold)")
    taste_pool: int = knob(2048, "prior samples the --taste's threshold is set on (drawn once per machine)")
    clip_model: str = knob("ViT-L-14", "the OpenCLIP architecture")
    clip_weights: str | None = knob(None, "an OpenCLIP weights file (none: the OpenCLIP cache)")

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and bool(self.name), f"--feedback must name a source, got {self.name!r}")
        _require(all((_whole(c) and c >= 0) or (isinstance(c, str) and c.strip()) for c in self.prefer),
                 f"--prefer must list classes by number from 0 or by name, like 1,4,7,9; got {self.prefer!r}")
        _require(len(set(self.prefer)) == len(self.prefer),
                 f"--prefer lists a class twice ({','.join(map(str, self.prefer))}); list each class once")
        _choice("--mode", self.mode, ("binary", "graded"))
        _require(_number(self.temperature) and math.isfinite(self.temperature) and self.temperature > 0,
                 f"--temperature must be a positive finite number, got {self.temperature!r}")
        _require(_number(self.label_noise) and 0.0 <= self.label_noise < 0.5,
                 f"--label-noise must be a probability in [0, 0.5), got {self.label_noise!r}")
        _require(self.taste is None or TASTE_RE.fullmatch(str(self.taste)) is not None,
                 "--taste must be style:CLASS:MEASURE (MEASURE one of thick, thin, slant-right, slant-left, large, "
                 f"small) or like:I,J,... (held-out image indices), got {self.taste!r}")
        _require(_number(self.taste_share) and 0.0 < self.taste_share < 0.5,
                 f"--taste-share must be a share of the prior in (0, 0.5), got {self.taste_share!r}")
        _at_least("--taste-pool", self.taste_pool, 16)
        _require((self.drift_to is None) == (self.drift_at is None),
                 "--drift-to and --drift-at go together: give the new preferred classes and the rating count "
                 "at which the taste changes, e.g. --drift-to 2,3,5 --drift-at 40")
        _require(self.drift_at is None or (_whole(self.drift_at) and self.drift_at >= 1),
                 f"--drift-at must be a whole number of ratings from 1 (at 0 the user never had the first taste: "
                 f"give it as --prefer), got {self.drift_at!r}")
        _require(_whole(self.drift_span) and self.drift_span >= 0,
                 f"--drift-span must be a whole number of ratings from 0, got {self.drift_span!r}")
        _require(self.drift_span == 0 or self.drift_to is not None,
                 f"--drift-span {self.drift_span} spreads a change of taste over that many ratings; it needs "
                 "--drift-to and --drift-at")
        _require(self.drift_to is None or len(set(self.drift_to)) == len(self.drift_to),
                 f"--drift-to lists a class twice ({','.join(map(str, self.drift_to or ()))}); list each class once")


@dataclass(frozen=True)
class SessionConfig:
    """⑥ One user's loop."""

    budget: int = knob(80, "ratings in all (seed: 80)")
    per_round: int = knob(8, "images rated per round (seed: 8)")
    acquisition: str = knob("random", "which particles a round shows: distinct particles of the weighted population "
                            "at random (what the sampler produces; measured), distinct particles drawn by weight "
                            "without replacement, the particles the surrogate is least sure of, farthest points, the top weights "
                            "(seed), or UCB", choices=ACQUISITIONS)
    round_beta: float | None = knob(None, "β at the end of the rounds' tilt (none: the sampler's --beta end, as in "
                                    "the final batch): a sharper tilt shows more of what the surrogate thinks "
                                    "is liked, and so more of its mistakes; the final batch keeps --beta")
    seed: int = knob(0, "the seed every random choice of the session derives from")
    eval_samples: int = knob(256, "images in the final batch, resampled to equal weights")
    explore: float = knob(0.5, "the share of each guided round's shown images drawn from the plain prior "
                          "instead of the tilted particles (rated, weight zero in the population; measured)")
    explore_rounds: int | None = knob(1, "how many guided rounds explore (see --explore; measured); none: every "
                                      "round")
    final_start: str = knob("noise", "where the final batch starts: the noise end (new images from the prior tilted "
                            "toward the preference; measured), or the liked rated images noised back (see --restart; "
                            "variations of images the user already rated), drawn uniformly or balanced by crowding",
                            choices=FINAL_STARTS)
    final_move: int | None = knob(500, "after the final batch is drawn, move each image by Metropolis-Hastings (--final-sweeps times): "
                                  "re-noised to this training timestep, denoised by the prior, accepted by "
                                  "exp(β_end·Δr) (none: no move; 500 doubled the distinct liked images on every set "
                                  "of the 3-seed run for a tenth more calls: docs/results.md)")
    final_sweeps: int = knob(1, "with --final-move: how many times each image is moved (each sweep re-noises "
                             "and denoises every image again, and separates copies the sweep before left; 2 "
                             "raised the distinct liked images on every class set for a twelfth more calls, and "
                             "once --final-repeats moves the repeats again, 1 takes as many for a tenth fewer "
                             "final-batch calls: docs/results.md)")
    final_repeats: int = knob(16, "with --final-move: after the sweeps, an image still nearer another of the batch "
                              "than half the median nearest-neighbour distance among the images that repeat no "
                              "other is moved again, up to this many times (0: never; only the repeats pay; 16 "
                              "raised the judge's yield in 25 of 27 finished sessions and lowered it in none, for 16 "
                              "to 9,646 more rows: docs/results.md)")
    final_unseen: float = knob(0.1, "with --final-repeats: the share Q of the batch nearest a rated image (read "
                               "once, after the sweeps) counts as repeats too, and is moved again until none is "
                               "that near (0: none; a person has seen those images; 0.05 raised the judge's yield "
                               "in every one of 18 finished sessions, and 0.1 raised it again on 13 of them, "
                               "3,450 -> 3,519: docs/results.md)")
    final_particles: int | None = knob(None, "particles of the final batch's run, from which its --eval-samples "
                                       "images are resampled (none: as many as the images; more leaves fewer "
                                       "repeats, each particle drawn at most once where its weight allows)")
    final_cut: float | None = knob(None, "keep the final batch's tilt to the top share Q of the prior by the "
                                   "surrogate (128 plain prior samples set the cut): the unsure middle of a common "
                                   "taste is cut as ranking plain samples cuts it (none: no cut; 0.15 measured: "
                                   "the yield up by a thirtieth, but a liked class lost on {1,4,7,9}: docs/results.md)")
    restart: float = knob(0.3, "with --final-start liked: the fraction of the steps the final batch runs "
                          "(0.3 of 25: the last 8, from t≈291 of 1000)")
    detect_change: float | None = knob(None, "read a round as a change of taste when the surrogate fitted before "
                                       "it agrees with at most this share of its ratings, after agreeing with at "
                                       "least 1 minus it on the two rounds before: earlier rounds are forgotten and "
                                       "the next round explores (none: never; off by default: measured in docs/results.md)")
    forget_before: int | None = knob(None, "forget the ratings of the rounds before this one (rounds numbered from "
                                     "1, as the report shows them): the user's taste changed there")
    search: str = knob("farthest", "what the rounds show until the user likes an image: the plain prior samples "
                       "of a round farthest, in the prior's features, from everything rated and from each other "
                       "(measured: docs/results.md), plain prior samples at random (plain), or the particles of the "
                       "tilt fitted to the dislikes so far (tilt, the default until 2026-12-07)", choices=SEARCHES)
    search_on_miss: float = knob(0.5, "the share of a round shown by --search (farthest or plain) after a tilted "
                                 "round whose tilted images the user liked none of: a tilt that finds nothing "
                                 "liked, or that an erring like set, is not trusted alone (0: never; 0.5 raised "
                                 "the rare tastes' yield at label noise 0.1 and 0: docs/results.md)")
    mild_tilt: float | None = knob(0.1, "a round whose tilt keeps at least this share of the prior (the normaliser "
                                   "E_prior[P^β] of the round before, as its SMC run estimates it: a common taste) reads "
                                   "the potential only every --mild-every steps, with exact weights (none: every round "
                                   "at --reweight-every; 0.1 cut the class sets' calls by a ninth at the same yield and "
                                   "never touched a rare taste: docs/results.md)")
    mild_every: int = knob(5, "with --mild-tilt: --reweight-every of a round whose tilt is mild")
    mild_final: bool = knob(True, "with --mild-tilt: the final batch after a mild round reads the potential every "
                            "--mild-every steps too (off: every final batch at --reweight-every; on, it cut such a "
                            "batch's calls by two fifths for a fiftieth of its yield, within a redraw's spread: docs/results.md)")
    examples: int = knob(0, "start from this many images the user already likes, given as the first round's "
                         "liked ratings (counted in the budget): a simulated user gives real held-out images of "
                         "the prior's data set that it likes (mnist, fashion)")

    def __post_init__(self) -> None:
        _at_least("--budget", self.budget, 1)
        _at_least("--per-round", self.per_round, 1)
        _choice("--acquisition", self.acquisition, tuple(ACQUISITIONS))
        _between("--seed", self.seed, 0, MAX_SEED)
        _between("--eval-samples", self.eval_samples, MIN_EVAL_SAMPLES, MAX_POPULATION)
        _choice("--final-start", self.final_start, FINAL_STARTS)
        _require(_number(self.explore) and 0.0 <= self.explore <= 1.0,
                 f"--explore must be a share in [0, 1], got {self.explore!r}")
        _require(self.explore_rounds is None or (_whole(self.explore_rounds) and self.explore_rounds >= 0),
                 f"--explore-rounds must be a whole number from 0 or none, got {self.explore_rounds!r}")
        _require(self.final_move is None or (_whole(self.final_move) and 1 <= self.final_move < NUM_TIMESTEPS),
                 f"--final-move must be a training timestep from 1 to {NUM_TIMESTEPS - 1}, got {self.final_move!r}")
        _at_least("--final-sweeps", self.final_sweeps, 1)
        _at_least("--final-repeats", self.final_repeats, 0)
        _require(_number(self.final_unseen) and 0.0 <= self.final_unseen < 1.0,
                 f"--final-unseen must be a share in [0, 1), got {self.final_unseen!r}")
        _require(self.round_beta is None or (_number(self.round_beta) and math.isfinite(self.round_beta)
                                             and self.round_beta >= 0),
                 f"--round-beta must be a finite number from 0, or none; got {self.round_beta!r}")
        _require(self.final_particles is None or (_whole(self.final_particles)
                                                  and self.eval_samples <= self.final_particles <= MAX_POPULATION),
                 f"--final-particles must be a whole number from --eval-samples ({self.eval_samples}) to "
                 f"{MAX_POPULATION}, or none; got {self.final_particles!r}")
        _require(_number(self.restart) and 0.0 < self.restart <= 1.0,
                 f"--restart must be a fraction of the steps in (0, 1], got {self.restart!r}")
        _require(self.detect_change is None or (_number(self.detect_change) and 0.0 <= self.detect_change < 1.0),
                 f"--detect-change must be a share in [0, 1) or none, got {self.detect_change!r}")
        _require(self.forget_before is None or (_whole(self.forget_before) and self.forget_before >= 1),
                 f"--forget-before must be a round number from 1, or none; got {self.forget_before!r}")
        _between("--examples", self.examples, 0, self.budget)
        _require(self.final_cut is None or (_number(self.final_cut) and 0.0 < self.final_cut < 1.0),
                 f"--final-cut must be a share in (0, 1) or none, got {self.final_cut!r}")
        _choice("--search", self.search, SEARCHES)
        _require(_number(self.search_on_miss) and 0.0 <= self.search_on_miss <= 1.0,
                 f"--search-on-miss must be a share in [0, 1], got {self.search_on_miss!r}")
        _require(self.mild_tilt is None or (_number(self.mild_tilt) and 0.0 < self.mild_tilt <= 1.0),
                 f"--mild-tilt must be a share in (0, 1] or none, got {self.mild_tilt!r}")
        _at_least("--mild-every", self.mild_every, 1)


# What a stored config written before a field existed meant, so that an old session resumes to the same result:
LEGACY = {("sampler", "weights"): "rate", ("sampler", "drift"): 1.0, ("sampler", "beta_schedule"): "linear", ("session", "final_start"): "noise", ("session", "explore"): 0.0,
          ("surrogate", "loss"): "mse", ("session", "explore_rounds"): None, ("surrogate", "discount"): 1.0,
          ("surrogate", "window"): None, ("session", "detect_change"): None, ("session", "forget_before"): None,
          ("session", "final_move"): None, ("session", "final_sweeps"): 1, ("session", "search"): "tilt",
          ("session", "search_on_miss"): 0.0, ("session", "mild_tilt"): None,
          ("session", "mild_final"): False, ("session", "final_repeats"): 0,
          ("session", "final_unseen"): 0.0}


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
                                       clamp=100.0, beta_dot=1.0, beta=(0.5, 2.0), gamma=(0.05, 0.0),
                                       beta_schedule="linear", drift=1.0),
                       feedback=replace(base.feedback, users=("apple", "grape", "banana"), temperature=10.0),
                       session=replace(base.session, acquisition="weight", final_start="noise", explore=0.0,
                                       explore_rounds=None, search="tilt"),
                       surrogate=replace(base.surrogate, kind="pixels", ensemble=1, epochs=200, batch_size=32,
                                         lr=1e-3, ceiling=None, loss="mse"))
    raise ValueError(f"unknown preset {name!r}; choose 'default' or 'seed'")
