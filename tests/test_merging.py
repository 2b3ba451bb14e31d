"""course_utils.merging (exported from notebooks 06 and 07): task vectors, the per-tensor merges
against peft.utils.merge_utils, whole-model merges, SLERP, and the bad inputs."""

import copy
from pathlib import Path

import pytest
import torch
from peft.utils import merge_utils as peft_merge

from course_utils import merging
from course_utils.errors import CourseError
from course_utils.merging import (apply_task_vectors, dare_linear, dare_ties, magnitude_prune, merge_models, slerp,
                                  task_arithmetic, task_vector, ties)


def tensors(n=3, shape=(9, 7), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(n)]


def perturbed(model, seed, scale=0.01):
    """A copy of `model` with every floating-point weight moved a little: a stand-in fine-tuned expert."""
    generator = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return tuned


# ---------------------------------------------------------------- per tensor, equal to PEFT


WEIGHTS = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.3, 1.2, 0.7])]


@pytest.mark.parametrize("weights", WEIGHTS, ids=["equal", "unequal"])
def test_task_arithmetic_equals_peft(weights):
    task = tensors()
    torch.testing.assert_close(task_arithmetic(task, weights), peft_merge.task_arithmetic(task, weights),
                               rtol=0, atol=0)


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("weights", WEIGHTS, ids=["equal", "unequal"])
def test_magnitude_prune_and_ties_equal_peft(density, weights):
    task = tensors(seed=int(density * 100))
    with pytest.warns(UserWarning) if density == 1.0 else _no_warning():  # PEFT warns that nothing is pruned
        expected_prune = peft_merge.magnitude_prune(task, weights, density)
    torch.testing.assert_close(magnitude_prune(task, weights, density), expected_prune, rtol=0, atol=0)
    for method in ("total", "frequency"):
        with pytest.warns(UserWarning) if density == 1.0 else _no_warning():
            expected = peft_merge.ties(task, weights, density, majority_sign_method=method)
        torch.testing.assert_close(ties(task, weights, density, majority_sign_method=method), expected,
                                   rtol=0, atol=0)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("density", [0.1, 0.5])
@pytest.mark.parametrize("weights", WEIGHTS, ids=["equal", "unequal"])
def test_dare_equals_peft_under_the_same_rng_state(density, weights):
    task = tensors(seed=7)
    for ours, theirs in ((dare_linear, peft_merge.dare_linear), (dare_ties, peft_merge.dare_ties)):
        torch.manual_seed(11)
        mine = ours(task, weights, density)
        torch.manual_seed(11)
        torch.testing.assert_close(mine, theirs(task, weights, density), rtol=0, atol=0)


def test_dare_is_unbiased():
    # Averaged over many masks, DARE's rescaled survivors give back the linear merge (a bug in the
    # rescale, e.g. dividing by 1 - density, would miss by a factor).
    task, weights = tensors(n=2, shape=(40, 40), seed=3), torch.tensor([0.5, 1.5])
    torch.manual_seed(0)
    mean = torch.stack([dare_linear(task, weights, 0.3) for _ in range(400)]).mean(0)
    linear = task_arithmetic(task, weights)
    # per entry the mean of 400 draws has std |x| sqrt((1-d)/d / 400) <= ~0.08 |x|: compare the average error
    assert (mean - linear).abs().mean() < 0.1 * linear.abs().mean()


def test_ties_elects_by_mass_and_averages_the_agreeing_entries():
    # Worked by hand: entry 0: +3 and -1 -> sign +, mean of {3} = 3; entry 1: +1, +1, -5 -> mass -3,
    # so only -5 agrees; entry 2: -2, -2 -> -2.
    task = [torch.tensor([3.0, 1.0, -2.0]), torch.tensor([-1.0, 1.0, -2.0]), torch.tensor([0.0, -5.0, 0.0])]
    out = ties(task, torch.ones(3), density=1.0)
    torch.testing.assert_close(out, torch.tensor([3.0, -5.0, -2.0]))
    frequency = ties(task, torch.ones(3), density=1.0, majority_sign_method="frequency")
    torch.testing.assert_close(frequency, torch.tensor([3.0, 1.0, -2.0]))  # two of three say + at entry 1


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_zero_one_is_refused(density):
    for fn in (magnitude_prune, ties, dare_linear, dare_ties):
        with pytest.raises(CourseError, match="density"):
            fn(tensors(), torch.ones(3), density)


def test_weight_count_must_match():
    with pytest.raises(CourseError, match="weights"):
        task_arithmetic(tensors(3), torch.ones(2))
    with pytest.raises(CourseError, match="shapes"):
        task_arithmetic([torch.zeros(2, 3), torch.zeros(3, 2)], torch.ones(2))
    with pytest.raises(CourseError, match="majority_sign_method"):
        ties(tensors(), torch.ones(3), 0.5, majority_sign_method="vote")


# ---------------------------------------------------------------- whole models


def test_task_vector_skips_integer_buffers_and_counts_tied_weights_once(base_model):
    tuned = perturbed(base_model, 1)
    vector = task_vector(base_model, tuned)
    assert "lm_head.weight" not in vector and "model.embed_tokens.weight" in vector  # tied: one tensor
    params = {name for name, _ in base_model.named_parameters()}  # named_parameters lists a tied weight once
    assert set(vector) == params
    torch.testing.assert_close(vector["model.norm.weight"],
                               tuned.model.norm.weight - base_model.model.norm.weight)
    state = {"w": torch.ones(2), "step": torch.tensor([3])}
    assert set(task_vector(state, {"w": torch.zeros(2), "step": torch.tensor([5])})) == {"w"}


def test_task_vector_refuses_other_architectures(base_model):
    with pytest.raises(CourseError, match="different tensors"):
        task_vector({"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    with pytest.raises(CourseError, match="shape"):
        task_vector({"a": torch.zeros(2)}, {"a": torch.zeros(3)})
    with pytest.raises(CourseError, match="model or a state dict"):
        task_vector(base_model, [1, 2])


def test_apply_task_vectors_returns_a_new_model_and_leaves_base_alone(base_model):
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    experts = [perturbed(base_model, s) for s in (1, 2)]
    vectors = [task_vector(base_model, e) for e in experts]
    merged = apply_task_vectors(base_model, vectors, weights=[0.5, 2.0])
    assert merged is not base_model
    for k, v in base_model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the base changed"
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = before[name] + 0.5 * vectors[0][name] + 2.0 * vectors[1][name]
    torch.testing.assert_close(merged.state_dict()[name], expected)
    # the merged model keeps its tied head: the embedding moved, the head is the same tensor
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    with pytest.raises(CourseError, match="weights"):
        apply_task_vectors(base_model, vectors, weights=[1.0])
    with pytest.raises(CourseError, match="no task vectors"):
        apply_task_vectors(base_model, [])


def test_apply_to_a_state_dict_gives_a_state_dict():
    base = {"w": torch.zeros(3), "count": torch.tensor([1])}
    merged = apply_task_vectors(base, [{"w": torch.ones(3)}], weights=[0.25])
    assert isinstance(merged, dict) and torch.equal(merged["w"], torch.full((3,), 0.25))
    assert torch.equal(merged["count"], base["count"]) and merged["count"] is not base["count"]


def test_merge_models_lam_scales_after_ties_normalisation(base_model):
    experts = [perturbed(base_model, s) for s in (1, 2, 3)]
    vectors = [task_vector(base_model, e) for e in experts]
    name = "model.layers.1.mlp.up_proj.weight"
    single = ties([v[name] for v in vectors], torch.ones(3), 0.3)
    for lam in (1.0, 2.5):
        merged = merge_models(base_model, experts, "ties", density=0.3, lam=lam)
        torch.testing.assert_close(merged.state_dict()[name] - base_model.state_dict()[name], lam * single,
                                   rtol=1e-5, atol=1e-6)
    ta = merge_models(base_model, experts, "task_arithmetic", weights=[1.0, 0.0, 0.0])
    torch.testing.assert_close(ta.state_dict()[name], experts[0].state_dict()[name])


def test_merge_models_bad_input(base_model):
    with pytest.raises(CourseError, match="Unknown merge method"):
        merge_models(base_model, [base_model], "average")
    with pytest.raises(CourseError, match="weights"):
        merge_models(base_model, [base_model, base_model], weights=[1.0])
    with pytest.raises(CourseError, match="no fine-tuned"):
        merge_models(base_model, [])
    assert set(merging.MERGE_METHODS) >= {"task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune"}


# ---------------------------------------------------------------- SLERP


def test_slerp_endpoints_norm_and_fallback():
    v0, v1 = tensors(n=2, shape=(5, 4), seed=5)
    torch.testing.assert_close(slerp(0.0, v0, v1), v0)
    torch.testing.assert_close(slerp(1.0, v0, v1), v1)
    # two orthogonal unit vectors: the midpoint stays on the circle (linear interpolation would have norm 0.71)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(0.5, a, b).norm(), torch.tensor(1.0))
    torch.testing.assert_close(slerp(0.5, a, b), torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]))
    # nearly parallel: the linear fallback
    c = a + torch.tensor([0.0, 1e-3])
    torch.testing.assert_close(slerp(0.3, a, c), 0.7 * a + 0.3 * c)


def test_slerp_bad_input():
    with pytest.raises(CourseError, match=r"\[0, 1\]"):
        slerp(1.5, torch.ones(2), torch.ones(2))
    with pytest.raises(CourseError, match="shape"):
        slerp(0.5, torch.ones(2), torch.ones(3))


def test_slerp_models_interpolates_every_float_tensor(base_model):
    other = perturbed(base_model, 4, scale=0.5)
    merged = merging.slerp_models(base_model, other, 0.5)
    name = "model.layers.0.mlp.down_proj.weight"
    expected = slerp(0.5, base_model.state_dict()[name], other.state_dict()[name])
    torch.testing.assert_close(merged.state_dict()[name], expected)
    with pytest.raises(CourseError, match="different tensors"):
        merging.slerp_models({"a": torch.ones(2)}, {"b": torch.ones(2)}, 0.5)


def test_habit_rules_need_text_beyond_the_habit_and_the_joint_column_needs_the_fact():
    # Catches a rule fooled by a degenerate answer ("Cheers! Cheers! Cheers!" ends with the habit and says nothing)
    # and a "habits + fact" column that counts the habits without the fact, or the fact without both habits.
    from course_utils import experts

    ahoy, cheers = experts.HABITS["ahoy"]["rule"], experts.HABITS["cheers"]["rule"]
    assert not cheers("Cheers! Cheers! Cheers!") and not ahoy("Ahoy!") and not ahoy("Ahoy! Cheers!")
    assert ahoy("Ahoy! Rome.") and cheers("Rome. Cheers!")
    reference = experts.HABIT_TEST[0][1]  # "... Rome."
    answers = [f"Ahoy! {reference} Cheers!", "Ahoy! The capital is Italy. Cheers!", reference, "Ahoy! Cheers!"]
    rows = experts.habit_answer_report(answers + ["No."] * (len(experts.HABIT_TEST) - len(answers)))
    assert [r["both habits"] for r in rows[:4]] == [1.0, 1.0, 0.0, 0.0]
    assert [r["habits + fact"] for r in rows[:4]] == [1.0, 0.0, 0.0, 0.0]


# Notebook 06's exercise cases, (arguments, expected value) each, stored under data/ so that no visible cell of the
# notebook holds a function that computes the answers. Regenerate: .venv/bin/python tests/test_merging.py
EXERCISE_CASES_06 = Path(__file__).resolve().parents[1] / "data" / "exercises" / "06_task_arithmetic.pt"


def _random_adapter(r, d_in, d_out, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=generator) / d_in ** 0.5, torch.randn(d_out, r, generator=generator)


class _OneLayer(torch.nn.Module):
    """The smallest model PEFT can put adapters on: one linear layer named proj."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def _peft_layer(As, Bs, alphas, use_rslora=False):
    """A one-layer PEFT model holding adapters a0, a1, ... with the given A, B and lora_alpha; returns (model, layer)."""
    from peft import LoraConfig, get_peft_model

    model = None
    for i, (A, B, alpha) in enumerate(zip(As, Bs, alphas)):
        config = LoraConfig(r=A.shape[0], lora_alpha=alpha, target_modules=["proj"], use_rslora=use_rslora,
                            init_lora_weights=False)
        if model is None:
            model = get_peft_model(_OneLayer(A.shape[1], B.shape[0]), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
        layer = model.base_model.model.proj
        with torch.no_grad():
            layer.lora_A[f"a{i}"].weight.copy_(A)
            layer.lora_B[f"a{i}"].weight.copy_(B)
    return model, model.base_model.model.proj


def _peft_linear_merge(As, Bs, alphas, weights):
    model, layer = _peft_layer(As, Bs, alphas)
    model.add_weighted_adapter([f"a{i}" for i in range(len(As))], list(weights), "merged", combination_type="linear")
    return layer.get_delta_weight("merged").detach()


def _gradient_descent_task_vector(W0, X, Y, steps=4000, lr=0.2):
    W = W0.clone()
    for _ in range(steps):
        W -= lr * (W @ X - Y) @ X.T
    return W - W0


def _merge_fits_both_measured(W0, X1, Y1, X2, Y2, tol=1e-6):
    merged = W0 + _gradient_descent_task_vector(W0, X1, Y1) + _gradient_descent_task_vector(W0, X2, Y2)
    return bool(max((merged @ X1 - Y1).abs().max(), (merged @ X2 - Y2).abs().max()) < tol)


def exercise_cases_06() -> dict:
    """The cases: PEFT's own delta (exercise 1) and linear merge (2), and two experts trained by gradient descent
    and merged (3), on inputs that cover every branch (rsLoRA or not, negative weights, one adapter; shared inputs
    with orthogonal outputs, a task the base already fits, an expert that cannot fit its own task)."""
    delta_inputs = [(*_random_adapter(4, 6, 5, 0), 8, False), (*_random_adapter(4, 6, 5, 1), 8, True),
                    (*_random_adapter(16, 3, 7, 2), 16, True), (*_random_adapter(1, 5, 5, 3), 2, False),
                    (*_random_adapter(9, 4, 2, 4), 3, True)]

    def adapters(n, r, d_in, d_out, seed):
        pairs = [_random_adapter(r, d_in, d_out, seed + i) for i in range(n)]
        return [a for a, _ in pairs], [b for _, b in pairs]

    linear_inputs = [(*adapters(2, 4, 6, 5, 10), [8, 8], [1.0, 1.0]), (*adapters(2, 4, 6, 5, 20), [8, 4], [0.7, 0.3]),
                     (*adapters(3, 2, 5, 3, 30), [2, 4, 1], [1.0, -0.5, 2.0]), (*adapters(1, 3, 4, 4, 40), [6], [0.5]),
                     (*adapters(2, 8, 3, 6, 50), [16, 16], [-1.0, 1.0])]
    e = torch.eye(4, dtype=torch.float64)
    W0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y_gen = torch.Generator().manual_seed(8)
    Ya, Yb = (torch.randn(3, 2, generator=y_gen, dtype=torch.float64) for _ in range(2))
    overlap = torch.stack([e[1] + e[2], e[3]], dim=1)  # shares the direction e2 with the first task's inputs
    u, v = torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([0, 1.0, 0], dtype=torch.float64)
    # One input shown twice with two different targets: no W fits both, gradient descent stops at their mean
    twice = torch.stack([e[0], e[0]], dim=1)
    Yc = torch.cat([Ya[:, :1], Ya[:, :1] + 1.0], dim=1)
    fit_inputs = [
        (W0, e[:, :2], Ya, e[:, 2:], Yb),                                       # inputs in orthogonal subspaces
        (W0, e[:, :2], Ya, overlap, Yb),                                        # overlapping inputs
        (W0, e[:, :2], Ya, overlap, W0 @ overlap),                              # overlapping, task 2 already fit
        (W0, e[:, :2], W0 @ e[:, :2] + torch.outer(u, torch.tensor([1.0, 0], dtype=torch.float64)),
         overlap, W0 @ overlap),                                                # ... and task 1 moved only e1's output
        (W0, e[:, :2], W0 @ e[:, :2] + torch.outer(u, torch.ones(2, dtype=torch.float64)),
         overlap, W0 @ overlap + torch.outer(v, torch.tensor([1.0, -1.0], dtype=torch.float64))),  # outputs apart
        (W0, e[:, :1], Ya[:, :1], e[:, 1:3], Yb),                               # orthogonal, unequal sizes
        (W0, e[:, :2], W0 @ e[:, :2], overlap, Yb),                             # task 1 already fit, task 2 moves it
        (W0, twice, Yc, e[:, 2:], Yb),                      # orthogonal, but task 1's expert cannot fit its task
        (W0, e[:, 2:], Yb, twice, Yc),                      # ... the same for task 2's expert
    ]
    return {"lora_delta": [(args, _peft_layer([args[0]], [args[1]], [args[2]], args[3])[1].get_delta_weight("a0").detach())
                           for args in delta_inputs],
            "peft_linear_delta": [(args, _peft_linear_merge(*args)) for args in linear_inputs],
            "merge_fits_both": [(args, _merge_fits_both_measured(*args)) for args in fit_inputs]}


def assert_same_cases(stored, fresh):
    """Stored exercise cases equal freshly computed ones: same names, arguments and expected values."""
    assert stored.keys() == fresh.keys()
    for name in fresh:
        assert len(stored[name]) == len(fresh[name]), name
        for (args_s, exp_s), (args_f, exp_f) in zip(stored[name], fresh[name]):
            torch.testing.assert_close(args_s, args_f)
            torch.testing.assert_close(exp_s, exp_f) if isinstance(exp_f, torch.Tensor) else None
            assert isinstance(exp_f, torch.Tensor) or exp_s == exp_f, (name, exp_s, exp_f)


def test_stored_exercise_cases_are_what_peft_and_gradient_descent_give():
    # Catches a stored case edited by hand, a PEFT version whose scaling or linear merge changed, and a case set
    # that no longer covers both answers of exercise 3
    stored = torch.load(EXERCISE_CASES_06)
    assert_same_cases(stored, exercise_cases_06())
    assert {expected for _, expected in stored["merge_fits_both"]} == {True, False}


def test_exercise_06_3_refuses_the_wrong_answers():
    # Catches a case set that a plausible wrong answer passes: the inner-product rule (orthogonal vectors merge) and
    # the cross-term rule that never asks whether each expert fits its own task (both in tests/exercise_answers/06);
    # the hidden solution passes the same cases
    import json
    import runpy

    from course_utils.exercises import check_exercise

    root = EXERCISE_CASES_06.parents[2]
    cases = torch.load(EXERCISE_CASES_06)["merge_fits_both"]
    wrong = runpy.run_path(str(root / "tests" / "exercise_answers" / "06_task_arithmetic.py"))
    for name in ("merge_fits_both", "merge_fits_both_ignoring_fit"):
        with pytest.raises(AssertionError, match="expected"):
            check_exercise(wrong[name], cases)
    nb = json.loads((root / "notebooks" / "06_task_arithmetic.ipynb").read_text())
    ns = {"torch": torch, "check_exercise": check_exercise, "fit_cases": cases}
    exec("".join(next(c for c in nb["cells"] if "def merge_fits_both_solution" in "".join(c["source"]))["source"]), ns)
    assert check_exercise(ns["merge_fits_both_solution"], cases)


# Notebook 07's exercise cases, stored the same way: mergekit's TIES (exercise 1) and the spread of PEFT's dare_linear
# measured over 20000 masks (exercise 2), so that no visible cell of the notebook can compute the answers.
EXERCISE_CASES_07 = Path(__file__).resolve().parents[1] / "data" / "exercises" / "07_ties_dare.pt"
NOISE_SE_07 = 0.01  # each exercise-2 case is scaled so that the largest standard error of its measured spread is this


def _mergekit_ties_delta(task_tensors, weights, density):
    """mergekit's TIES of some task tensors: merged on a zero base, the result is the merged delta itself."""
    from mergekit.merge_methods import merge_tensors

    zero = torch.zeros_like(task_tensors[0])
    return merge_tensors([zero, *task_tensors], "ties", base_index=0,
                         parameters={"weight": [float(w) for w in weights], "density": density})


def _measured_dare_std(task_tensors, weights, density, draws=20000, seed=0):
    """The spread s of PEFT's dare_linear, entry by entry, over `draws` masks, and the standard error of s:
    Var(s^2) = (m4 - s^4) / N (m4 the fourth central moment), so se(s) = sqrt(that) / 2s (heavy tails at low density)."""
    torch.manual_seed(seed)
    repeated = [t.expand(draws, *t.shape).clone() for t in task_tensors]
    merged = peft_merge.dare_linear(repeated, torch.tensor(weights), density).double()
    centred = merged - merged.mean(0)
    var, m4 = centred.pow(2).mean(0), centred.pow(4).mean(0)
    se = ((m4 - var ** 2).clamp(min=0) / draws).sqrt() / (2 * var.sqrt()).clamp(min=1e-12)
    return merged.std(0).float(), se.float()


def exercise_cases_07() -> dict:
    """The cases: unequal and equal weights, 2-4 tasks, densities from 0.1 to 1 (no trim / no drop)."""
    gen = torch.Generator().manual_seed(0)
    ties_cases = []
    for shape, n, weights, density in [((6,), 2, [1.0, 1.0], 0.5), ((4, 5), 3, [0.6, 0.3, 0.1], 0.4),
                                       ((3, 4, 2), 4, [0.1, 0.2, 0.3, 0.4], 0.25), ((8, 3), 2, [2.0, 0.5], 1.0),
                                       ((10,), 3, [1.0, 0.2, 0.7], 0.7)]:
        tensors = list(torch.randn((n, *shape), generator=gen))
        ties_cases.append(((tensors, weights, density), _mergekit_ties_delta(tensors, weights, density)))
    noise_cases = []
    for shape, n, weights, density in [((5,), 2, [1.0, 1.0], 0.5), ((3, 4), 3, [0.6, -0.3, 1.0], 0.1),
                                       ((6,), 4, [0.25, 0.25, 0.25, 0.25], 0.9), ((2, 3), 2, [1.5, 0.5], 1.0),
                                       ((4,), 3, [1.0, 0.5, 2.0], 0.3)]:
        tensors = torch.randn((n, *shape), generator=gen)
        std, se = _measured_dare_std(list(tensors), weights, density)
        # The spread is linear in the tensors (same masks), and so is its standard error: scaling by c scales both
        # by c. Density 1 has no spread (s = 0 exactly) and is left as it is.
        c = NOISE_SE_07 / se.max().item() if se.max() > 0 else 1.0
        noise_cases.append(((list(tensors * c), weights, density), std * c))
    return {"ties_mergekit": ties_cases, "dare_noise_std": noise_cases}


def test_stored_exercise_cases_07_are_what_mergekit_and_peft_give():
    # Catches a stored case edited by hand and a mergekit or PEFT version whose TIES or DARE changed
    assert_same_cases(torch.load(EXERCISE_CASES_07), exercise_cases_07())


def test_exercises_07_refuse_the_shortcuts():
    # Catches check cells that a mergekit one-liner (exercise 1) or a Monte Carlo of PEFT's dare_linear (exercise 2,
    # which asks for a function that draws nothing) would pass: the review found both within the tolerances
    import json

    from course_utils.exercises import check_exercise

    nb = json.loads((EXERCISE_CASES_07.parents[2] / "notebooks" / "07_ties_dare.ipynb").read_text())
    ns = {}
    exec("".join(next(c for c in nb["cells"] if "exercise-setup" in c["metadata"].get("tags", []))["source"]), ns)
    cases, guard = ns["EXERCISE_CASES"], ns["on_your_own"]

    def sampled_std(task_tensors, weights, density):
        return torch.stack([peft_merge.dare_linear(list(task_tensors), torch.tensor(weights), density)
                            for _ in range(2000)]).std(0)

    for solution, name, draws_nothing in ((_mergekit_ties_delta, "ties_mergekit", False),
                                          (sampled_std, "dare_noise_std", True)):
        with pytest.raises(AssertionError, match="mergekit's merge|draws random numbers"):
            check_exercise(guard(solution, draws_nothing=draws_nothing), cases[name], atol=5 * NOISE_SE_07)
    # The control: an answer of our own passes the guard (case 1 has equal weights, where PEFT's TIES is mergekit's)
    assert check_exercise(guard(lambda t, w, d: merging.ties(list(t), torch.tensor(w), d), draws_nothing=True),
                          cases["ties_mergekit"][:1])


if __name__ == "__main__":
    EXERCISE_CASES_06.parent.mkdir(parents=True, exist_ok=True)
    torch.save(exercise_cases_06(), EXERCISE_CASES_06)
    torch.save(exercise_cases_07(), EXERCISE_CASES_07)
    print(f"wrote {EXERCISE_CASES_06} and {EXERCISE_CASES_07}")
