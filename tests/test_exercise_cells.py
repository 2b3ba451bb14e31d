"""Every notebook's exercises, run three ways: starter, wrong answer, hidden solution.

The exercise format (CONTRIBUTING.md, "Exercises"): a starter cell tagged
`exercise`, a check cell tagged `check`, a hidden solution cell tagged
`solution` that defines `fn_solution`, and one `exercise-setup` cell that
builds what the checks need. Only the exercise section runs here, with its
setup, so this costs seconds per notebook rather than a whole execution:

1. starter: every check reports "not attempted" and nothing fails (what a
   learner, and a student copy without solution cells, sees first);
2. a plausible wrong answer per exercise (`tests/exercise_answers/<nb>.py`):
   every check fails with a message;
3. the solutions: every solution cell passes, and so does every check cell
   with the learner's name bound to the solution.
"""

import ast
import contextlib
import io
import os
from pathlib import Path

import nbformat
import pytest

from course_utils.tools.notebooks import course_notebooks, overrides_from_env, tags

ANSWERS_DIR = Path(__file__).parent / "exercise_answers"
NOTEBOOKS = course_notebooks()


def exercise_cells(nb):
    """{'parameters': cell, 'setup': [cells], 'steps': [(kind, cell)] in notebook order}."""
    found = {"parameters": None, "setup": [], "steps": []}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kinds = tags(cell)
        if "parameters" in kinds:
            found["parameters"] = cell
        if "exercise-setup" in kinds:
            found["setup"].append(cell)
        for kind in ("exercise", "check", "solution"):
            if kind in kinds:
                found["steps"].append((kind, cell))
    return found


def defined_functions(source: str) -> list[str]:
    return [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]


def run(source: str, namespace: dict, label: str) -> str:
    """Execute one cell's source in `namespace`; return what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, label, "exec"), namespace)
    return out.getvalue()


@pytest.fixture(autouse=True)
def _cpu_and_agg(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("COURSE_PROFILE", os.environ.get("COURSE_PROFILE", "cpu"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exercises_three_ways(path):
    nb = nbformat.read(path, as_version=4)
    cells = exercise_cells(nb)
    steps = cells["steps"]
    if not steps:
        pytest.fail(f"{path.name}: no cells tagged exercise/check/solution (CONTRIBUTING.md, 'Exercises')")
    assert len(cells["setup"]) == 1, f"{path.name}: the Exercises section begins with one cell tagged exercise-setup"
    starters = [c for kind, c in steps if kind == "exercise"]
    checks = [c for kind, c in steps if kind == "check"]
    names = [name for cell in starters for name in defined_functions(cell.source)]
    assert names, f"{path.name}: the exercise cells define no function"

    answers_file = ANSWERS_DIR / f"{path.stem}.py"
    assert answers_file.exists(), f"write a plausible wrong answer per exercise in {answers_file.relative_to(Path.cwd()) if answers_file.is_relative_to(Path.cwd()) else answers_file}"
    wrong_source = answers_file.read_text()
    missing = sorted(set(names) - set(defined_functions(wrong_source)))
    assert not missing, f"{answers_file.name} has no wrong answer for {missing}"

    import matplotlib

    matplotlib.use("Agg")
    namespace: dict = {"__name__": "__exercises__"}
    run("from course_utils.runtime import default_profile, setup", namespace, "imports")
    run(cells["parameters"].source, namespace, "parameters")
    overrides = overrides_from_env()
    namespace.update(overrides)
    run(cells["setup"][0].source, namespace, "exercise-setup")

    # 1. The starter: every check cell says "not attempted" and raises nothing.
    for number, (kind, cell) in enumerate(steps):
        if kind == "solution":
            continue
        printed = run(cell.source, namespace, f"{kind} cell {number}")
        if kind == "check":
            assert "not attempted" in printed, f"{path.name}: a check cell did not report 'not attempted' for the starter:\n{cell.source}"

    # 2. Plausible wrong answers: every check cell fails, with a message.
    run(wrong_source, namespace, answers_file.name)
    for cell in checks:
        with pytest.raises(AssertionError) as failure:
            run(cell.source, namespace, "check cell (wrong answer)")
        assert str(failure.value).strip(), f"{path.name}: a failing check must say what differs"

    # 3. The solutions pass, and the visible checks accept them under the learner's names.
    for kind, cell in steps:
        if kind == "solution":
            run(cell.source, namespace, "solution cell")
    for name in names:
        assert f"{name}_solution" in namespace, f"{path.name}: the solution cells define no {name}_solution"
        namespace[name] = namespace[f"{name}_solution"]
    for cell in checks:
        printed = run(cell.source, namespace, "check cell (solution)")
        assert "not attempted" not in printed and "passed" in printed, f"{path.name}: a check cell does not pass the solution:\n{cell.source}"
