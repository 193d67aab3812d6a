"""What a session does next, read from its store alone, and the one driver that does it, for
`apa align`, `apa serve` and the comparison's sessions alike.

    SAMPLE r -> RATE r -> FIT r -> SAMPLE r+1 -> ... -> (budget spent) FINAL -> DONE

A crash between any two durable steps leaves the store in one of these states, so a resumed
session (or a server reopening one) continues with exactly the step that was interrupted.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from apa.session.checks import SessionError
from apa.store import SAMPLED, Store

SAMPLE, RATE, FIT, FINAL, DONE = "sample", "rate", "fit", "final", "done"


class Action(NamedTuple):
    kind: str  # SAMPLE | RATE | FIT | FINAL | DONE
    round: int | None = None  # the round it concerns (None for FINAL and DONE)


def next_action(store: Store, budget: int) -> Action:
    """The next step of a session with this store and budget (reads the store, writes nothing).

    - the last round is open: RATE it while any shown image waits for a rating, else FIT it;
    - otherwise, with budget left: SAMPLE the next round;
    - otherwise FINAL until a final batch drawn after the last round is stored, then DONE (a budget
      raised on a finished session adds rounds, and then a new final batch).
    """
    r = store.open_round()
    if r is not None:
        return Action(RATE if store.stage(r) == SAMPLED else FIT, r)
    if store.spent() < budget:
        return Action(SAMPLE, len(store.rounds()))
    return Action(DONE) if store.final_is_current() else Action(FINAL)


def drive(session: Any, answers: bool = True, on_step: Callable[[Action], None] | None = None,
          on_round: Callable[[int, Any], None] | None = None, until: str = DONE) -> Action:
    """Take the steps ``next_action`` names, each durable before the next, until the session is DONE:
    SAMPLE, RATE (the session's simulated user answers; with ``answers`` False, a person rates
    through the page and the driver stops there), FIT and FINAL (the final batch and its records).
    ``on_step(action)`` before each step; ``on_round(r, session)`` after each refit. Returns the
    action it stopped at: RATE (waiting for a person), ``until`` (FINAL: the rounds only) or DONE."""
    if answers and session.cfg.feedback.name == "human":
        raise SessionError("feedback 'human' is given through `apa serve`, not `apa align`")
    steps = {SAMPLE: session.sample_round, RATE: session.answer, FIT: session.finish_round,
             FINAL: lambda _: session.finish()}
    while (action := next_action(session.store, session.cfg.session.budget)).kind not in (DONE, until):
        if action.kind == RATE and not answers:
            return action
        if on_step is not None:
            on_step(action)
        steps[action.kind](action.round)
        if action.kind == FIT and on_round is not None:
            on_round(action.round, session)
    return action
