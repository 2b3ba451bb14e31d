"""Plausible wrong answers to notebook 06's exercises (tests/test_exercise_cells.py)."""

import torch


def lora_delta(A, B, alpha, use_rslora=False):
    # Forgets rsLoRA: always scales by alpha / r, so every use_rslora=True case is off by sqrt(r).
    return alpha / A.shape[0] * B @ A


def peft_linear_delta(As, Bs, alphas, weights):
    # What a learner expects "linear" to be: the weighted sum of the adapters' dense deltas.
    r = As[0].shape[0]
    return sum(w * alpha / r * b @ a for a, b, alpha, w in zip(As, Bs, alphas, weights))


def merge_fits_both(W0, X1, Y1, X2, Y2):
    # The page's tempting rule: orthogonal task vectors merge. Right for orthogonal inputs, wrong where the inputs
    # overlap and the outputs move in orthogonal directions (the vectors are orthogonal, yet each changes the
    # other task's outputs).
    tau1 = (Y1 - W0 @ X1) @ torch.linalg.pinv(X1)
    tau2 = (Y2 - W0 @ X2) @ torch.linalg.pinv(X2)
    return bool(abs((tau1 * tau2).sum()) < 1e-6)


def merge_fits_both_ignoring_fit(W0, X1, Y1, X2, Y2):
    # The cross terms alone: right wherever both experts fit their tasks, wrong where an expert never learned its own
    # task (tests/test_merging.py checks that exercise 3's cases refuse it).
    tau1 = (Y1 - W0 @ X1) @ torch.linalg.pinv(X1)
    tau2 = (Y2 - W0 @ X2) @ torch.linalg.pinv(X2)
    return bool(max((tau2 @ X1).abs().max(), (tau1 @ X2).abs().max()) < 1e-6)
