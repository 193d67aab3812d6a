"""What a session does next, read from its store alone: one lifecycle for `apa align`, `apa serve`
and the comparison's sessions.

    SAMPLE r -> RATE r -> FIT r -> SAMPLE r+1 -> ... -> (budget spent) FINAL -> DONE

A crash between any two durable steps leaves the store in one of these states, so a resumed
session (or a server reopening one) continues with exactly the step that was interrupted.
"""

from __future__ import annotations

from typing import NamedTuple

from apa.store import SAMPLED, SessionStore

SAMPLE, RATE, FIT, FINAL, DONE = "sample", "rate", "fit", "final", "done"


class Action(NamedTuple):
    kind: str  # SAMPLE | RATE | FIT | FINAL | DONE
    round: int | None = None  # the round it concerns (None for FINAL and DONE)


def next_action(store: SessionStore, budget: int) -> Action:
    """The next step of a session with this store and budget (reads the store, writes nothing).

    - the last round is open: RATE it while any shown image waits for a rating, else FIT it;
    - otherwise, with budget left: SAMPLE the next round;
    - otherwise FINAL until the final batch is stored, then DONE.
    """
    r = store.open_round()
    if r is not None:
        return Action(RATE if store.stage(r) == SAMPLED else FIT, r)
    if store.spent() < budget:
        return Action(SAMPLE, len(store.rounds()))
    return Action(DONE) if store.final_path.exists() else Action(FINAL)
