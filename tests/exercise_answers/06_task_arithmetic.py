"""Plausible wrong answers to notebook 06's exercises (tests/test_exercise_cells.py)."""


def lora_delta(A, B, alpha, use_rslora=False):
    # Forgets rsLoRA: always scales by alpha / r, so every use_rslora=True case is off by sqrt(r).
    return alpha / A.shape[0] * B @ A


def peft_linear_delta(As, Bs, alphas, weights):
    # What a learner expects "linear" to be: the weighted sum of the adapters' dense deltas.
    r = As[0].shape[0]
    return sum(w * alpha / r * b @ a for a, b, alpha, w in zip(As, Bs, alphas, weights))
