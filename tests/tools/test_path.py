"""The course's path (course_utils.tools.path): deep-dive marks read from headings, and the opening cell's block."""

import nbformat
import pytest

from course_utils.tools import path
from course_utils.tools.notebooks import course_notebooks


def notebook(*markdown_and_code):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 04 · Demo\n\nIntro.")]
    for source in markdown_and_code:
        maker = nbformat.v4.new_markdown_cell if source.startswith("#") else nbformat.v4.new_code_cell
        nb.cells.append(maker(source))
    return nb


DEMO = notebook("## 1 · Build it", "### 1.1 · Core idea", "x = 1", "### 1.2 · Hardening (deep dive)", "y = 2",
                "## 2 · Prove it (deep dive)", "### 2.1 · Bit for bit", "z = 3", "### What it cannot do", "w = 4",
                "## 3 · Experiment", "v = 5", "## Exercises", "## Recap")


def test_a_deep_dive_mark_covers_its_subsections():
    marks = {s.name: s.deep for s in path.sections(DEMO)}
    # the bug caught: a subsection of a deep dive counted as core because its own heading has no mark
    assert marks == {"1": False, "1.1": False, "1.2": True, "2": True, "2.1": True, "What it cannot do": True,
                     "3": False, "Exercises": False, "Recap": False}


def test_each_cell_knows_its_section():
    deep = path.cell_is_deep(DEMO)
    sources = [c.source for c, d in zip(DEMO.cells, deep) if d and c.cell_type == "code"]
    assert sources == ["y = 2", "z = 3", "w = 4"]


def test_core_line_lists_the_fewest_names_with_ranges():
    # 1 has a deep part, so its core part is listed as 1.1; the recap is neither
    assert path.core_line(DEMO) == ("**Core:** sections 1.1, 3 and the exercises; **deep dives** (marked "
                                    "*(deep dive)* in their headings): 1.2 and 2.")
    plain = notebook("## 1 · A", "## 2 · B", "### 2.1 · C", "### 2.2 · D", "## 3 · E")
    assert path.core_line(plain) == "**Core:** sections 1-3."
    split = notebook("## 2 · B", "### 2.1 · C", "### 2.2 · D (deep dive)", "### 2.3 · E", "### 2.4 · F")
    assert path.core_line(split).startswith("**Core:** sections 2.1 and 2.3-2.4;")
    # a core section whose only subsection is a deep dive is listed whole, beside that deep dive
    only = notebook("## 3 · A", "## 4 · B", "x = 1", "### 4.1 · C (deep dive)", "## 5 · D")
    assert path.core_line(only) == ("**Core:** sections 3-5; **deep dives** (marked *(deep dive)* in their "
                                    "headings): 4.1.")


def test_the_block_is_written_once_and_rewritten_in_place():
    nb = nbformat.from_dict(DEMO)
    assert path.with_path_block(nb, "04_demo") is True
    once = nb.cells[0].source
    assert once.startswith("# 04 · Demo\n\nIntro.\n\n**On the path:** a deep dive")
    assert path.with_path_block(nb, "04_demo") is False and nb.cells[0].source == once  # no second block
    next(c for c in nb.cells if c.source.startswith("### 1.2")).source = "### 1.2 · Hardening"  # mark removed
    assert path.with_path_block(nb, "04_demo") is True  # the block follows the headings
    assert "**Core:** sections 1, 3 and the exercises; **deep dives**" in nb.cells[0].source
    assert nb.cells[0].source.count("**On the path:**") == 1


def test_a_core_copy_collapses_deep_dives_and_keeps_every_cell():
    copy = path.core_copy(DEMO)
    assert len(copy.cells) == len(DEMO.cells)  # the notebook still runs top to bottom
    hidden = [c.source for c in copy.cells if c.metadata.get("jupyter", {}).get("source_hidden")]
    assert "y = 2" in hidden and "x = 1" not in hidden and "v = 5" not in hidden
    assert not any(c.metadata.get("jupyter") for c in DEMO.cells)  # the instructor's notebook is left as it is


@pytest.mark.parametrize("nb_path", course_notebooks(), ids=lambda p: p.stem[:2])
def test_every_notebook_states_its_place_on_the_path(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    block = path.path_block(nb, nb_path.stem)
    assert nb.cells[0].source.endswith(block), (
        f"{nb_path.name}: the opening cell's path block is out of date with the headings: run "
        "`python -m course_utils.tools.path`")


def test_study_minutes_match_the_instructors_table():
    import re

    from course_utils.paths import REPO_ROOT

    table = (REPO_ROOT / "docs" / "instructors.md").read_text()
    found = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| (\d\d) \|.*about (\d+) min \|$", table, re.M)}
    assert found == path.STUDY_MINUTES  # one source: the table a learner reads and the notebooks' opening cells


def test_readme_marks_the_same_core_notebooks():
    import re

    from course_utils.paths import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    marked = tuple(m.group(1) for m in re.finditer(r"^\| (\d\d) \| \[[^]]*\]\([^)]*\) \(core\)", readme, re.M))
    assert sorted(marked) == sorted(path.CORE_NOTEBOOKS)  # the table is in number order
    # ... and the sentence that gives the path names them in the path's order (11, SFT, comes right after 00)
    said = re.search(r"The \*\*core path\*\*[^.]*?:((?:[^.]|\.\d)*)", readme)
    assert said, "README: the core path sentence ('The **core path** ...: 00 (...), 11 (...), ...') is missing"
    assert tuple(re.findall(r"\b(\d\d)\s+\(", said.group(1))) == path.CORE_NOTEBOOKS, said.group(1)
