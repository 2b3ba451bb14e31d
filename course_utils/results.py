"""Headline numbers: every notebook records what it measured.

`record_result("lora_vs_peft_max_abs_diff", diff)` prints the number and
stores it in `build/results/<notebook>.json`; `make course` reads those files
to print one table for the whole course. The notebook's name comes from the
runner (COURSE_NOTEBOOK) or, in Jupyter, from the kernel's session path.
"""

import json
import math
import os
from pathlib import Path

from course_utils import paths


def current_notebook() -> str:
    """The running notebook's stem, e.g. '00_start_here' ('interactive' if unknown)."""
    if os.environ.get("COURSE_NOTEBOOK"):
        return Path(os.environ["COURSE_NOTEBOOK"]).stem
    try:  # JupyterLab passes the notebook path to the kernel as __session__
        from IPython import get_ipython

        session = get_ipython().user_ns.get("__session__")
        if session:
            return Path(session).stem
    except Exception:
        pass
    return "interactive"


def _plain(value):
    """JSON-friendly version of a number, tensor or small container."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def results_path(notebook: str | None = None) -> Path:
    return paths.RESULTS_DIR / f"{notebook or current_notebook()}.json"


def record_result(key: str, value, *, unit: str = "", paper=None, goal=None, notebook: str | None = None):
    """Print a measured headline number and save it for the course table.

    `paper` is the paper's figure for the same quantity on the same scale,
    when there is one, so the table can show "we measured / paper says" side
    by side. A figure on another scale (another metric, model or data set)
    is not the paper's value of ours: show it in the recap with its units.
    `goal` is an engineering target of the course ("under 2% padding").
    """
    value = store_result(key, value, unit=unit, paper=paper, goal=goal, notebook=notebook)
    shown = f"{key} = {format_value(value)}{(' ' + unit) if unit else ''}"
    if paper is not None:
        shown += f"   (paper: {format_value(paper)})"
    if goal is not None:
        shown += f"   (goal: {format_value(goal)})"
    print(shown)
    return value


def store_result(key: str, value, *, unit: str = "", paper=None, goal=None, notebook: str | None = None):
    """`record_result` without the printed line (for numbers the tools record, such as the CUDA peak)."""
    value = _plain(value)
    path = results_path(notebook)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = json.loads(path.read_text()) if path.exists() else {}
    entry = {"value": value, "unit": unit, "paper": _plain(paper)}
    if goal is not None:
        entry["goal"] = _plain(goal)
    stored[key] = entry
    path.write_text(json.dumps(stored, indent=2))
    return value


def read_results(notebook: str) -> dict:
    path = results_path(notebook)
    return json.loads(path.read_text()) if path.exists() else {}


def clear_results(notebook: str) -> None:
    results_path(notebook).unlink(missing_ok=True)


def format_value(value) -> str:
    """Short, readable rendering for tables: 3 significant digits for floats."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value[:4]) + (", ...]" if len(value) > 4 else "]")
    return str(value)


def markdown(text: str):
    """Markdown rendered from this run's values: `markdown(f"r = {best} was best")`.

    Prose that states a measured number is built in a code cell, so it is
    re-rendered on every run and cannot go stale. Returns an IPython
    `Markdown` object (displayed when it ends a cell); the text is dedented.
    """
    import textwrap

    from IPython.display import Markdown

    return Markdown(textwrap.dedent(text).strip("\n"))


def percent_range(values) -> str:
    """'87%' or '87% to 95%': the spread of a few accuracies, for prose."""
    values = [float(v) for v in values]
    low, high = min(values), max(values)
    return f"{low:.0%}" if f"{low:.0%}" == f"{high:.0%}" else f"{low:.0%} to {high:.0%}"
