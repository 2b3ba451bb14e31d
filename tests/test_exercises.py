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


def test_messages_say_what_differs():
    cases = [((2,), 4.0)]
    with pytest.raises(AssertionError, match="Python number, got a 0-d tensor"):
        check_exercise(lambda x: torch.tensor(x * 2.0), cases)
    with pytest.raises(AssertionError, match=r"shape \(3,\), expected \(2,\)"):
        check_exercise(lambda t: torch.zeros(3), [((torch.ones(2),), torch.zeros(2))])
    with pytest.raises(AssertionError, match="dtype torch.float64, expected torch.float32"):
        check_exercise(lambda t: t.double(), [((torch.ones(2),), torch.ones(2))])
    with pytest.raises(AssertionError, match="item 1 of the result is 3, expected 2"):
        check_exercise(lambda n: [1, 3], [((2,), [1, 2])])
    with pytest.raises(AssertionError, match="has 1 items, expected 2"):
        check_exercise(lambda n: [1], [((2,), [1, 2])])
    with pytest.raises(AssertionError, match="should be a str, got a int: 1"):
        check_exercise(lambda n: 1, [((2,), "a")])


def test_a_bool_is_not_a_number_and_ints_must_be_whole():
    with pytest.raises(AssertionError, match="should be a number"):
        check_exercise(lambda n: True, [((2,), 1)])
    with pytest.raises(AssertionError, match="whole number"):
        check_exercise(lambda n: 2.5, [((2,), 2)])
    assert check_exercise(lambda n: 2.0, [((2,), 2)])


def test_a_case_can_ask_for_a_raise_on_bad_input():
    """An expected exception class means the call must raise it: catches a check that lets bad input through."""
    from course_utils.errors import CourseError

    def strict(x):
        if x < 0:
            raise CourseError("x must be >= 0: pass a count")
        return x

    assert check_exercise(strict, [((1,), 1), ((-1,), CourseError)])
    with pytest.raises(AssertionError, match="should raise CourseError"):
        check_exercise(lambda x: x, [((1,), 1), ((-1,), CourseError)])
    with pytest.raises(ZeroDivisionError):  # a different error is the learner's bug, shown as it is
        check_exercise(lambda x: 1 / 0, [((-1,), CourseError)])
