"""Model merging: task vectors, task arithmetic, TIES, DARE and SLERP, per tensor and for whole models.

Built step by step in notebooks/06_task_arithmetic.ipynb (task vectors, task arithmetic,
`merge_models`) and notebooks/07_ties_dare.ipynb (magnitude pruning, TIES, DARE, SLERP),
where each per-tensor function is proved equal to `peft.utils.merge_utils` and to
mergekit where their definitions agree.

    vectors = [task_vector(base, expert) for expert in experts]      # {name: finetuned - base}
    merged = apply_task_vectors(base, vectors, weights=[0.8, 0.8])  # base + sum_i w_i tau_i
    merged = merge_models(base, experts, "ties", density=0.2, lam=1.0)
"""

# Exported from notebooks/06_task_arithmetic.ipynb and notebooks/07_ties_dare.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/06_task_arithmetic.ipynb · 1.1 · Task vectors
import copy

import torch

from course_utils.errors import CourseError


def _state_dict(model_or_state: dict | torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict from a model or a state dict, each tensor stored once.

    Tied weights (the lab model's and SmolLM2's embedding and output head share one
    tensor) appear under two names in `state_dict()`; they are one parameter, so they
    count once: the first name wins.
    """
    if isinstance(model_or_state, torch.nn.Module):
        state = model_or_state.state_dict(keep_vars=False)
    elif isinstance(model_or_state, dict):
        state = model_or_state
    else:
        raise CourseError(f"Expected a model or a state dict, not {type(model_or_state).__name__}.")
    unique, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor
    return unique


# %% notebooks/06_task_arithmetic.ipynb · 1.1 · Task vectors
def _check_same_layout(reference: dict, other: dict, what: str) -> None:
    """Merging adds tensors by name: both sides need the same names and shapes."""
    missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
    if missing or extra:
        raise CourseError(f"{what} has different tensors from the base: missing {missing[:3]}, extra {extra[:3]} "
                          "(and maybe more). Merge models of one architecture, fine-tuned from the same base.")
    for name, tensor in reference.items():
        if other[name].shape != tensor.shape:
            raise CourseError(f"{what}: {name} has shape {tuple(other[name].shape)}, the base "
                              f"{tuple(tensor.shape)}. Merge models of one architecture.")


def task_vector(base, finetuned) -> dict[str, torch.Tensor]:
    """tau = theta_finetuned - theta_base, for every floating-point tensor (a model or a state dict each).

    Integer buffers (position ids, counters) are not weights and are skipped; a tied
    tensor counts once. Computed in float32 at least (a bfloat16 difference of two
    close weights loses most of its digits).
    """
    base_state, tuned_state = _state_dict(base), _state_dict(finetuned)
    base_float = {name: t for name, t in base_state.items() if t.is_floating_point()}
    tuned_float = {name: t for name, t in tuned_state.items() if name in base_float or t.is_floating_point()}
    _check_same_layout(base_float, tuned_float, "The fine-tuned model")
    work = lambda t: t.detach().to(torch.promote_types(t.dtype, torch.float32))  # noqa: E731
    return {name: work(tuned_float[name]) - work(b) for name, b in base_float.items()}


# %% notebooks/06_task_arithmetic.ipynb · 1.1 · Task vectors
def _check_weights(weights, n: int) -> list[float]:
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise CourseError(f"Got {len(weights)} weights for {n} task vectors or models: give one weight each.")
    return weights


def apply_task_vectors(base, vectors: list[dict], weights=None):
    """base + sum_i weights[i] * vectors[i], as a new model (if `base` is a model) or a new state dict.

    `base` itself is never changed. Tensors the vectors do not name (integer buffers)
    are copied from the base.
    """
    if not vectors:
        raise CourseError("apply_task_vectors got no task vectors.")
    weights = _check_weights(weights, len(vectors))
    base_state = _state_dict(base)
    for i, vector in enumerate(vectors):
        floats = {name: t for name, t in base_state.items() if t.is_floating_point()}
        _check_same_layout(floats, vector, f"Task vector {i}")
    merged = {}
    for name, tensor in base_state.items():
        if not tensor.is_floating_point():
            merged[name] = tensor.clone()
            continue
        total = sum(w * v[name] for w, v in zip(weights, vectors))
        merged[name] = (tensor.detach().to(total.dtype) + total).to(tensor.dtype)
    return _as_base_type(base, merged)


def _as_base_type(base, merged_state: dict):
    """A deep copy of the base model holding `merged_state`, or the state dict itself."""
    if isinstance(base, torch.nn.Module):
        model = copy.deepcopy(base)
        model.load_state_dict(merged_state, strict=False)  # tied names absent from merged_state stay tied
        return model
    return merged_state


# %% notebooks/06_task_arithmetic.ipynb · 1.4 · Per tensor, and whole models
def _stack(task_tensors) -> torch.Tensor:
    if isinstance(task_tensors, torch.Tensor):
        return task_tensors
    if not task_tensors:
        raise CourseError("No task tensors to merge.")
    shapes = {tuple(t.shape) for t in task_tensors}
    if len(shapes) != 1:
        raise CourseError(f"The task tensors have different shapes {sorted(shapes)}: merge one tensor name at a time.")
    return torch.stack(list(task_tensors), dim=0)


def _weights_like(weights, stacked: torch.Tensor) -> torch.Tensor:
    """Weights [n] reshaped to [n, 1, 1, ...] so that they scale each task's tensor."""
    weights = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if weights.shape != stacked.shape[:1]:
        raise CourseError(f"Got {weights.numel()} weights for {stacked.shape[0]} task tensors: give one weight each.")
    return weights.view(-1, *([1] * (stacked.dim() - 1)))


def task_arithmetic(task_tensors, weights) -> torch.Tensor:
    """sum_i weights[i] * task_tensors[i]: the task arithmetic merge of one tensor (Ilharco et al. 2023)."""
    stacked = _stack(task_tensors)
    return (stacked * _weights_like(weights, stacked)).sum(dim=0)


# %% notebooks/06_task_arithmetic.ipynb · 1.4 · Per tensor, and whole models
# The per-tensor merge functions by name; 07_ties_dare adds TIES, DARE and the rest.
MERGE_METHODS = {"task_arithmetic": task_arithmetic}


def merge_models(base, finetuned_models, method: str = "task_arithmetic", *, weights=None, lam: float = 1.0,
                 **params):
    """Merge fine-tuned copies of `base` tensor by tensor: base + lam * method(task vectors, weights, **params).

    method: a name in MERGE_METHODS ("task_arithmetic", and after notebook 07 "ties",
    "dare_linear", "dare_ties", "magnitude_prune"); params are the method's own
    (density, majority_sign_method). `lam` scales the merged vector after merging, as
    mergekit's `lambda` does, so that a method that averages (TIES) can still be scaled.
    Returns a new model or state dict, like `base`; `base` is not changed.
    """
    if method not in MERGE_METHODS:
        raise CourseError(f"Unknown merge method {method!r}; the methods are {', '.join(MERGE_METHODS)}.")
    finetuned_models = list(finetuned_models)
    if not finetuned_models:
        raise CourseError("merge_models got no fine-tuned models.")
    weights = _check_weights(weights, len(finetuned_models))
    vectors = [task_vector(base, model) for model in finetuned_models]
    merge = MERGE_METHODS[method]
    merged_vector = {name: merge([v[name] for v in vectors], torch.tensor(weights), **params)
                     for name in vectors[0]}
    return apply_task_vectors(base, [merged_vector], weights=[lam])


# %% notebooks/07_ties_dare.ipynb · 1.1 · TIES in three steps
def _check_density(density) -> float:
    if not 0 < float(density) <= 1:
        raise CourseError(f"density={density!r} is the fraction of each task tensor kept: it must be in (0, 1] "
                          "(1 keeps everything; TIES' paper uses 0.2, DARE 0.1 or less).")
    return float(density)


def trim_by_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest (per tensor, as PEFT
    and mergekit do; the original TIES code ranks over the whole flattened model instead)."""
    density = _check_density(density)
    if density == 1:
        return tensor
    k = int(density * tensor.numel())
    keep = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    keep[tensor.abs().reshape(-1).topk(k).indices] = 1
    return tensor * keep.view_as(tensor)


def elect_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """The mask of entries that agree with the elected sign, per position across the tasks.

    "total": the sign of the summed values (the mass: TIES' rule); "frequency": the sign
    most tasks have (a head count). A tie elects +.
    """
    if method == "total":
        score = stacked.sum(dim=0)
    elif method == "frequency":
        score = stacked.sign().sum(dim=0)
    else:
        raise CourseError(f"Unknown majority_sign_method {method!r}: use 'total' or 'frequency'.")
    elected = torch.where(score >= 0, 1, -1)
    return stacked.sign() == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Per position, the sum of the agreeing entries divided by how many agree (at least 1)."""
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def magnitude_prune(task_tensors, weights, density: float) -> torch.Tensor:
    """Trim each task tensor to its top `density` share by magnitude, then the weighted sum."""
    trimmed = _stack([trim_by_magnitude(t, density) for t in task_tensors])
    return (trimmed * _weights_like(weights, trimmed)).sum(dim=0)


def ties(task_tensors, weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023) of one tensor: trim, elect the sign, disjoint mean.

    As PEFT does: the sign is elected on the unweighted trimmed tensors, and the mean
    divides by the count of agreeing tasks.
    """
    trimmed = _stack([trim_by_magnitude(t, density) for t in task_tensors])
    agree = elect_sign(trimmed, majority_sign_method)
    return disjoint_mean(trimmed * _weights_like(weights, trimmed), agree)


# %% notebooks/07_ties_dare.ipynb · 1.2 · DARE: drop and rescale
def drop_and_rescale(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE (Yu et al. 2023): keep each entry with probability `density`, divide the survivors by it.

    The expectation is the tensor itself. Draws from torch's global RNG with
    torch.bernoulli, as PEFT does, so the same RNG state gives the same mask.
    """
    density = _check_density(density)
    if density == 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * keep / density


def dare_linear(task_tensors, weights, density: float) -> torch.Tensor:
    """DARE each task tensor, then the weighted sum."""
    dropped = _stack([drop_and_rescale(t, density) for t in task_tensors])
    return (dropped * _weights_like(weights, dropped)).sum(dim=0)


def dare_ties(task_tensors, weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    """DARE each task tensor, then TIES' sign election and disjoint mean."""
    dropped = _stack([drop_and_rescale(t, density) for t in task_tensors])
    agree = elect_sign(dropped, majority_sign_method)
    return disjoint_mean(dropped * _weights_like(weights, dropped), agree)


MERGE_METHODS.update(magnitude_prune=magnitude_prune, ties=ties, dare_linear=dare_linear, dare_ties=dare_ties)


# %% notebooks/07_ties_dare.ipynb · 1.3 · SLERP: along the circle, not the chord
def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical linear interpolation between two tensors, treated each as one flat vector.

    The angle comes from normalised copies; the result interpolates the tensors
    themselves: sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1. When the
    vectors are nearly parallel (|cos theta| > dot_threshold) sin(theta) is tiny and the
    formula unstable, so it falls back to (1-t) v0 + t v1. Computed in float32 at least.
    """
    t = float(t)
    if not 0 <= t <= 1:
        raise CourseError(f"t={t!r} must be in [0, 1]: 0 gives v0, 1 gives v1.")
    if v0.shape != v1.shape:
        raise CourseError(f"slerp needs two tensors of one shape, got {tuple(v0.shape)} and {tuple(v1.shape)}.")
    dtype = torch.promote_types(v0.dtype, torch.float32)
    a, b = v0.to(dtype).reshape(-1), v1.to(dtype).reshape(-1)
    eps = 1e-8
    cos = torch.dot(a / a.norm().clamp(min=eps), b / b.norm().clamp(min=eps)).clamp(-1, 1)
    if cos.abs() > dot_threshold:
        merged = (1 - t) * a + t * b
    else:
        theta = torch.arccos(cos)
        merged = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return merged.reshape(v0.shape).to(v0.dtype)


def slerp_models(model0, model1, t: float, *, dot_threshold: float = 0.9995):
    """SLERP of two whole models, tensor by tensor (a new model or state dict, like model0)."""
    state0, state1 = _state_dict(model0), _state_dict(model1)
    _check_same_layout(state0, state1, "The second model")
    merged = {name: slerp(t, a, state1[name], dot_threshold) if a.is_floating_point() else a.clone()
              for name, a in state0.items()}
    return _as_base_type(model0, merged)
