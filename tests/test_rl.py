"""course_utils.rl (exported from notebook 12): advantages, the k3 KL, the clipped policy loss, bad input."""

import pytest
import torch

from course_utils.errors import CourseError
from course_utils.rl import (LOSS_TYPES, completion_token_logps, exact_reward, group_advantages, kl_k3, pass_at_k,
                             policy_loss, rloo_advantages, sample_groups, train_grpo)


def loop_advantages(rewards, g, scale):
    """GRPO's advantages one completion at a time, with statistics.stdev (Bessel) as the std."""
    import statistics
    groups = [rewards[i:i + g] for i in range(0, len(rewards), g)]
    batch_std = statistics.stdev(rewards)
    out = []
    for group in groups:
        mean = sum(group) / g
        for r in group:
            std = {"group": statistics.stdev(group), "batch": batch_std}.get(scale)
            out.append((r - mean) / (std + 1e-4) if std is not None else r - mean)
    return torch.tensor(out)


REWARDS = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25, 0.3]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_a_loop(scale):
    # Catches a population std instead of Bessel's, a missing 1e-4, a mean or std over the wrong axis.
    torch.testing.assert_close(group_advantages(REWARDS, 3, scale=scale), loop_advantages(REWARDS, 3, scale))


def test_rloo_is_reward_minus_the_mean_of_the_others():
    expected = []
    for i, r in enumerate(REWARDS):
        start = i // 3 * 3
        others = [REWARDS[j] for j in range(start, start + 3) if j != i]
        expected.append(r - sum(others) / 2)
    # Catches a baseline that includes r_i itself, or divides by G instead of G - 1.
    torch.testing.assert_close(rloo_advantages(REWARDS, 3), torch.tensor(expected))


def test_equal_rewards_give_zero_advantages():
    # Catches a std floor or baseline that hands an all-wrong group a nonzero (spurious) advantage.
    assert group_advantages([0.0] * 4 + [1.0] * 4, 4).abs().max() == 0
    assert rloo_advantages([0.0] * 4 + [1.0] * 4, 4).abs().max() == 0


def test_kl_k3_is_zero_at_equality_and_positive_elsewhere():
    logps = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    ref = torch.log(torch.tensor([0.5, 0.4, 0.3]))
    kl = kl_k3(logps, ref)
    d = ref - logps
    # Catches the sign of d swapped (the estimator of the other KL direction) or a missing -1.
    torch.testing.assert_close(kl, torch.exp(d) - d - 1)
    assert kl[0] == 0 and (kl[1:] > 0).all()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 5, generator=g) * 3
    old = logps + 0.4 * torch.randn(3, 5, generator=g)
    ref = logps + 0.3 * torch.randn(3, 5, generator=g)
    old[0, 0], old[1, 1] = logps[0, 0] - 0.5, logps[1, 1] + 0.5  # one token clipped high (A > 0), one low (A < 0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    adv = torch.tensor([1.0, -0.5, 2.0])
    return logps, old, ref, mask, adv


def loop_loss(logps, old, ref, mask, adv, beta, eps, eps_high, loss_type, cap, correction=False):
    """The loss one token at a time, the issue's formula written out."""
    import math
    per_seq, total, count = [], 0.0, 0
    for i in range(logps.shape[0]):
        terms = []
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            ratio = math.exp(logps[i, t] - old[i, t])
            clipped = min(max(ratio, 1 - eps), 1 + eps_high)
            d = float(ref[i, t] - logps[i, t])
            kl = math.exp(d) - d - 1
            terms.append(-min(ratio * adv[i], clipped * adv[i]) + beta * kl * (ratio if correction else 1.0))
        per_seq.append(sum(terms) / len(terms))
        total, count = total + sum(terms), count + len(terms)
    if loss_type == "grpo":
        return sum(per_seq) / len(per_seq)
    if loss_type in ("bnpo", "dapo"):
        return total / count
    return total / (logps.shape[0] * cap)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,eps_high,correction", [(0.0, None, False), (0.1, None, False), (0.1, 0.28, True)])
def test_policy_loss_matches_a_token_loop(batch, loss_type, beta, eps_high, correction):
    logps, old, ref, mask, adv = batch
    loss, metrics = policy_loss(logps, old, adv, mask, ref_logps=ref, beta=beta, epsilon=0.2, epsilon_high=eps_high,
                                loss_type=loss_type, max_completion_length=6, bias_correction_kl=correction)
    expected = loop_loss(logps, old, ref, mask, adv.tolist(), beta, 0.2,
                         eps_high if eps_high is not None else 0.2, loss_type, 6, correction)
    # Catches a wrong aggregation, clip bound, KL term or ratio direction.
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    ratio = torch.exp(logps - old)
    m = mask.bool()
    # Catches metrics computed over padding.
    assert metrics["ratio"].item() == pytest.approx(ratio[m].mean().item(), rel=1e-5)
    assert 0 < metrics["clip_fraction"].item() < 1


def test_first_update_gradient_is_reinforce(batch):
    logps, _, _, mask, adv = batch
    a = logps.clone().requires_grad_(True)
    loss, metrics = policy_loss(a, a.detach(), adv, mask)
    loss.backward()
    expected = -(adv[:, None] * mask) / mask.sum(-1, keepdim=True) / mask.shape[0]
    # Catches a ratio that is not 1 at the first update or a clip that changes the first step.
    torch.testing.assert_close(a.grad, expected)
    assert metrics["ratio"].item() == pytest.approx(1.0) and metrics["clip_fraction"].item() == 0


def test_dr_grpo_has_no_length_bias_and_grpo_has(batch):
    logps, _, _, mask, _ = batch
    grads = {}
    for loss_type in ("grpo", "dr_grpo"):
        a = logps.clone().requires_grad_(True)
        policy_loss(a, a.detach(), torch.ones(3), mask, loss_type=loss_type, max_completion_length=5)[0].backward()
        grads[loss_type] = a.grad
    # Catches a per-sequence mean in dr_grpo (tokens of short answers would weigh more) or a constant in grpo.
    assert grads["grpo"][1, 0] < grads["grpo"][0, 0]  # 2 tokens vs 5: each of the short one's weighs more
    assert grads["dr_grpo"][1, 0] == grads["dr_grpo"][0, 0]


def test_completion_token_logps_reads_the_logit_before_each_token():
    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(7, 7, generator=torch.Generator().manual_seed(1)))

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return type("Out", (), {"logits": self.table[input_ids]})()

    model = Bigram()
    prompt, completion = torch.tensor([[0, 3, 4]]), torch.tensor([[5, 2]])
    got = completion_token_logps(model, prompt, torch.ones_like(prompt), completion, torch.ones_like(completion))
    table = model.table.log_softmax(-1)
    # Catches an off-by-one (the logit at the token itself instead of the one before it).
    torch.testing.assert_close(got, torch.stack([table[4, 5], table[5, 2]])[None].detach())
    # Catches a cast of the logits down to float32: notebook 12 measures float32's rounding against a float64 net.
    assert completion_token_logps(model.double(), prompt, torch.ones_like(prompt), completion,
                                  torch.ones_like(completion)).dtype == torch.float64
    assert completion_token_logps(model.bfloat16(), prompt, torch.ones_like(prompt), completion,
                                  torch.ones_like(completion)).dtype == torch.float32  # half logits: softmax in float32


@pytest.mark.parametrize("call,words", [
    (lambda: group_advantages([1.0, 0.0, 1.0], 2), "groups of 2"),
    (lambda: group_advantages([1.0, 0.0], 1), "at least 2"),
    (lambda: rloo_advantages([1.0, 0.0], 1), "at least 2"),
    (lambda: group_advantages([1.0, 0.0], 2, scale="std"), "scale"),
    (lambda: group_advantages([], 2), "groups of 2"),
])
def test_bad_rewards_raise(call, words):
    # Catches rewards that silently mix prompts, a group without a baseline, or an unknown scale.
    with pytest.raises(CourseError, match=words):
        call()


def _loss(**kw):
    logps = torch.zeros(2, 3)
    args = dict(logps=logps, old_logps=logps, advantages=torch.ones(2), completion_mask=torch.ones(2, 3)) | kw
    return policy_loss(args.pop("logps"), args.pop("old_logps"), args.pop("advantages"), args.pop("completion_mask"),
                       **args)


@pytest.mark.parametrize("kw,words", [
    (dict(loss_type="ppo"), "grpo"),
    (dict(completion_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])), r"\[1\]"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=-0.1), "epsilon"),
    (dict(epsilon_high=0.0), "epsilon_high"),
    (dict(beta=0.1), "ref_logps"),
    (dict(beta=-0.1, ref_logps=torch.zeros(2, 3)), "beta"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(loss_type="dr_grpo", max_completion_length=2), "max_completion_length"),
    (dict(completion_mask=torch.ones(2, 4)), "shape"),
])
def test_bad_policy_inputs_raise(kw, words):
    # Catches an input that would give a silently wrong loss: an unknown type, 0/0, a frozen ratio, no reference.
    with pytest.raises(CourseError, match=words):
        _loss(**kw)


# ---------------------------------------------------------------- the loop: sampling, training, pass@k


@pytest.fixture(scope="module")
def lab():
    from course_utils.models import load_model
    return load_model("lab", device="cpu")


SORT_ROWS = [{"messages": [{"role": "user", "content": f"Sort: {a} {b} {c}"},
                           {"role": "assistant", "content": " ".join(sorted(f"{a}{b}{c}"))}]}
             for a, b, c in ((3, 1, 2), (9, 4, 7), (5, 8, 0), (6, 2, 4))]


def test_sample_groups_repeats_each_prompt_and_masks_after_the_first_stop(lab):
    model, tokenizer = lab
    prompts = [r["messages"][:1] for r in SORT_ROWS[:3]]
    out = sample_groups(model, tokenizer, prompts, group_size=4, max_new_tokens=12, seed=3)
    assert out["completion_ids"].shape[0] == 12 and len(out["texts"]) == 12
    for i in range(3):  # Catches prompts repeated as a whole list (p0 p1 p2 p0 ...) instead of group by group.
        assert (out["prompt_ids"][4 * i:4 * i + 4] == out["prompt_ids"][4 * i]).all()
    assert not (out["prompt_ids"][0] == out["prompt_ids"][4]).all()
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for ids, mask, text in zip(out["completion_ids"], out["completion_mask"], out["texts"]):
        kept = ids[mask.bool()].tolist()
        # Catches a mask that keeps the padding after the stop token, or drops the stop token.
        assert stop not in kept[:-1] and (kept[-1] == stop or len(kept) == 12)
        assert mask[:len(kept)].all() and not mask[len(kept):].any()
        assert text == tokenizer.decode(kept, skip_special_tokens=True).strip()
    again = sample_groups(model, tokenizer, prompts, group_size=4, max_new_tokens=12, seed=3)
    assert again["texts"] == out["texts"]  # Catches a seed that is not applied before sampling.


def test_train_grpo_moves_nothing_without_a_reward_signal_and_something_with_one(lab):
    import copy
    model, tokenizer = lab
    for reward_fn, moves in ((lambda texts, answers: [0.0] * len(texts), False),
                             (lambda texts, answers: [1.0] * len(texts), False),
                             (lambda texts, answers: [float(len(t)) for t in texts], True)):
        net = copy.deepcopy(model)
        before = [p.detach().clone() for p in net.parameters()]
        history = train_grpo(net, tokenizer, SORT_ROWS, reward_fn, steps=2, prompts_per_step=2, group_size=3,
                             max_new_tokens=6, progress=False)
        changed = any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
        # Catches weight decay or a leaky baseline (moves with no signal), or a detached loss (never moves).
        assert changed == moves
        assert history["silent"] == ([1.0, 1.0] if not moves else history["silent"])
        # Catches "solved" counting every silent group (all wrong too) or none of the all-right ones.
        all_right = reward_fn(["xy"], ["xy"]) == [1.0]  # the constant 1 (the length reward gives 2)
        assert history["solved"] == ([1.0, 1.0] if all_right else [0.0, 0.0] if not moves else history["solved"])
        assert len(history["reward"]) == len(history["length"]) == 2


def test_train_grpo_needs_a_reference_for_the_kl(lab):
    model, tokenizer = lab
    with pytest.raises(CourseError, match="ref_model"):
        train_grpo(model, tokenizer, SORT_ROWS, steps=1, beta=0.1, progress=False)


def test_exact_reward_ignores_spaces_at_the_ends_only():
    assert exact_reward([" 1 2 3 ", "1 2 3", "123"], ["1 2 3"] * 3) == [1.0, 1.0, 0.0]


def test_pass_at_k_is_the_mean_over_every_k_subset():
    import itertools
    for n in (1, 4, 6):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                # Catches the biased 1 - (1 - c/n)^k (draws with replacement) and an off-by-one in the combinations.
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


@pytest.mark.parametrize("n,c,k", [(4, 1, 0), (4, 1, 5), (4, 5, 2), (4, -1, 2)])
def test_pass_at_k_bad_input(n, c, k):
    with pytest.raises(CourseError, match="0 < k <= n"):
        pass_at_k(n, c, k)


@pytest.mark.parametrize("group_size,max_new_tokens", [(0, 4), (2.5, 4), (2, 0)])
def test_sample_groups_bad_input(lab, group_size, max_new_tokens):
    model, tokenizer = lab
    with pytest.raises(CourseError, match="positive"):
        sample_groups(model, tokenizer, ["Sort: 3 1"], group_size=group_size, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------- the exercises' stored cases

import runpy  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXERCISE_CASES_12 = ROOT / "data" / "exercises" / "12_rl_verifiable_rewards.pt"


def answers_12():
    return runpy.run_path(str(ROOT / "tests" / "exercise_answers" / "12_rl_verifiable_rewards.py"))  # run by path


def test_stored_exercise_cases_are_the_oracles():
    # Catches a stored case edited by hand, or an oracle (course_utils.rl) that changed without a rewrite.
    stored, fresh = torch.load(EXERCISE_CASES_12), answers_12()["exercise_cases_12"]()
    assert stored.keys() == fresh.keys()
    for key in fresh:
        assert len(stored[key]) == len(fresh[key])
        for (args, value), (args2, value2) in zip(stored[key], fresh[key]):
            assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(args, args2))
            torch.testing.assert_close(value, value2, rtol=0, atol=1e-12)


if __name__ == "__main__":  # python tests/test_rl.py: rewrite data/exercises/12_rl_verifiable_rewards.pt
    torch.save(answers_12()["exercise_cases_12"](), EXERCISE_CASES_12)
    print(f"wrote {EXERCISE_CASES_12}")
