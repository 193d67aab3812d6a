"""⑥ One person's session: rounds of sampling, rating and refitting, then the final batch.

  core.py         Session: the named parts below held together; its steps and how it opens
  state.py        SessionState: the store and the configuration, with the read-only queries
  sampler.py      RoundSampler: a round's FKC-SMC population (sharded over torchrun's ranks) and what it shows
  acquisition.py  which k particles the person sees: plain functions (candidates, k) -> positions
  fitter.py       SurrogateFitter: the surrogate refit on the ratings remembered, and its reward
  final.py        where the final batch starts and the move that turns its copies into new images
  lifecycle.py    next_action, read from the store alone, and drive, the one driver of the steps
  components.py   the frozen prior and feedback source, built once per configuration and shared
  checks.py       what a configuration or machine cannot run, refused before anything is written
  ranks.py        `apa align` under torchrun: rank 0 runs the session, every rank samples its share
"""

from apa.session.checks import SessionError
from apa.session.core import Session, with_overrides

__all__ = ["Session", "SessionError", "with_overrides"]
