"""Measures of what sampling produced: Fréchet distance, diversity, coverage of preferred classes."""

from apa.evaluation.metrics import coverage_entropy, frechet_distance, mean_pairwise_distance

__all__ = ["coverage_entropy", "frechet_distance", "mean_pairwise_distance"]
