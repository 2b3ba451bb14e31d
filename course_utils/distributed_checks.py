"""The library's side of notebook 10's proofs: what each one is compared with, run on the ranks.

`zero3_linear_against_fsdp` runs section 1.3's `Zero3Linear` beside the same layer under FSDP2's `fully_shard` and
in one process; `launch_environment(config_file)` is the environment `accelerate launch --config_file FILE` hands
every rank, from accelerate's own launcher code; `accelerate_fsdp_groups` is how accelerate's own
`fsdp2_prepare_model` groups a lab model under such a file. Built in section 5 of notebooks/10_scaling_out.ipynb;
the pieces they check are `course_utils.distributed`'s.
"""

# Exported from notebooks/10_scaling_out.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/10_scaling_out.ipynb · 5.4 · The library's side: FSDP2 on one layer, accelerate's launcher and grouping
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_utils.distributed import Zero3Linear, counting_collectives, fsdp_groups
from course_utils.launching import rank_device


def zero3_linear_against_fsdp(rows: int, cols: int, tokens: int, seed: int = 0) -> dict:
    """On every rank: the same linear layer as a Zero3Linear and under `fully_shard` (resharded after forward),
    each rank its own `tokens` inputs, which require a gradient; loss = sum of squared outputs over all ranks.
    Returns (on the CPU) this rank's piece of the weight and of its gradient both ways (FSDP's unpadded) and in one
    process, the inputs' gradients likewise, the all-gathers each way issued, and the bytes our backward saved."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device, rank, world = rank_device(), dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    linear = torch.nn.Linear(cols, rows, bias=False, dtype=torch.float64, device=device)
    inputs = torch.randn(world, tokens, cols, dtype=torch.float64, device=device)
    whole, x_one = linear.weight.detach().clone().requires_grad_(True), inputs.clone().requires_grad_(True)
    F.linear(x_one, whole).square().sum().backward()  # one process, all the inputs
    ours, x_ours, ours_count = Zero3Linear(linear), inputs[rank].clone().requires_grad_(True), {}
    with counting_collectives(ours_count):
        y = ours(x_ours)
        saved = sum(t.numel() * t.element_size() for t in y.grad_fn.saved_tensors)  # what autograd keeps
        y.square().sum().backward()
    fsdp, x_fsdp, fsdp_count = torch.nn.Sequential(linear), inputs[rank].clone().requires_grad_(True), {}
    fully_shard(fsdp, mesh=init_device_mesh(device.type, (world,)), reshard_after_forward=True)
    fsdp.set_gradient_divide_factor(1.0)
    fsdp.set_force_sum_reduction_for_comms(True)
    with counting_collectives(fsdp_count):
        fsdp(x_fsdp).square().sum().backward()
    real = fsdp[0].weight.to_local().shape[0]  # rows this rank really owns (FSDP's local tensor is unpadded)
    out = {"ours": ours.piece.detach()[:real], "ours_grad": ours.piece.grad[:real], "padding_grad": ours.piece.grad[real:],
           "fsdp": fsdp[0].weight.to_local().detach(), "fsdp_grad": fsdp[0].weight.grad.to_local(),
           "whole_grad": torch.chunk(whole.grad, world)[rank], "x_grad_ours": x_ours.grad, "x_grad_fsdp": x_fsdp.grad,
           "x_grad_one": x_one.grad[rank], "piece_bytes": ours.piece.numel() * ours.piece.element_size(),
           "x_bytes": x_ours.numel() * x_ours.element_size(), "saved_bytes": saved}
    out = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out | {"gathers": {"ours": ours_count.get("all_gather_single calls", 0),
                              "fsdp": fsdp_count.get("all_gather_single calls", 0)}}


# %% notebooks/10_scaling_out.ipynb · 5.4 · The library's side: FSDP2 on one layer, accelerate's launcher and grouping
def accelerate_fsdp_groups(config_file: str) -> list:
    """The groups accelerate's own fsdp2_prepare_model makes of a fresh lab model under `config_file`: the plugin
    built from the environment `accelerate launch` derives from the file (mixed precision off: gloo on CPU)."""
    from types import SimpleNamespace
    from unittest import mock

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from course_utils.models import load_model

    env = launch_environment(config_file)
    with mock.patch.dict(os.environ, {k: v for k, v in env.items() if k.startswith("FSDP_")}):
        plugin = FullyShardedDataParallelPlugin(cpu_ram_efficient_loading=False)  # every rank loads the weights
    fake = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, mixed_precision="no",
                           is_main_process=dist.get_rank() == 0, device=rank_device())
    return fsdp_groups(fsdp2_prepare_model(fake, load_model("lab", device="cpu")[0].to(rank_device())))


def launch_environment(config_file: str) -> dict:
    """The environment variables `accelerate launch --config_file FILE` hands every rank (accelerate's own code;
    it runs on CPU): ACCELERATE_MIXED_PRECISION, ACCELERATE_USE_FSDP, FSDP_* ..."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config_file), "x.py"]))
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if os.environ.get(k) != v} | {"multi_gpu": str(args.multi_gpu),
                                                                       "num_processes": str(args.num_processes)}
