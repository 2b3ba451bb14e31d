"""course_utils.neftune (exported from notebook 04): the noise, the hook, attach/detach, bad input."""

import copy
import math

import pytest
import torch
from torch import nn
from transformers.integrations.neftune import activate_neftune, deactivate_neftune, neftune_post_forward_hook

from course_utils.errors import CourseError
from course_utils.neftune import (attach_neftune, check_alpha, detach_neftune, input_embeddings, neftune,
                                  neftune_alpha, neftune_hook, neftune_noise, noise_scale)


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
