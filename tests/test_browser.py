"""The course site in a real browser: Playwright drives Debian's Chromium, with the network blocked.

The test executes notebooks 00 and 01 (the quickest; 00 has a widget, 01 plots and its calculator) into a temporary
build folder, builds the site from them (`course_utils.tools.site`), and opens every page: it must load with no console
error and no request leaving the site, and the notebooks' pages must render their widgets from the saved state (not
the text fallback) and show their plots. Screenshots go to
build/screenshots/. `make test-browser` runs this file alone.

Chromium is found on PATH; where it is missing and apt can install it (root on Debian or Ubuntu), the test installs
Debian's package; otherwise it skips, naming the command (and fails under .ci/run, which sets COURSE_REQUIRE_BROWSER).

The second half starts a real JupyterLab server on localhost over a copy of the notebooks and drives it: every
notebook runs start to end from the browser with no error output, then its knob (the first `widgets.interact` cell;
01's calculator) must change its output when a control moves. That run is the notebook's execution test: when it is
selected, tests/conftest.py drops nbval's copy of the same notebook, so `make test` executes each notebook once.
Screenshots of each go to build/screenshots/ too.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from course_utils import paths
from course_utils.launching import free_port

REPO = Path(__file__).resolve().parent.parent
INSTALL = "sudo apt-get install -y chromium"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        done = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True)
        if done.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium")
    return None


@pytest.fixture(scope="module")
def chromium():
    pytest.importorskip("playwright", reason="Playwright is in the [instructor] extra; `make test` installs it")
    path = find_chromium()
    if path is None:
        message = f"no Chromium found: install it with `{INSTALL}` (Playwright's own download needs the network)"
        if os.environ.get("COURSE_REQUIRE_BROWSER"):  # .ci/run: the browser tests must run
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    build = tmp_path_factory.mktemp("build")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the inline backend: plots in the outputs
    env["COURSE_BUILD_DIR"] = str(build)
    subprocess.run([sys.executable, "-m", "course_utils.tools.course", "run", "00", "01"], cwd=REPO, env=env, check=True,
                   capture_output=True, text=True)
    assets = paths.BUILD_DIR / "site-assets"
    (build / "site-assets").mkdir()
    for tarball in assets.glob("*.tgz") if assets.exists() else []:
        shutil.copy(tarball, build / "site-assets")
    if not list((build / "site-assets").glob("*.tgz")):
        subprocess.run([sys.executable, "-m", "course_utils.tools.site", "assets"], cwd=REPO, env=env, check=True)
    subprocess.run([sys.executable, "-m", "course_utils.tools.site", "build"], cwd=REPO, env=env, check=True)
    return build / "site"


def test_every_page_loads_offline_with_plots_and_widgets(chromium, site):
    from playwright.sync_api import sync_playwright

    shots = paths.BUILD_DIR / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    pages = sorted(p.name for p in site.glob("*.html"))
    assert {"index.html", "results.html", "00_start_here.html", "01_memory_estimation.html"} <= set(pages)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context()
        outside = []

        def block(route):  # the network is blocked: only the site's own files may load
            if route.request.url.startswith("file://"):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", block)
        for name in pages:
            page = context.new_page()
            errors = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto((site / name).as_uri())
            page.wait_for_load_state("load")
            if name[:2].isdigit():
                page.wait_for_selector(".widget-dropdown, .widget-slider", timeout=20_000)  # rendered from the state
                assert page.locator("nav.course-nav a").count() >= 4
            if name.startswith("01_"):
                assert page.locator("img[src^='data:image/png']").count() > 0, "01's plots are embedded"
            page.screenshot(path=str(shots / f"site-{Path(name).stem}.png"), full_page=False)
            assert not errors, f"{name}: console errors {errors[:3]}"
            page.close()
        browser.close()
    assert not outside, f"pages asked for files outside the site: {outside[:5]}"


def test_make_course_pages_render_math_offline(chromium, site):
    """The HTML pages `make course` writes to build/ (the README sends learners there): with the network blocked,
    MathJax loads from build/ and every equation becomes MathML, not raw LaTeX. Catches a CDN MathJax URL."""
    from playwright.sync_api import sync_playwright

    page_path = site.parent / "01_memory_estimation.html"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context()
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://") else route.abort())
        page = context.new_page()
        page.goto(page_path.as_uri())
        page.wait_for_selector("math", state="attached", timeout=30_000)
        assert page.locator("math").count() >= 5, "the equations were typeset"
        raw = page.evaluate("document.querySelector('#notebook-container, main, body').innerText")
        assert "\\mathcal" not in raw and "\\frac" not in raw, "no raw LaTeX left on the page"
        page.screenshot(path=str(paths.BUILD_DIR / "screenshots" / "course-page-math.png"))
        browser.close()


# ---- The notebooks in JupyterLab: a real server on localhost, cells run from the browser ----

LAB_TOKEN = "course-browser-test"
KNOB_CALL = "widgets.interact("


def knob_cell(notebook: Path) -> int:
    """Index of the notebook's knob: its first code cell that calls widgets.interact."""
    import nbformat

    cells = nbformat.read(notebook, as_version=4).cells
    found = [i for i, c in enumerate(cells) if c.cell_type == "code" and KNOB_CALL in c.source]
    assert found, f"{notebook.name} has no ipywidgets knob (a `{KNOB_CALL}...)` cell)"
    return found[0]


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory, chromium):
    """JupyterLab on localhost over a copy of the notebooks (autosave must not write outputs into the repository)."""
    import socket
    import time

    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        shutil.copy(notebook, root / "notebooks" / notebook.name)
    (root / "broken.ipynb").write_text(
        '{"cells": [{"cell_type": "code", "execution_count": null, "id": "a1", "metadata": {}, "outputs": [], '
        '"source": ["1 / 0"]}], "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", '
        '"language": "python"}}, "nbformat": 4, "nbformat_minor": 5}')
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["COURSE_BUILD_DIR"] = str(root / "build")
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
               f"--IdentityProvider.token={LAB_TOKEN}", "--LabApp.expose_app_in_browser=True",
               f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={root / 'settings'}",
               f"--LabApp.workspaces_dir={root / 'workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    log = open(root / "server.log", "w")
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"JupyterLab exited: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def lab_browser(lab_server, chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


CURRENT = "window.jupyterapp.shell.currentWidget"
KERNEL_READY = (f"() => window.jupyterapp && {CURRENT} && {CURRENT}.sessionContext && {CURRENT}.sessionContext.session"
                f" && {CURRENT}.sessionContext.session.kernel && {CURRENT}.sessionContext.session.kernel.status === 'idle'")


class LabNotebook:
    """One notebook open in JupyterLab, driven through the app's own commands."""

    def __init__(self, browser, server: str, path: str):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.console_errors = []
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.goto(f"{server}/lab/tree/{path}?reset&token={LAB_TOKEN}")  # reset: no tabs restored from before
        self.page.wait_for_function(f"() => {KERNEL_READY[6:]} && {CURRENT}.context.path === {path!r}", timeout=120_000)

    def run(self, last: int | None = None, timeout_s: int = 600):
        """Run every cell (last=None) or cells 0..last, and wait until the kernel has finished them."""
        if last is None:
            self.page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            target = f"{CURRENT}.content.widgets.length - 1"
        else:
            self.page.evaluate(f"""async () => {{ const nb = {CURRENT}.content; nb.activeCellIndex = {last};
                await window.jupyterapp.commands.execute('notebook:run-all-above');
                await window.jupyterapp.commands.execute('notebook:run-cell'); }}""")
            target = str(last)
        # Done: no cell queued or running, and the last code cell up to the target has an execution count. JupyterLab
        # drops the queue after an error, and a dead kernel runs nothing: either ends the wait (the caller checks).
        self.page.wait_for_function(f"""() => {{ const cells = {CURRENT}.content.widgets.slice(0, {target} + 1);
            const code = cells.filter(c => c.model.type === 'code');
            const prompts = code.map(c => c.node.querySelector('.jp-InputPrompt').textContent);
            const kernel = {CURRENT}.sessionContext.session.kernel;
            const failed = code.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
            if (kernel.status === 'dead' || (failed && kernel.status === 'idle')) return true;
            return !prompts.some(p => p.includes('*')) && code.length > 0 && code[code.length - 1].model.executionCount !== null
                && kernel.status === 'idle'; }}""", timeout=timeout_s * 1000, polling=1000)
        return self.page.evaluate(f"() => {CURRENT}.sessionContext.session.kernel.status")

    def errors(self) -> list[str]:
        """'ename: evalue' of every error output in the notebook's model (JupyterLab renders them like stderr)."""
        return self.page.evaluate(f"""() => {CURRENT}.content.widgets.filter(c => c.model.type === 'code')
            .flatMap(c => c.model.outputs.toJSON()).filter(o => o.output_type === 'error')
            .map(o => o.ename + ': ' + o.evalue)""")

    def cell(self, index: int):
        return self.page.locator(".jp-Notebook .jp-Cell").nth(index)

    def close(self):
        self.page.evaluate(f"async () => {{ await {CURRENT}.sessionContext.shutdown(); }}")
        self.page.close()


def screenshot(page, name: str, element=None):
    shots = paths.BUILD_DIR / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    (element or page).screenshot(path=str(shots / f"{name}.png"))


def changes(read, before, timeout_s: float = 60) -> bool:
    """Poll `read()` (elements are re-found each time: a widget output re-renders its children) until it differs."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if read() != before:
                return True
        except Exception:  # the element is being replaced right now
            pass
        time.sleep(0.5)
    return False


def move_first_control(cell, avoid: str | None = None) -> str:
    """Change the knob's first dropdown to another option, or move its first slider one step; returns which.
    `avoid`: a slider readout not to end on (a retry must not step back to the value the output was drawn for)."""
    for select in cell.locator(".widget-dropdown select").all():
        options = select.locator("option").all_inner_texts()
        current = select.input_value()
        values = select.evaluate("s => [...s.options].map(o => o.value)")
        other = next((v for v in values if v != current), None)
        if other is None:  # a one-option dropdown is no knob; the notebook should pass widgets.fixed instead
            continue
        select.select_option(other)
        return f"dropdown {options[values.index(other)]!r}"
    sliders = cell.locator(".widget-slider, .widget-hslider")
    assert sliders.count(), "the knob has no dropdown with a second option and no slider: nothing a learner can move"
    slider = sliders.first
    handle, readout = slider.locator(".noUi-handle").first, slider.locator(".widget-readout").first
    # A readout read before it renders is "": any key would seem to move it. If it never renders, the move below
    # still happens, and the output check after it decides.
    changes(readout.inner_text, "", timeout_s=10)
    before = readout.inner_text()
    handle.focus()
    for key in ("ArrowRight", "ArrowLeft"):  # left only when right did not move it (it was at its maximum)
        handle.press(key)
        if changes(readout.inner_text, before, timeout_s=3):
            if readout.inner_text() == avoid:  # back where the output was drawn: one more step the same way
                handle.press(key)
                changes(readout.inner_text, avoid, timeout_s=3)
            return f"slider one step {'right' if key == 'ArrowRight' else 'left'} (to {readout.inner_text()})"
    return "slider did not move"


def test_lab_shows_an_error_output_when_a_cell_fails(lab_browser, lab_server):
    """The detector the tests below rely on: a failing cell is seen as an error output."""
    nb = LabNotebook(lab_browser, lab_server, "broken.ipynb")
    nb.run()
    assert any("ZeroDivisionError" in e for e in nb.errors())
    nb.close()


NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("*.ipynb") if p.name[:2].isdigit())
NOTEBOOK_TIMEOUT_S = 1200  # a whole notebook; nbval's limit is 600 s per cell


def check_calculator(nb):
    """01's knob is its memory calculator: the chart and the verdict change with the model."""
    calculator = nb.page.locator(".jp-Cell", has=nb.page.locator(".widget-dropdown select")).last
    assert calculator.locator(".widget-dropdown select").count() >= 4, "01's calculator is not rendered as widgets"
    calculator.scroll_into_view_if_needed()
    chart = calculator.locator(".widget-output img").first
    verdict = calculator.locator(".widget-output pre, .widget-output .jp-RenderedText").last
    before_chart, before_verdict = chart.get_attribute("src"), verdict.inner_text()
    screenshot(nb.page, "lab-01-calculator-before", calculator.locator(".jp-Cell-outputWrapper"))
    calculator.locator(".widget-dropdown select").first.select_option("Llama-2-70B")
    assert changes(lambda: chart.get_attribute("src"), before_chart), "the chart did not change with the model"
    assert changes(lambda: verdict.inner_text(), before_verdict), "the verdict did not change with the model"
    screenshot(nb.page, "lab-01-calculator-after", calculator.locator(".jp-Cell-outputWrapper"))


def check_knob(nb, name: str, index: int):
    """Move one control of the knob cell; its output must change, with no error."""
    cell = nb.cell(index)
    cell.scroll_into_view_if_needed()
    output = cell.locator(".widget-output").first
    output.wait_for(timeout=60_000)
    before = output.inner_html()
    def shown():
        return output.inner_html() if output.locator("img, pre, .jp-RenderedText").count() else before

    sliders = cell.locator(".widget-slider .widget-readout, .widget-hslider .widget-readout")
    start = sliders.first.inner_text() if sliders.count() else None  # the value the output was drawn for
    moved = move_first_control(cell)
    changed = changes(shown, before, timeout_s=120)
    if not changed and moved.startswith("slider"):  # CI once saw a slider at its maximum report a step right
        moved += ", then " + move_first_control(cell, avoid=start)
        changed = changes(shown, before, timeout_s=60)
    assert changed, f"{name}: moving the knob ({moved}) did not change its output"
    screenshot(nb.page, f"lab-{name[:2]}-knob", cell.locator(".jp-Cell-outputWrapper"))
    assert not nb.errors(), f"{name}: the knob ({moved}) raised: {nb.errors()[:2]}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_lab_runs_the_notebook_and_its_knob(lab_browser, lab_server, name):
    """The notebook runs start to end from JupyterLab with no error output (its execution test: nbval's copy is
    dropped when this runs), then its knob's output changes when a control moves."""
    nb = LabNotebook(lab_browser, lab_server, f"notebooks/{name}.ipynb")
    status = nb.run(timeout_s=NOTEBOOK_TIMEOUT_S)
    assert status != "dead", f"{name}: the kernel died (out of memory?)"
    assert not nb.errors(), f"{name}: error outputs in JupyterLab: {nb.errors()[:2]}"
    if name.startswith("01"):
        check_calculator(nb)
    else:
        check_knob(nb, name, knob_cell(REPO / "notebooks" / f"{name}.ipynb"))
    screenshot(nb.page, f"lab-{name[:2]}")
    assert not [e for e in nb.console_errors if "favicon" not in e], nb.console_errors[:3]
    nb.close()
