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


def test_one_module_one_notebook(tmp_path):
    a = make_notebook(tmp_path / "01_a.ipynb", "#| export demo\nA = 1")
    b = make_notebook(tmp_path / "02_b.ipynb", "#| export demo\nB = 1")
    with pytest.raises(ValueError, match="both"):
        export.all_exports([a, b])
