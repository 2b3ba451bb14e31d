"""Plausible wrong answers to notebook 16's exercises (tests/test_exercise_cells.py), and the oracle that makes the
checks' cases (data/exercises/16_rl_failure_modes.pt; tests/test_rl_failures.py recomputes them)."""
import torch


def sequence_push(lengths, advantages, loss_type, max_completion_length):
    # One token's weight instead of the whole completion's: misses that the push sums over the completion's tokens.
    n = torch.tensor(lengths, dtype=torch.float32)
    a = torch.as_tensor(advantages, dtype=torch.float32)
    if loss_type == "grpo":
        return a / (len(lengths) * n)
    if loss_type in ("bnpo", "dapo"):
        return a / n.sum()
    return a / (len(lengths) * max_completion_length)


def credit(text, answer):
    # Items in their right place over the longer list (section 1.2's position_credit): a missing first item shifts
    # every later one, so "3 5 8" for "1 3 5 8" scores 0, no more than a completion with nothing right.
    got, want = text.split(), answer.split()
    return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want), 1)


# ---- The oracle.


def measured_push(lengths, advantages, loss_type, max_completion_length):
    """-d loss / d s_i, where s_i is added to the log-prob of every token of completion i, by autograd through
    policy_loss at ratio 1."""
    from course_utils.rl import policy_loss
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    shift = torch.zeros(len(lengths), requires_grad=True)
    logps = shift[:, None] * mask
    loss, _ = policy_loss(logps, logps.detach(), advantages, mask, loss_type=loss_type,
                          max_completion_length=max_completion_length)
    return -torch.autograd.grad(loss, shift)[0]


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
    push = []
    for lengths, advantages, cap in (([3, 1, 5], [-1.0, 0.5, -1.0], 6), ([2, 6], [1.0, 1.0], 8),
                                     ([4, 1, 1, 2], [-0.5, -0.5, 1.5, -0.5], 8)):
        advantages = torch.tensor(advantages)
        push += [((lengths, advantages, loss_type, cap), measured_push(lengths, advantages, loss_type, cap))
                 for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo")]
    cases = []
    for answer in ("1 3 5 8", "0 2 4 7 9", "2 6 7 9"):
        answer, attacks, near, nothing = credit_case(answer)
        expected = [True] * (1 + len(attacks) + len(near) + 2 + len(attacks) + len(near) + len(nothing))
        cases.append(((answer, attacks, near, nothing), expected))
    return {"push": push, "credit": cases}
