"""Reading course notebooks: the ordered list, tags, parameter injection.

Parameters follow the papermill convention: the cell tagged `parameters`
holds the defaults (SEED, PROFILE, sizes), and an override is a new cell
placed right after it. `make course SEED=3` and `make test SEED=3` both
inject through `parameter_cell()`, so a claim can be checked for any seed.
"""

import os
from pathlib import Path

import nbformat

from course_utils import paths

# Environment variables that override notebook parameters, and their names in the notebook.
PARAMETER_ENV = {"COURSE_SEED": "SEED", "COURSE_PROFILE": "PROFILE"}


def course_notebooks(folder: Path = paths.NOTEBOOKS_DIR) -> list[Path]:
    """The course's notebooks in teaching order (NN_name.ipynb)."""
    return sorted(p for p in Path(folder).glob("[0-9][0-9]_*.ipynb"))


def tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def parameters_index(nb) -> int | None:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in tags(cell):
            return i
    return None


def overrides_from_env(environ=os.environ) -> dict:
    """Parameter overrides requested through COURSE_SEED / COURSE_PROFILE."""
    found = {}
    for env, name in PARAMETER_ENV.items():
        if environ.get(env):
            found[name] = int(environ[env]) if name == "SEED" else environ[env]
    return found


def parameter_cell(overrides: dict):
    """A code cell that sets the overridden parameters (tagged like papermill's)."""
    source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    return cell


def inject_parameters(nb, overrides: dict):
    """Insert the override cell after the `parameters` cell (in place); returns nb."""
    if not overrides:
        return nb
    index = parameters_index(nb)
    if index is None:
        raise ValueError("notebook has no cell tagged 'parameters' to override")
    nb.cells.insert(index + 1, parameter_cell(overrides))
    return nb


def strip_outputs(nb):
    """Remove outputs and execution counts (what git should hold)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    return nb


def write_transformed(transform, target_of, notebooks=None) -> list[Path]:
    """Write `transform(nb)` of every course notebook (or of `notebooks`) to `target_of(path)`; returns the targets."""
    written = []
    for path in notebooks or course_notebooks():
        target = Path(target_of(Path(path)))
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(transform(nbformat.read(path, as_version=4)), target)
        written.append(target)
    return written


def has_outputs(nb) -> bool:
    return any(c.cell_type == "code" and (c.outputs or c.execution_count) for c in nb.cells)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Notebook housekeeping.")
    sub = parser.add_subparsers(dest="command", required=True)
    strip = sub.add_parser("strip", help="remove outputs in place (git holds notebooks without outputs)")
    strip.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    for name in args.files:
        nb = nbformat.read(name, as_version=4)
        if has_outputs(nb):
            nbformat.write(strip_outputs(nb), name)
            print(f"stripped {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
