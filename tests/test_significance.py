"""The shared paired significance helper: the numbers against scipy, the wording, bad input."""

import math

import pytest
from scipy import stats

from course_utils.errors import CourseError
from course_utils.significance import paired_comparison


def test_matches_scipys_paired_t_test():
    """Catches a wrong standard error (no Bessel correction, sqrt(n) forgotten) or a one-sided p-value."""
    a, b = [0.61, 0.72, 0.55, 0.69, 0.64], [0.50, 0.66, 0.57, 0.52, 0.58]
    cmp = paired_comparison(a, b, names=("LoRA", "full"))
    ref = stats.ttest_rel(a, b)
    assert math.isclose(cmp.t, ref.statistic, rel_tol=1e-9) and math.isclose(cmp.p_value, ref.pvalue, rel_tol=1e-9)
    low, high = ref.confidence_interval(0.95)
    assert math.isclose(cmp.ci[0], low, rel_tol=1e-9) and math.isclose(cmp.ci[1], high, rel_tol=1e-9)
    assert (cmp.wins, cmp.losses, cmp.n) == (4, 1, 5)


def test_pairing_matters():
    """Catches an unpaired test: seed-to-seed spread hides a consistent paired gain."""
    base = [0.2, 0.5, 0.8, 0.3]
    cmp = paired_comparison([x + 0.05 + 0.001 * i for i, x in enumerate(base)], base)
    assert cmp.significant and cmp.verdict() == "A beats B"
    assert stats.ttest_ind([x + 0.05 for x in base], base).pvalue > 0.5


def test_verdict_wording_follows_the_data():
    """Catches an unconditional "A beats B": a mixed result says that the units do not separate them."""
    cmp = paired_comparison({1: 0.5, 2: 0.6, 3: 0.4}, {3: 0.45, 1: 0.52, 2: 0.55}, names=("DARE", "TIES"))
    assert not cmp.significant and "no difference between DARE and TIES" in cmp.verdict()
    assert "DARE higher in 1, lower in 2" in cmp.sentence()
    lower = paired_comparison([1.0, 1.1, 1.2], [2.0, 2.2, 2.3], names=("ours", "theirs"))
    assert lower.verdict(higher_is_better=False) == "ours beats theirs"


def test_equal_differences_and_identical_samples():
    """Zero spread: a constant gap gets the exact sign test's p (never 0), no gap is no difference (no division by zero)."""
    # Catches p = 0 from an infinite t: 3 units all one way happen by chance with probability 2 * 2^-3.
    assert paired_comparison([1, 2, 3], [0, 1, 2]).p_value == 0.25
    assert not paired_comparison([1, 2, 3], [0, 1, 2]).significant
    assert paired_comparison([1.0] * 16, [0.0] * 16).p_value == 2.0 ** -15
    # ... and no interval of zero width in the sentence (catches "95% CI +1 to +1", a false certainty).
    assert "CI" not in paired_comparison([1.0] * 16, [0.0] * 16).sentence()
    # Equal differences up to rounding count as equal: accuracies out of 24 (catches an exact `se == 0` test).
    rounded = paired_comparison([5 / 24, 7 / 24, 11 / 24], [3 / 24, 5 / 24, 9 / 24])
    assert rounded.se == 0 and rounded.p_value == 0.25
    same = paired_comparison([1, 2, 3], [1, 2, 3])
    assert same.p_value == 1.0 and not same.significant


def test_mappings_are_aligned_by_key():
    """Catches positional pairing of dicts built in different orders."""
    cmp = paired_comparison({"s1": 1.0, "s2": 5.0}, {"s2": 5.0, "s1": 1.0})
    assert cmp.diff == 0 and cmp.se == 0


@pytest.mark.parametrize("a, b, message", [
    ([1.0], [2.0], "at least 2"),
    ([1.0, 2.0], [1.0], "same length"),
    ({1: 0.1, 2: 0.2}, {1: 0.1, 3: 0.2}, "different units"),
    ({1: 0.1, 2: 0.2}, [0.1, 0.2], "or both as sequences"),
])
def test_bad_input_says_what_to_do(a, b, message):
    with pytest.raises(CourseError, match=message):
        paired_comparison(a, b)


def test_holm_steps_down_and_widens_the_intervals():
    """Catches a multiplier in the wrong order, a missing step-down or monotonicity, and an interval left at 95%."""
    from dataclasses import replace

    from course_utils.significance import holm

    base = paired_comparison([0.61, 0.72, 0.55, 0.69, 0.64], [0.50, 0.66, 0.57, 0.52, 0.58])
    family = holm({k: replace(base, p_value=p) for k, p in zip("abcd", (0.01, 0.04, 0.03, 0.012))})
    # Sorted: 0.01 x 4, 0.012 x 3, 0.03 x 2, 0.04 x 1 -> 0.04, 0.036 (kept >= 0.04), 0.06, 0.06 (kept >= 0.06).
    assert [round(family[k].p_value, 6) for k in "abcd"] == [0.04, 0.06, 0.06, 0.04]
    assert [family[k].significant for k in "abcd"] == [True, False, False, True]
    half = stats.t.ppf(1 - 0.05 / 8, df=4) * base.se  # Bonferroni: each interval at level 1 - 0.05/4
    assert math.isclose(family["a"].ci[1] - family["a"].diff, half, rel_tol=1e-9)
    assert family["a"].ci[0] < base.ci[0] and family["a"].family == 4
    assert "family-wise 95% CI" in family["a"].sentence() and "Holm-adjusted p (4 tests)" in family["a"].sentence()
    assert list(family) == list("abcd"), "the family keeps its order"
    single = holm({"x": base})["x"]
    assert single.p_value == base.p_value and math.isclose(single.ci[0], base.ci[0], rel_tol=1e-12)


def test_tally_counts_the_units_in_the_direction_of_the_difference():
    """Catches counting wins where the mean difference is negative."""
    cmp = paired_comparison({1: 1.0, 2: 2.0, 3: 3.0}, {1: 1.5, 2: 2.5, 3: 2.9}, names=("α=5", "α=0"))
    assert cmp.tally() == "α=5 lower in 2 of 3 seeds"
    assert "95% CI" in cmp.sentence() and "family-wise" not in cmp.sentence()


def test_holm_bad_input_says_what_to_do():
    from course_utils.significance import holm

    with pytest.raises(CourseError, match="non-empty family"):
        holm({})
    with pytest.raises(CourseError, match="paired_comparison results"):
        holm({"a": 0.01})


def test_seed_claim_needs_every_seed_to_agree():
    from course_utils.significance import seed_claim, seed_claim_sentence
    prompts = paired_comparison([1, 1, 1, 1, 1, 1, 0, 1] * 4, [0, 0, 0, 1, 0, 0, 0, 1] * 4, names=("A", "B"), unit="prompt")
    assert prompts.significant
    agree = paired_comparison({0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.5, 1: 0.6, 2: 0.4}, names=("A", "B"))
    split = paired_comparison({0: 0.9, 1: 0.4, 2: 0.85}, {0: 0.5, 1: 0.6, 2: 0.4}, names=("A", "B"))
    assert seed_claim(prompts, agree) == "A beats B in these runs (all 3 seeds go that way)"
    # Catches a claim about the settings when one run of three goes the other way.
    assert "2 of 3 seeds" in seed_claim(prompts, split) and "beats" not in seed_claim(prompts, split)
    null = paired_comparison([1, 0, 1, 0] * 4, [0, 1, 0, 1] * 4, names=("A", "B"), unit="prompt")
    assert seed_claim(null, agree) == null.verdict()  # not significant: the test's own verdict
    assert seed_claim_sentence(prompts, agree).endswith("(per seed: A higher in 3 of 3 seeds)")


def test_bounds_clip_the_shown_interval_only():
    """Catches an accuracy interval printed beyond +-1 (3 seeds, t = 4.3), a clip that moves the test itself, and
    a clip lost by holm()."""
    from course_utils.significance import holm

    a, b = [1.0, 0.2, 0.9], [0.0, 0.1, 0.0]
    free, bounded = paired_comparison(a, b), paired_comparison(a, b, bounds=(0, 1))
    assert free.ci[1] > 1 and bounded.ci == free.ci and bounded.p_value == free.p_value
    assert bounded.shown_ci == (free.ci[0], 1.0) and bounded.clipped and not free.clipped
    assert f"{free.ci[1]:+.3g}" not in bounded.sentence() and "to +1, clipped to the possible range" in bounded.sentence()
    assert "clipped" not in free.sentence()
    family = holm({"x": bounded, "y": paired_comparison(b, a, bounds=(0, 1))})
    assert all(c.shown_ci[0] >= -1 and c.shown_ci[1] <= 1 and c.clipped for c in family.values())
    assert not paired_comparison([0.5, 0.6, 0.7], [0.5, 0.55, 0.6], bounds=(0, 1)).clipped  # a narrow one stays


@pytest.mark.parametrize("bounds, message", [((1, 0), "low < high"), ((0, 0.5), "lie outside")])
def test_bad_bounds_say_what_to_do(bounds, message):
    with pytest.raises(CourseError, match=message):
        paired_comparison([0.2, 0.9], [0.1, 0.3], bounds=bounds)


def test_a_holm_verdict_whose_interval_reaches_zero_says_why():
    """Catches a page that prints 'CI -0.01 to +0.2 ... A beats B' with no word on why the two disagree."""
    from course_utils.significance import holm

    strong = paired_comparison([0.9, 0.95, 0.92, 0.97, 0.91], [0.1, 0.12, 0.09, 0.11, 0.1])
    edge = paired_comparison([0.578, 0.508, 0.53, 0.561, 0.52], [0.5] * 5)
    family = holm({"strong": strong, "edge": edge})
    c = family["edge"]
    assert c.significant and c.ci[0] <= 0 <= c.ci[1], (c.p_value, c.ci)  # the case: Holm separates, Bonferroni reaches 0
    assert "more conservative than Holm's test" in c.sentence()
    assert "more conservative" not in family["strong"].sentence() and "more conservative" not in edge.sentence()


def test_table_has_one_row_per_test_with_the_family_s_labels():
    """Catches a table that drops a test, names a Holm family's interval as a plain 95% one, or prints a clipped
    interval past the values' range."""
    from course_utils.significance import holm, table

    family = holm({"x": paired_comparison([1.0, 0.2, 0.9], [0.0, 0.1, 0.0], bounds=(0, 1), names=("a", "b")),
                   ("y", "loss"): paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.8], names=("a", "c"))})
    rows = table(family, label="comparison").splitlines()
    assert len(rows) == 2 + len(family) and rows[0].startswith("| comparison |")
    assert "family-wise 95% CI" in rows[0] and "Holm-adjusted p (2 tests)" in rows[0]
    assert "to +1 (clipped)" in rows[2] and "| y · loss |" in rows[3]
    single = table({"z": paired_comparison([1, 2], [0, 1])}, verdicts={"z": "the lower loss: b"})
    assert "| 95% CI | p |" in single and "sign test" in single and single.rstrip().endswith("the lower loss: b |")
    edge = holm({"strong": paired_comparison([0.9, 0.95, 0.92, 0.97, 0.91], [0.1, 0.12, 0.09, 0.11, 0.1]),
                 "edge": paired_comparison([0.578, 0.508, 0.53, 0.561, 0.52], [0.5] * 5)})
    assert "wider than Holm's test" in table(edge).splitlines()[3]


def test_table_rows_carry_the_comparison_s_numbers():
    """Catches swapped means, a lost sign, swapped per-unit counts, and a verdict that ignores which side is better."""
    from course_utils.significance import table

    c = paired_comparison([1.0, 1.2, 0.9, 1.1], [2.0, 2.1, 1.5, 2.6], names=("lo", "hi"))
    cells = [x.strip() for x in table({"t": c}).splitlines()[2].strip("|").split("|")]
    assert cells[1] == f"lo {c.mean_a:.3g}" and cells[2] == f"hi {c.mean_b:.3g}" and cells[3] == f"{c.diff:+.3g}"
    assert cells[3].startswith("-") and cells[6] == "higher in 0, lower in 4 of 4"
    assert cells[7] == "hi beats lo" and table({"t": c}, higher_is_better=False).endswith("| lo beats hi |")
    assert table({"t": c}, loss=True).endswith("| lo lower |")
    tie = paired_comparison([1.0, 2.0], [1.0, 2.0])
    assert table({"t": tie}, loss=True).endswith("| not separated by the 2 seeds |")


def test_a_table_that_mixes_families_labels_each_row():
    """Catches a table whose one 'p' column holds Holm-adjusted and raw values alike, unlabelled."""
    from course_utils.significance import holm, table

    adjusted = holm({"a": paired_comparison([1, 2, 3], [0, 1, 1.5]), "b": paired_comparison([1, 2, 3], [1, 2, 3.1])})
    mixed = table({"holm": adjusted["a"], "raw": paired_comparison([1, 2, 3], [0, 1, 1.5]),
                   "tie": paired_comparison([1.0, 2.0], [1.0, 2.0])}).splitlines()
    assert "| interval | p |" in mixed[0]
    assert "(Holm-adjusted p (2 tests))" in mixed[2] and "(family-wise 95% CI)" in mixed[2]
    assert "(p)" in mixed[3] and "(95% CI)" in mixed[3] and "family-wise" not in mixed[3]
    assert "none (no unit differs) |" in mixed[4]


def test_table_refuses_what_is_not_a_family():
    from course_utils.significance import table

    for bad in ({}, {"x": 0.3}):
        with pytest.raises(CourseError, match="non-empty dict"):
            table(bad)


def test_seed_claimed_needs_the_test_and_every_seed():
    """Catches a branch that states a finding the prompt test supports but a seed contradicts (or the reverse)."""
    from course_utils.significance import seed_claimed

    up = paired_comparison([0.9, 0.8, 1.0, 0.9, 0.95, 0.85], [0.1, 0.2, 0.1, 0.0, 0.15, 0.1], unit="prompt")
    agree, split = paired_comparison([0.7, 0.8, 0.9], [0.5, 0.6, 0.7]), paired_comparison([0.7, 0.5, 0.9], [0.5, 0.6, 0.7])
    assert seed_claimed(up, agree) and not seed_claimed(up, agree, higher=False)
    assert not seed_claimed(up, split)  # one seed goes the other way
    assert not seed_claimed(paired_comparison([0.5, 0.6], [0.5, 0.6], unit="prompt"), agree)  # no difference
