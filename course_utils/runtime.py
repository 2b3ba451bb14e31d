"""The first code cell of every notebook: seed, profile, device, threads.

    from course_utils.runtime import setup, environment_report
    rt = setup(seed=SEED, profile=PROFILE)
    print(environment_report())

A *profile* sizes the experiments: "cpu" (small, runs on 2 cores) or "gpu"
(bigger, needs CUDA). COURSE_PROFILE=cpu|gpu overrides the default, which is
"gpu" exactly when a CUDA device is present.
"""

import os
import random
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata

from course_utils.errors import CourseError, check_positive

PROFILES = ("cpu", "gpu")
MAX_DEFAULT_THREADS = 8  # a 135M model's matmuls stop scaling around here
REPORTED_PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes")


@dataclass(frozen=True)
class Runtime:
    seed: int
    profile: str
    device: str
    threads: int


_current: Runtime | None = None  # what the last setup() chose; read by default_device()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def default_profile() -> str:
    """COURSE_PROFILE if set, else "gpu" when CUDA is available, else "cpu"."""
    chosen = os.environ.get("COURSE_PROFILE", "").strip().lower()
    if chosen:
        if chosen not in PROFILES:
            raise CourseError(
                f"COURSE_PROFILE={os.environ['COURSE_PROFILE']!r} is not a profile; "
                "set it to 'cpu' or 'gpu', or unset it."
            )
        return chosen
    return "gpu" if _cuda_available() else "cpu"


def default_device() -> str:
    """The device chosen by the last setup(); before any setup(), CUDA if present, else CPU."""
    if _current is not None:
        return _current.device
    return "cuda" if _cuda_available() else "cpu"


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CUDA included) so a rerun draws the same numbers."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too (lazily, if CUDA starts later)


def _cgroup_cpus() -> int | None:
    """CPUs allowed by a container quota (cgroup v2 cpu.max), which os.cpu_count() ignores."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, int(int(quota) / int(period)))


def default_threads() -> int:
    """COURSE_THREADS or OMP_NUM_THREADS if set, else physical cores (limited by affinity and
    container quota), at most 8: hyper-threads and oversubscribed containers make torch's CPU
    matmuls slower, not faster."""
    for var in ("COURSE_THREADS", "OMP_NUM_THREADS"):
        override = os.environ.get(var, "").strip()
        if override:
            if not override.isdigit() or int(override) < 1:
                raise CourseError(f"{var}={override!r} must be a whole number >= 1; fix or unset it.")
            return int(override)
    import psutil

    limits = [psutil.cpu_count(logical=False) or os.cpu_count() or 1, MAX_DEFAULT_THREADS]
    if hasattr(os, "sched_getaffinity"):
        limits.append(len(os.sched_getaffinity(0)))
    if quota := _cgroup_cpus():
        limits.append(quota)
    return max(1, min(limits))


@contextmanager
def torch_threads(n: int):
    """Run the block with n torch CPU threads, then restore the setting. The lab model's matrices
    are so small (128 wide) that splitting them across threads costs more than it saves."""
    import torch

    check_positive("torch_threads n", n, hint="the number of threads")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pick(profile: str, allow_mps: bool) -> tuple[str, str]:
    """(profile, device) that will actually run."""
    if profile == "gpu":
        if _cuda_available():
            return "gpu", "cuda"
        print("Warning: gpu profile asked for but no CUDA device found; running the cpu profile.", file=sys.stderr)
    if allow_mps and _mps_available():
        return "cpu", "mps"  # the cpu profile's sizes, on Apple's GPU
    return "cpu", "cpu"


def setup(seed: int = 0, profile: str | None = None, *, threads: int | None = None, allow_mps: bool = False) -> Runtime:
    """Seed everything, choose profile/device/threads, and make errors readable in Jupyter."""
    global _current
    import torch

    profile = default_profile() if profile is None else str(profile).strip().lower()
    if profile not in PROFILES:
        raise CourseError(f"profile={profile!r} is not a profile; use 'cpu' or 'gpu'.")
    if threads is None:
        threads = default_threads()
    torch.set_num_threads(check_positive("threads", threads))
    profile, device = _pick(profile, allow_mps)
    set_seed(seed)
    _quiet_known_noise()
    _install_ipython_handler()
    _current = Runtime(seed=seed, profile=profile, device=device, threads=threads)
    if device == "cuda":
        _record_cuda_peak_after_each_cell()
    return _current


def _record_cuda_peak_after_each_cell() -> None:
    """On CUDA, keep the notebook's CUDA peak memory in its results after every cell (read by `make gpu-check`)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or getattr(shell, "_course_cuda_peak", False):
        return

    def record(_result=None):
        import torch

        from course_utils.results import store_result

        store_result("cuda_peak_bytes", int(torch.cuda.max_memory_allocated()), unit="B")

    shell.events.register("post_run_cell", record)
    shell._course_cuda_peak = True


def _quiet_known_noise() -> None:
    """Silence messages that look alarming but are harmless in this course."""
    # (bitsandbytes' import-time "Failed to load CPU gemm_4bit_forward" is filtered in course_utils/__init__.py.)
    # transformers renamed gradient_checkpointing* to activation_checkpointing*; TRL's own config
    # defaults and peft still use the old names, so learners see a warning they did not cause.
    warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing\w*` is deprecated", FutureWarning)
    # "The current process just got forked, after parallelism has already been used" (tokenizers).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _course_error_handler(shell, etype, value, tb, tb_offset=None):
    """Show a CourseError as its one sentence instead of a wall of traceback.

    IPython ignores what a custom handler returns, so it publishes the short text itself
    through `_showtraceback`: in Jupyter that sends a normal "error" output, which is what
    nbval and "Run All" look for; IPython already marks the cell as failed.
    """
    shell._get_exc_info((etype, value, tb))  # remember it, so %tb and %debug still work
    stb = [f"\x1b[31m{etype.__name__}\x1b[0m: {value}  (full traceback: %tb)"]
    shell._showtraceback(etype, value, stb)
    return stb


def _install_ipython_handler() -> None:
    ipython = sys.modules.get("IPython")  # imported already if we run inside IPython
    shell = ipython.get_ipython() if ipython else None
    if shell is not None:
        shell.set_custom_exc((CourseError,), _course_error_handler)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> str:
    """A compact block for the environment cell: versions, device, threads, profile.

    Before setup() it shows what setup() will choose by default; after it, what it chose.
    """
    import platform

    import torch

    rt = _current
    device = rt.device if rt else default_device()
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    rows = [("python", platform.python_version())]
    rows += [(name, _version(name)) for name in REPORTED_PACKAGES]
    rows += [
        ("device", device),
        ("threads", rt.threads if rt else default_threads()),
        ("profile", rt.profile if rt else default_profile()),
    ]
    if rt:
        rows.append(("seed", rt.seed))
    return "\n".join(f"{name:<13}{value}" for name, value in rows)
