"""course_utils.packing (exported from notebook 05): packers, positions, labels, masks, batches, bad input."""

import copy
import random

import pytest
import torch
from transformers import DataCollatorWithFlattening

from course_utils.errors import CourseError
from course_utils.packing import (IGNORE_INDEX, STRATEGIES, block_diagonal_mask, pack, packed_batch, packed_labels,
                                  packed_position_ids, padding_fraction, may_attend, sample_lengths, segment_ids)


def samples(lengths, seed=0):
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(1, 97) for _ in range(n)]} for n in lengths]


# ---------------------------------------------------------------- pack


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_sample_once_and_rows_fit(strategy):
    rng = random.Random(1)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    rows = pack(lengths, 64, strategy)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) >= -(-sum(lengths) // 64)


def test_naive_keeps_order_and_decreasing_packers_do_better():
    lengths = [2, 7, 9, 12, 2, 5, 8, 12, 3, 4]
    naive = pack(lengths, 16, "naive")
    assert [i for row in naive for i in row] == list(range(len(lengths)))
    assert len(pack(lengths, 16, "bfd")) == 4 < len(pack(lengths, 16, "ffd")) == 5 < len(naive) == 6


def test_best_fit_picks_the_tightest_row():
    # 10 and 8 open two rows (room 2 and 4); 3 joins the second (room 1 left). The 1 fits both rows:
    # first-fit takes the first (room 2), best-fit the tightest (room 1).
    assert pack([10, 8, 3, 1], 12, "ffd") == [[0, 3], [1, 2]]
    assert pack([10, 8, 3, 1], 12, "bfd") == [[0], [1, 2, 3]]


def test_bfd_equals_trl():
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    rng = random.Random(3)
    lengths = [rng.randint(1, 64) for _ in range(120)]
    data = Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)]})
    theirs = pack_dataset(data, 64, strategy="bfd", map_kwargs={"desc": None})
    ours = pack(lengths, 64, "bfd")
    assert [[lengths[i] for i in row] for row in ours] == [list(r) for r in theirs["seq_lengths"]]
    assert [[t for i in row for t in [i] * lengths[i]] for row in ours] == [list(r) for r in theirs["input_ids"]]


def test_exercise_1_expectations_are_trls_bfd_split():
    """Notebook 05's exercise 1 checks literal rows (no visible reference): they must still be what TRL computes."""
    import ast

    import nbformat
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    from pathlib import Path

    nb = nbformat.read(Path(__file__).parents[1] / "notebooks" / "05_packing_masks.ipynb", as_version=4)
    source = next(c.source for c in nb.cells if "check" in c.metadata.get("tags", []) and "split_cases =" in c.source)
    assignment = next(node for node in ast.parse(source).body
                      if isinstance(node, ast.Assign) and node.targets[0].id == "split_cases")
    cases = ast.literal_eval(assignment.value)
    assert len(cases) >= 5
    for (lengths, max_len), expected in cases:
        data = Dataset.from_dict({"input_ids": [list(range(n)) for n in lengths]})
        theirs = pack_dataset(data, max_len, strategy="bfd_split", map_kwargs={"desc": None})["seq_lengths"]
        assert [list(row) for row in theirs] == expected, (lengths, max_len)


def test_pack_takes_lengths_sequences_samples_and_tensors():
    assert pack([3, 2], 8) == pack([[1, 2, 3], [4, 5]], 8) == pack(samples([3, 2]), 8)
    assert pack([torch.tensor(3), torch.tensor(2)], 8) == pack([torch.zeros(3), torch.zeros(2)], 8) == [[0, 1]]


def test_sample_longer_than_max_len_is_a_course_error():
    with pytest.raises(CourseError, match=r"Sample 1 has 12 tokens, more than max_len=10.*Raise max_len"):
        pack([3, 12, 4], 10)


def test_empty_batch_is_a_course_error():
    with pytest.raises(CourseError, match="Nothing to pack"):
        pack([], 16)
    with pytest.raises(CourseError, match="Nothing to pack"):
        block_diagonal_mask([])
    with pytest.raises(CourseError, match="no rows"):
        packed_batch([], pad_token_id=0)


@pytest.mark.parametrize("bad", [[3, 0, 2], [[], [1]], [-1]])
def test_empty_sample_is_a_course_error(bad):
    with pytest.raises(CourseError, match="at least one token"):
        sample_lengths(bad)


@pytest.mark.parametrize("max_len", [0, -5, 2.5, True, "64"])
def test_bad_max_len(max_len):
    with pytest.raises(CourseError, match="max_len"):
        pack([1, 2], max_len)


def test_unknown_strategy():
    with pytest.raises(CourseError, match="naive, ffd, bfd"):
        pack([1, 2], 8, "best")


def test_boolean_lengths_are_refused():
    with pytest.raises(CourseError, match="not a length"):
        pack([True, 2], 8)


# ---------------------------------------------------------------- positions, labels, masks


def test_position_ids_restart_per_sample():
    assert packed_position_ids([3, 1, 2]).tolist() == [0, 1, 2, 0, 0, 1]
    assert packed_position_ids([3, 1, 2]).dtype == torch.long


def test_labels_start_each_sample_with_ignore():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5]}]
    assert packed_labels(rows) == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]


def test_mask_is_block_diagonal_and_causal():
    mask = block_diagonal_mask([2, 3])
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.float32
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert mask.min() == torch.finfo(torch.float32).min


def test_mask_padding_attends_only_to_itself():
    mask = block_diagonal_mask([2], torch.float64, total_len=4)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert mask.dtype == torch.float64


def test_boolean_mask_dtype_is_refused():
    with pytest.raises(CourseError, match="float dtype.*silently ignored"):
        block_diagonal_mask([2, 3], torch.bool)


def test_total_len_too_short():
    with pytest.raises(CourseError, match="total_len=3"):
        block_diagonal_mask([2, 3], total_len=3)


def test_padding_fraction():
    assert padding_fraction([[4, 2], [3, 3]]) == pytest.approx(1 - 12 / 14)
    assert padding_fraction([[5]]) == 0
    with pytest.raises(CourseError):
        padding_fraction([])


# ---------------------------------------------------------------- batches and the model


def test_packed_batch_shapes_and_padding():
    rows = [samples([3, 2]), samples([4], seed=1)]
    batch = packed_batch(rows, pad_token_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 5)
    assert batch["attention_mask"].shape == (2, 1, 5, 5)
    assert batch["input_ids"][1, 4] == 0 and batch["labels"][1, 4] == IGNORE_INDEX
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    with pytest.raises(CourseError, match="total_len"):
        packed_batch(rows, pad_token_id=0, total_len=4)


def test_packed_batch_equals_data_collator_with_flattening():
    rows = samples([5, 3, 7])
    ours = packed_batch([rows], pad_token_id=0)
    theirs = DataCollatorWithFlattening()(copy.deepcopy(rows))
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_unpacked(model, attention):
    net = copy.deepcopy(model)
    net.set_attn_implementation(attention)
    rows = samples([6, 3, 8], seed=2)
    with torch.no_grad():
        out = net(**packed_batch([rows[:2], rows[2:]], pad_token_id=0), use_cache=False)
        for r, row in enumerate([rows[:2], rows[2:]]):
            start = 0
            for sample in row:
                n = len(sample["input_ids"])
                alone = net(torch.tensor([sample["input_ids"]]), use_cache=False).logits[0]
                torch.testing.assert_close(out.logits[r, start:start + n], alone, atol=1e-5, rtol=0)
                start += n
        # token-mean loss of the unpacked samples (each sample's first token predicts nothing)
        losses, count = 0.0, 0
        for sample in rows:
            ids = torch.tensor([sample["input_ids"]])
            logits = net(ids, use_cache=False).logits[0]
            losses += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
            count += len(sample["input_ids"]) - 1
    torch.testing.assert_close(out.loss, losses / count, atol=1e-5, rtol=0)


def test_without_the_mask_samples_leak(model):
    rows = samples([6, 5], seed=4)
    batch = packed_batch([rows], pad_token_id=0)
    with torch.no_grad():
        naive = model(input_ids=batch["input_ids"], use_cache=False).logits[0, 6:]
        alone = model(torch.tensor([rows[1]["input_ids"]]), use_cache=False).logits[0]
    assert (naive - alone).abs().max() > 1e-3


def test_segment_ids_and_the_rule_the_mask_and_flex_attention_share():
    assert segment_ids([2, 1], total_len=5).tolist() == [0, 0, 1, -1, -2]  # each padding slot its own segment
    with pytest.raises(CourseError, match="total_len"):
        segment_ids([3, 3], total_len=5)
    segment = segment_ids([3, 2])
    position = torch.arange(5)
    allowed = may_attend(segment, position[:, None], position[None, :])
    assert torch.equal(allowed, block_diagonal_mask([3, 2])[0, 0] == 0)
    assert allowed[4, 3] and not allowed[3, 2] and not allowed[0, 1]  # same sample / other sample / the future


@pytest.mark.parametrize("strategy", ["ffd", "bfd"])
def test_decreasing_packers_respect_the_row_bound(strategy):
    # Every row but the last holds more than max_len - x tokens, x = the length that opened the last row.
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 60))]
        rows = pack(lengths, 100, strategy)
        opener = lengths[rows[-1][0]]
        assert all(sum(lengths[i] for i in row) > 100 - opener for row in rows[:-1])
