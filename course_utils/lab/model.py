"""The course's lab model: a tiny Llama (SmolLM2's architecture at 1/150 of its size) and its tokenizer.

    python -m course_utils.lab.model train [--out DIR]      # rebuild from scratch (~9 min on 2 cores)
    python -m course_utils.lab.model evaluate [--dir DIR]   # scores vs. the card's thresholds

`load_lab_model()` returns (model, tokenizer) from data/lab-model/ after
checking the weights against the sha256 in card.json.

What the lab model knows comes from `course_utils.lab.corpus`; how its card is
measured and written is in `course_utils.lab.card`.
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from course_utils.errors import CourseError
from course_utils.lab.corpus import pretraining_stream, stale_data_files
from course_utils.chat_template import chatml_template
from course_utils.paths import LAB_MODEL_DIR, sha256_of
from course_utils.training import IGNORE_INDEX, train

# ---------------------------------------------------------------- tokenizer

END_OF_TEXT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, PAD]  # ids 0-3 (the first three as in SmolLM2)

# SmolLM2's ChatML template without its default system prompt (every token costs
# CPU time in every notebook), and with a {% generation %} block around the
# assistant's content and <|im_end|>: that is what `return_assistant_tokens_mask`
# and TRL's `assistant_only_loss` use to find the tokens to train on.
CHAT_TEMPLATE = chatml_template()

TOKENIZER_VOCAB_LIMIT = 1024  # the corpus saturates below this: every corpus word becomes one token
TOKENIZER_TRAINING_DOCS = 20_000


def chatml_text(messages: list[dict]) -> str:
    """A conversation as ChatML text, the way CHAT_TEMPLATE renders it (without generation prompt)."""
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def document_text(doc: dict) -> str:
    """A pretraining document as text: general text as is, a chat in ChatML; then <|endoftext|>."""
    body = doc["text"] if "text" in doc else chatml_text(doc["messages"])
    return body + END_OF_TEXT


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the first documents of the pretraining stream.

    Byte-level: any text can be encoded (text the corpus never had falls back
    to pieces and bytes). Each digit is its own token, with the space
    before it (" 7"), so numbers are read digit by digit as in Llama and
    SmolLM2, and a list of digits costs one token per digit.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_LIMIT, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    docs = itertools.islice(pretraining_stream(seed), TOKENIZER_TRAINING_DOCS)
    bpe.train_from_iterator((document_text(d) for d in docs), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=IM_END, pad_token=PAD, unk_token=None,
        extra_special_tokens=[END_OF_TEXT, IM_START], chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"], clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------- model

# SmolLM2-135M's architecture (Llama, grouped-query attention, tied embeddings),
# shrunk: 4 layers, hidden 128, 4 query heads sharing 2 key/value heads.
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def build_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- pretraining

PRETRAINING = dict(
    seed=0,
    steps=2000,
    batch_size=32,
    block_size=128,
    lr=3e-3,
    warmup_steps=100,
    weight_decay=0.1,
    threads=2,
)


def pack_documents(token_lists, block_size: int, pad_token_id: int):
    """Pack whole documents into rows of block_size tokens, in order; pad what is left of a row.

    No document is cut, so every row starts at a document start, as a prompt
    does at inference. Documents in one row may attend to earlier ones; the
    <|endoftext|> between them teaches the model to start afresh.
    """
    row = []
    for ids in token_lists:
        if len(row) + len(ids) > block_size:
            yield row + [pad_token_id] * (block_size - len(row)), len(row)
            row = []
        row = row + ids
    # the stream is endless: a last partial row is never needed


def pretraining_batches(tokenizer, *, seed: int, batch_size: int, block_size: int):
    """Endless batches of packed pretraining documents; labels skip the padding.

    No attention mask: padding only ever follows a row's real tokens, which a
    causal model never lets attend to later positions (and the plain causal
    attention is ~25% faster than a masked one on CPU).
    """
    docs = (document_text(d) for d in pretraining_stream(seed))
    token_lists = (ids for chunk in _chunks(docs, 4096) for ids in tokenizer(chunk)["input_ids"])
    rows = pack_documents(token_lists, block_size, tokenizer.pad_token_id)
    while True:
        batch = list(itertools.islice(rows, batch_size))
        input_ids = torch.tensor([r for r, _ in batch])
        lengths = torch.tensor([n for _, n in batch])
        is_padding = torch.arange(block_size)[None, :] >= lengths[:, None]
        yield {"input_ids": input_ids, "labels": input_ids.masked_fill(is_padding, IGNORE_INDEX)}


def _chunks(iterable, size):
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def pretrain(tokenizer, *, progress: bool = True, **overrides):
    """Build a fresh lab model and pretrain it on the corpus.

    Returns (model, history, tokens): the TrainHistory and the number of
    (non-padding) tokens trained on.
    """
    settings = {**PRETRAINING, **overrides}
    torch.set_num_threads(settings["threads"])  # same threads, same float sums: reproducible weights
    torch.manual_seed(settings["seed"])
    model = LlamaForCausalLM(build_config(tokenizer))
    batches = pretraining_batches(tokenizer, seed=settings["seed"], batch_size=settings["batch_size"],
                                  block_size=settings["block_size"])
    tokens = 0

    def counted(batches):
        nonlocal tokens
        for batch in batches:
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            yield batch

    history = train(model, counted(batches), steps=settings["steps"], lr=settings["lr"],
                    weight_decay=settings["weight_decay"], warmup_steps=settings["warmup_steps"],
                    decay=True, progress=progress, description="pretraining the lab model")
    return model, history, tokens


# ---------------------------------------------------------------- saving and loading

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
REQUIRED_FILES = (WEIGHTS_FILE, "config.json", "tokenizer.json", "tokenizer_config.json", CARD_FILE)


def restore_hint(path: Path) -> str:
    """How to get a lab model back into `path`."""
    path = Path(path).resolve()
    if path == LAB_MODEL_DIR.resolve():
        return ("Restore it with `git checkout -- data/lab-model` "
                "or rebuild it with `python -m course_utils.lab.model train`.")
    return f"Rebuild it with `python -m course_utils.lab.model train --out {path}`."


def save_lab_model(model, tokenizer, out_dir: Path) -> str:
    """Write weights, config, generation config and tokenizer; return the weights' sha256."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)  # chat template inside tokenizer_config.json
    return sha256_of(out_dir / WEIGHTS_FILE)


def read_card(path: Path = LAB_MODEL_DIR) -> dict:
    card_path = Path(path) / CARD_FILE
    if not card_path.exists():
        raise CourseError(f"The lab model's card {card_path} is missing. {restore_hint(path)}")
    return json.loads(card_path.read_text())


def load_lab_model(path: Path = LAB_MODEL_DIR, device: str = "cpu"):
    """(model, tokenizer) of the lab model, after checking its weights against card.json's sha256."""
    path = Path(path)
    missing = [name for name in REQUIRED_FILES if not (path / name).exists()]
    if missing:
        raise CourseError(f"The lab model in {path} is incomplete (missing {', '.join(missing)}). {restore_hint(path)}")
    expected = read_card(path)["weights"]["sha256"]
    if sha256_of(path / WEIGHTS_FILE) != expected:
        raise CourseError(f"{path / WEIGHTS_FILE} does not match the sha256 in {CARD_FILE}: "
                          f"the weights were changed or damaged. {restore_hint(path)}")
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tokenizer


# ---------------------------------------------------------------- the command line


def build(out_dir: Path, *, finetuning_speed: bool = True, progress: bool = True, **overrides) -> dict:
    """Tokenizer, pretraining, evaluation, fine-tuning speed, card: the whole lab model from scratch."""
    from course_utils.lab import card as lab_card  # imported here: loading a model should not import `datasets`
    from course_utils.lab.readme import write_card

    stale = stale_data_files()
    if stale:  # the card's scores would be measured on test sets the code no longer writes
        raise CourseError(f"data/tasks is out of date ({', '.join(stale[:3])} ...): "
                          "run `python -m course_utils.lab.corpus write-data` first.")
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    model, history, tokens = pretrain(tokenizer, progress=progress, **overrides)
    sha256 = save_lab_model(model, tokenizer, out_dir)
    print("scoring the model on the test sets ...", flush=True)
    scores = lab_card.score_lab_model(model, tokenizer)
    speed = None
    if finetuning_speed:
        print("fine-tuning copies on each held-out task ...", flush=True)
        speed = lab_card.measure_finetuning_speed(model, tokenizer, progress=progress)
    card = lab_card.make_card(
        model=model, tokenizer=tokenizer, shape=MODEL_SHAPE, parameters=count_parameters(model),
        settings={**PRETRAINING, **overrides}, history=history,
        tokens=tokens, scores=scores, finetuning_speed=speed,
        sha256=sha256, weights_bytes=(Path(out_dir) / WEIGHTS_FILE).stat().st_size,
        total_seconds=time.perf_counter() - started)
    write_card(card, out_dir)
    return card


def evaluate(model_dir: Path, *, limit: int | None = None) -> bool:
    """Score the lab model in model_dir and check it against its card's thresholds; print both."""
    from course_utils.lab import card as lab_card

    model, tokenizer = load_lab_model(model_dir)
    thresholds = read_card(model_dir)["thresholds"]
    scores = lab_card.score_lab_model(model, tokenizer, limit=limit)
    print(lab_card.score_table(scores, thresholds))
    failures = lab_card.check_thresholds(scores, thresholds)
    for failure in failures:
        print("FAILED:", failure)
    print("all scores pass the card's thresholds" if not failures else f"{len(failures)} check(s) failed")
    return not failures


def _train_command(args) -> int:
    from course_utils.lab.card import score_table

    card = build(args.out, steps=args.steps, finetuning_speed=not args.skip_finetuning_speed,
                 progress=not args.no_progress)
    print(score_table(card["scores"], card["thresholds"]))
    failures = card["failures"]
    print(f"wrote {args.out} in {card['pretraining']['total_seconds']:.0f} s; "
          + ("all scores pass the thresholds" if not failures else "FAILED: " + "; ".join(failures)))
    return 1 if failures else 0


def _evaluate_command(args) -> int:
    return 0 if evaluate(args.dir, limit=args.limit) else 1


def _render_card_command(args) -> int:
    from course_utils.lab.readme import write_card

    write_card(read_card(args.dir), args.dir)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_utils.lab.model",
                                     description="Build or check the course's lab model.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="rebuild tokenizer, weights and card from scratch")
    train_cmd.add_argument("--out", type=Path, default=LAB_MODEL_DIR, help="where to write (default: %(default)s)")
    train_cmd.add_argument("--steps", type=int, default=PRETRAINING["steps"], help="pretraining steps")
    train_cmd.add_argument("--skip-finetuning-speed", action="store_true",
                           help="do not measure how fast copies learn the held-out tasks (saves ~1.5 min)")
    train_cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    train_cmd.set_defaults(run=_train_command)
    eval_cmd = commands.add_parser("evaluate", help="score a lab model against its card's thresholds")
    eval_cmd.add_argument("--dir", type=Path, default=LAB_MODEL_DIR, help="model directory (default: %(default)s)")
    eval_cmd.add_argument("--limit", type=int, default=None, help="score only the first N examples per test set")
    eval_cmd.set_defaults(run=_evaluate_command)
    card_cmd = commands.add_parser("render-card", help="rewrite README.md from card.json (after editing the template)")
    card_cmd.add_argument("--dir", type=Path, default=LAB_MODEL_DIR, help="model directory (default: %(default)s)")
    card_cmd.set_defaults(run=_render_card_command)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CourseError as error:
        print(error, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
