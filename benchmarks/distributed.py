"""Scaling of one sharded FKC-SMC population (apa.smc.distributed) with gloo on this machine's CPUs.

For each particle count N and process count K it spawns K processes (loopback, gloo), runs one
sharded run on a D-dimensional Gaussian mixture (closed-form ε, so the network costs almost nothing
and the table shows the sampler and its communication), and prints per step: wall time, bytes
each rank sends in all-gathers, and per resampling the bytes of particles that change rank
(``all_to_all``, the default) against gathering every rank's rows (``all_gather``); the row "plain"
is the one-process sampler ``fkc_sample`` on the same run, for reference. It then prints
the communication model for K GPUs on NVLink and across nodes at Stable Diffusion's latent size.

  python benchmarks/distributed.py                      # N = 64, 256; K = 1, 2; D = 4096
  python benchmarks/distributed.py --n 64,256,1024 --k 1,2,4 --dim 16384 --steps 10
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from apa.config import SamplerConfig
from apa.priors.gmm import GaussianMixturePrior  # noqa: E402
from apa.smc import distributed as D  # noqa: E402


def _prior(dim: int) -> GaussianMixturePrior:
    g = torch.Generator().manual_seed(0)
    return GaussianMixturePrior(torch.randn(3, dim, generator=g).tolist(), [0.5, 0.7, 0.4], [0.5, 0.3, 0.2])


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, n: int, exchange: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    comm = D.init_from_env(timeout_s=120)
    comm.exchange = exchange
    prior = _prior(args.dim)
    a = torch.randn(args.dim, generator=torch.Generator().manual_seed(1)) / args.dim**0.5
    dist.barrier()
    t0 = time.perf_counter()
    res = D.sharded_sample(prior, lambda z: z @ a, SamplerConfig(particles=n, steps=args.steps, beta=(1.0, 4.0), reward_at="xt",
                                                       ess_threshold=args.ess_threshold), comm,
                           generator=torch.Generator().manual_seed(2))
    seconds = time.perf_counter() - t0
    traffic = [None] * world
    dist.all_gather_object(traffic, (comm.traffic.gather, comm.traffic.exchange))
    if rank == 0:
        torch.save({"seconds": seconds, "traffic": traffic, "resamplings": sum(s.resampled for s in res.trace)}, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace, n: int, k: int, exchange: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "m.pt")
        mp.spawn(_worker, args=(k, _free_port(), args, n, exchange, out), nprocs=k, join=True)
        m = torch.load(out, weights_only=False)
    gather = max(t[0] for t in m["traffic"])
    exchanged = sum(t[1] for t in m["traffic"])
    steps = args.steps
    return {"ms_step": 1e3 * m["seconds"] / steps, "gather_b_step": gather / steps, "resamplings": m["resamplings"],
            "exchange_b_resampling": exchanged / max(m["resamplings"], 1)}


def plain_ms_step(args: argparse.Namespace, n: int) -> float:
    """The one-process sampler (``fkc_sample``, its own noise stream) on the same run, for reference."""
    from apa.smc.sampler import fkc_sample

    torch.set_num_threads(1)
    prior = _prior(args.dim)
    a = torch.randn(args.dim, generator=torch.Generator().manual_seed(1)) / args.dim**0.5
    t0 = time.perf_counter()
    fkc_sample(prior, lambda z: z @ a, SamplerConfig(particles=n, steps=args.steps, beta=(1.0, 4.0), reward_at="xt",
                                                 ess_threshold=args.ess_threshold),
               generator=torch.Generator().manual_seed(2))
    return 1e3 * (time.perf_counter() - t0) / args.steps


def _kb(b: float) -> str:
    return f"{b / 1024:.1f} KB" if b < 1024**2 else f"{b / 1024**2:.1f} MB"


def model_table(ns: list[int], ks: list[int]) -> list[str]:
    """Communication per step and per resampling for SD 1.5 latents (4×64×64 fp16, 32 KB): all-gather
    of 3 values per particle per step (log-weight increment fp64, reward and ‖∇φ‖ fp32: 16 B); at a
    resampling the rows that change rank, each carrying z, ε̂ and ∇(r+γL) (3 × 32 KB), at most
    (K−1)/K·N of them; a ring all-gather moves (K−1)/K of the whole vector through each link."""
    latent, row, per_particle_step = 32 * 1024, 3 * 32 * 1024, 16
    links = {"NVLink (≈300 GB/s, 10 µs)": (300e9, 10e-6), "IB across nodes (≈25 GB/s, 20 µs)": (25e9, 20e-6)}
    lines = ["| N | K | all-gather / step | max exchange / resampling | " + " | ".join(
        f"{name}: step + resampling" for name in links) + " |", "|" + "---|" * (4 + len(links))]
    for n in ns:
        for k in ks:
            if k == 1:
                continue
            gather = per_particle_step * n * (k - 1) / k
            moved = row * n * (k - 1) / k
            cells = []
            for bw, lat in links.values():
                t_step = 3 * (lat * (k - 1) + gather / bw)  # three all-gathers per step
                t_res = 4 * lat + moved / bw / k  # four all_to_alls; each rank's share of the rows over its own link
                cells.append(f"{1e6 * t_step:.0f} µs + {1e6 * t_res:.0f} µs")
            lines.append(f"| {n} | {k} | {_kb(gather)} | {_kb(moved)} ({n * (k - 1) // k} × {row // latent} latents) | "
                         + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="64,256", help="particle counts (default: 64,256)")
    ap.add_argument("--k", default="1,2", help="process counts (default: 1,2; this machine's cores bound it)")
    ap.add_argument("--dim", type=int, default=4096, help="particle size in fp32 values (default: 4096, 16 KB)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps (default: 10)")
    ap.add_argument("--ess-threshold", type=float, default=0.9, help="resample below this ESS share (default 0.9)")
    args = ap.parse_args()
    ns, ks = [int(x) for x in args.n.split(",")], [int(x) for x in args.k.split(",")]
    print(f"gloo on {os.cpu_count()} CPU cores, D = {args.dim} fp32 ({_kb(4 * args.dim)} a particle), "
          f"{args.steps} steps; bytes: sent by one rank (all-gather) / by all ranks (exchange)\n")
    print("| N | K | ms / step | all-gather B / step / rank | resamplings | exchange B / resampling: all_to_all "
          "| all_gather |\n|---|---|---|---|---|---|---|")
    for n in ns:
        print(f"| {n} | plain | {plain_ms_step(args, n):.1f} | – | – | – | – |", flush=True)
        for k in ks:
            a2a = measure(args, n, k, "all_to_all")
            ag = measure(args, n, k, "all_gather") if k > 1 else a2a
            print(f"| {n} | {k} | {a2a['ms_step']:.1f} | {a2a['gather_b_step']:.0f} | {a2a['resamplings']} | "
                  f"{_kb(a2a['exchange_b_resampling'])} | {_kb(ag['exchange_b_resampling'])} |", flush=True)
    print("\nModel for SD 1.5 latents (4×64×64 fp16 = 32 KB) on K GPUs:\n")
    print("\n".join(model_table([256, 1024, 4096], [2, 4, 8])))


if __name__ == "__main__":
    main()
