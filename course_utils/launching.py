"""Starting the ranks of a data-parallel job from a notebook: spawned processes, the environment torchrun sets.

`launch(worker, *args, world_size=2)` spawns `world_size` fresh interpreters (spawn works on Linux, macOS and
Windows), gives each the variables `torchrun` and `accelerate launch` set (RANK, WORLD_SIZE, MASTER_ADDR, ...),
opens the process group (gloo on CPU, NCCL with a GPU per rank) and returns what `worker(*args)` returned on every
rank, in rank order. `check_world_size` says, before anything starts, whether this machine can run that many ranks;
`rank_device` is where a rank computes. Built in section 5.1 of notebooks/10_scaling_out.ipynb; the training that
runs on the ranks is `course_utils.distributed`.
"""

# Exported from notebooks/10_scaling_out.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/10_scaling_out.ipynb · 5.1 · Starting the ranks from a notebook
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from course_utils.errors import CourseError, check_positive
from course_utils.torch_compat import install

install(dist)  # an older torch (a GPU machine's own) gets torch 2.13's names for two collectives (section 1.3)


def usable_cores() -> int:
    """CPU cores this process may run on (a container's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_backend() -> str:
    """NCCL when there are GPUs for two ranks, else gloo on CPU."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "gloo"


def rank_device() -> torch.device:
    """Where this rank computes: its GPU under NCCL (set by `launch`), the CPU under gloo."""
    on_gpu = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def check_world_size(world_size, *, backend: str = "gloo", batch_rows: int | None = None,
                     oversubscribe: bool = False) -> int:
    """`world_size` if this machine can run that many ranks side by side (and split `batch_rows` evenly).
    `oversubscribe=True` lets more CPU ranks than cores share them (slow; the tests use it for 3 ranks)."""
    check_positive("world_size", world_size, hint="the number of processes")
    slots = torch.cuda.device_count() if backend == "nccl" else usable_cores()
    what = "GPUs" if backend == "nccl" else "CPU cores"
    if world_size > slots and not (oversubscribe and backend != "nccl"):
        raise CourseError(f"world_size={world_size} is more processes than this machine's {slots} {what} can run side "
                          f"by side; use world_size <= {slots} (one rank per GPU, or per core on CPU).")
    if batch_rows is not None and batch_rows % world_size:
        raise CourseError(f"A batch of {batch_rows} rows does not split evenly over {world_size} ranks; use a batch "
                          f"that is a multiple of {world_size} (e.g. {world_size * max(1, batch_rows // world_size)}).")
    return world_size


# %% notebooks/10_scaling_out.ipynb · 5.1 · Starting the ranks from a notebook
def free_port() -> int:
    """A TCP port nobody listens on, for rank 0's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, backend, out_dir, worker, args):
    # What torchrun and `accelerate launch` set for every process: who it is, and where rank 0 listens.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    threads = max(1, usable_cores() // world_size)  # the ranks share the cores: more threads would only contend
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        torch.save(worker(*args), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank leaves while another still talks to it (gloo aborts the process otherwise)
    finally:
        dist.destroy_process_group()


def launch(worker, *args, world_size: int = 2, backend: str | None = None, oversubscribe: bool = False) -> list:
    """Run `worker(*args)` on `world_size` spawned ranks; returns what each rank's call returned, in rank order.
    Starting the processes (a fresh interpreter each, then torch's imports) is the slow part: launch once and
    hand the ranks a list of work (`run_jobs`)."""
    backend = backend or default_backend()
    check_world_size(world_size, backend=backend, oversubscribe=oversubscribe)
    with tempfile.TemporaryDirectory(prefix="course-ranks-") as out:
        mp.start_processes(_rank_main, args=(world_size, free_port(), backend, out, worker, args),
                           nprocs=world_size, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
