"""One source of truth: course_utils modules equal their notebooks' export cells."""

import nbformat
import pytest

from course_utils import export


def make_notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# t")] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)
    return path


def test_package_matches_notebooks():
    stale = export.drifted()
    assert not stale, f"modules differ from their notebooks: {stale}; edit the notebook and run `make export`"


def test_exported_cells_are_concatenated_in_order(tmp_path):
    nb = make_notebook(tmp_path / "01_x.ipynb", "#| export demo\ndef f():\n    return 1", "x = 2", "#| export demo\ndef g():\n    return f() + 1")
    modules = export.render_modules(nb)
    assert set(modules) == {"demo"}
    source = modules["demo"]
    assert "x = 2" not in source and source.index("def f") < source.index("def g")
    namespace = {}
    exec(source, namespace)
    assert namespace["g"]() == 2


def test_write_then_no_drift(tmp_path):
    nb = make_notebook(tmp_path / "01_x.ipynb", "#| export demo\nVALUE = 3")
    assert export.drifted([nb], tmp_path) == ["demo"]
    export.write_exports([nb], tmp_path)
    assert export.drifted([nb], tmp_path) == []
    (tmp_path / "demo.py").write_text("VALUE = 4\n")  # someone edited the module by hand
    assert export.drifted([nb], tmp_path) == ["demo"]


def test_a_module_grows_over_notebooks_in_course_order(tmp_path):
    later = make_notebook(tmp_path / "10_b.ipynb", "#| export demo\ndef twice():\n    return 2 * base()")
    first = make_notebook(tmp_path / "01_a.ipynb", "#| export demo\ndef base():\n    return 21")
    modules = export.all_exports([later, first])  # given out of order: assembled in course order
    notebooks, source = modules["demo"]
    assert [nb.name for nb in notebooks] == ["01_a.ipynb", "10_b.ipynb"]
    assert source.index("def base") < source.index("# ---- from notebooks/10_b.ipynb") < source.index("def twice")
    namespace = {}
    exec(source, namespace)
    assert namespace["twice"]() == 42
    export.write_exports([first, later], tmp_path)
    assert export.drifted([first, later], tmp_path) == []
    assert export.drifted([first], tmp_path) == ["demo"]  # the later notebook's cells are part of the module
