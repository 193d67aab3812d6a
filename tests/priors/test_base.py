"""The prior contract's declared capabilities and the wrapper that forwards them.

What these can detect: a prior without denoiser features that passes for one (``HasFeatures``), a
wrapper that forwards less than the contract or reads its device once and keeps a stale one, a
prior whose device is found by probing rather than declared.
"""

import torch

from apa.priors.base import HasFeatures, Prior, PriorWrapper
from apa.priors.gmm import GaussianMixturePrior, make_gmm
from apa.smc.sampler import device_of

CONTRACT = ("event_shape", "data_std", "name", "class_names", "features", "sigmas", "sample_initial", "decode",
            "score", "tweedie", "forward_drift", "g2_ds", "transition", "transition_variance")


def test_a_prior_declares_its_optional_capabilities_with_defaults():
    gmm = make_gmm({})
    assert gmm.features is None and gmm.class_names == ()
    assert gmm.device == torch.device("cpu") and device_of(gmm) == torch.device("cpu")
    assert gmm.model is None and gmm.sigma_of_t is None and gmm.eps_network is None
    assert isinstance(gmm, Prior) and not isinstance(gmm, HasFeatures)


class _Featured(GaussianMixturePrior):
    """The mixture with 'denoiser features': twice the particles."""

    def features(self, z0, t=200):
        return z0 * 2.0


def test_a_prior_with_features_is_one_and_a_wrapper_keeps_the_answer():
    gmm = make_gmm({})
    featured = _Featured(gmm.means, gmm.stds, gmm.weights)
    assert isinstance(featured, HasFeatures) and isinstance(PriorWrapper(featured), HasFeatures)
    assert not isinstance(PriorWrapper(gmm), HasFeatures) and PriorWrapper(gmm).features is None
    assert torch.equal(PriorWrapper(featured).features(torch.ones(3, 2)), torch.full((3, 2), 2.0))


def test_a_wrapper_forwards_the_whole_contract_and_reads_the_device_when_asked():
    gmm = make_gmm({})
    wrapped = PriorWrapper(gmm)
    for name in CONTRACT:
        assert getattr(wrapped, name) == getattr(gmm, name), name
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(wrapped.eps(z, 0.5), gmm.eps(z, 0.5))
    gmm.device = torch.device("meta")  # the networks moved after wrapping
    assert wrapped.device == torch.device("meta") and device_of(wrapped) == torch.device("meta")
