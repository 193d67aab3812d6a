"""fkc (a real session) and guidance (the same loop, weights off), plus the unaligned prior."""

import gc

import numpy as np
import pytest
import torch

from apa.baselines import fkc, guidance, prior
from apa.config import AlignConfig
from apa.session import Session, with_overrides
from apa.store import SessionStore, StoreError

from .conftest import assert_images

TINY = with_overrides(AlignConfig(), sampler={"particles": 4, "steps": 3}, surrogate={"epochs": 5})


def test_fkc_runs_a_real_session_and_checkpoints_match_shorter_sessions(tiny_prior, user, tmp_path):
    res = fkc.run(tiny_prior, user, 4, 2, 0, config=TINY, checkpoints=(2, 4), eval_samples=4, workdir=tmp_path / "a")
    assert_images(res.checkpoints[4], 4) and res.oracle_ratings == 4
    store = SessionStore.read(tmp_path / "a")  # the run still holds its session (res.sample draws from it)
    assert store.spent() == 4 and (tmp_path / "a" / "final_samples.npz").exists()
    with np.load(tmp_path / "a" / "final_samples.npz") as z:
        assert np.array_equal(z["images"], res.checkpoints[4].numpy())
    short = fkc.run(tiny_prior, user, 2, 2, 0, config=TINY, checkpoints=(2,), eval_samples=4, workdir=tmp_path / "b")
    assert torch.equal(short.checkpoints[2], res.checkpoints[2])  # = the final batch of a budget-2 session


def test_guidance_keeps_equal_weights_and_never_resamples(tiny_prior, user, tmp_path):
    res = guidance.run(tiny_prior, user, 4, 2, 0, config=TINY, checkpoints=(4,), eval_samples=4,
                       workdir=tmp_path / "g")
    assert_images(res.checkpoints[4], 4)
    store = SessionStore.read(tmp_path / "g")
    for row in store.rounds():
        lw = store.round_tensors(row["round"])["log_weights"]
        lw = lw[torch.isfinite(lw)]  # explored prior samples (weight zero) are not part of the population
        assert torch.allclose(lw, torch.full_like(lw, lw[0].item())) and not any(row["info"]["resampled"])
    assert store.kind() == "guidance"
    del res  # its final sampler holds the session open, and so locked, until it is dropped
    gc.collect()
    with pytest.raises(StoreError, match="guidance"):  # `apa align --resume` would sample with weights
        Session.resume(tmp_path / "g")
    assert SessionStore.open(tmp_path / "g").spent() == 4  # left untouched


def test_prior_spends_nothing(tiny_prior, user):
    res = prior.run(tiny_prior, user, 4, 2, 0, config=prior.PriorConfig(steps=3), checkpoints=(2, 4), eval_samples=3)
    assert res.oracle_ratings == 0 and res.records == ()
    assert_images(res.checkpoints[2], 3) and torch.equal(res.checkpoints[2], res.checkpoints[4])
