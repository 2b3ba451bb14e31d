"""One rank's bytes when training is spread over several devices: DDP, ZeRO-1/2/3 and FSDP, by the numbers.

`estimate_rank_memory(config, world_size=, strategy=, rank=, **options)` sizes one data-parallel rank: notebook 01's
`course_utils.memory.estimate_memory` for the rank's share of the batch, with the parts a strategy splits (optimizer
state and master copy, gradients, weights; see SHARDING) replaced by the rank's padded pieces, and DDP's bucket copy
of the gradients added (`RankBreakdown`). `communication_bytes` models the bytes a rank sends per step with ring
collectives. Built in section 1.4 of notebooks/10_scaling_out.ipynb, where both are checked against real DDP and
FSDP2 ranks.
"""

# Exported from notebooks/10_scaling_out.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/10_scaling_out.ipynb · 1.4 · The estimator, per rank
import math
from dataclasses import dataclass, fields, replace

import torch

from course_utils.errors import CourseError, check_positive
from course_utils.memory import (DTYPE_BYTES, FLOAT_BYTES, MemoryBreakdown, architecture, dtype_name, estimate_memory,
                                 lora_shapes, meta_model, nf4_bytes, optimizer_state_bytes,
                                 optimizer_step_temporaries)

SHARDING = {  # the parts each strategy splits over the ranks
    "none": (),                                                    # DDP
    "optimizer": ("optimizer", "master"),                          # ZeRO-1
    "gradients": ("optimizer", "master", "gradients"),             # ZeRO-2
    "full": ("optimizer", "master", "gradients", "weights"),       # ZeRO-3, FSDP full shard
}


@dataclass
class RankBreakdown(MemoryBreakdown):
    """One rank's bytes: MemoryBreakdown plus DDP's bucket buffers. DDP copies the gradients into flat buckets to
    all-reduce them and keeps the buckets from the first backward on (`gradient_as_bucket_view=False`, the default
    of torch's DDP and of accelerate): a second copy of the trainable gradients, held for good."""

    buckets: int = 0
    PARTS = MemoryBreakdown.PARTS + ("buckets",)

    @property
    def peak(self) -> int:
        return super().peak + self.buckets


def check_strategy(strategy: str) -> str:
    if strategy not in SHARDING:
        raise CourseError(f"strategy={strategy!r} is unknown; use one of {', '.join(SHARDING)} "
                          "(none = DDP, optimizer = ZeRO-1, gradients = ZeRO-2, full = ZeRO-3 / FSDP full shard).")
    return strategy


def shard_numel(shape, world_size: int, rank: int = 0, *, padded: bool = True) -> int:
    """Elements of a tensor of `shape` that rank `rank` holds when it is split on dim 0 as FSDP2 splits it:
    ceil(rows / W) rows a rank, the last ranks fewer (or none); padded, every rank stores the first rank's share."""
    rows, row = shape[0], math.prod(shape[1:])
    chunk = math.ceil(rows / world_size)
    held = chunk if padded else max(0, min(chunk, rows - rank * chunk))
    return held * row


# %% notebooks/10_scaling_out.ipynb · 1.4 · The estimator, per rank
_SHAPES = {}


def parameter_groups(config) -> list[tuple[tuple[int, ...], int]]:
    """(shape, all-gathers a step under FSDP full sharding) of each distinct parameter of `config`'s model (a tied
    head once), from the meta device. Grouped as accelerate's fsdp2_prepare_model groups it: the final norm and the
    head (and the embedding when tied to it) stay gathered from forward to backward, 1 gather; the rest 2."""
    key = config.to_json_string(use_diff=False)
    if key not in _SHAPES:
        model = meta_model(config)
        base = getattr(model, model.base_model_prefix)
        norms = [m for _, m in base.named_children() if "Norm" in type(m).__name__][-1:]  # accelerate's final norm
        tail = {id(p) for m in (*norms, model.get_output_embeddings()) if m is not None for p in m.parameters()}
        _SHAPES[key] = [(tuple(p.shape), 1 if id(p) in tail else 2) for p in model.parameters()]
    return _SHAPES[key]


def parameter_shapes(config) -> list[tuple[int, ...]]:
    """Shapes of the distinct parameters of `config`'s model (a tied head once)."""
    return [shape for shape, _ in parameter_groups(config)]


def quant_state_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes of a 4-bit tensor's quantisation state (absmax, nested absmax, code tables): bitsandbytes keeps them in
    `weight.quant_state`, an attribute, not a parameter, so FSDP never shards them: every rank holds all of them."""
    return nf4_bytes(numel, double_quant) - math.ceil(numel / 2)


def base_piece_bytes(config, world_size: int, rank: int, method: str, e: int, double_quant: bool = True,
                     gathers: int | None = None) -> int:
    """Bytes of one rank's padded pieces of the model's own weights (LoRA adapters not included); with `gathers`,
    only the groups gathered that many times a step. QLoRA's 4-bit linears (in the decoder layers, 2 gathers) are
    split as packed bytes, evenly (FSDP-QLoRA shards their flattened storage); their quantisation state is not a
    piece (see quant_state_bytes)."""
    pieces = e * sum(shard_numel(s, world_size, rank) for s, g in parameter_groups(config) if gathers in (None, g))
    if method == "qlora" and gathers in (None, 2):
        linear_numels = [o * i for o, i in architecture(config)[1].values()]
        pieces -= sum(n * e for n in linear_numels) // world_size
        pieces += sum(math.ceil(math.ceil(n / 2) / world_size) for n in linear_numels)
    return pieces


# %% notebooks/10_scaling_out.ipynb · 1.4 · The estimator, per rank
def _sharded_parts(config, world_size: int, rank: int, mixed: bool, options: dict) -> dict:
    """One rank's bytes of every part a strategy may split (optimizer, master, gradients, weights)."""
    method = options.get("method", "full")
    e = DTYPE_BYTES[dtype_name(options.get("dtype", torch.float32))]
    adapter_bytes = DTYPE_BYTES[dtype_name(options.get("adapter_dtype", torch.float32))]
    if method == "full":
        trainable, grad_bytes = parameter_shapes(config), e
    else:
        targets = options.get("lora_targets", ("q_proj", "v_proj"))
        trainable, grad_bytes = lora_shapes(architecture(config)[1], options.get("lora_rank", 8), targets), adapter_bytes

    def held(shape_list, padded=True):
        return [shard_numel(s, world_size, rank, padded=padded) for s in shape_list]

    state_bytes = FLOAT_BYTES if mixed else (e if method == "full" else adapter_bytes)
    optimizer = options.get("optimizer", "adamw")
    double_quant = options.get("double_quant", True)
    # Optimizer state is created like each local piece, without the padding; the master copy is the padded piece.
    parts = {"optimizer": optimizer_state_bytes(held(trainable, padded=False), optimizer, state_bytes),
             "master": FLOAT_BYTES * sum(held(trainable)) if mixed else 0,
             "gradients": grad_bytes * sum(held(trainable)),
             "weights": base_piece_bytes(config, world_size, rank, method, e, double_quant),
             "step_transient": optimizer_step_temporaries(held(trainable, padded=False), optimizer, state_bytes,
                                                          options.get("foreach", True))}
    if method != "full":
        parts["weights"] += adapter_bytes * sum(held(trainable))
    if method == "qlora":  # the quantisation state stays whole on every rank
        parts["weights"] += sum(quant_state_bytes(o * i, double_quant) for o, i in architecture(config)[1].values())
    return parts


# %% notebooks/10_scaling_out.ipynb · 1.4 · The estimator, per rank
def estimate_rank_memory(config, *, world_size: int, strategy: str = "none", rank: int = 0, batch_size: int = 1,
                         bucket_view: bool = False, **options) -> MemoryBreakdown:
    """Bytes of one training step on rank `rank` of `world_size` data-parallel ranks, `strategy` one of SHARDING.
    `batch_size` is the global batch, split evenly over the ranks; `options` go to estimate_memory unchanged. With
    world_size > 1 and strategy "none" (DDP), a RankBreakdown whose `buckets` are DDP's copy of the gradients
    (0 with `bucket_view=True`, DDP's gradient_as_bucket_view)."""
    check_strategy(strategy)
    check_positive("world_size", world_size)
    if batch_size % world_size:
        raise CourseError(f"batch_size={batch_size} does not split evenly over world_size={world_size} ranks; use a "
                          f"multiple of {world_size} (batch_size is the global batch; each rank gets batch_size / world_size).")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise CourseError(f"rank={rank!r} must be between 0 and world_size - 1 = {world_size - 1}.")
    out = estimate_memory(config, batch_size=batch_size // world_size, **options)  # one device's bytes, the rank's rows
    out.detail |= {"world_size": world_size, "strategy": strategy, "rank": rank}
    sharded = SHARDING[strategy]
    if world_size == 1:
        return out
    if not sharded:
        return RankBreakdown(**{f.name: getattr(out, f.name) for f in fields(out)},
                             buckets=0 if bucket_view else out.gradients)
    parts = _sharded_parts(config, world_size, rank, out.detail["mixed_precision"], options)
    out = replace(out, **{part: parts[part] for part in sharded}, detail=out.detail)
    if "optimizer" in sharded:
        out.step_transient = parts["step_transient"]
    return out


# %% notebooks/10_scaling_out.ipynb · 1.4 · The estimator, per rank
def communication_bytes(config, *, world_size: int, strategy: str = "none", method: str = "full", dtype=torch.float32,
                        lora_rank: int = 8, lora_targets=("q_proj", "v_proj"), adapter_dtype=torch.float32,
                        double_quant: bool = True) -> dict:
    """Bytes one rank sends per optimizer step with ring collectives, by collective (see the table in notebook 10).
    FSDP's pieces are padded; each all-gather and reduce-scatter sends (W - 1) of them. Under FSDP the tail group
    (final norm, head) is gathered once a step, every other group twice (accelerate's grouping)."""
    check_strategy(strategy)
    check_positive("world_size", world_size)
    w = world_size
    e = DTYPE_BYTES[dtype_name(dtype)]
    if method == "full":
        trainable, grad_bytes = parameter_shapes(config), e
    else:
        trainable = lora_shapes(architecture(config)[1], lora_rank, lora_targets)
        grad_bytes = DTYPE_BYTES[dtype_name(adapter_dtype)]
    grads = grad_bytes * sum(math.prod(s) for s in trainable)
    if strategy == "none":
        return {"all-reduce of the gradients": 2 * (w - 1) * grads / w}
    if strategy in ("optimizer", "gradients"):  # the updated trainable weights are as many bytes as their gradients
        return {"reduce-scatter of the gradients": (w - 1) * grads / w,
                "all-gather of the updated weights": (w - 1) * grads / w}
    twice = base_piece_bytes(config, w, 0, method, e, double_quant, gathers=2)  # decoder layers (and an untied embedding)
    once = base_piece_bytes(config, w, 0, method, e, double_quant, gathers=1)   # the tail
    if method != "full":
        twice += sum(shard_numel(s, w) for s in trainable) * grad_bytes  # the adapters live in the decoder layers
    return {"all-gather of the weights (forward and backward)": 2 * (w - 1) * twice,
            "all-gather of the tail (once)": (w - 1) * once,
            "reduce-scatter of the gradients": (w - 1) * grad_bytes * sum(shard_numel(s, w) for s in trainable)}
