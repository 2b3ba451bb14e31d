"""`make site`: a static course site from the executed notebooks in build/, working with no network.

After `make course`, build/ holds every executed notebook. This writes build/site/:

- index.html: the course's notebook table and hardware table (from the README), linking every page;
- results.html: the results table of `make course`;
- NN_name.html: each executed notebook (nbconvert's lab template) with its plots embedded and its widgets'
  state, and a navigation bar in course order.

nbconvert's template loads require.js, MathJax and the Jupyter widget manager from CDNs. The site points them
at local copies in build/site/_static/ instead, from the npm packages requirejs, mathjax (2.7, SVG output) and
@jupyter-widgets/html-manager, fetched once into build/site-assets/ by
`make site-assets` (like `make install`, the one step that needs the network). A page then loads nothing from
outside the site.
"""

import argparse
import html
import json
import re
import tarfile
from pathlib import Path

from course_utils import paths
from course_utils.errors import CourseError
from course_utils.tools.notebooks import course_notebooks
from course_utils.tools.path import CORE_NOTEBOOKS, PREREQUISITES, STUDY_MINUTES, where_it_sits

SITE_DIR = paths.BUILD_DIR / "site"
ASSETS_DIR = paths.BUILD_DIR / "site-assets"
NPM_PACKAGES = {"requirejs": "2.3.8", "@jupyter-widgets/html-manager": "1.0.15", "mathjax": "2.7.9"}
STATIC = "_static"
LOCAL_URLS = {  # nbconvert HTMLExporter traits -> files under _static/
    "require_js_url": f"{STATIC}/require.js",
    "widget_renderer_url": f"{STATIC}/html-manager/embed-amd.js",
    # SVG output: no web fonts to load (a file:// page may not load fonts, by the browser's CORS rules)
    "mathjax_url": f"{STATIC}/mathjax/MathJax.js?config=TeX-AMS-MML_SVG-full,Safe",
    # mermaid is imported only by a page that has a diagram; the course's pages have none, so it is not shipped
    "mermaid_js_url": f"{STATIC}/mermaid-not-shipped.mjs",
    "mermaid_layout_elk_js_url": f"{STATIC}/mermaid-not-shipped.mjs",
}
MATHJAX_PARTS = {"MathJax.js", "config", "extensions", "jax", "localization"}
CDN = re.compile(r"https?://(?:cdnjs\.cloudflare\.com|unpkg\.com|cdn\.jsdelivr\.net)[^\s\"']*")
STYLE = """<style>
.course-nav{position:sticky;top:0;z-index:100;background:#263238;color:#eceff1;padding:6px 14px;font:14px sans-serif}
.course-nav a{color:#80cbc4;margin-right:12px;text-decoration:none}.course-nav a.here{color:#fff;font-weight:bold}
.course-path{background:#e0f2f1;color:#263238;padding:4px 14px;font:13px sans-serif}
.course-page{max-width:1100px;margin:1em auto;font:15px/1.5 sans-serif;padding:0 1em}
.course-page table{border-collapse:collapse}.course-page td,.course-page th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
</style>"""


def _npm_tarball(name: str, version: str) -> Path:
    return ASSETS_DIR / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def fetch_assets() -> None:
    """Download the npm packages the site vendors (needs the network once), into build/site-assets/."""
    import subprocess

    ASSETS_DIR.mkdir(parents=True, exist_ok=True)
    for name, version in NPM_PACKAGES.items():
        if not _npm_tarball(name, version).exists():
            subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=ASSETS_DIR, check=True)


def _extract(tarball: Path, member: str, target: Path) -> None:
    with tarfile.open(tarball) as archive:
        source = archive.extractfile(f"package/{member}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read())


def install_static(site: Path) -> None:
    """Copy MathJax, require.js and the widget manager into site/_static/."""
    missing = [n for n, v in NPM_PACKAGES.items() if not _npm_tarball(n, v).exists()]
    if missing:
        raise CourseError(f"The site's scripts {missing} are not in {ASSETS_DIR}: run `make site-assets` once "
                          "(it needs the network, like `make install`), then `make site` works offline.")
    static = site / STATIC
    with tarfile.open(_npm_tarball("mathjax", NPM_PACKAGES["mathjax"])) as archive:  # MathJax 2 without its web fonts
        for member in archive.getmembers():
            inside = member.name.removeprefix("package/")
            if member.isfile() and inside.split("/")[0] in MATHJAX_PARTS and "/HTML-CSS/" not in inside:
                target = static / "mathjax" / inside
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
    _extract(_npm_tarball("requirejs", NPM_PACKAGES["requirejs"]), "require.js", static / "require.js")
    for part in ("embed-amd.js", "libembed-amd.js"):
        _extract(_npm_tarball("@jupyter-widgets/html-manager", NPM_PACKAGES["@jupyter-widgets/html-manager"]),
                 f"dist/{part}", static / "html-manager" / part)


def _nav(pages: list[tuple[str, str]], here: str) -> str:
    mark = {True: ' class="here"', False: ""}
    links = "".join(f'<a href="{href}"{mark[href == here]}>{html.escape(title)}</a>' for href, title in pages)
    return f'<nav class="course-nav">{links}</nav>'


def path_html(stems: list[str]) -> str:
    """The index's opening: the core path in order, then the deep dives, each with what to read first."""
    def item(stem):
        number, title = stem[:2], stem[3:].replace("_", " ")
        first = ", ".join(PREREQUISITES.get(number, ())) or "nothing"
        return (f'<li><a href="{stem}.html">{number} {html.escape(title)}</a> · about {STUDY_MINUTES.get(number, "?")}'
                f" min · read first: {first}</li>")
    core = sorted((s for s in stems if s[:2] in CORE_NOTEBOOKS), key=lambda s: CORE_NOTEBOOKS.index(s[:2]))  # path order
    deep = [s for s in stems if s[:2] not in CORE_NOTEBOOKS]
    return ("<h2>The path</h2><p>Start with the <b>core path</b> (about a working day): in each notebook take its core "
            "sections (listed in its opening cell) and its easier exercises. Then the <b>deep dives</b>, in any order "
            "once what they build on is read; inside every notebook a section marked <i>(deep dive)</i> can wait.</p>"
            f"<h3>Core</h3><ol>{''.join(map(item, core))}</ol><h3>Deep dives</h3><ul>{''.join(map(item, deep))}</ul>")


def _with_nav(page: str, nav: str) -> str:
    page = page.replace("</head>", STYLE + "</head>", 1)
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, page, count=1)


def _readme_section(title: str) -> str:
    text = (paths.REPO_ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    return match.group(1) if match else ""


def _markdown(text: str) -> str:
    import mistune

    return mistune.create_markdown(plugins=["table"])(text)


def _standalone(title: str, body: str, nav: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head>"
            f"<body>{nav}<div class='course-page'>{body}</div></body></html>")


def notebook_html(nb) -> str:
    """One executed notebook as a page whose scripts are the site's own."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", embed_images=True, **LOCAL_URLS)
    body, _ = exporter.from_notebook_node(nb)
    return body


def build_site(build: Path = paths.BUILD_DIR, site: Path = SITE_DIR) -> list[Path]:
    """Write the site from the executed notebooks in `build`; returns the pages written."""
    import nbformat

    from course_utils.tools.course import runs_path, table

    executed = [build / nb.name for nb in course_notebooks() if (build / nb.name).exists()]
    if not executed:
        raise CourseError(f"No executed notebooks in {build}: run `make course` first.")
    site.mkdir(parents=True, exist_ok=True)
    install_static(site)
    pages = [("index.html", "Course"), ("results.html", "Results")] + [
        (f"{p.stem}.html", p.stem[:2] + " " + p.stem[3:].replace("_", " ")) for p in executed]
    written = []
    index = (f"<h1>Advanced LLM fine-tuning, from scratch</h1>{path_html([p.stem for p in executed])}<h2>The notebooks</h2>"
             f"{_markdown(_readme_section('The notebooks'))}<h2>Hardware</h2>{_markdown(_readme_section('Hardware'))}")
    built = {p.stem for p in executed}  # a notebook not executed yet keeps no link (make course NB=... builds some)
    index = re.sub(r'<a href="notebooks/(\d\d_\w+)\.ipynb">(.*?)</a>',
                   lambda m: f'<a href="{m.group(1)}.html">{m.group(2)}</a>' if m.group(1) in built else m.group(2), index)
    (site / "index.html").write_text(_standalone("Course", index, _nav(pages, "index.html")))
    records = [json.loads(runs_path(p.stem).read_text()) for p in executed if runs_path(p.stem).exists()]
    results = f"<h1>Results of make course</h1><pre>{html.escape(table(records))}</pre>"
    (site / "results.html").write_text(_standalone("Results", results, _nav(pages, "results.html")))
    written += [site / "index.html", site / "results.html"]
    for path in executed:
        nav = _nav(pages, f"{path.stem}.html") + f'<div class="course-path">{html.escape(where_it_sits(path.stem))}</div>'
        page = _with_nav(notebook_html(nbformat.read(path, as_version=4)), nav)
        outside = CDN.findall(page)
        if outside:
            raise CourseError(f"{path.name}'s page still loads {outside}: the site must not depend on a CDN.")
        (site / f"{path.stem}.html").write_text(page)
        written.append(site / f"{path.stem}.html")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the static course site from build/ (after make course).")
    parser.add_argument("command", nargs="?", default="build", choices=["build", "assets"])
    args = parser.parse_args(argv)
    if args.command == "assets":
        fetch_assets()
        print(f"site assets in {ASSETS_DIR}")
        return 0
    written = build_site()
    print(f"wrote {len(written)} pages to {SITE_DIR} (open {SITE_DIR / 'index.html'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
