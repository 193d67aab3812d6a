"""The report is a view of records the session stored at its end: writing it samples nothing, and a
session that stopped between its final batch and its records gets them measured and stored once."""

from __future__ import annotations

import json

import pytest

import apa.smc.sampler
from apa.config import preset
from apa.evaluation.report import report_view, write_report
from apa.measures import records
from apa.session import Session, core, with_overrides
from apa.session.lifecycle import FINAL, drive

CFG = with_overrides(preset("default"), sampler={"particles": 8, "steps": 4}, surrogate={"epochs": 5},
                     session={"budget": 8, "per_round": 4, "eval_samples": 8, "seed": 1})


def _no_sampling(monkeypatch):
    """Every population, plain or tilted and wherever its caller imported the sampler from, starts in
    ``init_state``: refusing it there catches any sampling."""
    def refuse(*args, **kwargs):
        raise AssertionError("the report sampled")

    monkeypatch.setattr(apa.smc.sampler, "init_state", refuse)


def test_the_report_shows_the_records_and_samples_nothing(tmp_path, monkeypatch):
    s = Session.start(tmp_path / "s", CFG, progress=False)
    drive(s, until=FINAL)
    s.finish()
    stored = {name: s.store.record(name) for name in records.RECORDS}
    assert stored["final_eval"]["n"] == 8 and stored["prior_baseline"]["n"] == 8 and stored["final_checks"]
    _no_sampling(monkeypatch)
    report = json.loads(write_report(report_view(s)).with_suffix(".json").read_text())
    shown = {"final_eval": report["final"], "prior_baseline": report["prior_baseline"],
             "final_checks": report["final_checks"]}
    assert shown == stored
    s.store.close()


def test_a_final_batch_without_records_gets_them_once(tmp_path, monkeypatch):
    s = Session.start(tmp_path / "s", CFG, progress=False)
    drive(s, until=FINAL)
    assert s.records() == {name: {} for name in records.RECORDS}  # no final batch yet
    s.store.save_final(s.final_samples())  # stopped here: the batch stored, its records not
    assert all(s.store.record(name) is None for name in records.RECORDS)
    first = s.records()
    assert {name: s.store.record(name) for name in records.RECORDS} == first
    _no_sampling(monkeypatch)
    monkeypatch.setattr(core, "measure_final", lambda view: pytest.fail("measured twice"))
    assert s.records() == {name: s.store.record(name) for name in records.RECORDS}
    s.store.close()
