"""course_utils.preference_runs: TRL's trainers set up for the proofs and for LoRA, dpo_run, the lab model's closing
scores (StyleEval, token_split, fork_logps) and the SmolLM2 preference set (notebooks/08_preference_tuning.ipynb)."""

import copy
import json
import math

import pytest
import torch

from course_utils.errors import CourseError
from course_utils.paths import DATA_DIR
from course_utils.preference import dpo_loss, completion_logps, preference_batch, token_logps
from course_utils.preference_runs import (SMOL_OPENING, SMOL_SYSTEM, StyleEval, dpo_run, dpo_trainer, first_sentence,
                                          fork_logps, load_smollm2_preferences, longest_row, lora_dpo_trainer,
                                          opens_politely, score_smol_answers, smollm2_preference_rows, split_masks,
                                          states_answer, still_running, token_split, train_logs, train_quietly,
                                          trl_dpo, write_smollm2_preferences)
from course_utils import preference_runs
from course_utils.lab.tasks import STYLE_MARKER


@pytest.fixture(scope="module")
def lab():
    from course_utils.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("lab", device="cpu")
    return model.requires_grad_(False), tok


@pytest.fixture(scope="module")
def test_rows():
    from course_utils.data import load_task

    return list(load_task("preferences", "test"))[:4]


def noisy(model, scale=0.02, seed=0):
    """A copy of `model` with seeded noise on every weight: a policy whose log-ratios are all nonzero."""
    copy_, generator = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy_.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return copy_


def test_first_sentence():
    assert first_sentence("Ada lives in Bern. Have a nice day!") == "Ada lives in Bern."
    assert first_sentence("no period") == "no period"


def test_style_eval_on_the_base_lab_model(lab, test_rows):
    model, tok = lab
    evaluate = StyleEval(tok, test_rows, samples=2)
    row, greedy = evaluate(model, seed=0, label="base")
    scores = evaluate.prompt_scores["base"]
    assert len(greedy) == len(test_rows) and all(len(v) == len(test_rows) for v in scores.values())
    # the lab card: the base model's greedy answer is the fact, without the closing. Catches facts read from the
    # chosen answer (the fact would never be "clean") or a closing scorer that fires on every answer
    assert row["fact right"] == 1 and row["clean answer"] == 1 and row["closing (greedy)"] == 0
    assert row["fact + closing only"] == 0
    assert "perplexity" not in row  # no skills asked for
    with pytest.raises(CourseError, match="samples"):
        StyleEval(tok, test_rows, samples=0)


def test_split_masks_partition_the_completion(lab, test_rows):
    _, tok = lab
    batch = preference_batch(tok, test_rows)
    shared, tails, lengths = split_masks(batch)
    completion = batch["completion_mask"][:, 1:].float()
    n = len(test_rows)
    assert torch.equal(shared + tails, completion) and not (shared * tails).any()
    assert torch.equal(shared[:n].sum(-1), shared[n:].sum(-1))  # the same sentence in both rows of a pair
    assert torch.equal(tails[n:].sum(-1), torch.full((n,), 2.0))  # the rejected tail: <|im_end|> and the newline
    assert torch.equal(lengths, completion.sum(-1))
    cut = {k: v.clone() for k, v in batch.items()}
    cut["completion_mask"][n] = 0
    cut["completion_mask"][n, 1:3] = 1  # a rejected answer of two tokens: no sentence before its end of turn
    with pytest.raises(CourseError, match="Pair 0"):
        split_masks(cut)


def test_token_split_shared_tokens_cancel_on_sums(lab, test_rows):
    model, tok = lab
    batch = preference_batch(tok, test_rows)
    assert token_split(model, model, batch).abs().to_numpy().max() == 0  # the reference against itself
    split = token_split(noisy(model), model, batch)
    # the same tokens in the same context: equal in both rows, so they cancel from h on sums but not on means
    assert split["h from shared, sum"].abs().max() < 1e-4 and split["shared sentence (chosen)"].abs().min() > 1e-3
    assert split["h from shared, mean"].abs().min() > 1e-4
    # the parts add up to h from completion_logps (catches a token counted twice or dropped)
    with torch.no_grad():
        new, old = completion_logps(noisy(model), **batch), completion_logps(model, **batch)
    h = ((new - old)[:len(test_rows)] - (new - old)[len(test_rows):]).numpy()
    assert abs(split["h from shared, sum"] + split["h from tails, sum"] - h).max() < 1e-4


def test_sampled_closing_groups_the_samples_by_prompt(lab, test_rows, monkeypatch):
    _, tok = lab
    n = len(test_rows)
    # generate() gets prompts * samples: sample s of prompt k at s * n + k. Closing at 0, n, n + 1: prompt 0 in
    # both samples, prompt 1 in the second. Catches a reshape(-1, samples), which would pair neighbouring prompts
    closes = {0, n, n + 1}
    monkeypatch.setattr(preference_runs, "generate", lambda model, tokenizer, prompts, **kw: [
        f"Ada lives in Bern. {STYLE_MARKER}" if i in closes else "Ada lives in Bern." for i in range(len(prompts))])
    shares = StyleEval(tok, test_rows, samples=2).sampled_closing(None, seed=0)
    assert shares.tolist() == [1.0, 0.5] + [0.0] * (n - 2)


def test_style_eval_skills_add_the_skill_report(lab, test_rows, monkeypatch):
    model, tok = lab
    calls = []
    monkeypatch.setattr(preference_runs, "skill_report", lambda *a, **kw: calls.append(kw) or {"perplexity": 9.0})
    row, _ = StyleEval(tok, test_rows, samples=1, skills=("arithmetic",), skill_limit=3)(model, seed=0)
    # catches skills that are ignored, or a limit that does not reach skill_report
    assert row["perplexity"] == 9.0 and calls[0]["skills"] == ("arithmetic",) and calls[0]["limit"] == 3
    row, _ = StyleEval(tok, test_rows, samples=1, skills=("arithmetic",))(model, seed=0, skills=False)
    assert "perplexity" not in row and len(calls) == 1


def test_fork_logps_reads_the_closing_at_the_fork(lab, test_rows):
    model, tok = lab
    batch = preference_batch(tok, test_rows)
    fork = fork_logps(model, batch)
    assert len(fork) == len(test_rows) and (fork["P(other)"] >= -1e-6).all()
    # the base model ends the turn after the fact (catches a fork read one position off)
    assert (fork["log P(end of turn)"] > fork["log P(closing)"]).all() and not fork["greedy closes"].any()
    # log P(closing) is the chosen row's per-token log-prob of the closing's first token (independent path)
    with torch.no_grad():
        per_token = token_logps(model(input_ids=batch["input_ids"]).logits, batch["input_ids"], batch["completion_mask"])
    _, tails, _ = split_masks(batch)
    for i in range(len(test_rows)):
        first_tail = tails[i].nonzero().flatten()[0]
        assert per_token[i, first_tail].item() == pytest.approx(fork["log P(closing)"][i], abs=1e-5)


def test_dpo_run_snapshot_is_the_shorter_run(lab, test_rows):
    model, tok = lab
    batch = preference_batch(tok, test_rows)
    options = dict(lr=1e-3, batch_size=2, seed=3)
    snapshot, first, whole = dpo_run(model, batch, steps=3, snapshot_at=2, **options)
    short, short_hist, _ = dpo_run(model, batch, steps=2, **options)
    assert len(first) == 2 and len(whole) == 3 and first.equals(short_hist)
    assert first["loss"].iloc[0] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the start
    for a, b in zip(snapshot.parameters(), short.parameters()):
        assert torch.equal(a, b)  # catches a snapshot taken after the wrong step
    assert not all(torch.equal(a, b) for a, b in zip(snapshot.parameters(), model.parameters()))
    with pytest.raises(CourseError, match="snapshot_at"):
        dpo_run(model, batch, steps=2, snapshot_at=3, **options)


def test_trl_dpo_equals_our_loss(lab, test_rows, tmp_path):
    model, tok = lab
    policy = noisy(model)
    trainer = dpo_trainer(policy, model, test_rows, tok, output_dir=str(tmp_path))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(test_rows))])
    loss, metrics = trl_dpo(trainer, batch)
    ours = preference_batch(tok, test_rows)
    with torch.no_grad():
        expected = dpo_loss(*completion_logps(policy, **ours).chunk(2), *completion_logps(model, **ours).chunk(2))
    assert loss.item() == pytest.approx(expected[0].mean().item(), abs=1e-5) and "rewards/margins" in metrics
    logs = train_logs(model, model, test_rows, tok, output_dir=str(tmp_path), steps=2)
    assert len(logs) == 2 and logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_lora_dpo_trainer_rpo_and_dpo_alone(lab, test_rows, tmp_path):
    model, tok = lab
    rows = test_rows[:2]
    alone = lora_dpo_trainer(copy.deepcopy(model), tok, rows, steps=1, lr=1e-3, output_dir=str(tmp_path),
                             loss_type=("sigmoid",), loss_weights=(1.0,), batch_size=2)
    rpo = lora_dpo_trainer(copy.deepcopy(model), tok, rows, steps=1, lr=1e-3, output_dir=str(tmp_path), batch_size=2,
                           loss_type=("sigmoid", "sft"), loss_weights=(1.0, 1.0))
    assert rpo.args.use_cpu  # a model on the CPU trains there (TRL_CPU_ARGS)
    # the untrained adapter is the reference: DPO alone starts at log 2, RPO adds the chosen answers' NLL
    first_alone, first_rpo = train_quietly(alone)[0], train_quietly(rpo)[0]
    batch = preference_batch(tok, rows)
    with torch.no_grad():  # TRL's "sft" term: the chosen answers' NLL, a mean over their tokens
        chosen = completion_logps(model, **batch).chunk(2)[0]
    nll = -(chosen.sum() / batch["completion_mask"][:len(rows), 1:].sum()).item()
    # float32 log 2 and a mean of ~20 log-probs: ~1e-6. Catches a control that keeps the NLL term, or an RPO without it
    assert first_alone["loss"] == pytest.approx(math.log(2), abs=1e-5) and nll > 1e-3
    assert first_rpo["loss"] == pytest.approx(math.log(2) + nll, abs=1e-5)
    assert first_rpo["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert longest_row(alone) == int(batch["attention_mask"].sum(-1).max())  # our batch is TRL's (the proofs)
    with pytest.raises(CourseError, match="one weight per loss"):
        lora_dpo_trainer(model, tok, rows, steps=1, lr=1e-3, output_dir=str(tmp_path), loss_type=("sigmoid", "sft"),
                         loss_weights=(1.0,))


def test_still_running_counts_answers_at_their_limit(lab):
    _, tok = lab
    text = "Ada lives in Bern. Have a nice day!"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert still_running(tok, [text], n) == 1 and still_running(tok, [text], n + 1) == 1  # within one token
    assert still_running(tok, [text, "Ada"], n + 2) == 0


def test_smollm2_data_file_is_the_generator_output():
    lines = (DATA_DIR / "smollm2_preferences.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == smollm2_preference_rows()
    train, test = load_smollm2_preferences("train"), load_smollm2_preferences("test")
    assert 64 <= len(train) <= 128 and len(test) == 16
    assert not {r["prompt"][-1]["content"] for r in train} & {r["prompt"][-1]["content"] for r in test}
    # a short system message on every row: without one SmolLM2's template adds its longer default prompt
    assert all(r["prompt"][0] == {"role": "system", "content": SMOL_SYSTEM} for r in train + test)
    for row in train + test:  # the answer word is in the plain answer and not in the question (echoing scores 0)
        assert states_answer(row["rejected"][0]["content"], row) and not states_answer(row["prompt"][-1]["content"], row)
    for row in train + test:  # the pairs differ in the opening only
        assert row["chosen"][0]["content"] == f"{SMOL_OPENING} {row['rejected'][0]['content']}"
        assert opens_politely(row["chosen"][0]["content"]) and not opens_politely(row["rejected"][0]["content"])
    with pytest.raises(CourseError, match="split"):
        load_smollm2_preferences("validation")


def test_smollm2_file_written_and_missing(tmp_path, monkeypatch):
    written = write_smollm2_preferences(tmp_path / "rows.jsonl")
    assert written.read_text(encoding="utf-8") == (DATA_DIR / "smollm2_preferences.jsonl").read_text(encoding="utf-8")
    monkeypatch.setattr("course_utils.paths.DATA_DIR", tmp_path)  # no smollm2_preferences.jsonl there
    with pytest.raises(CourseError, match="is missing"):
        load_smollm2_preferences("train")


def test_score_smol_answers_scores_each_question():
    rows = load_smollm2_preferences("test")[:2]
    plain = rows[1]["rejected"][0]["content"]  # the second question's right answer, without the opening
    scores = score_smol_answers([f"{SMOL_OPENING} I am not sure.", plain], rows)
    # the two columns differ on each answer: catches swapped columns, or answers scored against the wrong row
    assert scores["opens"].tolist() == [1, 0] and scores["right"].tolist() == [0, 1]
    assert list(scores.index) == [r["prompt"][-1]["content"] for r in rows]
    with pytest.raises(CourseError, match="one answer per row"):
        score_smol_answers(["x"], rows)


def test_states_answer_wants_the_answer_word_whole():
    row = {"rejected": [{"role": "assistant", "content": "7 times 3 is 21."}]}
    assert states_answer("Happy to help! 7 times 3 is 21.", row) == 1
    assert states_answer("It is 211.", row) == 0 and states_answer("7 times 3 is 12.", row) == 0
    capital = {"rejected": [{"role": "assistant", "content": "The capital of Peru is Lima."}]}
    assert states_answer("lima, of course", capital) == 1
