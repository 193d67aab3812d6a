"""Network-call rows: every ε and features row a prior computes, and every row a gradient flows back through."""

import threading

import torch

from apa.priors.calls import counting
from apa.priors.ddpm import DDPMPrior
from apa.priors.unet import UNet, UNetConfig
from apa.smc.sampler import sample_prior


def tiny_prior() -> DDPMPrior:
    torch.manual_seed(0)
    return DDPMPrior(UNet(UNetConfig(channels=(8, 8, 8), time_dim=16, groups=4)), name="mnist")


def test_a_plain_sample_costs_one_eps_row_per_particle_and_step():
    prior = tiny_prior()
    with counting() as calls:
        sample_prior(prior, 6, 4, torch.Generator().manual_seed(0), batch_size=4)
    assert calls.as_dict() == {"eps": 24, "features": 0, "backward": 0, "total": 24}


def test_features_and_their_gradient_are_counted_per_row_and_nested_counts_see_them():
    prior = tiny_prior()
    z = torch.randn(5, 1, 28, 28, requires_grad=True)
    with counting() as outer:
        with counting() as inner:
            prior.features(z).sum().backward()
        with torch.no_grad():
            prior.eps(z.detach(), 1.0)
    assert (inner.features, inner.backward, inner.eps) == (5, 5, 0)
    assert (outer.features, outer.backward, outer.eps) == (5, 5, 5)


def test_no_count_open_leaves_outputs_untouched_and_threads_count_their_own_rows():
    prior = tiny_prior()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(prior.eps(x, 1.0), prior.model(*prior.eps_input(x, 1.0)))
    seen = {}

    def work(n: int) -> None:
        with counting() as calls, torch.no_grad():
            for _ in range(3):
                prior.eps(torch.randn(n, 1, 28, 28), 1.0)
        seen[n] = calls.eps

    threads = [threading.Thread(target=work, args=(n,)) for n in (2, 7)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert seen == {2: 6, 7: 21}  # a server's sessions share one prior, each counting its own rows


def test_passes_made_uncounted_count_only_in_counts_opened_inside():
    """Measuring a batch is not its cost: a pass inside ``uncounted`` reaches no count opened outside it
    (a leak of one row would show), and counts opened inside still see it."""
    from apa.priors.calls import counted, counting, uncounted

    with counting() as outer:
        counted("eps", torch.zeros(2, 1))
        with uncounted(), counting() as inner:
            counted("eps", torch.zeros(3, 1))
        counted("features", torch.zeros(1, 1))
    assert (outer.eps, outer.features, inner.eps) == (2, 1, 3)
