"""Every notebook follows the course skeleton and is stored without outputs."""

import re

import nbformat
import pytest

from course_utils.tools.notebooks import course_notebooks, has_outputs, parameters_index, tags

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


TRACKER = re.compile(r"\bthe issue\b|\bissue tracker\b|\bissue #?\d+|\bthe tracker\b", re.I)
TIER = re.compile(r"\*\*Exercise\s+\d+[^*]*\*\*\s*\((easy|medium|hard)\)", re.I)


def tagged(nb, tag):
    return [c for c in nb.cells if c.cell_type == "code" and tag in tags(c)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
class TestExercises:
    """The exercise format of CONTRIBUTING.md, which student copies and graders rely on."""

    def test_one_starter_check_and_hidden_solution_each(self, path):
        nb = load(path)
        starters, checks, solutions = (tagged(nb, t) for t in ("exercise", "check", "solution"))
        assert len(starters) >= 2, "at least two exercises, each a starter cell tagged 'exercise'"
        assert len(checks) == len(starters) == len(solutions), (
            f"{len(starters)} exercise, {len(checks)} check and {len(solutions)} solution cells: one of each per exercise")
        for cell in starters:
            assert "raise NotImplementedError" in cell.source, "a starter raises NotImplementedError until the learner writes it"
        for cell in checks:
            assert "check_exercise(" in cell.source, "a check cell calls check_exercise"
        for cell in solutions:
            assert cell.metadata.get("jupyter", {}).get("source_hidden"), "solution cells are hidden (jupyter.source_hidden)"
            assert re.search(r"assert check_exercise\(\w+_solution\b", cell.source), "a solution cell asserts check_exercise(fn_solution, ...)"

    def test_exercise_setup_opens_the_section(self, path):
        nb = load(path)
        setup_cells = tagged(nb, "exercise-setup")
        assert len(setup_cells) == 1, "one code cell tagged 'exercise-setup' builds what the checks need"
        first_exercise = next(i for i, c in enumerate(nb.cells) if "exercise" in tags(c))
        assert nb.cells.index(setup_cells[0]) < first_exercise, "the exercise-setup cell comes before the first exercise"

    def test_every_exercise_has_a_tier_and_one_is_hard(self, path):
        prompts = [c.source for c in load(path).cells if c.cell_type == "markdown" and re.search(r"\*\*Exercise\s+\d+", c.source)]
        tiers = [m.group(1).lower() for p in prompts for m in TIER.finditer(p)]
        assert len(tiers) == len(tagged(load(path), "exercise")), "each exercise prompt reads '**Exercise N · Title** (easy|medium|hard)'"
        assert "hard" in tiers, "at least one exercise asks for reasoning the page does not spell out: mark it (hard)"

    def test_nothing_outside_solutions_uses_a_solution(self, path):
        nb = load(path)
        defined = {m.group(1) for c in tagged(nb, "solution") for m in re.finditer(r"^def (\w+)", c.source, re.M)}
        for cell in nb.cells:
            if cell.cell_type != "code" or "solution" in tags(cell):
                continue
            used = sorted(name for name in defined if re.search(rf"\b{name}\b", cell.source))
            assert not used, f"a cell outside the solutions uses {used}: a student copy has no solution cells"

    def test_no_tracker_references(self, path):
        for cell in load(path).cells:
            match = TRACKER.search(cell.source)
            assert not match, f"{match.group(0)!r}: the page says why a number matters, not who asked for it"


# A measured-looking number: a percentage, a decimal, or "N x" / "N GB" / "N MB". A line that cites
# its source (a paper, a seed document, the lab card) or states a formula may hold one.
MEASURED = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?\s?%|\d+\.\d{2,}|\d{2,}\.\d+|\d+(?:\.\d+)?\s?(?:x|×|GB|MB)(?![\w]))")
CITED = re.compile(r"et al|arXiv|Table \d|paper|seed 00\d|README|card|formula|=|\$", re.I)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_states_no_measured_number_by_hand(path):
    """Measured numbers are rendered by a code cell from the run (CONTRIBUTING.md, rule 1)."""
    for index, cell in enumerate(load(path).cells[1:], 1):  # the title cell holds the time budgets
        if cell.cell_type != "markdown":
            continue
        hits = [m.group(0) for line in cell.source.splitlines()
                if not CITED.search(line) and not line.lstrip().startswith("#") for m in MEASURED.finditer(line)]
        assert not hits, f"markdown cell {index} states {hits}: render measured numbers from the run, or cite the source"


def _discarded_markdown_calls(source: str) -> list[int]:
    """Line numbers of `markdown(...)` calls whose value is thrown away: a bare call that is not the cell's last
    statement (Jupyter shows only the last expression), or the last one silenced by a trailing semicolon."""
    import ast
    import warnings

    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in LaTeX strings are the notebook's business
            tree = ast.parse(code)
    except SyntaxError:
        return []
    last = tree.body[-1] if tree.body else None
    silenced = code.rstrip().endswith(";")
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
            continue
        func = node.value.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if name == "markdown" and (node is not last or silenced):
            found.append(node.lineno)
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_rendered_markdown_is_displayed(path):
    """A `markdown(f"...")` conclusion that is not the cell's last expression is never shown: wrap it in display()."""
    for index, cell in enumerate(load(path).cells):
        if cell.cell_type == "code":
            lines = _discarded_markdown_calls(cell.source)
            assert not lines, (f"code cell {index}: markdown(...) on line(s) {lines} is computed and thrown away; "
                               "make it the cell's last expression (no trailing ';') or wrap it in display()")


def test_discarded_markdown_detector():
    """The detector above: catches a discarded call, passes a shown one (the bugs of both directions)."""
    assert _discarded_markdown_calls('markdown("a")\nx = 1') == [1]
    assert _discarded_markdown_calls('x = 1\nmarkdown("a");') == [2]
    assert _discarded_markdown_calls('for i in range(2):\n    markdown("a")\nx = 1') == [2]
    assert _discarded_markdown_calls('x = 1\nmarkdown("a")') == []
    assert _discarded_markdown_calls('display(markdown("a"))\nx = 1') == []
