"""`make course` machinery: parameter injection, execution records, the table."""

import nbformat
import pytest

from course_utils import paths, results
from course_utils.tools import course
from course_utils.tools import notebooks
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
    # Offline math: the page loads MathJax from build/, not from a CDN (raw LaTeX on an offline machine otherwise)
    html = (build / "tiny.html").read_text()
    assert "_mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full" in html and "cdnjs" not in html.split("MathJax")[0][-300:]
    assert (build / "_mathjax" / "MathJax.js").exists() and course.NATIVE_MATHML in html


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
    from course_utils.tools.course import resolve_notebook
    from course_utils.tools.notebooks import course_notebooks

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


def test_every_notebook_has_the_two_minute_budget():
    # catches a per-notebook exception creeping back (00-05 were once allowed 180 s, against CONTRIBUTING's 2 minutes)
    assert {course.budget_seconds(stem) for stem in ("00_start", "01_memory", "05_packing", "10_scaling")} == {120}
    over = {"notebook": "01_memory", "status": "PASS", "wall_s": 121.0, "peak_bytes": 0, "error": ""}
    inside = dict(over, wall_s=119.0)
    assert "PASS*" in course.table([over]) and "PASS*" not in course.table([inside])


def test_markdown_is_rendered_from_values():
    shown = results.markdown(f"""
        r = {8} was best
    """)
    assert shown.data == "r = 8 was best"
    assert results.percent_range([0.87, 0.951]) == "87% to 95%"
    assert results.percent_range([0.5, 0.501]) == "50%"


def test_sliced_poll_finds_a_message_whose_wake_up_was_missed():
    """Catches the 600 s stall: a poll that misses its wake-up must look again after one slice, not at the timeout."""
    import asyncio
    import queue
    import time

    calls = []

    async def get_msg(timeout=None):  # the message is there, but this poll's wake-up is lost: it waits, then finds it
        calls.append(timeout)
        if len(calls) < 3:
            await asyncio.sleep(timeout)
            raise queue.Empty
        return {"msg_type": "execute_reply"}

    start = time.monotonic()
    msg = asyncio.run(course._slice_polls(get_msg)(timeout=600))
    assert msg["msg_type"] == "execute_reply" and time.monotonic() - start < 3 * course.POLL_SLICE_SECONDS + 1
    assert max(calls) <= course.POLL_SLICE_SECONDS


def test_sliced_poll_still_times_out():
    """Catches slicing that turns a real timeout (a hung cell) into an endless wait."""
    import asyncio
    import queue

    async def get_msg(timeout=None):
        await asyncio.sleep(timeout)
        raise queue.Empty

    with pytest.raises(queue.Empty):
        asyncio.run(course._slice_polls(get_msg)(timeout=1.2))


def test_stalls_are_found_and_flagged():
    """Catches a stall between cells passing as a slow notebook: the gap is found, the table and exit status say so."""
    nb = nbformat.v4.new_notebook()
    timing = [("2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z"), ("2026-01-01T00:00:01.5Z", "2026-01-01T00:00:02Z"),
              ("2026-01-01T00:10:01Z", "2026-01-01T00:10:02Z")]
    nb.cells = [nbformat.v4.new_code_cell("1") for _ in timing]
    nb.cells.insert(2, nbformat.v4.new_markdown_cell("text"))
    for cell, (start, end) in zip([c for c in nb.cells if c.cell_type == "code"], timing):
        cell.metadata["execution"] = {"iopub.execute_input": start, "shell.execute_reply": end}
    assert course.cell_gaps(nb) == [(3, 599.0)]
    record = {"notebook": "tiny", "status": "PASS", "wall_s": 5, "peak_bytes": 2**20, "error": "", "stalls": [(3, 599.0)]}
    assert "PASS STALL" in course.table([record]) and "idle 599 s before cell 3" in course.table([record])


def test_widget_notebook_runs_without_a_stall(tmp_path, build, monkeypatch):
    """A widgets.interact cell, then more cells: each must start right after the previous one (as in 01 and 08)."""
    monkeypatch.setenv("COURSE_BUILD_DIR", str(build))
    body = ("import ipywidgets as widgets\n"
            "widgets.interact(lambda x=1: print(x * 2), x=widgets.IntSlider(1, 0, 5));")
    nb = tiny_notebook(tmp_path / "widgets.ipynb", body)
    notebook = nbformat.read(nb, as_version=4)
    notebook.cells += [nbformat.v4.new_code_cell(body) for _ in range(5)] + [nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(notebook, nb)
    record = course.execute(nb, {})
    assert record["status"] == "PASS" and record["stalls"] == [] and record["wall_s"] < 60
