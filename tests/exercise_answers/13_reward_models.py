"""Plausible wrong answers to notebook 13's exercises (tests/test_exercise_cells.py)."""
import torch


def rewards_from_preferences(p_beats_first):
    # The log-probability of winning, not the log-odds: sigma(r) = p gives r = log(p / (1 - p)), not log p.
    return torch.log(p_beats_first) - torch.log(p_beats_first[0])


def td_errors(rewards, values, mask, gamma):
    # Reads the next position's value even where the completion has ended (the padding's value leaks in).
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    return (rewards + gamma * next_values - values) * mask


def best_of_n_distribution(probs, n):
    # Raises each probability to the n-th power and renormalises: the mode gains, but not as best-of-n does.
    powered = probs ** n
    return powered / powered.sum()
