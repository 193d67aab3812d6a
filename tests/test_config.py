import dataclasses

import pytest

from apa.cli import ALIGN_FLAGS, SECTION_OF, build_parser, config_from_args
from apa.config import AlignConfig, preset


def test_json_round_trip(tmp_path):
    cfg = preset("seed")
    cfg.save(tmp_path / "c.json")
    assert AlignConfig.load(tmp_path / "c.json") == cfg


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="unknown SamplerConfig fields"):
        AlignConfig.from_dict({"sampler": {"particels": 3}})
    with pytest.raises(ValueError, match="sections"):
        AlignConfig.from_dict({"samplr": {}})


def test_seed_preset_restores_the_seed_values():
    s = preset("seed")
    assert (s.sampler.particles, s.sampler.steps, s.sampler.beta, s.sampler.gamma) == (32, 25, (0.5, 2.0), (0.05, 0.0))
    assert (s.sampler.beta_dot, s.sampler.clamp, s.sampler.resample, s.sampler.jacobian) == (1.0, 100.0, "none", "identity")
    assert (s.surrogate.kind, s.surrogate.epochs, s.surrogate.batch_size, s.surrogate.lr) == ("pixels", 200, 32, 1e-3)
    assert (s.session.budget, s.session.per_round, s.session.acquisition) == (80, 8, "weight")
    assert s.surrogate.ceiling is None
    assert s.feedback.users == ("apple", "grape", "banana") and s.feedback.temperature == 10.0


def test_every_config_field_has_exactly_one_flag():
    flagged = {(SECTION_OF[k], name) for k, name in ALIGN_FLAGS.values()}
    fields = {(SECTION_OF[type(getattr(AlignConfig(), s))], f.name)
              for s in ("prior", "sampler", "surrogate", "feedback", "session")
              for f in dataclasses.fields(getattr(AlignConfig(), s))}
    assert flagged == fields
    assert len(flagged) == len(ALIGN_FLAGS)


def test_flags_map_to_fields():
    args = build_parser().parse_args(["align", "--out", "x", "--beta", "1,4", "--prefer", "0", "--clamp", "none",
                                      "--diversity", "true", "--surrogate", "pixels", "--preset", "seed"])
    cfg = config_from_args(args)
    assert cfg.sampler.beta == (1.0, 4.0) and cfg.feedback.prefer == (0,) and cfg.sampler.clamp is None
    assert cfg.sampler.diversity is True and cfg.surrogate.kind == "pixels"
    assert cfg.sampler.resample == "none"  # the rest of the seed preset stays
