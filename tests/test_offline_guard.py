"""The offline guard itself: remote access fails, loopback still works."""

import socket
import subprocess
import sys

import pytest


@pytest.fixture(autouse=True)
def private_log(tmp_path, monkeypatch):
    """These tests trip the guard on purpose: log to a private file, not the suite's."""
    log = tmp_path / "offline.log"
    monkeypatch.setenv("COURSE_OFFLINE_LOG", str(log))
    return log


def test_remote_connection_is_blocked(private_log):
    with pytest.raises(OSError, match="offline guard"):
        socket.create_connection(("93.184.216.34", 443), timeout=1)
    assert "93.184.216.34" in private_log.read_text()


def test_remote_name_lookup_is_blocked():
    with pytest.raises(OSError, match="offline guard"):
        socket.getaddrinfo("huggingface.co", 443)


def test_loopback_still_works():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    client.close()
    server.close()


def test_child_processes_are_guarded_too():
    """Notebook kernels are child processes: they must load the guard as well."""
    code = "import socket\ntry:\n socket.getaddrinfo('example.org', 80)\nexcept OSError as e:\n print(e)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "offline guard" in run.stdout, run.stderr


def test_hub_is_offline():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_guard_loads_beside_a_machine_sitecustomize(tmp_path):
    """Catches the guard silently missing where Python already imported its own sitecustomize at start-up (the GPU
    machine's python3 does): the test session must still start, and still be offline."""
    import os
    from pathlib import Path

    (tmp_path / "sitecustomize.py").write_text("MACHINE_OWN = True\n")
    repo = Path(__file__).resolve().parents[1]
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "offline_guard" not in p]
    log = tmp_path / "child-offline.log"
    log.touch()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *paths]), COURSE_OFFLINE_LOG=str(log))
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/test_offline_guard.py::test_remote_name_lookup_is_blocked",
                          "-q", "-p", "no:cacheprovider"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
