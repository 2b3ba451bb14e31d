"""Sample packing: rows of samples, per-sample position ids, labels at boundaries, the block-diagonal mask.

Built step by step in notebooks/05_packing_masks.ipynb, where packed and masked
logits are proved equal to running each sample alone, and the batches equal
transformers' DataCollatorWithFlattening and TRL's SFTConfig(packing=True) ("bfd").

    rows = pack(lengths, max_len=128, strategy="bfd")     # [[4, 0], [2, 1, 3], ...] sample indices per row
    batch = packed_batch([[samples[i] for i in row] for row in rows], pad_token_id=0)
    model(**batch)   # input_ids, labels, position_ids and an additive [B, 1, T, T] float attention_mask
"""

# Exported from notebooks/05_packing_masks.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/05_packing_masks.ipynb · 1.1 · Packers: which samples share a row
import torch

from course_utils.errors import CourseError, check_positive

IGNORE_INDEX = -100  # label value that cross-entropy skips
STRATEGIES = ("naive", "ffd", "bfd")


def _next_fit(lengths, max_len):
    """naive: in order; a new row when the next sample does not fit in the current one."""
    rows, room = [], 0
    for i, length in enumerate(lengths):
        if not rows or length > room:
            rows.append([])
            room = max_len
        rows[-1].append(i)
        room -= length
    return rows


# %% notebooks/05_packing_masks.ipynb · 1.1 · Packers: which samples share a row
def _first_fit(order, lengths, max_len):
    """ffd (order = longest first): each sample into the first row with room for it."""
    rows, rooms = [], []
    for i in order:
        row = next((r for r, room in enumerate(rooms) if lengths[i] <= room), None)
        if row is None:
            row = len(rows)
            rows.append([])
            rooms.append(max_len)
        rows[row].append(i)
        rooms[row] -= lengths[i]
    return rows


def _best_fit(order, lengths, max_len):
    """bfd: each sample into the row it fills most tightly; among equal rooms, the one that has waited longest."""
    rows, rooms, since = [], [], []  # since: the step at which a row's room last changed (TRL's tie-break)
    for step, i in enumerate(order):
        fits = [r for r, room in enumerate(rooms) if lengths[i] <= room]
        if fits:
            row = min(fits, key=lambda r: (rooms[r], since[r]))
        else:
            row = len(rows)
            rows.append([])
            rooms.append(max_len)
            since.append(step)
        rows[row].append(i)
        rooms[row] -= lengths[i]
        since[row] = step
    return rows


# %% notebooks/05_packing_masks.ipynb · 1.1 · Packers: which samples share a row
def sample_lengths(lengths_or_sequences) -> list[int]:
    """Token counts from lengths, token sequences or samples; a CourseError if there is nothing to pack."""
    items = list(lengths_or_sequences)
    if not items:
        raise CourseError("Nothing to pack: the list of samples is empty. Pass at least one sample, "
                          "or skip the empty batch before packing it.")
    lengths = [_length(item) for item in items]
    for index, length in enumerate(lengths):
        if length <= 0:
            raise CourseError(f"Sample {index} has length {length}: every sample needs at least one token. "
                              "Drop empty samples before packing.")
    return lengths


def _length(item) -> int:
    """A length (int), a token sequence, or a sample {"input_ids": [...], ...}."""
    if isinstance(item, dict):
        item = item["input_ids"]
    if isinstance(item, bool):
        raise CourseError(f"{item!r} is not a length: pass token counts, token sequences or samples.")
    if isinstance(item, int) or (isinstance(item, torch.Tensor) and item.ndim == 0):
        return int(item)
    return len(item)


def pack(lengths_or_sequences, max_len: int, strategy: str = "bfd") -> list[list[int]]:
    """Group samples into rows of at most max_len tokens; returns each row's sample indices.

    strategy: "naive" (in order, a new row when the next sample does not fit), "ffd" (first-fit decreasing)
    or "bfd" (best-fit decreasing, ties broken as TRL does).
    """
    lengths = sample_lengths(lengths_or_sequences)
    check_positive("max_len", max_len, hint="tokens; try 128")
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] > max_len:
        raise CourseError(
            f"Sample {longest} has {lengths[longest]} tokens, more than max_len={max_len}, so it fits no row. "
            f"Raise max_len to at least {lengths[longest]}, truncate long samples first, or cut them into pieces "
            "of at most max_len (TRL's packing_strategy='bfd_split').")
    if strategy == "naive":
        return _next_fit(lengths, max_len)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # longest first; ties keep their order
    if strategy == "ffd":
        return _first_fit(order, lengths, max_len)
    if strategy == "bfd":
        return _best_fit(order, lengths, max_len)
    raise CourseError(f"Unknown packing strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")


# %% notebooks/05_packing_masks.ipynb · 1.2 · Positions and labels inside a packed row
def packed_position_ids(seq_lens) -> torch.Tensor:
    """Position ids that restart at 0 for every sample: [0..L1-1, 0..L2-1, ...] (a LongTensor of sum(L) ids)."""
    return torch.cat([torch.arange(length) for length in sample_lengths(seq_lens)])


def packed_labels(samples) -> list[int]:
    """The samples' labels (their input_ids when they have none) one after another, the first of each set to -100.

    The model shifts labels by one: without this, a sample's last token would learn to predict the next sample's
    first token.
    """
    labels = []
    for sample in samples:
        own = list(sample.get("labels", sample["input_ids"]))
        labels += [IGNORE_INDEX] + own[1:]
    return labels


# %% notebooks/05_packing_masks.ipynb · 1.3 · The block-diagonal causal mask
def segment_ids(seq_lens, total_len: int | None = None) -> torch.Tensor:
    """Which sample each token of a row belongs to: [0]*L1 + [1]*L2 + ...; padding to total_len gets -1, -2, ..."""
    lengths = sample_lengths(seq_lens)
    padding = (sum(lengths) if total_len is None else total_len) - sum(lengths)
    if padding < 0:
        raise CourseError(f"total_len={total_len} is shorter than the samples ({sum(lengths)} tokens): "
                          f"raise it to >= {sum(lengths)}.")
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return torch.cat([segment, -1 - torch.arange(padding)])  # each padding position is a segment of its own


def may_attend(segment: torch.Tensor, query, key):
    """The block-diagonal causal rule: the same sample, and the key not after the query."""
    return (segment[query] == segment[key]) & (key <= query)


# %% notebooks/05_packing_masks.ipynb · 1.3 · The block-diagonal causal mask
def block_diagonal_mask(seq_lens, dtype: torch.dtype = torch.float32, total_len: int | None = None) -> torch.Tensor:
    """Additive causal mask [1, 1, T, T]: 0 where a token may attend (same sample, not later), finfo.min elsewhere.

    T = sum(seq_lens), or total_len to pad the row: each padding position then attends only to itself.
    """
    if not dtype.is_floating_point:
        raise CourseError(f"block_diagonal_mask needs a float dtype, not {dtype}: attention adds the mask to its "
                          "scores, and a boolean 4D mask is silently ignored by eager attention. Use torch.float32 "
                          "(or the model's dtype).")
    segment = segment_ids(seq_lens, total_len)
    position = torch.arange(len(segment))
    allowed = may_attend(segment, position[:, None], position[None, :])
    mask = torch.zeros(len(segment), len(segment), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


# %% notebooks/05_packing_masks.ipynb · 1.3 · The block-diagonal causal mask
def packed_batch(rows, pad_token_id: int, dtype: torch.dtype = torch.float32, total_len: int | None = None) -> dict:
    """Model inputs for packed rows (each a list of samples {"input_ids", optional "labels"}), right-padded to T.

    Returns input_ids, labels, position_ids [B, T] and attention_mask [B, 1, T, T] (block_diagonal_mask per row).
    """
    rows = [list(row) for row in rows]
    if not rows:
        raise CourseError("packed_batch got no rows: pack some samples first (pack(...)).")
    seq_lens = [sample_lengths(s["input_ids"] for s in row) for row in rows]
    width = max(sum(lens) for lens in seq_lens) if total_len is None else total_len
    input_ids, labels, positions, masks = [], [], [], []
    for row, lens in zip(rows, seq_lens):
        pad = width - sum(lens)
        if pad < 0:
            raise CourseError(f"A row holds {sum(lens)} tokens, more than total_len={total_len}: raise total_len.")
        input_ids.append([t for s in row for t in s["input_ids"]] + [pad_token_id] * pad)
        labels.append(packed_labels(row) + [IGNORE_INDEX] * pad)
        positions.append(torch.cat([packed_position_ids(lens), torch.zeros(pad, dtype=torch.long)]))
        masks.append(block_diagonal_mask(lens, dtype, width))
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels),
            "position_ids": torch.stack(positions), "attention_mask": torch.cat(masks)}


def padding_fraction(batches) -> float:
    """Share of computed token slots that are padding; batches: lists of row lengths, each padded to its longest."""
    real = sum(sum(rows) for rows in batches)
    computed = sum(len(rows) * max(rows) for rows in batches)
    if computed == 0:
        raise CourseError("padding_fraction got no tokens: pass a list of batches, each a list of row lengths.")
    return 1 - real / computed
