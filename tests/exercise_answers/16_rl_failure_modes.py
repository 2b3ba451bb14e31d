"""Plausible wrong answers to notebook 16's exercises (tests/test_exercise_cells.py), and the oracle that makes the
checks' cases (data/exercises/16_rl_failure_modes.pt; tests/test_rl_failures.py recomputes them)."""
import math

import torch
import torch.nn.functional as F


def continue_push(fillers, advantages, p_continue, loss_type, cap):
    # Every completion ends with a stop token, the capped ones too: misses that a completion which reached the cap
    # was cut there, with no stop token to push down.
    f = torch.tensor(fillers, dtype=torch.float32)
    a = torch.as_tensor(advantages, dtype=torch.float32)
    n = 2 + f
    if loss_type == "grpo":
        w = 1 / (len(fillers) * n)
    elif loss_type in ("bnpo", "dapo"):
        w = 1 / n.sum()
    else:
        w = 1 / (len(fillers) * cap)
    return a * w * (f * (1 - p_continue) - p_continue)


def continue_push_batch_width(fillers, advantages, p_continue, loss_type, cap):
    # dr_grpo's L taken as the batch's longest completion instead of the cap: right only in a batch where some
    # completion reached the cap (then the longest is `cap` tokens long).
    f = torch.tensor(fillers, dtype=torch.float32)
    a = torch.as_tensor(advantages, dtype=torch.float32)
    stops = (f < cap - 1).float()
    n = 1 + f + stops
    if loss_type == "grpo":
        w = 1 / (len(fillers) * n)
    elif loss_type in ("bnpo", "dapo"):
        w = 1 / n.sum()
    else:
        w = 1 / (len(fillers) * n.max())
    return a * w * (f * (1 - p_continue) - stops * p_continue)


def continue_push_drops_silent(fillers, advantages, p_continue, loss_type, cap):
    # The completions with a zero advantage (a silent group, section 2.1's `informative` mask) left out of B and of
    # the token count: they get no gradient, but the loss still divides by them.
    f = torch.tensor(fillers, dtype=torch.float32)
    a = torch.as_tensor(advantages, dtype=torch.float32)
    kept = (a != 0).float()
    stops = (f < cap - 1).float()
    n = 1 + f + stops
    if loss_type == "grpo":
        w = 1 / (kept.sum() * n)
    elif loss_type in ("bnpo", "dapo"):
        w = 1 / (n * kept).sum()
    else:
        w = 1 / (kept.sum() * cap)
    return a * w * (f * (1 - p_continue) - stops * p_continue)


def credit(text, answer):
    # Items in their right place over the longer list (section 1.2's position_credit): a missing first item shifts
    # every later one, so "3 5 8" for "1 3 5 8" scores 0, no more than a completion with nothing right.
    got, want = text.split(), answer.split()
    return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want), 1)


# ---- The oracle.


def measured_continue_push(fillers, advantages, p_continue, loss_type, cap):
    """Per completion, -d loss / d c_i by autograd through policy_loss at ratio 1, on section 2.2's control: an
    answer token, then `fillers` continue tokens (log sigmoid(c_i)) and a stop token (log sigmoid(-c_i)) unless the
    completion reached `cap` tokens; every c_i at logit(p_continue)."""
    from course_utils.rl import policy_loss
    c = torch.full((len(fillers),), math.log(p_continue / (1 - p_continue)), requires_grad=True)
    f = torch.tensor(fillers)
    n = 1 + f + (f < cap - 1).long()
    pos = torch.arange(cap)
    go, stop = F.logsigmoid(c)[:, None], F.logsigmoid(-c)[:, None]
    logps = torch.where(pos == 0, torch.tensor(-1.0), torch.where(pos <= f[:, None], go, stop))
    loss, _ = policy_loss(logps, logps.detach(), torch.as_tensor(advantages, dtype=torch.float32),
                          (pos < n[:, None]).float(), loss_type=loss_type, max_completion_length=cap)
    return -torch.autograd.grad(loss, c)[0]


# (fillers, advantages, p_continue, cap): a capped completion with a non-zero advantage (the first two), none that
# reached the cap (the third and fourth: the longest completion is shorter than `cap`), and a silent pair with zero
# advantages (the fourth: they get no gradient, yet count in B and in the token count).
PUSH_BATCHES = (([0, 0, 2, 7], [1.5, -0.5, -0.5, -0.5], 0.5, 8),
                ([5, 5, 2], [0.5, -1.0, 0.5], 0.8, 6),
                ([1, 3, 0, 2], [-0.5, 1.5, -0.5, -0.5], 0.3, 8),
                ([2, 5, 1, 3], [0.0, 0.0, 1.0, -1.0], 0.6, 8))
# The batch Exercise 1's question names, kept out of the stored cases (its answer would be readable from them): on its
# wrong completions `grpo` and `dr_grpo` push the stop decision opposite ways (tests/test_rl_failures.py).
STATED_BATCH = ([7, 0, 0, 4], [1.5, -0.5, -0.5, -0.5], 0.5, 8)


def credit_case(answer):
    """(answer, attacks, near misses, nothing right) for one sort_digits answer."""
    items = answer.split()
    absent = [d for d in "0123456789" if d not in items]
    attacks = [" ".join(items + [items[-1]] * 3),        # padded with its own last digit
               f"{answer} {answer}",                      # repeated
               " ".join(reversed(items)),                 # shuffled
               " ".join(items[1:] + items[:1]),           # the prompt's digits, unsorted
               "".join(items)]                            # spaces dropped
    near = [" ".join(items[:-1] + [absent[0]]),           # one item wrong
            " ".join(items[1:]),                          # first item missing
            " ".join(items[:-1]),                         # last item missing
            " ".join(items[:2] + items[1:]),              # one extra item
            " ".join([items[0], items[2], items[1], *items[3:]])]  # two neighbours swapped
    nothing = ["", "cake", " ".join(absent[:len(items)])]
    return answer, attacks, near, nothing


def exercise_cases_16() -> dict:
    """{'push', 'credit'}: lists of (arguments, expected value) for the two checks."""
    push = [((fillers, advantages, p, loss_type, cap), measured_continue_push(fillers, advantages, p, loss_type, cap))
            for fillers, advantages, p, cap in PUSH_BATCHES for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo")]
    cases = []
    for answer in ("1 3 5 8", "0 2 4 7 9", "2 6 7 9"):
        answer, attacks, near, nothing = credit_case(answer)
        expected = [True] * (1 + len(attacks) + len(near) + 2 + len(attacks) + len(near) + len(nothing))
        cases.append(((answer, attacks, near, nothing), expected))
    return {"push": push, "credit": cases}
