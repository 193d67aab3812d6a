import torch

from apa.surrogate.fit import FitConfig, fit
from apa.surrogate.model import Ensemble, FeatureSurrogate, LatentSurrogate


def test_latent_surrogate_is_the_seed_architecture():
    m = LatentSurrogate(4)
    assert m.conv.in_channels == 4 and m.conv.out_channels == 128
    widths = [(layer.in_features, layer.out_features) for layer in m.mlp if isinstance(layer, torch.nn.Linear)]
    assert widths == [(128, 256), (256, 128), (128, 1)]
    assert m(torch.randn(3, 4, 8, 8)).shape == (3,)


def test_feature_surrogate_keeps_the_feature_map_out_of_its_state():
    proj = torch.nn.Linear(16, 5).requires_grad_(False)
    m = FeatureSurrogate(lambda x: proj(x.flatten(1)), 5)
    assert all(not k.startswith("_features") for k in m.state_dict())
    x = torch.randn(4, 1, 4, 4, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable through the features


def test_fit_learns_a_separable_rule_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 6, 6, generator=g)
    y = torch.where(x.mean((1, 2, 3)) > 0, 1.0, -1.0)
    losses, preds = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = Ensemble([LatentSurrogate(1), LatentSurrogate(1)])
        losses.append(fit(model, x, y, FitConfig(epochs=60), torch.Generator().manual_seed(1)))
        preds.append(model(x).detach())
    assert losses[0] == losses[1] and torch.equal(preds[0], preds[1])
    assert ((preds[0] > 0).float() * 2 - 1 == y).float().mean() > 0.9
    assert Ensemble([LatentSurrogate(1), LatentSurrogate(1)]).spread(x).shape == (64,)


def test_logistic_reward_is_the_log_of_the_members_mean_probability():
    """r = log((1/M)·Σ σ(f_m)): catches a mean of logits or of log-probabilities in its place (they differ
    whenever the members disagree), a reward above 0, and a rating off the [-1, 1] scale."""
    torch.manual_seed(0)
    model = Ensemble([LatentSurrogate(1) for _ in range(3)], loss="logistic")
    for m in model.members:  # members that disagree strongly
        torch.nn.init.normal_(m.mlp[-1].weight, std=3.0)
    x = torch.randn(16, 1, 6, 6)
    with torch.no_grad():
        logits = model.all(x)
        prob = torch.sigmoid(logits).mean(0)
        assert torch.allclose(model(x), prob.log(), atol=1e-6)
        assert not torch.allclose(model(x), torch.nn.functional.logsigmoid(logits.mean(0)), atol=1e-3)
        assert (model(x) <= 0).all()
        assert torch.allclose(model.rating(x), 2 * prob - 1, atol=1e-6)
        far = model(1e3 * x)  # saturated logits: the reward stays finite
    assert torch.isfinite(far).all()


def test_logistic_fit_separates_liked_from_disliked_and_reads_graded_ratings_as_soft_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 6, 6, generator=g)
    y = torch.where(x.mean((1, 2, 3)) > 0, 1.0, -1.0)
    torch.manual_seed(0)
    model = Ensemble([LatentSurrogate(1)], loss="logistic")
    fit(model, x, y, FitConfig(epochs=60), torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert ((model.rating(x) > 0).float() * 2 - 1 == y).float().mean() > 0.9
    torch.manual_seed(0)
    half = Ensemble([LatentSurrogate(1)], loss="logistic")  # every rating at the midpoint: P(liked) -> 1/2
    fit(half, x, torch.zeros(64), FitConfig(epochs=60), torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert half.rating(x).abs().max() < 0.1
