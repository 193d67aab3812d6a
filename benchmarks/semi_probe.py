"""Whether the images nobody rated can teach the surrogate: the session's surrogate fitted to a few rated
prior samples alone, or with unrated ones beside them (semi-supervised), scored on held-out prior samples.

A screen, off-policy: the rated images are plain prior samples (a session's are its rounds' particles),
as in the outside probe that found the surrogate unsure. Per preference set and draw: n rated samples
drawn from the first half of the benchmark's plain prior samples, U unrated ones beside them, the other
half held out. Per way of fitting, on the held-out half: the AUC of P(liked | x) against the judge's
labels, and the exact target of the final batch, the held-out samples reweighted by P^β (as
`tilt_probe.py` reads it): its liked share under the judge, its rarest liked class and its expected
distinct images of 256.

Ways of fitting (the session's surrogate, settings and loss, on the prior's features throughout):

- ``rated``: the ratings alone (what a session does);
- ``self:T:W``: self-training: fitted once, then refitted with every unrated image it is surer of than T
  (P > T or P < 1 − T) added as a rating of its side, at weight W;
- ``prop:K:W``: label propagation: the ratings spread over the K-nearest-neighbour graph of rated and
  unrated images in feature space (cosine, symmetric, 20 iterations), each unrated image then added with
  its propagated probability as a soft rating, at weight W.

  python benchmarks/semi_probe.py --prefer 2,5 3,8 0,3,7 --taste style:7:thick --draws 4 \\
      --reference runs/yield2_mnist/reference_mnist_25_4096.pt --ways rated,self:0.9:0.5,prop:10:0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from align_results import Judges, job_config, reference_particles  # noqa: E402
from surrogate_efficiency import auc  # noqa: E402
from tilt_probe import measures  # noqa: E402

from apa.session import components  # noqa: E402
from apa.surrogate.fit import FitConfig, fit  # noqa: E402
from apa.surrogate.model import Ensemble, FeatureSurrogate  # noqa: E402


def head_fit(feats: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, cfg, seed: int) -> Ensemble:
    """The session's surrogate head fitted on precomputed features [n, D] and ratings y [n] in [-1, 1]."""
    sc = cfg.surrogate
    torch.manual_seed(seed)
    model = Ensemble([FeatureSurrogate(lambda f: f, feats.shape[1]) for _ in range(sc.ensemble)], sc.loss).eval()
    fit(model, feats, y, FitConfig(sc.epochs, sc.batch_size, sc.lr), torch.Generator().manual_seed(seed), w)
    return model.requires_grad_(False)


def prob(model: Ensemble, feats: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(feats).exp()


def propagated(feats: torch.Tensor, y: torch.Tensor, k: int, iters: int = 20) -> torch.Tensor:
    """P(liked) of every image by label propagation: feats [n + u, D] (the n rated first), y [n] in [-1, 1]
    -> [n + u] in [0, 1], the rated ones clamped to their ratings."""
    f = torch.nn.functional.normalize(feats - feats.mean(0), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-1.0)
    top = sim.topk(k, dim=1)
    a = torch.zeros_like(sim).scatter_(1, top.indices, top.values.clamp_min(0.0))
    a = (a + a.T) / 2
    d = a.sum(1).clamp_min(1e-9)
    n = y.shape[0]
    p = torch.full((feats.shape[0],), float((y > 0).double().mean()))
    p[:n] = (y + 1) / 2
    for _ in range(iters):
        p = (a @ p) / d
        p[:n] = (y + 1) / 2
    return p


def fitted(way: str, feats: torch.Tensor, y: torch.Tensor, n: int, cfg, seed: int) -> Ensemble:
    """The surrogate of one way of fitting: feats [n + u, D] with the n rated first, ratings y [n]."""
    base = head_fit(feats[:n], y, None, cfg, seed)
    kind, *args = way.split(":")
    if kind == "rated":
        return base
    unrated = feats[n:]
    if kind == "self":
        t, weight = float(args[0]), float(args[1])
        p = prob(base, unrated)
        keep = (p > t) | (p < 1 - t)
        yu = torch.where(p[keep] > 0.5, 1.0, -1.0)
        extra = unrated[keep]
    elif kind == "prop":
        k, weight = int(args[0]), float(args[1])
        yu = 2 * propagated(feats, y, k)[n:] - 1
        extra = unrated
    else:
        raise SystemExit(f"unknown way {way!r}; use rated, self:T:W or prop:K:W")
    w = torch.cat([torch.ones(n), torch.full((len(yu),), weight)])
    return head_fit(torch.cat([feats[:n], extra]), torch.cat([y, yu.float()]), w, cfg, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="mnist", choices=("mnist", "fashion"))
    ap.add_argument("--prefer", nargs="*", default=["2,5", "3,8", "0,3,7"])
    ap.add_argument("--taste", nargs="*", default=[])
    ap.add_argument("--reference", required=True, help="the benchmark's plain prior particles (.pt; drawn if absent)")
    ap.add_argument("--rated", type=int, default=80)
    ap.add_argument("--unrated", type=int, default=320)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--beta", type=float, default=2.0)
    ap.add_argument("--ways", default="rated,self:0.9:0.5,prop:10:0.5")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref_path = Path(args.reference)
    if not ref_path.exists():
        reference_particles(ref_path.parent, args.prior, 25)
    reference = torch.load(ref_path)
    half = reference.shape[0] // 2
    ways = args.ways.split(",")
    sets = [tuple(int(c) for c in s.split(",")) for s in args.prefer] + list(args.taste)
    print("| set | draw | way | AUC | judge share | rarest | distinct |\n|---|---|---|---|---|---|---|", flush=True)
    every: dict[str, list[dict]] = {w: [] for w in ways}
    for prefer in sets:
        cfg = job_config(args.prior, prefer, 0.0, 0, {})
        prior, user = components.build(cfg)
        judges = Judges(user, args.prior, 16, reference, prior.decode)
        with torch.no_grad():
            images = prior.decode(reference)
            feats = torch.cat([prior.features(z, cfg.surrogate.feature_t) for z in reference.split(256)])
            ratings = torch.cat([user(im) for im in images.split(256)]).float()
        liked = judges.liked(images, "judge")
        classes = None if judges.judge_taste is not None else judges.judge.classify(images)[0]
        held = slice(half, None)
        pool_liked = {"judge": liked[held], "oracle": ratings[held] > 0}
        for d in range(args.draws):
            order = torch.randperm(half, generator=torch.Generator().manual_seed(1000 + d))
            idx = order[:args.rated + args.unrated]
            for way in ways:
                model = fitted(way, feats[idx], ratings[idx[:args.rated]], args.rated, cfg, 2000 + d)
                log_p = torch.log(prob(model, feats[held]).clamp_min(1e-30)).double()
                row = measures(args.beta * log_p, pool_liked, None if classes is None else classes[held],
                               judges.prefer)
                row["auc"] = auc(log_p, liked[held])
                row["set"] = prefer
                every[way].append(row)
                print(f"| {prefer} | {d} | {way} | {row['auc']:.3f} | {row['judge_share']:.3f} | "
                      f"{row.get('rarest', float('nan')):.3f} | {row['distinct']:.0f} |", flush=True)
    print("\nmean over sets and draws:\n| way | AUC | judge share | rarest (worst) | distinct |\n|---|---|---|---|---|")
    for way, rows in every.items():
        rare = [r["rarest"] for r in rows if "rarest" in r]
        print(f"| {way} | {statistics.mean(r['auc'] for r in rows):.3f} | "
              f"{statistics.mean(r['judge_share'] for r in rows):.3f} | "
              f"{statistics.mean(rare) if rare else float('nan'):.3f} ({min(rare) if rare else float('nan'):.3f}) | "
              f"{statistics.mean(r['distinct'] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
