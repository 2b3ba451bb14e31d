"""Exported from notebooks/04_neftune.ipynb: do not edit here.

Edit the notebook's `#| export` cells, then run `python -m course_utils.export`.
"""


"""NEFTune from scratch: noise on the input embeddings while fine-tuning (Jain et al. 2023).

Built step by step in notebooks/04_neftune.ipynb, where it is proved equal to
transformers' `neftune_post_forward_hook` (transformers/integrations/neftune.py).
The noise is Uniform(-1, 1) * alpha / sqrt(L * d) on the embedding output
[B, L, d], in training mode only, where L is the (padded) row length.
"""

import math
from contextlib import contextmanager

import torch
from torch import nn

from course_utils.errors import CourseError


def check_alpha(alpha) -> float:
    """alpha as a float; a CourseError unless it is a finite number >= 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise CourseError(f"NEFTune alpha={alpha!r} must be a finite number >= 0: the paper uses 5, 10 or 15 "
                          "(0 adds no noise). Pass e.g. neftune_hook(5).")
    return float(alpha)


def noise_scale(alpha: float, length: int, dim: int) -> torch.Tensor:
    """alpha / sqrt(L * d) as a float32 number, computed as transformers does (so the noise matches bit for bit)."""
    return alpha / torch.sqrt(torch.tensor(length * dim))


def neftune_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """Noise shaped like `embeddings` [B, L, d]: Uniform(-s, s) with s = alpha / sqrt(L * d), L = embeddings.size(1)."""
    if embeddings.dim() != 3:
        raise CourseError(f"NEFTune expects embeddings of shape [batch, length, hidden], got {tuple(embeddings.shape)}.")
    scale = noise_scale(alpha, embeddings.size(1), embeddings.size(2))
    return torch.zeros_like(embeddings).uniform_(-scale, scale)


def neftune_hook(alpha: float):
    """A forward hook for an embedding module: output + NEFTune noise in training mode, output unchanged in eval."""
    alpha = check_alpha(alpha)

    def hook(module, inputs, output):
        if not module.training:
            return output
        return output + neftune_noise(output, alpha)

    hook.neftune_alpha = alpha  # marks the hook as ours, and says its alpha
    return hook


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's input embedding module (transformers' get_input_embeddings(); PEFT models forward it)."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        raise CourseError(f"NEFTune needs a transformers model with get_input_embeddings(); {type(model).__name__} "
                          "has none. Pass the model itself (e.g. AutoModelForCausalLM), or call "
                          "module.register_forward_hook(neftune_hook(alpha)) on its embedding layer.")
    return get()


def _our_hook_ids(embeddings: nn.Module) -> list:
    return [key for key, hook in embeddings._forward_hooks.items() if hasattr(hook, "neftune_alpha")]


def neftune_alpha(model: nn.Module) -> float | None:
    """The alpha of the NEFTune hook on the model's embeddings (ours or transformers'), or None if there is none."""
    embeddings = input_embeddings(model)
    for hook in embeddings._forward_hooks.values():
        if hasattr(hook, "neftune_alpha"):
            return hook.neftune_alpha
    return getattr(embeddings, "neftune_noise_alpha", None)  # transformers' hook keeps alpha on the module


def attach_neftune(model: nn.Module, alpha: float):
    """Add the NEFTune hook to the model's input embeddings; returns the hook handle. Raises if one is attached."""
    alpha = check_alpha(alpha)
    embeddings = input_embeddings(model)
    current = neftune_alpha(model)
    if current is not None:
        raise CourseError(f"NEFTune (alpha={current:g}) is already attached to this model: a second hook would add "
                          "noise twice. Call detach_neftune(model) first (or, if a Trainer attached it, let "
                          "training finish).")
    return embeddings.register_forward_hook(neftune_hook(alpha))


def detach_neftune(model: nn.Module) -> float:
    """Remove our NEFTune hook from the model's input embeddings; returns its alpha. Raises if none is attached."""
    embeddings = input_embeddings(model)
    keys = _our_hook_ids(embeddings)
    if not keys:
        raise CourseError("NEFTune is not attached to this model, so there is nothing to detach. "
                          "attach_neftune(model, alpha) adds it.")
    alpha = embeddings._forward_hooks[keys[0]].neftune_alpha
    for key in keys:
        del embeddings._forward_hooks[key]
    return alpha


@contextmanager
def neftune(model: nn.Module, alpha: float):
    """`with neftune(model, 5): train(...)`: NEFTune inside the block, detached afterwards (even on an error)."""
    attach_neftune(model, alpha)
    try:
        yield model
    finally:
        detach_neftune(model)
