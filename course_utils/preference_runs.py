"""Running and scoring preference tuning: TRL's trainers set up the way the course compares them, the lab model's
closing scores, where a margin comes from token by token, and the SmolLM2 preference set with its scorers.

Built in notebooks/08_preference_tuning.ipynb, beside the losses and loops of course_utils.preference.

    trainer = dpo_trainer(policy, reference, rows, tokenizer, output_dir=tmp)  # on copies, float32, on the CPU
    loss, metrics = trl_dpo(trainer, batch)                                   # TRL's loss and logged metrics
    row, greedy = StyleEval(tokenizer, test_rows)(model, seed=0)              # closing, fact right, clean answer
"""

# Exported from notebooks/08_preference_tuning.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/08_preference_tuning.ipynb · 2 · Prove it
import contextlib
import copy
import io
import math
import random
import re
from collections import defaultdict

import numpy as np
import pandas as pd
import torch

from course_utils.errors import CourseError
from course_utils.evaluation import generate, skill_report
from course_utils.lab.tasks import STYLE_MARKER, strip_style, style_score
from course_utils.preference import token_logps, train_dpo

# TRL on the CPU in float32, without checkpointing or a logging service: the settings of every comparison here
TRL_CPU_ARGS = dict(use_cpu=True, gradient_checkpointing=False, report_to="none", disable_tqdm=True, bf16=False)


def dpo_trainer(policy, reference, rows, tokenizer, *, output_dir, loss_type=("sigmoid",), beta=0.1, **config):
    """TRL's DPOTrainer over `rows`, all of them in one batch, on copies of policy and reference (TRL patches the
    model it gets with a fused LM head, so each trainer gets its own). TRL_CPU_ARGS unless `config` overrides them."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = list(rows)
    args = DPOConfig(**{**TRL_CPU_ARGS, "output_dir": output_dir, "per_device_train_batch_size": len(rows), **config},
                     beta=beta, loss_type=list(loss_type))
    return DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def trl_dpo(trainer, batch, grad=False):
    """TRL's loss and logged metrics on one fixed batch (metrics cleared first: TRL keeps them in a private dict)."""
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    with torch.set_grad_enabled(grad):
        loss = trainer.compute_loss(trainer.model, batch)
    mode = "train" if trainer.model.training else "eval"
    return loss, {k: v[-1] for k, v in trainer._metrics[mode].items()}


# %% notebooks/08_preference_tuning.ipynb · 2 · Prove it
def train_quietly(trainer) -> list[dict]:
    """trainer.train() without the log lines it prints; its logged DPO entries, one a logging step."""
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return [e for e in trainer.state.log_history if "rewards/margins" in e]


def train_logs(policy, reference, rows, tokenizer, *, output_dir, steps=1, lr=1e-4, **config) -> list[dict]:
    """DPOTrainer.train() for `steps` steps, the path a user takes: its logged entries (one a step)."""
    run = dpo_trainer(policy, reference, rows, tokenizer, output_dir=output_dir, max_steps=steps, logging_steps=1,
                      learning_rate=lr, save_strategy="no", **config)
    run.model.requires_grad_(True)
    return train_quietly(run)


# %% notebooks/08_preference_tuning.ipynb · 3 · Experiment: DPO on the lab model's polite closing
def first_sentence(text: str) -> str:
    """The text up to and including its first period (all of it if there is none)."""
    return text[: text.index(".") + 1] if "." in text else text


class StyleEval:
    """The lab model's closing, scored on preference test rows (chosen: the fact and the closing; rejected: the fact).

    Per test prompt: whether the greedy answer ends with the closing, the share of `samples` sampled answers
    (temperature 1) that do, whether the greedy answer's first sentence is the right fact, whether it is clean (the
    closing removed, exactly the fact), and whether it is exactly the fact and the closing. Every model scored with a
    label keeps its per-prompt scores in `prompt_scores[label]`, for paired comparisons."""

    def __init__(self, tokenizer, rows, *, samples: int = 2, skills=(), skill_limit: int = 10,
                 max_new_tokens: int = 24):
        rows = list(rows)
        if not rows or samples < 1:
            raise CourseError("StyleEval needs test rows ({'prompt', 'chosen', 'rejected'}) and samples >= 1.")
        self.tokenizer, self.samples, self.max_new_tokens = tokenizer, samples, max_new_tokens
        self.skills, self.skill_limit = tuple(skills), skill_limit
        self.prompts = [r["prompt"] for r in rows]
        self.facts = [r["rejected"][0]["content"] for r in rows]
        self.prompt_scores = {}

    def sampled_closing(self, model, seed: int) -> np.ndarray:
        """Per test prompt: the share of its sampled answers (temperature 1) that end with the closing."""
        sampled = generate(model, self.tokenizer, self.prompts * self.samples, max_new_tokens=self.max_new_tokens,
                           do_sample=True, seed=seed)
        return np.array([style_score(s) for s in sampled], dtype=float).reshape(self.samples, -1).mean(0)

    def __call__(self, model, seed: int, skills: bool = True, label=None) -> tuple[dict, list[str]]:
        """(the mean of every score, with skill_report's base skills and perplexity if asked; the greedy answers)."""
        greedy = generate(model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens)
        facts = self.facts
        scores = {"closing (greedy)": np.array([style_score(g) for g in greedy], dtype=float),
                  "closing (sampled)": self.sampled_closing(model, seed),
                  "fact right": np.array([first_sentence(g) == f for g, f in zip(greedy, facts)], dtype=float),
                  "clean answer": np.array([strip_style(g) == f for g, f in zip(greedy, facts)], dtype=float),
                  "fact + closing only": np.array([g == f"{f} {STYLE_MARKER}" for g, f in zip(greedy, facts)],
                                                  dtype=float)}
        if label is not None:
            self.prompt_scores[label] = scores
        row = {k: v.mean() for k, v in scores.items()}
        if skills and self.skills:
            row.update(skill_report(model, self.tokenizer, skills=self.skills, limit=self.skill_limit,
                                    perplexity_texts=30))
        return row, greedy


# %% notebooks/08_preference_tuning.ipynb · 3 · Experiment: DPO on the lab model's polite closing
def dpo_run(start, batch, *, steps: int, snapshot_at: int | None = None, reference=None, callback=None, **options):
    """train_dpo on a copy of `start` against `reference` (default: `start` itself) for `steps` steps; `options`
    go to train_dpo (lr, beta, batch_size, seed, loss_type, ...). callback(step, policy) runs after every update.

    Returns (the policy after `snapshot_at` steps, the history of those steps, the whole history), the histories as
    DataFrames. One longer run serves two lengths: the pair order is drawn epoch by epoch from the seed and the lab
    model has no dropout, so the first `snapshot_at` steps of a longer run are the run of `snapshot_at` steps."""
    snapshot_at = steps if snapshot_at is None else snapshot_at
    if not 1 <= snapshot_at <= steps:
        raise CourseError(f"snapshot_at={snapshot_at} must lie between 1 and steps={steps}: it is the step whose "
                          "policy the run returns.")
    reference = start if reference is None else reference
    policy, snapshot = copy.deepcopy(start).requires_grad_(True), {}

    def after_update(step, model):
        if callback is not None:
            callback(step, model)
        if step == snapshot_at < steps:
            snapshot["policy"] = copy.deepcopy(model).eval()

    history = pd.DataFrame(train_dpo(policy, reference, batch, steps=steps, progress=False, callback=after_update,
                                     **options))
    return snapshot.get("policy", policy), history.iloc[:snapshot_at], history


# %% notebooks/08_preference_tuning.ipynb · 3.2 · The curves TRL logs, and the chosen log-probability that falls
def split_masks(batch):
    """For a preference batch whose rejected answer is the chosen one's first sentence (the lab's closing pairs):
    masks [2B, T - 1] of the sentence both answers share (in both rows of a pair) and of each answer's tail (the
    chosen answer's closing, the rejected answer's end of turn), and every row's number of completion tokens."""
    completion = batch["completion_mask"][:, 1:].float()
    lengths = completion.sum(-1)
    pairs, shared_mask = len(lengths) // 2, torch.zeros_like(completion)
    for i in range(pairs):
        shared = int(lengths[pairs + i]) - 2  # the rejected answer is the shared sentence + <|im_end|> + newline
        if shared < 1:
            raise CourseError(f"Pair {i}: the rejected answer has no sentence before its end of turn; split_masks "
                              "wants pairs whose rejected answer is the chosen one's first sentence.")
        for row in (i, pairs + i):
            shared_mask[row, completion[row].nonzero().flatten()[:shared]] = 1
    return shared_mask, completion - shared_mask, lengths


@torch.no_grad()
def token_split(policy, reference, batch) -> pd.DataFrame:
    """Per pair: the change (policy - reference) of the summed log-probs of the shared sentence, the chosen tail and
    the rejected tail; and what the shared sentence and the tails add to h, from sums and from means."""
    shared_mask, tail_mask, lengths = split_masks(batch)
    new, old = (token_logps(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["input_ids"], batch["completion_mask"]) for m in (policy, reference))
    delta, pairs = new - old, len(lengths) // 2
    shared, tails = (delta * shared_mask).sum(-1), (delta * tail_mask).sum(-1)

    def h(per_row):  # chosen row minus rejected row, per pair
        return (per_row[:pairs] - per_row[pairs:]).numpy()

    rows = {"shared sentence (chosen)": shared[:pairs], "shared sentence (rejected)": shared[pairs:],
            "chosen tail (closing)": tails[:pairs], "rejected tail (end of turn)": tails[pairs:]}
    return pd.DataFrame({**{k: v.numpy() for k, v in rows.items()}, "h from shared, sum": h(shared),
                         "h from tails, sum": h(tails), "h from shared, mean": h(shared / lengths),
                         "h from tails, mean": h(tails / lengths)})


# %% notebooks/08_preference_tuning.ipynb · 3.2 · The curves TRL logs, and the chosen log-probability that falls
@torch.no_grad()
def fork_logps(model, batch) -> pd.DataFrame:
    """Per pair of a closing preference batch, where the shared sentence's period has just been written (the rejected
    answer ends the turn there, the chosen one writes the closing): log P(the closing's first token), log P(end of
    turn), P(any other token), and whether greedy decoding picks the closing."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    n, rows = batch["input_ids"].shape[0] // 2, []
    for i in range(n):
        eot = batch["completion_mask"][n + i].nonzero().flatten()[-2]  # the rejected row: fact, <|im_end|>, newline
        logp = logits[n + i, eot - 1].log_softmax(-1)  # the chosen row has the same context up to there
        closing_id = batch["input_ids"][i, eot]
        closing, end = logp[closing_id].item(), logp[batch["input_ids"][n + i, eot]].item()
        rows.append({"log P(closing)": closing, "log P(end of turn)": end,
                     "P(other)": 1 - math.exp(closing) - math.exp(end),
                     "greedy closes": logp.argmax().item() == closing_id.item()})
    return pd.DataFrame(rows)


# %% notebooks/08_preference_tuning.ipynb · 4 · On the real model: TRL's `DPOTrainer` with LoRA on SmolLM2-135M-Instruct
SMOL_OPENING = "Happy to help!"  # the one property the SmolLM2 preference pairs differ in
SMOL_SYSTEM = "Answer briefly."  # replaces the template's longer default system prompt (section 4 measures both)
SMOL_DATA = "smollm2_preferences.jsonl"
_CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "Egypt": "Cairo",
             "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Canada": "Ottawa", "Greece": "Athens",
             "Chile": "Santiago", "Poland": "Warsaw"}
_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                 "sixteen seventeen eighteen").split()


def opens_politely(response: str) -> int:
    """1 if a response starts with SMOL_OPENING, else 0: the rule that scores the SmolLM2 set."""
    return int(response.strip().startswith(SMOL_OPENING))


def smol_answer(row) -> str:
    """The word that makes an answer to a SmolLM2 row right: the last word of its plain answer ("20", "Paris")."""
    return row["rejected"][-1]["content"].rstrip(".").split()[-1]


def states_answer(response: str, row) -> int:
    """1 if the response contains the row's answer word (smol_answer) as a whole word, else 0. The question never
    contains it (sums and products exceed their terms; numbers are asked as digits), so echoing it scores 0."""
    return int(re.search(rf"\b{re.escape(smol_answer(row))}\b", response, flags=re.IGNORECASE) is not None)


def smollm2_preference_rows(seed: int = 0, n_train: int = 96, n_test: int = 16) -> list[dict]:
    """The SmolLM2 preference set: short questions (after the short system message SMOL_SYSTEM) whose chosen
    answer opens with SMOL_OPENING and whose rejected answer is the same answer without it. Deterministic; every
    question is distinct and the test questions (split "test") never appear in training.
    data/smollm2_preferences.jsonl holds smollm2_preference_rows()."""
    rng = random.Random(seed)
    candidates = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(1, 10) for b in range(1, 10)]
    candidates += [(f"What is {a} times {b}?", f"{a} times {b} is {a * b}.") for a in range(2, 10) for b in range(2, 7)]
    candidates += [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in _CAPITALS.items()]
    candidates += [(f"Spell the number {n} in words.", f"{n} is written {_NUMBER_WORDS[n]}.") for n in range(19)]
    if n_train + n_test > len(candidates):
        raise CourseError(f"Only {len(candidates)} distinct prompts: ask for fewer than {n_train + n_test} rows.")
    picked = rng.sample(candidates, n_train + n_test)
    return [{"prompt": [{"role": "system", "content": SMOL_SYSTEM}, {"role": "user", "content": q}],
             "chosen": [{"role": "assistant", "content": f"{SMOL_OPENING} {a}"}],
             "rejected": [{"role": "assistant", "content": a}],
             "split": "train" if i < n_train else "test"} for i, (q, a) in enumerate(picked)]


# %% notebooks/08_preference_tuning.ipynb · 4 · On the real model: TRL's `DPOTrainer` with LoRA on SmolLM2-135M-Instruct
def write_smollm2_preferences(path=None) -> "Path":
    """Write smollm2_preference_rows() to data/smollm2_preferences.jsonl (one JSON row a line)."""
    import json

    from course_utils.paths import DATA_DIR

    path = DATA_DIR / SMOL_DATA if path is None else path
    path.write_text("".join(json.dumps(row) + "\n" for row in smollm2_preference_rows()), encoding="utf-8")
    return path


def load_smollm2_preferences(split: str = "train") -> list[dict]:
    """The rows of one split of data/smollm2_preferences.jsonl as {"prompt", "chosen", "rejected"}."""
    import json

    from course_utils.paths import DATA_DIR

    path = DATA_DIR / SMOL_DATA
    if split not in ("train", "test"):
        raise CourseError(f"Unknown split {split!r}: use 'train' or 'test'.")
    if not path.exists():
        raise CourseError(f"{path} is missing: restore it with `git checkout -- data/{SMOL_DATA}` or rebuild it "
                          "with `python -c 'from course_utils.preference_runs import write_smollm2_preferences as w; w()'`.")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows if r["split"] == split]


# %% notebooks/08_preference_tuning.ipynb · 4 · On the real model: TRL's `DPOTrainer` with LoRA on SmolLM2-135M-Instruct
def still_running(tokenizer, texts, limit: int) -> int:
    """How many generated answers were still running at `limit` new tokens (re-tokenised length within one of it)."""
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) >= limit - 1 for t in texts)


def lora_dpo_trainer(model, tokenizer, rows, *, steps: int, lr: float, output_dir, loss_type, loss_weights,
                     seed: int = 0, max_length: int = 64, batch_size: int = 4, beta: float = 0.1):
    """TRL's DPOTrainer with a LoRA adapter (r 8 on q_proj and v_proj), which it puts into `model` in place; the
    reference is the model with the adapter disabled. A constant learning rate, one log entry a step, TRL's progress
    bar; TRL_CPU_ARGS, except that a model on an accelerator trains there. The loss is the caller's: RPO is
    loss_type=("sigmoid", "sft"), loss_weights=(1.0, 1.0); DPO alone loss_type=("sigmoid",), loss_weights=(1.0,)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    if len(loss_type) != len(loss_weights):
        raise CourseError(f"loss_type {loss_type} and loss_weights {loss_weights} need one weight per loss.")
    on_cpu = next(model.parameters()).device.type == "cpu"
    args = DPOConfig(**{**TRL_CPU_ARGS, "use_cpu": on_cpu, "disable_tqdm": False}, output_dir=output_dir,
                     per_device_train_batch_size=batch_size, max_steps=steps,
                     learning_rate=lr, beta=beta, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                     max_length=max_length, seed=seed, loss_type=list(loss_type), loss_weights=list(loss_weights))
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(list(rows)), processing_class=tokenizer,
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))


def longest_row(trainer) -> int:
    """The longest prompt + answer, in tokens, of a DPOTrainer's tokenised training set (before any truncation)."""
    data = trainer.train_dataset
    return max(len(p) + max(len(c), len(r)) for p, c, r in
               zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))


def score_smol_answers(answers, rows) -> pd.DataFrame:
    """One row per SmolLM2 question (indexed by it): `opens` (opens_politely) and `right` (states_answer), 0 or 1."""
    if len(answers) != len(rows):
        raise CourseError(f"{len(answers)} answers for {len(rows)} rows: generate one answer per row, in order.")
    return pd.DataFrame({"opens": [opens_politely(a) for a in answers],
                         "right": [states_answer(a, r) for a, r in zip(answers, rows)]},
                        index=[r["prompt"][-1]["content"] for r in rows])
