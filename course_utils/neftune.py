"""NEFTune from scratch: noise on the input embeddings while fine-tuning (Jain et al. 2023).

Built step by step in notebooks/04_neftune.ipynb, where it is proved equal to
transformers' `neftune_post_forward_hook` (transformers/integrations/neftune.py).
The noise is Uniform(-1, 1) * alpha / sqrt(L * d) on the embedding output
[B, L, d], in training mode only. L is the row length, padding included, as in
transformers; `attach_neftune(model, alpha, per_sample=True)` uses each
sample's own length instead, in padded and in packed batches.
"""

# Exported from notebooks/04_neftune.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/04_neftune.ipynb · 1.1 · The noise and the hook
import math
from contextlib import contextmanager

import torch
from torch import nn

from course_utils.errors import CourseError


def noise_scale(alpha, length, dim) -> torch.Tensor:
    """alpha / sqrt(L * d) in float32, computed as transformers does (so the noise matches bit for bit)."""
    return alpha / torch.sqrt(torch.as_tensor(length * dim))


def neftune_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """Uniform(-s, s) noise shaped like `embeddings` [B, L, d], with s = alpha / sqrt(L * d) and L the row length."""
    check_embeddings(embeddings)  # a CourseError unless [B, L, d] (defined below)
    scale = noise_scale(alpha, embeddings.size(1), embeddings.size(2))
    return torch.zeros_like(embeddings).uniform_(-scale, scale)


def neftune_hook(alpha: float):
    """A forward hook for the input embedding: output + noise in training mode, the output unchanged in eval mode."""
    alpha = check_alpha(alpha)  # a CourseError unless a finite number >= 0 (defined below)

    def hook(module, inputs, output):
        if not module.training:
            return output
        return output + neftune_noise(output, alpha)

    hook.neftune_alpha = alpha  # marks the hook as ours, and says its alpha
    return hook


# %% notebooks/04_neftune.ipynb · 1.1 · The noise and the hook
def check_alpha(alpha) -> float:
    """alpha as a float; a CourseError unless it is a finite number >= 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise CourseError(f"NEFTune alpha={alpha!r} must be a finite number >= 0: the paper uses 5, 10 or 15 "
                          "(0 adds no noise). Pass e.g. neftune_hook(5).")
    return float(alpha)


def check_embeddings(embeddings: torch.Tensor) -> None:
    """A CourseError unless the embeddings are [batch, length, hidden]."""
    if embeddings.dim() != 3:
        raise CourseError(f"NEFTune expects embeddings of shape [batch, length, hidden], got {tuple(embeddings.shape)}.")


# %% notebooks/04_neftune.ipynb · 1.2 · Attaching and detaching
def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's input embedding module (transformers' get_input_embeddings(); PEFT models forward it)."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        raise CourseError(f"NEFTune needs a transformers model with get_input_embeddings(); {type(model).__name__} "
                          "has none. Pass the model itself (e.g. AutoModelForCausalLM), or call "
                          "module.register_forward_hook(neftune_hook(alpha)) on its embedding layer.")
    return get()


def _our_hook_ids(hooks: dict, mark: str) -> list:
    return [key for key, hook in hooks.items() if hasattr(hook, mark)]


def neftune_alpha(model: nn.Module) -> float | None:
    """The alpha of the NEFTune hook on the model's embeddings (ours or transformers'), or None if there is none."""
    embeddings = input_embeddings(model)
    for hook in embeddings._forward_hooks.values():
        if hasattr(hook, "neftune_alpha"):
            return hook.neftune_alpha
    return getattr(embeddings, "neftune_noise_alpha", None)  # transformers' hook keeps alpha on the module


def attach_neftune(model: nn.Module, alpha: float, *, per_sample: bool = False):
    """Add the NEFTune hook to the model's input embeddings; returns the hook handle. Raises if one is attached.

    per_sample=False: L is the row length, as in transformers. per_sample=True: L is each sample's own length,
    read from the attention_mask and position_ids the model is called with (section 2.6 of the notebook).
    """
    alpha = check_alpha(alpha)
    embeddings = input_embeddings(model)
    current = neftune_alpha(model)
    if current is not None:
        raise CourseError(f"NEFTune (alpha={current:g}) is already attached to this model: a second hook would add "
                          "noise twice. Call detach_neftune(model) first (or, if a Trainer attached it, let "
                          "training finish).")
    if not per_sample:
        return embeddings.register_forward_hook(neftune_hook(alpha))
    hook = per_sample_hook(alpha)
    model.register_forward_pre_hook(batch_recorder(hook), with_kwargs=True)  # hands the batch to the hook
    return embeddings.register_forward_hook(hook)


# %% notebooks/04_neftune.ipynb · 1.2 · Attaching and detaching
def detach_neftune(model: nn.Module) -> float:
    """Remove our NEFTune hook from the model's input embeddings; returns its alpha. Raises if none is attached."""
    embeddings = input_embeddings(model)
    keys = _our_hook_ids(embeddings._forward_hooks, "neftune_alpha")
    if not keys:
        raise CourseError("NEFTune is not attached to this model, so there is nothing to detach. "
                          "attach_neftune(model, alpha) adds it.")
    alpha = embeddings._forward_hooks[keys[0]].neftune_alpha
    for key in keys:
        del embeddings._forward_hooks[key]
    for key in _our_hook_ids(model._forward_pre_hooks, "neftune_recorder"):
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    return alpha


@contextmanager
def neftune(model: nn.Module, alpha: float, *, per_sample: bool = False):
    """`with neftune(model, 5): train(...)`: NEFTune inside the block, detached afterwards (even on an error)."""
    attach_neftune(model, alpha, per_sample=per_sample)
    try:
        yield model
    finally:
        detach_neftune(model)


# %% notebooks/04_neftune.ipynb · 2.6 · Build it: NEFTune with each sample's own $L$
def token_lengths(shape, attention_mask=None, position_ids=None) -> torch.Tensor:
    """[B, T] float: the length of the sample each token belongs to.

    A row is one sample, or several where position_ids restart at 0 (a packed row). A 2D attention_mask
    (1 = real token) keeps padding out of the counts; a padding token gets length >= 1, never 0.
    """
    batch, length = shape
    starts = torch.zeros(batch, length, dtype=torch.bool)
    if position_ids is not None:
        starts |= (position_ids == 0).cpu().expand(batch, length)
    starts[:, 0] = True
    segment = starts.long().cumsum(dim=1) - 1  # which sample of its row each token belongs to
    real = torch.ones(batch, length)
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask.cpu().float().expand(batch, length)
    counts = torch.zeros(batch, length).scatter_add_(1, segment, real)  # real tokens per sample
    return counts.gather(1, segment).clamp(min=1)


def per_sample_noise(embeddings: torch.Tensor, alpha: float, lengths: torch.Tensor) -> torch.Tensor:
    """NEFTune noise with each token's own sample length: Uniform(-1, 1) * alpha / sqrt(L_i * d)."""
    check_embeddings(embeddings)
    scale = noise_scale(alpha, lengths, embeddings.size(2)).to(embeddings.device, embeddings.dtype)
    return torch.zeros_like(embeddings).uniform_(-1, 1) * scale.unsqueeze(-1)


def per_sample_hook(alpha: float):
    """An embedding hook like neftune_hook(alpha), with L = each sample's length (batch_recorder hands it the batch)."""
    alpha = check_alpha(alpha)

    def hook(module, inputs, output):
        batch = hook.batch.pop() if hook.batch else None  # this forward's batch, used once
        if not module.training:
            return output
        if batch is None:
            raise CourseError("Per-sample NEFTune reads attention_mask and position_ids from the model's forward: "
                              "call the model (model(**batch)), not its embedding layer, or attach with per_sample=False.")
        return output + per_sample_noise(output, alpha, token_lengths(output.shape[:2], **batch))

    hook.neftune_alpha, hook.batch = alpha, []
    return hook


def batch_recorder(hook):
    """A forward pre-hook (with_kwargs=True) for the model: keeps the batch's attention_mask and position_ids."""
    def record(model, args, kwargs):
        hook.batch[:] = [{"attention_mask": kwargs.get("attention_mask"), "position_ids": kwargs.get("position_ids")}]

    record.neftune_recorder = True
    return record
