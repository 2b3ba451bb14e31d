"""Exercise checks: compare a learner's answer with the expected one and say, in one sentence, what differs.

Built in notebooks/00_start_here.ipynb; every notebook's exercise cells call `check_exercise`.
"""

# Exported from notebooks/00_start_here.ipynb: do not edit here.
# Edit the `#| export` cells there, then run `make export`.


# %% notebooks/00_start_here.ipynb · Appendix · The exercise checker
import math

import torch


def _kind(value) -> str:
    """A short description of a value's type, for messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.ndim}-d tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _tensor_difference(got, expected: torch.Tensor, atol, where):
    """None when the tensor `got` matches `expected` (shape, dtype, values within atol), else a sentence."""
    if not isinstance(got, torch.Tensor):
        return f"{where} should be {_kind(expected)}, got {_kind(got)}"
    if got.shape != expected.shape:
        return f"{where} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if got.dtype != expected.dtype:
        return f"{where} has dtype {got.dtype}, expected {expected.dtype}"
    if got.dtype == torch.bool or not got.is_floating_point():
        wrong = (got != expected).sum().item()
        return None if wrong == 0 else f"{where}: {wrong} of {got.numel()} entries differ"
    error = (got.double() - expected.double()).abs()
    if not torch.isfinite(got).all():
        return f"{where} holds NaN or inf"
    worst = error.max().item() if error.numel() else 0.0
    return None if worst <= atol else f"{where}: largest difference {worst:.3g} (allowed {atol:g})"


def _scalar_difference(got, expected, atol, where):
    """None when `got` matches a bool, None, str or number `expected` (numbers within atol), else a sentence."""
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        if type(got) is not type(expected):
            return f"{where} should be {_kind(expected)}, got {_kind(got)}: {got!r}"
        return None if got == expected else f"{where} is {got!r}, expected {expected!r}"
    if isinstance(got, torch.Tensor):
        return f"{where} should be a Python number, got {_kind(got)} (use .item())"
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        return f"{where} should be a number, got {_kind(got)}"
    if isinstance(expected, int) and not isinstance(got, int) and not float(got).is_integer():
        return f"{where} is {got!r}, expected the whole number {expected!r}"
    if math.isfinite(expected) and abs(got - expected) <= atol:
        return None
    return None if got == expected else f"{where} is {got!r}, expected {expected!r}"


# %% notebooks/00_start_here.ipynb · Appendix · The exercise checker
def describe_difference(got, expected, atol=1e-6, where="the result"):
    """None when `got` matches `expected`, else one sentence saying what differs."""
    if isinstance(expected, torch.Tensor):
        return _tensor_difference(got, expected, atol, where)
    if isinstance(expected, (bool, int, float, str)) or expected is None:
        return _scalar_difference(got, expected, atol, where)
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)):
            return f"{where} should be a {type(expected).__name__}, got {_kind(got)}"
        if len(got) != len(expected):
            return f"{where} has {len(got)} items, expected {len(expected)}"
        for index, (g, e) in enumerate(zip(got, expected)):
            message = describe_difference(g, e, atol, f"item {index} of {where}")
            if message:
                return message
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{where} should be a dict, got {_kind(got)}"
        if set(got) != set(expected):
            return f"{where} has keys {sorted(map(str, got))}, expected {sorted(map(str, expected))}"
        for key in expected:
            message = describe_difference(got[key], expected[key], atol, f"{where}[{key!r}]")
            if message:
                return message
        return None
    return None if got == expected else f"{where} is {got!r}, expected {expected!r}"


def _call(name, args) -> str:
    shown = ", ".join(_kind(a) if isinstance(a, torch.Tensor) or len(repr(a)) > 40 else repr(a) for a in args)
    return f"{name}({shown})"


# %% notebooks/00_start_here.ipynb · Appendix · The exercise checker
def check_exercise(solution, cases, *, atol=1e-6):
    """Check `solution` on `cases`, a list of (args, expected) pairs.

    Returns False when the exercise is not attempted yet (the function still
    raises NotImplementedError), True when every case passes, and raises an
    AssertionError saying which case failed and what differs. An `expected`
    that is an exception class (e.g. CourseError) means: bad input, this call must raise it.
    """
    name = getattr(solution, "__name__", "solution")
    for number, (args, expected) in enumerate(cases, 1):
        args = args if isinstance(args, tuple) else (args,)
        must_raise = isinstance(expected, type) and issubclass(expected, Exception)
        try:
            got = solution(*args)
        except NotImplementedError:
            print(f"{name}: not attempted yet. Replace `raise NotImplementedError` with your code, then run this cell again.")
            return False
        except Exception as error:  # a raise is right only where the case asks for it
            if not (must_raise and isinstance(error, expected)):
                raise
            continue
        message = (f"bad input should raise {expected.__name__} (with a sentence saying what to do), got {_kind(got)}"
                   if must_raise else describe_difference(got, expected, atol))
        if message:
            raise AssertionError(f"{name}: case {number} of {len(cases)}, {_call(name, args)}: {message}")
    print(f"{name}: all {len(cases)} checks passed.")
    return True
