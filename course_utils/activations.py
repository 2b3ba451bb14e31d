"""Saved-activation accounting: the bytes a Llama decoder saves for backward, op by op.

`activation_bytes(Shape.of(config, b, s), Training(...))` walks each layer (RMSNorm, the q/k/v, o, gate/up and down
projections, eager or SDPA attention, SwiGLU) and keeps a tensor only when a gradient somebody wants needs it, so one
path covers full fine-tuning, any LoRA targets, frozen first layers and gradient checkpointing; around the layers it
adds the token ids, RoPE's tables, the final norm and the fp32 log-softmax of the loss. `korthikanti_layer_bytes` is
the GPT count of Korthikanti et al. (2022) it is compared with. Built in section 1.4 of
notebooks/01_memory_estimation.ipynb, where it matches `saved_tensors_hooks` on real steps; `course_utils.memory`
adds it to the static bytes.
"""

# Exported from notebooks/01_memory_estimation.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/01_memory_estimation.ipynb · 1.4 · Activations: what one Llama layer saves for backward
from dataclasses import dataclass

from course_utils.memory import FLOAT_BYTES, INDEX_BYTES, text_config


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
