"""Seed-004 reproduction entries: registered, and their quick runs produce rows and figures (slow)."""

import math

import pytest

from gradcond.experiments import conditioning_repro as R
from gradcond.experiments.registry import load_all

NAMES = ["conditioning-sampler-comparison", "conditioning-depth-sweep", "looks-linear-depth",
         "conditioning-mask-accuracy"]


def test_entries_registered():
    reg = load_all()
    assert all(n in reg for n in NAMES)


def test_descent_statistics_and_spearman():
    rate, best = R._descent([3.0 - 0.01 * i for i in range(100)], window=20)
    assert rate == pytest.approx(0.01, rel=1e-6) and best == pytest.approx(3.0 - 0.01 * 89.5, rel=1e-6)
    assert R._spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert R._spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_spearman_ties_share_average_ranks_and_non_finite_pairs_are_dropped():
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): Pearson = 4.5 / sqrt(4.5 * 5), by hand
    assert R._spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5, rel=1e-12)
    assert R._spearman([1, 2, float("nan"), 3, 4], [1, 2, 0, 4, 3]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert math.isnan(R._spearman([1, float("inf"), 2, float("nan")], [1, 2, 3, 4]))  # 2 finite pairs: undefined
    assert math.isnan(R._spearman([1, 1, 1, 1], [1, 2, 3, 4]))  # constant side: undefined


@pytest.mark.slow
@pytest.mark.parametrize("fn", [R.sampler_comparison, R.depth_sweep, R.looks_linear, R.mask_accuracy])
def test_quick_runs(fn, tmp_path):
    rows = fn(True, tmp_path)
    assert rows and all(r.claim and r.ours for r in rows)
    assert list(tmp_path.glob("*.png")) or fn is R.mask_accuracy
