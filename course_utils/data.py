"""The course's data sets: JSON-lines files under data/tasks/, loaded as `datasets.Dataset`.

    load_task("reverse", "train")   # {"messages": [user, assistant]} rows, as TRL's SFTTrainer takes them
    load_task("general", "test")    # {"text": ...} rows
    load_task("preferences")        # {"prompt", "chosen", "rejected"} rows, as TRL's DPOTrainer takes them

The files are written by `python -m course_utils.lab.corpus write-data`; what
each task is, and which ones the lab model already knows, is in
`course_utils.lab.tasks` and data/lab-model/README.md.
"""

import difflib
import json
from pathlib import Path

from datasets import Dataset

from course_utils.errors import CourseError
from course_utils.lab.tasks import TASKS
from course_utils.paths import TASKS_DIR

SPLITS = ("train", "test")
RESTORE_HINT = ("Restore the files with `git checkout -- data/tasks` "
                "or rebuild them with `python -m course_utils.lab.corpus write-data`.")


def list_tasks(kind: str | None = None) -> list[str]:
    """Names load_task accepts. kind: "skill", "heldout", "style", or "text" / "preference"."""
    every = {"text": ["general"], "preference": ["preferences"]}
    for name, task in TASKS.items():
        every.setdefault(task.kind, []).append(name)
    if kind is None:
        return [name for names in every.values() for name in names]
    if kind not in every:
        raise CourseError(f"Unknown kind {kind!r}; the kinds are {', '.join(every)}.")
    return every[kind]


def task_path(name: str, split: str, data_dir: Path = TASKS_DIR) -> Path:
    valid = list_tasks()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CourseError(f"Unknown task {name!r}{hint}. The tasks are: {', '.join(valid)}.")
    if split not in SPLITS:
        raise CourseError(f"Unknown split {split!r}: use 'train' or 'test'.")
    return Path(data_dir) / name / f"{split}.jsonl"


def load_task(name: str, split: str = "train", *, data_dir: Path = TASKS_DIR) -> Dataset:
    """One split of a task as a `datasets.Dataset`."""
    path = task_path(name, split, data_dir)
    if not path.exists():
        raise CourseError(f"The data file {path} is missing. {RESTORE_HINT}")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return Dataset.from_list(rows)
