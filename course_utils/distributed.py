"""Training on several processes: data parallelism by hand, DDP and FSDP, and the bytes each rank holds and sends.

Built in notebooks/10_scaling_out.ipynb; `launch` (course_utils.launching, section 5.1) starts the ranks, and
`course_utils.distributed_checks` runs the library's side of the proofs. On a laptop the ranks are CPU processes talking over gloo; on a machine
with two or more GPUs, one process per GPU over NCCL.

    jobs = [Job("ddp", batches, steps=4, lr=1e-3), Job("fsdp", batches, steps=4, lr=1e-3)]
    per_rank = launch(run_jobs, jobs, world_size=2)   # one list of results per rank
    reference = [train_single(job) for job in jobs]   # the same steps in this process
"""

# Exported from notebooks/10_scaling_out.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/10_scaling_out.ipynb · 1.1 · What data parallelism does to one step
import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from course_utils.errors import CourseError, check_positive
from course_utils.launching import rank_device
from course_utils.torch_compat import library_name

IGNORE_INDEX = -100
NORMALISATIONS = ("global tokens", "rank mean")


def rank_rows(batch: dict, rank: int, world_size: int) -> dict:
    """Rank `rank`'s contiguous share of a global batch (every tensor split on the rows)."""
    rows = batch["input_ids"].shape[0]
    if rows % world_size:
        raise CourseError(f"A batch of {rows} rows does not split evenly over {world_size} ranks; use a batch that is a "
                          f"multiple of {world_size}.")
    share = rows // world_size
    return {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}


def label_tokens(batch: dict) -> int:
    """Tokens the loss is taken over: labels that are not ignored, after the one-token shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_loss(model, batch: dict, normaliser: float) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the label tokens, divided by `normaliser`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss in fp32 at least
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum") / normaliser


def global_label_tokens(local_batch: dict) -> int:
    """What a rank that holds only its own rows does: sum every rank's label-token count with one all-reduce."""
    count = torch.tensor([label_tokens(local_batch)], device=local_batch["labels"].device)
    dist.all_reduce(count)
    return int(count)


# %% notebooks/10_scaling_out.ipynb · 1.1 · What data parallelism does to one step
def rank_loss(model, global_batch: dict, rank: int, world_size: int, normalise: str = "global tokens"):
    """The loss rank `rank` backpropagates: its token sum / the global token count (its share of the one-process
    loss; the gradients are then summed over the ranks), or the trap, its own mean (gradients averaged, as DDP's
    default does)."""
    if normalise not in NORMALISATIONS:
        raise CourseError(f"normalise={normalise!r} is unknown; use one of {NORMALISATIONS}.")
    mine = rank_rows(global_batch, rank, world_size)
    if normalise == "rank mean":
        return token_loss(model, mine, label_tokens(mine))
    return token_loss(model, mine, label_tokens(global_batch))


def all_reduce_gradients(model, counter: dict | None = None):
    """Data parallelism by hand, after backward: one all-reduce (a SUM) per gradient, in place, so that every rank
    holds the sum of all ranks' gradients, the gradient of the global loss, and takes the same optimizer step."""
    for p in model.parameters():
        if p.grad is not None:
            if counter is not None:
                counter["allreduce"] = counter.get("allreduce", 0) + p.grad.numel() * p.grad.element_size()
            dist.all_reduce(p.grad)


def users_loss(model, batch: dict) -> torch.Tensor:
    """What a training script under accelerate backpropagates: the model's own loss (transformers' mean over the
    label tokens of the rows it was given, when nobody passes num_items_in_batch)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 use_cache=False).loss


# %% notebooks/10_scaling_out.ipynb · 1.2 · DDP through accelerate, with a count of what it all-reduces
STRATEGIES = ("ddp", "fsdp", "ddp_lora", "manual")
COUNTED = ("allreduce", "all_gather_single", "reduce_scatter_single")  # the collectives whose inputs are counted


@dataclass
class Job:
    """One training run every rank performs: a strategy, the global batches, and how long."""

    strategy: str                      # "ddp", "fsdp", "ddp_lora" or "manual" (all_reduce_gradients by hand)
    batches: list                      # global batches (dicts of tensors); rank r takes its rows of each
    steps: int = 4
    lr: float = 1e-3
    normalise: str = "global tokens"
    model: str = "lab"
    lora_rank: int = 8
    dtype: torch.dtype = torch.float32  # float64 for the proofs: summing in another order then costs far less
    name: str = ""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise CourseError(f"strategy={self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}.")
        check_positive("steps", self.steps, hint="a job's optimizer steps")
        if not self.batches:
            raise CourseError("A job needs at least one batch.")


def counting_allreduce(counter: dict, bucket):
    """All-reduce one DDP bucket as a SUM, counting its bytes and recording the bucket's storage."""
    buffer = bucket.buffer()
    counter["allreduce"] = counter.get("allreduce", 0) + buffer.numel() * buffer.element_size()
    storage = buffer.untyped_storage()  # the bucket's own flat buffer: a copy of its gradients DDP keeps
    counter.setdefault("bucket_storages", {})[storage.data_ptr()] = storage.nbytes()
    future = dist.all_reduce(buffer, async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


# %% notebooks/10_scaling_out.ipynb · 1.2 · DDP through accelerate, with a count of what it all-reduces
def local_tensor(t):
    """A rank's own piece of a tensor: the local shard of an FSDP DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind the local pieces of `tensors` (FSDP's padding included)."""
    storages = {}
    for t in tensors:
        if t is not None:
            storage = local_tensor(t).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def rank_bytes(model, optimizer) -> dict:
    """What this rank holds after backward: trainable parameters, their gradients, the optimizer state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {"parameters": held_bytes(trainable), "gradients": held_bytes(p.grad for p in trainable),
            "optimizer": held_bytes(states)}


# %% notebooks/10_scaling_out.ipynb · 1.3 · ZeRO-3 by hand, then FSDP: every parameter cut in $W$ pieces
def gather_rows(piece):
    """All-gather every rank's piece (equal sizes, padded) into the whole tensor, in rank order."""
    whole = piece.new_empty((dist.get_world_size() * piece.shape[0], *piece.shape[1:]))
    dist.all_gather_single(whole, piece.contiguous())
    return whole


def reduce_scatter_rows(whole):
    """Sum `whole` over the ranks and keep this rank's block of rows (SUM, not FSDP's default average)."""
    piece = whole.new_empty((whole.shape[0] // dist.get_world_size(), *whole.shape[1:]))
    dist.reduce_scatter_single(piece, whole.contiguous())
    return piece


class ShardedLinear(torch.autograd.Function):
    """y = x A^T, A held as this rank's piece of rows: gather A, use it, drop it; gather it again in backward."""

    @staticmethod
    def forward(ctx, x, piece, rows):
        ctx.save_for_backward(x, piece)  # never the gathered weight: it is freed when forward returns
        ctx.rows = rows
        return F.linear(x, gather_rows(piece)[:rows])

    @staticmethod
    def backward(ctx, grad_y):
        x, piece = ctx.saved_tensors
        whole = gather_rows(piece)  # the second all-gather: the weight again, for the input's gradient
        grad_x = grad_y @ whole[:ctx.rows]
        grad_whole = torch.zeros_like(whole)  # padding rows get no gradient
        grad_whole[:ctx.rows] = grad_y.reshape(-1, grad_y.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, reduce_scatter_rows(grad_whole), None


class Zero3Linear(torch.nn.Module):
    """A linear layer (no bias) that stores only this rank's ceil(rows / W) rows of the weight, padded with zeros
    as FSDP pads; the whole weight exists only while a forward or backward uses it."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        world, rank = dist.get_world_size(), dist.get_rank()
        self.rows = linear.weight.shape[0]
        chunk = -(-self.rows // world)
        padded = F.pad(linear.weight.detach(), (0, 0, 0, chunk * world - self.rows))
        self.piece = torch.nn.Parameter(padded[rank * chunk:(rank + 1) * chunk].clone())

    def forward(self, x):
        return ShardedLinear.apply(x, self.piece, self.rows)


# %% notebooks/10_scaling_out.ipynb · 1.3 · ZeRO-3 by hand, then FSDP: every parameter cut in $W$ pieces
def shard_fully(model, *, sum_gradients: bool = True):
    """FSDP2 full sharding of a transformers causal LM, grouped as accelerate's fsdp2_prepare_model groups it
    (see above). `sum_gradients`: reduce-scatter a sum (the losses are shares of the global mean) instead of
    FSDP's average."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(rank_device().type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embed.weight is head.weight
    if not tied:
        fully_shard(embed, mesh=mesh, reshard_after_forward=True)
    fully_shard([model.model.norm, *((embed, head) if tied else (head,))], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)  # the root: torch's default keeps it gathered
    if sum_gradients:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-scaled sum)
    return model


# %% notebooks/10_scaling_out.ipynb · 1.3 · ZeRO-3 by hand, then FSDP: every parameter cut in $W$ pieces
def fsdp_groups(model) -> list:
    """Each FSDP group of `model`: the names of its parameters, and whether it is resharded after forward."""
    from torch.distributed.fsdp import FSDPModule

    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    groups = {}
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        if group is not None:
            groups[id(group)] = (tuple(sorted(names[id(p.sharded_param)] for p in group.fsdp_params)),
                                 group.post_forward_mesh_info is not None)
    return sorted(groups.values())


# %% notebooks/10_scaling_out.ipynb · 5.2 · Counting what the collectives are handed, and what a rank writes
@contextlib.contextmanager
def counting_collectives(counter: dict):
    """Count the input bytes (and the calls) of every all-gather and reduce-scatter issued inside the block (as
    FSDP2 calls them)."""
    names = {name: library_name(dist, name) for name in ("all_gather_single", "reduce_scatter_single")}
    originals = {name: getattr(dist, names[name]) for name in names}  # the attribute torch's FSDP really calls

    def counted(name):
        def call(output, input, *args, **kwargs):
            counter[name] = counter.get(name, 0) + input.numel() * input.element_size()
            counter[f"{name} calls"] = counter.get(f"{name} calls", 0) + 1
            return originals[name](output, input, *args, **kwargs)
        return call

    for name in originals:
        setattr(dist, names[name], counted(name))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, names[name], fn)


def bytes_written() -> int | None:
    """Bytes this process has written so far, sockets included (Linux's /proc/self/io `wchar`), under gloo; None
    elsewhere. Read before and after a collective, it measures what gloo really sent, headers and all. NCCL moves
    its bytes over NVLink, PCIe or InfiniBand without a write call of this process, so there the count would be
    zero: on NCCL use `communication_bytes` (the ring model) or the profiler's collective events instead."""
    if dist.is_initialized() and dist.get_backend() != "gloo":
        return None
    try:
        with open("/proc/self/io") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("wchar"))
    except (OSError, StopIteration):
        return None


# %% notebooks/10_scaling_out.ipynb · 5.3 · One run, on a rank and in one process
def rms_norm_in_own_dtype(self, hidden_states):
    """LlamaRMSNorm's formula computed in the tensor's own dtype (transformers computes it in float32 always)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_throughout(model):
    """Make the norms compute in float64 too: transformers' RMSNorm upcasts to float32 (right for bf16 training),
    which in a float64 model rounds differently when the same rows are computed in a batch of another size."""
    import types

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm_in_own_dtype, module)
    return model


def job_model(job: "Job"):
    """A fresh copy of the job's model in the job's dtype, LoRA added (every linear layer) for ddp_lora, on this
    rank's device."""
    from course_utils.lora import add_lora
    from course_utils.memory import LAYER_LINEARS
    from course_utils.models import load_model

    model, _ = load_model(job.model, device="cpu")
    model.to(job.dtype)
    if job.dtype == torch.float64:
        float64_throughout(model)
    torch.manual_seed(0)  # the same LoRA initialisation on every rank and in the single process: drawn on the CPU
    if job.strategy == "ddp_lora":
        add_lora(model, list(LAYER_LINEARS), r=job.lora_rank, alpha=2 * job.lora_rank)
    return model.to(rank_device()).train()


def _on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def full_tensor(t) -> torch.Tensor:
    """A whole tensor on the CPU: an FSDP DTensor gathered from every rank (all ranks must call this together)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


# %% notebooks/10_scaling_out.ipynb · 5.3 · One run, on a rank and in one process
def wrap_for(job: "Job", model):
    """The job's wrapping on this rank: (model, optimizer, Accelerator or None, counter of the bytes sent). The
    trap (normalise="rank mean") runs as a user's script does: DDP's own hook (it averages), FSDP's own average."""
    from accelerate import Accelerator

    comm = {}
    users_path = job.normalise == "rank mean"
    if job.strategy == "fsdp":
        shard_fully(model, sum_gradients=not users_path)
    accelerator = Accelerator(cpu=rank_device().type == "cpu") if job.strategy in ("ddp", "ddp_lora") else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.lr, weight_decay=0.0)
    if accelerator:
        model, optimizer = accelerator.prepare(model, optimizer)
        if not users_path:
            model.register_comm_hook(comm, counting_allreduce)
    return model, optimizer, accelerator, comm


def run_job(job: "Job") -> dict:
    """Train `job` on this rank (inside `launch`); returns the full trained weights, the losses, what this rank
    held after its last backward and the bytes it handed to collectives (and, on gloo, wrote) per step."""
    rank, world_size, device = dist.get_rank(), dist.get_world_size(), rank_device()
    model, optimizer, accelerator, comm = wrap_for(job, job_model(job))
    plain = accelerator.unwrap_model(model) if accelerator else model
    losses, wire = [], 0
    first = _on(job.batches[0], device)
    tokens_agree = global_label_tokens(rank_rows(first, rank, world_size)) == label_tokens(first)
    with counting_collectives(comm):
        for step in range(job.steps):
            comm["bucket_storages"] = {}  # DDP rebuilds its buckets after step 1: the last step's are the ones it keeps
            written = bytes_written()
            batch = _on(job.batches[step % len(job.batches)], device)
            loss = (users_loss(model, rank_rows(batch, rank, world_size)) if job.normalise == "rank mean"
                    else rank_loss(model, batch, rank, world_size))
            (accelerator.backward(loss) if accelerator else loss.backward())
            if job.strategy == "manual":
                all_reduce_gradients(model, comm)
            wire = None if written is None else wire + bytes_written() - written  # forward + backward's traffic
            if step == 0:  # Adam hardly sees a gradient's scale: the gradients themselves show a missing factor W
                first_gradients = {n: full_tensor(p.grad) for n, p in plain.named_parameters() if p.grad is not None}
            held = rank_bytes(model, optimizer) if step == job.steps - 1 else None  # state exists from step 2 on
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    held["optimizer"] = rank_bytes(model, optimizer)["optimizer"]  # after the last step: all of it allocated
    held["buckets"] = sum(comm["bucket_storages"].values())  # DDP only: its flat bucket buffers
    return {"name": job.name or job.strategy, "rank": rank, "losses": losses, "held": held,
            "weights": {k: full_tensor(v) for k, v in plain.state_dict().items()}, "first_gradients": first_gradients,
            "tokens_agree": tokens_agree, "written_per_step": None if wire is None else wire / job.steps,
            "sent_per_step": {k: v / job.steps for k, v in comm.items() if k in COUNTED},
            "gathers_per_step": comm.get("all_gather_single calls", 0) / job.steps,
            "groups": fsdp_groups(plain) if job.strategy == "fsdp" else None,
            "distributed_type": str(accelerator.distributed_type) if accelerator else
            ("FSDP2 (fully_shard)" if job.strategy == "fsdp" else "by hand (all_reduce_gradients)"),
            "label_tokens": [label_tokens(rank_rows(b, rank, world_size)) for b in job.batches[:job.steps]]}


# %% notebooks/10_scaling_out.ipynb · 5.3 · One run, on a rank and in one process
def run_jobs(jobs: list) -> list:
    """Every job in turn on this rank (one launch, many runs: starting processes is the slow part). A job may also
    be a pair (function, args), run as function(*args) on every rank."""
    return [job[0](*job[1]) if isinstance(job, tuple) else run_job(job) for job in jobs]


def train_single(job: "Job") -> dict:
    """The same steps in this process, on the whole global batch, loss averaged over all its label tokens."""
    model = job_model(job)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.lr, weight_decay=0.0)
    losses = []
    for step in range(job.steps):
        batch = _on(job.batches[step % len(job.batches)], device)
        loss = token_loss(model, batch, label_tokens(batch))
        loss.backward()
        if step == 0:
            first_gradients = {n: full_tensor(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        held = rank_bytes(model, optimizer) if step == job.steps - 1 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    held["optimizer"] = rank_bytes(model, optimizer)["optimizer"]
    held["buckets"] = 0
    return {"name": job.name or job.strategy, "weights": {k: full_tensor(v) for k, v in model.state_dict().items()},
            "losses": losses, "held": held, "first_gradients": first_gradients}
