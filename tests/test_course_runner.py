"""`make course` machinery: parameter injection, execution records, the table."""

import nbformat
import pytest

from course_utils import course, notebooks, paths, results
from course_utils.errors import CourseError


@pytest.fixture
def build(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "BUILD_DIR", tmp_path / "build")
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path / "build" / "results")
    return tmp_path / "build"


def tiny_notebook(path, body):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("SEED = 0\nPROFILE = 'cpu'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Tiny"), params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_injected_parameters_follow_the_parameters_cell():
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("SEED = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_code_cell("import x"), params, nbformat.v4.new_code_cell("use(SEED)")]
    notebooks.inject_parameters(nb, {"SEED": 7, "PROFILE": "gpu"})
    assert nb.cells[2].source.splitlines()[1:] == ["SEED = 7", "PROFILE = 'gpu'"]
    assert "injected-parameters" in nb.cells[2].metadata["tags"]


def test_overrides_from_env():
    assert notebooks.overrides_from_env({"COURSE_SEED": "3", "COURSE_PROFILE": "gpu"}) == {"SEED": 3, "PROFILE": "gpu"}
    assert notebooks.overrides_from_env({}) == {}


def test_execute_records_results_status_and_html(tmp_path, build, monkeypatch):
    monkeypatch.setenv("COURSE_NOTEBOOK", "tiny")
    monkeypatch.setenv("COURSE_BUILD_DIR", str(build))  # the kernel is a child process
    nb = tiny_notebook(tmp_path / "tiny.ipynb", "from course_utils.results import record_result\nrecord_result('seed_seen', SEED)")
    record = course.execute(nb, {"SEED": 5})
    assert record["status"] == "PASS" and record["wall_s"] > 0 and record["peak_bytes"] > 10 * 2**20
    assert results.read_results("tiny")["seed_seen"]["value"] == 5
    assert (build / "tiny.html").exists() and (build / "tiny.ipynb").exists()
    assert "seed_seen = 5" in course.table([record])


def test_failing_notebook_is_reported(tmp_path, build, monkeypatch):
    monkeypatch.setenv("COURSE_BUILD_DIR", str(build))
    nb = tiny_notebook(tmp_path / "bad.ipynb", "assert SEED == 1, 'claim does not hold'")
    record = course.execute(nb, {})
    assert record["status"] == "FAIL" and "claim does not hold" in record["error"]
    assert "FAIL" in course.table([record])


def test_record_result_formats_and_keeps_paper_value(build, capsys):
    results.record_result("speedup", 1.83456, unit="x", paper=2.0, notebook="nb")
    assert "speedup = 1.83 x   (paper: 2)" in capsys.readouterr().out
    assert results.read_results("nb")["speedup"] == {"value": 1.83456, "unit": "x", "paper": 2.0}


def test_a_notebook_can_be_named_by_its_number():
    from course_utils.course import resolve_notebook
    from course_utils.notebooks import course_notebooks

    first = course_notebooks()[0]
    assert resolve_notebook(first.name[:2]) == first
    assert resolve_notebook(str(first)) == first
    with pytest.raises(CourseError, match="the notebooks are: 00_start_here"):
        resolve_notebook("99")


def test_a_goal_is_kept_apart_from_the_paper(build, capsys):
    results.record_result("padding", 0.011, goal=0.02, notebook="nb")
    assert "(goal: 0.02)" in capsys.readouterr().out
    entry = results.read_results("nb")["padding"]
    assert entry["goal"] == 0.02 and entry["paper"] is None
    record = {"notebook": "nb", "status": "PASS", "wall_s": 1.0, "peak_bytes": 0, "error": ""}
    assert "(goal: 0.02)" in course.table([record])


def test_budgets_follow_the_notebook_number():
    assert course.budget_seconds("01_memory") == 180
    assert course.budget_seconds("02_lora") == 120
    assert course.budget_seconds("07_ties") == 120
    over = {"notebook": "02_lora", "status": "PASS", "wall_s": 150.0, "peak_bytes": 0, "error": ""}
    assert "PASS*" in course.table([over])


def test_markdown_is_rendered_from_values():
    shown = results.markdown(f"""
        r = {8} was best
    """)
    assert shown.data == "r = 8 was best"
    assert results.percent_range([0.87, 0.951]) == "87% to 95%"
    assert results.percent_range([0.5, 0.501]) == "50%"
