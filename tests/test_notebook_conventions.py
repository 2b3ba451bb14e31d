"""Every notebook follows the course skeleton and is stored without outputs."""

import re

import nbformat
import pytest

from course_utils.notebooks import course_notebooks, has_outputs, parameters_index, tags

NOTEBOOKS = course_notebooks()


def load(path):
    return nbformat.read(path, as_version=4)


def code_text(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
class TestSkeleton:
    def test_outputs_stripped(self, path):
        assert not has_outputs(load(path)), f"run `make strip` before committing {path.name}"

    def test_title_goals_and_time(self, path):
        first = load(path).cells[0]
        assert first.cell_type == "markdown" and first.source.lstrip().startswith("# "), "first cell: a markdown title"
        text = first.source.lower()
        assert "learning goals" in text, "the title cell lists the learning goals"
        assert re.search(r"\bcpu\b", text) and re.search(r"\bgpu\b", text), "the title cell gives the time per hardware"

    def test_environment_cell_before_parameters(self, path):
        nb = load(path)
        index = parameters_index(nb)
        assert index is not None, "a code cell tagged 'parameters' (papermill convention)"
        before = [c for c in nb.cells[:index] if c.cell_type == "code"]
        env_cells = [c for c in before if "environment_report" in c.source]
        assert env_cells, "an environment cell (versions, device) comes before the parameters"
        assert "nbval-ignore-output" in tags(env_cells[0]), "tag the environment cell nbval-ignore-output"

    def test_parameters_cell_has_seed_and_profile(self, path):
        nb = load(path)
        source = nb.cells[parameters_index(nb)].source
        assert re.search(r"^SEED\s*=", source, re.M) and re.search(r"^PROFILE\s*=", source, re.M)

    def test_claims_are_checked_and_recorded(self, path):
        text = code_text(load(path))
        assert re.search(r"^\s*assert\b", text, re.M), "at least one executed assert"
        assert "record_result(" in text, "headline numbers recorded for `make course`"

    def test_has_exercises_and_recap(self, path):
        headings = [line.strip().lower() for c in load(path).cells if c.cell_type == "markdown" for line in c.source.splitlines() if line.startswith("#")]
        assert any("exercise" in h for h in headings), "an Exercises section"
        assert any("recap" in h for h in headings), "a Recap section"

    def test_kernel_is_python3(self, path):
        assert load(path).metadata.get("kernelspec", {}).get("name") == "python3"
