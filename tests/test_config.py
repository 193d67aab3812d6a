import pytest

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


def test_stored_configs_from_before_a_field_existed_keep_their_meaning():
    """A session stored before exact weights and the final restart existed resumes as it was made."""
    d = AlignConfig().to_dict()
    del d["sampler"]["weights"], d["session"]["final_start"]
    old = AlignConfig.from_dict(d)
    assert old.sampler.weights == "rate" and old.session.final_start == "noise"


def test_a_session_stored_with_its_sweeps_keeps_them():
    """Sessions stored before --final-sweeps redraw their final batch with one move per image, as they drew it;
    sessions stored with two sweeps (the default from 2026-12-07 until --final-repeats made one enough) keep two."""
    d = AlignConfig().to_dict()
    del d["session"]["final_sweeps"]
    assert AlignConfig.from_dict(d).session.final_sweeps == 1 and AlignConfig().session.final_sweeps == 1
    d["session"]["final_sweeps"] = 2
    assert AlignConfig.from_dict(d).session.final_sweeps == 2


def test_a_session_stored_before_final_repeats_moves_no_repeat_again():
    """Sessions stored before --final-repeats redraw their final batch the same (0); new ones move repeats up to 16 times."""
    d = AlignConfig().to_dict()
    del d["session"]["final_repeats"]
    assert AlignConfig.from_dict(d).session.final_repeats == 0 and AlignConfig().session.final_repeats == 16


def test_a_session_stored_before_final_unseen_moves_no_image_for_being_near_a_rated_one():
    """Sessions stored before --final-unseen redraw their final batch the same (0); new ones move the tenth nearest."""
    d = AlignConfig().to_dict()
    del d["session"]["final_unseen"]
    assert AlignConfig.from_dict(d).session.final_unseen == 0.0 and AlignConfig().session.final_unseen == 0.1
