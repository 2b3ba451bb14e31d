"""The PEFT family beyond LoRA, from scratch: soft prompts (prompt tuning), per-layer key/value prefixes (prefix
tuning), IA3's learned scalings, norm tuning (BitFit's counterpart on a model without biases), DoRA, partial
fine-tuning of the top blocks and linear probing.

Built in notebooks/14_peft_family.ipynb, where each is proved equal to PEFT's (PromptTuningConfig, PrefixTuningConfig,
IA3Config, LNTuningConfig, LoraConfig(use_dora=True)) on the lab model and all are compared under one training budget.
"""

# Exported from notebooks/14_peft_family.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/14_peft_family.ipynb · 1.1 · Prompt tuning
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from course_utils.errors import CourseError, check_positive
from course_utils.lora import LoRALinear, check_rank, find_targets
from course_utils.training import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's prediction of the next labelled token (labels -100 are skipped)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


class PromptTuning(nn.Module):
    """A frozen causal LM that reads n trainable vectors before every input: h_0 = [P; E(x)], P in R^{n x d}.

    init "vocab": P starts as the embeddings of n random vocabulary tokens (PEFT's SAMPLE_VOCAB); "random": N(0, 1)
    entries (PEFT's default, RANDOM). Logits and loss cover the real tokens only."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int, init: str = "vocab"):
        super().__init__()
        embed = input_embeddings(model, "prompt tuning")  # argument checks: next cell
        n = check_virtual_tokens(num_virtual_tokens)
        self.model = model.requires_grad_(False)
        if init == "vocab":
            start = embed.weight[torch.randint(0, embed.num_embeddings, (n,))].detach().clone()
        elif init == "random":
            start = torch.randn(n, embed.embedding_dim)
        else:
            raise CourseError(f"init={init!r}: use 'vocab' (sampled token embeddings) or 'random' (N(0, 1)).")
        self.prompt = nn.Parameter(start.to(embed.weight))

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        batch, n = input_ids.shape[0], self.prompt.shape[0]
        embeds = torch.cat([self.prompt.expand(batch, -1, -1), self.model.get_input_embeddings()(input_ids)], dim=1)
        if attention_mask is not None:  # the virtual tokens are always visible
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        logits = self.model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs).logits[:, n:]
        return CausalLMOutputWithPast(loss=None if labels is None else causal_lm_loss(logits, labels), logits=logits)


# %% notebooks/14_peft_family.ipynb · 1.1 · Prompt tuning
def check_virtual_tokens(n) -> int:
    """A CourseError unless n is a whole number >= 1: a zero-size prompt trains nothing."""
    return check_positive("num_virtual_tokens", n, hint="try 8: a few virtual tokens already steer a small model")


def input_embeddings(model: nn.Module, method: str) -> nn.Embedding:
    """The model's token embedding table; a CourseError for a model without one."""
    get = getattr(model, "get_input_embeddings", None)
    embed = get() if get is not None else None
    if not isinstance(embed, nn.Embedding):
        raise CourseError(f"{method} needs a language model with a token embedding table "
                          f"(model.get_input_embeddings()); {type(model).__name__} has none.")
    return embed


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) from a transformers config; a CourseError if the model has none."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise CourseError(f"prefix tuning needs a transformers model whose config describes its attention layers; "
                          f"{type(model).__name__} has no config.num_hidden_layers.")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


# %% notebooks/14_peft_family.ipynb · 1.2 · Prefix tuning
def prefix_cache(prefix: torch.Tensor, batch_size: int) -> DynamicCache:
    """A key/value cache holding the prefix: layer l's keys prefix[l, 0] and values prefix[l, 1]
    ([kv_heads, n, head_dim]) for every row of the batch. The attention then runs over [P_k; K] and [P_v; V], as after n earlier tokens."""
    return DynamicCache([(layer[0].expand(batch_size, -1, -1, -1), layer[1].expand(batch_size, -1, -1, -1))
                         for layer in prefix])


class PrefixTuning(nn.Module):
    """A frozen causal LM whose every attention layer also attends to n trainable key/value pairs (Li and Liang 2021).

    prefix: [layers, 2 (keys, values), kv_heads, n, head_dim], N(0, 1) as PEFT's default (the paper trains it
    through an MLP, PEFT's prefix_projection=True). A new cache is built at every call: the model appends to it."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int):
        super().__init__()
        layers, kv_heads, head_dim = attention_shape(model)
        n = check_virtual_tokens(num_virtual_tokens)
        self.model = model.requires_grad_(False)
        weight = next(model.parameters())
        self.prefix = nn.Parameter(torch.randn(layers, 2, kv_heads, n, head_dim).to(weight))

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        batch, n = input_ids.shape[0], self.prefix.shape[3]
        if attention_mask is not None:  # the prefix is always visible; positions then start at n, as in PEFT
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            past_key_values=prefix_cache(self.prefix, batch), **kwargs).logits
        return CausalLMOutputWithPast(loss=None if labels is None else causal_lm_loss(logits, labels), logits=logits)


# %% notebooks/14_peft_family.ipynb · 1.3 · IA3
class IA3Linear(nn.Module):
    """A frozen nn.Linear with a learned scaling vector l, ones at the start (Liu et al. 2022):
    y = l * (W x) (keys, values), or y = W (l * x) for a feed-forward layer (down_proj: its input, the MLP's inner
    activation)."""

    def __init__(self, base_layer: nn.Linear, scale_input: bool = False):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.scale_input = scale_input
        size = base_layer.in_features if scale_input else base_layer.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=base_layer.weight.dtype, device=base_layer.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_input:
            return self.base_layer(x * self.ia3_l)
        return self.base_layer(x) * self.ia3_l


IA3_TARGETS, IA3_FEEDFORWARD = ("k_proj", "v_proj", "down_proj"), ("down_proj",)  # PEFT's defaults for Llama


def add_ia3(model: nn.Module, targets=IA3_TARGETS, feedforward=IA3_FEEDFORWARD) -> nn.Module:
    """Freeze `model` and wrap each targeted nn.Linear in an IA3Linear (in place); `feedforward` ones scale inputs."""
    names = find_targets(model, targets)  # a CourseError for a name the model does not have
    targets = {targets} if isinstance(targets, str) else set(targets)
    feedforward = {feedforward} if isinstance(feedforward, str) else set(feedforward)
    if not feedforward <= targets:
        raise CourseError(f"feedforward {sorted(feedforward - targets)} is not among the targets {sorted(targets)}: "
                          "a feed-forward layer is a targeted layer whose input is scaled; add it to targets.")
    model.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        layer = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, IA3Linear(layer, scale_input=child in feedforward))
    return model


# %% notebooks/14_peft_family.ipynb · 1.4 · Norm tuning: BitFit has nothing to train here
def count_biases(model: nn.Module) -> int:
    """How many bias numbers the model has: what BitFit (Ben Zaken et al. 2022) would train."""
    return sum(p.numel() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias")


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of every normalisation layer (nn.LayerNorm, or an RMSNorm by its class name)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")}


def tune_norms(model: nn.Module) -> nn.Module:
    """Freeze `model` and train only its normalisation layers' weights, as PEFT's LNTuningConfig does."""
    norms = norm_modules(model)
    if not norms:
        raise CourseError(f"{type(model).__name__} has no LayerNorm or RMSNorm layer: norm tuning has nothing "
                          "to train.")
    model.requires_grad_(False)
    for module in norms.values():
        module.requires_grad_(True)
    return model


def bitfit(model: nn.Module) -> nn.Module:
    """Freeze `model` and train only its biases (BitFit); a CourseError for a model that has none."""
    if count_biases(model) == 0:
        raise CourseError(f"{type(model).__name__} has no bias terms (Llama-style layers are bias-free): BitFit has "
                          "nothing to train. Tune the norms instead (tune_norms), as PEFT's LNTuningConfig does.")
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
    return model


# %% notebooks/14_peft_family.ipynb · 1.5 · DoRA
class DoRALinear(LoRALinear):
    """LoRA split into a length and a direction per output feature (Liu et al. 2024):
    W' = m * (W + s B A) / ||W + s B A||_row, m trainable and starting at ||W||_row (so W' = W at the start).
    The norm is a constant in the backward pass, as in the paper's section 4.3 and in PEFT: it is taken from a
    detached W', so no graph (and no saved W') is built for it."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float):
        super().__init__(base_layer, r, alpha)
        self.magnitude = nn.Parameter(base_layer.weight.detach().norm(dim=1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight + self.delta_weight()
        scale = self.magnitude / weight.detach().norm(dim=1)  # detach first: the norm's op saves nothing
        out = F.linear(x, weight) * scale
        return out if self.base_layer.bias is None else out + self.base_layer.bias


def add_dora(model: nn.Module, target_modules, r: int = 8, alpha: float = 16) -> nn.Module:
    """Freeze `model` and wrap each targeted nn.Linear in a DoRALinear (in place); returns the model."""
    names = find_targets(model, target_modules)
    for name in names:  # every rank checked before anything changes
        layer = model.get_submodule(name)
        check_rank(r, layer.in_features, layer.out_features)
    model.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, DoRALinear(model.get_submodule(name), r, alpha))
    return model


# %% notebooks/14_peft_family.ipynb · 1.6 · Partial fine-tuning and linear probing
def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: its nn.ModuleList with config.num_hidden_layers entries (the
    longest list when the config does not say); a CourseError if it has none, or several (an MoE's experts)."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if layers:
        matching = [m for m in stacks if len(m) == layers]
    else:
        matching = [max(stacks, key=len)] if stacks else []
    if not matching:
        raise CourseError(f"{type(model).__name__} has no stack of blocks (an nn.ModuleList): partial fine-tuning "
                          "unfreezes whole transformer blocks.")
    if len(matching) > 1:
        raise CourseError(f"{type(model).__name__} has {len(matching)} lists of {layers} modules, not one stack of "
                          "blocks (an MoE's experts?): pick the blocks by name instead.")
    return matching[0]


def unfreeze_top_blocks(model: nn.Module, k: int) -> nn.Module:
    """Freeze `model`, then train its top k transformer blocks (the ones nearest the output)."""
    blocks = decoder_blocks(model)
    check_positive("k (blocks to train)", k, hint="try 1")
    if k > len(blocks):
        raise CourseError(f"k={k}, but the model has {len(blocks)} blocks: choose 1 <= k <= {len(blocks)}.")
    model.requires_grad_(False)
    blocks[len(blocks) - k:].requires_grad_(True)
    return model


def linear_probe(model: nn.Module) -> nn.Module:
    """Freeze `model`, then train only its output layer. With tied embeddings the head IS the input embedding
    table, so the probe also changes every layer's input (heads_tied tells)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:
        raise CourseError(f"{type(model).__name__} has no output layer (get_output_embeddings()): a linear probe "
                          "trains the head of a language model.")
    model.requires_grad_(False)
    head.weight.requires_grad_(True)
    return model


def heads_tied(model: nn.Module) -> bool:
    """True when the output layer and the input embeddings share one weight tensor."""
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def trainable_count(model: nn.Module) -> int:
    """How many numbers the optimizer will update (a tensor shared by two modules counted once)."""
    return sum({id(p): p.numel() for p in model.parameters() if p.requires_grad}.values())


# %% notebooks/14_peft_family.ipynb · 1.8 · What a step holds: notebook 01's estimator for the family
from course_utils.activations import Shape, Training, activation_bytes, layer_saved, rmsnorm_saved
from course_utils.memory import (FLOAT_BYTES, INDEX_BYTES, MemoryBreakdown, architecture, check_arguments, lora_shapes,
                                 optimizer_state_bytes, optimizer_step_temporaries, text_config)

ESTIMATED = ("prompt tuning", "prefix tuning", "IA3", "norms", "DoRA", "top blocks", "linear probe")


def peft_trainable(config, method: str, *, num_virtual_tokens: int = 8, rank: int = 8,
                   top_blocks: int = 1) -> list[int]:
    """The sizes of the tensors `method` trains (PEFT defaults: IA3 on k, v, down; DoRA on every linear), from the
    config alone, one entry per tensor (AdamW keeps a step count per tensor). A CourseError for an unknown method."""
    if method not in ESTIMATED:
        raise CourseError(f"method={method!r} is not one the PEFT estimator knows; use one of {', '.join(ESTIMATED)} "
                          "(full fine-tuning, LoRA and QLoRA: course_utils.memory.estimate_memory).")
    sh, (_, linears) = Shape.of(config, 1, 1), architecture(config)
    block = {name.rsplit(".", 1)[-1]: shape for name, shape in linears.items() if ".layers.0." in f".{name}"}
    if method == "prompt tuning":
        return [check_virtual_tokens(num_virtual_tokens) * sh.h]  # P: n x d
    if method == "prefix tuning":  # keys and values (kv heads x n x head size) in every layer
        return [sh.layers * 2 * sh.kv_heads * check_virtual_tokens(num_virtual_tokens) * sh.head_dim]
    if method == "IA3":  # l_k, l_v (as long as k's and v's outputs), l_ff (as long as down_proj's input), per block
        return [block["k_proj"][0], block["v_proj"][0], block["down_proj"][1]] * sh.layers
    if method == "norms":
        return [sh.h] * (2 * sh.layers + 1)  # two RMSNorm gains per block and the final one
    if method == "DoRA":  # A (r x in), B (out x r) and the length m (out) on every linear layer
        return [size for name, (out, _) in linears.items()
                for size in [r * c for r, c in lora_shapes({name: linears[name]}, rank, name.rsplit(".", 1)[-1])]
                + [out]]
    if method == "top blocks":
        check_positive("top_blocks", top_blocks, hint="try 1")
        if top_blocks > sh.layers:
            raise CourseError(f"top_blocks={top_blocks}, but the model has {sh.layers} blocks: "
                              f"choose 1 to {sh.layers}.")
        return ([o * i for o, i in block.values()] + [sh.h, sh.h]) * top_blocks  # its linears and its 2 norms
    return [sh.vocab * sh.h]  # linear probe: the head (tied: the same tensor is the input embedding table)


# %% notebooks/14_peft_family.ipynb · 1.8 · What a step holds: notebook 01's estimator for the family
def peft_activations(config, method: str, batch_size: int, seq_len: int, e: int = FLOAT_BYTES, *,
                     num_virtual_tokens: int = 8, rank: int = 8, top_blocks: int = 1) -> dict:
    """Bytes autograd saves for backward in one step of `method` (unpadded batches, SDPA), by part, from notebook
    01's frozen block (course_utils.activations.layer_saved) and what each method adds to it (the table above)."""
    sizes = peft_trainable(config, method, num_virtual_tokens=num_virtual_tokens, rank=rank, top_blocks=top_blocks)
    n, tied = num_virtual_tokens, bool(getattr(text_config(config), "tie_word_embeddings", False))
    sh = Shape.of(config, batch_size, seq_len + (n if method == "prompt tuning" else 0))  # prompt: n more positions
    frozen = Training(full=False, lora=frozenset(), rank=rank, e=e, adapter_bytes=e, attention="sdpa")
    block = layer_saved(sh, frozen, True)[0]  # a frozen block whose input needs a gradient
    norm_input = rmsnorm_saved(sh, frozen, True)[0]  # of it, one frozen RMSNorm's: the fp32 input and 1/rms
    first = block - norm_input  # block 0 when its input needs no gradient but something inside it trains
    t, qd, kvd = sh.t, sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    parts = {"embedding_ids": 0, "layers": 0, "rope": 2 * sh.s * sh.head_dim * e, "final_norm": norm_input}
    if method == "prompt tuning":
        parts["layers"] = sh.layers * block
    elif method == "prefix tuning":  # SDPA's k, v: kv heads over s positions -> every head over n + s, plus the mask
        longer = 2 * e * sh.b * sh.heads * (sh.s + n) * sh.head_dim + e * sh.b * sh.s * (sh.s + n) - 2 * e * t * kvd
        parts["layers"] = first + (sh.layers - 1) * block + sh.layers * longer
    elif method == "IA3":  # each vector saves what it multiplies, as long as itself per token
        parts["layers"] = first + (sh.layers - 1) * block + e * t * sum(sizes)
    elif method == "norms":  # each gain saves the normalised x it multiplies, the final norm's too
        parts["layers"] = first + (sh.layers - 1) * block + sh.layers * 2 * e * t * sh.h
        parts["final_norm"] += e * t * sh.h
    elif method == "DoRA":  # per linear ||W'||, m / ||W'|| (out each), x W'^T (t x out), and W' (out x in) for x's
        # gradient, except in block 0's q, k, v (their input needs none); then the inputs of q/k/v, gate/up, down
        linears = architecture(config)[1]
        no_input_grad = {n for n in linears if ".layers.0." in f".{n}" and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")}
        per_linear = sum(e * (2 * o + t * o + (0 if n in no_input_grad else o * i)) for n, (o, i) in linears.items())
        parts["layers"] = first + (sh.layers - 1) * block + per_linear + sh.layers * e * t * (2 * sh.h + sh.inter)
    elif method == "top blocks":  # nothing below the first trained block; it and those above save as in full FT
        full = Training(full=True, lora=frozenset(), rank=rank, e=e, adapter_bytes=e, attention="sdpa")
        parts["layers"] = layer_saved(sh, full, False)[0] + (top_blocks - 1) * layer_saved(sh, full, True)[0]
    else:  # linear probe: the head's input; tied, the table trains too: the token ids and every block
        parts |= {"embedding_ids": INDEX_BYTES * t, "layers": sh.layers * block} if tied else {"rope": 0}
        parts["final_norm"] = (norm_input if tied else 0) + e * t * sh.h
    if method in ("prompt tuning", "prefix tuning"):  # causal_lm_loss scores s - 1 positions per row
        rows = batch_size * (seq_len - 1)
        parts["logits"] = FLOAT_BYTES * rows * sh.vocab + INDEX_BYTES * rows + FLOAT_BYTES  # log-softmax, targets
    else:  # transformers' loss, as notebook 01 counts it
        parts["logits"] = activation_bytes(Shape.of(config, batch_size, seq_len), frozen)["logits"]
    return parts


# %% notebooks/14_peft_family.ipynb · 1.8 · What a step holds: notebook 01's estimator for the family
def estimate_peft_memory(config, method: str, *, batch_size: int, seq_len: int, num_virtual_tokens: int = 8,
                         rank: int = 8, top_blocks: int = 1, dtype=torch.float32, optimizer: str = "adamw",
                         foreach: bool = True) -> MemoryBreakdown:
    """Bytes of one training step of `method` (one of ESTIMATED) on a causal LM, from its config alone, in notebook
    01's MemoryBreakdown: the weights (with the method's new tensors), the gradients and optimizer state of what it
    trains, the saved activations and the short-lived bytes that set `peak`. Unpadded batches, SDPA attention."""
    sizes = peft_trainable(config, method, num_virtual_tokens=num_virtual_tokens, rank=rank, top_blocks=top_blocks)
    e, optimizer, _ = check_arguments(config, "full", dtype, optimizer, batch_size, seq_len, "sdpa")  # or CourseError
    new = method in ("prompt tuning", "prefix tuning", "IA3", "DoRA")  # new tensors; the others train existing ones
    out = MemoryBreakdown(weights=(sum(architecture(config)[0]) + (sum(sizes) if new else 0)) * e,
                          gradients=sum(sizes) * e, optimizer=optimizer_state_bytes(sizes, optimizer, e))
    out.step_transient = optimizer_step_temporaries(sizes, optimizer, e, foreach)
    parts = peft_activations(config, method, batch_size, seq_len, e, num_virtual_tokens=num_virtual_tokens, rank=rank,
                             top_blocks=top_blocks)
    out.activations = sum(parts.values())
    sh, ours = Shape.of(config, batch_size, seq_len), method in ("prompt tuning", "prefix tuning")
    rows = sh.b * (sh.s - 1) if ours else sh.t  # the positions the loss scores
    targets = INDEX_BYTES * rows + FLOAT_BYTES  # the loss node's saved targets and weight total, freed once it has run
    backward = 2 * FLOAT_BYTES * rows * sh.vocab - targets  # then d loss / d log p and d loss / d logits
    forward = 0
    if ours:  # before backward: the logits of every position, their shifted copy and the longer attention mask
        positions = sh.s + (num_virtual_tokens if method == "prompt tuning" else 0)
        forward = (FLOAT_BYTES * sh.vocab * (sh.b * positions + rows) + INDEX_BYTES * sh.b * (sh.s + num_virtual_tokens)
                   - FLOAT_BYTES)
    out.backward_transient = max(forward, backward)
    out.detail = {"trainable": sum(sizes), "tensors": len(sizes), "activation_parts": parts}
    return out
