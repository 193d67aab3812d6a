"""Which of the prior's own features make the surrogate's tilt hold the most liked images: each finished
session's ratings refitted with other features, the exact target measured on the benchmark's plain prior
samples (the pool reweighted by P(liked | x)^β_end, as `tilt_probe.py` does).

The ratings were chosen by the session's own surrogate, so this screens features off-policy; a whole
session decides. Features (all from one pass of the frozen UNet's down path and middle unless named):

- ``mid@T``: the pooled middle block at timestep T (the default at T = 200);
- ``mid@T1+T2+...``: the same at several timesteps, concatenated (one pass per timestep);
- ``levels@T``: the middle block and the two deeper skip activations, each pooled, concatenated;
- ``grid@T``: the middle block pooled to 2×2 (where in the image, not only what);
- ``up@T``: the decoder's two deepest blocks, pooled, beside the middle (the ε pass up to 14×14).

  python benchmarks/feature_probe.py runs/yield2_mnist/mnist_p0_n0_s0 ... \\
      --reference runs/yield2_mnist/reference_mnist_25_4096.pt --features mid@200,levels@200,grid@200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from align_results import copied_session, pool_labels  # noqa: E402
from tilt_probe import measures, print_header, print_means, print_row  # noqa: E402

from apa.seeding import generator, seeded_global  # noqa: E402
from apa.surrogate.fit import FitConfig, fit  # noqa: E402
from apa.surrogate.model import Ensemble, FeatureSurrogate  # noqa: E402


def feature_fn(prior, spec: str):
    """x0 [N, *event] -> features [N, D] for ``spec`` (see the module doc)."""
    kind, ts = spec.split("@")
    steps = [int(t) for t in ts.split("+")]
    unet = prior.model

    def one(x0: torch.Tensor, t: int) -> torch.Tensor:
        x, tt = prior.features_input(x0, t)
        mid, (h1, h2, h3), temb = unet.encode(x, tt)
        if kind == "mid":
            return mid.mean(dim=(2, 3))
        if kind == "levels":
            return torch.cat([mid.mean(dim=(2, 3)), h3.mean(dim=(2, 3)), h2.mean(dim=(2, 3))], 1)
        if kind == "grid":
            return F.adaptive_avg_pool2d(mid, 2).flatten(1)
        if kind == "up":
            h = unet.up3(torch.cat([mid, h3], 1), temb)
            u = F.interpolate(h, size=h2.shape[-2:], mode="nearest")
            u = unet.up2(torch.cat([u, h2], 1), temb)
            return torch.cat([mid.mean(dim=(2, 3)), h.mean(dim=(2, 3)), u.mean(dim=(2, 3))], 1)
        raise SystemExit(f"unknown features {spec!r}")

    return lambda x0: torch.cat([one(x0, t) for t in steps], 1)


def refit(s, fn, x: torch.Tensor, y: torch.Tensor) -> Ensemble:
    """The session's surrogate (its settings and seed), refitted on ratings (x [n, *event], y [n]) over ``fn``."""
    sc = s.cfg.surrogate
    dim = int(fn(torch.zeros(1, *s.prior.event_shape)).shape[1])
    with seeded_global(s.cfg.session.seed, 99, "init"):
        model = Ensemble([FeatureSurrogate(fn, dim) for _ in range(sc.ensemble)], sc.loss).eval()
    fit(model, x, y, FitConfig(sc.epochs, sc.batch_size, sc.lr), generator(s.cfg.session.seed, 99, "fit"))
    return model.requires_grad_(False)


def session_rows(src: str, reference: torch.Tensor, specs: list[str], beta: float) -> dict[str, dict]:
    with copied_session(src) as s:
        x, y, _ = s.state.training_set()
        pool = pool_labels(s, reference)
        rows = {}
        for spec in specs:
            model = refit(s, feature_fn(s.prior, spec), x, y)
            with torch.no_grad():
                log_p = torch.cat([model(z) for z in reference.split(512)]).double()
            rows[spec] = measures(beta * log_p, pool.liked, pool.classes, pool.prefer)
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sessions", nargs="+", help="finished session directories (copied; never written)")
    ap.add_argument("--reference", required=True, help="the benchmark's plain prior particles (.pt)")
    ap.add_argument("--features", default="mid@200,mid@50+200+500,levels@200,grid@200,up@200")
    ap.add_argument("--beta", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    specs = args.features.split(",")
    reference = torch.load(args.reference)
    print_header("features")
    every: dict[str, list[dict]] = {t: [] for t in specs}
    for src in args.sessions:
        for spec, row in session_rows(src, reference, specs, args.beta).items():
            every[spec].append(row)
            print_row(Path(src).name, spec, row)
    print_means("features", every)


if __name__ == "__main__":
    main()
