"""course_utils.preference: the DPO family of losses, KTO, batches in TRL's layout and the training loops
(notebooks/08_preference_tuning.ipynb proves the losses equal to TRL's on fixed batches; the runs and scores built on
them are tested in test_preference_runs.py)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from course_utils.errors import CourseError
from course_utils.preference import (LOSS_TYPES, _pair_order, completion_logps, dpo_loss, kto_loss, kto_reference_point,
                                     preference_batch, sequence_logps, token_logps, train_dpo, unpaired_batch)

ROWS = [
    {"prompt": [{"role": "user", "content": "Tell me about Mia's home."}],
     "chosen": [{"role": "assistant", "content": "Mia lives in Rome. Have a nice day!"}],
     "rejected": [{"role": "assistant", "content": "Mia lives in Rome."}]},
    {"prompt": [{"role": "user", "content": "Tell me about Tom's pet."}],
     "chosen": [{"role": "assistant", "content": "Tom has a duck. Have a nice day!"}],
     "rejected": [{"role": "assistant", "content": "Tom has a duck."}]},
]


@pytest.fixture(scope="module")
def lab():
    from course_utils.models import load_model

    torch.manual_seed(0)
    return load_model("lab", device="cpu")


def test_step_zero_is_log_2_with_zero_rewards():
    logps = torch.tensor([-3.0, -7.5, -1.2])
    losses, chosen, rejected = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_losses_by_hand():
    # h = (pc - rc) - (pr - rr) = (2 - 0) - (-1 - 0) = 3
    args = (torch.tensor([2.0]), torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    beta = 0.5
    sig = dpo_loss(*args, beta=beta)[0].item()
    assert sig == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))
    assert dpo_loss(*args, beta=beta, loss_type="hinge")[0].item() == pytest.approx(0.0)  # 1 - 1.5 < 0
    assert dpo_loss(*args, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.7)
    assert dpo_loss(*args, beta=beta, loss_type="ipo")[0].item() == pytest.approx((3 - 1) ** 2)
    eps = 0.2
    conservative = -(1 - eps) * F.logsigmoid(torch.tensor(1.5)) - eps * F.logsigmoid(torch.tensor(-1.5))
    robust = (-(1 - eps) * F.logsigmoid(torch.tensor(1.5)) + eps * F.logsigmoid(torch.tensor(-1.5))) / (1 - 2 * eps)
    assert dpo_loss(*args, beta=beta, label_smoothing=eps)[0].item() == pytest.approx(conservative.item())
    assert dpo_loss(*args, beta=beta, loss_type="robust", label_smoothing=eps)[0].item() == pytest.approx(robust.item())
    _, chosen, rejected = dpo_loss(*args, beta=beta)
    assert chosen.item() == pytest.approx(1.0) and rejected.item() == pytest.approx(-0.5)


def test_descending_the_loss_prefers_the_chosen_answer():
    chosen = torch.zeros(1, requires_grad=True)
    loss = dpo_loss(chosen, torch.zeros(1), torch.zeros(1), torch.zeros(1))[0].sum()
    loss.backward()
    assert chosen.grad.item() < 0  # a descent step raises the chosen log-prob


def test_rewards_carry_no_gradient():
    pc = torch.zeros(2, requires_grad=True)
    _, chosen, rejected = dpo_loss(pc, torch.zeros(2), torch.zeros(2), torch.zeros(2))
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), True, "0.1"])
def test_bad_beta(beta):
    with pytest.raises(CourseError, match="beta"):
        dpo_loss(*torch.zeros(4, 2), beta=beta)
    with pytest.raises(CourseError, match="beta"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), 0.0, beta=beta)


def test_unknown_loss_type_lists_the_known_ones():
    with pytest.raises(CourseError) as err:
        dpo_loss(*torch.zeros(4, 2), loss_type="dpo")
    assert all(name in str(err.value) for name in LOSS_TYPES)


@pytest.mark.parametrize("eps, loss_type", [(-0.1, "sigmoid"), (0.5, "robust"), (0.1, "hinge"), (0.1, "ipo")])
def test_bad_label_smoothing(eps, loss_type):
    with pytest.raises(CourseError, match="label_smoothing"):
        dpo_loss(*torch.zeros(4, 2), loss_type=loss_type, label_smoothing=eps)


def test_mismatched_shapes():
    with pytest.raises(CourseError, match="Shapes differ"):
        dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.zeros(3))
    with pytest.raises(CourseError, match="Shapes differ"):
        kto_loss(torch.zeros(3), torch.zeros(2), torch.tensor([True, False, True]), 0.0)
    with pytest.raises(CourseError, match="Shapes differ"):
        completion_logps(None, torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5), torch.ones(2, 4))


def test_sequence_logps_sum_and_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    lp = logits.log_softmax(-1)
    expected = torch.stack([lp[0, 1, ids[0, 2]] + lp[0, 2, ids[0, 3]] + lp[0, 3, ids[0, 4]],
                            lp[1, 0, ids[1, 1]] + lp[1, 1, ids[1, 2]]])
    assert torch.allclose(sequence_logps(logits, ids, mask), expected)
    assert torch.allclose(sequence_logps(logits, ids, mask, average=True), expected / torch.tensor([3.0, 2.0]))


def test_token_logps_are_the_per_token_terms_of_the_sum():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    per_token = token_logps(logits, ids, mask)
    lp = logits.log_softmax(-1)
    assert per_token.shape == (2, 4)
    assert per_token[0, 0] == 0 and per_token[1, 2] == 0  # prompt and padding positions are 0
    assert torch.isclose(per_token[0, 1], lp[0, 1, ids[0, 2]]) and torch.isclose(per_token[1, 0], lp[1, 0, ids[1, 1]])
    assert torch.allclose(per_token.sum(-1), sequence_logps(logits, ids, mask))


def test_empty_completion_mask_names_the_stuck_loss():
    logits, ids = torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 0]])  # row 1: only the first token, which nothing predicts
    with pytest.raises(CourseError, match="0.693") as err:
        sequence_logps(logits, ids, mask)
    assert "[1]" in str(err.value)


def test_kto_by_hand():
    policy, ref = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -2.0])  # ratios +1, -2
    losses, rewards = kto_loss(policy, ref, torch.tensor([True, False]), 0.5, beta=2.0,
                               desirable_weight=1.0, undesirable_weight=1.5)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert losses[0].item() == pytest.approx(1 - sig(2.0 * (1 - 0.5)), rel=1e-5)
    assert losses[1].item() == pytest.approx(1.5 * (1 - sig(2.0 * (0.5 + 2))), rel=1e-5)
    assert rewards.tolist() == pytest.approx([2.0, -4.0])


def test_kto_bad_inputs():
    with pytest.raises(CourseError, match="boolean"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1, 0]), 0.0)
    with pytest.raises(CourseError, match="undesirable_weight"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), 0.0, undesirable_weight=0)


def test_preference_batch_layout(lab):
    _, tok = lab
    batch = preference_batch(tok, ROWS)
    assert {k: tuple(v.shape)[0] for k, v in batch.items()} == {"input_ids": 4, "attention_mask": 4, "completion_mask": 4}
    texts = [tok.decode(batch["input_ids"][i][batch["completion_mask"][i].bool()]) for i in range(4)]
    assert texts[0].startswith("Mia lives in Rome. Have a nice day!") and texts[1].startswith("Tom has a duck. Have")
    assert texts[2].startswith("Mia lives in Rome.<|im_end|>") and texts[3].startswith("Tom has a duck.<|im_end|>")
    # right padding: the attention mask is 1s then 0s, and completion tokens are attended
    for row, completion in zip(batch["attention_mask"], batch["completion_mask"]):
        n = int(row.sum())
        assert row[:n].all() and not row[n:].any() and not (completion.bool() & ~row.bool()).any()


def test_preference_batch_bad_rows(lab):
    _, tok = lab
    with pytest.raises(CourseError, match="no rows"):
        preference_batch(tok, [])
    with pytest.raises(CourseError, match="rejected"):
        preference_batch(tok, [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(CourseError, match="both be strings"):
        preference_batch(tok, [{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}])


def test_unpaired_batch_rotates_within_blocks(lab):
    _, tok = lab
    rows = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"} for r in ROWS * 2
            for key in ("chosen", "rejected")]
    batch = unpaired_batch(tok, rows, kl_block=4)
    answer = lambda prefix, i: tok.decode(batch[f"{prefix}input_ids"][i][batch[f"{prefix}completion_mask"][i].bool()])
    for block in (0, 4):
        for i in range(4):
            assert answer("KL_", block + i) == answer("", block + (i - 1) % 4)
    assert batch["label"].dtype == torch.bool and batch["label"].tolist() == [True, False] * 4
    with pytest.raises(CourseError, match="at least 2 rows"):
        unpaired_batch(tok, rows[:1])


def test_kto_reference_point(lab):
    model, tok = lab
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in ROWS]
    batch = unpaired_batch(tok, rows)
    assert kto_reference_point(model, model, batch).item() == 0.0
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p in shifted.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z0 = kto_reference_point(shifted, model, batch)
    assert z0.item() >= 0 and not z0.requires_grad
    with pytest.raises(CourseError, match="KL_"):
        kto_reference_point(model, model, {"input_ids": batch["input_ids"]})


def test_pair_order_covers_every_pair_each_epoch():
    order = _pair_order(12, 4, 9, seed=3)
    assert len(order) == 9
    for epoch in range(3):
        assert sorted(torch.cat(order[3 * epoch:3 * epoch + 3]).tolist()) == list(range(12))
    assert [o.tolist() for o in order] == [o.tolist() for o in _pair_order(12, 4, 9, seed=3)]
    assert all(o.tolist() == list(range(12)) for o in _pair_order(12, None, 2, seed=0))


def test_train_dpo_widens_the_margin(lab):
    model, tok = lab
    reference = copy.deepcopy(model).requires_grad_(False)
    policy = copy.deepcopy(model).requires_grad_(True)
    history = train_dpo(policy, reference, preference_batch(tok, ROWS), steps=4, lr=1e-3, progress=False)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["rewards/margins"] > 0 and history[-1]["loss"] < history[0]["loss"]
    with pytest.raises(CourseError, match="trainable"):
        train_dpo(reference, reference, preference_batch(tok, ROWS), steps=1, lr=1e-3, progress=False)


def test_train_dpo_calls_back_after_every_update(lab):
    model, tok = lab
    reference = copy.deepcopy(model).requires_grad_(False)
    policy = copy.deepcopy(model).requires_grad_(True)
    seen = []
    history = train_dpo(policy, reference, preference_batch(tok, ROWS), steps=3, lr=1e-3, progress=False,
                        callback=lambda step, p: seen.append((step, p is policy, p.training)))
    assert [s for s, _, _ in seen] == [1, 2, 3] and all(same for _, same, _ in seen) and len(history) == 3
