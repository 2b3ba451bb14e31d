"""course_utils.preference: the DPO family of losses, KTO, batches in TRL's layout and the training loops
(notebooks/08_preference_tuning.ipynb proves the losses equal to TRL's on fixed batches; the runs and scores built on
them are tested in test_preference_runs.py)."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from course_utils.data import load_task
from course_utils.errors import CourseError
from course_utils.preference import (_KEYS, LOSS_TYPES, completion_logps, dpo_loss, kto_loss, kto_reference_point,
                                     pair_order, preference_batch, sequence_logps, token_logps, train_dpo, train_kto,
                                     unpaired_batch)
from course_utils.training import chat_batches, train

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
    order = pair_order(12, 4, 9, seed=3)
    assert len(order) == 9
    for epoch in range(3):
        assert sorted(torch.cat(order[3 * epoch:3 * epoch + 3]).tolist()) == list(range(12))
    assert [o.tolist() for o in order] == [o.tolist() for o in pair_order(12, 4, 9, seed=3)]
    assert all(o.tolist() == list(range(12)) for o in pair_order(12, None, 2, seed=0))


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


# ---------------------------------------------------------------- one loop: train_dpo, train_kto in train()
# The proof that moving them there (issue 20) changed no number: the loops they had of their own, kept verbatim as the
# reference, and the new ones train the same policy to the same losses, metrics and weights, bit for bit.

# What train_dpo and train_kto stepped with before training.train did it.
def _step(loss, params, optimizer, max_grad_norm):
    """One optimizer step on `loss`: backward, optional clipping, step, zero the gradients."""
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _trainable(model):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CourseError("The policy has no trainable parameters: set requires_grad=True on the ones to train.")
    return params


# The loops before issue 20, verbatim but for their names (and _KEYS, pair_order imported, unchanged).
def old_train_dpo(policy, reference, batch, *, steps: int, lr: float, beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, sft_weight: float = 0.0, average: bool = False,
                  batch_size: int | None = None, seed: int = 0, max_grad_norm: float | None = 1.0,
                  progress: bool = True, description: str = "DPO", callback=None) -> list[dict]:
    """DPO with a frozen reference: AdamW for `steps` steps on the pairs of one preference_batch, all of them
    each step, or `batch_size` pairs a step in an order drawn from `seed` (every pair once per epoch).

    average=True (and always for "ipo") feeds length-averaged log-probs to the loss; sft_weight > 0 adds RPO's
    NLL of the chosen answers (TRL's "sft" term: mean over the chosen tokens). Returns one dict per step with
    the metrics TRL logs (before that step's update): loss, rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies, logps/chosen, logps/rejected (sums over completion tokens), and h, the mean log-ratio
    difference the loss saw (length-averaged where the loss was). callback(step, policy), if given, runs after
    every update (step counts from 1), e.g. to evaluate along the way.
    """
    from tqdm.auto import tqdm

    params = _trainable(policy)
    optimizer = torch.optim.AdamW(params, lr=lr)
    with torch.no_grad():
        all_ref = completion_logps(reference, **batch)
    all_counts = batch["completion_mask"][:, 1:].sum(-1)
    normalise = average or loss_type == "ipo"
    pairs = batch["input_ids"].shape[0] // 2
    order = pair_order(pairs, batch_size, steps, seed)
    history = []
    policy.train()
    for step in tqdm(range(steps), desc=description, disable=not progress, mininterval=1.0):
        rows = torch.cat([order[step], order[step] + pairs])
        ref_chosen, ref_rejected = all_ref[rows].chunk(2)
        counts_chosen, counts_rejected = all_counts[rows].chunk(2)
        chosen, rejected = completion_logps(policy, *(batch[k][rows] for k in _KEYS)).chunk(2)
        if normalise:
            losses, _, _ = dpo_loss(chosen / counts_chosen, rejected / counts_rejected, ref_chosen / counts_chosen,
                                    ref_rejected / counts_rejected, beta=beta, loss_type=loss_type,
                                    label_smoothing=label_smoothing)
        else:
            losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                                    label_smoothing=label_smoothing)
        loss = losses.mean()
        fed_h = ((chosen / counts_chosen - ref_chosen / counts_chosen) - (rejected / counts_rejected - ref_rejected
                 / counts_rejected)) if normalise else (chosen - ref_chosen) - (rejected - ref_rejected)
        if sft_weight:
            loss = loss + sft_weight * -(chosen.sum() / counts_chosen.sum())
        r_chosen, r_rejected = beta * (chosen.detach() - ref_chosen), beta * (rejected.detach() - ref_rejected)
        history.append({"loss": loss.item(), "rewards/chosen": r_chosen.mean().item(),
                        "rewards/rejected": r_rejected.mean().item(),
                        "rewards/margins": (r_chosen - r_rejected).mean().item(),
                        "rewards/accuracies": (r_chosen > r_rejected).float().mean().item(),
                        "logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item(),
                        "h": fed_h.detach().mean().item()})
        _step(loss, params, optimizer, max_grad_norm)
        if callback is not None:
            callback(step + 1, policy)
    policy.eval()
    return history


def old_train_kto(policy, reference, batch, *, steps: int, lr: float, beta: float = 0.1,
                  desirable_weight: float = 1.0, undesirable_weight: float = 1.0, block: int | None = None,
                  max_grad_norm: float | None = 1.0, progress: bool = True, description: str = "KTO") -> list[dict]:
    """KTO on one unpaired_batch: all rows each step, or consecutive blocks of `block` rows in turn (build the
    batch with kl_block=block, so each block holds its own mismatched rows: TRL's sequential sampling).
    The reference point is re-estimated on every step's KL rows. Returns one dict per step: loss, kl,
    rewards/chosen, rewards/rejected (means over desirable and undesirable rows), logps/chosen, logps/rejected."""
    from tqdm.auto import tqdm

    params = _trainable(policy)
    optimizer = torch.optim.AdamW(params, lr=lr)
    n = batch["input_ids"].shape[0]
    block = block or n
    blocks = [torch.arange(i, min(i + block, n)) for i in range(0, n, block)]
    with torch.no_grad():
        all_ref = completion_logps(reference, *(batch[k] for k in _KEYS))
    history = []
    policy.train()
    for step in tqdm(range(steps), desc=description, disable=not progress, mininterval=1.0):
        rows = blocks[step % len(blocks)]
        part = {k: v[rows] for k, v in batch.items()}
        desirable = part["label"]
        z0 = kto_reference_point(policy, reference, part)
        logps = completion_logps(policy, *(part[k] for k in _KEYS))
        losses, rewards = kto_loss(logps, all_ref[rows], desirable, z0, beta=beta, desirable_weight=desirable_weight,
                                   undesirable_weight=undesirable_weight)
        loss = losses.mean()
        history.append({"loss": loss.item(), "kl": z0.item(), "rewards/chosen": rewards[desirable].mean().item(),
                        "rewards/rejected": rewards[~desirable].mean().item(),
                        "logps/chosen": logps[desirable].mean().item(),
                        "logps/rejected": logps[~desirable].mean().item()})
        _step(loss, params, optimizer, max_grad_norm)
    policy.eval()
    return history


def _run_both(lab, old, new, batch, **kwargs):
    """(old history, new history, old weights, new weights): the same policy trained by each loop."""
    model, _ = lab
    reference = copy.deepcopy(model).requires_grad_(False)
    runs = []
    for loop in (old, new):
        policy = copy.deepcopy(model).requires_grad_(True)
        history = loop(policy, reference, batch, progress=False, **kwargs)
        runs.append((history, [p.detach().clone() for p in policy.parameters()], policy.training))
    return runs


def _assert_same(runs):
    (old_history, old_weights, old_mode), (new_history, new_weights, new_mode) = runs
    # Catches any change of order or arithmetic in the step: a loss, a logged metric or a weight one ulp apart.
    assert torch.equal(torch.tensor([h["loss"] for h in new_history]), torch.tensor([h["loss"] for h in old_history]))
    assert new_history == old_history
    assert all(torch.equal(a, b) for a, b in zip(new_weights, old_weights))
    assert new_mode is old_mode is False  # both leave the policy in eval mode


@pytest.mark.parametrize("options", [
    dict(steps=3, lr=1e-3),                                                          # all pairs, sigmoid
    dict(steps=4, lr=1e-3, loss_type="ipo", batch_size=1, seed=3, sft_weight=0.5),   # length-averaged, batches, RPO
    dict(steps=3, lr=1e-3, loss_type="robust", label_smoothing=0.1, max_grad_norm=None, batch_size=1),
    dict(steps=2, lr=1e-3, loss_type="hinge", average=True, callback=lambda step, policy: None),
])
def test_train_dpo_through_train_changes_no_number(lab, options):
    batch = preference_batch(lab[1], ROWS)
    _assert_same(_run_both(lab, old_train_dpo, train_dpo, batch, **options))


@pytest.mark.parametrize("block", [None, 2])
def test_train_kto_through_train_changes_no_number(lab, block):
    rows = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"} for r in ROWS * 2
            for key in ("chosen", "rejected")]
    batch = unpaired_batch(lab[1], rows, kl_block=block)
    _assert_same(_run_both(lab, old_train_kto, train_kto, batch, steps=3, lr=1e-3, block=block,
                           undesirable_weight=1.5))


def test_train_dpo_callback_never_stops_the_loop(lab):
    model, tok = lab
    reference = copy.deepcopy(model).requires_grad_(False)
    policy = copy.deepcopy(model).requires_grad_(True)
    # Catches a callback whose True would stop training.train early: train_dpo's callback only observes.
    history = train_dpo(policy, reference, preference_batch(tok, ROWS), steps=3, lr=1e-3, progress=False,
                        callback=lambda step, p: True)
    assert len(history) == 3
    with pytest.raises(CourseError, match="trainable"):
        train_kto(reference, reference, unpaired_batch(tok, [{"prompt": r["prompt"], "completion": r["chosen"],
                                                              "label": True} for r in ROWS]), steps=1, lr=1e-3,
                  progress=False)


def test_train_with_the_default_loss_as_loss_fn_is_train(lab):
    model, tok = lab
    batches = list(itertools.islice(chat_batches(tok, load_task("reverse", "train").select(range(8)), batch_size=4), 3))
    histories, weights = [], []
    for loss_fn in (None, lambda m, b: m(**b, use_cache=False).loss):
        policy = copy.deepcopy(model).requires_grad_(True)
        histories.append(train(policy, batches, steps=3, lr=1e-3, progress=False, loss_fn=loss_fn).losses)
        weights.append([p.detach().clone() for p in policy.parameters()])
    # Catches a hook that changes the default path (another forward, use_cache left on, a missing argument).
    assert torch.equal(torch.tensor(histories[1]), torch.tensor(histories[0]))
    assert all(torch.equal(a, b) for a, b in zip(*weights))
