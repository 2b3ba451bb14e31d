"""One exception type for mistakes a learner can fix.

A CourseError carries a sentence that says what went wrong and what to do.
The CLI prints just that sentence; in Jupyter, `runtime.setup` installs a
handler that shows it without a wall of traceback.
"""


class CourseError(Exception):
    """A problem with the learner's setup or input, with the fix in the message."""


def check_positive(name: str, value, hint: str = "") -> int:
    """`value`, or a CourseError when it is not a whole number >= 1 (`hint`, e.g. "try 8", ends the sentence)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CourseError(f"{name}={value!r} must be a whole number >= 1{f' ({hint})' if hint else ''}.")
    return value
