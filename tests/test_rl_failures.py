"""course_utils.rl_failures: the per-token weights against autograd, the two partial credits, the recorder, bad
input, and notebook 16's stored exercise cases."""
import importlib.util
from pathlib import Path

import pytest
import torch

from course_utils.errors import CourseError
from course_utils.paths import DATA_DIR
from course_utils.rl import policy_loss
from course_utils.rl_failures import RecordedReward, digit_credit, position_credit, token_weights

EXERCISE_CASES_16 = DATA_DIR / "exercises" / "16_rl_failure_modes.pt"


def answers_16():
    path = Path(__file__).parent / "exercise_answers" / "16_rl_failure_modes.py"
    spec = importlib.util.spec_from_file_location("answers_16", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_token_weights_equal_autograd(loss_type):
    generator = torch.Generator().manual_seed(16)
    lengths = [1, 4, 7, 3, 7, 2]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    advantages = torch.randn(len(lengths), generator=generator)
    logps = (-torch.rand(len(lengths), 7, generator=generator)).requires_grad_()
    loss, _ = policy_loss(logps, logps.detach(), advantages, mask, loss_type=loss_type, max_completion_length=9)
    torch.testing.assert_close(token_weights(mask, advantages, loss_type, 9), torch.autograd.grad(loss, logps)[0])


def test_only_grpo_weighs_by_the_completions_own_length():
    mask, ones = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), -torch.ones(2)
    grpo = token_weights(mask, ones, "grpo")
    assert grpo[0, 0] == 2 * grpo[1, 0]  # a token of the 2-token completion weighs twice one of the 4-token one
    for loss_type in ("dapo", "dr_grpo"):
        w = token_weights(mask, ones, loss_type, 4)
        assert w[0, 0] == w[1, 0]


@pytest.mark.parametrize("call, match", [
    (lambda: token_weights(torch.ones(2, 3), torch.ones(2), "ppo"), "loss_type"),
    (lambda: token_weights(torch.ones(2, 3), torch.ones(2), "dr_grpo"), "max_completion_length"),
    (lambda: token_weights(torch.ones(2, 3), torch.ones(2), "dr_grpo", 2), "max_completion_length"),
    (lambda: token_weights(torch.tensor([[1, 1], [0, 0]]), torch.ones(2), "grpo"), "no token"),
    (lambda: token_weights(torch.ones(2, 3), torch.ones(3), "grpo"), "one per completion"),
    (lambda: digit_credit("1 3", "1 3"), "two lists"),
    (lambda: position_credit(["1 3"], ["1 3", "2 4"]), "two lists"),
])
def test_bad_input_is_a_course_error(call, match):
    with pytest.raises(CourseError, match=match):
        call()


def test_digit_credit_has_the_hole():
    answer = "1 3 5 8"
    assert digit_credit([answer, "8 5 3 1", "1 3 5 8 8 8", "", "1 3 5 9"], [answer] * 5) == [1.0, 1.0, 1.5, 0.0, 0.75]


def test_position_credit_pays_in_full_only_for_the_answer():
    answer = "1 3 5 8"
    texts = [answer, "8 5 3 1", "1 3 5 8 8 8", "3 5 8", "1 3 5 9", "1358", ""]
    assert position_credit(texts, [answer] * len(texts)) == [1.0, 0.0, 4 / 6, 0.0, 0.75, 0.0, 0.0]


class WordTokenizer:
    """One token per space-separated item: enough for RecordedReward's lengths."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [text.split() for text in texts]}


def test_recorded_reward_keeps_every_step():
    recorded = RecordedReward(digit_credit, WordTokenizer())
    assert recorded(["1 3", "1 3 3 3"], ["1 3", "1 3"]) == [1.0, 2.0]
    recorded(["2", "9 9 9"], ["2 4", "2 4"])
    assert recorded.per_step("tokens") == [3.0, 2.0]
    right, wrong = recorded.per_step("tokens", "right"), recorded.per_step("tokens", "wrong")
    assert right[0] == 2.0 and right[1] != right[1]  # no right completion in step 2: NaN
    assert wrong == [4.0, 2.0]
    assert recorded.per_step("reward") == [1.5, 0.25]
    with pytest.raises(CourseError, match="where"):
        recorded.per_step("tokens", "all")


def test_stored_exercise_cases_are_the_oracles():
    stored, fresh = torch.load(EXERCISE_CASES_16), answers_16().exercise_cases_16()
    assert stored.keys() == fresh.keys()
    for key in fresh:
        assert len(stored[key]) == len(fresh[key])
        for (args, value), (args2, value2) in zip(stored[key], fresh[key]):
            assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(args, args2))
            if torch.is_tensor(value):
                torch.testing.assert_close(value, value2, rtol=0, atol=1e-7)
            else:
                assert value == value2


def test_push_cases_cover_every_branch():
    """Exercise 1's cases: every aggregation, a batch with a capped completion (no stop token) of non-zero advantage,
    a batch where no completion reached the cap, a batch with zero advantages, a closed form that equals the oracle;
    three plausible wrong answers fail the check (a stop token on capped completions too, dr_grpo's L taken as the
    longest completion, the zero-advantage completions left out of B and the token count); the question's batch is
    not among the stored cases, and on it `grpo` and `dr_grpo` push the wrong completions opposite ways."""
    from course_utils.exercises import check_exercise

    module = answers_16()
    cases = module.exercise_cases_16()["push"]
    assert {args[3] for args, _ in cases} == {"grpo", "bnpo", "dapo", "dr_grpo"}

    def closed_form(fillers, advantages, p, loss_type, cap):
        f = torch.tensor(fillers, dtype=torch.float32)
        stops = (f < cap - 1).float()
        n = 1 + f + stops
        w = {"grpo": 1 / (len(fillers) * n), "bnpo": 1 / n.sum(), "dapo": 1 / n.sum()}.get(loss_type, 1 / (len(fillers) * cap))
        return torch.tensor(advantages) * w * (f * (1 - p) - stops * p)

    capped = lambda fillers, advantages, cap: any(f == cap - 1 and a != 0 for f, a in zip(fillers, advantages))
    batches = [(args[0], args[1], args[4]) for args, _ in cases]
    assert any(capped(*batch) for batch in batches)  # catches a check blind to the missing stop token
    assert any(max(fillers) < cap - 2 for fillers, _, cap in batches)  # the longest completion shorter than the cap
    assert any(0 in advantages for _, advantages, _ in batches)  # a silent completion still counts in B
    for args, expected in cases:
        torch.testing.assert_close(closed_form(*args), expected, rtol=0, atol=1e-6)
    for wrong in (module.continue_push, module.continue_push_batch_width, module.continue_push_drops_silent):
        with pytest.raises(AssertionError):  # catches cases that let this plausible wrong answer pass
            check_exercise(wrong, cases, atol=1e-6)
    assert check_exercise(lambda *args: closed_form(*args), cases, atol=1e-6)
    stated = module.STATED_BATCH
    key = lambda fillers, advantages: sorted(zip(fillers, advantages))
    # catches the question's answer being readable from the stored cases (the same batch, in any order)
    assert all(key(f, a) != key(stated[0], stated[1]) for f, a, _ in batches)
    fillers, advantages, p, cap = stated
    wrong = torch.tensor(advantages) < 0
    pushes = {lt: module.measured_continue_push(fillers, advantages, p, lt, cap)[wrong].sum() for lt in ("grpo", "dr_grpo")}
    assert pushes["grpo"] > 0 > pushes["dr_grpo"], pushes
    torch.testing.assert_close(closed_form(fillers, advantages, p, "grpo", cap),
                               module.measured_continue_push(fillers, advantages, p, "grpo", cap), rtol=0, atol=1e-6)


def test_the_wrong_credit_fails_and_a_subsequence_credit_passes():
    """The credit exercise's cases can tell a gameable or shift-blind credit from one that works."""
    module = answers_16()
    for answer, attacks, near, nothing in (args for args, _ in module.exercise_cases_16()["credit"]):
        assert max(module.credit(t, answer) for t in nothing) >= min(module.credit(t, answer) for t in near)
        assert any(digit_credit([t], [answer])[0] >= 1 for t in attacks)


if __name__ == "__main__":  # python tests/test_rl_failures.py: rewrite data/exercises/16_rl_failure_modes.pt
    torch.save(answers_16().exercise_cases_16(), EXERCISE_CASES_16)
    print(f"wrote {EXERCISE_CASES_16}")
