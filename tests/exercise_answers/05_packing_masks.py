"""Plausible wrong answers to notebook 05's exercises (tests/test_exercise_cells.py)."""

import torch

from course_utils.packing import block_diagonal_mask, pack


def pack_split(lengths, max_len):
    # Cuts the long samples but packs the pieces in their original order (next-fit) instead of best-fit decreasing.
    pieces = []
    for length in lengths:
        pieces += [max_len] * (length // max_len) + ([length % max_len] if length % max_len else [])
    return [[pieces[i] for i in row] for row in pack(pieces, max_len, "naive")]


def conversation_mask(seq_lens, conversation_ids, dtype=torch.float32):
    # Ignores the conversation ids: one block per piece, so the turns of a conversation cannot see each other.
    return block_diagonal_mask(seq_lens, dtype)


def per_sample_loss(logits, labels, position_ids):
    # The packed batch's token mean (what the model's own loss gives): long samples still weigh more than short ones.
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100).item()


def label_token_weights(mean_label_tokens, target_shares):
    # Uses the target shares as example weights: what the page's sampler does, so long answers still get more tokens.
    return dict(target_shares)
