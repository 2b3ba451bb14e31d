"""The course site in a real browser: Playwright drives Debian's Chromium, with the network blocked.

The test executes notebooks 00 and 01 (the quickest; 00 has a widget, 01 plots and its calculator) into a temporary
build folder, builds the site from them (`course_utils.site`), and opens every page: it must load with no console
error and no request leaving the site, and the notebooks' pages must render their widgets from the saved state (not
the text fallback) and show their plots. Screenshots go to
build/screenshots/. `make test-browser` runs this file alone.

Chromium is found on PATH; where it is missing and apt can install it (root on Debian or Ubuntu), the test installs
Debian's package; otherwise it skips, naming the command.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from course_utils import paths

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
        pytest.skip(f"no Chromium found: install it with `{INSTALL}` (Playwright's own download needs the network)")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    build = tmp_path_factory.mktemp("build")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the inline backend: plots in the outputs
    env["COURSE_BUILD_DIR"] = str(build)
    subprocess.run([sys.executable, "-m", "course_utils.course", "run", "00", "01"], cwd=REPO, env=env, check=True,
                   capture_output=True, text=True)
    assets = paths.BUILD_DIR / "site-assets"
    (build / "site-assets").mkdir()
    for tarball in assets.glob("*.tgz") if assets.exists() else []:
        shutil.copy(tarball, build / "site-assets")
    if not list((build / "site-assets").glob("*.tgz")):
        subprocess.run([sys.executable, "-m", "course_utils.site", "assets"], cwd=REPO, env=env, check=True)
    subprocess.run([sys.executable, "-m", "course_utils.site", "build"], cwd=REPO, env=env, check=True)
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
