"""course_utils.memory (the estimator), course_utils.activations and course_utils.measurement: the estimate equals what
PyTorch allocates, and bad input gets a clear CourseError."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from course_utils import memory
from course_utils.errors import CourseError
from course_utils.measurement import measure_memory, measure_peak
from course_utils.memory import MemoryBreakdown, estimate_inference, estimate_memory

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)


def tiny_config(attention="sdpa", **overrides):
    config = LlamaConfig(**(TINY | overrides))
    config._attn_implementation = attention
    return config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config())


def lora_copy(model, rank=4, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, target_modules=list(targets), lora_dropout=0.0))


def set_attention(model, attention):
    for m in (model, model.get_base_model() if hasattr(model, "get_base_model") else model):
        m.config._attn_implementation = attention


def batch(b, s, vocab=TINY["vocab_size"]):
    return {"input_ids": torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(b * 1000 + s))}


def test_meta_parameter_count_matches_a_real_model(tiny):
    est = estimate_memory(tiny_config(), optimizer="sgd")
    assert est.detail["parameters"] == sum(p.numel() for p in tiny.parameters())


def test_untied_and_published_llama2_7b_count():
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    assert estimate_inference(config, dtype=torch.float16).detail["parameters"] == 6_738_415_616


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adamw", "adam", "adamw8bit"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_static_parts_are_exact(tiny, method, optimizer):
    model = tiny if method == "full" else lora_copy(tiny)
    got = measure_memory(model, batch(2, 9), optimizer=optimizer)
    est = estimate_memory(tiny_config(), method=method, optimizer=optimizer, batch_size=2, seq_len=9, lora_rank=4)
    assert (got.weights, got.gradients, got.optimizer) == (est.weights, est.gradients, est.optimizer)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("method,targets", [("full", None), ("lora", ("q_proj", "v_proj")), ("lora", ("k_proj", "o_proj", "down_proj"))])
@pytest.mark.parametrize("shape", [(1, 5), (3, 17)])
def test_activations_match_saved_tensors(tiny, attention, method, targets, shape):
    model = tiny if method == "full" else lora_copy(tiny, 4, targets)
    set_attention(model, attention)
    try:
        got = measure_memory(model, batch(*shape), optimizer="sgd").activations
    finally:
        set_attention(tiny, "sdpa")
    kw = {"lora_rank": 4, "lora_targets": targets} if targets else {}
    est = estimate_memory(tiny_config(attention), method=method, batch_size=shape[0], seq_len=shape[1], **kw).activations
    assert abs(est - got) / got <= 0.005  # CPU: every saved tensor is named, so the count is exact


def test_bf16_pure_and_eager_attention_scores(tiny):
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    set_attention(model, "eager")
    got = measure_memory(model, batch(2, 11), optimizer="adamw")
    est = estimate_memory(tiny_config("eager"), dtype=torch.bfloat16, mixed_precision=False, batch_size=2, seq_len=11)
    assert (got.weights, got.gradients, got.optimizer) == (est.weights, est.gradients, est.optimizer)
    assert abs(est.activations - got.activations) / got.activations <= 0.005


def test_eager_grows_quadratically_sdpa_linearly():
    config = tiny_config()
    act = lambda attention, s: estimate_memory(config, attention=attention, seq_len=s).detail["activation_parts"]["layers"]  # noqa: E731
    assert act("sdpa", 64) == 2 * act("sdpa", 32)
    assert act("eager", 64) > 2 * act("eager", 32)


def test_checkpointing_keeps_layer_inputs_only():
    config = tiny_config()
    parts = estimate_memory(config, seq_len=10, batch_size=3, gradient_checkpointing=True).detail["activation_parts"]
    assert parts["layers"] == TINY["num_hidden_layers"] * 4 * 3 * 10 * TINY["hidden_size"]
    assert parts["recompute_one_layer"] > 0


def test_nf4_bytes_match_bitsandbytes():
    import bitsandbytes.functional as F

    for numel in (64 * 300, 4096, 100_000):
        w = torch.randn(numel)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        tensors = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        assert sum(t.numel() * t.element_size() for t in tensors) == memory.nf4_bytes(numel, double_quant=True)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        assert sum(t.numel() * t.element_size() for t in (packed, state.absmax, state.code)) == memory.nf4_bytes(numel, double_quant=False)


def test_qlora_weights_smaller_than_lora():
    config = tiny_config(hidden_size=256, intermediate_size=512)
    lora = estimate_memory(config, method="lora", dtype=torch.bfloat16)
    qlora = estimate_memory(config, method="qlora", dtype=torch.bfloat16)
    assert qlora.weights < lora.weights and qlora.gradients == lora.gradients


def test_mixed_precision_is_16_bytes_per_parameter():
    est = estimate_memory(tiny_config(), dtype=torch.bfloat16, optimizer="adamw")
    n = est.detail["parameters"]
    static = est.weights + est.gradients + est.master + est.optimizer
    assert static == 16 * n + 4 * len(list(memory.meta_model(tiny_config()).parameters()))


def test_kv_cache_matches_dynamic_cache(tiny):
    with torch.no_grad():
        cache = tiny(**batch(2, 13), use_cache=True).past_key_values
    measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert estimate_inference(tiny_config(), dtype=torch.float32, batch_size=2, seq_len=13).kv_cache == measured


def test_peak_matches_profiler(tiny):
    b = batch(4, 32)
    got = measure_peak(tiny, b, optimizer="adamw")
    est = estimate_memory(tiny_config(), optimizer="adamw", batch_size=4, seq_len=32, foreach=False)
    assert abs(est.peak - got) / got <= 0.10


def test_breakdown_total_and_peak():
    m = MemoryBreakdown(weights=10, gradients=5, optimizer=20, master=0, activations=7, backward_transient=1, step_transient=4)
    assert m.total == 42
    assert m.peak == 10 + 20 + max(7 + 1, 5 + 4)
    assert m.as_dict()["total"] == 42 and m.gb()["weights"] == 10 / 1e9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "prefix"}, "method='prefix' is unknown"),
        ({"optimizer": "adagrad"}, "optimizer='adagrad' is unknown"),
        ({"method": "lora", "lora_targets": ("q_proj", "c_attn")}, "c_attn"),
        ({"method": "lora", "lora_rank": 65}, "larger than"),
        ({"method": "lora", "lora_rank": 0}, "lora_rank=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"seq_len": -3}, "seq_len=-3"),
        ({"dtype": torch.int8}, "dtype="),
        ({"attention": "flash_attention_3"}, "attention="),
        ({"method": "qlora", "dtype": torch.float32}, "16 bits"),
    ],
)
def test_bad_input_raises_course_error(kwargs, match):
    with pytest.raises(CourseError, match=match):
        estimate_memory(tiny_config(), **kwargs)


def test_unknown_target_lists_the_real_ones():
    with pytest.raises(CourseError) as err:
        estimate_memory(tiny_config(), method="lora", lora_targets=["query"])
    assert "q_proj" in str(err.value) and "down_proj" in str(err.value)


def test_measure_needs_trainable_parameters(tiny):
    frozen = copy.deepcopy(tiny).requires_grad_(False)
    with pytest.raises(CourseError, match="trainable"):
        measure_memory(frozen, batch(1, 4))


@pytest.mark.parametrize("dtype,attention,shape", [(torch.bfloat16, "sdpa", (4, 32)), (torch.float32, "eager", (1, 8))])
def test_peak_with_foreach_adam_and_pure_16_bit(tiny, dtype, attention, shape):
    model = copy.deepcopy(tiny).to(dtype)
    set_attention(model, attention)
    got = measure_peak(model, batch(*shape), optimizer="adamw", foreach=True)
    est = estimate_memory(tiny_config(attention), dtype=dtype, mixed_precision=False, optimizer="adamw", batch_size=shape[0],
                          seq_len=shape[1], attention=attention, foreach=True)
    assert abs(est.peak - got) / got <= 0.10
