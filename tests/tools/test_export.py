"""One source of truth: course_utils modules equal their notebooks' export cells, and read as a library."""

import importlib

import nbformat
import pytest

from course_utils.tools import export


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
    assert source.index("def base") < source.index("# %% notebooks/10_b.ipynb") < source.index("def twice")
    namespace = {}
    exec(source, namespace)
    assert namespace["twice"]() == 42
    export.write_exports([first, later], tmp_path)
    assert export.drifted([first, later], tmp_path) == []
    assert export.drifted([first], tmp_path) == ["demo"]  # the later notebook's cells are part of the module


def test_the_module_docstring_is_the_first_cells_description(tmp_path):
    nb = make_notebook(tmp_path / "01_x.ipynb", '#| export demo\n"""Demo: one idea.\n\nMore words."""\n\nVALUE = 3')
    source = export.render_modules(nb)["demo"]
    namespace = {}
    exec(source, namespace)
    assert namespace["__doc__"].startswith("Demo: one idea.")  # not "Exported from ...": provenance is a comment
    assert source.count('"""Demo') == 1  # moved to the top, not left behind as a dead second string
    assert "# Exported from notebooks/01_x.ipynb" in source


def test_each_cell_is_marked_with_its_notebook_and_section(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 01 · X"), nbformat.v4.new_markdown_cell("## 1.1 · The layer\ntext"),
                nbformat.v4.new_code_cell("#| export demo\nA = 1"),
                nbformat.v4.new_markdown_cell("```python\n# not a heading\n```\n### 1.2 · Checks"),
                nbformat.v4.new_code_cell("#| export demo\nB = 2")]
    nbformat.write(nb, tmp_path / "01_x.ipynb")
    source = export.render_modules(tmp_path / "01_x.ipynb")["demo"]
    assert source.index("# %% notebooks/01_x.ipynb · 1.1 · The layer\nA = 1") < source.index(
        "# %% notebooks/01_x.ipynb · 1.2 · Checks\nB = 2")
    assert source.startswith('"""01 · X')  # no description in the first cell: the notebook's title


@pytest.mark.parametrize("module", sorted(export.all_exports()))
def test_every_exported_module_reads_as_a_library(module):
    doc = importlib.import_module(f"course_utils.{module}").__doc__
    assert doc and not doc.startswith("Exported"), f"course_utils.{module} has no description: open its first export cell with a docstring"
    assert " · " not in doc.splitlines()[0], f"course_utils.{module}: its docstring is the notebook title fallback; write a description"
