"""Student copies: the course's notebooks without their solutions.

The repository's notebooks are the instructor's copy: every exercise has a
hidden solution cell (tagged `solution`, CONTRIBUTING.md). Hiding is not
removing, so a learner's copy must not contain them at all:

    python -m course_utils.tools.student            # or: make student
    -> build/student/NN_name.ipynb            # no solution cells, no outputs

What a student copy keeps: every other cell, unchanged, so each exercise
still has its starter (`raise NotImplementedError`) and its check, which
reports "not attempted" until the learner writes the function.
`tests/tools/test_student.py` greps every student copy for each solution's body.
"""

import argparse
from pathlib import Path

import nbformat

from course_utils import paths
from course_utils.tools.notebooks import course_notebooks, strip_outputs, tags, write_transformed
from course_utils.tools.path import core_copy

STUDENT_DIR = paths.BUILD_DIR / "student"
CORE_DIR = paths.BUILD_DIR / "student-core"
SOLUTION_TAG = "solution"


def is_solution(cell) -> bool:
    return cell.cell_type == "code" and SOLUTION_TAG in tags(cell)


def student_copy(nb):
    """A copy of notebook `nb` without its solution cells and without outputs."""
    copy = nbformat.from_dict(nb)  # a deep copy: the instructor's notebook is left as it is
    copy.cells = [cell for cell in copy.cells if not is_solution(cell)]
    copy.metadata["course"] = {"copy": "student"}
    return strip_outputs(copy)


def write_student_copies(out_dir: Path = STUDENT_DIR, notebooks=None, *, core: bool = False) -> list[Path]:
    """Write a student copy of every course notebook (or of `notebooks`) into `out_dir`.

    `core=True`: a core copy for a one-day class: the deep dives' cells collapsed (course_utils.tools.path).
    """
    out_dir = Path(out_dir)
    transform = (lambda nb: core_copy(student_copy(nb))) if core else student_copy
    return write_transformed(transform, lambda path: out_dir / path.name, notebooks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the student copies of the course's notebooks (no solutions).")
    parser.add_argument("out", nargs="?", help=f"folder to write into (default {STUDENT_DIR}, with --core {CORE_DIR})")
    parser.add_argument("--core", action="store_true", help="collapse the deep dives: a copy for the core path")
    args = parser.parse_args(argv)
    args.out = args.out or str(CORE_DIR if args.core else STUDENT_DIR)
    written = write_student_copies(Path(args.out), core=args.core)
    removed = sum(sum(map(is_solution, nbformat.read(p, as_version=4).cells)) for p in course_notebooks())
    print(f"wrote {len(written)} student notebooks to {args.out} ({removed} solution cells left out)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
