"""How the final batch is drawn, measured as what a person takes home: finished sessions, one final draw
changed at a time, side by side.

The default final batch resamples 256 images from 256 weighted particles; late resampling leaves copies
the last, nearly noise-free steps cannot separate (86–201 distinct images of 256 in
`benchmarks/align_results.py`). Variants:

- ``default``: the session's own final batch;
- ``set:SECTION.KEY=VALUE[;SECTION.KEY=VALUE]``: the final batch redrawn with settings changed (``set:sampler.drift=3``,
  ``set:sampler.ess_threshold=0.2``: with the exact weights the target stays the same;
  ``set:session.final_move=500``: every image moved once, the package's own move; ``final.NAME=VALUE`` sets a
  constant of ``apa.session.final`` for that draw, ``final.YARDSTICK_READS=1`` the repeats' line read once);
- ``renoise:T``: every repeat of an image already in the batch is moved once by a Metropolis–Hastings
  step: re-noised to training timestep T and denoised by the prior's own ancestral steps (a move that
  leaves the prior's law nearly invariant), accepted with probability min(1, exp(β_end·(r(x') − r(x))))
  so the tilted target stays the target; an accepted move is a new image near the old one;
- ``repeats:T:S``: ``renoise:T`` S times, the repeats found anew before each;
- ``unrepeated:T:S``: the package's ``--final-repeats S`` at ``--final-move T`` on the session's own batch
  (repeats read from the batch itself, not from the yardstick above).

  python benchmarks/final_draw.py runs/yield_mnist/mnist_p0_n0_s0 runs/yield_mnist/mnist_p38_n0_s0 \\
      --variants default,set:sampler.drift=3,set:sampler.ess_threshold=0.2,renoise:500,set:session.final_move=500
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from align_results import Judges, copied_session  # noqa: E402

from apa.measures.novelty import users_liked
from apa.measures.yields import distinct_mask, duplicate_threshold, take_home
from apa.feedback.tastes import prior_pool
from apa.priors.calls import counting
from apa.session import final
from apa.session.final import moved, repeats, unrepeated
from apa.seeding import generator
from apa.session import Session, with_overrides


def move_repeats(session, particles: torch.Tensor, t: int, threshold: float, gen: torch.Generator
                 ) -> tuple[torch.Tensor, dict]:
    """Each particle [n, *event] that repeats an earlier one gets one MH move (see the module doc)."""
    prior, beta = session.prior, session.cfg.sampler.beta[1]
    reward = session.fitter.reward(session.surrogate_after(len(session.store.rounds()) - 1))
    repeats = (~distinct_mask(prior.decode(particles), threshold)).nonzero().flatten()
    if repeats.numel() == 0:
        return particles, {"repeats": 0, "accepted": 0}
    out = particles.clone()
    out[repeats] = moved(prior, reward, particles[repeats], t, beta, session.cfg.sampler.steps, gen)
    accept = (out[repeats] != particles[repeats]).flatten(1).any(dim=1)
    return out, {"repeats": int(repeats.numel()), "accepted": int(accept.sum())}


def settings(text: str) -> dict[str, dict]:
    """``SECTION.KEY=VALUE[;SECTION.KEY=VALUE...]`` as ``with_overrides`` keywords."""
    out: dict[str, dict] = {}
    for item in text.split(";"):
        key, value = item.split("=")
        section, name = key.split(".")
        out.setdefault(section, {})[name] = json.loads(value)
    return out


@contextmanager
def constants(values: dict):
    """``apa.session.final``'s module constants set to ``values`` (``final.YARDSTICK_READS=1``: the repeats'
    line read once, over the whole batch, as before it was read over the kept images), restored after."""
    before = {name: getattr(final, name) for name in values}
    for name, value in values.items():
        setattr(final, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(final, name, value)


def print_session(src: str, variants: list[str], reference: torch.Tensor | None) -> None:
    """One table row per final draw of the finished session at ``src`` (a copy; never written)."""
    with copied_session(src) as s:
        user = s.feedback
        pool = prior_pool(s.prior, 2048)
        prior_liked = pool[users_liked(user, pool)]  # the user's taste: classes, or one no class names
        threshold = duplicate_threshold(prior_liked)
        x, _ = s.state.training_set()[:2]
        rated = s.prior.decode(x)
        last = len(s.store.rounds()) - 1
        batch, drawn = None, None
        if any(not v.startswith("set:") for v in variants):
            with counting() as drawn:
                batch = s.final_samples()  # the session's own final batch, drawn once; each variant starts from it
        judges = None if reference is None else Judges(user, s.cfg.prior.name, 16, reference, s.prior.decode)
        for variant in variants:
            images, moved = batch, {}
            with counting() as calls:
                if variant.startswith("set:"):
                    changed = settings(variant[4:])
                    with constants(changed.pop("final", {})):
                        images = Session(s.store, with_overrides(s.cfg, **changed), s.prior,
                                         s.feedback, progress=False).final_samples()
                elif variant.startswith(("renoise:", "repeats:")):
                    t, sweeps = (int(v) for v in (variant.split(":")[1:] + ["1"])[:2])
                    gen = torch.Generator().manual_seed(1_000_003 * s.cfg.session.seed + last)
                    z, moved = batch * 2.0 - 1.0, {"repeats": 0, "accepted": 0}
                    for _ in range(sweeps):
                        z, m = move_repeats(s, z, t, threshold, gen)
                        moved = {k: moved[k] + m[k] for k in moved}
                    images = s.prior.decode(z)
                elif variant.startswith("unrepeated:"):
                    t, times = (int(v) for v in variant.split(":")[1:3])
                    z = batch * 2.0 - 1.0
                    reward = s.fitter.reward(s.surrogate_after(last))
                    out = unrepeated(s.prior, reward, z, t, s.cfg.sampler.beta[1], s.cfg.sampler.steps,
                                     generator(s.cfg.session.seed, last + 1, "repeats"), times)
                    changed = (out != z).flatten(1).any(dim=1)
                    moved = {"repeats": int(repeats(z).sum()), "accepted": int(changed.sum())}
                    images = s.prior.decode(out)
            mask = users_liked(user, images)
            spent = calls.total + (0 if variant.startswith("set:") else drawn.total)  # a redraw replaces the batch
            home = take_home(images, mask, rated, prior_liked, spent)
            judged, share, rarest = "–", "–", "–"
            if judges is not None:
                liked = judges.liked(images, "judge")
                judged = take_home(images, liked, rated, judges.prior_liked["judge"], spent)["yield"]
                share, rarest = f"{float(liked.double().mean()):.3f}", rarest_class(judges, images, liked)
            print(f"| {Path(src).name} | {variant} | {float(mask.double().mean()):.3f} | {home['distinct']} | "
                  f"{home['yield']} | {judged} | {share} | {rarest} | {moved.get('repeats', '–')} / "
                  f"{moved.get('accepted', '–')} | {spent} |", flush=True)


def rarest_class(judges: Judges, images: torch.Tensor, liked: torch.Tensor) -> str:
    """The judge's rarest liked class as a share of the images it likes [n] (a set of two classes or more), else –."""
    if judges.judge_taste is not None or len(judges.prefer) < 2 or not bool(liked.any()):
        return "–"
    return f"{judges.judge.evaluate(images, judges.prefer)['min_class_share']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sessions", nargs="+", help="finished session directories (copied; never written)")
    ap.add_argument("--variants", default="default,renoise:300,renoise:500")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reference", help="the benchmark's plain prior particles (.pt): adds the independent "
                                        "judge's yield, as benchmarks/align_results.py counts it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reference = torch.load(args.reference) if args.reference else None
    print("| session | final draw | liked (oracle) | distinct of 256 | yield | yield (judge) | liked (judge) | "
          "rarest liked class (judge) | repeats moved / accepted | final-batch call rows |\n|" + "---|" * 10,
          flush=True)
    for src in args.sessions:
        print_session(src, args.variants.split(","), reference)


if __name__ == "__main__":
    main()
