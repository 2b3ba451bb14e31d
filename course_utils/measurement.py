"""Memory measured on a real training step, field by field, to check the estimator against.

`measure_memory(model, batch, optimizer=)` runs one step at lr=0 and reads weights (bitsandbytes' 4-bit state
included), gradients, optimizer state and the tensors autograd saves (through `saved_tensors_hooks`, de-duplicated by
storage) into the same `MemoryBreakdown` that `course_utils.memory.estimate_memory` fills; `measure_peak` reads the
allocator's high-water mark of a steady-state step (CUDA's counters, or the CPU profiler's allocation events).
Built in section 1.6 of notebooks/01_memory_estimation.ipynb.
"""

# Exported from notebooks/01_memory_estimation.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/01_memory_estimation.ipynb · 1.6 · Measuring the same fields
import torch

from course_utils.errors import CourseError
from course_utils.memory import MemoryBreakdown, check_optimizer


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and repeats counted once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def weight_tensors(model) -> list:
    """Parameters plus the tensors of bitsandbytes 4-bit quantization states."""
    tensors = list(model.parameters())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if getattr(state, "nested", False):
                tensors += [state.offset, state.state2.absmax, state.state2.code]
    return tensors


# %% notebooks/01_memory_estimation.ipynb · 1.6 · Measuring the same fields
def make_optimizer(params, optimizer: str, foreach: bool | None = None):
    """The optimizer `optimizer` names, with lr=0 (a measurement must not change the model)."""
    optimizer = check_optimizer(optimizer)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=0.0)
    if optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.0, momentum=0.9)
    if optimizer in ("adam", "adamw"):
        return (torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW)(params, lr=0.0, weight_decay=0.0, foreach=foreach)
    import bitsandbytes as bnb

    return (bnb.optim.Adam8bit if optimizer == "adam8bit" else bnb.optim.AdamW8bit)(params, lr=0.0, weight_decay=0.0)


def training_batch(model, batch: dict) -> dict:
    """`batch` on the model's device, with labels (the inputs themselves) if it has none."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch if "labels" in batch else {**batch, "labels": batch["input_ids"]}


def saved_activation_bytes(model, batch: dict) -> tuple[int, torch.Tensor]:
    """(bytes saved for backward by model(**batch), loss), de-duplicated by storage, parameters left out."""
    weights = {t.untyped_storage().data_ptr() for t in weight_tensors(model)}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    batch = training_batch(model, batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    return sum(saved.values()), loss


# %% notebooks/01_memory_estimation.ipynb · 1.6 · Measuring the same fields
def measure_memory(model, batch: dict, *, optimizer: str = "adamw") -> MemoryBreakdown:
    """Bytes of weights, gradients, optimizer state and saved activations in one real training step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise CourseError("measure_memory needs a model with trainable parameters (requires_grad=True).")
    was_training = model.training
    model.train()
    opt = make_optimizer(trainable, optimizer)
    try:
        activations, loss = saved_activation_bytes(model, batch)
        loss.backward()
        gradients = storage_bytes(p.grad for p in trainable)
        opt.step()
        states = [v for state in opt.state.values() for v in state.values()]
        out = MemoryBreakdown(weights=storage_bytes(weight_tensors(model)), gradients=gradients,
                              optimizer=storage_bytes(states), activations=activations)
    finally:
        opt.zero_grad(set_to_none=True)
        model.train(was_training)
    return out


# %% notebooks/01_memory_estimation.ipynb · 1.6 · Measuring the same fields
def measure_peak(model, batch: dict, *, optimizer: str = "adamw", foreach: bool | None = None) -> int:
    """Allocator peak (bytes) of one steady-state training step: a first step allocates the optimizer state,
    the second is measured. CUDA: torch.cuda.max_memory_allocated. CPU: what lived before the step
    (weights, optimizer state) plus the running maximum of the profiler's allocation/free events; on CUDA, the same
    bytes plus how far max_memory_allocated rose during the step."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, optimizer, foreach)
    batch = training_batch(model, batch)
    was_training = model.training
    model.train()

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        step()
        before = storage_bytes(weight_tensors(model)) + storage_bytes(v for st in opt.state.values() for v in st.values())
        if trainable[0].device.type == "cuda":  # count this model's step only, not other tensors on the GPU
            torch.cuda.synchronize()
            already = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            return before + torch.cuda.max_memory_allocated() - already
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
        live = high = 0
        for _, nbytes in events:  # + for an allocation, - for a free
            live += nbytes
            high = max(high, live)
        return before + high
    finally:
        model.train(was_training)
