"""② The FKC-SMC sampler: a pure ``step`` function, a ``run`` generator and ``fkc_sample``.

Per step i (σ_i -> σ_{i+1}), with particles z_i and their log-weights (``fkc`` has the formulas):
  1. reweight: evaluate the potential at z_i (one network call: ε, ẑ0, r, L_div, ∇_z φ_i) and
     complete the weight: + φ_i(z_i) for exact weights (the rest of the increment was added by
     the previous move), or the rate increment; normalise, measure the ESS
  2. resample: if ESS < threshold·N, draw ancestors with the chosen scheme and reset the weights
     to 1/N; otherwise carry them forward
  3. move: the prior's ancestral transition shifted by the FKC drift δ_i; exact weights add
     −φ_i(z_i) and the proposal log-ratio now, and at the last step φ_N at the clean sample
The network's output at z_i serves all three, so a step costs one network call; the exact
weights add one reward call at the very end (none when r is read at ẑ0, which the last
deterministic step lands on).

Devices: a run lives where the prior's networks live (``prior.device``; the CPU for priors
without one): particles, log-weights, the reward and its gradient, resampling indices and the
noise. Off the CPU, the noise and the resampling uniforms come from a generator on that device
seeded from the caller's generator (:func:`device_generator`): reproducible from the seed, but
not the CPU's random stream, so a GPU run does not repeat a CPU run bit for bit. There a step
reads one value back to the host, the resampling decision ESS < threshold·N; the finite-value
checks (:class:`fkc.Deferred`) and the trace (ESS, mean reward, ...) stay on the device and are
read once after the last step. On the CPU every check is made at once, as it always was.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from tqdm.auto import tqdm

from apa.config import SamplerConfig
from apa.priors.base import Prior
from apa.priors.batching import running
from apa.smc import fkc, resampling
from apa.smc.weights import ess as ess_of
from apa.smc.weights import ess_tensor, normalize, uniform
from apa.types import Indices, LogWeights, Particles

if TYPE_CHECKING:
    from apa.smc.distributed import Comm

NoiseFn = Callable[[int, tuple[int, ...], torch.Generator | None], torch.Tensor]


@dataclass(frozen=True)
class SMCState:
    particles: Particles  # z_i [N, *event]
    log_weights: LogWeights  # [N] float64; after a move with exact weights they hold −φ_i and the
    #                          proposal log-ratio, completed by +φ_{i+1} at the next reweight
    step: int  # i: the next step to take
    log_normalizer: float = 0.0  # running estimate of log Z_i (Z_N = E_p_disc[exp φ_N] with exact weights)
    origins: Indices | None = None  # [N] index of each particle's initial ancestor


@dataclass(frozen=True)
class StepInfo:
    """What one step did. Python numbers, except while a run keeps its trace on a device
    (``host_sync=False``): :func:`run` then yields 0-dim tensors, which ``fkc_sample`` reads back
    once at the end (:func:`host_trace`)."""

    step: int
    sigma: float
    ess: float  # after reweighting, before any resampling at this step
    resampled: bool
    reward_mean: float  # weighted mean of r at this step (after reweighting)
    grad_norm: float  # mean ‖β·∇φ‖ over particles
    unique_origins: int  # distinct initial ancestors alive after this step


@dataclass(frozen=True)
class SMCResult:
    particles: Particles  # final z_N [N, *event]
    log_weights: LogWeights  # [N] normalised
    trace: list[StepInfo] = field(default_factory=list)
    log_normalizer: float = 0.0
    origins: Indices | None = None

    @property
    def weights(self) -> torch.Tensor:
        return torch.exp(self.log_weights)

    @property
    def ess(self) -> float:
        return ess_of(self.log_weights)

    def cpu(self) -> "SMCResult":
        """The same result with its tensors on the host (a copy only where they live elsewhere)."""
        return SMCResult(self.particles.cpu(), self.log_weights.cpu(), self.trace, self.log_normalizer,
                         None if self.origins is None else self.origins.cpu())

    def resample(self, num_samples: int | None = None, generator: torch.Generator | None = None,
                 scheme: str = "systematic") -> Particles:
        """Equal-weight particles drawn from the weighted population: [M, *event]."""
        n = num_samples or self.particles.shape[0]
        return self.particles[resampling.get_resampler(scheme)(generator, self.log_weights, n)]


def _default_noise(step: int, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn where the generator lives (the CPU without one)."""
    return torch.randn(shape, generator=generator, device=None if generator is None else generator.device)


def device_of(prior: Prior) -> torch.device:
    """Where the prior's networks run, and so where a run's per-step tensors live (CPU by default)."""
    return torch.device(getattr(prior, "device", None) or "cpu")


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` for a run whose caller gave ``generator``: the same one on the CPU
    (or where it already lives); elsewhere a new one seeded by one draw from it, so the run is
    reproducible from the caller's seed (a fresh random seed without a generator)."""
    if device.type == "cpu" or (generator is not None and generator.device == device):
        return generator
    out = torch.Generator(device=device)
    if generator is None:
        out.seed()
        return out
    return out.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))


def _evaluate(state: SMCState, prior: Prior, reward: fkc.Reward, cfg: SamplerConfig, sched: fkc.Schedule,
              historical: Particles | None, deferred: fkc.Deferred | None) -> fkc.PotentialEval:
    """The network call of step i at z_i; the reward terms only when the run is guided."""
    i, z = state.step, state.particles
    sig, sig_next, _, gamma = sched.at(i)
    if cfg.guided:
        deterministic = prior.transition_variance(sig, sig_next) == 0.0
        need_grad = not (cfg.weights == "exact" and (deterministic or cfg.drift == 0.0))  # no shift to compute
        return fkc.evaluate_potential(prior, reward, z, sig, gamma, cfg, historical=historical, step=i,
                                      need_grad=need_grad, deferred=deferred)
    with torch.no_grad():
        eps = prior.eps(z, sig)
    zero = torch.zeros(z.shape[0], device=z.device)
    return fkc.PotentialEval(eps, zero, zero, None)


def _check(deferred: fkc.Deferred | None) -> bool | None:
    """Whether normalising reads the normaliser back: as ``weights.normalize`` decides, or never
    while the run defers its checks (its increments are checked; the weights follow from them)."""
    return None if deferred is None else False


def _scalar(x: torch.Tensor, deferred: fkc.Deferred | None) -> float | torch.Tensor:
    """A 0-dim tensor as a Python number, or left on its device while the run defers host reads."""
    return x if deferred is not None else float(x)


def _accumulate(cfg: SamplerConfig, log_w: LogWeights, log_z: float, inc: torch.Tensor,
                step: int, deferred: fkc.Deferred | None = None) -> tuple[LogWeights, float]:
    """log w + inc, normalised (or clamped, the seed's way), and the normaliser's increment."""
    fkc.check_finite(inc, "the log-weight increment", step, deferred)
    total = log_w + inc
    if cfg.clamp is not None:
        return total.clamp(-cfg.clamp, cfg.clamp), log_z
    return normalize(total, _check(deferred)), log_z + _scalar(torch.logsumexp(total, 0), deferred)


def _reweight(state: SMCState, pe: fkc.PotentialEval, prior: Prior, cfg: SamplerConfig,
              sched: fkc.Schedule, grad_phi: Particles | None,
              deferred: fkc.Deferred | None, comm: "Comm | None" = None) -> tuple[LogWeights, float]:
    """Step 1: complete the log-weights of the particles z_i. -> (log-weights [N], log Z).
    A sharded run's increments [N/K] are gathered into the whole population's [N] first."""
    if not (cfg.guided and cfg.weights != "none"):
        return state.log_weights, state.log_normalizer
    i = state.step
    _, _, beta, gamma = sched.at(i)
    if cfg.weights == "exact":
        inc = pe.potential(beta, gamma)  # + φ_i(z_i)
    else:
        inc = fkc.rate_increment(cfg, pe, prior, state.particles, i, sched, grad_phi)
    return _accumulate(cfg, state.log_weights, state.log_normalizer, _gather(comm, inc), i, deferred)


def _move(z: Particles, pe: fkc.PotentialEval, prior: Prior, reward: fkc.Reward, cfg: SamplerConfig,
          sched: fkc.Schedule, i: int, noise: Particles, grad_phi: Particles | None,
          historical: Particles | None, deferred: fkc.Deferred | None) -> tuple[Particles, torch.Tensor | None]:
    """Step 3: z_{i+1} from the shifted ancestral kernel, and the exact weights' share of the
    increment (−φ_i(z_i) + proposal log-ratio, + φ_N(z_N) on the last step): ([N, *event], [N] | None)."""
    sig, sig_next, beta, gamma = sched.at(i)
    variance = prior.transition_variance(sig, sig_next)
    exact = cfg.guided and cfg.weights == "exact"
    shift = None
    if cfg.guided and grad_phi is not None and not (exact and variance == 0.0):  # none where the step is deterministic
        shift = fkc.drift_shift(cfg.drift * grad_phi, prior.g2_ds(sig, sig_next))
    with torch.no_grad():
        z_next = prior.transition(z, pe.eps, sig, sig_next, noise, shift=shift)
    if not exact:
        return z_next, None
    part = -pe.potential(beta, gamma)
    if shift is not None:
        part = part + fkc.proposal_log_ratio(noise, shift, variance)
    if i == cfg.steps - 1:
        beta_n, gamma_n = sched.beta_gamma(-1)
        if variance == 0.0 and cfg.reward_at == "tweedie":
            part = part + pe.potential(beta_n, gamma_n)  # z_N = ẑ0(z_{N-1}): r(z_N) is already known
        else:
            part = part + fkc.clean_potential(reward, z_next, beta_n, gamma_n, cfg, historical, i, deferred)
    return z_next, part


def step(state: SMCState, prior: Prior, reward: fkc.Reward, cfg: SamplerConfig, sched: fkc.Schedule, *,
         generator: torch.Generator | None = None, historical: Particles | None = None,
         noise_fn: NoiseFn = _default_noise, deferred: fkc.Deferred | None = None,
         comm: "Comm | None" = None) -> tuple[SMCState, StepInfo]:
    """One FKC-SMC step σ_i -> σ_{i+1}: reweight -> resample -> move. Pure: returns a new state and info.

    ``deferred``: None checks every value at once and returns Python numbers in the info (the CPU
    way); a collector records the checks and leaves the info's numbers as device tensors, so the
    step reads back only the resampling decision.

    ``comm`` (:mod:`apa.smc.distributed`): None for one process. A sharded run's state holds this
    rank's particles [N/K] and the whole population's log-weights and origins [N]; the per-particle
    values of the weights are gathered, so every weight formula below runs on all N, identically on
    every rank, and resampling exchanges the ancestors' particles between ranks.
    """
    i, z, origins = state.step, state.particles, state.origins
    pe = _evaluate(state, prior, reward, cfg, sched, historical, deferred)
    beta = sched.at(i)[2]
    grad_phi = beta * pe.grad if pe.grad is not None else None
    log_w, log_z = _reweight(state, pe, prior, cfg, sched, grad_phi, deferred, comm)
    n = log_w.shape[0]  # the whole population (z holds N/K of it in a sharded run)
    ess = _scalar(ess_tensor(log_w, _check(deferred)), deferred)
    reward_mean = (_scalar((torch.exp(normalize(log_w, _check(deferred))) * _gather(comm, pe.reward).double()).sum(),
                           deferred)
                   if cfg.guided
                   else float("nan"))
    resampled = (cfg.guided and cfg.weights != "none" and cfg.resample != "none"
                 and resampling.should_resample(ess, n, cfg.ess_threshold))
    if resampled:
        idx = resampling.get_resampler(cfg.resample)(generator, log_w, n)  # ancestors [N], the same on every rank
        take = (lambda t: t[idx]) if comm is None else (lambda t: comm.take(t, idx))  # noqa: E731
        z, pe, log_w = take(z), pe.apply(take), uniform(n, device=log_w.device)
        grad_phi = beta * pe.grad if pe.grad is not None else None  # the ancestors' (elementwise: the same bits)
        origins = origins[idx] if origins is not None else None
    noise = noise_fn(i, tuple(z.shape), generator).to(z)
    z_next, part = _move(z, pe, prior, reward, cfg, sched, i, noise, grad_phi, historical, deferred)
    if part is not None and i == cfg.steps - 1:
        log_w, log_z = _accumulate(cfg, log_w, log_z, _gather(comm, part), i, deferred)  # the last increment completes the weights
    elif part is not None:
        log_w = log_w + _gather(comm, part)
    grad_norm = (_scalar(_gather(comm, grad_phi.reshape(z.shape[0], -1).norm(dim=1)).mean(), deferred)
                 if grad_phi is not None else 0.0)
    info = StepInfo(i, sched.at(i)[0], ess, resampled, reward_mean, grad_norm, _unique(origins, deferred))
    return SMCState(z_next.detach(), log_w, i + 1, log_z, origins), info


def _gather(comm: "Comm | None", x: torch.Tensor) -> torch.Tensor:
    """This rank's per-particle values [N/K, ...] gathered into the population's [N, ...] (x itself
    in one process)."""
    return x if comm is None else comm.all_gather(x)


def _unique(origins: Indices | None, deferred: fkc.Deferred | None) -> int | torch.Tensor:
    """Distinct initial ancestors among ``origins`` [N] (-1 when not tracked), counted on their device."""
    if origins is None:
        return -1
    alive = torch.zeros(origins.shape[0], dtype=torch.bool, device=origins.device).index_fill_(0, origins, True)
    return alive.sum() if deferred is not None else int(alive.sum())


def host_trace(trace: list[StepInfo]) -> list[StepInfo]:
    """A trace whose numbers may be device tensors, with Python numbers instead: one host read in all."""
    names = ("ess", "reward_mean", "grad_norm", "unique_origins")
    cells = [(k, f) for k, info in enumerate(trace) for f in names if isinstance(getattr(info, f), torch.Tensor)]
    if not cells:
        return trace
    values = torch.stack([getattr(trace[k], f).double() for k, f in cells]).tolist()
    changes: dict[int, dict] = {}
    for (k, f), v in zip(cells, values):
        changes.setdefault(k, {})[f] = int(v) if f == "unique_origins" else v
    return [replace(info, **changes.get(k, {})) for k, info in enumerate(trace)]


def init_state(prior: Prior, num_particles: int, sched: fkc.Schedule, generator: torch.Generator | None,
               initial: Particles | None = None, start_step: int = 0) -> SMCState:
    """Particles from the noise-end marginal (or given ones at grid point ``start_step``), equal weights."""
    if not 0 <= start_step < len(sched.sigmas) - 1:
        raise ValueError(f"start_step must be in [0, {len(sched.sigmas) - 2}], got {start_step}")
    if initial is None and start_step:
        raise ValueError("a run that starts after the noise end (start_step > 0) needs its initial particles")
    z = prior.sample_initial(num_particles, sched.at(0)[0], generator) if initial is None else initial
    if z.shape[0] != num_particles:
        raise ValueError(f"initial particles have {z.shape[0]} rows, expected particles={num_particles}")
    dev = device_of(prior)
    z = z.to(dev)  # once per run (a no-op where the particles were drawn on the prior's device)
    return SMCState(z, uniform(num_particles, device=dev), start_step, 0.0, torch.arange(num_particles, device=dev))


def run(state: SMCState, prior: Prior, reward: fkc.Reward, cfg: SamplerConfig, sched: fkc.Schedule, *,
        generator: torch.Generator | None = None, historical: Particles | None = None,
        noise_fn: NoiseFn = _default_noise, deferred: fkc.Deferred | None = None, comm: "Comm | None" = None
        ) -> Iterator[tuple[SMCState, StepInfo]]:
    """Yield (state, info) after every step until the grid is exhausted (``deferred``, ``comm``: see :func:`step`)."""
    while state.step < cfg.steps:
        state, info = step(state, prior, reward, cfg, sched, generator=generator, historical=historical,
                           noise_fn=noise_fn, deferred=deferred, comm=comm)
        yield state, info


def sampler_config(config: SamplerConfig | None = None, **overrides) -> SamplerConfig:
    """``config`` (default: ``SamplerConfig()``) with some fields replaced; unknown names are refused."""
    names = {f.name for f in fields(SamplerConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown sampler settings {unknown}; SamplerConfig has {sorted(names)}")
    return replace(config or SamplerConfig(), **{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in overrides.items()})


def fkc_sample(prior: Prior, reward: fkc.Reward, config: SamplerConfig | None = None, *,
               generator: torch.Generator | None = None, historical: Particles | None = None,
               initial: Particles | None = None, start_step: int = 0, noise_fn: NoiseFn = _default_noise,
               progress: bool = False, desc: str = "fkc", host_sync: bool | None = None, **overrides) -> SMCResult:
    """Sample p_disc·exp(β_end·r) with FKC-SMC. ``reward``: [N, *event] -> [N], differentiable.

    ``config`` is the whole sampler configuration; keywords named like its fields override it
    (``fkc_sample(prior, r, particles=2048, steps=25, beta=(0.5, 2.0))``). Returns the final
    particles [N, *event], normalised log-weights [N] and the per-step trace. With ``beta=(0, 0)``
    it is the prior's plain ancestral sampler. ``initial`` particles [N, *event] replace the draw
    from the noise end; with ``start_step`` k they stand at σ_k and the run takes steps k..S−1
    (its target is then the plain sampler's law from those particles, tilted by exp(φ_N)).

    The run lives on the prior's device (module docstring); the result's tensors are there too.
    ``host_sync``: True checks every value at once and reads the trace back at every step, False
    defers both to the end of the run; None (the default): True on the CPU, False elsewhere. Both
    give the same numbers.
    """
    cfg = sampler_config(config, **overrides)
    sched, generator, deferred, historical, state = prepare(prior, cfg, generator, host_sync, historical, initial,
                                                            start_step)
    state, trace, log_z = drive(state, prior, reward, cfg, sched, generator=generator, historical=historical,
                                noise_fn=noise_fn, deferred=deferred, progress=progress, desc=desc)
    return SMCResult(state.particles, normalize(state.log_weights), trace, log_z, state.origins)


def prepare(prior: Prior, cfg: SamplerConfig, generator: torch.Generator | None, host_sync: bool | None,
            historical: Particles | None, initial: Particles | None, start_step: int
            ) -> tuple[fkc.Schedule, torch.Generator | None, fkc.Deferred | None, Particles | None, SMCState]:
    """What a run needs on the prior's device before its first step: the schedule, the generator,
    the deferred checks (off the CPU unless ``host_sync``), the historical particles, the first state."""
    sched = fkc.Schedule.of(prior, cfg)
    dev = device_of(prior)
    generator = device_generator(generator, dev)
    deferred = fkc.Deferred() if (dev.type != "cpu" if host_sync is None else not host_sync) else None
    historical = historical.to(dev) if historical is not None else None
    state = init_state(prior, cfg.particles, sched, generator, initial, start_step)
    return sched, generator, deferred, historical, state


def drive(state: SMCState, prior: Prior, reward: fkc.Reward, cfg: SamplerConfig, sched: fkc.Schedule, *,
          generator: torch.Generator | None, historical: Particles | None, noise_fn: NoiseFn,
          deferred: fkc.Deferred | None, progress: bool, desc: str, comm: "Comm | None" = None
          ) -> tuple[SMCState, list[StepInfo], float]:
    """:func:`run` to the end of the grid: (last state, trace, log Z), the deferred checks raised."""
    trace = []
    with running(prior):  # a batching prior's leader waits for this run's calls too
        for state, info in tqdm(run(state, prior, reward, cfg, sched, generator=generator, historical=historical,
                                    noise_fn=noise_fn, deferred=deferred, comm=comm), total=cfg.steps - state.step,
                                disable=not progress, desc=desc, leave=False):
            trace.append(info)
    log_z = state.log_normalizer
    if deferred is not None:  # the run's one read back of its checks and trace
        deferred.raise_first()
        trace, log_z = host_trace(trace), float(log_z)
    return state, trace, log_z


def zero_reward(z: Particles) -> torch.Tensor:
    """The reward before any feedback: 0 for every particle. [N, *event] -> [N]."""
    return torch.zeros(z.shape[0], device=z.device)


def sample_prior(prior: Prior, n: int, num_steps: int, generator: torch.Generator | None = None,
                 batch_size: int = 128, decode: bool = True, config: SamplerConfig | None = None) -> torch.Tensor:
    """n plain samples (β = 0) drawn in batches and decoded: [n, C, H, W]; or, with ``decode=False``,
    the clean particles themselves [n, *event] (what a reward reads). ``config``: the sampler's
    other settings (a session's; default ``SamplerConfig()``). The one plain-prior sampler."""
    out = []
    for start in range(0, n, batch_size):
        res = fkc_sample(prior, zero_reward, config, particles=min(batch_size, n - start), steps=num_steps,
                         beta=(0.0, 0.0), generator=generator)
        out.append(prior.decode(res.particles) if decode else res.particles)
    return torch.cat(out)
