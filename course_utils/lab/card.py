"""The lab model's card: what it scores, what it must score, and how fast it learns something new.

- `score_lab_model` measures every test set under data/tasks/ (exact match on
  each chat task, perplexity on general text, the rate of the style marker);
- `THRESHOLDS` are what a (re)built lab model must reach: set with margins
  below the measured scores, and for held-out tasks a ceiling (the base model
  must NOT be able to do them);
- `measure_finetuning_speed` fine-tunes a copy on each held-out task (full
  fine-tuning, then LoRA r=8) until it passes `FINETUNE_TARGET` exact match;
- `course_utils.lab.readme` writes card.json and README.md, the human-readable card rendered from it.
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
from course_utils.lab.corpus import describe_corpus
from course_utils.lab.tasks import strip_style, style_score
from course_utils.memory import LAYER_LINEARS
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
                "target_modules": list(LAYER_LINEARS)},
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


def score_table(scores: dict, thresholds: dict) -> str:
    """A Markdown table: each score next to its threshold."""
    lines = ["| score | value | threshold | pass |", "|---|---:|---|---|"]
    for name, value in scores.items():
        bounds = thresholds.get(name, {})
        rule = " and ".join(f"{'>=' if k == 'min' else '<='} {v}" for k, v in bounds.items()) or "(reported)"
        ok = "" if not bounds else ("yes" if not check_thresholds({name: value}, {name: bounds}) else "**NO**")
        lines.append(f"| {name} | {value:.3f} | {rule} | {ok} |")
    return "\n".join(lines)
