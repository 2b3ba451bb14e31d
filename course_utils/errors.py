"""One exception type for mistakes a learner can fix.

A CourseError carries a sentence that says what went wrong and what to do.
The CLI prints just that sentence; in Jupyter, `runtime.setup` installs a
handler that shows it without a wall of traceback.
"""


class CourseError(Exception):
    """A problem with the learner's setup or input, with the fix in the message."""
