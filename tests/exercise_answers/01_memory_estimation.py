"""Plausible wrong answers to notebook 01's exercises (tests/test_exercise_cells.py)."""

from course_utils.memory import estimate_memory


def kv_cache_bytes(config, batch_size, seq_len, dtype_bytes):
    # Forgets grouped-query attention: stores every query head's keys and values.
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * batch_size * seq_len * config.num_attention_heads * head_dim * dtype_bytes


def max_batch_size(config, gpu_bytes, setup):
    # Searches on the naive sum of the parts (`total`) instead of the allocator peak.
    best = 0
    while best < 256 and estimate_memory(config, batch_size=best + 1, **setup).total <= gpu_bytes:
        best += 1
    return best


def generation_cache_bytes(config, batch_size, prompt_len, new_tokens, dtype_bytes):
    # Counts every returned token, including the last one, which the model never ran on.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    positions = prompt_len + new_tokens
    return 2 * config.num_hidden_layers * batch_size * positions * config.num_key_value_heads * head_dim * dtype_bytes
