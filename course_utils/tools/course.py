"""`make course`: execute every notebook headless and print one table.

Each notebook runs in its own subprocess (so its peak memory can be read
from the OS), through nbclient, into build/: the executed .ipynb, an HTML
page, and build/runs/<notebook>.json with status, wall time and peak memory.
The headline numbers come from the notebook's own `record_result` calls.

    python -m course_utils.tools.course run [NOTEBOOK ...] [--seed N] [--profile cpu|gpu]
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

from course_utils import paths
from course_utils.errors import CourseError
from course_utils.tools.notebooks import course_notebooks, inject_parameters, overrides_from_env
from course_utils.results import clear_results, format_value, read_results

# Budgets from the course standards (cpu profile, 2 cores).
BUDGET_SECONDS = 120  # every notebook, cpu profile, idle 2 cores, fresh clone (CONTRIBUTING: 2 minutes)
BUDGET_BYTES = 6 * 1024**3
CELL_TIMEOUT = int(os.environ.get("COURSE_CELL_TIMEOUT", 600))  # seconds per cell; raise it on a busy machine
MATHJAX_DIR = "_mathjax"  # under build/, beside the HTML pages


def runs_path(stem: str) -> Path:
    return paths.BUILD_DIR / "runs" / f"{stem}.json"


# A missed wake-up: nbclient waits for the kernel's reply with one zmq poll as long as the cell timeout. When two
# channels are polled at once (a widget cell floods iopub while the shell reply arrives), pyzmq's asyncio poller can
# miss the socket's edge-triggered event; the poll then sleeps until its timeout and only then finds the message,
# which was there all along. Measured: an idle kernel for exactly 600 s (the cell timeout) after a widgets.interact
# cell. Polling in short slices bounds a missed wake-up to one slice; the cell timeout still holds overall.
POLL_SLICE_SECONDS = 0.5
STALL_SECONDS = 5  # a gap between two cells longer than this is a stall, not a slow notebook


def _client_class():
    import nbclient

    class SlicedPollClient(nbclient.NotebookClient):
        """nbclient, with the shell and iopub channels polled in slices (see POLL_SLICE_SECONDS)."""

        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            for channel in (kc.shell_channel, kc.iopub_channel):
                channel.get_msg = _slice_polls(channel.get_msg)
            return kc

    return SlicedPollClient


def _slice_polls(get_msg):
    """Wrap a channel's async `get_msg` so that it polls in slices until the caller's timeout (None: forever)."""
    import queue

    async def sliced(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_SLICE_SECONDS if deadline is None else min(POLL_SLICE_SECONDS, deadline - time.monotonic())
            try:
                return await get_msg(timeout=max(left, 0.001))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    return sliced


def cell_gaps(nb) -> list[tuple[int, float]]:
    """(cell index, seconds) for every code cell the kernel started later than STALL_SECONDS after the previous one ended."""
    import datetime

    def stamp(text):
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))

    gaps, previous_end = [], None
    for index, cell in enumerate(nb.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if start and previous_end is not None:
            gap = (stamp(start) - previous_end).total_seconds()
            if gap > STALL_SECONDS:
                gaps.append((index, gap))
        if end:
            previous_end = stamp(end)
    return gaps


def execute(notebook: Path, overrides: dict, cell_timeout: int = CELL_TIMEOUT) -> dict:
    """Run one notebook in a fresh kernel; write the executed copy and its HTML to build/."""
    import nbclient
    import nbformat
    from nbconvert import HTMLExporter

    stem = notebook.stem
    clear_results(stem)
    nb = inject_parameters(nbformat.read(notebook, as_version=4), overrides)
    client = _client_class()(
        nb, timeout=cell_timeout, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}
    )
    start = time.perf_counter()
    status, error = "PASS", ""
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        status, error = "FAIL", _short_error(exc)
    except Exception as exc:  # kernel died, timeout, ...
        status, error = "FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0]
    wall = time.perf_counter() - start
    paths.BUILD_DIR.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, paths.BUILD_DIR / notebook.name)
    html, _ = HTMLExporter(mathjax_url=offline_mathjax()).from_notebook_node(nb)
    html = html.replace("<!-- Load mathjax -->", "<!-- Load mathjax -->\n" + NATIVE_MATHML, 1)
    (paths.BUILD_DIR / f"{stem}.html").write_text(html)
    record = {"notebook": stem, "status": status, "wall_s": wall, "peak_bytes": _children_peak_rss(), "error": error,
              "stalls": cell_gaps(nb)}
    runs_path(stem).parent.mkdir(parents=True, exist_ok=True)
    runs_path(stem).write_text(json.dumps(record, indent=2))
    return record


# That wheel ships MathJax 2 without its web fonts; the browser's own MathML renders the equations instead (Chromium
# 109+, Firefox, Safari), which needs no font files.
NATIVE_MATHML = '<script type="text/x-mathjax-config">MathJax.Hub.Config({menuSettings: {renderer: "NativeMML"}});</script>'


def offline_mathjax() -> str:
    """MathJax 2 beside the pages in build/ (from the jupyter-server-mathjax wheel, copied once); its relative URL.

    nbconvert's default loads MathJax from a CDN, so offline every equation shows as raw LaTeX."""
    import shutil

    import jupyter_server_mathjax

    target = paths.BUILD_DIR / MATHJAX_DIR
    if not (target / "MathJax.js").exists():
        shutil.copytree(Path(jupyter_server_mathjax.__file__).parent / "static", target, dirs_exist_ok=True)
    return f"{MATHJAX_DIR}/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"


def _short_error(exc) -> str:
    """The last line of the failing cell's error ('AssertionError: ...')."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


def _children_peak_rss() -> int:
    """Peak resident memory of finished child processes (the kernel), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


# What the kernel process prints that says nothing about the notebook: ipykernel's warning that its local
# TCP sockets are not encrypted, and the USDT probe lines torch's profiler writes in notebook 01.
KERNEL_NOISE = re.compile(r"Kernel is running over TCP without encryption|USDT|profiler_(start|stop)")


def run(notebooks: list[Path], overrides: dict) -> list[dict]:
    """Execute each notebook in its own process; return their run records."""
    records = []
    for notebook in notebooks:
        print(f"--> {notebook.name}", flush=True)
        env = dict(os.environ, COURSE_NOTEBOOK=notebook.stem)
        cmd = [sys.executable, "-m", "course_utils.tools.course", "execute", str(notebook), "--overrides", json.dumps(overrides)]
        done = subprocess.run(cmd, env=env, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in done.stdout.splitlines():
            if not KERNEL_NOISE.search(line):
                print(line, file=sys.stderr)
        path = runs_path(notebook.stem)
        records.append(json.loads(path.read_text()) if path.exists() else
                       {"notebook": notebook.stem, "status": "FAIL", "wall_s": 0, "peak_bytes": 0, "error": "runner crashed"})
    return records


def budget_seconds(stem: str) -> int:
    """The cpu-profile time budget of one notebook: the same 2 minutes for every notebook."""
    return BUDGET_SECONDS


def _shown(key: str, entry: dict) -> str:
    text = f"{key} = {format_value(entry['value'])}{(' ' + entry['unit']) if entry.get('unit') else ''}"
    if entry.get("paper") is not None:
        text += f" (paper: {format_value(entry['paper'])})"
    if entry.get("goal") is not None:
        text += f" (goal: {format_value(entry['goal'])})"
    return text


def table(records: list[dict]) -> str:
    """One table: notebook, status, wall time, peak memory, headline results."""
    rows = [("notebook", "status", "time", "peak mem", "headline results")]
    for rec in records:
        results = read_results(rec["notebook"])
        shown = [_shown(k, v) for k, v in results.items()]
        status = rec["status"]
        stalls = rec.get("stalls", [])
        if status == "PASS" and (rec["wall_s"] > budget_seconds(rec["notebook"]) or rec["peak_bytes"] > BUDGET_BYTES):
            status = "PASS*"  # passed, but over the cpu-profile budget
        if stalls:
            status += " STALL"
            shown = [f"stall: the kernel sat idle {gap:.0f} s before cell {index}" for index, gap in stalls] + shown
        first = shown[0] if shown else (rec["error"] if status == "FAIL" else "(no results recorded)")
        rows.append((rec["notebook"], status, f"{rec['wall_s']:.0f} s", f"{rec['peak_bytes'] / 1024**3:.2f} GB", first))
        rows.extend(("", "", "", "", extra) for extra in shown[1:])
        if status == "FAIL" and shown:
            rows.append(("", "", "", "", rec["error"]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
        if n == 0:
            lines.append("-" * (sum(widths) + 8 + len("headline results")))
    if any("STALL" in r[1] for r in rows):
        lines.append(f"STALL = the kernel sat idle more than {STALL_SECONDS} s between two cells: a runner fault, not a slow cell")
    if any(r[1].startswith("PASS*") for r in rows):
        lines.append(f"PASS* = over the cpu-profile budget ({BUDGET_SECONDS} s, {BUDGET_BYTES / 1024**3:.0f} GB a notebook)")
    return "\n".join(lines)


def resolve_notebook(name: str) -> Path:
    """A path as given, or the one course notebook whose file name starts with `name` ("02", "02_lora")."""
    path = Path(name)
    if path.exists():
        return path
    matches = [nb for nb in course_notebooks() if nb.name.startswith(path.name)]
    if len(matches) != 1:
        names = ", ".join(nb.stem for nb in course_notebooks())
        raise CourseError(f"{name!r} names {'no' if not matches else 'more than one'} notebook; the notebooks are: {names}.")
    return matches[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Execute the course's notebooks headless into build/.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="execute notebooks and print the results table")
    run_p.add_argument("notebooks", nargs="*", help="notebook paths or names such as 02 or 02_lora (default: all, in order)")
    run_p.add_argument("--seed", type=int, help="override SEED in every notebook")
    run_p.add_argument("--profile", choices=["cpu", "gpu"], help="override PROFILE in every notebook")
    exe_p = sub.add_parser("execute", help="(internal) execute one notebook")
    exe_p.add_argument("notebook")
    exe_p.add_argument("--overrides", default="{}")
    args = parser.parse_args(argv)

    if args.command == "execute":
        try:
            execute(Path(args.notebook), json.loads(args.overrides))
        except Exception:
            traceback.print_exc()
            return 1
        return 0

    try:
        notebooks = [resolve_notebook(p) for p in args.notebooks] or course_notebooks()
    except CourseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    overrides = overrides_from_env()
    if args.seed is not None:
        overrides["SEED"] = args.seed
    if args.profile:
        overrides["PROFILE"] = args.profile
    if overrides:
        print("parameters:", ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    records = run(notebooks, overrides)
    report = table(records)
    print("\n" + report)
    (paths.BUILD_DIR / "summary.txt").write_text(report + "\n")
    print(f"\nExecuted notebooks and HTML pages are in {paths.BUILD_DIR}/")
    return 0 if all(r["status"] == "PASS" and not r.get("stalls") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
