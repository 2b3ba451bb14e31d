"""Plausible wrong answers to notebook 10's exercises (tests/test_exercise_cells.py)."""

import torch


def accumulate(seed, micro_batches):
    # Each micro-batch's masked mean loss by hand (token-loss sum / its token count), weighted by its share of all the
    # label tokens: right whenever every micro-batch has label tokens, NaN gradients (0/0) when one has none.
    model = TinyLM(seed)  # noqa: F821  (defined by the notebook's exercise setup)
    total = sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro_batches)
    for m in micro_batches:
        logits, labels = model(m["ids"])[:, :-1], m["labels"][:, 1:]
        mask = (labels != -100).float()
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1),
                                                   reduction="none")
        mean = (losses * mask.reshape(-1)).sum() / mask.sum()
        (mean * mask.sum() / total).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def zero_bytes(n_params, world_size, stage):
    # Splits only Adam's two moments at stage 1, forgetting the fp32 master copy (4 of the 12 bytes).
    split = {0: 0, 1: 8, 2: 10, 3: 16}[stage]
    return (16 - split) * n_params + split * n_params // world_size


def fsdp_sent_per_step(weight_piece_bytes, grad_piece_bytes, world_size, micro_batches, sync_every_micro_batch):
    # Gathers the weights once per optimizer step, as if they stayed whole between micro-batches.
    scatters = (micro_batches if sync_every_micro_batch else 1) * (world_size - 1) * grad_piece_bytes
    return 2 * (world_size - 1) * weight_piece_bytes + scatters
