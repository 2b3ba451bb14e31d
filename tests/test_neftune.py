"""course_utils.neftune (exported from notebook 04): the noise, the hook, attach/detach, bad input."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers.integrations.neftune import activate_neftune, deactivate_neftune, neftune_post_forward_hook

from course_utils.errors import CourseError
from course_utils.neftune import (attach_neftune, check_alpha, detach_neftune, input_embeddings, neftune,
                                  neftune_alpha, neftune_hook, neftune_noise, noise_scale, per_sample_noise,
                                  token_lengths)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))


def logits_after_seed(model, ids, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- the noise


def test_noise_scale_is_alpha_over_sqrt_L_d():
    for alpha, length, dim in ((5, 11, 64), (10, 300, 576), (15, 1, 4096)):
        assert noise_scale(alpha, length, dim).item() == pytest.approx(alpha / math.sqrt(length * dim), rel=1e-6)


def test_noise_is_bounded_and_has_the_formula_variance():
    torch.manual_seed(0)
    x = torch.zeros(4, 100, 256)
    noise = neftune_noise(x, 10)
    s = noise_scale(10, 100, 256).item()
    assert noise.shape == x.shape and noise.abs().max() <= s
    n = noise.numel()
    ratio = noise.pow(2).mean().item() / (s * s / 3)
    assert abs(ratio - 1) <= 6 * math.sqrt(0.8 / n)


def test_noise_equals_transformers_hook_bit_for_bit():
    x = torch.randn(2, 37, 576)
    module = nn.Identity().train()
    module.neftune_noise_alpha = 5.0
    for seed in range(5):
        torch.manual_seed(seed)
        theirs = neftune_post_forward_hook(module, None, x)
        torch.manual_seed(seed)
        ours = neftune_hook(5)(module, None, x)
        assert torch.equal(ours, theirs)


def test_noise_needs_three_dimensions():
    with pytest.raises(CourseError, match="batch, length, hidden"):
        neftune_noise(torch.zeros(3, 4), 5)


# ---------------------------------------------------------------- the hook on a model


def test_hook_equals_transformers_on_a_model(model, ids):
    model.train()
    with neftune(model, 5):
        ours = logits_after_seed(model, ids)
    handle = activate_neftune(model, 5)
    theirs = logits_after_seed(model, ids)
    deactivate_neftune(model, handle)
    plain = logits_after_seed(model, ids)
    assert torch.equal(ours, theirs) and not torch.equal(ours, plain)


def test_no_noise_in_eval_mode_or_at_alpha_zero(model, ids):
    clean = logits_after_seed(model.eval(), ids)
    with neftune(model, 15):
        assert torch.equal(logits_after_seed(model, ids), clean)
    model.train()
    train_clean = logits_after_seed(model, ids)
    with neftune(model, 0):
        assert torch.equal(logits_after_seed(model, ids), train_clean)


def test_attach_detach_roundtrip(model, ids):
    model.train()
    before = logits_after_seed(model, ids)
    handle = attach_neftune(model, 5)
    assert neftune_alpha(model) == 5.0 and len(input_embeddings(model)._forward_hooks) == 1
    assert handle is not None
    assert detach_neftune(model) == 5.0
    assert neftune_alpha(model) is None and not input_embeddings(model)._forward_hooks
    assert torch.equal(logits_after_seed(model, ids), before)


def test_attached_hook_survives_deepcopy_and_detaches_on_the_copy(model):
    attach_neftune(model, 10)
    twin = copy.deepcopy(model)
    assert neftune_alpha(twin) == 10.0
    detach_neftune(twin)
    assert neftune_alpha(twin) is None and neftune_alpha(model) == 10.0
    detach_neftune(model)


def test_context_manager_detaches_on_error(model):
    with pytest.raises(RuntimeError):
        with neftune(model, 5):
            raise RuntimeError("boom")
    assert neftune_alpha(model) is None


def test_neftune_alpha_sees_transformers_hook(model):
    handle = activate_neftune(model, 7)
    assert neftune_alpha(model) == 7
    with pytest.raises(CourseError, match="already attached"):
        attach_neftune(model, 5)
    deactivate_neftune(model, handle)
    assert neftune_alpha(model) is None


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("alpha", [-1, -0.5, float("nan"), float("inf"), "5", None, True])
def test_bad_alpha_is_a_course_error(alpha):
    with pytest.raises(CourseError, match="finite number >= 0") as info:
        neftune_hook(alpha)
    assert "neftune_hook(5)" in str(info.value), "the message says what to pass instead"


def test_negative_alpha_on_attach(model):
    with pytest.raises(CourseError, match="alpha=-5"):
        attach_neftune(model, -5)
    assert neftune_alpha(model) is None


def test_check_alpha_accepts_numbers():
    assert check_alpha(5) == 5.0 and isinstance(check_alpha(5), float) and check_alpha(0) == 0.0


def test_attaching_twice_raises_and_keeps_one_hook(model):
    attach_neftune(model, 5)
    with pytest.raises(CourseError, match="already attached.*detach_neftune"):
        attach_neftune(model, 10)
    assert neftune_alpha(model) == 5.0 and len(input_embeddings(model)._forward_hooks) == 1
    detach_neftune(model)


def test_detaching_without_hook_raises(model):
    with pytest.raises(CourseError, match="not attached.*attach_neftune"):
        detach_neftune(model)


def test_not_a_transformers_model():
    with pytest.raises(CourseError, match="get_input_embeddings"):
        attach_neftune(nn.Linear(3, 3), 5)


# ---------------------------------------------------------------- per-sample L


def test_token_lengths_padded_packed_and_left_padded():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    # padding counts in no sample, on either side; a padding token takes its row's length
    assert token_lengths(mask.shape, mask).tolist() == [[3.0] * 5, [5.0] * 5, [3.0] * 5]
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert token_lengths(packed.shape, position_ids=packed).tolist() == [[3.0] * 3 + [2.0] * 2 + [4.0] * 4]
    assert token_lengths((2, 4)).tolist() == [[4.0] * 4] * 2  # no mask, no position ids: every row is one sample


def test_token_lengths_ignore_a_4d_mask_and_never_return_zero():
    packed = torch.tensor([[0, 1, 0, 1, 2, 0, 0]])  # two samples, then two padding tokens (position 0 each)
    four_d = torch.zeros(1, 1, 7, 7)
    assert token_lengths(packed.shape, four_d, packed).tolist() == [[2.0, 2.0, 3.0, 3.0, 3.0, 1.0, 1.0]]
    empty = torch.tensor([[0, 0, 0]])
    assert token_lengths(empty.shape, empty).min() >= 1


def test_per_sample_noise_has_each_samples_scale():
    torch.manual_seed(0)
    lengths = torch.tensor([[4.0] * 4 + [16.0] * 4])
    noise = per_sample_noise(torch.zeros(1, 8, 4096), 10, lengths)
    for span, n in ((slice(0, 4), 4), (slice(4, 8), 16)):
        s = 10 / math.sqrt(n * 4096)
        part = noise[:, span]
        assert part.abs().max() <= s * (1 + 1e-6) and part.abs().max() > 0.99 * s
        assert abs(part.pow(2).mean().item() / (s * s / 3) - 1) <= 6 * math.sqrt(0.8 / part.numel())


def test_per_sample_without_padding_equals_transformers(model, ids):
    mask = torch.ones_like(ids)
    model.train()
    with neftune(model, 5, per_sample=True):
        torch.manual_seed(3)
        with torch.no_grad():
            ours = model(input_ids=ids, attention_mask=mask).logits
    handle = activate_neftune(model, 5)
    torch.manual_seed(3)
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits
    deactivate_neftune(model, handle)
    model.eval()
    assert torch.equal(ours, theirs)


def test_per_sample_reads_the_mask_through_the_model(model, ids):
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0  # row 0 holds a sample of 3 tokens
    captured = []
    embeddings = input_embeddings(model)
    with torch.no_grad():
        clean = embeddings(ids)
    with neftune(model, 10, per_sample=True):
        probe = embeddings.register_forward_hook(lambda m, i, out: captured.append(out - clean))
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        probe.remove()
    model.eval()
    noise = captured[0]
    dim = noise.size(-1)
    assert noise[0].abs().max() > 10 / math.sqrt(ids.size(1) * dim)  # more than the row's scale allows
    assert noise[0].abs().max() <= 10 / math.sqrt(3 * dim) * (1 + 1e-6)
    assert noise[1].abs().max() <= 10 / math.sqrt(ids.size(1) * dim) * (1 + 1e-6)


def test_per_sample_detach_removes_the_recorder_and_survives_deepcopy(model, ids):
    model.train()
    plain = logits_after_seed(model, ids)
    attach_neftune(model, 5, per_sample=True)
    assert len(model._forward_pre_hooks) == 1 and neftune_alpha(model) == 5.0
    twin = copy.deepcopy(model)
    assert detach_neftune(twin) == 5.0 and not twin._forward_pre_hooks and not input_embeddings(twin)._forward_hooks
    assert len(model._forward_pre_hooks) == 1, "detaching the copy leaves the original's hooks"
    assert detach_neftune(model) == 5.0
    assert not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs
    assert torch.equal(logits_after_seed(model, ids), plain)  # plain again: no noise in training mode
    model.eval()


def test_per_sample_needs_the_models_forward(model, ids):
    with neftune(model, 5, per_sample=True):
        embeddings = input_embeddings(model).train()
        with pytest.raises(CourseError, match="call the model"):
            embeddings(ids)
        embeddings.eval()
        assert torch.equal(embeddings(ids), nn.functional.embedding(ids, embeddings.weight))  # eval: no noise, no error
    model.eval()


def test_per_sample_reads_padding_free_position_ids_through_the_model(model, ids):
    # TRL's padding-free batches (SFTTrainer(packing=True), "bfd"): one row, position ids restarting per sample,
    # no attention_mask. Samples of 3 and 30 tokens: each token's bound is its own sample's, not the row's 33.
    flat = torch.cat([ids[0, :3], ids.flatten()[:30]]).view(1, -1)
    position_ids = torch.cat([torch.arange(3), torch.arange(30)]).view(1, -1)
    captured = []
    embeddings = input_embeddings(model)
    with torch.no_grad():
        clean = embeddings(flat)
    with neftune(model, 10, per_sample=True):
        probe = embeddings.register_forward_hook(lambda m, i, out: captured.append(out - clean))
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            model(input_ids=flat, position_ids=position_ids)
        probe.remove()
    model.eval()
    noise, dim = captured[0][0], clean.size(-1)
    assert noise[:3].abs().max() > 10 / math.sqrt(33 * dim)  # the short sample gets more than the row's scale allows
    assert noise[:3].abs().max() <= 10 / math.sqrt(3 * dim) * (1 + 1e-6)
    assert noise[3:].abs().max() <= 10 / math.sqrt(30 * dim) * (1 + 1e-6)


# ---------------------------------------------------------------- exercise 2's stored cases

import runpy  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXERCISE_CASES_04 = ROOT / "data" / "exercises" / "04_neftune.pt"


def answers_04():
    return runpy.run_path(str(ROOT / "tests" / "exercise_answers" / "04_neftune.py"))  # not a package: run by path


def test_stored_exercise_cases_are_the_oracles():
    # Catches a stored case edited by hand, or cases that drift from the oracle's arguments.
    assert torch.load(EXERCISE_CASES_04) == answers_04()["exercise_cases_04"]()


def test_exercise_2_cases_refuse_the_wrong_answer_and_pass_the_solution():
    # Catches a case set that the norm-matching answer passes (every batch of one size), and a hidden solution
    # that disagrees with the oracle; the expected values are not round numbers alpha * sqrt(k).
    import json

    from course_utils.exercises import check_exercise

    cases = torch.load(EXERCISE_CASES_04)["trl_matching_alpha"]
    with pytest.raises(AssertionError):
        check_exercise(answers_04()["trl_matching_alpha"], cases)
    nb = json.loads((ROOT / "notebooks" / "04_neftune.ipynb").read_text())
    ns = {"math": math, "torch": torch, "check_exercise": check_exercise, "EXERCISE_CASES": {"trl_matching_alpha": cases},
          "per_sample_noise": per_sample_noise, "neftune_noise": neftune_noise, "token_lengths": token_lengths}
    exec("".join(next(c for c in nb["cells"] if "def trl_matching_alpha_solution" in "".join(c["source"]))["source"]), ns)
    assert check_exercise(ns["trl_matching_alpha_solution"], cases)
    noisy = [(args, expected) for args, expected in cases if args[0] and args[2]]
    assert all(abs(expected / args[2] - round(expected / args[2])) > 1e-3 for args, expected in noisy
               if len({len(b) for b in args[0]}) > 1), "a mixed case reads as alpha times a whole number"


if __name__ == "__main__":  # python tests/test_neftune.py: rewrite data/exercises/04_neftune.pt from the oracle
    EXERCISE_CASES_04.parent.mkdir(parents=True, exist_ok=True)
    torch.save(answers_04()["exercise_cases_04"](), EXERCISE_CASES_04)
    print(f"wrote {EXERCISE_CASES_04}")
