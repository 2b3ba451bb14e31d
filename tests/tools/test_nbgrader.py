"""nbgrader (course_utils.tools.grading): the released assignment is the student copy, and autograding gives the solutions
full marks and the untouched starter zero.

generate_assignment and the starter check run on every notebook (seconds); autograde executes whole notebooks, so
it runs on notebook 00 only (the conversion is the same code for every notebook).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_utils.tools.grading import CODE_STUB, nbgrader_source, write_course
from course_utils.tools.notebooks import course_notebooks, tags
from course_utils.tools.student import student_copy

pytest.importorskip("nbgrader", reason="nbgrader is in the [instructor] extra; `make test` installs it")
NOTEBOOKS = course_notebooks()
NBGRADER = [sys.executable, "-m", "nbgrader"]


def nbgrader(course: Path, *args: str) -> str:
    # nbgrader runs `alembic` (its database migrations) from PATH: the venv's bin folder must be on it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([*NBGRADER, *args], cwd=course, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    course = tmp_path_factory.mktemp("nbgrader-course")
    write_course(course)
    return course


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_becomes_a_solution_region_and_a_graded_check(path):
    nb = nbgrader_source(nbformat.read(path, as_version=4))
    answers = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    graded = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    starters = [c for c in nbformat.read(path, as_version=4).cells if "exercise" in tags(c)]
    assert len(answers) == len(graded) == len(starters) >= 2
    assert all("### BEGIN SOLUTION" in c.source and "### END SOLUTION" in c.source for c in answers)
    assert all("assert check_exercise(" in c.source and c.metadata["nbgrader"]["points"] in (1, 2, 3) for c in graded)
    assert not [c for c in nb.cells if "solution" in tags(c)], "the hidden solution cells are folded into the answers"


def test_generate_assignment_gives_the_student_copy(course):
    for path in NOTEBOOKS:
        nbgrader(course, "generate_assignment", path.stem, "--force")
        released = nbformat.read(course / "release" / path.stem / path.name, as_version=4)
        student = student_copy(nbformat.read(path, as_version=4))
        starters = [c.source for c in student.cells if "exercise" in tags(c)]
        answers = [c.source for c in released.cells if c.metadata.get("nbgrader", {}).get("solution")]
        assert answers == starters, f"{path.name}: the released answer cells are not the course's starters"
        assert all(CODE_STUB in a for a in answers)
        text = "\n".join(c.source for c in released.cells)
        assert "BEGIN SOLUTION" not in text and "_solution(" not in text


def test_autograde_full_marks_for_solutions_and_zero_for_the_starter(course):
    from nbgrader.api import Gradebook

    path = next(p for p in NOTEBOOKS if p.name.startswith("00_"))
    assignment = path.stem
    nbgrader(course, "generate_assignment", assignment, "--force")
    for student, folder in (("solutions", "source"), ("starter", "release")):
        target = course / "submitted" / student / assignment
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(course / folder / assignment / path.name, target / path.name)
    nbgrader(course, "autograde", assignment, "--force")
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        full = gradebook.find_submission(assignment, "solutions")
        empty = gradebook.find_submission(assignment, "starter")
        assert full.max_score > 0
        assert full.score == full.max_score, f"the solutions scored {full.score} of {full.max_score}"
        assert empty.score == 0, f"the untouched starter scored {empty.score} of {empty.max_score}"
