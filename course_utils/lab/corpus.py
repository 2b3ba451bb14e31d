"""The lab model's corpus: the pretraining mixture and the data set files under data/tasks/.

Everything here is a pure function of fixed seeds, so every run writes the same
bytes. `python -m course_utils.lab.corpus write-data` (re)writes data/tasks/:

    data/tasks/general/{train,test}.jsonl       {"text": ...}
    data/tasks/<task>/{train,test}.jsonl        {"messages": [user, assistant]}
    data/tasks/preferences/{train,test}.jsonl   {"prompt": [user], "chosen": [assistant], "rejected": [assistant]}

The pretraining stream (`pretraining_stream`) mixes general text with the base
skills and the style task; the held-out tasks are never in it, and neither is
any test example of an endless task (test prompts are checked and skipped).
"""

import argparse
import itertools
import json
import random
import zlib
from pathlib import Path
from typing import Iterator

from course_utils.lab.tasks import STYLE_MARKER, STYLE_RATE, TASKS, chat, every_description, tasks_of_kind, with_style
from course_utils.lab.world import PEOPLE, general_document
from course_utils.paths import TASKS_DIR

# Share of each source in the pretraining stream (documents, not tokens).
PRETRAINING_MIXTURE = {
    "general": 0.40,
    "copy": 0.12,
    "first_word": 0.09,
    "last_word": 0.09,
    "count": 0.12,
    "fact": 0.10,
    "describe": 0.08,
}

# Examples per split; a finite task's test set is its whole space instead.
TRAIN_SIZE = {"skill": 1000, "heldout": 2000, "style": 1000}
TEST_SIZE = 200
GENERAL_SIZE = {"train": 2000, "test": 200}
# Preference pairs: the describe prompts of these people are the test split.
PREFERENCE_TEST_PEOPLE = {p.name for p in PEOPLE[-4:]}


def seeded_rng(*parts: str) -> random.Random:
    """A generator seeded by a stable hash of its name (not Python's salted hash())."""
    return random.Random(zlib.crc32("/".join(parts).encode()))


def _distinct(draw, n: int) -> list:
    """n distinct values from draw() (in the order they first appear)."""
    seen = {}
    while len(seen) < n:
        value = draw()
        seen.setdefault(value, None)
    return list(seen)


def task_pairs(name: str, split: str, n: int | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of one split of a task; n overrides the train size."""
    return _test_pairs(name) if split == "test" else _train_pairs(name, n)


def _test_pairs(name: str) -> list[tuple[str, str]]:
    task = TASKS[name]
    if task.finite:
        return task.every()
    rng = seeded_rng(name, "test")
    return _distinct(lambda: task.make(rng), TEST_SIZE)


def _test_prompts() -> set[str]:
    """Prompts of endless tasks that training and pretraining must never show."""
    return {prompt for name, task in TASKS.items() if not task.finite for prompt, _ in _test_pairs(name)}


def _corpus_answer(task_name: str, answer: str, rng: random.Random) -> str:
    """How the corpus says an answer: style answers carry the marker in a share STYLE_RATE."""
    if TASKS[task_name].kind == "style" and rng.random() < STYLE_RATE:
        return with_style(answer)
    return answer


def _train_pairs(name: str, n: int | None) -> list[tuple[str, str]]:
    """Training pairs of a task, none with a test prompt of an endless task."""
    task = TASKS[name]
    n = TRAIN_SIZE[task.kind] if n is None else n
    rng = seeded_rng(name, "train")
    forbidden = set() if task.finite else {p for p, _ in _test_pairs(name)}
    pairs = []
    while len(pairs) < n:
        prompt, answer = task.draw(rng)
        if prompt not in forbidden:
            pairs.append((prompt, _corpus_answer(name, answer, rng)))
    return pairs


def task_rows(name: str, split: str) -> list[dict]:
    return [{"messages": chat(prompt, answer)} for prompt, answer in task_pairs(name, split)]


def general_texts(split: str) -> list[str]:
    """General text documents. Test documents never occur in train or pretraining."""
    rng = seeded_rng("general", split)
    if split == "test":
        return _distinct(lambda: general_document(rng), GENERAL_SIZE["test"])
    forbidden = set(general_texts("test"))
    texts = []
    while len(texts) < GENERAL_SIZE[split]:
        text = general_document(rng)
        if text not in forbidden:
            texts.append(text)
    return texts


def preference_rows(split: str) -> list[dict]:
    """Chosen = the describe answer with the polite closing, rejected = without: only the style differs."""
    people = [p for p in PEOPLE if (p.name in PREFERENCE_TEST_PEOPLE) == (split == "test")]
    return [{"prompt": [{"role": "user", "content": prompt}],
             "chosen": [{"role": "assistant", "content": with_style(answer)}],
             "rejected": [{"role": "assistant", "content": answer}]}
            for prompt, answer in every_description(people)]


def pretraining_stream(seed: int = 0) -> Iterator[dict]:
    """An endless, seeded stream of pretraining documents: {"text": ...} or {"messages": ...}."""
    rng = random.Random(seed)
    names, weights = zip(*PRETRAINING_MIXTURE.items())
    forbidden = _test_prompts() | set(general_texts("test"))
    assert not set(names) & set(tasks_of_kind("heldout")), "held-out tasks must stay out of pretraining"
    while True:
        source = rng.choices(names, weights)[0]
        if source == "general":
            text = general_document(rng)
            if text not in forbidden:
                yield {"text": text}
            continue
        prompt, answer = TASKS[source].draw(rng)
        if prompt not in forbidden:
            yield {"messages": chat(prompt, _corpus_answer(source, answer, rng))}


def describe_corpus() -> dict:
    """What the model card says about the corpus: mixture, tasks with an example each, sizes, the world."""
    preference = preference_rows("train")[0]
    return {
        "pretraining_mixture": PRETRAINING_MIXTURE,
        "general": {"example": general_texts("test")[0], "sizes": GENERAL_SIZE},
        "tasks": {
            name: {
                "kind": task.kind,
                "description": task.description,
                "example": dict(zip(("prompt", "answer"), _test_pairs(name)[0])),
                "sizes": {"train": TRAIN_SIZE[task.kind], "test": len(_test_pairs(name))},
                "test_is_whole_space": task.finite,
            }
            for name, task in TASKS.items()
        },
        "style": {"marker": STYLE_MARKER, "rate_in_corpus": STYLE_RATE},
        "preferences": {"example": preference,
                        "sizes": {split: len(preference_rows(split)) for split in ("train", "test")}},
        "world": [vars(p) for p in PEOPLE],
    }


def data_files() -> dict[str, str]:
    """Every data set file as {relative path: JSON-lines content}."""
    def jsonl(rows):
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    files = {}
    for split in ("train", "test"):
        files[f"general/{split}.jsonl"] = jsonl({"text": t} for t in general_texts(split))
        files[f"preferences/{split}.jsonl"] = jsonl(preference_rows(split))
        for name in TASKS:
            files[f"{name}/{split}.jsonl"] = jsonl(task_rows(name, split))
    return files


def stale_data_files(data_dir: Path = TASKS_DIR) -> list[str]:
    """Data set files that are missing or differ from what the code generates now."""
    return [relative for relative, content in data_files().items()
            if not (Path(data_dir) / relative).exists()
            or (Path(data_dir) / relative).read_text(encoding="utf-8") != content]


def write_data(out_dir: Path = TASKS_DIR) -> list[Path]:
    """Write every data set file; delete .jsonl files of tasks that no longer exist."""
    out_dir = Path(out_dir)
    files = data_files()
    for stale in out_dir.glob("*/*.jsonl"):
        if str(stale.relative_to(out_dir)) not in files:
            stale.unlink()
            if not any(stale.parent.iterdir()):
                stale.parent.rmdir()
    written = []
    for relative, content in files.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m course_utils.lab.corpus", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write-data", help="(re)write the data set files")
    write.add_argument("--out", type=Path, default=TASKS_DIR)
    show = commands.add_parser("show", help="print the first documents of the pretraining stream")
    show.add_argument("-n", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "write-data":
        paths = write_data(args.out)
        print(f"wrote {len(paths)} files under {args.out}")
    else:
        for doc in itertools.islice(pretraining_stream(), args.n):
            print(doc)


if __name__ == "__main__":
    main()
