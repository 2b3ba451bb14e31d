"""Plausible wrong answers to notebook 08's exercises (tests/test_exercise_cells.py)."""

import math


def conservative_target(beta, eps):
    # Forgets that the loss sees beta * h: the right log-odds, but in units of beta * h instead of h.
    return math.log((1 - eps) / eps)


def dpo_gradient_weight(h, beta, loss_type):
    # Sigmoid: the weight of the chosen answer's probability, sigmoid(+beta h), instead of sigmoid(-beta h);
    # the hinge and IPO branches are right, so only the sigmoid cases fail.
    if loss_type == "sigmoid":
        return beta / (1 + math.exp(-beta * h))
    if loss_type == "hinge":
        return beta if beta * h < 1 else 0.0
    return -2 * (h - 1 / (2 * beta))


def shared_prefix_weight(len_chosen, len_rejected, average):
    # The chosen term minus the rejected term, written the other way round: right magnitude, wrong sign, so the
    # equal-length and summed cases pass and the unequal averaged ones fail.
    return 1 / len_rejected - 1 / len_chosen if average else 0.0
