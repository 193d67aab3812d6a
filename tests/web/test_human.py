"""The `human` feedback source: a person's 1..5 scale, answered on the web page, never by a call."""

from __future__ import annotations

import pytest
import torch

from apa.feedback.human import SCALE
from apa.registry import FEEDBACK
from apa.session import Session


def test_registered_with_its_scale_and_refuses_calls():
    source = FEEDBACK.create("human", {}, None)
    assert source.name == "human" and source.scale == SCALE == (1.0, 5.0)
    with pytest.raises(RuntimeError, match="apa serve"):
        source(torch.zeros(2, 1, 28, 28))


def test_the_session_maps_a_persons_ratings_onto_minus_one_to_one(tmp_path, tiny_cfg):
    s = Session.start(tmp_path / "s", tiny_cfg, progress=False)
    r = s.next_round()
    for p, score in enumerate([1.0, 3.0, None, 5.0]):
        s.record_all(r, [(p, score)], "human")
    _, y = s.state.training_set()[:2]
    assert y.tolist() == [-1.0, 0.0, 1.0]
