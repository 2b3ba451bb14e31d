"""Plausible wrong answers to notebook 15's exercises (tests/test_exercise_cells.py)."""

from scipy import stats

from course_utils.errors import CourseError
from course_utils.knowledge import VALUES, Probe


def above_chance_p(k, n, chance):
    # "More than k" instead of "at least k": the tail it sums starts one value too far.
    if not 0 < chance < 1 or not 0 <= k <= n:
        raise CourseError("k must be in 0..n and chance in (0, 1).")
    return float(stats.binom.sf(k, n, chance))


def reverse_probes(people):
    # Keeps values that two people share, answering with the first of them: a probe with two right answers.
    candidates = tuple(" " + p.name for p in people)
    probes, seen = [], set()
    for attribute in VALUES:
        for index, person in enumerate(people):
            value = getattr(person, attribute)
            if (attribute, value) not in seen:
                seen.add((attribute, value))
                probes.append(Probe(person.name, attribute, f"The person whose {attribute} is {value} is",
                                    candidates, index))
    return probes
