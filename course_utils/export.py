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


def render_modules(notebook: Path) -> dict[str, str]:
    """{module name: module source} for every `#| export` cell of a notebook."""
    nb = nbformat.read(notebook, as_version=4)
    bodies: dict[str, list[str]] = {}
    for cell in nb.cells:
        module = export_target(cell)
        if module:
            body = "\n".join(cell.source.splitlines()[1:]).strip("\n")
            bodies.setdefault(module, []).append(body)
    header = (
        f'"""Exported from notebooks/{notebook.name}: do not edit here.\n\n'
        "Edit the notebook's `#| export` cells, then run `python -m course_utils.export`.\n"
        '"""\n'
    )
    return {name: header + "\n\n" + "\n\n\n".join(parts) + "\n" for name, parts in bodies.items()}


def all_exports(notebooks=None) -> dict[str, tuple[Path, str]]:
    """{module: (notebook, source)} across the course; one notebook per module."""
    found: dict[str, tuple[Path, str]] = {}
    for notebook in notebooks if notebooks is not None else course_notebooks():
        for module, source in render_modules(notebook).items():
            if module in found:
                raise ValueError(f"module {module!r} is exported by both {found[module][0].name} and {notebook.name}")
            found[module] = (notebook, source)
    return found


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
