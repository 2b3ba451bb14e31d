"""The committed lab model: its shape, tokenizer, chat template, integrity, card and scores."""

import json
import shutil
import time

import pytest
import torch

from course_utils.errors import CourseError
from course_utils.lab.card import check_thresholds, score_lab_model
from course_utils.lab.readme import render_readme
from course_utils.lab.model import (CHAT_TEMPLATE, build_tokenizer, chatml_text, count_parameters, load_lab_model,
                                    main, pretrain, read_card, restore_hint, sha256_of)
from course_utils.paths import LAB_MODEL_DIR


@pytest.fixture(scope="module")
def lab():
    return load_lab_model()


@pytest.fixture(scope="module")
def card():
    return read_card()


def test_a_tiny_llama_with_grouped_query_attention_and_tied_embeddings(lab, card):
    model, tokenizer = lab
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert count_parameters(model) <= 3_000_000
    assert count_parameters(model) == card["model"]["parameters"]
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert config.vocab_size == len(tokenizer)


def test_loading_is_fast_and_checks_the_hash():
    load_lab_model()  # warm the imports and the file cache
    start = time.perf_counter()
    model, tokenizer = load_lab_model()
    assert time.perf_counter() - start < 1.0
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_damaged_or_missing_weights_say_how_to_restore(tmp_path):
    copy = tmp_path / "lab-model"
    shutil.copytree(LAB_MODEL_DIR, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(CourseError, match="sha256.*train"):
        load_lab_model(copy)
    weights.unlink()
    with pytest.raises(CourseError, match="missing model.safetensors.*train"):
        load_lab_model(copy)
    assert "git checkout -- data/lab-model" in restore_hint(LAB_MODEL_DIR)


def test_the_committed_tokenizer_is_what_build_tokenizer_makes(lab):
    _, tokenizer = lab
    rebuilt = build_tokenizer()
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    assert rebuilt.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_tokenizer_round_trip_and_digits(lab):
    _, tokenizer = lab
    for text in ["Mia lives in Rome.", "Sort: 7 3 9 1", "Translate: cat dog\nzub kip", "12 + 345 = 357!"]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    digits = tokenizer.tokenize("Count: 1234")
    assert digits[-4:] == ["Ġ1", "2", "3", "4"]
    assert tokenizer.tokenize(" cat dog red") == ["Ġcat", "Ġdog", "Ġred"]


def test_chat_template_is_chatml_with_an_assistant_mask(lab):
    _, tokenizer = lab
    messages = [{"role": "user", "content": "Repeat: red cat"}, {"role": "assistant", "content": "red cat"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nRepeat: red cat<|im_end|>\n<|im_start|>assistant\nred cat<|im_end|>\n"
    assert text == chatml_text(messages)  # the pretraining corpus is rendered by chatml_text
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nRepeat: red cat<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.chat_template == CHAT_TEMPLATE and "{% generation %}" in CHAT_TEMPLATE

    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "red cat<|im_end|>"
    assert tokenizer.decode([i for i, m in zip(ids, mask) if not m]) == (
        "<|im_start|>user\nRepeat: red cat<|im_end|>\n<|im_start|>assistant\n\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_the_card_describes_the_committed_files(card):
    assert sha256_of(LAB_MODEL_DIR / "model.safetensors") == card["weights"]["sha256"]
    assert (LAB_MODEL_DIR / "README.md").read_text() == render_readme(card)
    assert not card["failures"]
    assert set(card["thresholds"]) <= set(card["scores"])
    total_mb = sum(p.stat().st_size for p in LAB_MODEL_DIR.iterdir()) / 1e6
    assert total_mb < 6
    speed = card["finetuning_speed"]["results"]
    assert set(speed) == {"full", "lora_r8"}
    assert all(r["passed"] for method in speed.values() for r in method.values())
    config = json.loads((LAB_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_committed_model_passes_the_cards_thresholds(lab, card):
    """Full test sets: skills well, held-out tasks below 20%, style sampled near the corpus rate."""
    model, tokenizer = lab
    scores = score_lab_model(model, tokenizer)
    assert check_thresholds(scores, card["thresholds"]) == []
    assert all(scores[name] < 0.2 for name in ("reverse", "sort_digits", "add", "translate"))
    for name, value in card["scores"].items():
        assert scores[name] == pytest.approx(value, abs=1e-3), name  # the card's numbers are this model's


def test_pretraining_is_reproducible():
    """Two short pretraining runs from the same seed give the same weights, bit for bit."""
    tokenizer = build_tokenizer()
    threads = torch.get_num_threads()
    try:
        first, history, _ = pretrain(tokenizer, steps=3, batch_size=4, progress=False)
        second, _, _ = pretrain(tokenizer, steps=3, batch_size=4, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert history.losses[0] > history.losses[-1]


def test_evaluate_command_exits_1_when_a_threshold_fails(tmp_path, capsys):
    copy = tmp_path / "lab-model"
    shutil.copytree(LAB_MODEL_DIR, copy)
    assert main(["evaluate", "--dir", str(copy), "--limit", "16"]) == 0
    card = json.loads((copy / "card.json").read_text())
    card["thresholds"]["general_perplexity"] = {"max": 1.0}  # no model is that sure of this text
    (copy / "card.json").write_text(json.dumps(card))
    assert main(["evaluate", "--dir", str(copy), "--limit", "16"]) == 1
    assert "general_perplexity" in capsys.readouterr().out
