"""runtime: profile and device choice, seeding, threads, the environment block, Jupyter errors."""

import logging
import random
import warnings

import nbclient
import nbformat
import numpy as np
import pytest
import torch

from course_utils import runtime
from course_utils.errors import CourseError
from course_utils.runtime import default_profile, environment_report, setup

NO_CUDA_WARNING = "gpu profile asked for but no CUDA device found; running the cpu profile"


@pytest.fixture(autouse=True)
def clean_runtime(monkeypatch):
    """Each test starts as a fresh process would: no setup() yet, no env overrides, threads restored."""
    monkeypatch.setattr(runtime, "_current", None)
    for var in ("COURSE_PROFILE", "COURSE_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fake_hardware(monkeypatch, cuda=False, mps=False):
    monkeypatch.setattr(runtime, "_cuda_available", lambda: cuda)
    monkeypatch.setattr(runtime, "_mps_available", lambda: mps)


@pytest.mark.parametrize("cuda, expected", [(False, "cpu"), (True, "gpu")])
def test_default_profile_follows_cuda(monkeypatch, cuda, expected):
    fake_hardware(monkeypatch, cuda=cuda)
    assert default_profile() == expected


def test_course_profile_env_wins(monkeypatch):
    fake_hardware(monkeypatch, cuda=True)
    monkeypatch.setenv("COURSE_PROFILE", " CPU ")
    assert default_profile() == "cpu"


def test_invalid_course_profile_is_a_course_error(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "tpu")
    with pytest.raises(CourseError, match="set it to 'cpu' or 'gpu'"):
        default_profile()
    with pytest.raises(CourseError, match="use 'cpu' or 'gpu'"):
        setup(profile="fast")


def test_gpu_profile_without_cuda_warns_once_and_runs_cpu(monkeypatch, capsys):
    fake_hardware(monkeypatch, cuda=False)
    rt = setup(seed=0, profile="gpu")
    assert (rt.profile, rt.device) == ("cpu", "cpu")
    err = capsys.readouterr().err
    assert NO_CUDA_WARNING in err and len(err.strip().splitlines()) == 1


def test_gpu_profile_with_cuda_uses_it(monkeypatch, capsys):
    fake_hardware(monkeypatch, cuda=True)
    rt = setup(seed=0, profile="gpu")
    assert (rt.profile, rt.device) == ("gpu", "cuda")
    assert runtime.default_device() == "cuda"  # what load_model uses when no device is given
    assert capsys.readouterr().err == ""


def test_mps_only_when_asked(monkeypatch):
    fake_hardware(monkeypatch, cuda=False, mps=True)
    assert setup().device == "cpu"
    assert setup(allow_mps=True).device == "mps"


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seeding_is_reproducible():
    setup(seed=3, profile="cpu")
    first = draws()
    runtime.set_seed(3)
    assert draws() == first
    setup(seed=4, profile="cpu")
    assert draws() != first


def test_threads_default_env_and_argument(monkeypatch):
    rt = setup(profile="cpu")
    assert 1 <= rt.threads <= runtime.MAX_DEFAULT_THREADS and torch.get_num_threads() == rt.threads
    monkeypatch.setenv("COURSE_THREADS", "1")
    assert setup(profile="cpu").threads == 1 == torch.get_num_threads()
    assert setup(profile="cpu", threads=2).threads == 2
    monkeypatch.delenv("COURSE_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert setup(profile="CPU").threads == 1
    monkeypatch.setenv("COURSE_THREADS", "many")
    with pytest.raises(CourseError, match="COURSE_THREADS"):
        setup(profile="cpu")


def test_runtime_is_frozen():
    rt = setup(profile="cpu")
    with pytest.raises(AttributeError):
        rt.seed = 1


def test_environment_report_lists_versions_and_choices(monkeypatch):
    fake_hardware(monkeypatch, cuda=False)
    before = environment_report()  # the notebooks print it before setup(): the defaults
    assert "profile      cpu" in before and "seed" not in before
    setup(seed=7, profile="cpu", threads=1)
    report = environment_report()
    for name in ("python", *runtime.REPORTED_PACKAGES, "device", "threads", "profile", "seed"):
        assert any(line.split()[0] == name for line in report.splitlines()), name
    assert f"torch        {torch.__version__}" in report
    assert "profile      cpu" in report and "seed         7" in report


def test_setup_quiets_known_harmless_noise():
    setup(profile="cpu")
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    record = logger.makeRecord(
        logger.name,
        logging.WARNING,
        __file__,
        1,
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s.",
        ("x",),
        None,
    )
    assert not logger.filter(record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_course_error_in_jupyter_is_one_line_and_the_cell_still_fails():
    """nbval fails a cell when the kernel publishes an "error" output: the short form must be one."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "from course_utils.runtime import setup\nfrom course_utils.errors import CourseError\nrt = setup(0, 'cpu')"
        ),
        nbformat.v4.new_code_cell("raise CourseError('Run `make install` first.')"),
        nbformat.v4.new_code_cell("print('not reached')"),
    ]
    client = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3")
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        client.execute()
    [output] = nb.cells[1].outputs
    assert output.output_type == "error" and output.ename == "CourseError"
    assert len(output.traceback) == 1 and "Run `make install` first." in output.traceback[0]
    assert nb.cells[2].outputs == []  # "Run All" stopped at the failed cell


def test_torch_threads_sets_and_restores_the_thread_count():
    import torch

    from course_utils.runtime import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(CourseError, match="whole number >= 1"):
        with torch_threads(0):
            pass
