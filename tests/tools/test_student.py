"""Student copies (course_utils.tools.student, `make student`): no solution survives, and the copy still runs.

A solution cell's lines are searched for in the whole student copy, except lines that also appear outside the
solution cells of the instructor's notebook (an `import torch` is no secret). A student copy keeps every other cell
unchanged, so its exercise section is exactly what tests/test_exercise_cells.py runs as "the starter" (every check
reports "not attempted", nothing fails); notebooks 00, 01 and 10's student copies also run end to end under nbval here.
"""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_utils.tools.notebooks import course_notebooks, tags
from course_utils.tools.student import is_solution, student_copy, write_student_copies

NOTEBOOKS = course_notebooks()
REPO = Path(__file__).resolve().parents[2]


def secret_lines(nb) -> dict[int, list[str]]:
    """{index of a solution cell: its lines that appear nowhere else in the instructor's notebook}."""
    public = {line.strip() for cell in nb.cells if not is_solution(cell) for line in cell.source.splitlines()}
    secrets = {}
    for index, cell in enumerate(nb.cells):
        if is_solution(cell):
            secrets[index] = [line.strip() for line in cell.source.splitlines()
                              if len(line.strip()) >= 12 and line.strip() not in public]
    return secrets


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_solution_body_survives(path):
    nb = nbformat.read(path, as_version=4)
    student = student_copy(nb)
    student_lines = {line.strip() for cell in student.cells for line in cell.source.splitlines()}
    secrets = secret_lines(nb)
    assert secrets, f"{path.name} has no solution cells to remove"
    for index, lines in secrets.items():
        assert lines, f"{path.name}: solution cell {index} has no line of its own to look for"
        leaked = [line for line in lines if line in student_lines]
        assert not leaked, f"{path.name}: the student copy still holds solution lines {leaked[:3]}"
    assert not any(is_solution(cell) for cell in student.cells)
    assert not any(cell.get("outputs") for cell in student.cells if cell.cell_type == "code")
    # everything else is kept: the starters and checks a learner needs
    kept = [cell for cell in nb.cells if not is_solution(cell)]
    assert [c.source for c in student.cells] == [c.source for c in kept]


def test_instructor_notebooks_are_left_as_they_are(tmp_path):
    before = {p.name: p.read_bytes() for p in NOTEBOOKS}
    written = write_student_copies(tmp_path)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    assert {p.name: p.read_bytes() for p in NOTEBOOKS} == before


@pytest.mark.parametrize("number", ["00", "01", "10"])
def test_student_copy_runs_under_nbval(tmp_path, number):
    """Three of the quicker notebooks, end to end as a student gets them (every check: "not attempted")."""
    (copy,) = write_student_copies(tmp_path, [p for p in NOTEBOOKS if p.name.startswith(f"{number}_")])
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p", "no:cacheprovider",
                             "--nbval-cell-timeout=600", str(copy)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert all("solution" not in tags(c) for c in nbformat.read(copy, as_version=4).cells)
