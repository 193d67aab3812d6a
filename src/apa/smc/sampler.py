"""② The FKC-SMC sampler: a pure ``step`` function, a ``run`` generator and ``fkc_sample``.

Per step i (σ_i -> σ_{i+1}), with particles z_i and their log-weights (``fkc`` has the formulas):
  1. reweight: evaluate the potential at z_i (one network call: ε, ẑ0, r, L_div, ∇_z φ_i) and add
     the weighting's increment (``weighting``: for exact weights the whole increment of the move
     that brought the particles to z_i, φ_i(z_i) − φ_{i−1}(z_{i−1}) + its proposal log-ratio);
     normalise, measure the ESS
  2. resample: if ESS < threshold·N, draw ancestors with the chosen scheme and reset the weights
     to 1/N; otherwise carry them forward
  3. move: the prior's ancestral transition shifted by the FKC drift δ_i, recorded for the next
     reweight; after the last move exact weights add the last increment, φ_N at the clean sample
The network's output at z_i serves all three, so a step costs one network call; the exact
weights add one reward call at the very end (none when r is read at ẑ0, which the last
deterministic step lands on). A :class:`Kernel` holds what a run fixes; a ``population``
(``smc/population``) says which rows of the whole population this process holds, so the same
step runs one process or one of K, drawing the same noise for the whole population.

Devices: a run lives where the prior's networks live (``prior.device``, declared by every prior; the CPU
by default): particles, log-weights, the reward and its gradient, resampling indices and the
noise. Off the CPU, the noise and the resampling uniforms come from a generator on that device
seeded from the caller's generator (:func:`device_generator`): reproducible from the seed, but
not the CPU's random stream, so a GPU run does not repeat a CPU run bit for bit. There a step
reads one value back to the host, the resampling decision ESS < threshold·N; the finite-value
checks (:class:`fkc.Deferred`) and the trace (ESS, mean reward, ...) stay on the device and are
read once after the last step. On the CPU every check is made at once, as it always was.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from apa.config import SamplerConfig
from apa.priors.base import Prior
from apa.priors.batching import running
from apa.smc import fkc, resampling
from apa.smc.population import WHOLE, Population
from apa.smc.weighting import Move, Weighting, weighting_of
from apa.smc.weights import ess as ess_of
from apa.smc.weights import ess_tensor, normalize, uniform
from apa.types import Indices, LogWeights, Particles

NoiseFn = Callable[[int, tuple[int, ...], torch.Generator | None], torch.Tensor]


@dataclass(frozen=True)
class SMCState:
    particles: Particles  # z_i [N, *event]
    log_weights: LogWeights  # [N] float64: the weights as of the last reweight (``move`` is still to add)
    step: int  # i: the next step to take
    log_normalizer: float = 0.0  # running estimate of log Z_i (Z_N = E_p_disc[exp φ_N] with exact weights)
    origins: Indices | None = None  # [N] index of each particle's initial ancestor
    move: Move | None = None  # the move that brought the particles here, its weight still to complete


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
    """Where the prior's networks run (its declared ``device``), and so where a run's per-step tensors live."""
    return torch.device(prior.device)


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


@dataclass(frozen=True)
class Kernel:
    """The fixed pieces of one run: what every step reads and none changes."""

    prior: Prior
    reward: fkc.Reward
    cfg: SamplerConfig
    sched: fkc.Schedule
    weighting: Weighting
    generator: torch.Generator | None = None  # resampling uniforms and the noise (the same state everywhere)
    historical: Particles | None = None  # earlier particles the diversity term compares against
    noise_fn: NoiseFn = _default_noise  # the whole population's noise of step i: (i, [N, *event], generator)
    deferred: fkc.Deferred | None = None  # None: check every value at once; else read back at the run's end
    population: Population = WHOLE  # how this process's rows relate to the whole population


def kernel_of(prior: Prior, reward: fkc.Reward, cfg: SamplerConfig, sched: fkc.Schedule | None = None,
              **rest) -> Kernel:
    """The run's kernel, its weighting as ``cfg`` names it (``rest``: the other :class:`Kernel` fields)."""
    return Kernel(prior, reward, cfg, sched or fkc.Schedule.of(prior, cfg), weighting_of(cfg), **rest)


def _evaluate(z: Particles, i: int, k: Kernel) -> fkc.PotentialEval:
    """The network call of step i at z_i [n, *event]; the reward terms only when the run is guided."""
    sig, sig_next, _, gamma = k.sched.at(i)
    if k.cfg.guided:
        deterministic = k.prior.transition_variance(sig, sig_next) == 0.0
        return fkc.evaluate_potential(k.prior, k.reward, z, sig, gamma, k.cfg, historical=k.historical, step=i,
                                      need_grad=k.weighting.needs_gradient(deterministic, k.cfg.drift),
                                      deferred=k.deferred)
    return _plain_eval(z, sig, k)


def _plain_eval(z: Particles, sig: float, k: Kernel) -> fkc.PotentialEval:
    """The prior's ε at z [n, *event] alone (no reward call): zero potentials, no gradient."""
    with torch.no_grad():
        eps = k.prior.eps(z, sig)
    zero = torch.zeros(z.shape[0], device=z.device)
    return fkc.PotentialEval(eps, zero, zero, None)


def _noise(i: int, n: int, z: Particles, k: Kernel) -> Particles:
    """This process's rows of the whole population's noise of step i ([n, *event] drawn, like z)."""
    return k.population.local(k.noise_fn(i, (n, *z.shape[1:]), k.generator)).to(z)


def _check(deferred: fkc.Deferred | None) -> bool | None:
    """Whether normalising reads the normaliser back: as ``weights.normalize`` decides, or never
    while the run defers its checks (its increments are checked; the weights follow from them)."""
    return None if deferred is None else False


def _scalar(x: torch.Tensor, deferred: fkc.Deferred | None) -> float | torch.Tensor:
    """A 0-dim tensor as a Python number, or left on its device while the run defers host reads."""
    return x if deferred is not None else float(x)


def _accumulate(log_w: LogWeights, log_z: float, inc: torch.Tensor | None, step: int, k: Kernel
                ) -> tuple[LogWeights, float]:
    """log w + inc (the whole population's increment [N]), normalised (or clamped, the seed's way),
    and the normaliser's increment; unchanged without an increment."""
    if inc is None:
        return log_w, log_z
    fkc.check_finite(inc, "the log-weight increment", step, k.deferred)
    total = log_w + inc
    if k.cfg.clamp is not None:
        return total.clamp(-k.cfg.clamp, k.cfg.clamp), log_z
    return normalize(total, _check(k.deferred)), log_z + _scalar(torch.logsumexp(total, 0), k.deferred)


def _gathered(k: Kernel, inc: torch.Tensor | None) -> torch.Tensor | None:
    return None if inc is None else k.population.gather(inc)


def _move(z: Particles, pe: fkc.PotentialEval, i: int, noise: Particles, grad_phi: Particles | None,
          k: Kernel) -> tuple[Particles, Move]:
    """Step 3: z_{i+1} [n, *event] from the prior's ancestral kernel, shifted by the FKC drift where
    the weighting shifts, and the move's record for the weights."""
    sig, sig_next, beta, gamma = k.sched.at(i)
    variance = k.prior.transition_variance(sig, sig_next)
    shift = None
    if k.cfg.guided and grad_phi is not None and k.weighting.shifts(variance == 0.0):
        shift = fkc.drift_shift(k.cfg.drift * grad_phi, k.prior.g2_ds(sig, sig_next))
    with torch.no_grad():
        z_next = k.prior.transition(z, pe.eps, sig, sig_next, noise, shift=shift)
    return z_next, Move(pe.potential(beta, gamma), noise, shift, variance)


def _phi_end(z_end: Particles, pe: fkc.PotentialEval, move: Move, i: int, k: Kernel) -> torch.Tensor:
    """φ_N at the clean particles z_N [n]: read off the last step's r(ẑ0) where the deterministic last
    step landed on ẑ0, else one reward call."""
    beta_n, gamma_n = k.sched.beta_gamma(-1)
    if move.variance == 0.0 and k.cfg.reward_at == "tweedie":
        return pe.potential(beta_n, gamma_n)  # z_N = ẑ0(z_{N-1}): r(z_N) is already known
    return fkc.clean_potential(k.reward, z_end, beta_n, gamma_n, k.cfg, k.historical, i, k.deferred)


def reweighs(i: int, cfg: SamplerConfig) -> bool:
    """Whether step i of a guided run evaluates the potential and reweights: every ``reweight_every``-th
    step counted back from the last (so the last step always does)."""
    return (cfg.steps - 1 - i) % cfg.reweight_every == 0


def _prior_step(state: SMCState, k: Kernel) -> tuple[SMCState, StepInfo]:
    """A step between reweights: the prior's own move (ε alone, no shift), the weights and the last
    reweighted step's move carried unchanged. Exact: the next increment, φ_j(z_j) − φ_i(z_i) + the
    log-ratio of move i, covers every move since step i, the unshifted ones adding nothing."""
    i, z = state.step, state.particles
    sig = k.sched.at(i)[0]
    z_next, _ = _move(z, _plain_eval(z, sig, k), i, _noise(i, state.log_weights.shape[0], z, k), None, k)
    ess = _scalar(ess_tensor(state.log_weights, _check(k.deferred)), k.deferred)
    info = StepInfo(i, sig, ess, False, float("nan"), 0.0, _unique(state.origins, k.deferred))
    return replace(state, particles=z_next, step=i + 1), info


def step(state: SMCState, k: Kernel) -> tuple[SMCState, StepInfo]:
    """One FKC-SMC step σ_i -> σ_{i+1}: reweight -> resample -> move. Pure: returns a new state and info.

    The state holds this process's particles [n] and the whole population's log-weights and origins
    [N] (n = N in one process; ``k.population`` says how they relate). ``k.deferred``: None checks
    every value at once and returns Python numbers in the info; a collector records the checks and
    leaves the info's numbers as device tensors, so the step reads back only the resampling decision.
    """
    i, z, origins, pop = state.step, state.particles, state.origins, k.population
    if k.cfg.guided and not reweighs(i, k.cfg):
        return _prior_step(state, k)
    pe = _evaluate(z, i, k)
    beta = k.sched.at(i)[2]
    grad_phi = beta * pe.grad if pe.grad is not None else None
    inc = _gathered(k, k.weighting.increment(i, pe, z, grad_phi, state.move, k))
    log_w, log_z = _accumulate(state.log_weights, state.log_normalizer, inc, i, k)
    n = log_w.shape[0]  # the whole population
    ess = _scalar(ess_tensor(log_w, _check(k.deferred)), k.deferred)
    reward_mean = (_scalar((torch.exp(normalize(log_w, _check(k.deferred))) * pop.gather(pe.reward).double()).sum(),
                           k.deferred)
                   if k.cfg.guided else float("nan"))
    resampled = (k.weighting.weighs and k.cfg.resample != "none"
                 and resampling.should_resample(ess, n, k.cfg.ess_threshold))
    if resampled:
        idx = resampling.get_resampler(k.cfg.resample)(k.generator, log_w, n)  # ancestors [N], the same everywhere
        take = lambda t: pop.take(t, idx)  # noqa: E731
        z, pe, log_w = take(z), pe.apply(take), uniform(n, device=log_w.device)
        grad_phi = beta * pe.grad if pe.grad is not None else None  # the ancestors' (elementwise: the same bits)
        origins = origins[idx] if origins is not None else None
    z_next, move = _move(z, pe, i, _noise(i, n, z, k), grad_phi, k)
    if i == k.cfg.steps - 1 and k.weighting.needs_end:  # the last move's increment completes the weights
        log_w, log_z = _accumulate(log_w, log_z, _gathered(k, k.weighting.final(move, _phi_end(z_next, pe, move, i, k))),
                                   i, k)
    grad_norm = (_scalar(pop.gather(grad_phi.reshape(z.shape[0], -1).norm(dim=1)).mean(), k.deferred)
                 if grad_phi is not None else 0.0)
    info = StepInfo(i, k.sched.at(i)[0], ess, resampled, reward_mean, grad_norm, _unique(origins, k.deferred))
    return SMCState(z_next.detach(), log_w, i + 1, log_z, origins, move), info


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
               initial: Particles | None = None, start_step: int = 0, population: Population = WHOLE) -> SMCState:
    """Particles from the noise-end marginal (or given ones at grid point ``start_step``), equal weights:
    the whole population's draw [N, *event], of which this process keeps its rows."""
    if not 0 <= start_step < len(sched.sigmas) - 1:
        raise ValueError(f"start_step must be in [0, {len(sched.sigmas) - 2}], got {start_step}")
    if initial is None and start_step:
        raise ValueError("a run that starts after the noise end (start_step > 0) needs its initial particles")
    z = prior.sample_initial(num_particles, sched.at(0)[0], generator) if initial is None else initial
    if z.shape[0] != num_particles:
        raise ValueError(f"initial particles have {z.shape[0]} rows, expected particles={num_particles}")
    dev = device_of(prior)
    z = population.local(z).to(dev)  # once per run (a no-op where the particles were drawn on the prior's device)
    return SMCState(z, uniform(num_particles, device=dev), start_step, 0.0, torch.arange(num_particles, device=dev))


def run(state: SMCState, k: Kernel) -> Iterator[tuple[SMCState, StepInfo]]:
    """Yield (state, info) after every step until the grid is exhausted."""
    while state.step < k.cfg.steps:
        state, info = step(state, k)
        yield state, info


def fkc_sample(prior: Prior, reward: fkc.Reward, config: SamplerConfig | None = None, *,
               generator: torch.Generator | None = None, historical: Particles | None = None,
               initial: Particles | None = None, start_step: int = 0, noise_fn: NoiseFn = _default_noise,
               progress: bool = False, desc: str = "fkc", host_sync: bool | None = None,
               population: Population = WHOLE) -> SMCResult:
    """Sample p_disc·exp(β_end·r) with FKC-SMC. ``reward``: [N, *event] -> [N], differentiable.

    ``config``: every sampler setting (default ``SamplerConfig()``), e.g.
    ``fkc_sample(prior, r, SamplerConfig(particles=2048, steps=25, beta=(0.5, 2.0)))``; the keywords are
    the run's inputs, never settings. Returns the final
    particles [N, *event], normalised log-weights [N] and the per-step trace. With ``beta=(0, 0)``
    it is the prior's plain ancestral sampler. ``initial`` particles [N, *event] replace the draw
    from the noise end; with ``start_step`` k they stand at σ_k and the run takes steps k..S−1
    (its target is then the plain sampler's law from those particles, tilted by exp(φ_N)).

    The run lives on the prior's device (module docstring); the result's tensors are there too.
    ``host_sync``: True checks every value at once and reads the trace back at every step, False
    defers both to the end of the run; None (the default): True on the CPU, False elsewhere. Both
    give the same numbers. ``population``: this process's share of a population split over several
    (``smc/distributed``); the result then holds this process's particles [n].
    """
    cfg = config or SamplerConfig()
    dev = device_of(prior)
    kernel = kernel_of(prior, reward, cfg, generator=device_generator(generator, dev),
                       historical=historical.to(dev) if historical is not None else None, noise_fn=noise_fn,
                       deferred=fkc.Deferred() if (dev.type != "cpu" if host_sync is None else not host_sync) else None,
                       population=population)
    state = init_state(prior, cfg.particles, kernel.sched, kernel.generator, initial, start_step, population)
    state, trace, log_z = drive(state, kernel, progress=progress and population.leads, desc=desc)
    return SMCResult(state.particles, normalize(state.log_weights), trace, log_z, state.origins)


def drive(state: SMCState, k: Kernel, *, progress: bool = False, desc: str = "fkc"
          ) -> tuple[SMCState, list[StepInfo], float]:
    """:func:`run` to the end of the grid: (last state, trace, log Z), the deferred checks raised."""
    trace = []
    with running(k.prior):  # a batching prior's leader waits for this run's calls too
        for state, info in tqdm(run(state, k), total=k.cfg.steps - state.step, disable=not progress, desc=desc,
                                leave=False):
            trace.append(info)
    log_z = state.log_normalizer
    if k.deferred is not None:  # the run's one read back of its checks and trace
        k.deferred.raise_first()
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
        cfg = replace(config or SamplerConfig(), particles=min(batch_size, n - start), steps=num_steps, beta=(0.0, 0.0))
        res = fkc_sample(prior, zero_reward, cfg, generator=generator)
        out.append(prior.decode(res.particles) if decode else res.particles)
    return torch.cat(out)


@torch.no_grad()
def renoised(prior, x0: torch.Tensor, t: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """Clean particles x0 [n, *event] noised to training timestep t (z = x0 + σ_t·ξ) and denoised by the
    prior's own ancestral steps over the respaced grid below σ_t: [n, *event]."""
    sigma = float(prior.sigma_of_t(torch.tensor([t])))
    grid = prior.sigmas(steps).to(x0.device)
    grid = torch.cat([torch.tensor([sigma], device=x0.device), grid[grid < sigma]])
    z = x0 + sigma * torch.randn(x0.shape, generator=gen).to(x0)
    for s, s_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        z = prior.transition(z, prior.eps(z, s), s, s_next, torch.randn(z.shape, generator=gen).to(z))
    return z
