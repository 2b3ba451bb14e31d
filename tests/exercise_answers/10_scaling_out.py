"""Plausible wrong answers to notebook 10's exercises (tests/test_exercise_cells.py)."""

import torch


def accumulate(seed, micro_batches):
    # The commonest mistake: each micro-batch's own mean loss (torch's ignore_index mean), divided by the number of
    # micro-batches, so the average of the micro-batch means. Right only when every micro-batch has as many label
    # tokens; wrong whenever they differ. (A hand-written masked mean, sum / mask.sum(), weighted by each
    # micro-batch's share of the tokens is right except on a micro-batch with no label tokens: NaN there, 0/0.)
    model = TinyLM(seed)  # noqa: F821  (defined by the notebook's exercise setup)
    for m in micro_batches:
        logits = model(m["ids"])[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), m["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100)
        (loss / len(micro_batches)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def zero_bytes(n_params, world_size, stage):
    # Splits only Adam's two moments at stage 1, forgetting the fp32 master copy (4 of the 12 bytes).
    split = {0: 0, 1: 8, 2: 10, 3: 16}[stage]
    return (16 - split) * n_params + split * n_params // world_size


def fsdp_sent_per_step(weight_piece_bytes, grad_piece_bytes, world_size, micro_batches, sync_every_micro_batch):
    # Gathers the weights once per optimizer step, as if they stayed whole between micro-batches.
    scatters = (micro_batches if sync_every_micro_batch else 1) * (world_size - 1) * grad_piece_bytes
    return 2 * (world_size - 1) * weight_piece_bytes + scatters
