"""The exercise checker can pass, can fail, and knows an untried exercise."""

import pytest
import torch

from course_utils.exercises import check_exercise

CASES = [((2,), 4), ((3,), 9)]


def test_untried_exercise_is_reported_not_failed(capsys):
    def square(x):
        raise NotImplementedError

    assert check_exercise(square, CASES) is False
    assert "not attempted yet" in capsys.readouterr().out


def test_right_answer_passes():
    assert check_exercise(lambda x: x * x, CASES) is True


def test_wrong_answer_names_the_case():
    with pytest.raises(AssertionError, match="case 2 of 2"):
        check_exercise(lambda x: x * 2, CASES)


def test_tolerance_for_floats_and_tensors():
    assert check_exercise(lambda x: x / 3, [((1.0,), 0.3333333)], atol=1e-6)
    assert check_exercise(lambda t: t * 2, [((torch.ones(2),), torch.full((2,), 2.0))])
    with pytest.raises(AssertionError):
        check_exercise(lambda t: t * 2 + 1e-3, [((torch.ones(2),), torch.full((2,), 2.0))])
