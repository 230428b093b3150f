"""Seed-000 teleport reproductions: registered, run in quick mode, print source vs ours, save figures; and the pure
judging functions, each fed a counter-example that must make it fail.

Reference values from seed 000 are checked with their tolerance: the expectation formula of Sec. 4.1
(E[tau_a^2/tau_b^2] = (sigma^2+3)/(3(1-sigma^2)), within 4 Monte-Carlo standard errors), the level-curve loss change
(~1e-10, Sec. 4.2) and micro-teleport orthogonality (Sec. 4.3; Must-show: mean |angle - 90| < 0.1 degree).
"""

from __future__ import annotations

import json

import pytest
import torch

from gradcond.experiments import teleport_geometry as G
from gradcond.experiments import teleport_training as T
from gradcond.experiments.registry import load_all, run_experiment

NAMES = ["teleport-level-curve", "teleport-grad-scaling", "micro-teleport-angle", "teleport-flatness",
         "teleport-sgd", "teleport-midtraining"]


def test_all_entries_registered_with_claim_and_source():
    exps = load_all()
    for n in NAMES:
        assert n in exps and exps[n].claim and "seed 000" in exps[n].source
        assert "issue" not in exps[n].source  # cite the seed's own numbers, never an internal issue


def test_judge_mc_fails_outside_four_standard_errors():
    ok = [(0.5, 1.0, 0.01, 1.03)]  # 3 standard errors off
    bad = [(0.5, 1.0, 0.01, 1.05)]  # 5 standard errors off
    assert G._judge_mc(ok) is True
    assert G._judge_mc(bad) is False
    assert G._judge_mc(ok + bad) is False


def test_monte_carlo_samples_the_librarys_cobs(monkeypatch):
    import gradcond.teleport as tp
    from gradcond.graph import analyze
    from gradcond.zoo import mlp

    drawn, real = [], tp.random_cob

    def spy(structure, sigma, mode, gen):
        c = real(structure, sigma, mode, gen)
        drawn.append((mode, c.tau.detach().clone()))
        return c

    monkeypatch.setattr(tp, "random_cob", spy)
    structure = analyze(mlp(4, 2, depth=3, width=6), torch.zeros(2, 4))
    half = structure.num_free // 2
    s, m, se, th = G._mc_tau_ratio(structure, 0.5, 5 * half, torch.Generator().manual_seed(0))
    assert len(drawn) == 5 and all(mode == "intra" for mode, _ in drawn)
    r = torch.cat([t[:half] ** 2 / t[half:2 * half] ** 2 for _, t in drawn])  # independent recomputation
    assert m == pytest.approx(float(r.mean()), rel=1e-12)
    assert se == pytest.approx(float(r.std() / r.numel() ** 0.5), rel=1e-12)
    assert th == pytest.approx((0.25 + 3) / (3 * 0.75), rel=1e-12)


def test_judge_monotone_and_jump_order_fail_on_counter_examples():
    assert G._judge_monotone([0.1, 0.2, 0.2, 0.3]) is True
    assert G._judge_monotone([0.1, 0.3, 0.2]) is False
    assert G._judge_monotone([0.1, float("nan")]) is False
    assert T._judge_jump_order([0.0, 0.01, 0.02, 0.03]) is True
    # the old criterion (0.9 beats 0 and 0.7) would pass this; 0.8 below 0.7 breaks the source's ordering
    assert T._judge_jump_order([0.0, 0.02, 0.01, 0.03]) is False
    assert T._judge_jump_order([0.0, 0.02, 0.02, 0.03]) is False


def test_paired_gain_by_hand():
    m, se = T._paired_gain([0.5, 0.7, 0.6], [0.4, 0.5, 0.6])  # differences 0.1, 0.2, 0.0
    assert m == pytest.approx(0.1) and se == pytest.approx(0.1 / 3 ** 0.5)
    assert T._paired_gain([0.5], [0.2]) == pytest.approx((0.3, 0.0))


def test_judge_speedup_needs_every_setting_and_no_pseudo_gain():
    sig, flat = (0.05, 0.01), (0.0, 0.01)
    assert T._judge_speedup({"a": (sig, flat), "b": (sig, flat)}) == (True, True)
    # the old verdict (a majority of wins) would pass 3 of 4; the source claims every setting
    most = {"a": (sig, flat), "b": (sig, flat), "c": (sig, flat), "d": ((-0.01, 0.01), flat)}
    assert T._judge_speedup(most)[0] is False
    # a gain inside 2 standard errors is no speed-up
    assert T._judge_speedup({"a": ((0.015, 0.01), flat)})[0] is False
    # pseudo-teleport winning clearly in one setting breaks 'none for pseudo-teleport'
    assert T._judge_speedup({"a": (sig, flat), "b": (sig, sig)})[1] is False
    assert T._judge_speedup({}) == (False, False)


def _run(name, tmp_path):
    rows, out = run_experiment(name, tmp_path, quick=True)
    assert list(out.glob("*.png")), "figure not saved"
    res = json.loads((out / "result.json").read_text())
    assert res["rows"] and all(r["source"] and r["ours"] for r in res["rows"])
    assert all(r["criterion"] and r["tolerance"] and "seed 000" in r["source"] for r in res["rows"])
    for r in rows:
        print(f"[{r.holds}] {r.claim}\n   source: {r.source}\n   ours:   {r.ours}")
    return rows


def test_level_curve(tmp_path):
    rows = _run("teleport-level-curve", tmp_path)
    assert max(rows[0].data["loss_changes"]) < 1e-10  # seed 000 Sec. 4.2: ~1e-10, float64 here
    assert rows[1].holds


def test_grad_scaling(tmp_path):
    rows = _run("teleport-grad-scaling", tmp_path)
    for s, m, se, th in rows[0].data["mc"]:
        assert abs(m - th) <= 4 * se  # seed 000 Sec. 4.1 formula
    assert all(r.holds for r in rows)


def test_micro_teleport_angle(tmp_path):
    rows = _run("micro-teleport-angle", tmp_path)
    assert len(rows) == 6  # mlp, cnn, resnet x batch 8, 64
    for r in rows:
        dev = r.data["mean_abs_dev"]
        assert dev["micro-grad"] < 0.1  # seed 000 Sec. 4.3 / Fig. 4: a Dirac at 90 degrees
        assert dev["grad-random"] > 10 * dev["micro-grad"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["teleport-flatness", "teleport-sgd", "teleport-midtraining"])
def test_training_reproductions_quick(name, tmp_path):
    rows = _run(name, tmp_path)
    assert all(r.criterion and r.tolerance and r.paper and "issue" not in r.source for r in rows)
    if name == "teleport-sgd":
        assert rows[0].judged and rows[1].judged and "validation accuracy" in rows[0].criterion
    if name == "teleport-midtraining":
        # the transport / reset / keep comparison is reported for both optimizers over 200 steps (21 points)
        st = [r for r in rows if "optimizer" not in r.claim and "after a mid-training" in r.claim]
        assert len(st) == 2 and all(len(r.data["transport"]) == 21 for r in st)
