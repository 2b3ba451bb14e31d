"""Plausible wrong answers to notebook 09's exercises (tests/test_exercise_cells.py), and the oracle of exercise 2's
stored cases (data/exercises/09_forgetting.pt; tests/test_forgetting.py recomputes them from it)."""

import torch


def combine_ewc(fisher_a, anchor_a, lam_a, fisher_b, anchor_b, lam_b):
    # Adds the curvatures right but averages the anchors plainly, as if both tasks weighed the same everywhere.
    return lam_a * fisher_a + lam_b * fisher_b, (anchor_a + anchor_b) / 2


def logit_fishers(logits, label):
    # The empirical Fisher is right, but the "sampled" one takes the model's most likely label instead of the
    # expectation over its labels (a common shortcut): the empirical Fisher of the argmax.
    p = torch.softmax(logits, dim=-1)
    onehot = torch.nn.functional.one_hot(torch.tensor(label), len(p)).to(p.dtype)
    top = torch.nn.functional.one_hot(p.argmax(), len(p)).to(p.dtype)
    return (onehot - p) ** 2, (top - p) ** 2


# Exercise 2's arguments (logits, label): two and three classes, the label the most and the least likely, a tie, and
# labels whose probabilities run from 0.3 to about 0.999 (non-round logits, so no case reads as a simple fraction).
LOGIT_FISHERS_ARGS = [([0.0, 0.0], 0), ([1.3, -0.4], 0), ([1.3, -0.4], 1), ([2.1, -0.7, 0.35], 0),
                      ([2.1, -0.7, 0.35], 2), ([4.6, -1.9], 0), ([7.2, 0.3, -0.8], 0), ([0.4, 1.7, -2.2, 0.9], 3)]


def logit_fishers_oracle(logits, label):
    """By autograd from the definitions, not from the solution's closed form: the squared gradient of log p_y with
    respect to the logits at the data's label (empirical), and the same squared gradient averaged over every label y
    weighted by the model's p_y (the expectation the sampled Fisher estimates)."""
    z = torch.tensor(logits, dtype=torch.float64)

    def squared_grad(y):
        zz = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.log_softmax(zz, -1)[y], zz)
        return g ** 2

    p = torch.softmax(z, -1)
    return squared_grad(label), sum(p[y] * squared_grad(y) for y in range(len(z)))


def exercise_cases_09():
    return {"logit_fishers": [((torch.tensor(z, dtype=torch.float64), y), logit_fishers_oracle(z, y))
                              for z, y in LOGIT_FISHERS_ARGS]}
