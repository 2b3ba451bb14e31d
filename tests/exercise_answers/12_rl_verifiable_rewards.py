"""Plausible wrong answers to notebook 12's exercises (tests/test_exercise_cells.py)."""
import torch


def silent_groups(rewards, group_size):
    # Only the all-wrong groups: an all-correct group is silent too (every reward equals the mean).
    grouped = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return (grouped == 0).all(dim=1)


def token_weights(lengths, loss_type, max_completion_length):
    # Every loss type as the token-level mean: misses GRPO's per-sequence mean and Dr. GRPO's constant.
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    return mask / sum(lengths)


def kl_term_gradient(logits, ref_logits, corrected):
    # The forward-KL gradient for both: misses that the ratio correction turns it into the reverse KL's.
    return logits.softmax(-1) - ref_logits.softmax(-1)
