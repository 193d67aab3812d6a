"""The model card's report: real images judge as real, and `apa evaluate-prior` reports a given file."""

import json

import torch

from apa import data
from apa.cli import main
from apa.evaluation.prior_quality import quality
from apa.feedback.classifier import load_oracle
from apa.priors.ddpm import weights_path


def test_real_images_score_as_real(mnist_arrays):
    real = torch.from_numpy(data.to_unit(mnist_arrays["test_images"]))
    q = quality(real[1::2], load_oracle("mnist"), real)  # "samples" = the real half the floor uses
    assert abs(q["confident_share"] - q["real_confident_share"]) < 0.02 and q["confident_share"] > 0.95
    assert abs(sum(q["class_shares_of_all"]) - 1) < 1e-3 and min(q["class_shares_of_all"]) > 0.05
    assert abs(q["fd_to_real"] - q["fd_real_vs_real"]) < 1e-6 * max(1.0, q["fd_real_vs_real"])
    # per class, the confident share among the images a class tops; averaged with the class
    # shares as weights it is the overall confident share
    mixed = sum(s * c for s, c in zip(q["class_shares_of_all"], q["confident_share_by_top_class"]))
    assert abs(mixed - q["confident_share"]) < 1e-3 and len(q["real_confident_share_by_top_class"]) == 10


def test_evaluate_prior_reports_the_given_file(mnist_arrays, capsys):
    assert main(["evaluate-prior", "--dataset", "mnist", "-n", "8", "--steps", "3",
                 "--prior-weights", str(weights_path("mnist"))]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 8 and report["steps"] == 3 and report["oracle_test_accuracy"] > 0.98
    assert 0.0 <= report["confident_share"] <= 1.0 and len(report["class_shares_of_confident"]) == 10
