"""course_utils.forgetting: the forgetting report, the Fisher diagonal, EWC, replay mixtures and the SmolLM2
instruction set (notebooks/09_forgetting.ipynb measures what they do on the lab model and SmolLM2)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from course_utils.errors import CourseError
from course_utils.evaluation import BASE_SKILLS
from course_utils.forgetting import (EWC, fisher_diagonal, follows_rule, forgetting, load_english, load_instructions,
                                     replay_count, replay_mixture, row_batches, sequence_nll, skill_report,
                                     tokenize_row, trainable_named_parameters, update_norm)
from course_utils.training import collate, train


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=9, dim=4):
        super().__init__()
        self.embed, self.out = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        logits = self.out(torch.tanh(self.embed(input_ids)))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss)


def tiny_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (5, 6, 4, 7):
        ids = torch.randint(0, 9, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return [collate(rows[:2], 0), collate(rows[2:], 0)]


@pytest.fixture(scope="module")
def lab():
    from course_utils.models import load_model

    return load_model("lab", device="cpu")


# ---------------------------------------------------------------- forgetting


def test_forgetting_drops_mean_and_perplexity_ratio():
    before = {"model": "base", "copy": 1.0, "fact": 1.0, "count": 0.5, "reverse": 0.0, "perplexity": 2.0}
    after = {"model": "tuned", "copy": 0.25, "fact": 1.0, "count": 0.75, "reverse": 1.0, "perplexity": 3.0}
    result = forgetting(before, after)
    assert result == {"copy": 0.75, "count": -0.25, "fact": 0.0, "mean drop": pytest.approx(0.5 / 3),
                      "perplexity ratio": 1.5}
    assert "reverse" not in result  # the new task is learned, not forgotten


def test_forgetting_with_named_skills_and_without_perplexity():
    result = forgetting({"copy": 1.0, "reverse": 0.0}, {"copy": 0.5, "reverse": 1.0}, skills=["copy", "reverse"])
    assert result == {"copy": 0.5, "reverse": -1.0, "mean drop": -0.25}



def test_update_norm_is_the_l2_distance_over_shared_weights():
    start = torch.nn.Linear(3, 2)
    moved = copy.deepcopy(start)
    with torch.no_grad():
        moved.weight.add_(1.0)  # 6 weights moved by 1
        moved.bias.add_(2.0)  # 2 biases moved by 2
    assert update_norm(moved, start) == pytest.approx((6 * 1 + 2 * 4) ** 0.5)  # catches a norm without the root
    assert update_norm(start, start) == 0
    with pytest.raises(CourseError, match="share no parameter"):
        update_norm(torch.nn.Sequential(torch.nn.Linear(3, 2)), start)  # names 0.weight, 0.bias: nothing shared

def test_forgetting_refuses_unknown_and_missing_skills():
    with pytest.raises(CourseError, match="unknown skill.*copy, first_word"):
        forgetting({"copy": 1.0}, {"copy": 1.0}, skills=["cpoy"])
    with pytest.raises(CourseError, match="not scored in both rows"):
        forgetting({"copy": 1.0, "fact": 1.0}, {"copy": 1.0}, skills=["fact"])
    with pytest.raises(CourseError, match="no skill"):
        forgetting({"perplexity": 1.0}, {"perplexity": 1.0})


def test_skill_report_is_the_evaluation_one():
    from course_utils import evaluation

    assert skill_report is evaluation.skill_report


# ---------------------------------------------------------------- Fisher


def test_fisher_is_the_mean_of_squared_per_example_gradients():
    torch.manual_seed(0)
    model, batches = TinyLM(), tiny_batches()
    fisher = fisher_diagonal(model, batches)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for batch in batches:
        for i in range(2):
            model.zero_grad()
            row = {k: v[i:i + 1, : int(batch["attention_mask"][i].sum())] for k, v in batch.items()}  # unpadded
            logits = model(row["input_ids"]).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, row["labels"][0, 1:], ignore_index=-100, reduction="sum")
            nll.backward()
            for n, p in model.named_parameters():
                expected[n] += p.grad ** 2
            count += 1
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n] / count)


def test_fisher_max_examples_and_endless_generators():
    torch.manual_seed(0)
    model = TinyLM()
    first = fisher_diagonal(model, tiny_batches()[:1])
    assert all(torch.equal(a, b) for a, b in zip(first.values(), fisher_diagonal(model, tiny_batches(), max_examples=2).values()))

    def endless():
        while True:
            yield from tiny_batches()

    with pytest.raises(CourseError, match="max_examples"):
        fisher_diagonal(model, endless())
    assert fisher_diagonal(model, endless(), max_examples=3)


def test_fisher_covers_only_trainable_parameters_and_needs_some():
    torch.manual_seed(0)
    model = TinyLM()
    model.embed.requires_grad_(False)
    assert set(fisher_diagonal(model, tiny_batches())) == {"out.weight", "out.bias"}
    model.requires_grad_(False)
    with pytest.raises(CourseError, match="no trainable parameters"):
        fisher_diagonal(model, tiny_batches())


def test_sequence_nll_sums_over_the_labelled_tokens():
    torch.manual_seed(0)
    model, batch = TinyLM(), tiny_batches()[0]
    logits = model(batch["input_ids"]).logits[:, :-1]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100,
                                                  reduction="none")
    torch.testing.assert_close(sequence_nll(model, batch), per_token.sum(1))


# ---------------------------------------------------------------- EWC


def test_ewc_penalty_value_and_gradient():
    torch.manual_seed(0)
    model = TinyLM()
    anchor = copy.deepcopy(model.state_dict())
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ewc = EWC(fisher, anchor, lam=3.0)
    value = ewc(model)
    expected = sum(1.5 * (fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(value, expected)
    value.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 3.0 * fisher[n] * (p.detach() - anchor[n]))


def test_ewc_anchor_is_a_copy():
    torch.manual_seed(0)
    model = TinyLM()
    ewc = EWC({n: torch.ones_like(p) for n, p in model.named_parameters()}, model, lam=1.0)
    with torch.no_grad():
        model.out.bias.add_(1.0)
    assert ewc.penalty(model).item() == pytest.approx(0.5 * model.out.bias.numel())


def test_ewc_bad_inputs():
    model = TinyLM()
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    for lam in (-1.0, float("nan"), "big"):
        with pytest.raises(CourseError, match="lam"):
            EWC(fisher, model, lam=lam)
    with pytest.raises(CourseError, match="anchor has no weights"):
        EWC({"nope": torch.ones(1)}, model, lam=1.0)
    ewc = EWC({"out.weight": fisher["out.weight"]}, model, lam=1.0)
    with pytest.raises(CourseError, match="do not match the model's trainable parameters"):
        ewc.penalty(model)
    model.embed.requires_grad_(False)
    model.out.bias.requires_grad_(False)
    assert ewc.penalty(model).item() == 0


def test_ewc_as_extra_loss_keeps_weights_near_the_anchor():
    torch.manual_seed(0)
    plain, pulled = TinyLM(), None
    pulled = copy.deepcopy(plain)
    anchor = copy.deepcopy(plain.state_dict())
    fisher = {n: torch.ones_like(p) for n, p in plain.named_parameters()}
    train(plain, tiny_batches(), steps=30, lr=0.05, progress=False)
    train(pulled, tiny_batches(), steps=30, lr=0.05, progress=False, extra_loss=EWC(fisher, anchor, lam=100.0))

    def distance(model):
        return sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters()).item()

    assert distance(pulled) < distance(plain) / 4


# ---------------------------------------------------------------- replay


@pytest.mark.parametrize("n, fraction", [(100, 0.1), (640, 0.05), (37, 0.25), (10, 0.0), (3, 0.9)])
def test_replay_mixture_hits_the_share_of_the_mixture(n, fraction):
    targets = [{"messages": [], "id": i} for i in range(n)]
    sources = {"a": [{"text": f"a{i}"} for i in range(5)], "b": [{"text": f"b{i}"} for i in range(50)]}
    mixed = replay_mixture(targets, sources, fraction, seed=1)
    replayed = [r for r in mixed if "text" in r]
    assert len(replayed) == replay_count(n, fraction)
    assert abs(len(replayed) / len(mixed) - fraction) <= 0.5 / len(mixed) + 1e-12
    assert sorted(r["id"] for r in mixed if "id" in r) == list(range(n))  # every target row, once


def test_replay_mixture_cycles_small_sources_and_is_seeded():
    targets = [{"id": i} for i in range(90)]
    mixed = replay_mixture(targets, [{"text": "only"}], 0.5, seed=3)
    assert sum("text" in r for r in mixed) == 90
    assert replay_mixture(targets, [{"text": "x"}], 0.1, seed=3) == replay_mixture(targets, [{"text": "x"}], 0.1, seed=3)
    assert replay_mixture(targets, [{"text": "x"}], 0.1, seed=3) != replay_mixture(targets, [{"text": "x"}], 0.1, seed=4)


def test_replay_mixture_bad_inputs():
    for fraction in (1.0, -0.01, 2, "0.1"):
        with pytest.raises(CourseError, match="fraction"):
            replay_mixture([{"id": 0}], [{"text": "x"}], fraction)
    with pytest.raises(CourseError, match="no target rows"):
        replay_mixture([], [{"text": "x"}], 0.1)
    with pytest.raises(CourseError, match="sum to"):
        replay_mixture([{"id": i} for i in range(10)], {"a": [{"text": "x"}]}, 0.5, weights={"a": 0.5})


def test_row_batches_label_chats_on_the_answer_and_texts_everywhere(lab):
    _, tok = lab
    chat = {"messages": [{"role": "user", "content": "Repeat: red cat"}, {"role": "assistant", "content": "red cat"}]}
    text = {"text": "Leo likes black."}
    chat_ids, text_ids = tokenize_row(tok, chat), tokenize_row(tok, text)
    assert chat_ids["labels"][0] == -100 and chat_ids["labels"][-2] == tok.eos_token_id
    assert text_ids["labels"] == text_ids["input_ids"] and text_ids["input_ids"][-1] == tok.eos_token_id
    batch = next(row_batches(tok, [chat, text], batch_size=2, seed=0))
    assert batch["input_ids"].shape[0] == 2
    with pytest.raises(CourseError, match="'messages'"):
        tokenize_row(tok, {"prompt": "x"})
    with pytest.raises(CourseError, match="fewer than one batch"):
        next(row_batches(tok, [chat], batch_size=2))


def test_lora_model_has_other_trainable_parameters(lab):
    from course_utils.lora import add_lora

    model = add_lora(copy.deepcopy(lab[0]), ["q_proj"], r=2, alpha=4)
    assert all("lora_" in name for name in trainable_named_parameters(model))


# ---------------------------------------------------------------- SmolLM2's instruction set


def test_instruction_set_and_english_texts_ship_with_the_course():
    items = load_instructions()
    assert len(items) >= 12 and all(set(i) == {"prompt", "any_of"} and i["any_of"] for i in items)
    assert len(load_english()) >= 12
    assert follows_rule("The capital of France is Paris.", ["paris"])
    assert not follows_rule("France is a country in Europe.", ["paris"])


def test_instruction_set_is_disjoint_from_the_habit_training_questions():
    # catches a shipped instruction that the SmolLM2 habit was trained on: section 4 scores the habit on these
    # answers and says none of the questions was in the habit's training set
    from course_utils.experts import HABIT_TRAIN

    assert not {i["prompt"].strip().lower() for i in load_instructions()} & {q.strip().lower() for q, _ in HABIT_TRAIN}


def test_base_skills_are_the_reports_defaults():
    assert BASE_SKILLS == ("copy", "first_word", "last_word", "count", "fact", "describe")


# ---------------------------------------------------------------- sampled Fisher, greedy matches, at_level


def test_sampled_fisher_draws_from_the_model_and_is_seeded():
    torch.manual_seed(0)
    model, batches = TinyLM(), tiny_batches()
    with torch.no_grad():
        model.out.weight.mul_(6)  # confident: its draws are mostly its argmax, rarely the data's random labels
    a = fisher_diagonal(model, batches, labels="sampled", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.values(), fisher_diagonal(model, batches, labels="sampled", seed=1).values()))
    empirical = fisher_diagonal(model, batches)
    assert not all(torch.equal(x, y) for x, y in zip(a.values(), empirical.values()))
    with pytest.raises(CourseError, match="labels="):
        fisher_diagonal(model, batches, labels="true")


def test_sample_labels_keeps_the_mask():
    from course_utils.forgetting import sample_labels

    torch.manual_seed(0)
    batch = tiny_batches()[0]
    drawn = sample_labels(TinyLM(), batch, torch.Generator().manual_seed(0))["labels"]
    assert torch.equal(drawn == -100, batch["labels"] == -100)
    assert torch.equal(drawn[:, 0], batch["labels"][:, 0])  # position 0 is never predicted


def test_greedy_matches_is_the_argmax_on_every_labelled_position():
    from course_utils.forgetting import greedy_matches

    torch.manual_seed(0)
    model = TinyLM()
    right = torch.tensor([3])
    while len(right) < 6:  # greedy decoding: every next token is the model's argmax
        right = torch.cat([right, model(right[None]).logits[0, -1:].argmax(-1)])
    labels = torch.cat([torch.full((3,), -100), right[3:]])[None]
    batch = {"input_ids": right[None], "attention_mask": torch.ones(1, 6, dtype=torch.long), "labels": labels}
    assert greedy_matches(model, batch).tolist() == [True]
    wrong = labels.clone()
    wrong[0, -1] = (wrong[0, -1] + 1) % 9
    assert greedy_matches(model, {**batch, "labels": wrong}).tolist() == [False]


def test_at_level_interpolates_the_first_crossing():
    from course_utils.forgetting import at_level

    curve = [{"target": 0.0, "mean drop": 0.0}, {"target": 0.5, "mean drop": 0.2}, {"target": 1.0, "mean drop": 0.6},
             {"target": 0.8, "mean drop": 0.9}]
    assert at_level(curve, 0.75) == pytest.approx(0.4)
    assert at_level(curve, 0.0) == 0.0
    assert at_level(curve, 1.0) == pytest.approx(0.6)
    assert at_level(curve[:2], 0.9) != at_level(curve[:2], 0.9)  # NaN: never reached
    with pytest.raises(CourseError, match="empty curve"):
        at_level([], 0.5)


# ---------------------------------------------------------------- exercise 2's stored cases

import runpy  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXERCISE_CASES_09 = ROOT / "data" / "exercises" / "09_forgetting.pt"


def answers_09():
    return runpy.run_path(str(ROOT / "tests" / "exercise_answers" / "09_forgetting.py"))  # not a package: run by path


def test_stored_exercise_cases_are_the_oracles():
    # Catches a stored case edited by hand, or cases that drift from the oracle's arguments.
    stored, fresh = torch.load(EXERCISE_CASES_09)["logit_fishers"], answers_09()["exercise_cases_09"]()["logit_fishers"]
    assert len(stored) == len(fresh)
    for ((z, y), (emp, smp)), ((z2, y2), (emp2, smp2)) in zip(stored, fresh):
        assert torch.equal(z, z2) and y == y2 and torch.allclose(emp, emp2) and torch.allclose(smp, smp2)


def test_exercise_2_cases_refuse_the_wrong_answer_and_pass_the_solution():
    # Catches a case set the argmax shortcut passes, and a hidden solution that disagrees with the oracle.
    import json

    from course_utils.exercises import check_exercise

    cases = torch.load(EXERCISE_CASES_09)["logit_fishers"]
    with pytest.raises(AssertionError):
        check_exercise(answers_09()["logit_fishers"], cases)
    nb = json.loads((ROOT / "notebooks" / "09_forgetting.ipynb").read_text())
    ns = {"torch": torch, "check_exercise": check_exercise, "EXERCISE_CASES": {"logit_fishers": cases}}
    exec("".join(next(c for c in nb["cells"] if "def logit_fishers_solution" in "".join(c["source"]))["source"]), ns)
    assert check_exercise(ns["logit_fishers_solution"], cases)


if __name__ == "__main__":  # python tests/test_forgetting.py: rewrite data/exercises/09_forgetting.pt from the oracle
    EXERCISE_CASES_09.parent.mkdir(parents=True, exist_ok=True)
    torch.save(answers_09()["exercise_cases_09"](), EXERCISE_CASES_09)
    print(f"wrote {EXERCISE_CASES_09}")
