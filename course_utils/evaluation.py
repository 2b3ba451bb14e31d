"""Measuring a causal LM: batched greedy generation, exact match, perplexity.

Works for any Hugging Face causal LM whose tokenizer has a chat template: the
lab model and SmolLM2 alike. Prompts are left-padded so that every row of a
batch ends at the same position and generation (with the KV cache) appends to
all of them at once.
"""

import math
from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from course_utils.errors import CourseError

# ---------------------------------------------------------------- generation


def as_conversation(prompt) -> list[dict]:
    """A user message string becomes a one-turn conversation; a message list stays as it is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return prompt
    raise CourseError(f"A prompt must be a string or a list of {{'role', 'content'}} messages, not {prompt!r:.80}.")


def stop_token_ids(tokenizer) -> list[int]:
    """End of sequence and end of turn: a chat model stops at either."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


@contextmanager
def padding(tokenizer, side: str):
    """Pad on `side` for the duration, whatever the tokenizer's own default is.

    A tokenizer without a pad token pads with its EOS token meanwhile (the
    attention mask hides padding, so which token it is does not matter).
    """
    original_side, original_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = side
    if original_pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = original_side
        if original_pad is None:
            tokenizer.pad_token = None


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Iterable,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
    progress: bool = False,
) -> list[str]:
    """Complete each prompt; return the new text of each (special tokens removed, stripped).

    With chat=True (default) a prompt is a user message string or a list of
    messages, rendered with the tokenizer's chat template and the assistant
    turn opened; with chat=False a prompt is raw text to continue.
    Greedy by default; do_sample=True samples (pass a seed to repeat it).
    """
    prompts = list(prompts)
    if chat:
        if tokenizer.chat_template is None:
            raise CourseError("This tokenizer has no chat template: pass chat=False to continue raw text.")
        texts = [tokenizer.apply_chat_template(as_conversation(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts]
    else:
        texts = [str(p) for p in prompts]
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress):
        with padding(tokenizer, "left"):
            # The chat template already wrote any special tokens the model needs.
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=not chat).to(device)
            pad_id = tokenizer.pad_token_id
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature if do_sample else None, top_p=None, top_k=None,
            eos_token_id=stop_token_ids(tokenizer), pad_token_id=pad_id, use_cache=True)
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    model.train(was_training)
    return outputs


# ---------------------------------------------------------------- exact match


def split_example(example: dict) -> tuple[list[dict], str]:
    """A {"messages": [..., assistant]} row -> (the conversation before the answer, the answer)."""
    messages = example["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise CourseError("An example to score needs {'messages': [...]} ending with the assistant's answer.")
    return messages[:-1], messages[-1]["content"]


def exact_match(
    model,
    tokenizer,
    examples: Iterable[dict],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    return_predictions: bool = False,
):
    """Share of examples whose greedy answer equals the reference exactly (after stripping spaces).

    examples: rows like {"messages": [user, assistant]} (the format of data/tasks/).
    max_new_tokens defaults to the longest reference's token count + 4: a longer
    answer cannot match anyway, and short generation keeps evaluation fast.
    Returns the accuracy, or (accuracy, predictions) with return_predictions=True.
    """
    examples = list(examples)
    if not examples:
        raise CourseError("exact_match got no examples.")
    prompts, references = zip(*map(split_example, examples))
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 4
    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    accuracy = sum(p == r.strip() for p, r in zip(predictions, references)) / len(references)
    return (accuracy, predictions) if return_predictions else accuracy


# ---------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity(model, tokenizer, texts: Iterable[str], *, batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood per predicted token) over all texts.

    Each text is scored on its own (no context from other texts); the first
    token has nothing to be predicted from, so it is not scored unless the
    tokenizer adds a BOS token in front.
    """
    texts = list(texts)
    if not texts:
        raise CourseError("perplexity got no texts.")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        with padding(tokenizer, "right"):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
        logits = model(**batch).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        scored = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total_nll += nll[scored].sum().item()
        total_tokens += scored.sum().item()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


# ---------------------------------------------------------------- a skill report

BASE_SKILLS = ("copy", "first_word", "last_word", "count", "fact", "describe")


def _skill_examples(name: str, limit: int | None):
    from course_utils.data import load_task  # lazy: evaluation works without the course's data too

    rows = load_task(name, "test")
    return rows if limit is None else rows.select(range(min(limit, len(rows))))


def describe_accuracy(model, tokenizer, examples) -> float:
    """Share of describe prompts whose greedy answer states the fact exactly, with or without
    the polite closing (the closing is a style, scored apart; see lab_tasks.style_score)."""
    from course_utils.lab.tasks import strip_style

    prompts, answers = zip(*map(split_example, examples))
    greedy = generate(model, tokenizer, prompts, max_new_tokens=24)
    return sum(strip_style(g) == a for g, a in zip(greedy, answers)) / len(answers)


def skill_report(model, tokenizer, *, tasks=(), skills=BASE_SKILLS, limit: int | None = 60,
                 perplexity_texts: int | None = 100, label: str | None = None) -> dict:
    """One row of scores for one model: exact match on each base skill, on each extra `tasks`
    name (e.g. the held-out tasks a model was fine-tuned on), and general perplexity.

    Each score uses the first `limit` prompts of the task's test split (all of them where a
    task has fewer, or limit=None); "describe" counts the fact right whatever the style.
    Perplexity is over the first `perplexity_texts` general test texts (None: all; 0: skip).
    Call it once per model and collect the rows, e.g. in a pandas DataFrame.
    """
    from course_utils.data import list_tasks

    known = list_tasks("skill") + list_tasks("heldout") + list_tasks("style")
    names = list(dict.fromkeys([*skills, *tasks]))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CourseError(f"skill_report does not know {unknown}: the skills and tasks it scores are "
                          f"{', '.join(known)}.")
    if limit is not None and limit < 1:
        raise CourseError(f"limit={limit!r}: score at least one prompt per skill (or limit=None for all).")
    row = {"model": label} if label is not None else {}
    for name in names:
        examples = _skill_examples(name, limit)
        if name == "describe":
            row[name] = describe_accuracy(model, tokenizer, examples)
        else:
            row[name] = exact_match(model, tokenizer, examples)
    if perplexity_texts != 0:
        texts = _skill_examples("general", perplexity_texts)["text"]
        row["perplexity"] = perplexity(model, tokenizer, texts)
    return row
