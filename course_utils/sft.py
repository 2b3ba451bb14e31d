"""Supervised fine-tuning from scratch: the SFT loss with a prompt-loss weight, and new tokens in the vocabulary.

Built in notebooks/11_sft.ipynb, where the loss is proved equal to TRL's SFTTrainer (assistant-only and
completion-only) and to the plain language-model loss, and add_tokens to transformers' resize_token_embeddings.
"""

# Exported from notebooks/11_sft.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/11_sft.ipynb · 1.1 · The SFT loss
import torch
import torch.nn.functional as F

from course_utils.errors import CourseError


def sft_loss(logits, input_ids, assistant_mask, attention_mask=None, *, prompt_loss_weight=0.0):
    """Next-token cross-entropy as a weighted mean: weight 1 on assistant tokens, `prompt_loss_weight` on the
    other attended tokens, 0 on padding. Token t is predicted from the logits at t - 1."""
    check_sft_inputs(input_ids, assistant_mask, attention_mask, prompt_loss_weight)  # next cell
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    targets = input_ids[:, 1:]
    assistant = assistant_mask[:, 1:].to(logits.dtype)
    attended = attention_mask[:, 1:].to(logits.dtype)
    weights = assistant * attended + prompt_loss_weight * (1 - assistant) * attended
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none")
    return (weights * per_token).sum() / weights.sum()


# %% notebooks/11_sft.ipynb · 1.1 · The SFT loss
def check_sft_inputs(input_ids, assistant_mask, attention_mask, prompt_loss_weight) -> None:
    """A CourseError for a weight outside [0, 1], mismatched shapes, or a batch with no assistant token."""
    if not 0.0 <= float(prompt_loss_weight) <= 1.0:
        raise CourseError(f"prompt_loss_weight={prompt_loss_weight!r} is outside [0, 1]: 0 trains on the "
                          "assistant's tokens only, 1 on every token (the plain language-model loss); 0.1 is "
                          "a common middle.")
    for name, mask in (("assistant_mask", assistant_mask), ("attention_mask", attention_mask)):
        if mask is not None and mask.shape != input_ids.shape:
            raise CourseError(f"{name} has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}: "
                              "build both from the same tokenized batch.")
    attended = assistant_mask[:, 1:].bool()
    if attention_mask is not None:
        attended = attended & attention_mask[:, 1:].bool()
    if not attended.any():
        raise CourseError("This batch has no assistant token to train on, so the loss would be 0/0 (nan): "
                          "check that every row has an assistant turn that survives truncation, and that "
                          "the mask comes from apply_chat_template(..., return_assistant_tokens_mask=True).")


# %% notebooks/11_sft.ipynb · 1.2 · New tokens
def add_tokens(model, tokenizer, tokens, *, init="mean") -> list[int]:
    """Add `tokens` to the tokenizer and grow the embeddings (a tied output layer grows with them); the new
    rows start at the mean of the existing input embeddings (init="random": a fresh normal draw, the control).
    Returns the new ids; the existing rows are unchanged."""
    tokens = check_new_tokens(tokenizer, tokens, init)  # next cell
    old_size = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens(tokens)
    new_ids = tokenizer.convert_tokens_to_ids(tokens)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        old = embeddings[:old_size]
        if init == "mean":
            embeddings[old_size:] = old.mean(dim=0)
        else:
            embeddings[old_size:] = torch.randn_like(embeddings[old_size:]) * old.std()
        output = model.get_output_embeddings()
        if output is not None and output.weight is not embeddings:  # untied: the output rows start at zero
            output.weight[old_size:] = 0.0
    return new_ids


def check_new_tokens(tokenizer, tokens, init) -> list[str]:
    """The tokens as a list; a CourseError for an unknown init, an empty list or a token already in the vocabulary."""
    if init not in ("mean", "random"):
        raise CourseError(f"init={init!r}: use 'mean' (the new rows start at the mean embedding) or 'random'.")
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    if not tokens:
        raise CourseError("add_tokens got no tokens: pass a list of new strings, e.g. ['Quinn'].")
    known = [t for t in tokens if t in tokenizer.get_vocab()]
    if known or len(set(tokens)) != len(tokens):
        raise CourseError(f"{known or tokens} already in the vocabulary (or repeated): add only new tokens; "
                          "an existing token already has a trained embedding.")
    return tokens


# %% notebooks/11_sft.ipynb · 1.3 · Helpers for the experiments
from course_utils.training import _takes_use_cache  # train()'s own guard


def sft_loss_fn(prompt_loss_weight: float = 0.0):
    """A loss_fn(model, batch) for course_utils.training.train: sft_loss on a chat batch whose labels are -100
    off the assistant's tokens (training.chat_batches). The forward runs with use_cache=False where the model takes
    it, as train() runs a model's own loss: a training loss never needs the KV cache a transformers model would
    otherwise build each step (a plain module without that argument is called without it)."""
    def loss_fn(model, batch):
        no_cache = {"use_cache": False} if _takes_use_cache(model) else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache).logits
        return sft_loss(logits, batch["input_ids"], batch["labels"] != -100, batch["attention_mask"],
                        prompt_loss_weight=prompt_loss_weight)
    return loss_fn


def repetition_rate(texts) -> float:
    """Mean over texts of the share of words that repeat an earlier word of the same text (0: none)."""
    texts = list(texts)
    if not texts:
        raise CourseError("repetition_rate got no texts.")
    rates = [1 - len(set(words)) / len(words) if words else 0.0 for words in (t.split() for t in texts)]
    return sum(rates) / len(rates)
