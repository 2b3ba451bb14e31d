"""Plausible wrong answers to notebook 04's exercises (tests/test_exercise_cells.py)."""

import math


def gaussian_std(alpha, length, dim):
    # Takes NEFTune's bound s for the standard deviation, forgetting that Uniform(-s, s) has variance s^2 / 3.
    return alpha / math.sqrt(length * dim)


def trl_matching_alpha(batches, max_length, alpha):
    # Averages each batch's norm factor sqrt(K_b) (K_b samples share the flattened row): matches the noise norms,
    # not the energies.
    if not batches:
        return float(alpha)
    return alpha * sum(math.sqrt(len(b)) for b in batches) / len(batches)
