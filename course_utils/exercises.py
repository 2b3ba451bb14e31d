"""Exported from notebooks/00_start_here.ipynb: do not edit here.

Edit the notebook's `#| export` cells, then run `python -m course_utils.export`.
"""


import torch


def _assert_same(got, expected, atol):
    """Equal, with a tolerance for floats and tensors."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    elif isinstance(expected, float):
        assert isinstance(got, (int, float)) and abs(got - expected) <= atol, f"{got!r} != {expected!r}"
    else:
        assert got == expected, f"{got!r} != {expected!r}"


def check_exercise(solution, cases, *, atol=1e-6):
    """Check `solution` on `cases`, a list of (args, expected) pairs.

    Returns False when the exercise is not attempted yet (the function still
    raises NotImplementedError), True when every case passes, and raises an
    AssertionError naming the first case that fails.
    """
    name = getattr(solution, "__name__", "solution")
    for number, (args, expected) in enumerate(cases, 1):
        args = args if isinstance(args, tuple) else (args,)
        try:
            got = solution(*args)
        except NotImplementedError:
            print(f"{name}: not attempted yet. Replace `raise NotImplementedError` with your code, then run this cell again.")
            return False
        try:
            _assert_same(got, expected, atol)
        except AssertionError as err:
            raise AssertionError(f"{name}: case {number} of {len(cases)} is wrong: {err}") from None
    print(f"{name}: all {len(cases)} checks passed.")
    return True
