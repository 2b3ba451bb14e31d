"""The memory estimator: the bytes of one fine-tuning step, from a transformers config alone.

`estimate_memory(config, method=, dtype=, optimizer=, batch_size=, seq_len=, ...)` returns a `MemoryBreakdown`:
weights (LoRA adapters and QLoRA's 4-bit storage included), gradients, optimizer state, the fp32 master copy and the
saved activations, plus the short-lived bytes that set the allocator's `peak`; `estimate_inference` gives weights and
the KV cache. Parameters are counted on the meta device (no download, no RAM). Built in
notebooks/01_memory_estimation.ipynb, where every field is proven against a real training step.
Related modules: `course_utils.activations` (what a Llama layer saves for backward), `course_utils.measurement`
(the same fields read off real tensors) and `course_utils.sharding` (one rank's share under DDP, ZeRO and FSDP).
"""

# Exported from notebooks/01_memory_estimation.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/01_memory_estimation.ipynb · 1 · Build it
import math
from dataclasses import dataclass, field

import torch

from course_utils.errors import CourseError, check_positive

FLOAT_BYTES = 4  # fp32: softmax, RMSNorm statistics, log-softmax and optimizer state in mixed precision
INDEX_BYTES = 8  # int64 token ids saved by the embedding and the loss
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_NAMES = {
    torch.float32: "fp32", "fp32": "fp32", "float32": "fp32",
    torch.bfloat16: "bf16", "bf16": "bf16", "bfloat16": "bf16",
    torch.float16: "fp16", "fp16": "fp16", "float16": "fp16",
}
METHODS = ("full", "lora", "qlora")
ATTENTIONS = ("eager", "sdpa")


def dtype_name(dtype) -> str:
    """'fp32', 'bf16' or 'fp16' for a torch dtype or its usual spellings."""
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        raise CourseError(f"dtype={dtype!r} is not supported; use torch.float32, torch.bfloat16 or torch.float16 (or 'fp32', 'bf16', 'fp16').") from None


# %% notebooks/01_memory_estimation.ipynb · 1 · Build it
@dataclass
class MemoryBreakdown:
    """Bytes per part of a training (or inference) step; `total` is their sum."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    master: int = 0  # fp32 copy of the trainable weights in mixed precision
    activations: int = 0  # tensors saved for backward (training) at the end of the forward pass
    kv_cache: int = 0  # inference only
    backward_transient: int = 0  # short-lived, not in `total`: the logits' gradients, a recomputed layer
    step_transient: int = 0  # short-lived, not in `total`: the optimizer step's temporaries
    detail: dict = field(default_factory=dict, compare=False, repr=False)

    PARTS = ("weights", "gradients", "optimizer", "master", "activations", "kv_cache")

    @property
    def total(self) -> int:
        """Every part held at once: the usual sum (which is not the peak, see `peak`)."""
        return sum(getattr(self, part) for part in self.PARTS)

    @property
    def peak(self) -> int:
        """Allocator peak of a steady-state step (gradients set to None after each step): at the start of
        backward (activations + logits' gradients) or in the optimizer step (all gradients + temporaries),
        on top of what always lives."""
        always = self.weights + self.master + self.optimizer + self.kv_cache
        return always + max(self.activations + self.backward_transient, self.gradients + self.step_transient)

    def as_dict(self) -> dict:
        return {part: getattr(self, part) for part in self.PARTS} | {"total": self.total}

    def gb(self) -> dict:
        """The same numbers in decimal gigabytes (1e9 bytes), as GPU data sheets count."""
        return {k: v / 1e9 for k, v in self.as_dict().items()}


# %% notebooks/01_memory_estimation.ipynb · 1.1 · Parameters from the config alone: the meta device
def meta_model(config):
    """The model for `config` on the meta device: shapes without storage (no download, no RAM)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def text_config(config):
    """The language-model part of a config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_linears(model) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} for the nn.Linear layers inside the decoder blocks."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            found[name] = (module.out_features, module.in_features)
    return found


_ARCHITECTURES: dict[str, tuple[list[int], dict]] = {}


def architecture(config) -> tuple[list[int], dict]:
    """(sizes of the distinct parameters, decoder linears) of `config`'s model, built once per config."""
    key = config.to_json_string(use_diff=False)
    if key not in _ARCHITECTURES:
        model = meta_model(config)
        _ARCHITECTURES[key] = ([p.numel() for p in model.parameters()], decoder_linears(model))
    return _ARCHITECTURES[key]


# %% notebooks/01_memory_estimation.ipynb · 1.2 · LoRA and QLoRA: what is trainable, what is stored
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_shapes(linears: dict, rank: int, targets) -> list[tuple[int, int]]:
    """Shapes of the LoRA matrices A (r x in) and B (out x r) for every linear whose last name is in `targets`."""
    if isinstance(targets, str):
        targets = [targets]
    check_positive("lora_rank", rank)
    available = sorted({name.rsplit(".", 1)[-1] for name in linears})
    unknown = [t for t in targets if t not in available]
    if not targets or unknown:
        raise CourseError(f"LoRA target(s) {unknown or targets!r} are not linear layers of this model; choose among {available}.")
    shapes = []
    for name, (d_out, d_in) in linears.items():
        if name.rsplit(".", 1)[-1] in targets:
            if rank > min(d_in, d_out):
                raise CourseError(f"lora_rank={rank} is larger than {name} ({d_out} x {d_in}) allows; use a rank <= {min(d_in, d_out)}.")
            shapes += [(rank, d_in), (d_out, rank)]
    return shapes


def nf4_bytes(numel: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes bitsandbytes keeps for one 4-bit tensor: packed codes, absmax constants and code tables."""
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + FLOAT_BYTES * blocks + FLOAT_BYTES * 16
    return packed + blocks + FLOAT_BYTES * math.ceil(blocks / 256) + FLOAT_BYTES + FLOAT_BYTES * (256 + 16)


# %% notebooks/01_memory_estimation.ipynb · 1.3 · Optimizer state
OPTIMIZERS = ("sgd", "sgd_momentum", "adam", "adamw", "adam8bit", "adamw8bit")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' state in 32 bits
BNB_BLOCK = 256


def check_optimizer(optimizer: str) -> str:
    name = str(optimizer).lower().replace("-", "").replace("_", "") if optimizer else ""
    aliases = {"sgd": "sgd", "sgdmomentum": "sgd_momentum", "adam": "adam", "adamw": "adamw", "adam8bit": "adam8bit", "adamw8bit": "adamw8bit", "pagedadamw8bit": "adamw8bit"}
    if name not in aliases:
        raise CourseError(f"optimizer={optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}.")
    return aliases[name]


def optimizer_state_bytes(numels, optimizer: str, state_bytes: int) -> int:
    """Optimizer-state bytes for trainable tensors of the given sizes."""
    optimizer = check_optimizer(optimizer)
    total = 0
    if optimizer.endswith("8bit") and any(n >= BNB_MIN_8BIT_SIZE for n in numels):
        total += 2 * FLOAT_BYTES * 256  # the two 256-entry quantization maps, shared by all tensors
    for n in numels:
        if optimizer == "sgd":
            continue
        if optimizer == "sgd_momentum":
            total += n * state_bytes
        elif optimizer in ("adam", "adamw"):
            total += 2 * n * state_bytes + FLOAT_BYTES  # exp_avg, exp_avg_sq, step
        elif n >= BNB_MIN_8BIT_SIZE:  # 8-bit: uint8 states, fp32 absmax per block, two quantization maps
            total += 2 * n + 2 * FLOAT_BYTES * math.ceil(n / BNB_BLOCK)
        else:
            total += 2 * n * FLOAT_BYTES
    return total


def optimizer_step_temporaries(numels, optimizer: str, state_bytes: int, foreach: bool) -> int:
    """Temporaries of one Adam step: sqrt(v) for every tensor at once (foreach, CUDA's default) or, one tensor
    at a time (CPU's default), sqrt(v) and sqrt(v)/c of the largest tensor. SGD and 8-bit Adam work in place."""
    if check_optimizer(optimizer) not in ("adam", "adamw") or not numels:
        return 0
    return state_bytes * (sum(numels) if foreach else 2 * max(numels))


# %% notebooks/01_memory_estimation.ipynb · 1.5 · The estimator
def estimate_memory(config, *, method: str = "full", dtype=torch.float32, optimizer: str = "adamw", batch_size: int = 1,
                    seq_len: int = 512, lora_rank: int = 8, lora_targets=("q_proj", "v_proj"), gradient_checkpointing: bool = False,
                    attention: str | None = None, mixed_precision: bool | None = None, double_quant: bool = True,
                    adapter_dtype=torch.float32, foreach: bool = True) -> MemoryBreakdown:
    """Bytes of one training step of a causal LM, from its config alone (see the notebook for every formula)."""
    from course_utils.activations import Shape, Training, activation_bytes  # section 1.4 (it imports this module's sizes)

    e, optimizer, attention = check_arguments(config, method, dtype, optimizer, batch_size, seq_len, attention)  # CourseError if wrong
    mixed = (e != FLOAT_BYTES) if mixed_precision is None else (mixed_precision and e != FLOAT_BYTES)
    numels, linears = architecture(config)
    n_total = sum(numels)
    out = MemoryBreakdown()
    if method == "full":
        trainable = list(numels)
        out.weights = n_total * e
        grad_bytes = e
        out.master = FLOAT_BYTES * n_total if mixed else 0
        targets = frozenset()
        adapter_bytes = e
    else:
        targets = frozenset([lora_targets] if isinstance(lora_targets, str) else lora_targets)
        shapes = lora_shapes(linears, lora_rank, tuple(targets))
        trainable = [r * c for r, c in shapes]
        adapter_bytes = DTYPE_BYTES[dtype_name(adapter_dtype)]  # peft's default: fp32 even on a 16-bit base
        grad_bytes = adapter_bytes
        if method == "qlora":
            linear_numels = [o * i for o, i in linears.values()]
            out.weights = (n_total - sum(linear_numels)) * e + sum(nf4_bytes(n, double_quant) for n in linear_numels)
        else:
            out.weights = n_total * e
        out.weights += sum(trainable) * adapter_bytes
    out.gradients = sum(trainable) * grad_bytes
    state_bytes = FLOAT_BYTES if mixed else (e if method == "full" else adapter_bytes)
    out.optimizer = optimizer_state_bytes(trainable, optimizer, state_bytes)
    out.step_transient = optimizer_step_temporaries(trainable, optimizer, state_bytes, foreach)
    tr = Training(full=method == "full", lora=targets, rank=lora_rank, e=e, adapter_bytes=adapter_bytes, attention=attention)
    parts = activation_bytes(Shape.of(config, batch_size, seq_len), tr, gradient_checkpointing)
    out.activations = sum(v for k, v in parts.items() if k != "recompute_one_layer")
    sh = Shape.of(config, batch_size, seq_len)
    logit_grads = 2 * FLOAT_BYTES * sh.t * sh.vocab  # d(loss)/d(log-probs) and d(loss)/d(logits), both fp32
    out.backward_transient = max(logit_grads, parts["recompute_one_layer"])
    out.detail = {"parameters": n_total, "trainable": sum(trainable), "activation_parts": parts, "attention": attention, "mixed_precision": mixed}
    return out


def estimate_inference(config, *, dtype=torch.float16, batch_size: int = 1, seq_len: int = 4096) -> MemoryBreakdown:
    """Weights plus the KV cache: 2 (K and V) x layers x batch x length x kv_heads x head_dim x bytes."""
    from course_utils.activations import Shape

    e = DTYPE_BYTES[dtype_name(dtype)]
    check_positive("batch_size", batch_size)
    check_positive("seq_len", seq_len)
    sh = Shape.of(config, batch_size, seq_len)
    n_total = sum(architecture(config)[0])
    kv = 2 * sh.layers * sh.t * sh.kv_heads * sh.head_dim * e
    return MemoryBreakdown(weights=n_total * e, kv_cache=kv, detail={"parameters": n_total})


# %% notebooks/01_memory_estimation.ipynb · 1.5 · The estimator
def check_arguments(config, method, dtype, optimizer, batch_size, seq_len, attention) -> tuple[int, str, str]:
    """(compute dtype bytes, optimizer name, attention kernel) for estimate_memory, or a CourseError saying what to fix."""
    if method not in METHODS:
        raise CourseError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    e = DTYPE_BYTES[dtype_name(dtype)]
    optimizer = check_optimizer(optimizer)
    check_positive("batch_size", batch_size)
    check_positive("seq_len", seq_len)
    attention = attention or getattr(text_config(config), "_attn_implementation", None) or "sdpa"
    if attention not in ATTENTIONS:
        raise CourseError(f"attention={attention!r} is not modelled; use 'eager' or 'sdpa'.")
    if method == "qlora" and e == FLOAT_BYTES:
        raise CourseError("QLoRA computes in 16 bits: pass dtype=torch.bfloat16 (or float16) with method='qlora'.")
    return e, optimizer, attention


# %% notebooks/01_memory_estimation.ipynb · 4 · On the real model, and on 7B to 70B
# Values from the published config.json of each model on the Hugging Face Hub
# (meta-llama/Llama-2-7b-hf, -13b-hf, -70b-hf; mistralai/Mistral-7B-v0.1; huggyllama/llama-65b for QLoRA's 65B).
# Exported: notebook 10 sizes the same models over several GPUs.
from transformers import LlamaConfig, MistralConfig

LLAMA_COMMON = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu")
BIG = {
    "Llama-2-7B": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, **LLAMA_COMMON),
    "Llama-2-13B": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, **LLAMA_COMMON),
    "Llama-2-70B": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, **LLAMA_COMMON),
    "Mistral-7B": MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False),
}
LLAMA_65B = LlamaConfig(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64,
                        **(LLAMA_COMMON | {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6}))
# Parameter counts as printed on the model cards / by transformers for these checkpoints: a check of the configs above.
PUBLISHED_PARAMS = {"Llama-2-7B": 6_738_415_616, "Llama-2-13B": 13_015_864_320, "Llama-2-70B": 68_976_648_192, "Mistral-7B": 7_241_732_096}
