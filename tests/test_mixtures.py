"""course_utils.mixtures (exported from notebook 05): weights, temperature sampling, the sampler, bad input."""

import math

import pytest

from course_utils.errors import CourseError
from course_utils.mixtures import MixtureSampler, check_weights, temperature_weights


def test_check_weights_accepts_a_distribution():
    assert check_weights({"a": 0.5, "b": 0.3, "c": 0.1, "d": 0.1}) == {"a": 0.5, "b": 0.3, "c": 0.1, "d": 0.1}


def test_weights_that_do_not_sum_to_one():
    with pytest.raises(CourseError, match=r"sum to 0.8, not 1\. Divide each by their sum \({'a': 0.625, 'b': 0.375}\)"):
        check_weights({"a": 0.5, "b": 0.3})


@pytest.mark.parametrize("weights", [{"a": 1.2, "b": -0.2}, {"a": math.nan, "b": 1.0}, {"a": math.inf}])
def test_negative_or_non_finite_weights(weights):
    with pytest.raises(CourseError, match="finite and >= 0"):
        check_weights(weights)


def test_no_weights():
    with pytest.raises(CourseError, match="no weights"):
        check_weights({})


def test_weights_must_name_the_data_sets():
    with pytest.raises(CourseError, match="one weight per data set"):
        MixtureSampler({"a": [1], "b": [2]}, {"a": 0.5, "c": 0.5})


def test_temperature_weights():
    sizes = {"a": 1000, "b": 600, "c": 200, "d": 200}
    assert temperature_weights(sizes, 1.0) == pytest.approx({"a": 0.5, "b": 0.3, "c": 0.1, "d": 0.1})
    assert temperature_weights(sizes, math.inf) == pytest.approx({k: 0.25 for k in sizes})
    tempered = temperature_weights(sizes, 3.0)
    assert sum(tempered.values()) == pytest.approx(1)
    assert 0.1 < tempered["c"] < 0.25 and tempered["a"] < 0.5
    with pytest.raises(CourseError, match="temperature"):
        temperature_weights(sizes, 0)
    with pytest.raises(CourseError, match="number of examples"):
        temperature_weights({"a": 0}, 1.0)


def test_sampler_follows_weights_and_is_reproducible():
    data = {"a": list(range(50)), "b": list(range(100, 120)), "c": list(range(200, 205))}
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    drawn = MixtureSampler(data, weights, seed=7).take(5000)
    assert drawn == MixtureSampler(data, weights, seed=7).take(5000)
    assert drawn != MixtureSampler(data, weights, seed=8).take(5000)
    for task, w in weights.items():
        share = sum(t == task for t, _ in drawn) / len(drawn)
        assert abs(share - w) < 4 * (w * (1 - w) / len(drawn)) ** 0.5
        assert all(x in data[task] for t, x in drawn if t == task)


def test_sampler_visits_every_example_before_repeating():
    data = {"a": list(range(10)), "b": list(range(10, 13))}
    drawn = [x for t, x in MixtureSampler(data, {"a": 0.5, "b": 0.5}, seed=0).take(200) if t == "a"]
    for start in range(0, len(drawn) - 9, 10):
        assert sorted(drawn[start:start + 10]) == list(range(10))


def test_empty_data_sets():
    with pytest.raises(CourseError, match="at least one data set"):
        MixtureSampler({}, {"a": 1.0})
    with pytest.raises(CourseError, match=r"\['b'\] are empty"):
        MixtureSampler({"a": [1], "b": []}, {"a": 0.5, "b": 0.5})
