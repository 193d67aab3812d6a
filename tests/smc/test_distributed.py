"""A sharded population (gloo on the CPU, 2 processes) gives the same run as the plain one-process sampler, bit for bit."""

import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from apa.config import SamplerConfig
from apa.priors.gmm import make_gmm
from apa.smc import distributed as D
from apa.smc.sampler import fkc_sample

A = torch.tensor([0.8, 0.5])
N, STEPS = 8, 6
SETTINGS = {"particles": N, "steps": STEPS, "beta": (1.0, 4.0), "reward_at": "xt", "ess_threshold": 0.9}


def _reward(z: torch.Tensor) -> torch.Tensor:
    return z @ A


def _run(comm: D.Comm, exchange_settings: dict | None = None):
    prior = make_gmm({})
    res = D.sharded_sample(prior, _reward, SamplerConfig(**{**SETTINGS, **(exchange_settings or {})}), comm,
                           generator=torch.Generator().manual_seed(5))
    return res.particles, res.log_weights, res.origins, [s.resampled for s in res.trace], [s.ess for s in res.trace]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXCHANGES = ("all_to_all", "all_gather")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: a sharded run with each way of exchanging particles; rank 0 saves the results."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    comm = D.init_from_env(timeout_s=60)
    saved = {}
    try:
        for exchange in EXCHANGES:
            comm.exchange, comm.traffic = exchange, D.Traffic()
            saved[exchange] = (_run(comm), comm.traffic)
        if rank == 0:
            torch.save(saved, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_bitwise(tmp_path):
    prior = make_gmm({})
    plain = fkc_sample(prior, _reward, SamplerConfig(**SETTINGS), generator=torch.Generator().manual_seed(5))
    one = (plain.particles, plain.log_weights, plain.origins, [s.resampled for s in plain.trace],
           [s.ess for s in plain.trace])
    assert any(one[3]), "the test needs a run that resamples"
    out = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    saved = torch.load(out, weights_only=False)
    for exchange in EXCHANGES:
        two, traffic = saved[exchange]
        for a, b in zip(one[:3], two[:3]):
            assert torch.equal(a, b)
        assert one[3:] == two[3:]
        assert traffic.exchange > 0 and traffic.gather > 0
    assert saved["all_to_all"][1].exchange < saved["all_gather"][1].exchange  # only rows that change rank travel


def test_a_one_rank_population_is_the_single_process_run():
    """A population sharded over one rank (LocalComm, micro-batched) is the plain run, bit for bit."""
    prior = make_gmm({})
    runs = [fkc_sample(prior, _reward, SamplerConfig(**SETTINGS), generator=torch.Generator().manual_seed(3)),
            D.sharded_sample(prior, _reward, SamplerConfig(**SETTINGS), D.LocalComm(), generator=torch.Generator().manual_seed(3),
                             micro_batch=4)]
    assert torch.equal(runs[0].particles, runs[1].particles)
    assert torch.equal(runs[0].log_weights, runs[1].log_weights)
    assert [s.resampled for s in runs[0].trace] == [s.resampled for s in runs[1].trace]


def test_a_micro_batched_prior_is_the_prior_in_chunks_and_declares_what_it_declares():
    """ε in chunks of 4 equals ε in one call on the mixture; the wrapper forwards the contract and does
    not pass for a prior with denoiser features."""
    from apa.priors.base import HasFeatures

    prior = make_gmm({})
    chunked = D._Chunked(prior, 4)
    z = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chunked.eps(z, 0.7), prior.eps(z, 0.7))
    assert chunked.features is None and not isinstance(chunked, HasFeatures)
    assert (chunked.name, chunked.device, chunked.event_shape) == (prior.name, prior.device, prior.event_shape)


def test_exchange_plan_sends_each_needed_row_once():
    anc = torch.tensor([0, 0, 5, 7, 1, 4, 4, 4])  # rank 0 holds rows 0-3, rank 1 rows 4-7
    plan = D.exchange_plan(anc, 4, 2)
    assert plan[0][0].tolist() == [0] and plan[0][1].tolist() == [5, 7]
    assert plan[1][0].tolist() == [1] and plan[1][1].tolist() == [4]


def test_what_cannot_be_sharded_is_refused():
    cfg = SamplerConfig(**SETTINGS)
    with pytest.raises(ValueError, match="multiple of 3"):
        D.check_shardable(cfg, 3, None)
    with pytest.raises(ValueError, match="diversity"):
        D.check_shardable(replace(cfg, diversity=True), 2, None)
    with pytest.raises(ValueError, match="micro-batch"):
        D.check_shardable(cfg, 2, 3)
