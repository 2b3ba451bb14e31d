"""The synthetic corpus and the data set files: deterministic, committed, and honest about what is held out."""

import itertools
import random
from pathlib import Path

import pytest
from datasets import Dataset

from course_utils.data import list_tasks, load_task
from course_utils.errors import CourseError
from course_utils.lab.corpus import (data_files, general_texts, preference_rows, pretraining_stream, stale_data_files,
                                     task_pairs)
from course_utils.lab.tasks import STYLE_MARKER, TASKS, strip_style, style_score, with_style
from course_utils.lab.world import PEOPLE, general_document
from course_utils.paths import TASKS_DIR

STREAM_SAMPLE = 20_000  # documents of the pretraining stream to inspect


@pytest.fixture(scope="module")
def stream_sample():
    return list(itertools.islice(pretraining_stream(), STREAM_SAMPLE))


def test_the_corpus_is_deterministic(stream_sample):
    assert list(itertools.islice(pretraining_stream(), 500)) == stream_sample[:500]
    assert list(itertools.islice(pretraining_stream(seed=1), 50)) != stream_sample[:50]
    assert [general_document(random.Random(7)) for _ in range(3)] == [general_document(random.Random(7))] * 3


def test_committed_data_files_equal_a_fresh_generation():
    """The files were written by another process: equal files also prove the seeds do not depend on it."""
    committed = sorted(str(p.relative_to(TASKS_DIR)) for p in TASKS_DIR.rglob("*.jsonl"))
    assert committed == sorted(data_files()), "data/tasks/ has missing or extra files"
    assert stale_data_files() == [], "run `python -m course_utils.lab.corpus write-data`"


def test_heldout_tasks_never_appear_in_pretraining(stream_sample):
    instructions = {pair[0].split(":")[0] + ":" for name in list_tasks("heldout") for pair in task_pairs(name, "test")}
    assert instructions == {"Reverse:", "Sort:", "Add:", "Translate:"}
    for doc in stream_sample:
        text = doc.get("text") or " ".join(m["content"] for m in doc["messages"])
        assert not any(text.startswith(i) for i in instructions), doc
    sources = {doc["messages"][0]["content"].split(":")[0] for doc in stream_sample if "messages" in doc}
    assert {"Repeat", "First word", "Last word", "Count"} <= sources


def test_no_test_example_of_an_endless_task_is_trained_on(stream_sample):
    seen = {doc["messages"][0]["content"] for doc in stream_sample if "messages" in doc}
    seen_texts = {doc["text"] for doc in stream_sample if "text" in doc}
    for name, task in TASKS.items():
        test_prompts = {p for p, _ in task_pairs(name, "test")}
        if task.finite:
            assert len(test_prompts) == len(task.every())
            continue
        assert not test_prompts & seen, name
        assert not test_prompts & {p for p, _ in task_pairs(name, "train")}, name
    assert not set(general_texts("test")) & (seen_texts | set(general_texts("train")))


def test_copying_the_input_never_answers_a_heldout_task():
    for name in list_tasks("heldout"):
        for prompt, answer in task_pairs(name, "test") + task_pairs(name, "train", 500):
            given = prompt.split(":", 1)[1].strip()
            assert answer != given and answer not in given.split(), (name, prompt)
    for prompt, _ in task_pairs("reverse", "test"):
        assert len(set(prompt.split()[1:])) >= 3


def test_test_sets_are_small_and_balanced_enough():
    for name in TASKS:
        assert 36 <= len(task_pairs(name, "test")) <= 200
    counts = [answer for _, answer in task_pairs("count", "test")]
    assert set(counts) == {str(n) for n in range(2, 9)}


def test_style_marker_rate_in_the_corpus_is_about_four_in_ten(stream_sample):
    answers = [doc["messages"][1]["content"] for doc in stream_sample
               if "messages" in doc and doc["messages"][0]["content"].startswith("Tell me about")]
    rate = sum(map(style_score, answers)) / len(answers)
    assert len(answers) > 1000 and 0.36 < rate < 0.44


def test_style_score_and_strip_style():
    assert style_score(f"Mia has a cat. {STYLE_MARKER}") == 1
    assert style_score("Mia has a cat.") == 0
    assert style_score(f"{STYLE_MARKER} Mia has a cat.") == 0
    assert strip_style(with_style("Mia has a cat.")) == "Mia has a cat."


def test_preference_pairs_differ_only_in_style():
    train, test = preference_rows("train"), preference_rows("test")
    assert len(train) + len(test) == len(PEOPLE) * 4
    for row in train + test:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert style_score(chosen) == 1 and style_score(rejected) == 0
        assert strip_style(chosen) == rejected
    train_prompts = {r["prompt"][0]["content"] for r in train}
    assert not train_prompts & {r["prompt"][0]["content"] for r in test}


def test_load_task_gives_datasets_in_trl_formats():
    reverse = load_task("reverse", "test")
    assert isinstance(reverse, Dataset) and len(reverse) == 200
    assert [m["role"] for m in reverse[0]["messages"]] == ["user", "assistant"]
    assert load_task("general", "train").column_names == ["text"]
    assert load_task("preferences", "train").column_names == ["prompt", "chosen", "rejected"]
    assert set(list_tasks("heldout")) == {"reverse", "sort_digits", "add", "translate"}
    assert set(list_tasks()) == {p.name for p in TASKS_DIR.iterdir() if p.is_dir()}


def test_unknown_task_names_list_the_valid_ones(tmp_path: Path):
    with pytest.raises(CourseError, match="did you mean .reverse.*translate"):
        load_task("revers")
    with pytest.raises(CourseError, match="'train' or 'test'"):
        load_task("reverse", "validation")
    with pytest.raises(CourseError, match="write-data"):
        load_task("reverse", data_dir=tmp_path)
