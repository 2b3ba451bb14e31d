"""Plausible wrong answers to notebook 07's exercises (tests/test_exercise_cells.py)."""

import torch

from course_utils.merging import ties


def ties_mergekit(task_tensors, weights, density):
    # PEFT's TIES: elects the sign on the unweighted trimmed tensors and divides by the count of agreeing tasks.
    return ties(list(task_tensors), torch.tensor(weights, dtype=task_tensors[0].dtype), density)


def dare_noise_std(task_tensors, weights, density):
    # Treats the merge as one dropped tensor: sqrt((1-p)/p) * |sum_t w_t tau_t|, as if every task shared one mask.
    stacked = torch.stack(list(task_tensors))
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    return (w * stacked).sum(0).abs() * ((1 - density) / density) ** 0.5
