"""A small, readable training loop for small models, and chat examples turned into batches.

`train` is plain PyTorch: AdamW, an optional linear warm-up and linear decay,
gradient clipping, a tqdm bar. It trains whatever parameters have
`requires_grad=True`, so freezing a model or adding adapters happens outside.

`chat_batches` turns {"messages": [...]} examples into padded batches whose
labels are -100 everywhere except on the assistant's tokens (the chat
template's `{% generation %}` block decides which those are).
"""

import inspect
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from course_utils.errors import CourseError

IGNORE_INDEX = -100  # label value that cross-entropy skips


@dataclass
class TrainHistory:
    """What `train` returns: the loss and learning rate of every step, and the loop's wall time
    in seconds (a callback's time included)."""

    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of the steps (one step's loss is noisy)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def learning_rate_at(step: int, *, lr: float, steps: int, warmup_steps: int, decay: bool) -> float:
    """Linear warm-up from 0 to lr over warmup_steps, then (if decay) linear decay to 0 at `steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay:
        return lr * max(0.0, (steps - step) / max(1, steps - warmup_steps))
    return lr


def train(
    model: torch.nn.Module,
    batches: Iterable[dict],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    decay: bool = False,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    description: str = "training",
    callback: Callable[[int, float], bool | None] | None = None,
    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
) -> TrainHistory:
    """Train `model` for `steps` optimizer steps on `batches` and return the loss history.

    Each batch is a dict of tensors the model takes as keyword arguments
    (input_ids, attention_mask, labels ...); the model must return `.loss`.
    A finite iterable of batches is cycled through as often as needed.
    `callback(step, loss)` runs after every step (step counts from 1); if it
    returns True, training stops there (e.g. once an evaluation passes).
    `extra_loss(model)`, if given, is added to the model's loss before the
    backward pass (a regulariser such as EWC's penalty); the history records
    the total.
    `loss_fn(model, batch)`, if given, replaces the model's loss (TRL's
    `compute_loss` pattern): preference.train_dpo and train_kto run their
    losses through this loop.
    The model is left in eval mode.

    The forward pass runs with `use_cache=False` (when the model takes that
    argument): a transformers model otherwise reads `use_cache` from its
    config (True by default) in train mode as in eval mode, builds a KV
    cache, and then no longer recognises packed rows given by position ids
    alone (DataCollatorWithFlattening, TRL's padding-free batches), so the
    packed samples would attend to each other. A cache is never needed to
    compute a training loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CourseError("The model has no trainable parameters: set requires_grad=True on the ones to train.")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = next(model.parameters()).device
    no_cache = {"use_cache": False} if _takes_use_cache(model) else {}
    batch_iter = _endless(batches)
    history = TrainHistory()
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=description, disable=not progress, mininterval=1.0)
    for step in bar:
        step_lr = learning_rate_at(step, lr=lr, steps=steps, warmup_steps=warmup_steps, decay=decay)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        batch = {k: v.to(device) for k, v in next(batch_iter).items()}
        loss = model(**batch, **no_cache).loss if loss_fn is None else loss_fn(model, batch)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.losses.append(loss.item())
        history.learning_rates.append(step_lr)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{history.losses[-1]:.3f}")
        if callback is not None and callback(step + 1, history.losses[-1]):
            break
    bar.close()
    history.seconds = time.perf_counter() - start
    model.eval()
    return history


def _takes_use_cache(model: torch.nn.Module) -> bool:
    """Whether model(...) accepts use_cache= (a transformers or PEFT model does; a plain module may not)."""
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _endless(batches: Iterable[dict]) -> Iterator[dict]:
    """Yield from `batches` forever, starting over when an iterable (not a one-shot iterator) ends."""
    if iter(batches) is batches:  # a generator or iterator: it can only be read once
        return itertools.chain(batches, _exhausted())
    return itertools.chain.from_iterable(itertools.repeat(batches))


def _exhausted():
    raise CourseError("The batch iterator ran out before `steps` were done: "
                      "pass a list of batches, an endless generator, or fewer steps.")
    yield  # makes this a generator


# ---------------------------------------------------------------- chat examples -> batches


def tokenize_chat(tokenizer, messages: list[dict]) -> dict[str, list[int]]:
    """Token ids of one conversation, with labels only on the assistant's tokens.

    The chat template marks assistant content with `{% generation %}`, and
    `return_assistant_tokens_mask=True` turns that into a 0/1 mask per token.
    """
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if not any(mask):
        raise CourseError("No assistant tokens found: the tokenizer's chat template needs a "
                          "{% generation %} block around assistant content, and the example an assistant turn.")
    labels = [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists into a batch: padding gets attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids, labels, attention = [], [], []
    for e in examples:
        pad = width - len(e["input_ids"])
        input_ids.append(e["input_ids"] + [pad_token_id] * pad)
        labels.append(e.get("labels", e["input_ids"]) + [IGNORE_INDEX] * pad)
        attention.append([1] * len(e["input_ids"]) + [0] * pad)
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention),
            "labels": torch.tensor(labels)}


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, or its end-of-sequence token when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chat_batches(tokenizer, examples: Iterable[dict], *, batch_size: int, seed: int = 0) -> Iterator[dict]:
    """Endless shuffled batches of chat examples ({"messages": [...]}, as in data/tasks/).

    Every example is tokenized once; each epoch visits them all in a new order
    drawn from `seed`, so the same seed gives the same batches.
    """
    tokenized = [tokenize_chat(tokenizer, e["messages"]) for e in examples]
    if len(tokenized) < batch_size:
        raise CourseError(f"chat_batches got {len(tokenized)} examples, fewer than one batch of {batch_size}.")
    return shuffled_batches(tokenized, batch_size=batch_size, pad_token_id=pad_token_id(tokenizer), seed=seed)


def shuffled_batches(tokenized: list[dict], *, batch_size: int, pad_token_id: int, seed: int = 0) -> Iterator[dict]:
    """Endless batches of already tokenized examples: each epoch a new order drawn from `seed`."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(tokenized)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([tokenized[i] for i in order[start:start + batch_size]], pad_token_id)
