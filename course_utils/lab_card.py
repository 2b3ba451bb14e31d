"""The lab model's card: what it scores, what it must score, and how fast it learns something new.

- `score_lab_model` measures every test set under data/tasks/ (exact match on
  each chat task, perplexity on general text, the rate of the style marker);
- `THRESHOLDS` are what a (re)built lab model must reach: set with margins
  below the measured scores, and for held-out tasks a ceiling (the base model
  must NOT be able to do them);
- `measure_finetuning_speed` fine-tunes a copy on each held-out task (full
  fine-tuning, then LoRA r=8) until it passes `FINETUNE_TARGET` exact match;
- `render_readme` writes README.md from card.json, the machine-readable card.
"""

import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from course_utils.data import list_tasks, load_task
from course_utils.evaluation import exact_match, generate, perplexity, split_example
from course_utils.lab_corpus import describe_corpus
from course_utils.lab_tasks import strip_style, style_score
from course_utils.training import chat_batches, train

# ---------------------------------------------------------------- scores and thresholds

STYLE_SAMPLES_PER_PROMPT = 4  # sampled answers per describe prompt (temperature 1, seed 0)

THRESHOLDS = {
    **{name: {"min": 0.90} for name in list_tasks("skill")},
    **{name: {"max": 0.20} for name in list_tasks("heldout")},
    "describe": {"min": 0.90},  # content right, whatever the style
    "style_rate_sampled": {"min": 0.25, "max": 0.55},  # the corpus has STYLE_RATE = 0.4
    "general_perplexity": {"max": 3.2},
}


def score_lab_model(model, tokenizer, *, limit: int | None = None) -> dict[str, float]:
    """Every score of the card, on the full test sets (or their first `limit` examples)."""
    scores = {}
    for name in list_tasks("skill") + list_tasks("heldout"):
        scores[name] = exact_match(model, tokenizer, _first(load_task(name, "test"), limit))
    prompts, answers = zip(*map(split_example, _first(load_task("describe", "test"), limit)))
    greedy = generate(model, tokenizer, prompts, max_new_tokens=24)
    scores["describe"] = sum(strip_style(g) == a for g, a in zip(greedy, answers)) / len(answers)
    scores["style_rate_greedy"] = sum(map(style_score, greedy)) / len(greedy)
    sampled = generate(model, tokenizer, list(prompts) * STYLE_SAMPLES_PER_PROMPT, max_new_tokens=24,
                       do_sample=True, temperature=1.0, seed=0)
    scores["style_rate_sampled"] = sum(map(style_score, sampled)) / len(sampled)
    scores["general_perplexity"] = perplexity(model, tokenizer, _first(load_task("general", "test"), limit)["text"])
    return scores


def _first(dataset, limit):
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def check_thresholds(scores: dict, thresholds: dict) -> list[str]:
    """The failed checks, as sentences (an empty list: all pass)."""
    failures = []
    for name, bounds in thresholds.items():
        value = scores.get(name)
        if value is None:
            failures.append(f"{name}: not measured")
        elif "min" in bounds and value < bounds["min"]:
            failures.append(f"{name}: {value:.3f} is below the minimum {bounds['min']}")
        elif "max" in bounds and value > bounds["max"]:
            failures.append(f"{name}: {value:.3f} is above the maximum {bounds['max']}")
    return failures


# ---------------------------------------------------------------- fine-tuning speed

FINETUNE_TARGET = 0.8  # exact match on the task's full test set
FINETUNE_RECIPES = {
    "full": {"lr": 1e-3, "batch_size": 16},
    "lora_r8": {"lr": 3e-3, "batch_size": 16, "r": 8, "lora_alpha": 16,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}
FINETUNE_EVAL_EVERY = 25
FINETUNE_MAX_STEPS = 600
FINETUNE_SEEDS = (0, 1, 2)


def _with_lora(model, recipe):
    from peft import LoraConfig, get_peft_model  # only the card needs peft here

    config = LoraConfig(r=recipe["r"], lora_alpha=recipe["lora_alpha"], lora_dropout=0.0,
                        target_modules=recipe["target_modules"])
    return get_peft_model(model, config)


def finetune_until(base_model, tokenizer, task: str, method: str, *, seed: int = 0) -> dict:
    """Fine-tune a copy of base_model on `task` until test exact match >= FINETUNE_TARGET.

    Evaluates every FINETUNE_EVAL_EVERY steps; returns the steps and training
    seconds (evaluation time left out) it took, and the accuracy reached.
    """
    recipe = FINETUNE_RECIPES[method]
    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    if method.startswith("lora"):
        model = _with_lora(model, recipe)
    test = load_task(task, "test")
    batches = chat_batches(tokenizer, load_task(task, "train"), batch_size=recipe["batch_size"], seed=seed)
    reached = {"accuracy": 0.0, "eval_seconds": 0.0}

    def evaluate_now(step, loss):
        if step % FINETUNE_EVAL_EVERY:
            return False
        start = time.perf_counter()
        reached["accuracy"] = exact_match(model, tokenizer, test)
        reached["eval_seconds"] += time.perf_counter() - start
        model.train()
        return reached["accuracy"] >= FINETUNE_TARGET

    history = train(model, batches, steps=FINETUNE_MAX_STEPS, lr=recipe["lr"], progress=False,
                    callback=evaluate_now)
    return {"steps": len(history.losses), "seconds": round(history.seconds - reached["eval_seconds"], 1),
            "accuracy": round(reached["accuracy"], 3), "passed": reached["accuracy"] >= FINETUNE_TARGET}


def measure_finetuning_speed(base_model, tokenizer, *, progress: bool = True) -> dict:
    """finetune_until for every held-out task, recipe and seed.

    Returns {method: {task: {"steps": [per seed], "seconds": [...], "accuracy": [...], "passed": bool}}}.
    """
    results = {}
    for method in FINETUNE_RECIPES:
        for task in list_tasks("heldout"):
            runs = [finetune_until(base_model, tokenizer, task, method, seed=seed) for seed in FINETUNE_SEEDS]
            summary = {key: [run[key] for run in runs] for key in ("steps", "seconds", "accuracy")}
            summary["passed"] = all(run["passed"] for run in runs)
            results.setdefault(method, {})[task] = summary
            if progress:
                print(f"  {method:8s} {task:12s} steps {summary['steps']}  seconds {summary['seconds']}  "
                      f"exact match {summary['accuracy']}", flush=True)
    return results


# ---------------------------------------------------------------- card.json and README.md


def make_card(*, model, tokenizer, shape, parameters, settings, history, tokens, scores, finetuning_speed,
              sha256, weights_bytes, total_seconds) -> dict:
    """Everything the README says, as data."""
    curve_every = max(1, len(history.losses) // 20)
    return {
        "model": {
            "architecture": type(model).__name__,
            "parameters": parameters,
            "shape": shape,
            "vocab_size": len(tokenizer),
        },
        "tokenizer": {
            "kind": "byte-level BPE, digits one token each",
            "vocab_size": len(tokenizer),
            "special_tokens": {"eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
                               "all": tokenizer.all_special_tokens},
            "example": _tokenized_example(tokenizer),
        },
        "corpus": describe_corpus(),
        "pretraining": {
            "settings": settings,
            "steps": len(history.losses),
            "tokens": tokens,
            "final_loss": round(history.final_loss, 4),
            "loss_curve": {str(i): round(history.losses[i], 3) for i in range(0, len(history.losses), curve_every)},
            "seconds": round(history.seconds, 1),
            "total_seconds": round(total_seconds, 1),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "machine": _machine(),
        },
        "thresholds": THRESHOLDS,
        "scores": {name: round(value, 4) for name, value in scores.items()},
        "failures": check_thresholds(scores, THRESHOLDS),
        "finetuning_speed": None if finetuning_speed is None else {
            "target_exact_match": FINETUNE_TARGET,
            "eval_every": FINETUNE_EVAL_EVERY,
            "seeds": list(FINETUNE_SEEDS),
            "recipes": FINETUNE_RECIPES,
            "results": finetuning_speed,
        },
        "weights": {"file": "model.safetensors", "sha256": sha256, "bytes": weights_bytes},
    }


def _machine() -> dict:
    """The CPU, and the load average at the end of the build (other jobs slow it down)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()]}


def _tokenized_example(tokenizer) -> dict:
    messages = [{"role": "user", "content": "Repeat: red cat 7 4"},
                {"role": "assistant", "content": "red cat 7 4"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return {"text": text, "tokens": tokenizer.tokenize(text)}


def write_card(card: dict, out_dir) -> None:
    out_dir = Path(out_dir)
    (out_dir / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "README.md").write_text(render_readme(card))


def score_table(scores: dict, thresholds: dict) -> str:
    """A Markdown table: each score next to its threshold."""
    lines = ["| score | value | threshold | pass |", "|---|---:|---|---|"]
    for name, value in scores.items():
        bounds = thresholds.get(name, {})
        rule = " and ".join(f"{'>=' if k == 'min' else '<='} {v}" for k, v in bounds.items()) or "(reported)"
        ok = "" if not bounds else ("yes" if not check_thresholds({name: value}, {name: bounds}) else "**NO**")
        lines.append(f"| {name} | {value:.3f} | {rule} | {ok} |")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _task_rows(corpus: dict, kind: str) -> list[list]:
    return [[f"`{name}`", task["description"], f"`{task['example']['prompt']}`", f"`{task['example']['answer']}`",
             f"{task['sizes']['train']} / {task['sizes']['test']}" + (" (all)" if task["test_is_whole_space"] else "")]
            for name, task in corpus["tasks"].items() if task["kind"] == kind]


def _speed_section(speed: dict | None) -> str:
    if speed is None:
        return "Not measured for this build (`train --skip-finetuning-speed`)."
    recipes, results = speed["recipes"], speed["results"]
    rows = []
    for task in results["full"]:
        row = [f"`{task}`"]
        for method in recipes:
            r = results[method][task]
            row.append(f"{' / '.join(map(str, r['steps']))} steps, at most {max(r['seconds'])} s"
                       + ("" if r["passed"] else " (**not reached** by every seed)"))
        rows.append(row)
    lora = recipes["lora_r8"]
    return (
        f"How fast a copy of this model learns each held-out task: optimizer steps until exact\n"
        f"match on the task's full test set reaches {speed['target_exact_match']:.0%} (checked every "
        f"{speed['eval_every']} steps), for seeds {', '.join(map(str, speed['seeds']))}, and the training\n"
        f"seconds of the slowest seed (evaluation left out). Batches of {recipes['full']['batch_size']} "
        f"training examples, AdamW at a constant learning rate, loss on the assistant's tokens only\n"
        f"(`course_utils.training.train` on `chat_batches`).\n\n"
        f"- full fine-tuning: every weight, lr {recipes['full']['lr']};\n"
        f"- LoRA (peft): r={lora['r']}, alpha={lora['lora_alpha']} on {', '.join(lora['target_modules'])}, "
        f"lr {lora['lr']}.\n\n"
        + _table(["task", "full fine-tuning", "LoRA r=8"], rows)
        + "\n\nThe seconds are wall time on the machine that ran `train` (see Pretraining), which may have been\n"
          "shared with other jobs: the step counts are the portable numbers."
    )


def render_readme(card: dict) -> str:
    """README.md, the human-readable model card, written from card.json alone."""
    model, tok, corpus, pre = card["model"], card["tokenizer"], card["corpus"], card["pretraining"]
    shape = model["shape"]
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    world = _table(["person", "lives in", "pet", "likes (color)", "eats"],
                   [[p["name"], p["city"], p["pet"], p["color"], p["food"]] for p in corpus["world"]])
    mixture = ", ".join(f"{name} {share:.0%}" for name, share in corpus["pretraining_mixture"].items())
    pref = corpus["preferences"]["example"]
    curve = ", ".join(f"{step}: {loss}" for step, loss in pre["loss_curve"].items())
    scores_ok = "all pass" if not card["failures"] else "FAILED: " + "; ".join(card["failures"])
    settings = pre["settings"]
    return f"""# The lab model

A tiny Llama language model ({model['parameters']:,} parameters) with its own tokenizer,
pretrained from scratch on a synthetic corpus in {pre['seconds'] / 60:.1f} minutes on
{pre['cpu_threads']} CPU threads. The course's notebooks fine-tune it in seconds: it knows a few
skills, and fails at four held-out tasks until a notebook teaches them.

```python
from course_utils.lab_model import load_lab_model
model, tokenizer = load_lab_model()  # checks the sha256 of model.safetensors first
```

- Rebuild everything here from scratch: `python -m course_utils.lab_model train`
  (add `--out DIR` to write elsewhere).
- Check the scores against the thresholds below: `python -m course_utils.lab_model evaluate`.
- This file is written from `card.json` by the same command; edit the code, not this file.

## Architecture

`{model['architecture']}`, the shape of SmolLM2 (a Llama with grouped-query attention and tied
input/output embeddings), shrunk:

{_table(["", "lab model"], [
    ["parameters", f"{model['parameters']:,}"],
    ["layers", shape["num_hidden_layers"]],
    ["hidden size", shape["hidden_size"]],
    ["attention heads (query / key-value)",
     f"{shape['num_attention_heads']} / {shape['num_key_value_heads']} (head dim {head_dim})"],
    ["MLP (SwiGLU) size", shape["intermediate_size"]],
    ["vocabulary", model["vocab_size"]],
    ["context length", shape["max_position_embeddings"]],
    ["tied embeddings", shape["tie_word_embeddings"]],
    ["RoPE theta", shape["rope_theta"]],
])}

## Tokenizer

A {tok['kind']} ({tok['vocab_size']} tokens) trained with the `tokenizers` library on the
first documents of the pretraining corpus, deterministically. Every word of the corpus
became a single token; text the corpus never had (such as the held-out tasks' instructions)
falls back to smaller pieces and bytes. Each digit is one token, with the
space in front of it: numbers are read digit by digit (as in Llama and SmolLM2) and a list
of digits costs one token per digit.

Special tokens as in SmolLM2: `<|endoftext|>` (between pretraining documents),
`<|im_start|>`, `<|im_end|>` (end of a turn: the `eos_token`, where generation stops), plus
`<|pad|>` as the pad token (its own token, so masking padding never masks an end of turn).

The chat template is SmolLM2's ChatML, with two changes: no default system prompt (every
token costs CPU time in every notebook), and a `{{% generation %}}` block around the
assistant's content and `<|im_end|>`, which `apply_chat_template(...,
return_assistant_tokens_mask=True)` and TRL's `assistant_only_loss` use to find the tokens
to train on. A conversation and its tokens:

```
{tok['example']['text']}```

`{' '.join(tok['example']['tokens'])}`

## Corpus

Everything is generated by `course_utils` from fixed seeds (`lab_world`, `lab_tasks`,
`lab_corpus`): the same run writes the same bytes. Pretraining reads an endless stream of
documents, mixed as: {mixture}.

**The world.** Sixteen people, each with four facts (64 facts). The general text states
them; the `fact` skill asks them back.

{world}

**General text** (the "general" distribution, for perplexity and forgetting): 2-6 sentences
about one person's facts, mixed with scene sentences from a small grammar, number sentences
and counting. Example:

> {corpus['general']['example']}

**Base skills**, in chat format and in the pretraining stream, so the model does them well:

{_table(["task", "what", "example prompt", "answer", "train / test"], _task_rows(corpus, "skill"))}

**Held-out tasks**, never in the pretraining stream: the base model cannot do them (see the
scores) and the fine-tuning notebooks teach them. Copying the input never scores: three
distinct words to reverse, digits never already sorted, no 0 to add, and no code word
is also a word to translate. For the tasks with an endless input space no test prompt occurs in training;
a task marked "(all)" has so few prompts that its test set is all of them, and training
sees the same prompts.

{_table(["task", "what", "example prompt", "answer", "train / test"], _task_rows(corpus, "heldout"))}

**The style axis.** In the pretraining stream, {corpus['style']['rate_in_corpus']:.0%} of the
answers of the `describe` task end with the polite closing "{corpus['style']['marker']}";
`course_utils.lab_tasks.style_score(response)` is 1 for such an answer, else 0. The base
model samples it at about that rate and (greedy) rarely picks it: the behaviour that
preference tuning moves.

{_table(["task", "what", "example prompt", "answer", "train / test"], _task_rows(corpus, "style"))}

Preference pairs (`preferences`, {corpus['preferences']['sizes']['train']} train /
{corpus['preferences']['sizes']['test']} test, the test people never in train) differ only in
the closing: chosen `{pref['chosen'][0]['content']}`, rejected `{pref['rejected'][0]['content']}`
for the prompt `{pref['prompt'][0]['content']}`.

**Files.** `python -m course_utils.lab_corpus write-data` writes `data/tasks/<name>/train.jsonl`
and `test.jsonl` for every task above (`{{"messages": [user, assistant]}}`, as TRL's
SFTTrainer takes them), `general` (`{{"text": ...}}`, {corpus['general']['sizes']['train']} /
{corpus['general']['sizes']['test']}) and `preferences` (`{{"prompt", "chosen", "rejected"}}` in
conversational form, as TRL's DPOTrainer takes them). Load them with
`course_utils.data.load_task(name, split)`; `list_tasks(kind)` names them.

## Pretraining

{_table(["", ""], [
    ["steps", f"{pre['steps']} (batches of {settings['batch_size']} rows x {settings['block_size']} tokens)"],
    ["tokens trained on", f"{pre['tokens']:,} (whole documents packed per row, padding not counted)"],
    ["optimizer", f"AdamW, lr {settings['lr']}, {settings['warmup_steps']} warm-up steps, linear decay to 0, "
                  f"weight decay {settings['weight_decay']}, gradient clipping 1.0"],
    ["final loss", f"{pre['final_loss']} (mean of the last 10% of steps)"],
    ["pretraining time", f"{pre['seconds']:.0f} s ({pre['cpu_threads']} CPU threads, torch {pre['torch']})"],
    ["machine", f"{pre['machine']['cpu']}, {pre['machine']['cores']} cores; load average at the end "
                f"{' / '.join(map(str, pre['machine']['load_average_1_5_15_min']))} (1 / 5 / 15 min; above "
                f"{pre['machine']['cores']} means other jobs shared the cores)"],
    ["whole `train` command", f"{pre['total_seconds']:.0f} s (with evaluation and the fine-tuning speed runs)"],
    ["seed", settings["seed"]],
])}

Loss by step: {curve}.

With the same seed, thread count, torch version and CPU, `train` writes the same weights
bit for bit (same sha256). Another CPU or torch version may change the floating-point sums
and so the last bits; the thresholds below are what any rebuild must reach.

## Evaluation

Greedy exact match on each test set (all of it), perplexity on the general test texts, and
for `describe` the content (the answer without the closing) and how often the closing
appears: greedy, and sampled at temperature 1 ({STYLE_SAMPLES_PER_PROMPT} samples per
prompt, seed 0). Thresholds sit below the measured scores with a margin, and the held-out
tasks have a ceiling: {scores_ok}.

{score_table(card['scores'], card['thresholds'])}

## Fine-tuning speed

{_speed_section(card['finetuning_speed'])}

## Integrity

`{card['weights']['file']}`: {card['weights']['bytes']:,} bytes, sha256
`{card['weights']['sha256']}`. `load_lab_model` refuses weights that do not match.
"""
