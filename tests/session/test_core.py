"""The alignment loop end to end on the shipped MNIST prior and oracle, at a tiny size."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apa.session import components
from apa.session.lifecycle import FINAL, drive
from apa.cli import main
from apa.feedback.base import FeedbackError, FeedbackSource
from apa.registry import FEEDBACK
from apa.session import Session
from apa.session.final import final_start
from apa.store import SessionStore, StoreError

TINY = ["--budget", "8", "--per-round", "4", "--particles", "8", "--steps", "6", "--eval-samples", "8",
        "--epochs", "10", "--seed", "3"]


def _cli(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "apa.cli", *args], env=env, capture_output=True, text=True)


def _fingerprint(out: Path) -> dict:
    store = SessionStore.read(out)
    fp = {"ratings": [(r["round"], r["position"], r["particle"], r["score"]) for r in store.ratings()],
          "final": hashlib.sha256(np.load(out / "final_samples.npz")["images"].tobytes()).hexdigest()}
    for row in store.rounds():
        fp[f"surrogate{row['round']}"] = {k: v.sum().item() for k, v in store.load_surrogate(row["round"]).items()}
    return fp


def test_short_run_end_to_end(tmp_path):
    out = tmp_path / "s"
    assert main(["align", "--out", str(out), *TINY]) == 0
    with np.load(out / "final_samples.npz") as z:
        images = z["images"]
    assert images.shape == (8, 1, 28, 28) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    store = SessionStore.read(out)
    assert store.spent() == 8 and [r["status"] for r in store.rounds()] == ["complete", "complete"]
    for name in ("report.json", "report.md", "preferred_share.png", "ess.png", "config.json", "grids/round_01.png"):
        assert (out / name).exists(), name


def test_unknown_class_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["align", "--out", str(out), "--prefer", "1,12", *TINY]) == 2
    assert "12" in capsys.readouterr().err
    assert not out.exists()


def test_budget_below_k_is_refused(tmp_path, capsys):
    assert main(["align", "--out", str(tmp_path / "s"), *TINY, "--budget", "2"]) == 2
    assert "--budget 2 is below --per-round 4" in capsys.readouterr().err


class NanSource(FeedbackSource):
    """Rates every image 1 except the second, which gets NaN."""

    name = "nan-source"

    def __call__(self, images):
        s = torch.ones(images.shape[0])
        s[1] = float("nan")
        return s


@pytest.fixture
def nan_source(monkeypatch):
    """``--feedback nan-source`` registered for one test only."""
    monkeypatch.setitem(FEEDBACK._factories, "nan-source", lambda options, prior: NanSource())


def test_nan_from_feedback_is_refused_and_the_session_survives(tmp_path, nan_source):
    out = tmp_path / "s"
    with pytest.raises(FeedbackError, match="non-finite"):
        session = Session.start(out, __import__("apa.flags", fromlist=["x"]).config_from_args(
            __import__("apa.cli", fromlist=["x"]).build_parser().parse_args(["align", "--feedback", "nan-source", *TINY])))
        drive(session, until=FINAL)
    store = SessionStore.read(out)
    assert store.ratings() == [] and store.rounds()[0]["status"] == "sampled"


def test_corrupt_or_foreign_session_directory(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert main(["align", "--resume", str(foreign)]) == 2
    assert "not an apa session" in capsys.readouterr().err
    assert main(["align", "--out", str(foreign), *TINY]) == 2
    assert (foreign / "thesis.tex").read_text() == "precious"
    (foreign / "session.sqlite").write_bytes(b"\x00garbage" * 64)
    assert main(["align", "--resume", str(foreign)]) == 2
    assert "damaged" in capsys.readouterr().err
    with pytest.raises(StoreError):
        SessionStore.open(foreign)


def test_final_batch_restarts_from_the_liked_rated_particles(tmp_path):
    """final_start="liked": every first particle of the final batch is a liked rated particle plus
    σ_k·ξ at k = steps − round(restart·steps). At restart 1/6 of 6 steps, k = 5 and σ_5 ≈ 0.01, so each
    lies within 0.5 of a liked particle (σ‖ξ‖ ≈ 0.28 in 784 dims) while distinct digits differ by ≫ 1."""
    from apa.config import preset
    from apa.session import with_overrides

    cfg = with_overrides(preset("default"), sampler={"particles": 8, "steps": 6},
                         surrogate={"epochs": 10}, session={"budget": 8, "per_round": 4, "eval_samples": 8,
                                                             "seed": 3, "final_start": "liked", "restart": 1 / 6})
    session = Session.start(tmp_path / "s", cfg, progress=False)
    drive(session, until=FINAL)
    x, y = session.state.training_set()[:2]
    assert (y > 0).any() and (y < 0).any()
    initial, k = final_start(session.prior, cfg, x[y > 0], 64, torch.Generator().manual_seed(0))
    assert k == 5 and initial.shape == (64, 1, 28, 28)
    dist = torch.cdist(initial.flatten(1), x.flatten(1))  # [64, rated]
    nearest = dist.argmin(1)
    assert (dist.min(1).values < 0.5).all() and (y[nearest] > 0).all()
    assert session.final_samples(8).shape == (8, 1, 28, 28)
    noise_start = with_overrides(cfg, session={"final_start": "noise"})
    assert final_start(session.prior, noise_start, x[y > 0], 4, torch.Generator()) == (None, 0)
    session.store.close()


def test_exploration_stops_after_explore_rounds_and_a_logistic_surrogate_runs_the_loop(tmp_path):
    """--explore-rounds 1: only the first guided round (round 2) shows plain prior samples; the logistic
    surrogate's reward log P(liked | x) is never above 0 and its ratings are on the [-1, 1] scale."""
    from apa.config import preset
    from apa.session import with_overrides

    cfg = with_overrides(preset("default"), sampler={"particles": 8, "steps": 6},
                         surrogate={"epochs": 10, "loss": "logistic"},
                         session={"budget": 16, "per_round": 4, "eval_samples": 8, "seed": 3, "explore": 0.5,
                                  "explore_rounds": 1})
    session = Session.start(tmp_path / "s", cfg, progress=False)
    drive(session, until=FINAL)
    explored = [row["info"]["explored"] for row in session.store.rounds()]  # a round of 8 particles may hold
    assert explored[:2] == [0, 2] and not any(explored[2:]) and len(explored) >= 4  # fewer than 4 distinct ones
    shares = session.state.liked_shares()
    assert len(shares) == len(explored) and all(0.0 <= s <= 1.0 for s in shares)
    x, _ = session.state.training_set()[:2]
    model = session.surrogate_after(len(explored) - 1)
    with torch.no_grad():
        assert model.loss == "logistic" and (model(x) <= 0).all() and model.rating(x).abs().max() <= 1.0
    session.store.close()


class Constant(FeedbackSource):
    """A user who gives every image the same score."""

    def __init__(self, value: float):
        self.value, self.name = value, f"constant{value:+g}"

    def __call__(self, images):
        return torch.full((images.shape[0],), self.value)

    def evaluate(self, images):
        return {"n": int(images.shape[0])}


def drifting_session(tmp_path, at: int = 8, budget: int = 20, **session):
    """A session whose user likes everything for ``at`` ratings and nothing after (rounds of 4)."""
    from apa.config import preset
    from apa.feedback.drift import DriftingUser
    from apa.session import with_overrides

    cfg = with_overrides(preset("default"), sampler={"particles": 8, "steps": 6}, surrogate={"epochs": 30},
                         session={"budget": budget, "per_round": 4, "eval_samples": 8, "seed": 3, **session})
    prior = components.build(cfg)[0]
    return Session.start(tmp_path / "s", cfg, progress=False,
                         parts=(prior, DriftingUser(Constant(1.0), Constant(-1.0), at)))


def test_a_detected_change_forgets_the_rounds_before_it_and_explores_again(tmp_path):
    """--detect-change 0.5, a user who likes everything for 12 ratings and nothing after: round 4 (index
    3) is the first the new taste rates; the surrogate that was right on rounds 2-3 calls it liked,
    so its held-out accuracy is 0 and the change is read there (and nowhere else). The refit then
    uses rounds 4-6 alone, and round 5 explores as the first guided round did."""
    session = drifting_session(tmp_path, at=12, budget=24, detect_change=0.5, explore=0.5, explore_rounds=1)
    drive(session, until=FINAL)
    rows = session.store.rounds()
    assert session.state.changes() == [3] and rows[3]["info"]["surrogate_heldout"]["accuracy"] == 0.0
    explored = [r["info"]["explored"] for r in rows]  # a round of 8 particles may show fewer than 4 images
    assert explored[:5] == [0, 2, 0, 0, 2] and not any(explored[5:])
    x, y, w = session.state.training_set()
    assert len(y) == 12 and (y < 0).all() and w is None  # the ratings from round 4 on, all disliked
    session.store.close()


def test_detection_that_finds_no_change_leaves_the_session_bit_for_bit_as_without_it(tmp_path):
    """--detect-change on a user whose taste never changes (likes everything): no change is read,
    and every round's particles and log-weights and the final batch are those of the same session
    with no handling. This is why benchmarks/drift.py --steady counts a lever's cost only where it fired."""
    def fingerprint(session):
        drive(session, until=FINAL)
        rounds = [session.store.round_tensors(row["round"]) for row in session.store.rounds()]
        out = ([t["particles"] for t in rounds], [t["log_weights"] for t in rounds], session.final_samples(),
               session.state.changes())
        session.store.close()
        return out

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    on = fingerprint(drifting_session(tmp_path / "a", at=100, detect_change=0.5))
    off = fingerprint(drifting_session(tmp_path / "b", at=100, detect_change=None))
    assert on[3] == off[3] == []
    assert all(torch.equal(a, b) for a, b in zip(on[0] + on[1], off[0] + off[1])) and len(on[0]) == 5
    assert torch.equal(on[2], off[2])


def test_discount_and_window_weigh_and_cut_the_ratings_the_refit_sees(tmp_path):
    """--discount γ weighs a rating γ^(rounds of age); --window N keeps the last N ratings."""
    from apa.session import with_overrides

    session = drifting_session(tmp_path)
    drive(session, until=FINAL)
    x, y, w = session.state.training_set()
    assert len(y) == 20 and w is None and session.state.changes() == []  # no handling: everything, weight 1
    session.state.cfg = with_overrides(session.cfg, surrogate={"discount": 0.5, "window": 10})
    x, y, w = session.state.training_set()
    rounds = session.state.rated_rounds()  # a round of 8 particles may show fewer than 4 distinct ones
    last = rounds[-1][0]
    weights = [0.5 ** (last - r) for r, _, ry in rounds for _ in range(len(ry))][-10:]
    assert len(y) == 10 and y.tolist() == [-1.0] * 10 and w.tolist() == weights
    assert torch.equal(x, torch.cat([rx for _, rx, _ in rounds])[-10:])
    session.store.close()


def test_forget_before_on_resume_is_checked_stored_and_used(tmp_path, capsys):
    """`apa align --resume DIR --forget-before N`: a round past the session's is refused in one line with
    the store unchanged; a valid one is stored in the configuration and the refit forgets rounds 1..N-1."""
    out = tmp_path / "s"
    assert main(["align", "--out", str(out), *TINY]) == 0
    before = (out / "config.json").read_bytes()
    assert main(["align", "--resume", str(out), "--forget-before", "9"]) == 2
    assert "--forget-before 9" in capsys.readouterr().err and (out / "config.json").read_bytes() == before
    assert main(["align", "--resume", str(out), "--forget-before", "2", "--budget", "12"]) == 0
    session = Session.resume(out, progress=False)
    assert session.cfg.session.forget_before == 2 and session.state.forget_point() == 1
    assert [r for r, _, _ in session.state.rated_rounds()] == [0, 1, 2] and len(session.state.training_set()[:2][1]) == 8
    session.store.close()


def test_more_final_particles_than_images_cost_their_rows_and_still_give_the_images(tmp_path, capsys):
    """--final-particles 16 for 8 images: the final batch's run costs twice the network-call rows of 8
    particles (every row but one is per particle; each particle runs ε at each of the 6 steps) and still
    stores 8 images; fewer particles than images are refused before anything is written."""
    calls = {}
    for n in (None, 16):
        out = tmp_path / f"s{n}"
        extra = ["--final-particles", str(n)] if n else []
        assert main(["align", "--out", str(out), "--final-move", "none", *extra, *TINY]) == 0
        calls[n] = SessionStore.read(out).record("final_checks")["final_calls"]
        assert np.load(out / "final_samples.npz")["images"].shape[0] == 8
    assert abs(calls[16] - 2 * calls[None]) <= 1 and calls[None] >= 8 * 6
    assert main(["align", "--out", str(tmp_path / "bad"), "--final-particles", "4", *TINY]) == 2
    assert "--final-particles" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_until_something_is_liked_the_rounds_search_as_asked(tmp_path):
    """--search farthest, a user who likes nothing for 12 ratings and everything after (rounds of 4): rounds
    2-4 (indices 1-3, before the first liked rating was given) show plain prior samples, each the farthest,
    in the surrogate's features, from every image rated before and from those chosen (recomputed here from
    the stored particles); from round 5 on the rounds are tilted. --search plain draws the same plain samples
    and shows them at random; the default (tilt) steers round 2 by the dislikes."""
    from apa.feedback.drift import DriftingUser
    from apa.session.acquisition import farthest_from
    from apa.session.final import start_features

    rounds = {}
    for search in ("farthest", "plain", "tilt"):
        session = drifting_session(tmp_path / search, at=12, budget=24, search=search)
        session.feedback = DriftingUser(Constant(-1.0), Constant(1.0), 12)
        drive(session, until=FINAL)
        rows = session.store.rounds()
        rounds[search] = [session.store.round_tensors(r["round"]) for r in rows]
        if search == "tilt":
            assert rows[1]["info"]["beta_used"] and "searched" not in rows[1]["info"]
            session.store.close()
            continue
        searched = [r["info"].get("searched") for r in rows]  # tilted rounds of 8 particles may show fewer than 4
        assert searched[:4] == [None, search, search, search] and not any(searched[4:]) and len(rows) > 4
        assert [r["info"]["beta_used"] for r in rows[:4]] == [False] * 4 and all(r["info"]["beta_used"] for r in rows[4:])
        if search == "farthest":
            for r in (1, 2, 3):
                seen = torch.cat([session.state.rated(q)[0] for q in range(r)])
                t = rounds[search][r]
                space = start_features(session.prior, session.cfg.surrogate.feature_t,
                                       torch.cat([t["particles"], seen])).double()
                assert torch.equal(t["shown"], farthest_from(space[:8], space[8:], 4))
        session.store.close()
    for r in (1, 2, 3):  # the same plain samples, chosen two ways
        assert torch.equal(rounds["farthest"][r]["particles"], rounds["plain"][r]["particles"])
    assert not torch.equal(rounds["farthest"][1]["shown"], rounds["plain"][1]["shown"])


def test_after_a_tilted_round_with_no_like_half_the_next_searches(tmp_path):
    """--search-on-miss 0.5, a user who likes round 1's four images and nothing after (rounds of 4; round 2
    shows 2 tilted and 2 plain, --explore): from round 3 on every round follows a tilted round whose tilted
    images were all disliked, so it shows 2 tilted particles and 2 of 8 plain samples, each the farthest in the
    surrogate's features from every image rated before and from the one chosen (recomputed here from a fresh
    draw of the same plain samples). Rounds 1-2 are those of --search-on-miss 0 bit for bit, and a user who
    likes everything never sees a search. Detects a search on a round that followed a like, a search that
    ignores the rated images, and a changed round before the first miss."""
    from apa.seeding import generator
    from apa.session.acquisition import farthest_from
    from apa.session.final import start_features

    stored = {}
    for share in (0.0, 0.5):
        session = drifting_session(tmp_path / str(share), at=4, budget=24, search_on_miss=share)
        drive(session, until=FINAL)
        rows = session.store.rounds()
        stored[share] = [session.store.round_tensors(r["round"]) for r in rows]
        searched = [r["info"].get("searched") for r in rows]
        if share == 0.0:
            assert not any(searched)
            session.store.close()
            continue
        assert searched == [None, None] + ["farthest, 2 of 4"] * (len(rows) - 2) and len(rows) == 6
        for r in range(2, len(rows)):
            t = stored[share][r]
            assert t["shown"][-2:].tolist() == [8, 9] and not torch.isfinite(t["log_weights"][8:]).any()
            seen = torch.cat([session.state.rated(q)[0] for q in range(r)])
            plain = session.sampler.plain(8, generator(3, r, "search")).cpu()
            space = start_features(session.prior, session.cfg.surrogate.feature_t, torch.cat([plain, seen])).double()
            assert torch.equal(t["particles"][8:], plain[farthest_from(space[:8], space[8:], 2)])
        session.store.close()
    for r in (0, 1):
        assert all(torch.equal(stored[0.0][r][key], stored[0.5][r][key]) for key in ("particles", "shown"))
    liking = drifting_session(tmp_path / "liking", at=24, budget=24, search_on_miss=0.5)
    drive(liking, until=FINAL)
    assert not any(r["info"].get("searched") for r in liking.store.rounds())
    liking.store.close()


def test_a_round_after_a_mild_tilt_reads_the_potential_less_often(tmp_path):
    """--mild-tilt 0.5 --mild-every 3 (6 steps, rounds of 4): every round after a tilted round whose stored
    normaliser estimate E_prior[P^β] is at least 0.5 runs at --reweight-every 3, and no other round does. A user
    who likes everything makes the surrogate's P near 1, so the tilt is mild from round 2 on; such a round costs
    fewer network-call rows than the same round at every step, and the rounds before the first mild one are
    those of a session without the rule, bit for bit. Detects a rule that ignores the threshold, a mild round
    that still reads the potential at every step, and a rule that changes the rounds before it."""
    import math

    runs = {}
    for name, mild in (("off", None), ("mild", 0.5)):
        session = drifting_session(tmp_path / name, at=24, budget=16, mild_tilt=mild, mild_every=3)
        drive(session, until=FINAL)
        runs[name] = (session.store.rounds(), [session.store.round_tensors(r) for r in range(4)])
        session.store.close()
    rows, tensors = runs["mild"]
    for r in range(1, len(rows)):
        before = rows[r - 1]["info"].get("log_z")
        mild = before is not None and before >= math.log(0.5)
        assert rows[r]["info"].get("reweight_every") == (3 if mild else None)
    first = next(r for r in range(len(rows)) if rows[r]["info"].get("reweight_every"))
    assert first == 2 and math.isfinite(rows[1]["info"]["log_z"])
    assert rows[first]["info"]["calls"] < runs["off"][0][first]["info"]["calls"]
    assert not any(r["info"].get("reweight_every") for r in runs["off"][0])
    for r in range(first):
        assert all(torch.equal(tensors[r][k], runs["off"][1][r][k]) for k in ("particles", "log_weights", "shown"))


def test_the_final_batch_after_a_mild_round_reads_the_potential_less_often(tmp_path):
    """--mild-tilt 0.5 --mild-every 3 --final-particles 12 (8 images): a user who likes everything leaves the
    last round mild, so the final batch (--mild-final, the default) runs its 12 particles reading the potential
    every 3rd step: the very batch that --reweight-every 3 draws, bit for bit. Where the last round is not mild
    (--mild-tilt 1.0, a share no tilt keeps) the final batch is the one drawn without --mild-final. Detects a
    final batch that ignores the rule, that drops --final-particles or takes its K from elsewhere, or that
    applies it after a round that was not mild."""
    import math

    from apa.session import with_overrides

    session = drifting_session(tmp_path, at=24, budget=16, mild_tilt=0.5, mild_every=3, final_particles=12)
    drive(session, until=FINAL)
    last, cfg = len(session.store.rounds()) - 1, session.cfg
    assert session.store.rounds()[last]["info"]["log_z"] >= math.log(0.5)
    assert session._final_run(last, 8) == (12, 3)

    def drawn(**changes) -> torch.Tensor:
        return Session(session.store, with_overrides(cfg, **changes), session.prior, session.feedback,
                       progress=False).final_samples()

    mild = session.final_samples()
    assert mild.shape[0] == 8
    assert torch.equal(mild, drawn(sampler={"reweight_every": 3},
                                   session={"mild_tilt": None, "mild_final": False}))
    strict = Session(session.store, with_overrides(cfg, session={"mild_tilt": 1.0}), session.prior,
                     session.feedback, progress=False)
    assert strict._final_run(last, 8) == (12, None)
    assert torch.equal(strict.final_samples(), drawn(session={"mild_final": False}))
    assert not torch.equal(mild, strict.final_samples())
    session.finish()
    assert session.records()["final_checks"]["final_run"] == {"particles": 12, "reweight_every": 3}
    session.store.close()


def _final_drawn(session, sampler: dict | None = None, **overrides) -> tuple[torch.Tensor, int]:
    """The final batch of a finished session redrawn with session settings changed, and its ε rows."""
    from apa.priors.calls import counting
    from apa.session import with_overrides

    cfg = with_overrides(session.cfg, sampler=sampler or {}, session=overrides)
    with counting() as calls:
        images = Session(session.store, cfg, session.prior, session.feedback, progress=False).final_samples()
    return images, calls.eps


def _only_flagged_moved(session, flagged: torch.Tensor, before: torch.Tensor, after: torch.Tensor, extra_eps: int):
    """Every image not flagged [n] is the same in both batches [n, ...], bit for bit, and the extra ε rows are
    one move's proposal steps for each flagged image."""
    changed = (after != before).flatten(1).any(dim=1)
    assert not bool(changed[~flagged].any())
    steps, t = session.cfg.sampler.steps, session.cfg.session.final_move
    below = int((session.prior.sigmas(steps) < float(session.prior.sigma_of_t(torch.tensor([t])))).sum())
    assert extra_eps == int(flagged.sum()) * below


def test_final_repeats_move_only_the_images_that_repeat_another_and_pay_only_for_them(tmp_path):
    """--final-repeats 1 after the sweeps (12 images from 12 particles, so resampling leaves copies): every
    image that :func:`repeats` does not flag in the batch drawn without it is the same, bit for bit, and the
    extra ε rows are the flagged images' proposal steps alone. Detects the pass moving the whole batch, moving
    nothing, or not running in the session's final batch at all."""
    from apa.session.final import repeats

    session = drifting_session(tmp_path, at=4, budget=8, eval_samples=12)
    drive(session, until=FINAL)
    steep = {"beta": (0.0, 30.0)}  # a steep final tilt: copies the sweeps do not all move
    (before, eps_before) = _final_drawn(session, steep, final_repeats=0, final_unseen=0.0)
    (after, eps_after) = _final_drawn(session, steep, final_repeats=1, final_unseen=0.0)
    flagged = repeats(before)
    assert 0 < int(flagged.sum()) < 12
    _only_flagged_moved(session, flagged, before, after, eps_after - eps_before)
    session.store.close()


def test_final_unseen_moves_the_images_nearest_the_rated_ones_with_the_repeats(tmp_path):
    """--final-unseen 0.25 with one pass: the images moved are those :func:`repeats` flags in the batch drawn
    without the pass, given the session's rated images and the quarter of the batch nearest them, and the
    extra ε rows are theirs alone. Detects the session not handing its rated images to the passes, or the
    share not reaching them."""
    from apa.session.final import repeats, seen_distance

    session = drifting_session(tmp_path, at=4, budget=8, eval_samples=12)
    drive(session, until=FINAL)
    (before, eps_before) = _final_drawn(session, final_repeats=0, final_unseen=0.0)
    (after, eps_after) = _final_drawn(session, final_repeats=1, final_unseen=0.25)
    seen = session.prior.decode(session.state.training_set()[0])
    within = float(torch.quantile(seen_distance(before, seen), 0.25))
    flagged = repeats(before, seen=seen, within=within)
    assert int((flagged & ~repeats(before)).sum()) >= 1 and int(flagged.sum()) < 12
    _only_flagged_moved(session, flagged, before, after, eps_after - eps_before)
    session.store.close()
