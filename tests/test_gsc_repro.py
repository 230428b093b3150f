"""Seed-003 reproductions (gsc-table1, gsc-invariance, dilution-theorem3)."""

import math

import numpy as np
import pytest
import torch

from gradcond.experiments import gsc_repro
from gradcond.experiments.registry import load_all


def test_registered():
    exps = load_all()
    assert {"gsc-table1", "gsc-invariance", "dilution-theorem3"} <= set(exps)


def test_table1_models_follow_the_protocol():
    mlp = gsc_repro.build_table1_model(dict(kind="mlp", act="relu", norm="batch", init="gaussian"), seed=0)
    lins = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert len(lins) == 50 and all(l.bias is None for l in lins)
    assert isinstance(mlp[-1], torch.nn.BatchNorm1d) and mlp[-1].affine is False  # norm after the last linear too
    alt = gsc_repro.build_table1_model(dict(kind="mlp", act="selu", norm="none", init="gaussian", width="alt"), seed=0)
    assert [l.out_features for l in alt if isinstance(l, torch.nn.Linear)][:3] == [200, 100, 200]
    res = gsc_repro.build_table1_model(dict(kind="resnet", act="tanh", norm="layer", skip="identity"), seed=0)
    assert sum(isinstance(m, torch.nn.Linear) for m in res.modules()) == 51  # I.1: 1 + 25 blocks x 2
    assert len(gsc_repro.TABLE1) == 34


def test_invariance_quick(tmp_path):
    rows = gsc_repro.run_invariance(True, tmp_path)
    judged = [r for r in rows if r.judged]
    assert len(judged) == 2 and all(r.verdict == "yes" for r in judged), [r.ours for r in rows]
    # the tanh control is reported (it is not a claim of the source) and feeds the rows' power precondition
    ctrl = [r for r in rows if not r.judged]
    assert len(ctrl) == 1 and ctrl[0].data["max_rel_gsc_change"] > gsc_repro.CONTROL_MIN_CHANGE
    assert all(any(p.name == "power" for p in r.preconditions) for r in judged)
    assert (tmp_path / "invariance.png").exists()


def _case(rel, span=4.0, out_diff=1e-15):
    return {"rel": rel, "span": span, "out_diff": out_diff, "gr": np.array([1.0, 10.0 ** span])}


def test_invariance_row_controls():
    """The Prop. 4 row says no for a GSC that changed, and is untestable when the rescaling was a no-op, changed the
    function, or the same measurement could not detect a change on the tanh control."""
    assert gsc_repro.invariance_row("x", _case(1e-13), 50.0, [1.0]).verdict == "yes"
    assert gsc_repro.invariance_row("x", _case(1e-3), 50.0, [1.0]).verdict == "no"
    noop = gsc_repro.invariance_row("x", _case(0.0, span=0.0), 50.0, [1.0])
    assert noop.verdict == "untestable" and noop.unmet[0].name == "the treatment happened"
    assert gsc_repro.invariance_row("x", _case(0.0, out_diff=1e-3), 50.0, [1.0]).unmet[0].name == \
        "the setting is the claim's"
    assert gsc_repro.invariance_row("x", _case(0.0), 1e-5, [1.0]).unmet[0].name == "power"


def test_invariance_case_detects_a_non_invariant_network():
    """The measurement behind the rows, on a tanh net (not covered by Prop. 4): the GSC changes by far more than the
    tolerance, so the judged rows could fail."""
    from gradcond.data import load_dataset

    x, y = load_dataset("gaussian", n=200, dim=100, seed=1, dtype=torch.float64).train.tensors
    case = gsc_repro.invariance_case("tanh", "none", [10.0] * 3 + [0.1] * 3, 6, x, y)
    assert case["rel"] > 1e-2
    relu = gsc_repro.invariance_case("relu", "none", [10.0] * 3 + [0.1] * 3, 6, x, y)
    assert relu["rel"] < 1e-9 and relu["out_diff"] < 1e-12 and relu["span"] > 2


def test_lli_row_single_network():
    """Table 1 LLI rows: GSC 1.00, std 1.00, sign diversity 0.50 (one network, 10,000 points; tol 0.01)."""
    r = gsc_repro.measure_table1_row(dict(kind="mlp", act="relu", norm="batch", init="looks_linear"), 1, 10000)
    assert r["gsc"][0] == pytest.approx(1.0, abs=0.01)
    assert r["std"][0] == pytest.approx(1.0, abs=0.01)
    assert r["sign_div"][0] == pytest.approx(0.5, abs=0.01)
    assert gsc_repro.judge_table1_lli(r["gsc"], r["std"], r["sign_div"])
    # control: the same row judge on a Gaussian-init ReLU/batch network (Table 1: GSC 5728) says no
    g = gsc_repro.measure_table1_row(dict(kind="mlp", act="relu", norm="batch", init="gaussian"), 1, 2000)
    assert not gsc_repro.judge_table1_lli(g["gsc"], g["std"], g["sign_div"])


def test_dilution_criterion_rejects_a_rate_of_one():
    """A corrected ResNet that does not explode (rate 1.0 per layer, log10 GSC 0) must not pass, although its rate
    is within 10 % of vanilla layer-tanh's (1.0 vs 10^(1.86/50) = 1.089), which the old criterion accepted."""
    vanilla = math.log10(72.2)  # Table 1, vanilla layer-tanh
    rate_one = 50 * math.log10(1.0)
    assert abs(1.0 / 10 ** (vanilla / 50) - 1) <= 0.10  # the old per-layer-rate test passed this case
    assert gsc_repro.judge_corrected_vs_vanilla(rate_one, vanilla)["holds"] is False
    # half the explosion (corrected log10 GSC half the vanilla one) fails too
    assert gsc_repro.judge_corrected_vs_vanilla(vanilla / 2, vanilla)["holds"] is False
    # the paper's own values (Table 3 row (i) vs Table 1) pass
    for label, van in (("layer-tanh", 72.2), ("batch-ReLU", 5728)):
        assert gsc_repro.judge_corrected_vs_vanilla(gsc_repro.PAPER_CORRECTED_LOG10[label], math.log10(van))["holds"]
    # a vanilla network that does not explode cannot confirm anything: not judged (the entry's precondition)
    assert gsc_repro.judge_corrected_vs_vanilla(0.0, 0.0)["holds"] is None


def test_table1_judge_uses_the_standard_error():
    """The Table 1 test: |mean rel. error| <= t_{0.975,n-1} * s * sqrt(1/n + 1/100), against scipy's t quantile."""
    from scipy import stats

    g = [1.10, 1.30, 1.20]
    res = gsc_repro.judge_table1_gsc(g, 1.0)
    rel = np.array(g) - 1
    se = rel.std(ddof=1) * math.sqrt(1 / 3 + 1 / 100)
    assert res["se"] == pytest.approx(se) and res["tol"] == pytest.approx(stats.t.ppf(0.975, 2) * se)
    assert res["rel"] == pytest.approx(0.2) and res["holds"] is True  # 0.2 <= 4.30 * 0.058
    # low-variance row with a systematic +5 % offset (the BN ResNet case): fails, while a 15 % band would pass it
    assert gsc_repro.judge_table1_gsc([4.20, 4.21, 4.19, 4.22], 4.00)["holds"] is False
    # the same offset with a large spread between networks is not significant
    assert gsc_repro.judge_table1_gsc([3.2, 5.2, 4.0, 4.4], 4.00)["holds"] is True
    assert gsc_repro.judge_table1_gsc([4.2], 4.0)["holds"] is None  # one network: no spread, not judged


def test_table1_power_precondition():
    """Fewer than MIN_NETWORKS networks per row: the standard-error verdict is untestable (issue 27: with 3 networks
    the sample SD of the high-variance rows is off by 4-7x)."""
    from gradcond.experiments.judging import enough_samples
    from gradcond.experiments.registry import Row

    assert gsc_repro.MIN_NETWORKS == 10
    few = Row("c", "s", "o", holds=True, preconditions=[enough_samples(3, gsc_repro.MIN_NETWORKS, "networks")])
    assert few.verdict == "untestable" and "3 networks" in few.unmet[0].measured
    assert Row("c", "s", "o", holds=True, preconditions=[enough_samples(10, 10, "networks")]).verdict == "yes"


def test_every_row_carries_its_criterion(tmp_path):
    rows = gsc_repro.run_invariance(True, tmp_path)
    assert all(r.paper and r.criterion and "seed 003" in r.source for r in rows)
    assert all(r.tolerance for r in rows if r.judged)


@pytest.mark.slow
def test_table1_full(tmp_path):
    """Every row judged over 20 networks (t-test on the standard error); LLI rows 1.00 +- 0.01. The rows that fail
    at our scale are reported with their numbers; this asserts the rows expected to hold."""
    rows = gsc_repro.run_table1(False, tmp_path)
    assert all(r.judged and r.verdict != "untestable" and r.data["n_networks"] >= 20 and r.tolerance for r in rows)
    lli = [r for r in rows if "LLI" in r.claim]
    assert len(lli) == 3 and all(r.holds for r in lli), [r.ours for r in lli]
    # exploding vanilla rows: within 15 % of the paper (the earlier 6-network full run); the verdict itself uses the
    # standard-error test, which may say no for a small systematic offset, and REPRODUCTION.md reports that
    exploding = [r for r in rows if r.data["group"] in ("vanilla", "width", "orthogonal") and r.data["paper_gsc"] > 5]
    far = [r.ours for r in exploding if abs(r.data["rel_error"]) > 0.15]
    assert len(exploding) == 14 and not far, far


def test_theorem3_quick(tmp_path):
    rows = gsc_repro.run_theorem3(True, tmp_path)
    assert len(rows) == 6 and all(r.judged and r.paper and r.criterion and r.tolerance for r in rows)
    corrected = [r for r in rows if "dilution-corrected" in r.claim]
    assert all(abs(r.data["ratio"] - 1) <= gsc_repro.CORRECTED_REL_TOL for r in corrected if r.holds)


@pytest.mark.slow
def test_theorem3_full(tmp_path):
    rows = gsc_repro.run_theorem3(False, tmp_path)
    assert all(r.holds for r in rows), [r.ours for r in rows]
