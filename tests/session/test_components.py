"""Components built once per configuration and shared: two sessions of one configuration hold one
prior and one feedback model; another configuration gets its own; the last user frees it.

A cache keyed on too little would hand the fashion session the MNIST prior (second test); one
held strongly would keep every prior ever built alive (third test)."""

import gc

from apa.session import components
from apa.session import components
from apa.config import AlignConfig
from apa.session import Session, with_overrides

CFG = with_overrides(AlignConfig(), feedback={"name": "oracle", "prefer": (1, 4, 7, 9)})


def test_sessions_of_one_configuration_share_the_prior_and_the_feedback_model():
    a, b = components.build(CFG), components.build(with_overrides(CFG, session={"seed": 7}))
    assert a[0] is b[0] and a[1] is b[1]  # the seed is a session's own; the frozen parts are shared


def test_label_noise_wraps_the_shared_source_per_session():
    plain = components.build(CFG)
    noisy = components.build(with_overrides(CFG, feedback={"label_noise": 0.1}))
    assert noisy[0] is plain[0] and noisy[1] is not plain[1] and noisy[1].source is plain[1]


def test_another_configuration_gets_its_own_and_the_last_user_frees_it():
    fashion = with_overrides(CFG, prior={"name": "fashion"}, feedback={"prefer": (5,)})
    key = components.options_key(vars(fashion.prior))
    gc.collect()
    assert key not in components._PRIORS  # nothing else in this process holds a fashion prior
    mnist, other = components.build(CFG), components.build(fashion)
    assert mnist[0] is not other[0] and mnist[1] is not other[1] and key in components._PRIORS
    del other
    gc.collect()
    assert key not in components._PRIORS and components.options_key(vars(CFG.prior)) in components._PRIORS
