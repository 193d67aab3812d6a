"""Learned-reward best-of-M: the same rated images as best-of-N, a pool at equal calls, top-n or resampled."""

import torch

from apa.baselines.best_of_m import DEFAULT_FINAL_ROWS_PER_IMAGE, BestOfMConfig, choose, run, run_resampled
from apa.baselines.best_of_n import BestOfNConfig
from apa.baselines.best_of_n import run as best_of_n
from apa.cli import main
from apa.priors.calls import counting
from apa.store.sqlite import SessionStore

from .conftest import AlternatingUser, assert_images


def test_the_pool_matches_the_default_final_batchs_calls(tmp_path):
    """Best-of-M's default pool spends what the default final batch spends: a session with the default
    steps, move and sweeps, its final batch at 8 images, costs the constant's rows per image (every row
    but one is per image). The passes after the sweeps (--final-repeats, --final-unseen) are off: what they
    cost depends on the batch, and the benchmarks count it in the session's calls. Fails when the default
    final batch's cost changes and the pool does not."""
    assert BestOfMConfig().pool(256) == 876  # 22,785 rows / 26 per plain sample, rounded
    assert BestOfMConfig(pool_per_image=2).pool(10) == 20
    out = tmp_path / "s"
    assert main(["align", "--out", str(out), "--budget", "4", "--per-round", "4", "--particles", "8",
                 "--eval-samples", "8", "--epochs", "5", "--seed", "1", "--final-repeats", "0"]) == 0
    calls = SessionStore.read(out).record("final_checks")["final_calls"]
    assert (calls - 1) / 8 == (DEFAULT_FINAL_ROWS_PER_IMAGE * 256 - 1) / 256


def test_top_keeps_each_image_once_and_resampling_follows_the_tilt():
    scores = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert choose(scores, 2, "top", 2.0, torch.Generator()).tolist() == [1, 3]
    idx = choose(scores, 4000, "resample", 2.0, torch.Generator().manual_seed(0))
    share = (idx == 1).double().mean()
    expected = float(torch.softmax(2.0 * scores, 0)[1])  # systematic: within 1/4000 of the expected count
    assert abs(share - expected) < 1e-3


def test_rates_what_best_of_n_rates_and_spends_its_pool(tiny_prior):
    cfg = BestOfMConfig(steps=3, pool_per_image=3)
    a = run(tiny_prior, AlternatingUser(), 6, 2, 0, config=cfg, eval_samples=4)
    b = best_of_n(tiny_prior, AlternatingUser(), 6, 2, 0, config=BestOfNConfig(steps=3), eval_samples=4)
    assert all(torch.equal(x.images, y.images) for x, y in zip(a.records, b.records))
    with counting() as calls:
        images = a.sample(4, torch.Generator().manual_seed(0))
    assert_images(images, 4)
    assert calls.eps == 12 * 3 and calls.features == 12  # 12 samples of 3 steps, each scored once
    assert_images(run_resampled(tiny_prior, AlternatingUser(), 4, 2, 0, config=cfg, eval_samples=3)
                  .sample(3, torch.Generator()), 3)
