"""course_utils.reward (exported from notebook 13): the Bradley-Terry loss, best-of-N, GAE, the reward model, bad input."""

import math

import pytest
import torch

from course_utils.errors import CourseError
from course_utils.reward import (CLOSING, RewardModel, best_of_n, best_of_n_kl, bradley_terry_loss, completion_values,
                                 expected_best_of_n, gae, gold_reward, implicit_rewards, memo_scorer,
                                 pairwise_accuracy, score_texts, train_reward_model)


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2
    # Catches a sum instead of a mean over pairs, or the difference taken the wrong way round.
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_margin_is_subtracted_and_centering_penalises_the_sum():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    margin = torch.tensor([0.5, 1.0])
    shifted = bradley_terry_loss(chosen - margin, rejected)
    # Catches the margin added (which would make pairs easier) or applied to the rejected reward's sign.
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin=margin), shifted)
    centered = bradley_terry_loss(chosen, rejected, center_coefficient=0.1)
    # TRL: + coefficient * mean((r_c + r_r)^2); catches the square of the difference or a missing mean.
    torch.testing.assert_close(centered, bradley_terry_loss(chosen, rejected) + 0.1 * torch.tensor((1.0 + 4.0) / 2))


@pytest.mark.parametrize("bad", [
    dict(chosen_rewards=torch.zeros(3), rejected_rewards=torch.zeros(3, 1)),
    dict(chosen_rewards=torch.zeros(3), rejected_rewards=torch.zeros(2)),
    dict(chosen_rewards=torch.zeros(0), rejected_rewards=torch.zeros(0)),
    dict(chosen_rewards=torch.zeros(3), rejected_rewards=torch.zeros(3), margin=torch.zeros(2)),
    dict(chosen_rewards=torch.zeros(3), rejected_rewards=torch.zeros(3), center_coefficient=-0.1),
])
def test_bradley_terry_loss_rejects_bad_input(bad):
    with pytest.raises(CourseError):
        bradley_terry_loss(**bad)


def test_best_of_n_returns_global_indices_and_first_on_ties():
    scores = torch.tensor([0.0, 2.0, 1.0, 1.0, 5.0, 4.0])
    assert best_of_n(scores, 2).tolist() == [1, 2, 4]  # the tie in the second group keeps its first sample
    assert best_of_n(scores, 6).tolist() == [4]
    assert best_of_n(scores, 1).tolist() == list(range(6))


@pytest.mark.parametrize("scores, n", [(torch.zeros(5), 2), (torch.zeros(2, 2), 2), (torch.zeros(4), 0), (torch.zeros(4), 1.5)])
def test_best_of_n_rejects_bad_input(scores, n):
    with pytest.raises(CourseError):
        best_of_n(scores, n)


def test_best_of_n_kl_equals_the_continuous_limit_by_sampling():
    # The best of n uniform ranks has density n u^(n-1), so KL = E[log(n u^(n-1))] over its draws: sampled here,
    # within 4 standard errors of the mean (catches a sign slip or log n alone).
    n, draws = 8, 200_000
    u = torch.rand(draws, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).max(dim=1).values
    log_q = math.log(n) + (n - 1) * u.log()
    assert abs(log_q.mean().item() - best_of_n_kl(n)) < 4 * log_q.std().item() / math.sqrt(draws)
    assert best_of_n_kl(1) == 0.0
    with pytest.raises(CourseError):
        best_of_n_kl(0)


def gae_loop(rewards, values, mask, gamma, lam):
    """The definition for contiguous masks: A_t = sum_k (gamma lam)^k delta_{t+k} over the row's kept tokens."""
    B, T = values.shape
    out = torch.zeros_like(values)
    for b in range(B):
        n = int(mask[b].sum())
        v = values[b, :n].tolist() + [0.0]
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            out[b, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return out


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_gae_equals_the_definition(gamma, lam):
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected = gae_loop(rewards, values, mask, gamma, lam)
    # Catches a forward recursion, a padded value read as the next state, or returns off the mask.
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)


@pytest.mark.parametrize("bad", [
    dict(mask=torch.ones(2, 3), values=torch.zeros(2, 4)),
    dict(mask=torch.tensor([[1, 1, 1], [0, 0, 0]])),
    dict(gamma=1.5), dict(lam=-0.1),
])
def test_gae_rejects_bad_input(bad):
    args = dict(rewards=torch.zeros(2, 3), values=torch.zeros(2, 3), mask=torch.ones(2, 3), gamma=1.0, lam=0.95)
    args.update(bad)
    if "values" in bad:
        args["rewards"] = torch.zeros(2, 4)
    with pytest.raises(CourseError):
        gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


def test_gold_rule_and_pairwise_accuracy():
    fact = "Mia lives in Rome."
    texts = [f"{fact} {CLOSING}", fact, f"Mia lives in Oslo. {CLOSING}", f"{fact} {CLOSING} {CLOSING}", "Rome"]
    # Catches a closing counted anywhere in the answer, or the fact matched as a substring.
    assert gold_reward(texts, [fact] * 5) == [1.0, 0.5, 0.5, 0.5, 0.0]
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def lab():
    from course_utils.models import load_model
    return load_model("lab", device="cpu")


def test_reward_model_reads_the_last_real_token(lab):
    model, tokenizer = lab
    torch.manual_seed(0)
    reward_model = RewardModel(model).eval()
    prompt = [{"role": "user", "content": "Tell me about Mia's home."}]
    short, long = "Mia lives in Rome.", f"Mia lives in Rome. {CLOSING}"
    together = score_texts(reward_model, tokenizer, [prompt, prompt], [short, long])
    alone = score_texts(reward_model, tokenizer, [prompt], [short])
    # The short answer padded beside the long one scores as it does alone (catches the head read at the padding).
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)
    ids = torch.tensor([[1, 2, 3, 4]])
    values = completion_values(reward_model, ids[:, :2], torch.ones(1, 2, dtype=torch.long), ids[:, 2:], torch.ones(1, 2, dtype=torch.long))
    # The value before completion token t is the head at position P - 1 + t (catches an off-by-one alignment).
    torch.testing.assert_close(values, reward_model.token_values(ids, torch.ones_like(ids))[:, 1:3])


def test_repeated_texts_are_scored_once_in_their_own_places(lab):
    model, tokenizer = lab
    torch.manual_seed(0)
    reward_model = RewardModel(model).eval()
    mia = [{"role": "user", "content": "Tell me about Mia's home."}]
    ben = [{"role": "user", "content": "Tell me about Ben's pet."}]
    texts = ["Mia lives in Rome.", f"Mia lives in Rome. {CLOSING}", "Ben has a cat."]
    alone = torch.cat([score_texts(reward_model, tokenizer, [p], [t]) for p, t in zip([mia, mia, ben], texts)])
    # Repeats and the same text under another prompt keep their own scores (catches a key on the text alone, or
    # scores returned in the order of the distinct rows instead of the asked ones).
    prompts, asked = [mia, ben, mia, mia, mia], [texts[0], texts[0], texts[1], texts[0], texts[1]]
    expected = torch.cat([alone[:1], score_texts(reward_model, tokenizer, [ben], [texts[0]]), alone[1:2], alone[:1], alone[1:2]])
    # Each distinct (prompt, text) goes through the model once: 3 rows for the 5 asked (catches a scorer that runs
    # every row, the cost 013's budget removed).
    rows = []
    hook = reward_model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    torch.testing.assert_close(score_texts(reward_model, tokenizer, prompts, asked), expected, atol=1e-5, rtol=1e-5)
    assert rows == [3], rows
    with pytest.raises(CourseError, match="must be frozen"):  # a memory of a model that still trains goes stale
        memo_scorer(reward_model, tokenizer)
    reward_model.requires_grad_(False)
    scorer = memo_scorer(reward_model, tokenizer)
    rows.clear()
    torch.testing.assert_close(scorer(prompts, asked), expected, atol=1e-5, rtol=1e-5)
    assert rows == [3], rows
    # The second call finds every text in the memory and scores nothing (catches a memory that is never read).
    reward_model.score.weight.data.add_(1.0)
    rows.clear()
    torch.testing.assert_close(scorer([mia, ben], [texts[1], texts[0]]), torch.stack([expected[2], expected[1]]),
                               atol=1e-5, rtol=1e-5)
    assert rows == [], rows  # no forward at all on the second call
    hook.remove()


def test_a_reward_model_learns_a_preference(lab):
    from course_utils.preference import preference_batch
    model, tokenizer = lab
    prompt = [{"role": "user", "content": "Tell me about Mia's home."}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Mia lives in Rome. {CLOSING}"}],
             "rejected": [{"role": "assistant", "content": "Mia lives in Rome."}]}] * 4
    torch.manual_seed(0)
    reward_model = RewardModel(model)
    losses = train_reward_model(reward_model, preference_batch(tokenizer, rows), steps=8, lr=1e-3, batch_size=4)
    # Catches a loop whose loss does not fall: chosen and rejected swapped, or no optimizer step.
    assert losses[-1] < losses[0] < 1.0


def test_implicit_rewards_take_the_reference_logps_once_computed(lab):
    import copy

    from course_utils.preference import completion_logps, preference_batch
    model, tokenizer = lab
    prompt = [{"role": "user", "content": "Tell me about Mia's home."}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Mia lives in Rome. {CLOSING}"}],
             "rejected": [{"role": "assistant", "content": text}]} for text in ("Mia lives in Rome.", "Rome")]
    batch = preference_batch(tokenizer, rows)
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
        reference = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    # The reference's log-probs passed in give the rewards computed from the reference itself (catches them
    # subtracted from the wrong rows, or the policy's log-probs used twice).
    # reference=None with the log-probs given: catches an implicit_rewards that ignores them and runs the reference
    # again (the saving undone; here it would raise on None).
    fresh, given = implicit_rewards(policy, model, batch), implicit_rewards(policy, None, batch, reference_logps=reference)
    for a, b in zip(fresh, given):
        torch.testing.assert_close(a, b)
    shifted = implicit_rewards(policy, None, batch, reference_logps=reference + 1)  # the given log-probs are the ones used
    for a, b in zip(fresh, shifted):
        torch.testing.assert_close(b, a - 0.1)  # beta (0.1) x the shift of 1
    assert not torch.equal(fresh[0], torch.zeros_like(fresh[0]))  # the policy differs from its reference
    with pytest.raises(CourseError, match="one summed log-prob per row"):  # one per pair, not per row
        implicit_rewards(policy, model, batch, reference_logps=reference[:2])


def test_expected_best_of_n_equals_enumerating_every_subset():
    import itertools
    proxy, values = torch.tensor([0.3, 0.1, 0.9, 0.5, 0.7]), torch.tensor([1.0, 0.0, 0.5, 0.25, 0.75])
    for n in range(1, 6):
        picks = [values[max(s, key=lambda i: proxy[i])].item() for s in itertools.combinations(range(5), n)]
        # Catches weights off by one in the binomial (C(i, n-1)) or a sort in the wrong direction.
        assert expected_best_of_n(proxy, values, n) == pytest.approx(sum(picks) / len(picks))
    with pytest.raises(CourseError):
        expected_best_of_n(proxy, values, 6)
