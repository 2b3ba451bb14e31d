"""Is "A beats B" supported? One paired, t-based test for every comparison the course states.

Two methods are compared on the same units: the same seeds (same data order, same initial weights) or the same
prompts. Pairing removes what the units share, so the question is whether the mean of the per-unit differences
d_i = a_i - b_i is far from 0 given their spread:

    t = mean(d) / (std(d) / sqrt(n)),   n - 1 degrees of freedom (Student's t; std with Bessel's correction)

A two-sided p-value below `alpha` (0.05) makes the difference significant; the 95% interval is
mean(d) +/- t_{0.975, n-1} * std(d) / sqrt(n). With 0/1 outcomes per prompt the same test is the paired t-test on
proportions (close to McNemar's test for the sample sizes used here). When every unit differs by the same amount
(16 of 16 prompts right after, wrong before) the spread is 0 and t is infinite; the p-value is then the exact sign
test's, 2 * 2^-n, so that 3 seeds can never be "certain" (p = 0.25) and 16 prompts give 3e-5. (The two regimes
do not join smoothly: differences 0.1, 0.1, 0.11 get the t-test's small p, 0.1, 0.1, 0.1 the sign test's 0.25. Few
units with nearly equal differences are weak evidence either way; run more seeds.)

    cmp = paired_comparison(acc_lora, acc_full, names=("LoRA", "full"), unit="seed")
    cmp.significant, cmp.sentence()   # 'LoRA 0.62 against full 0.48: +0.14 (95% CI +0.05 to +0.23, ...)'

A family of tests reads better as a table than as a paragraph: `table(family)` renders one markdown row per test
(the two means, the paired difference, its interval, p, the per-unit count and the verdict).

A page that tests several differences at once (each alpha against plain fine-tuning) treats them as one family:
`holm(family)` adjusts the p-values with Holm's step-down method, so that the family claims a false difference
with probability at most `alpha`, and widens every interval to Bonferroni's (level 1 - alpha/m).

Values with a known range (accuracies in [0, 1]) can only differ by so much: `bounds=(0, 1)` clips the interval
to the differences the range allows (-1 to +1), so that 3 seeds never print "-1.3 to +0.5" for an accuracy; the
sentence says when it was clipped (the t interval itself ignores the bounds, which is why it can pass them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from course_utils.errors import CourseError

ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    """The paired comparison of A and B: the numbers, and a sentence worded from them."""

    names: tuple[str, str]
    unit: str
    n: int
    mean_a: float
    mean_b: float
    diff: float  # mean of a_i - b_i
    se: float  # standard error of that mean
    t: float
    p_value: float
    ci: tuple[float, float]
    wins: int  # units where a_i > b_i
    losses: int  # units where a_i < b_i
    alpha: float = ALPHA
    family: int = 1  # tests in the comparison's family: > 1 after holm() (adjusted p, Bonferroni interval)
    span: float | None = None  # the largest possible |a_i - b_i| (from bounds=); None: unbounded

    @property
    def shown_ci(self) -> tuple[float, float]:
        """The interval clipped to the differences the values' range allows (the t interval when unbounded)."""
        low, high = self.ci
        return (low, high) if self.span is None else (max(low, -self.span), min(high, self.span))

    @property
    def clipped(self) -> bool:
        return self.shown_ci != self.ci

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    @property
    def ci_label(self) -> str:
        """How to name the interval in a sentence: '95% CI', or the family-wise interval after holm()."""
        return f"{1 - self.alpha:.0%} CI" if self.family == 1 else f"family-wise {1 - self.alpha:.0%} CI"

    @property
    def p_label(self) -> str:
        return "p" if self.family == 1 else f"Holm-adjusted p ({self.family} tests)"

    def tally(self) -> str:
        """'A lower in k of n seeds': how many units go the way of the mean difference (a count, not a test)."""
        count = self.wins if self.diff > 0 else self.losses
        return f"{self.names[0]} {'higher' if self.diff > 0 else 'lower'} in {count} of {self.n} {self.unit}s"

    def verdict(self, higher_is_better: bool = True) -> str:
        """'A beats B', 'B beats A', or that the data does not separate them."""
        a, b = self.names
        if not self.significant:
            return f"no difference between {a} and {b} that the {self.n} {self.unit}s support"
        a_better = (self.diff > 0) == higher_is_better
        return f"{a} beats {b}" if a_better else f"{b} beats {a}"

    def sentence(self, fmt: str = ".3g", higher_is_better: bool = True) -> str:
        """One sentence with the means, the paired difference, its interval and the per-unit count."""
        a, b = self.names
        low, high = self.shown_ci
        clipped = ", clipped to the possible range" if self.clipped else ""
        if self.family > 1 and self.significant and low <= 0 <= high:  # Holm's step-down separates more than it
            clipped += ", Bonferroni's: more conservative than Holm's test, so it can reach 0 when the test separates"
        # With no spread the t interval has zero width, a false certainty: say what the units did instead.
        interval = (f"{self.ci_label} {low:+{fmt}} to {high:+{fmt}}{clipped}" if self.se > 0 else
                    f"every {self.unit} differs by the same amount, a sign test" if self.diff else f"no {self.unit} differs")
        return (f"{a} {self.mean_a:{fmt}} against {b} {self.mean_b:{fmt}}: paired difference {self.diff:+{fmt}} "
                f"({interval}, {self.p_label} = {self.p_value:.2g}, "
                f"{self.n} {self.unit}s; "
                f"{a} higher in {self.wins}, lower in {self.losses}): {self.verdict(higher_is_better)}")


def _paired_values(a, b) -> tuple[list[float], list[float]]:
    """Align two samples: mappings and pandas Series by key, sequences by position."""
    keyed_a, keyed_b = (isinstance(x, Mapping) or hasattr(x, "keys") for x in (a, b))  # dicts, pandas Series
    if keyed_a != keyed_b:
        raise CourseError("Give both samples as mappings (keyed by seed or prompt) or both as sequences.")
    if keyed_a:
        keys_a, keys_b = list(a.keys()), list(b.keys())
        if set(keys_a) != set(keys_b):
            raise CourseError(f"The two samples cover different units: {sorted(set(keys_a) ^ set(keys_b))[:5]} "
                              "are in one only. Pair them on the same seeds or prompts.")
        return [float(a[k]) for k in keys_a], [float(b[k]) for k in keys_a]
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        raise CourseError(f"Paired samples need the same length ({len(a)} against {len(b)}): one value per seed or prompt.")
    return a, b


def paired_comparison(a, b, *, names=("A", "B"), unit: str = "seed", alpha: float = ALPHA,
                      bounds: tuple[float, float] | None = None) -> Comparison:
    """Paired t-test of a against b (same seeds or prompts). `a`, `b`: sequences, dicts or pandas Series.
    bounds: the range every value lies in (e.g. (0, 1) for accuracies), to clip the shown interval."""
    from scipy import stats

    values_a, values_b = _paired_values(a, b)
    n = len(values_a)
    if n < 2:
        raise CourseError(f"A paired comparison needs at least 2 {unit}s (got {n}): run more seeds.")
    if not 0 < alpha < 1:
        raise CourseError(f"alpha is a probability in (0, 1), got {alpha}.")
    span = None
    if bounds is not None:
        low, high = bounds
        if not low < high:
            raise CourseError(f"bounds={bounds!r}: give (low, high) with low < high, e.g. (0, 1) for accuracies.")
        outside = [v for v in values_a + values_b if not low <= v <= high]
        if outside:
            raise CourseError(f"bounds={bounds!r}, but {outside[:3]} lie outside: widen the bounds or drop them.")
        span = high - low
    diffs = [x - y for x, y in zip(values_a, values_b)]
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    if se <= 1e-12 * max(1.0, abs(mean)):  # equal differences up to rounding (2/24 - 1/24 is not exactly 1/24)
        se = 0.0  # every unit differs by the same amount: no spread, so the t-test would claim p = 0
        # The exact sign test instead: all n units going one way has probability 2 * 2^-n under "no difference".
        t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), min(1.0, 2.0 ** (1 - n)))
    else:
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), df=n - 1))
    half = float(stats.t.ppf(1 - alpha / 2, df=n - 1)) * se
    return Comparison(names=tuple(names), unit=unit, n=n, mean_a=sum(values_a) / n, mean_b=sum(values_b) / n,
                      diff=mean, se=se, t=t, p_value=p, ci=(mean - half, mean + half),
                      wins=sum(d > 0 for d in diffs), losses=sum(d < 0 for d in diffs), alpha=alpha, span=span)


def holm(tests: Mapping, alpha: float | None = None) -> dict:
    """One family's comparisons (a dict name -> Comparison) with Holm-adjusted p-values and family-wise intervals.

    Adjusted p of the k-th smallest of m p-values: max over j <= k of (m - j + 1) * p_(j), at most 1, so that
    'adjusted p < alpha' is Holm's step-down test: the family claims a false difference with probability at most
    alpha. Intervals become Bonferroni's (each at level 1 - alpha/m), which hold for the whole family at once; an
    interval that excludes 0 implies a significant Holm test (never the reverse: Holm's step-down can separate a
    pair whose Bonferroni interval still touches 0).
    """
    from dataclasses import replace

    from scipy import stats

    if not tests:
        raise CourseError("holm() needs a non-empty family: a dict of name -> paired_comparison(...).")
    if any(not isinstance(c, Comparison) for c in tests.values()):
        raise CourseError("holm() takes paired_comparison results (a dict of name -> Comparison).")
    m = len(tests)
    adjusted, running = {}, 0.0
    for rank, key in enumerate(sorted(tests, key=lambda key: tests[key].p_value)):
        c = tests[key]
        level = c.alpha if alpha is None else alpha
        running = max(running, min(1.0, (m - rank) * c.p_value))
        half = float(stats.t.ppf(1 - level / (2 * m), df=c.n - 1)) * c.se
        adjusted[key] = replace(c, p_value=running, ci=(c.diff - half, c.diff + half), alpha=level, family=m)
    return {key: adjusted[key] for key in tests}


def seed_claimed(test: Comparison, seeds: Comparison, higher: bool = True) -> bool:
    """Whether a page may state `test` (paired by prompt or fact) as a finding that A is higher (`higher`) or lower
    than B: the test separates them that way, and every seed of `seeds` (the seeds' means paired) goes that way too.
    seed_claim's condition, for a sentence that branches on it."""
    return test.significant and test.diff != 0 and (test.diff > 0) == higher and \
        (seeds.wins if higher else seeds.losses) == seeds.n


def seed_claim(test: Comparison, seeds: Comparison, higher_is_better: bool = True) -> str:
    """The verdict of a test paired by prompt, as a claim about these runs only when every seed goes its way.

    `test` pairs the prompts' scores averaged over the seeds; `seeds` pairs the seeds' mean scores. A significant
    prompt test with seeds that disagree says the prompts differ in these runs, not that one setting is better."""
    if not test.significant:
        return test.verdict(higher_is_better)
    agreeing = seeds.wins if test.diff > 0 else seeds.losses
    if agreeing < seeds.n:
        return (f"these runs differ on the prompts, but the runs disagree ({agreeing} of {seeds.n} seeds go that "
                "way), so no claim about the settings")
    return f"{test.verdict(higher_is_better)} in these runs (all {seeds.n} seeds go that way)"


def seed_claim_sentence(test: Comparison, seeds: Comparison, higher_is_better: bool = True) -> str:
    """The prompt test's sentence with seed_claim() as its verdict, and the per-seed count."""
    body = test.sentence(higher_is_better=higher_is_better).removesuffix(test.verdict(higher_is_better))
    return f"{body}{seed_claim(test, seeds, higher_is_better)} (per seed: {seeds.tally()})"


def table(tests: Mapping, *, label: str = "test", fmt: str = ".3g", higher_is_better: bool = True,
          loss: bool = False, verdicts: Mapping | None = None) -> str:
    """A markdown table of comparisons (a dict name -> Comparison, e.g. holm()'s result), one row per test.

    The interval and p columns are named from the tests (family-wise and Holm-adjusted after holm(); per row when
    the rows mix families). `loss=True` words a verdict as the side with the lower value (for a loss that a method
    may be meant to raise, lower is not "better"); `verdicts` replaces chosen rows' verdicts."""
    if not tests or any(not isinstance(c, Comparison) for c in tests.values()):
        raise CourseError("table() takes a non-empty dict of name -> paired_comparison(...) (or holm()'s result).")
    first = next(iter(tests.values()))
    same = all((c.family, c.alpha) == (first.family, first.alpha) for c in tests.values())
    ci_head, p_head = (first.ci_label, first.p_label) if same else ("interval", "p")
    rows = [f"| {label} | A | B | A − B | {ci_head} | {p_head} | A per {first.unit} | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for key, c in tests.items():
        low, high = c.shown_ci
        if c.se > 0:
            interval = f"{low:+{fmt}} to {high:+{fmt}}" + (" (clipped)" if c.clipped else "")
            interval += "" if same else f" ({c.ci_label})"
            if c.family > 1 and c.significant and low <= 0 <= high:
                interval += " (Bonferroni's, wider than Holm's test: it can reach 0 when the test separates)"
        else:
            interval = "none (every unit differs alike: sign test)" if c.diff else "none (no unit differs)"
        name = key if isinstance(key, str) else " · ".join(map(str, key))
        if verdicts and key in verdicts:
            verdict = verdicts[key]
        elif loss:
            verdict = (f"{c.names[0] if c.diff < 0 else c.names[1]} lower" if c.significant
                       else f"not separated by the {c.n} {c.unit}s")
        else:
            verdict = c.verdict(higher_is_better)
        p_value = f"{c.p_value:.2g}" + ("" if same else f" ({c.p_label})")
        rows.append(f"| {name} | {c.names[0]} {c.mean_a:{fmt}} | {c.names[1]} {c.mean_b:{fmt}} | {c.diff:+{fmt}} | "
                    f"{interval} | {p_value} | higher in {c.wins}, lower in {c.losses} of {c.n} | {verdict} |")
    return "\n".join(rows)
