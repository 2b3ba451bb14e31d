"""One source of truth: notebook cells exported into the package.

A technique is written out in its notebook. A code cell that starts with

    #| export lora

is also copied, in order, into `course_utils/lora.py`, so later notebooks and
tests import the very code the learner read (d2l does the same with
`#@save`). The generated module says where it came from; edit the notebook,
then run `python -m course_utils.export` (or `make export`).
`tests/test_export.py` fails when a module and its notebook disagree.
"""

import argparse
import re
import sys
from pathlib import Path

import nbformat

from . import paths
from .notebooks import course_notebooks

PACKAGE_DIR = Path(__file__).resolve().parent
MARK = re.compile(r"^#\|\s*export\s+([A-Za-z_][A-Za-z0-9_]*)\s*$")


def export_target(cell) -> str | None:
    """The module name a cell exports to, or None."""
    if cell.cell_type != "code" or not cell.source:
        return None
    match = MARK.match(cell.source.splitlines()[0])
    return match.group(1) if match else None


def export_bodies(notebook: Path) -> dict[str, list[str]]:
    """{module name: [cell bodies in order]} for every `#| export` cell of a notebook."""
    nb = nbformat.read(notebook, as_version=4)
    bodies: dict[str, list[str]] = {}
    for cell in nb.cells:
        module = export_target(cell)
        if module:
            bodies.setdefault(module, []).append("\n".join(cell.source.splitlines()[1:]).strip("\n"))
    return bodies


def render_module(parts: list[tuple[Path, list[str]]]) -> str:
    """One module's source from its notebooks' cells, in course order.

    A module may grow over several notebooks (the memory estimator gains
    sharding in the distributed notebook, say): each later notebook's cells
    follow the earlier ones, under a comment naming where they come from.
    """
    names = " and ".join(f"notebooks/{notebook.name}" for notebook, _ in parts)
    header = (
        f'"""Exported from {names}: do not edit here.\n\n'
        "Edit the notebook's `#| export` cells, then run `python -m course_utils.export`.\n"
        '"""\n'
    )
    chunks = []
    for index, (notebook, bodies) in enumerate(parts):
        section = "\n\n\n".join(bodies)
        chunks.append(section if index == 0 else f"# ---- from notebooks/{notebook.name} ----\n\n{section}")
    return header + "\n\n" + "\n\n\n".join(chunks) + "\n"


def render_modules(notebook: Path) -> dict[str, str]:
    """{module name: module source} for the `#| export` cells of one notebook alone."""
    return {name: render_module([(notebook, bodies)]) for name, bodies in export_bodies(notebook).items()}


def all_exports(notebooks=None) -> dict[str, tuple[list[Path], str]]:
    """{module: (its notebooks, source)} across the course, each module assembled in course order."""
    parts: dict[str, list[tuple[Path, list[str]]]] = {}
    for notebook in sorted(notebooks if notebooks is not None else course_notebooks(), key=lambda p: p.name):
        for module, bodies in export_bodies(notebook).items():
            parts.setdefault(module, []).append((notebook, bodies))
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
            print(f"course_utils/{module}.py differs from its notebook: run `python -m course_utils.export`")
        return 1 if stale else 0
    for path in write_exports():
        print(f"wrote {path.relative_to(paths.REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
