"""Seed-004 reproduction entries: registered, their quick runs produce rows and figures (slow), and the pure judging
functions, each fed a counter-example that must make it fail."""

import math

import pytest

from gradcond.experiments import conditioning_repro as R
from gradcond.experiments.registry import load_all

NAMES = ["conditioning-sampler-comparison", "conditioning-depth-sweep", "looks-linear-depth",
         "conditioning-mask-accuracy"]


def test_entries_registered():
    reg = load_all()
    assert all(n in reg for n in NAMES)


def test_descent_statistics():
    rate, best = R._descent([3.0 - 0.01 * i for i in range(100)], window=20)
    assert rate == pytest.approx(0.01, rel=1e-6) and best == pytest.approx(3.0 - 0.01 * 89.5, rel=1e-6)


def test_private_statistics_are_gone():
    """The depth sweep uses judging.spearman / spearman_critical; no private copies are left (issue 27)."""
    assert not any(hasattr(R, n) for n in ("_spearman", "_rho_critical", "_RHO_CRIT", "_judge_corr"))


def test_mask_judged_on_the_worst_pair_and_the_loosened_case_fails():
    # the loosened case: the mean is exactly 10 % (it passed the mean criterion) but one pair is 25 % off
    holds, text = R._judge_mask([0.02, 0.03, 0.25], [0.1, 0.2, 0.3])
    assert holds is False
    assert text == "worst 0.250, mean 0.100 over 3 (checkpoint, mask) pairs; 1 above 10%; max abs. error 0.3"
    holds, text = R._judge_mask([0.02, 0.09, 0.1])
    assert holds is True and text.startswith("worst 0.100, mean 0.070 over 3")
    assert R._judge_mask([0.01, float("nan")])[0] is False
    with pytest.raises(ValueError, match="no mask errors to judge"):
        R._judge_mask([])


def test_judge_corr_counter_examples():
    assert R.judge_corr(0.9, 6, "positive") is True
    assert R.judge_corr(0.8, 6, "positive") is False  # below the 5 % critical value 0.886 for 6 networks
    assert R.judge_corr(0.95, 6, "negative") is False  # wrong sign
    assert R.judge_corr(-0.95, 6, "any") is True
    assert R.judge_corr(0.95, 6, "none") is False and R.judge_corr(0.3, 6, "none") is True
    assert R.judge_corr(1.0, 4, "any") is False  # 4 networks can never show a significant correlation
    assert R.judge_corr(float("nan"), 6, "any") is None  # undefined: not judged, never a pass
    with pytest.raises(ValueError, match="expect must be"):
        R.judge_corr(0.5, 6, "strong")


def _fams(names):
    return {n: n.rstrip("0123456789") for n in names}


def test_correlation_row_needs_a_reachable_critical_value_and_can_fail():
    """The stated-correlation row: 6 mixed networks at best reach rho = 1 against 0.886; 4 cannot reach the critical
    value at all (untestable); 15 networks with a perfect ordering hold, and with the opposite sign fail."""
    where = "Fig 3.13: 'a strong correlation'"
    names4 = ["A1", "A2", "B1", "B2"]
    row = R.correlation_row("confusion", "low", "positive", where, names4, [1, 2, 3, 4], [1, 2, 3, 4], _fams(names4))
    assert row.verdict == "untestable" and row.unmet[0].name == "power"
    names = [f"{f}{d}" for f in "ABCDE" for d in (3, 8, 16)]
    xs = list(range(15))
    assert R.correlation_row("c", "low", "positive", where, names, xs, xs, _fams(names)).verdict == "yes"
    assert R.correlation_row("c", "low", "positive", where, names, xs, xs[::-1], _fams(names)).verdict == "no"
    rng = __import__("random").Random(0)
    noise = [rng.random() for _ in xs]
    assert R.correlation_row("c", "low", "any", where, names, xs, noise, _fams(names)).data["n"] == 15


def test_rank_failure_row_needs_five_networks_above_the_threshold():
    ranks = {"a": 0.3, "b": 0.2, "c": 0.1}
    losses = {"a": 2.0, "b": 2.0, "c": 0.1}
    assert R.rank_failure_row(ranks, losses).verdict == "untestable"  # 2 networks above .15: a coin flip
    ranks = {k: 0.3 for k in "abcdef"}
    assert R.rank_failure_row(ranks, {k: 2.0 for k in "abcdef"}).verdict == "yes"
    assert R.rank_failure_row(ranks, {k: 0.1 for k in "abcdef"}).verdict == "no"


def test_sweep_networks_are_families_swept_over_depth():
    import torch

    nets = R.sweep_networks(quick=True)
    fams = {}
    for name, fam, kind, make in nets:
        fams.setdefault(fam, []).append(name)
    assert set(fams) == {"Ortho", "CReLU", "LL", "ConvNet", "ResNet"} and all(len(v) == 3 for v in fams.values())
    assert len(nets) >= 15 and R.spearman_critical(len(nets)) < 1
    for name, fam, kind, make in nets:
        x = torch.randn(2, 64) if kind == "fc" else torch.randn(2, 1, 8, 8)
        assert make()(x).shape == (2, 10), name
    # depth grows within each family (parameter count as a proxy)
    for fam, members in fams.items():
        sizes = [sum(p.numel() for p in dict((n, m) for n, _, _, m in nets)[n]().parameters()) for n in members]
        assert sizes == sorted(sizes) and len(set(sizes)) == 3, fam
    assert len(R.sweep_networks(quick=False)) == 25


def test_mirrored_distance_bound_against_a_direct_computation():
    import copy

    import torch

    from gradcond.zoo import looks_linear_crelu_mlp

    model = looks_linear_crelu_mlp(8, 3, depth=4, width=6, seed=0)
    init = copy.deepcopy(model)
    assert R.mirrored_distance(model) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model[2].weight.add_(0.3 * torch.randn_like(model[2].weight))
    w = model[2].weight.detach()
    a, b = w[:, :6], w[:, 6:]
    a0, b0 = init[2].weight[:, :6], init[2].weight[:, 6:]
    bound = float(((a - a0).norm() + (b - b0).norm()) / a.norm())
    assert R.mirrored_distance_bound(model, init) == pytest.approx(bound, rel=1e-6)
    assert R.mirrored_distance(model) <= R.mirrored_distance_bound(model, init) + 1e-9


def _ll_runs(bn_last=0.2, nn_last=1.9, cr_last=2.0, mirror=0.1, bound=0.8):
    return {"LL-40 + BN": {"first": 2.3, "last": bn_last, "mirror_init": 0.0, "mirror_final": mirror,
                           "mirror_bound": bound},
            "LL-40 no norm": {"first": 2.3, "last": nn_last, "mirror_init": 0.0, "mirror_final": 0.1,
                              "mirror_bound": bound},
            "CReLU-40 + BN, default init": {"first": 2.3, "last": cr_last, "mirror_init": None, "mirror_final": None,
                                            "mirror_bound": None}}


def test_looks_linear_rows_controls():
    """Every judged row can fail, and the rows that need a trained BN network or moved weights are untestable
    without them (the mirrored-pair row passed by construction when the weights barely moved)."""
    ok = R.looks_linear_rows(_ll_runs(), 1e-6, 9.0)
    assert [r.verdict for r in ok] == ["yes"] * 5
    nonlinear = R.looks_linear_rows(_ll_runs(), 0.5, 9.0)
    assert nonlinear[0].verdict == "no"
    assert R.looks_linear_rows(_ll_runs(), 1e-6, 0.01)[0].verdict == "untestable"  # the check could not fail
    trains = R.looks_linear_rows(_ll_runs(nn_last=0.2, cr_last=0.2, mirror=0.7), 1e-6, 9.0)
    assert [r.verdict for r in trains[2:]] == ["no", "no", "no"]
    untrained = R.looks_linear_rows(_ll_runs(bn_last=2.2), 1e-6, 9.0)
    assert [r.verdict for r in untrained[1:]] == ["no", "untestable", "untestable", "untestable"]
    still = R.looks_linear_rows(_ll_runs(bound=0.3), 1e-6, 9.0)
    assert still[4].verdict == "untestable" and still[4].unmet[0].name == "the treatment happened"


def test_descent_points_find_the_steepest_and_lowest_steps():
    # flat at 3 for 100 steps, a drop of 0.05 per step for 40 steps, then flat at 1 with a final bump
    losses = [3.0] * 100 + [3.0 - 0.05 * (i + 1) for i in range(40)] + [1.0] * 100 + [1.5] * 40
    rate, best, steep, low = R._descent_points(losses, window=20)
    # two adjacent 20-step windows both inside the 40-step drop differ by 20 x 0.05 -> rate 0.05 per step, and the
    # steepest point is the boundary between them (step ~120); the lowest window lies in the flat part at 1.0
    assert rate == pytest.approx(0.05, rel=1e-9) and 115 <= steep <= 125
    assert 139 <= low < 240 and best == pytest.approx(1.0)
    rate_d, _, steep_d, _ = R._descent_points(losses[:150] + [float("nan")], window=20)
    assert math.isfinite(rate_d) and steep_d < 150  # divergence truncates the curve


@pytest.mark.slow
@pytest.mark.parametrize("fn", [R.sampler_comparison, R.depth_sweep, R.looks_linear, R.mask_accuracy])
def test_quick_runs(fn, tmp_path):
    rows = fn(True, tmp_path)
    assert rows and all(r.claim and r.ours for r in rows)
    assert list(tmp_path.glob("*.png")) or fn is R.mask_accuracy
    assert all(r.source.startswith("seed 004") and r.criterion and r.tolerance for r in rows)
    assert any(r.judged for r in rows)
    if fn is R.sampler_comparison:  # equal step length: every weight direction has Euclidean norm eta = 1e-3
        lengths = rows[0].data["lengths"]
        assert set(lengths) == {"targeted", "random", "±ḡ"}
        assert all(v == pytest.approx(1e-3, rel=1e-4) for v in lengths.values())
    if fn is R.depth_sweep:
        assert sum(r.judged for r in rows) >= 12
        assert all(r.data["n"] >= 15 for r in rows if "Spearman" in r.ours)

