"""Fixtures shared by the unit tests."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def base_model():
    """A tiny random Llama with grouped-query attention (k/v project 64 -> 32), like the lab model's shape."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def model(base_model):
    """A fresh copy of base_model that a test may change."""
    return copy.deepcopy(base_model)
