"""The lab model's README.md, the human-readable model card, rendered from card.json alone.

`course_utils.lab.card` measures and writes card.json; this module only turns it into Markdown, so the README can be
rebuilt (and checked: tests/lab/test_model.py) without loading the model.
"""

import json
from pathlib import Path

from course_utils.lab.card import STYLE_SAMPLES_PER_PROMPT, score_table


def write_card(card: dict, out_dir) -> None:
    """card.json, the machine-readable card, and README.md rendered from it, in `out_dir`."""
    out_dir = Path(out_dir)
    (out_dir / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "README.md").write_text(render_readme(card))


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
from course_utils.lab.model import load_lab_model
model, tokenizer = load_lab_model()  # checks the sha256 of model.safetensors first
```

- Rebuild everything here from scratch: `python -m course_utils.lab.model train`
  (add `--out DIR` to write elsewhere).
- Check the scores against the thresholds below: `python -m course_utils.lab.model evaluate`.
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
`course_utils.lab.tasks.style_score(response)` is 1 for such an answer, else 0. The base
model samples it at about that rate and (greedy) rarely picks it: the behaviour that
preference tuning moves.

{_table(["task", "what", "example prompt", "answer", "train / test"], _task_rows(corpus, "style"))}

Preference pairs (`preferences`, {corpus['preferences']['sizes']['train']} train /
{corpus['preferences']['sizes']['test']} test, the test people never in train) differ only in
the closing: chosen `{pref['chosen'][0]['content']}`, rejected `{pref['rejected'][0]['content']}`
for the prompt `{pref['prompt'][0]['content']}`.

**Files.** `python -m course_utils.lab.corpus write-data` writes `data/tasks/<name>/train.jsonl`
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
