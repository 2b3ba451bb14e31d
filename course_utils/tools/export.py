"""One source of truth: notebook cells exported into the package.

A technique is written out in its notebook. A code cell that starts with

    #| export lora

is also copied, in order, into `course_utils/lora.py`, so later notebooks and
tests import the very code the learner read (d2l does the same with
`#@save`). The generated module says where it came from; edit the notebook,
then run `python -m course_utils.tools.export` (or `make export`).
`tests/tools/test_export.py` fails when a module and its notebook disagree.
"""

import argparse
import ast
import re
import sys
from pathlib import Path

import nbformat

from course_utils import paths
from course_utils.tools.notebooks import course_notebooks

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # course_utils/, where exported modules live
MARK = re.compile(r"^#\|\s*export\s+([A-Za-z_][A-Za-z0-9_]*)\s*$")
HEADING = re.compile(r"^#{1,6}\s+\S")


def export_target(cell) -> str | None:
    """The module name a cell exports to, or None."""
    if cell.cell_type != "code" or not cell.source:
        return None
    match = MARK.match(cell.source.splitlines()[0])
    return match.group(1) if match else None


def section_title(cell) -> str | None:
    """The last heading of a markdown cell (`## 2. The layer` -> "2. The layer"), or None."""
    if cell.cell_type != "markdown":
        return None
    headings, fenced = [], False
    for line in cell.source.splitlines():
        fenced ^= line.lstrip().startswith("```")  # a `# comment` in a code block is not a heading
        if not fenced and HEADING.match(line):
            headings.append(line.lstrip("#").strip().removesuffix("(deep dive)").strip())  # the mark is not the name
    return headings[-1] if headings else None


def export_cells(notebook: Path) -> dict[str, list[tuple[str, str]]]:
    """{module name: [(section title, cell body) in order]} for every `#| export` cell of a notebook."""
    nb = nbformat.read(notebook, as_version=4)
    cells: dict[str, list[tuple[str, str]]] = {}
    section = notebook.stem
    for cell in nb.cells:
        section = section_title(cell) or section
        module = export_target(cell)
        if module:
            body = "\n".join(cell.source.splitlines()[1:]).strip("\n")
            cells.setdefault(module, []).append((section, body))
    return cells


def export_bodies(notebook: Path) -> dict[str, list[str]]:
    """{module name: [cell bodies in order]} for every `#| export` cell of a notebook."""
    return {module: [body for _, body in cells] for module, cells in export_cells(notebook).items()}


def split_docstring(body: str) -> tuple[str | None, str]:
    """(the docstring a cell body opens with, the rest of the body); (None, body) when it opens with code."""
    statements = ast.parse(body).body
    first = statements[0] if statements else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)):
        return None, body
    lines = body.splitlines()
    return first.value.value.strip(), "\n".join(lines[first.end_lineno:]).strip("\n")


def notebook_title(notebook: Path) -> str:
    """The first heading of a notebook: "02 · LoRA from scratch" and the like."""
    nb = nbformat.read(notebook, as_version=4)
    return next((title for cell in nb.cells if (title := section_title(cell))), notebook.stem)


def render_module(parts: list[tuple[Path, list[tuple[str, str]]]]) -> str:
    """One module's source from its notebooks' cells, in course order.

    The module reads as a library: its docstring is the description its first cell opens with (the notebook's
    title when there is none), provenance is a comment, and a `# %%` marker before each cell names the notebook
    and section it came from (nbdev's layout). A module may grow over several notebooks (`merging` takes task
    arithmetic from 06 and TIES/DARE/SLERP from 07): later notebooks' cells follow, in course order.
    """
    (first_notebook, first_cells), *_ = parts
    docstring, first_body = split_docstring(first_cells[0][1])
    if docstring is None:
        docstring = f"{notebook_title(first_notebook)}: the code built in notebooks/{first_notebook.name}."
    names = " and ".join(f"notebooks/{notebook.name}" for notebook, _ in parts)
    header = (
        f'"""{docstring}\n"""\n\n'
        f"# Exported from {names}: do not edit here.\n"
        "# Edit the `#| export` cells there, then run `make export`.\n"
    )
    chunks = []
    for index, (notebook, cells) in enumerate(parts):
        for position, (section, body) in enumerate(cells):
            if index == 0 and position == 0:
                body = first_body
            chunks.append(f"# %% notebooks/{notebook.name} · {section}\n{body}".rstrip("\n"))
    return header + "\n\n" + "\n\n\n".join(chunks) + "\n"


def render_modules(notebook: Path) -> dict[str, str]:
    """{module name: module source} for the `#| export` cells of one notebook alone."""
    return {name: render_module([(notebook, cells)]) for name, cells in export_cells(notebook).items()}


def all_exports(notebooks=None) -> dict[str, tuple[list[Path], str]]:
    """{module: (its notebooks, source)} across the course, each module assembled in course order."""
    parts: dict[str, list[tuple[Path, list[tuple[str, str]]]]] = {}
    for notebook in sorted(notebooks if notebooks is not None else course_notebooks(), key=lambda p: p.name):
        for module, cells in export_cells(notebook).items():
            parts.setdefault(module, []).append((notebook, cells))
    return {module: ([nb for nb, _ in found], render_module(found)) for module, found in parts.items()}


def _stale(notebooks, package_dir: Path) -> dict[str, tuple[Path, str]]:
    """{module: (target file, source)} for modules whose file differs from their notebook's cells."""
    stale = {}
    for module, (_, source) in all_exports(notebooks).items():
        target = package_dir / f"{module}.py"
        if not target.exists() or target.read_text() != source:
            stale[module] = (target, source)
    return stale


def drifted(notebooks=None, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Modules whose file differs from what their notebook exports."""
    return list(_stale(notebooks, package_dir))


def write_exports(notebooks=None, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Rewrite the modules that drifted; return their paths."""
    written = []
    for target, source in _stale(notebooks, package_dir).values():
        target.write_text(source)
        written.append(target)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Export notebook cells marked '#| export MODULE' into course_utils/.")
    parser.add_argument("--check", action="store_true", help="only report modules that differ from their notebook")
    args = parser.parse_args(argv)
    if args.check:
        stale = drifted()
        for module in stale:
            print(f"course_utils/{module}.py differs from its notebook: run `python -m course_utils.tools.export`")
        return 1 if stale else 0
    for path in write_exports():
        print(f"wrote {path.relative_to(paths.REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
