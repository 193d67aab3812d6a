"""The final batch's Metropolis-Hastings move: the prior's re-noise-and-denoise proposal, accepted by the tilt."""

import math

import torch

from apa.priors.calls import counting
from apa.priors.ddpm import DDPMPrior
from apa.priors.unet import UNet, UNetConfig
from apa.session.final import cut_at, moved, renoised, repeats, unrepeated, with_cut


def tiny_prior() -> DDPMPrior:
    torch.manual_seed(0)
    return DDPMPrior(UNet(UNetConfig(channels=(8, 8, 8), time_dim=16, groups=4)), name="mnist")


def test_a_flat_reward_accepts_every_proposal_and_a_move_costs_the_steps_below_its_timestep(one_thread):
    prior, x = tiny_prior(), torch.rand(6, 1, 28, 28) * 2 - 1
    expected = renoised(prior, x, 500, 10, torch.Generator().manual_seed(1))
    below = int((prior.sigmas(10) < float(prior.sigma_of_t(torch.tensor([500])))).sum())  # grid points under σ_500
    with counting() as calls:
        out = moved(prior, lambda z: torch.zeros(z.shape[0]), x, 500, 2.0, 10, torch.Generator().manual_seed(1))
    assert torch.equal(out, expected) and calls.eps == 6 * below
    assert (out - x).abs().mean() > 0.1  # at t = 500 the images change, not by rounding


def test_a_proposal_the_tilt_rejects_leaves_the_particle(one_thread):
    prior, x = tiny_prior(), torch.rand(5, 1, 28, 28) * 2 - 1

    def reward(z):  # the particles themselves score 0, anything else −10⁹: every move is refused
        return torch.where((z - x).flatten(1).abs().amax(dim=1) == 0, 0.0, -1e9)

    assert torch.equal(moved(prior, reward, x, 300, 1.0, 8, torch.Generator().manual_seed(0)), x)


def test_acceptance_follows_exp_beta_delta_r(one_thread):
    """Δr = log(0.3)/β for every proposal: each is accepted with probability 0.3. Over 400 particles the
    accepted count is binomial (sd 9.2); 4 sd catches acceptance by exp(Δr) (β ignored: 0.55) or by
    exp(−βΔr) (always)."""
    prior, x = tiny_prior(), torch.rand(400, 1, 28, 28) * 2 - 1
    beta = 2.0

    def reward(z):
        return torch.where((z - x).flatten(1).abs().amax(dim=1) == 0, 0.0, math.log(0.3) / beta)

    out = moved(prior, reward, x, 200, beta, 4, torch.Generator().manual_seed(3))
    accepted = int(((out - x).flatten(1).abs().amax(dim=1) > 0).sum())
    assert abs(accepted - 120) < 4 * 9.2


def test_sweeps_carry_each_particles_reward_from_the_state_it_holds(one_thread):
    """r = 0 at the starting particles and log(0.3)/β anywhere else. Sweep 1 is the one-sweep move (same
    generator); in sweep 2 a particle that moved proposes between two points of equal reward, so it
    moves again with probability 1, and one that stayed moves with probability 0.3. A move that kept
    reading r at the starting particles would accept the moved ones' second proposals with 0.3 only
    (about 84 of 120 left behind). The reward is read once per sweep beside the starting read."""
    prior, x = tiny_prior(), torch.rand(400, 1, 28, 28) * 2 - 1
    beta, reads = 2.0, []

    def reward(z):
        reads.append(z.shape[0])
        return torch.where((z - x).flatten(1).abs().amax(dim=1) == 0, 0.0, math.log(0.3) / beta)

    once = moved(prior, reward, x, 200, beta, 4, torch.Generator().manual_seed(3))
    reads.clear()
    twice = moved(prior, reward, x, 200, beta, 4, torch.Generator().manual_seed(3), sweeps=2)
    assert reads == [400, 400, 400]
    first = (once - x).flatten(1).abs().amax(dim=1) > 0
    again = (twice - once).flatten(1).abs().amax(dim=1) > 0
    assert bool(again[first].all())
    stayed = int(again[~first].sum())  # binomial(≈280, 0.3): sd 7.7
    assert abs(stayed - 0.3 * int((~first).sum())) < 4 * 7.7


def batch_with_repeats() -> tuple[torch.Tensor, torch.Tensor]:
    """40 independent uniform images, then 6 repeats of earlier ones: 3 exact copies and 3 siblings
    1e-3 away (independent 784-pixel images lie about 11 apart). Returns (x [46, 1, 28, 28], repeat mask [46])."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(40, 1, 28, 28, generator=gen) * 2 - 1
    copies = torch.cat([x[[3, 17, 17]], x[[8, 21, 30]] + 1e-3 * torch.randn(3, 1, 28, 28, generator=gen)])
    return torch.cat([x, copies]), torch.arange(46) >= 40


def test_repeats_are_the_later_of_images_nearer_than_half_the_batchs_spacing():
    """The exact copies and the near siblings are flagged, each after the image it repeats; the original
    (kept first) and the other independent images are not; a reversed batch flags the originals instead.
    Detects a rule that flags both of a pair, misses the copies, or flags independent images."""
    x, expected = batch_with_repeats()
    assert torch.equal(repeats(x), expected)
    flipped = repeats(x.flip(0)).flip(0)
    assert int(flipped.sum()) == 6 and bool(flipped[[3, 17, 8, 21, 30, 41]].all())  # 17's copies: the last one kept
    assert not bool(repeats(x[:40]).any()) and not bool(repeats(x[:1]).any())


def test_a_batch_mostly_repeats_reads_its_line_from_the_images_that_repeat_no_other():
    """30 independent images, 20 exact copies of the first 20 and 8 siblings 1e-3 away from the next 8: 40 of
    the 58 images lie 0 from another, so the whole batch's median nearest-other distance is 0, and a line read
    from it catches the exact copies alone. Read again over the 38 images it keeps, the median is an independent
    image's spacing, and the siblings are caught too. Detects a line read once over the whole batch, and
    distances whose rounding leaves an exact copy apart from its original."""
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(30, 1, 28, 28, generator=gen) * 2 - 1
    x = torch.cat([x, x[:20], x[20:28] + 1e-3 * torch.randn(8, 1, 28, 28, generator=gen)])
    flat = x.flatten(1).double()
    d = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    assert float(d.min(dim=1).values.median()) == 0.0
    assert torch.equal(repeats(x), torch.arange(58) >= 30)


def test_only_the_repeats_are_moved_and_pay_and_the_moves_stop_once_none_repeats(one_thread):
    """A flat reward accepts every move: one pass moves the 6 repeats alone (6 × the steps below t in ε rows,
    the 40 others untouched), after which none repeats, so 5 more passes cost nothing. A reward that refuses
    every move leaves the batch as it was after proposing to the 6 repeats 3 times. Detects a move of the
    whole batch and a pass that ignores the mask."""
    prior, (x, expected) = tiny_prior(), batch_with_repeats()
    below = int((prior.sigmas(10) < float(prior.sigma_of_t(torch.tensor([300])))).sum())
    with counting() as calls:
        out = unrepeated(prior, lambda z: torch.zeros(z.shape[0]), x, 300, 2.0, 10,
                         torch.Generator().manual_seed(1), times=6)
    changed = (out != x).flatten(1).any(dim=1)
    assert torch.equal(changed, expected) and calls.eps == 6 * below
    assert not bool(repeats(out).any())
    reads = []

    def refuse(z):
        reads.append(z.shape[0])
        return torch.where(((z[:, None] - x[None]).flatten(2).abs().amax(dim=2) == 0).any(dim=1), 0.0, -1e9)

    assert torch.equal(unrepeated(prior, refuse, x, 300, 2.0, 10, torch.Generator().manual_seed(1), times=3), x)
    assert reads == [6, 6] * 3


def test_an_image_near_a_rated_one_repeats_it_and_is_never_the_one_another_repeats():
    """A rated particle 0.01 from image 5 (along u), and a sibling of image 5 0.01 on the other side (0.02
    from the rated one): within 0.015, image 5 repeats the rated particle and the sibling, no longer
    repeating a kept image, is kept in its place; within 0 (or with nothing rated) the rule is the batch's
    alone. Detects a rule that ignores what was rated, that flags the sibling through image 5, or that
    flags by distance to the batch instead."""
    x, expected = batch_with_repeats()
    u = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    u = u / u.norm()
    x = torch.cat([x, x[[5]] - 0.01 * u])  # image 46: image 5's sibling
    seen = torch.cat([x[[5]] + 0.01 * u, torch.rand(3, 1, 28, 28) * 2 - 1])
    alone = torch.cat([expected, torch.tensor([True])])
    assert torch.equal(repeats(x), alone) and torch.equal(repeats(x, seen=seen, within=0.0), alone)
    assert torch.equal(repeats(x, seen=seen[:0], within=0.015), alone)
    near = alone.clone()
    near[5], near[46] = True, False
    assert torch.equal(repeats(x, seen=seen, within=0.015), near)


def test_the_share_nearest_a_rated_image_is_moved_until_none_is_that_near(one_thread):
    """Two rated particles 1e-3 from images 0 and 1: with unseen = 1/45 (the second-nearest's distance as the
    line), one pass moves those two with the 6 repeats under a flat reward (8 × the steps below t in ε rows),
    and no pass after it pays. Detects the share ignored, the line read anew each pass (it would follow the
    moved images) and a move of the whole batch."""
    prior, (x, expected) = tiny_prior(), batch_with_repeats()
    seen = x[[0, 1]] + 1e-3 * torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    below = int((prior.sigmas(10) < float(prior.sigma_of_t(torch.tensor([300])))).sum())
    with counting() as calls:
        out = unrepeated(prior, lambda z: torch.zeros(z.shape[0]), x, 300, 2.0, 10,
                         torch.Generator().manual_seed(1), times=6, seen=seen, unseen=1 / 45)
    changed = (out != x).flatten(1).any(dim=1)
    flagged = expected.clone()
    flagged[[0, 1]] = True
    assert torch.equal(changed, flagged) and calls.eps == 8 * below


def test_the_final_cut_keeps_the_tilt_above_its_quantile_and_cuts_below():
    """--final-cut q on a reward r read off 1-D particles: τ is the (1 − q) quantile of r over the plain samples,
    the tilt exp(β·r') is exp(β·r) times σ((r − τ)/s), so half of it at τ, nearly all of it well above, e^-4 of it
    at the (1 − 1.25q) quantile; on a pool of the plain samples the cut target holds ≤ 3% of its mass below that
    quantile where the uncut P^2 holds over half. Detects a cut at the wrong quantile, a β left out, a sign."""
    r_of = lambda z: z[:, 0]  # noqa: E731  the particle is its reward
    gen = torch.Generator().manual_seed(0)
    plain = -torch.distributions.Exponential(1.0).sample((4096, 1)).abs()  # log P-like: piled up near 0
    plain = plain + 1e-3 * torch.randn(plain.shape, generator=gen)
    q, beta = 0.15, 2.0
    tau, s, b = cut_at(r_of, plain, q, beta)
    r = plain[:, 0].double()
    assert tau == float(torch.quantile(r, 1 - q)) and b == beta
    assert math.isclose(s, (tau - float(torch.quantile(r, 1 - 1.25 * q))) / 4, rel_tol=1e-9)
    cut = with_cut(r_of, (tau, s, beta))
    factor = lambda x: math.exp(beta * (float(cut(torch.tensor([[x]]))) - x))  # noqa: E731
    assert math.isclose(factor(tau), 0.5, rel_tol=1e-6) and factor(tau + 8 * s) > 0.999
    assert math.isclose(factor(tau - 4 * s), 1 / (1 + math.exp(4)), rel_tol=1e-6)
    low = r < torch.quantile(r, 1 - 1.25 * q)
    cut_w, plain_w = torch.softmax(beta * cut(plain).double(), 0), torch.softmax(beta * r, 0)
    assert cut_w[low].sum() < 0.03 and plain_w[low].sum() > 0.5
    assert with_cut(r_of, None) is r_of
