"""Where things live: the repository's data, build outputs and the user cache."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
LAB_MODEL_DIR = DATA_DIR / "lab-model"
TASKS_DIR = DATA_DIR / "tasks"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BUILD_DIR = Path(os.environ.get("COURSE_BUILD_DIR", REPO_ROOT / "build"))
RESULTS_DIR = BUILD_DIR / "results"


def cache_dir() -> Path:
    """The per-user cache (converted models). COURSE_CACHE_DIR overrides it."""
    if os.environ.get("COURSE_CACHE_DIR"):
        root = Path(os.environ["COURSE_CACHE_DIR"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm-finetuning-course"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (checkpoints can be large)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
