"""Plausible wrong answers to notebook 04's exercises (tests/test_exercise_cells.py), and the oracle of exercise 2's
stored cases (data/exercises/04_neftune.pt; tests/test_neftune.py recomputes them from it)."""

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


# Exercise 2's arguments: one batch; batches of different sizes; samples longer than max_length; one sample per batch;
# no noise; no batches. Non-round alphas and mixed batch sizes, so that no case reads as alpha * sqrt(a small integer).
TRL_MATCHING_ALPHA_ARGS = [([[13, 41, 7]], 96, 3.7), ([[23, 5], [61, 17, 9, 30], [44]], 128, 6.3),
                           ([[150, 11, 9], [8, 8, 8, 8]], 64, 2.9), ([[50], [12], [3], [77]], 64, 4.2),
                           ([[6, 10, 3]], 16, 0.0), ([], 64, 5.5)]


def trl_matching_alpha_oracle(batches, max_length, alpha):
    """From each sample's share of its flattened row, not from the solution's closed form: sample i of batch b keeps
    l_i tokens (truncated to max_length), the row has T_b = sum of them, and TRL's hook at alpha' gives the sample the
    energy alpha'^2 l_i / (3 T_b); per-sample L gives alpha^2 / 3. Equal means over the run's samples:
    alpha' = alpha / sqrt(mean_i l_i / T_b)."""
    if not batches:
        return float(alpha)
    shares = []
    for batch in batches:
        kept = [min(n, max_length) for n in batch]
        shares += [n / sum(kept) for n in kept]
    return float(alpha) / math.sqrt(sum(shares) / len(shares))


def exercise_cases_04():
    return {"trl_matching_alpha": [(args, trl_matching_alpha_oracle(*args)) for args in TRL_MATCHING_ALPHA_ARGS]}
