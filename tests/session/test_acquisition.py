import pytest
import torch

from apa.session import acquisition
from apa.session.acquisition import Candidates


def _cands(n=10, dup=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 4, 4, generator=g)
    if dup:
        x[5] = x[2]  # a copy made by resampling
        x[6] = x[2]
    lw = torch.linspace(-3, 0, n, dtype=torch.float64)
    return Candidates(x, lw, lambda z: z.flatten(1).mean(1), lambda z: z.flatten(1).std(1))


@pytest.mark.parametrize("name", list(acquisition.ACQUISITIONS))
def test_no_particle_is_shown_twice(name):
    c = _cands()
    idx = acquisition.select(name, c, 8, torch.Generator().manual_seed(1))
    assert idx.numel() == 8
    shown = c.particles[idx].flatten(1)
    assert torch.unique(shown, dim=0).shape[0] == 8


def test_fewer_distinct_particles_than_k_shows_them_all():
    x = torch.zeros(6, 1, 2, 2)
    x[3:] = 1.0
    c = Candidates(x, torch.zeros(6, dtype=torch.float64))
    assert sorted(acquisition.select("weight", c, 4).tolist()) == [0, 3]


def test_by_weight_sums_the_weights_of_copies():
    x = torch.tensor([[0.0], [1.0], [1.0], [2.0]])
    lw = torch.log(torch.tensor([0.4, 0.25, 0.25, 0.1], dtype=torch.float64))
    idx = acquisition.by_weight(Candidates(x, lw), 2, None)
    assert idx.tolist() == [1, 0]  # the copies' 0.5 beats the single 0.4


def test_diverse_picks_far_points():
    x = torch.tensor([[0.0], [0.1], [10.0], [5.0]])
    idx = acquisition.diverse(Candidates(x, torch.zeros(4, dtype=torch.float64)), 2, None)
    assert set(idx.tolist()) == {0, 2}


def test_unknown_acquisition():
    with pytest.raises(ValueError, match="weight"):
        acquisition.select("best", _cands(), 2)


def test_balanced_weights_give_a_sparse_mode_the_weight_of_a_crowded_one():
    """30 points around one centre and 3 around another, far apart: uniform draws give the small
    mode 3/33 = 9%; the balanced weights give it 39-48% over seeds 0-2 (asserted: 30% to 70%)."""
    g = torch.Generator().manual_seed(0)
    crowded = torch.randn(30, 5, generator=g) * 0.3
    sparse = torch.randn(3, 5, generator=g) * 0.3 + 20.0
    w = acquisition.balanced_weights(torch.cat([crowded, sparse]))
    share = float(w[30:].sum() / w.sum())
    assert 0.3 < share < 0.7, share
    assert acquisition.balanced_weights(torch.zeros(1, 5)).tolist() == [1.0]


def test_weighted_draws_each_distinct_particle_by_its_summed_weight():
    """The first shown particle is drawn with probability equal to its group's weight: over 4,000 draws
    each frequency is within 4.5 standard errors of its weight (detects a rule that ignores the weights,
    e.g. ``random``'s 1/3 each, or one that counts copies apart). Zero-weight particles fill the rest."""
    x = torch.tensor([[0.0], [1.0], [1.0], [2.0], [3.0]])
    w = torch.tensor([0.5, 0.15, 0.15, 0.2, 0.0], dtype=torch.float64)
    c = Candidates(x, torch.log(w))
    g = torch.Generator().manual_seed(0)
    n = 4000
    first = torch.tensor([int(acquisition.weighted(c, 1, g)[0]) for _ in range(n)])
    group = {0: 0.5, 1: 0.3, 3: 0.2}  # the copies at 1 and 2 are one particle of weight 0.3, shown as 1
    assert set(first.tolist()) <= set(group)
    for i, p in group.items():
        se = (p * (1 - p) / n) ** 0.5
        assert abs(float((first == i).double().mean()) - p) < 4.5 * se
    assert sorted(acquisition.weighted(c, 4, g).tolist()) == [0, 1, 3, 4]  # the zero-weight one last


def test_unsure_shows_the_particles_rated_nearest_the_middle():
    x = torch.tensor([[0.9], [-0.1], [0.3], [0.3], [-0.6], [0.05]])  # the rating is the particle itself
    c = Candidates(x, torch.zeros(6, dtype=torch.float64), lambda z: z.flatten(1).mean(1))
    assert acquisition.unsure(c, 3, None).tolist() == [5, 1, 2]  # the copy of 0.3 counts once
    plain = Candidates(x, torch.zeros(6, dtype=torch.float64))  # before any rating: at random
    assert acquisition.unsure(plain, 3, torch.Generator().manual_seed(0)).unique().numel() == 3
