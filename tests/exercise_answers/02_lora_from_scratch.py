"""Plausible wrong answers to notebook 02's exercises (tests/test_exercise_cells.py)."""
import torch


def rank_stable_scaling(alpha, r):
    # Keeps the paper's alpha / r: the update still shrinks as the rank grows.
    return alpha / r


def dora_weight(weight, lora_A, lora_B, scaling, magnitude):
    # Normalises over the wrong dimension (each input column instead of each output row).
    combined = weight + scaling * lora_B @ lora_A
    return magnitude.unsqueeze(1) * combined / combined.norm(dim=0, keepdim=True)


def first_step_delta_w(A, x, grad_out, scaling, lr, weight_decay):
    # Treats AdamW like plain SGD (B <- -lr * grad) and forgets that weight decay still shrinks A.
    grad_B = scaling * grad_out.T @ (x @ A.T)
    return scaling * (-lr * grad_B) @ A
