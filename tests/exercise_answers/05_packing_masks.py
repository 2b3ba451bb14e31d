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


def sliding_document_mask(seq_lens, window, dtype=torch.float32):
    # Off by one: lets a query see `window` steps back (window + 1 keys) instead of fewer than `window`.
    segment = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    i, j = torch.arange(len(segment))[:, None], torch.arange(len(segment))[None, :]
    allowed = (segment[i] == segment[j]) & (j <= i) & (i - j <= window)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
