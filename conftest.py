"""Test-wide setup: offline guard, hub-offline variables, parameter overrides.

It lives at the repository root so that it covers both tests/ and the
notebooks that nbval collects from notebooks/.
"""

import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pytest

GUARD_DIR = Path(__file__).parent / "tests" / "offline_guard"

# Set before any kernel starts, so every notebook kernel inherits them.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GUARD_DIR), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("COURSE_OFFLINE_LOG", tempfile.mkstemp(prefix="course-offline-", suffix=".log")[1])
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

sys.path.insert(0, str(GUARD_DIR))
import sitecustomize  # noqa: E402  (the guard: this pytest process is guarded too)

if not hasattr(sitecustomize, "NetworkAccessBlocked"):
    # This Python imported its own sitecustomize at start-up (Debian's and Ubuntu's python3 ship one), before the
    # guard's folder was on the path: load the guard under its own name. Kernels still get it through PYTHONPATH.
    import importlib.util

    _spec = importlib.util.spec_from_file_location("course_offline_guard", GUARD_DIR / "sitecustomize.py")
    sitecustomize = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sitecustomize)

assert hasattr(sitecustomize, "NetworkAccessBlocked"), "offline guard not loaded"


OFFLINE_LOG = os.environ["COURSE_OFFLINE_LOG"]


def _offline_log_size() -> int:
    return os.path.getsize(OFFLINE_LOG)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Fail any test (or notebook cell) that tried to reach the network."""
    before = _offline_log_size()
    result = yield
    if _offline_log_size() > before:
        with open(OFFLINE_LOG) as fh:
            fh.seek(before)
            attempts = fh.read().strip()
        raise AssertionError(f"tried to use the network (the course must run offline):\n{attempts}")
    return result


def _patch_nbval_for_parameter_overrides():
    """`COURSE_SEED=3 make test`: add an injected-parameters cell after `parameters`."""
    from nbval.plugin import IPyNbCell, IPyNbFile

    from course_utils.tools.notebooks import overrides_from_env, parameter_cell, tags

    overrides = overrides_from_env()
    if not overrides:
        return
    collect = IPyNbFile.collect

    def collect_with_overrides(self):
        for item in collect(self):
            yield item
            if "parameters" in tags(item.cell):
                yield IPyNbCell.from_parent(
                    self, name="injected-parameters", cell_num=item.cell_num, cell=parameter_cell(overrides),
                    options=defaultdict(bool, check=False),
                )

    IPyNbFile.collect = collect_with_overrides


_patch_nbval_for_parameter_overrides()
