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


# ---- One execution per notebook in `make test` ----
# tests/test_browser.py runs each notebook start to end in JupyterLab (and fails on any error output), which is what
# nbval's --nbval-lax checks too. When that browser test is selected and will run, nbval's copy of the same notebook is
# dropped, so `make test` pays for each notebook once; without a browser (the test would skip), nbval keeps it.
BROWSER_RUN = "test_lab_runs_the_notebook_and_its_knob"


def browser_will_run() -> bool:
    import importlib.util
    import os
    import shutil

    if os.environ.get("COURSE_REQUIRE_BROWSER"):  # .ci/run: the browser test runs, or fails
        return True
    has_chromium = any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome"))
    return has_chromium and importlib.util.find_spec("playwright") is not None


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected theirs
def pytest_collection_modifyitems(config, items):
    in_browser = {item.callspec.params["name"] for item in items
                  if getattr(item, "originalname", None) == BROWSER_RUN and hasattr(item, "callspec")}
    if not in_browser or not browser_will_run():
        return
    twice = [item for item in items if item.path.suffix == ".ipynb" and item.path.stem in in_browser]
    if twice:
        config.hook.pytest_deselected(items=twice)
        items[:] = [item for item in items if item not in set(twice)]
        config._course_nbval_in_browser = sorted(in_browser & {item.path.stem for item in twice})


def pytest_terminal_summary(terminalreporter, config):
    moved = getattr(config, "_course_nbval_in_browser", None)
    if moved:
        terminalreporter.write_line(f"nbval: {len(moved)} notebooks were executed in JupyterLab instead "
                                    f"(tests/test_browser.py::{BROWSER_RUN}): {', '.join(m[:2] for m in moved)}")
