"""LoRA from scratch: a LoRALinear layer, adding it to a model, merging, saving adapters.

Built step by step in notebooks/02_lora_from_scratch.ipynb, where every piece is proved equal to PEFT's LoRA.
"""

# Exported from notebooks/02_lora_from_scratch.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/02_lora_from_scratch.ipynb · 1.1 · The layer
import json
import math
from pathlib import Path

import torch
from torch import nn

from course_utils.errors import CourseError, check_positive


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + b + (alpha / r) * B(A(dropout(x)))."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_rank(r, base_layer.in_features, base_layer.out_features)  # argument checks: next cell
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # A random (PEFT's default)
        nn.init.zeros_(self.lora_B.weight)                            # B = 0: the update starts at exactly 0
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:  # Delta W already sits inside base_layer.weight (section 1.3)
            return result
        return result + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))

    def delta_weight(self) -> torch.Tensor:
        """Delta W = scaling * B A, the same shape as the base weight (out x in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


# %% notebooks/02_lora_from_scratch.ipynb · 1.1 · The layer
def check_rank(r, in_features: int, out_features: int) -> None:
    """A CourseError unless 1 <= r <= min(in, out): a larger rank adds parameters but no expressiveness."""
    check_positive("LoRA rank r", r, hint="try 8")
    if r > min(in_features, out_features):
        raise CourseError(
            f"LoRA rank r={r} is larger than the layer ({in_features} -> {out_features}): B A has rank at most "
            f"min(in, out) = {min(in_features, out_features)}, so choose r <= {min(in_features, out_features)} "
            "or leave this layer out of target_modules.")


# %% notebooks/02_lora_from_scratch.ipynb · 1.2 · Putting LoRA into a model
ALL_LINEAR = "all-linear"  # PEFT's shorthand for every nn.Linear but the output layer (not a fixed list)


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's nn.Linear modules (what target_modules can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def find_targets(model: nn.Module, target_modules) -> list[str]:
    """Full names of the nn.Linear modules to adapt; a CourseError for a name the model does not have."""
    available = linear_module_names(model)
    if target_modules == ALL_LINEAR:
        wanted = set(available) - {"lm_head"}  # PEFT's "all-linear" leaves the output layer alone
    else:
        wanted = {target_modules} if isinstance(target_modules, str) else set(target_modules)
        unknown = sorted(wanted - set(available))
        if unknown or not wanted:
            raise CourseError(
                f"target_modules {sorted(unknown) or '[]'} match no linear layer of this model. "
                f"Its linear layers are: {', '.join(available)} (or use {ALL_LINEAR!r}).")
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{full module name: LoRALinear} for every LoRA layer in the model."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def add_lora(model: nn.Module, target_modules, r: int = 8, alpha: float = 16, dropout: float = 0.0) -> nn.Module:
    """Freeze `model` and wrap each targeted nn.Linear in a LoRALinear (in place); returns the model."""
    if lora_layers(model):
        raise CourseError("This model already has LoRA layers: call unload_lora(model) first, or load a fresh model.")
    if not 0 <= dropout < 1:
        raise CourseError(f"dropout={dropout!r} must be in [0, 1).")
    targets = find_targets(model, target_modules)
    for name in targets:  # check every rank before changing anything
        linear = model.get_submodule(name)
        try:
            check_rank(r, linear.in_features, linear.out_features)
        except CourseError as err:
            raise CourseError(f"{name}: {err}") from None
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout))
    return model


def count_trainable(model: nn.Module) -> int:
    """How many parameters the optimizer will update."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# %% notebooks/02_lora_from_scratch.ipynb · 1.3 · Merging: no extra cost at inference
def _layers_or_error(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise CourseError("This model has no LoRA layers: call add_lora(model, ...) first.")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """W <- W + (alpha / r) B A in every LoRA layer; the forward pass then skips the LoRA branch."""
    layers = _layers_or_error(model)
    if any(layer.merged for layer in layers.values()):
        raise CourseError("The LoRA layers are already merged: merging again would add Delta W twice. "
                          "Call unmerge_lora(model) first.")
    with torch.no_grad():
        for layer in layers.values():
            layer.base_layer.weight += layer.delta_weight()
            layer.merged = True
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """W <- W - (alpha / r) B A in every LoRA layer: the base weights come back."""
    layers = _layers_or_error(model)
    if not all(layer.merged for layer in layers.values()):
        raise CourseError("The LoRA layers are not merged: unmerging would subtract Delta W from the base weights. "
                          "Call merge_lora(model) first.")
    with torch.no_grad():
        for layer in layers.values():
            layer.base_layer.weight -= layer.delta_weight()
            layer.merged = False
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Put the plain nn.Linear layers back (merged ones keep Delta W: that is PEFT's merge_and_unload)."""
    for name, layer in _layers_or_error(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    return model


# %% notebooks/02_lora_from_scratch.ipynb · 1.4 · Saving only the adapter
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors: {'<layer>.lora_A.weight': A, '<layer>.lora_B.weight': B, ...}."""
    return {f"{name}.lora_{part}.weight": getattr(layer, f"lora_{part}").weight.detach().contiguous()
            for name, layer in _layers_or_error(model).items() for part in "AB"}


def adapter_config(model: nn.Module) -> dict:
    """r, alpha and the targeted module names, enough to rebuild the LoRA layers on a fresh base model."""
    layers = _layers_or_error(model)
    settings = {(layer.r, layer.alpha) for layer in layers.values()}
    if len(settings) != 1:
        raise CourseError("save_adapter needs one r and alpha for all layers; this model mixes several.")
    (r, alpha), = settings
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    return {"r": r, "alpha": alpha, "target_modules": targets}


def save_adapter(model: nn.Module, path) -> Path:
    """Write the adapter (A and B of every layer, config in the metadata) to one .safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), path, metadata={"lora_config": json.dumps(adapter_config(model))})
    return path


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Add LoRA layers as the file's config says (unless present) and load A and B into them."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CourseError(f"No adapter file at {path}: save one with save_adapter(model, path).")
    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("lora_config", "null") or "null")
        if config is None:
            raise CourseError(f"{path} has no lora_config metadata: it was not written by save_adapter.")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if not lora_layers(model):
        add_lora(model, config["target_modules"], r=config["r"], alpha=config["alpha"])
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CourseError(f"The adapter in {path} does not fit this model (missing {missing[:3]}, unexpected "
                          f"{extra[:3]}): load it into the base model it was trained on.")
    with torch.no_grad():
        for key, tensor in tensors.items():
            weight = model.get_parameter(key)
            if tensor.shape != weight.shape:
                raise CourseError(f"{key} has shape {tuple(tensor.shape)} in the file but "
                                  f"{tuple(weight.shape)} in the model: was it saved from another model?")
            weight.copy_(tensor)
    return model
