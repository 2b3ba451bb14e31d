"""nbgrader for classroom labs: the course's notebooks as nbgrader source assignments.

nbgrader releases, collects and grades notebooks. It expects, in its source
notebooks, the answer inside the learner's cell between `### BEGIN SOLUTION`
and `### END SOLUTION` (replaced by a stub in the released copy), and graded
test cells that raise when the answer is wrong. The course keeps its answers
in separate hidden cells instead, so this module converts each notebook:

- the starter cell (tag `exercise`) gets the hidden solution's code inside its
  function, between the markers: `nbgrader generate_assignment` turns it back
  into the starter exactly (`raise NotImplementedError  # your code here`);
- the check cell (tag `check`) becomes an autograded test cell worth 1, 2 or 3
  points (easy, medium, hard), whose `check_exercise(...)` is asserted, so an
  unattempted exercise scores 0;
- the hidden solution cell is left out.

    python -m course_utils.tools.grading build/nbgrader    # a course folder: source/NN_name/NN_name.ipynb + config
    cd build/nbgrader && nbgrader generate_assignment 06_task_arithmetic
"""

import argparse
import ast
import re
import textwrap
from pathlib import Path

import nbformat

from course_utils import paths
from course_utils.errors import CourseError
from course_utils.tools.notebooks import course_notebooks, strip_outputs, tags, write_transformed

NBGRADER_DIR = paths.BUILD_DIR / "nbgrader"
CODE_STUB = "raise NotImplementedError  # your code here"  # the course's starter line, nbgrader's stub
POINTS = {"easy": 1, "medium": 2, "hard": 3}
CONFIG = f'''# nbgrader configuration for the course (written by python -m course_utils.tools.grading).
c = get_config()  # noqa: F821
c.CourseDirectory.root = "."
c.ClearSolutions.code_stub = {{"python": "{CODE_STUB}"}}
# nbgrader's default cell timeout is 30 s; the course's notebooks train models in some cells.
c.Execute.timeout = 600
c.ExecutePreprocessor.timeout = 600
'''


def _segment(lines: list[str], node) -> list[str]:
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return lines[start - 1:node.end_lineno]


def solution_region(solution_source: str, name: str) -> list[str]:
    """The lines that go between the markers in `name`'s body: the solution cell's other statements (imports,
    helpers; the final `assert check_exercise(...)` left out) and the body of `name`_solution, indented as a body."""
    lines = solution_source.splitlines()
    tree = ast.parse(solution_source)
    prelude, body = [line for line in lines if line.startswith("#")], None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == f"{name}_solution":
            body = lines[node.body[0].lineno - 1:node.end_lineno]
        elif isinstance(node, ast.Assert) and "check_exercise" in ast.unparse(node):
            continue
        else:
            prelude += _segment(lines, node)
    if body is None:
        raise CourseError(f"The solution cell defines no {name}_solution.")
    return [textwrap.indent(line, "    ") if line.strip() else "" for line in prelude] + body


def _tier(markdown: str) -> str:
    match = re.search(r"\((easy|medium|hard)\)", markdown)
    return match.group(1) if match else "medium"


def nbgrader_source(nb):
    """A copy of notebook `nb` in nbgrader's source format (see the module docstring)."""
    nb = strip_outputs(nbformat.from_dict(nb))
    solution_cells = [cell for cell in nb.cells if cell.cell_type == "code" and "solution" in tags(cell)]
    cells, last_markdown, number = [], "", 0
    for cell in nb.cells:
        kinds = tags(cell) if cell.cell_type == "code" else []
        if cell.cell_type == "markdown":
            last_markdown = cell.source
        if "solution" in kinds:
            continue
        if "exercise" in kinds:
            number += 1
            names = [node.name for node in ast.parse(cell.source).body if isinstance(node, ast.FunctionDef)]
            if len(names) != 1:
                raise CourseError(f"A starter cell defines {names}: the nbgrader conversion expects one function.")
            owner = next((c for c in solution_cells if f"def {names[0]}_solution" in c.source), None)
            if owner is None:
                raise CourseError(f"No solution cell defines {names[0]}_solution.")
            lines = cell.source.splitlines()
            stub = next(i for i, line in enumerate(lines) if "raise NotImplementedError" in line)
            indent = lines[stub][:len(lines[stub]) - len(lines[stub].lstrip())]
            region = [indent + "### BEGIN SOLUTION", *solution_region(owner.source, names[0]), indent + "### END SOLUTION"]
            cell.source = "\n".join(lines[:stub] + region + lines[stub + 1:])
            cell.metadata["nbgrader"] = {"grade": False, "grade_id": f"answer-{number}", "locked": False,
                                         "schema_version": 3, "solution": True, "task": False}
        elif "check" in kinds:
            cell.source = re.sub(r"^check_exercise\(", "assert check_exercise(", cell.source, flags=re.M)
            if "assert check_exercise(" not in cell.source:
                raise CourseError("A check cell must call check_exercise(...) at the start of a line.")
            cell.metadata["nbgrader"] = {"grade": True, "grade_id": f"check-{number}", "locked": True,
                                         "points": POINTS[_tier(last_markdown)], "schema_version": 3,
                                         "solution": False, "task": False}
        cells.append(cell)
    if not number:
        raise CourseError("This notebook has no exercises to grade.")
    nb.cells = cells
    return nb


def write_course(course_dir: Path = NBGRADER_DIR, notebooks=None) -> list[Path]:
    """An nbgrader course folder: nbgrader_config.py and source/NN_name/NN_name.ipynb for each notebook."""
    course_dir = Path(course_dir)
    course_dir.mkdir(parents=True, exist_ok=True)
    (course_dir / "nbgrader_config.py").write_text(CONFIG)
    return write_transformed(nbgrader_source, lambda path: course_dir / "source" / path.stem / path.name, notebooks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the course's notebooks as an nbgrader course folder.")
    parser.add_argument("out", nargs="?", default=str(NBGRADER_DIR), help=f"course folder (default {NBGRADER_DIR})")
    args = parser.parse_args(argv)
    written = write_course(Path(args.out))
    print(f"wrote {len(written)} nbgrader source assignments and nbgrader_config.py to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
