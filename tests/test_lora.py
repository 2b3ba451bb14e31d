"""course_utils.lora (exported from notebook 02): the layer, add/merge/unmerge/unload, adapters, bad input."""

import copy

import pytest
import torch
from torch import nn

from course_utils.errors import CourseError
from course_utils.lora import (LoRALinear, add_lora, adapter_config, count_trainable, find_targets,
                               linear_module_names, load_adapter, lora_layers, merge_lora, save_adapter,
                               unload_lora, unmerge_lora)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def randomize_B(model, std=0.05):
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * std)


# ---------------------------------------------------------------- the layer


def test_layer_starts_as_base_and_only_A_B_train():
    base = nn.Linear(10, 6)
    layer = LoRALinear(base, r=2, alpha=4, dropout=0.1).eval()
    x = torch.randn(4, 10)
    assert torch.equal(layer(x), base(x))
    assert layer.scaling == 2.0 and not layer.merged
    assert torch.count_nonzero(layer.lora_A.weight) > 0 and torch.count_nonzero(layer.lora_B.weight) == 0
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}


def test_layer_forward_is_W_plus_scaled_BA():
    layer = LoRALinear(nn.Linear(10, 6), r=3, alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 10)
    w = layer.base_layer.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer(x), x @ w.T + layer.base_layer.bias)
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 3


def test_dropout_applies_in_training_only():
    layer = LoRALinear(nn.Linear(10, 6), r=2, alpha=2, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 10)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    assert not torch.equal(first, layer(x))


# ---------------------------------------------------------------- add_lora


def test_add_lora_counts_and_freezes(model, ids):
    before = logits(model, ids)
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    layers = lora_layers(model)
    assert len(layers) == 4  # 2 layers x (q, v)
    # q: 64 -> 64, v: 64 -> 32 (two kv heads of 16)
    assert count_trainable(model) == 2 * 4 * ((64 + 64) + (64 + 32))
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert torch.equal(logits(model, ids), before)


def test_all_linear_leaves_lm_head(model):
    add_lora(model, "all-linear", r=2, alpha=2)
    names = {name.rsplit(".", 1)[-1] for name in lora_layers(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)


def test_linear_module_names(model):
    assert linear_module_names(model) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                          "up_proj", "v_proj"]
    assert find_targets(model, "q_proj") == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_unknown_target_lists_the_linear_layers(model):
    with pytest.raises(CourseError, match="q_pro") as err:
        add_lora(model, ["q_pro"], r=4)
    assert "k_proj" in str(err.value) and "down_proj" in str(err.value) and "all-linear" in str(err.value)
    assert not lora_layers(model)


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_rank_must_be_a_positive_integer(model, r):
    with pytest.raises(CourseError, match="whole number"):
        add_lora(model, ["q_proj"], r=r)
    assert not lora_layers(model) and count_trainable(model) == sum(p.numel() for p in model.parameters())


def test_rank_larger_than_the_layer(model):
    with pytest.raises(CourseError, match=r"min\(in, out\) = 32"):
        add_lora(model, ["q_proj", "k_proj"], r=33)  # q allows 64, k (64 -> 32) only 32
    assert not lora_layers(model), "nothing is changed when one layer fails"
    add_lora(model, ["k_proj"], r=32)  # exactly min(in, out) is fine
    with pytest.raises(CourseError, match="larger than the layer"):
        LoRALinear(nn.Linear(3, 5), r=4, alpha=1)


def test_bad_dropout_and_adding_twice(model):
    with pytest.raises(CourseError, match="dropout"):
        add_lora(model, ["q_proj"], r=2, dropout=1.0)
    add_lora(model, ["q_proj"], r=2)
    with pytest.raises(CourseError, match="already has LoRA"):
        add_lora(model, ["v_proj"], r=2)


# ---------------------------------------------------------------- merge / unmerge / unload


def test_merge_equals_unmerged_and_unmerge_restores(model, ids):
    add_lora(model, "all-linear", r=4, alpha=8)
    randomize_B(model)
    original = {n: l.base_layer.weight.clone() for n, l in lora_layers(model).items()}
    unmerged = logits(model, ids)
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, original[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-6, rtol=0)


def test_merging_twice_and_unmerging_unmerged_raise(model):
    add_lora(model, ["q_proj"], r=2)
    with pytest.raises(CourseError, match="not merged"):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(CourseError, match="already merged"):
        merge_lora(model)


def test_merge_without_lora_raises(model):
    with pytest.raises(CourseError, match="add_lora"):
        merge_lora(model)


def test_unload_after_merge_is_a_plain_model(model, ids):
    add_lora(model, ["q_proj", "v_proj"], r=2)
    randomize_B(model)
    adapted = logits(model, ids)
    plain = unload_lora(merge_lora(model))
    assert not lora_layers(plain) and isinstance(plain.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(logits(plain, ids), adapted, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- adapters on disk


def test_save_and_load_adapter(model, base_model, ids, tmp_path):
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize_B(model)
    path = save_adapter(model, tmp_path / "a" / "adapter.safetensors")
    assert adapter_config(model) == {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    fresh = load_adapter(copy.deepcopy(base_model), path)
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    full = sum(p.numel() * p.element_size() for p in base_model.parameters())
    assert path.stat().st_size < 0.1 * full


def test_load_adapter_errors(model, base_model, tmp_path):
    with pytest.raises(CourseError, match="No adapter file"):
        load_adapter(model, tmp_path / "missing.safetensors")
    add_lora(model, ["q_proj"], r=4)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    other = add_lora(copy.deepcopy(base_model), ["v_proj"], r=4)
    with pytest.raises(CourseError, match="does not fit"):
        load_adapter(other, path)
    wider = add_lora(copy.deepcopy(base_model), ["q_proj"], r=8)
    with pytest.raises(CourseError, match="shape"):
        load_adapter(wider, path)


def test_matches_peft(model, base_model, ids):
    peft = pytest.importorskip("peft")
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize_B(model)
    twin = peft.get_peft_model(copy.deepcopy(base_model),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    assert twin.get_nb_trainable_parameters()[0] == count_trainable(model)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            theirs = twin.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
    torch.testing.assert_close(logits(twin, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_one_training_step_with_dropout_matches_peft(model, base_model, ids):
    """Dropout sits on the LoRA branch's input, in training only: one AdamW step lands where PEFT's does."""
    peft = pytest.importorskip("peft")
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.3)
    randomize_B(model)
    twin = peft.get_peft_model(copy.deepcopy(base_model),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.3))
    pairs = []
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            theirs = twin.base_model.model.get_submodule(name)
            for part in "AB":
                ours_w, theirs_w = getattr(layer, f"lora_{part}").weight, getattr(theirs, f"lora_{part}")["default"].weight
                theirs_w.copy_(ours_w)
                pairs.append((ours_w, theirs_w))
    for net in (model, twin):
        optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(5)
        net.train()
        net(ids, labels=ids).loss.backward()
        optimizer.step()
    difference = max((o - t).abs().max().item() for o, t in pairs)
    for ours_w, theirs_w in pairs:
        torch.testing.assert_close(ours_w, theirs_w)
    assert all(torch.equal(layer.base_layer.weight, base_model.get_submodule(name).weight)
               for name, layer in lora_layers(model).items()), "the base weights stay frozen"
    assert difference <= 1e-5
