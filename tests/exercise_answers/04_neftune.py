"""Plausible wrong answers to notebook 04's exercises (tests/test_exercise_cells.py)."""

import math


def gaussian_std(alpha, length, dim):
    # Takes NEFTune's bound s for the standard deviation, forgetting that Uniform(-s, s) has variance s^2 / 3.
    return alpha / math.sqrt(length * dim)


def matching_alpha(sample_lengths, row_length, alpha):
    # Averages each sample's norm factor sqrt(T / L_i): matches the noise norms, not the variance per token.
    return alpha * sum(math.sqrt(row_length / n) for n in sample_lengths) / len(sample_lengths)
