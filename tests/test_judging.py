"""The shared rules of the reproductions (gradcond.experiments.judging): preconditions and statistics, checked
against independent computations (scipy's t test, the exact permutation distribution of Spearman's rho)."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from gradcond.experiments import judging


def test_one_sided_t_matches_scipy_ttest_1samp():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 9):
        for shift in (-0.5, 0.0, 0.4, 1.5):
            xs = rng.normal(shift, 1.0, n)
            t = judging.one_sided_t(xs, margin=0.1)
            ref = stats.ttest_1samp(xs, 0.1, alternative="greater")
            assert t.n == n and math.isclose(t.t, ref.statistic, rel_tol=1e-12)
            assert t.significant == (ref.pvalue <= judging.ALPHA)
            assert math.isclose(t.se, np.std(xs, ddof=1) / math.sqrt(n), rel_tol=1e-12)


def test_one_sided_t_edge_cases():
    assert not judging.one_sided_t([3.0]).significant  # one value: no SE, never significant
    assert not judging.one_sided_t([]).significant
    assert judging.one_sided_t([2.0, 2.0, 2.0]).significant  # zero SE above the margin
    assert not judging.one_sided_t([2.0, 2.0], margin=2.0).significant
    assert judging.one_sided_t([1.0, float("nan"), 2.0, 3.0]).n == 3  # non-finite values are dropped


def test_mean_plus_two_se_over_three_seeds_is_not_significant_where_the_t_rule_says_no():
    """The old "mean > 2 SE" rule over 3 seeds accepts samples the one-sided t test at 5 % rejects."""
    xs = [0.1, 0.5, 0.9]  # mean 0.5, SE 0.231: mean > 2 SE, but t = 2.17 < t_0.95,2 = 2.92
    m, se, n = judging.mean_se(xs)
    assert m > 2 * se
    assert not judging.one_sided_t(xs).significant


def _exact_rho_critical(n: int, alpha: float = 0.05) -> float:
    """The smallest |rho| whose two-sided exact permutation p-value is <= alpha (independent of any table)."""
    d2 = [sum((i - p) ** 2 for i, p in enumerate(perm)) for perm in itertools.permutations(range(n))]
    rhos = np.array([1 - 6 * d / (n * (n * n - 1)) for d in d2])
    for r in sorted(set(np.round(np.abs(rhos), 12))):
        if np.mean(np.abs(rhos) >= r - 1e-12) <= alpha:
            return float(r)
    return math.inf


@pytest.mark.parametrize("n", [5, 6, 7, 8])
def test_spearman_critical_values_against_the_exact_permutation_distribution(n):
    """Zar's table is never more lenient than the exact permutation test (rejecting at the table's value keeps the
    5 % level); at n = 5 both say 1.0: only a perfect ordering (two-sided p = 2/120) is significant."""
    crit = judging.spearman_critical(n)
    exact = _exact_rho_critical(n)
    # the table's critical value is at least as strict as the exact one (never more lenient), within rounding
    assert crit >= exact - 1e-3
    assert judging.rho_power(n).met
    if n == 5:
        assert crit == exact == 1.0


def test_spearman_critical_continues_past_the_table_and_below_five_is_unreachable():
    assert judging.spearman_critical(4) == math.inf and not judging.rho_power(4).met
    c30, c31, c100 = (judging.spearman_critical(n) for n in (30, 31, 100))
    assert c31 < c30 and abs(c31 - c30) < 0.02 and 0.19 < c100 < 0.2


def test_spearman_ignores_non_finite_pairs_and_constant_sides():
    rho, n = judging.spearman([1, 2, 3, float("nan"), 5], [2, 4, 6, 8, 10])
    assert n == 4 and rho == pytest.approx(1.0)
    assert math.isnan(judging.spearman([1, 1, 1, 1], [1, 2, 3, 4])[0])


def test_preconditions_thresholds_and_nan():
    g = judging.treatment_gain([1.0, 1.02, 1.03])
    assert not g.met and g.measured == "median gradient-norm gain per teleport 1.020 over 3"
    assert g.requirement == "median gradient-norm gain per teleport >= 1.500"
    assert judging.treatment_gain([1.4, 2.0, 3.0]).met
    none = judging.treatment_gain([])
    assert not none.met and "0 teleports" in none.measured
    assert not judging.treatment_gain([float("nan")] * 3).met
    assert not judging.baseline_learns(float("nan"), 0.1).met
    assert judging.baseline_learns(0.301, 0.1).met and not judging.baseline_learns(0.2999, 0.1).met
    assert judging.enough_samples(5).met and not judging.enough_samples(3).met
    assert judging.enough_samples(3).describe() == "power: 3 seeds (needs >= 5 seeds)"
    lo = judging.loss_decreases(2.3, 2.29)
    assert not lo.met and "0.4 % lower" in lo.measured
    assert judging.loss_decreases(2.3, 0.5).met
    assert not judging.setting_matches(False, ">= 30 layers", "12 layers").met
    assert judging.at_most("x", 0.5, 1.0, "ratio").met and not judging.at_most("x", float("inf"), 1.0, "ratio").met


def test_precondition_met_must_be_a_boolean():
    with pytest.raises(ValueError, match="must be a boolean"):
        judging.Precondition("n", "r", "m", "yes")
    assert judging.Precondition("n", "r", "m", np.False_).met is False
