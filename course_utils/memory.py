"""Memory estimation: the bytes fine-tuning needs (weights, gradients, optimizer state, activations), from a config alone.

Built in notebooks/01_memory_estimation.ipynb, where each field is measured on a real training step and compared with
the estimate; notebook 10 adds the per-rank breakdown when training is spread over several devices.
"""

# Exported from notebooks/01_memory_estimation.ipynb and notebooks/10_scaling_out.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/01_memory_estimation.ipynb · 1 · Build it
import math
from dataclasses import dataclass, field

import torch

from course_utils.errors import CourseError

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
def lora_shapes(linears: dict, rank: int, targets) -> list[tuple[int, int]]:
    """Shapes of the LoRA matrices A (r x in) and B (out x r) for every linear whose last name is in `targets`."""
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CourseError(f"lora_rank={rank!r} must be a whole number >= 1.")
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


# %% notebooks/01_memory_estimation.ipynb · 1.4 · Activations: what one Llama layer saves for backward
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """Sizes the activation formula needs: tokens (b, s) and the architecture."""

    b: int
    s: int
    h: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    layers: int

    @property
    def t(self) -> int:
        return self.b * self.s

    @classmethod
    def of(cls, config, batch_size: int, seq_len: int) -> "Shape":
        c = text_config(config)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(batch_size, seq_len, c.hidden_size, c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads,
                   head_dim, c.intermediate_size, c.vocab_size, c.num_hidden_layers)


@dataclass(frozen=True)
class Training:
    """What is trained and how: drives which tensors require grad."""

    full: bool  # every weight trainable
    lora: frozenset  # linear names with an adapter
    rank: int
    e: int  # compute dtype bytes
    adapter_bytes: int  # LoRA matrices' dtype (fp32 when the base is 16-bit: peft's default)
    attention: str


# %% notebooks/01_memory_estimation.ipynb · 1.4 · Activations: what one Llama layer saves for backward
def rmsnorm_saved(sh: Shape, tr: Training, x_grad: bool) -> tuple[int, bool]:
    """(bytes, output requires grad) for RMSNorm: fp32 input and 1/rms if x needs grad, normed input if the weight trains."""
    saved = (FLOAT_BYTES * sh.t * sh.h + FLOAT_BYTES * sh.t) if x_grad else 0
    if tr.full:
        saved += tr.e * sh.t * sh.h
    return saved, x_grad or tr.full


def linear_inputs_saved(names, width: int, sh: Shape, tr: Training, already_saved: bool = False) -> int:
    """Bytes saved for the shared input of `names` (t x width), plus each LoRA adapter's A output (t x r).

    A trained weight needs its input for its gradient; a LoRA adapter's A needs it too. In the same dtype they
    share one storage; when adapters are fp32 and the base 16-bit, peft casts the input: one fp32 copy per adapter.
    """
    lora = [n for n in names if n in tr.lora]
    shared = tr.full or (lora and tr.adapter_bytes == tr.e)
    saved = 0 if already_saved or not shared else tr.e * sh.t * width
    if tr.adapter_bytes != tr.e:
        saved += len(lora) * tr.adapter_bytes * sh.t * width
    return saved + len(lora) * tr.adapter_bytes * sh.t * tr.rank


def attention_saved(sh: Shape, tr: Training, q_grad: bool, k_grad: bool, v_grad: bool) -> tuple[int, bool]:
    """(bytes, output requires grad) for the attention core, eager or SDPA."""
    qd, t, e = sh.heads * sh.head_dim, sh.t, tr.e
    if tr.attention == "sdpa":
        if not (q_grad or k_grad or v_grad):
            return 0, False
        # q, output (same storage as o_proj's input), k and v with kv heads, fp32 log-sum-exp
        return 2 * e * t * qd + 2 * e * t * sh.kv_heads * sh.head_dim + FLOAT_BYTES * sh.b * sh.heads * sh.s, True
    scores = sh.b * sh.heads * sh.s * sh.s
    scores_grad = q_grad or k_grad
    saved = (e * t * qd if q_grad else 0) + (e * t * qd if k_grad else 0)  # K (repeated) for dQ, Q for dK
    if scores_grad:
        saved += FLOAT_BYTES * scores + e * t * qd  # fp32 softmax output, V (repeated) for dP
    if v_grad and (e != FLOAT_BYTES or not scores_grad):
        saved += e * scores  # 16-bit copy of the probabilities for dV
    saved += e * t * qd if ("o_proj" in tr.lora or tr.full) else 0  # the contiguous output feeds o_proj
    return saved, scores_grad or v_grad


def layer_saved(sh: Shape, tr: Training, x_grad: bool) -> tuple[int, bool]:
    """(bytes one decoder layer saves for backward, its output requires grad)."""
    trains = lambda name: tr.full or name in tr.lora  # noqa: E731  (output needs grad even if input does not)
    total, n1_grad = rmsnorm_saved(sh, tr, x_grad)
    total += linear_inputs_saved(("q_proj", "k_proj", "v_proj"), sh.h, sh, tr)
    q, k, v = (n1_grad or trains(n) for n in ("q_proj", "k_proj", "v_proj"))
    attn, attn_grad = attention_saved(sh, tr, q, k, v)
    qd = sh.heads * sh.head_dim
    total += attn + linear_inputs_saved(("o_proj",), qd, sh, tr, already_saved=True)  # shared storage counted above
    x2_grad = x_grad or attn_grad or trains("o_proj")
    norm2, n2_grad = rmsnorm_saved(sh, tr, x2_grad)
    total += norm2 + linear_inputs_saved(("gate_proj", "up_proj"), sh.h, sh, tr)
    g, u = (n2_grad or trains(n) for n in ("gate_proj", "up_proj"))
    mlp = tr.e * sh.t * sh.inter
    total += (2 * mlp if g else 0) + (mlp if u else 0)  # gate out (SiLU), up out (for d silu), silu out (for d up)
    total += linear_inputs_saved(("down_proj",), sh.inter, sh, tr)
    return total, x2_grad or g or u or trains("down_proj")


# %% notebooks/01_memory_estimation.ipynb · 1.4 · Activations: what one Llama layer saves for backward
def activation_bytes(sh: Shape, tr: Training, gradient_checkpointing: bool = False) -> dict:
    """Bytes saved for backward by a causal-LM forward pass with labels, by part."""
    parts = {"embedding_ids": INDEX_BYTES * sh.t if tr.full else 0}
    x_grad = tr.full or gradient_checkpointing  # transformers makes the embedding output require grad when checkpointing
    one_layer, _ = layer_saved(sh, tr, True)
    if gradient_checkpointing:
        parts["layers"] = sh.layers * tr.e * sh.t * sh.h  # each layer keeps only its input
        parts["rope"] = 0
        x_grad = True
    else:
        layers = 0
        for _ in range(sh.layers):
            saved, x_grad = layer_saved(sh, tr, x_grad)
            layers += saved
        parts["layers"] = layers
        parts["rope"] = 2 * sh.s * sh.head_dim * tr.e
    norm, _ = rmsnorm_saved(sh, tr, x_grad)
    parts["final_norm"] = norm + (tr.e * sh.t * sh.h if tr.full else 0)  # lm_head's input when the head trains
    targets = INDEX_BYTES * (sh.t + 1 if sh.b == 1 else sh.t)  # b=1: the shifted labels are a view of the padded ones
    parts["logits"] = FLOAT_BYTES * sh.t * sh.vocab + targets + FLOAT_BYTES  # fp32 log-softmax, targets, weight total
    parts["recompute_one_layer"] = one_layer if gradient_checkpointing else 0  # transient, in backward
    return parts


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, recompute: bool = False) -> int:
    """Korthikanti et al. (2022): a GPT layer in 16-bit, s*b*h*(34 + 5*a*s/h) bytes; 2*s*b*h with full recomputation."""
    return 2 * s * b * h if recompute else round(s * b * h * (34 + 5 * a * s / h))


# %% notebooks/01_memory_estimation.ipynb · 1.5 · The estimator
def estimate_memory(config, *, method: str = "full", dtype=torch.float32, optimizer: str = "adamw", batch_size: int = 1,
                    seq_len: int = 512, lora_rank: int = 8, lora_targets=("q_proj", "v_proj"), gradient_checkpointing: bool = False,
                    attention: str | None = None, mixed_precision: bool | None = None, double_quant: bool = True,
                    adapter_dtype=torch.float32, foreach: bool = True) -> MemoryBreakdown:
    """Bytes of one training step of a causal LM, from its config alone (see the notebook for every formula)."""
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
    e = DTYPE_BYTES[dtype_name(dtype)]
    _positive("batch_size", batch_size)
    _positive("seq_len", seq_len)
    sh = Shape.of(config, batch_size, seq_len)
    n_total = sum(architecture(config)[0])
    kv = 2 * sh.layers * sh.t * sh.kv_heads * sh.head_dim * e
    return MemoryBreakdown(weights=n_total * e, kv_cache=kv, detail={"parameters": n_total})


# %% notebooks/01_memory_estimation.ipynb · 1.5 · The estimator
def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CourseError(f"{name}={value!r} must be a whole number >= 1.")
    return value


def check_arguments(config, method, dtype, optimizer, batch_size, seq_len, attention) -> tuple[int, str, str]:
    """(compute dtype bytes, optimizer name, attention kernel) for estimate_memory, or a CourseError saying what to fix."""
    if method not in METHODS:
        raise CourseError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    e = DTYPE_BYTES[dtype_name(dtype)]
    optimizer = check_optimizer(optimizer)
    _positive("batch_size", batch_size)
    _positive("seq_len", seq_len)
    attention = attention or getattr(text_config(config), "_attn_implementation", None) or "sdpa"
    if attention not in ATTENTIONS:
        raise CourseError(f"attention={attention!r} is not modelled; use 'eager' or 'sdpa'.")
    if method == "qlora" and e == FLOAT_BYTES:
        raise CourseError("QLoRA computes in 16 bits: pass dtype=torch.bfloat16 (or float16) with method='qlora'.")
    return e, optimizer, attention


# %% notebooks/01_memory_estimation.ipynb · 1.6 · Measuring the same fields
def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and repeats counted once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def weight_tensors(model) -> list:
    """Parameters plus the tensors of bitsandbytes 4-bit quantization states."""
    tensors = list(model.parameters())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if getattr(state, "nested", False):
                tensors += [state.offset, state.state2.absmax, state.state2.code]
    return tensors


def make_optimizer(params, optimizer: str, foreach: bool | None = None):
    """The optimizer `optimizer` names, with lr=0 (a measurement must not change the model)."""
    optimizer = check_optimizer(optimizer)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.0)
    if optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.0, momentum=0.9)
    if optimizer in ("adam", "adamw"):
        return (torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW)(params, lr=0.0, weight_decay=0.0, foreach=foreach)
    import bitsandbytes as bnb

    return (bnb.optim.Adam8bit if optimizer == "adam8bit" else bnb.optim.AdamW8bit)(params, lr=0.0, weight_decay=0.0)


def training_batch(model, batch: dict) -> dict:
    """`batch` on the model's device, with labels (the inputs themselves) if it has none."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch if "labels" in batch else {**batch, "labels": batch["input_ids"]}


def saved_activation_bytes(model, batch: dict) -> tuple[int, torch.Tensor]:
    """(bytes saved for backward by model(**batch), loss), de-duplicated by storage, parameters left out."""
    weights = {t.untyped_storage().data_ptr() for t in weight_tensors(model)}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    batch = training_batch(model, batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    return sum(saved.values()), loss


def measure_memory(model, batch: dict, *, optimizer: str = "adamw") -> MemoryBreakdown:
    """Bytes of weights, gradients, optimizer state and saved activations in one real training step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise CourseError("measure_memory needs a model with trainable parameters (requires_grad=True).")
    was_training = model.training
    model.train()
    opt = make_optimizer(trainable, optimizer)
    try:
        activations, loss = saved_activation_bytes(model, batch)
        loss.backward()
        gradients = storage_bytes(p.grad for p in trainable)
        opt.step()
        states = [v for state in opt.state.values() for v in state.values()]
        out = MemoryBreakdown(weights=storage_bytes(weight_tensors(model)), gradients=gradients,
                              optimizer=storage_bytes(states), activations=activations)
    finally:
        opt.zero_grad(set_to_none=True)
        model.train(was_training)
    return out


def measure_peak(model, batch: dict, *, optimizer: str = "adamw", foreach: bool | None = None) -> int:
    """Allocator peak (bytes) of one steady-state training step: a first step allocates the optimizer state,
    the second is measured. CUDA: torch.cuda.max_memory_allocated. CPU: what lived before the step
    (weights, optimizer state) plus the running maximum of the profiler's allocation/free events; on CUDA, the same
    bytes plus how far max_memory_allocated rose during the step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, optimizer, foreach)
    batch = training_batch(model, batch)
    was_training = model.training
    model.train()

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        step()
        before = storage_bytes(weight_tensors(model)) + storage_bytes(v for st in opt.state.values() for v in st.values())
        if trainable[0].device.type == "cuda":  # count this model's step only, not other tensors on the GPU
            torch.cuda.synchronize()
            already = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            return before + torch.cuda.max_memory_allocated() - already
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
        live = high = 0
        for _, nbytes in events:  # + for an allocation, - for a free
            live += nbytes
            high = max(high, live)
        return before + high
    finally:
        model.train(was_training)


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


# %% notebooks/10_scaling_out.ipynb · 1.5 · The estimator, per rank
# ---- Several devices: the same breakdown per rank (notebook 10) ----
import functools  # noqa: E402
from dataclasses import dataclass, fields, replace  # noqa: E402

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


# %% notebooks/10_scaling_out.ipynb · 1.5 · The estimator, per rank
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


# %% notebooks/10_scaling_out.ipynb · 1.5 · The estimator, per rank
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


def _single_device(estimate):
    return getattr(estimate, "__wrapped__", estimate)  # running this cell twice must not wrap the wrapper


# %% notebooks/10_scaling_out.ipynb · 1.5 · The estimator, per rank
def per_rank(estimate):
    """estimate_memory with `world_size`, `strategy` and `rank`: the bytes one rank holds."""
    single = _single_device(estimate)

    @functools.wraps(single)
    def estimate_memory(config, *, world_size: int = 1, strategy: str = "none", rank: int = 0, batch_size: int = 1,
                        bucket_view: bool = False, **options) -> MemoryBreakdown:
        """Bytes of one training step on rank `rank` of `world_size` data-parallel ranks, `strategy` one of
        SHARDING; `batch_size` is the global batch, split evenly over the ranks (see notebooks 01 and 10). With
        world_size > 1 and strategy "none" (DDP), a RankBreakdown whose `buckets` are DDP's copy of the gradients
        (0 with `bucket_view=True`, DDP's gradient_as_bucket_view)."""
        check_strategy(strategy)
        _positive("world_size", world_size)
        if batch_size % world_size:
            raise CourseError(f"batch_size={batch_size} does not split evenly over world_size={world_size} ranks; use a "
                              f"multiple of {world_size} (batch_size is the global batch; each rank gets batch_size / world_size).")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise CourseError(f"rank={rank!r} must be between 0 and world_size - 1 = {world_size - 1}.")
        out = single(config, batch_size=batch_size // world_size, **options)
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

    return estimate_memory


estimate_memory = per_rank(estimate_memory)


# %% notebooks/10_scaling_out.ipynb · 1.5 · The estimator, per rank
def communication_bytes(config, *, world_size: int, strategy: str = "none", method: str = "full", dtype=torch.float32,
                        lora_rank: int = 8, lora_targets=("q_proj", "v_proj"), adapter_dtype=torch.float32,
                        double_quant: bool = True) -> dict:
    """Bytes one rank sends per optimizer step with ring collectives, by collective (see the table in notebook 10).
    FSDP's pieces are padded; each all-gather and reduce-scatter sends (W - 1) of them. Under FSDP the tail group
    (final norm, head) is gathered once a step, every other group twice (accelerate's grouping)."""
    check_strategy(strategy)
    _positive("world_size", world_size)
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
