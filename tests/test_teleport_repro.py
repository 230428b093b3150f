"""Seed-000 teleport reproductions: registered, run in quick mode, print source vs ours, save figures; and the pure
judging functions, each fed a counter-example that must make it fail.

Reference values from seed 000 are checked with their tolerance: the expectation formula of Sec. 4.1
(E[tau_a^2/tau_b^2] = (sigma^2+3)/(3(1-sigma^2)), within 4 Monte-Carlo standard errors), the level-curve loss change
(~1e-10, Sec. 4.2) and micro-teleport orthogonality (Sec. 4.3; Must-show: mean |angle - 90| < 0.1 degree).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gradcond.experiments import _teleport_speedup as S
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


def test_judge_monotone_fails_on_counter_examples():
    assert G._judge_monotone([0.1, 0.2, 0.2, 0.3]) is True
    assert G._judge_monotone([0.1, 0.3, 0.2]) is False
    assert G._judge_monotone([0.1, float("nan")]) is False


# ---- the shared speed-up rule (teleport-sgd, -activations, -inits) ---------------------------------------------
def _arm(accs, gain=2.5, dist=2.0):
    return S.ArmRun(list(accs), [1.0] * len(accs), gain, dist, False)


def _grid(none_curves, tele_curves, gains=None, lrs=(0.01,), opt="sgd"):
    """A grid with one learning rate: ``none_curves[seed]``, ``tele_curves[seed]`` (validation accuracy per epoch)."""
    gains = gains or [2.5] * len(tele_curves)
    return {(opt, lr, "none"): [_arm(c, 1.0, 0.0) for c in none_curves] for lr in lrs} | {
        (opt, lr, "teleport"): [_arm(c, g) for c, g in zip(tele_curves, gains)] for lr in lrs}


def test_paired_verdict_is_the_one_sided_t_test():
    from scipy.stats import ttest_rel

    a, b = [0.61, 0.64, 0.58, 0.66, 0.60], [0.55, 0.57, 0.56, 0.60, 0.51]
    holds, t, pre = S.paired_verdict(a, b, [])
    ref = ttest_rel(a, b, alternative="greater")  # independent computation
    assert t.t == pytest.approx(ref.statistic, rel=1e-12)
    assert holds is True and ref.pvalue < 0.05
    assert [p.name for p in pre] == ["power"] and pre[0].met
    # the claim "no speed-up" is the negation
    assert S.paired_verdict(a, b, [], expect_greater=False)[0] is False
    # the former rule (mean > 2 SE) passes this sample with 3 seeds; the t test (t_0.95,2 = 2.92) does not
    d = [0.10, 0.02, 0.06]
    m, se = np.mean(d), np.std(d, ddof=1) / 3 ** 0.5
    assert m > 2 * se and (m / se) < 2.92
    holds, t, pre = S.paired_verdict(d, [0, 0, 0], [])
    assert holds is False and not pre[-1].met  # and 3 seeds are too few anyway
    with pytest.raises(ValueError, match="same length"):
        S.paired_verdict([1, 2], [1], [])


def test_speedup_row_controls_make_it_fail_or_untestable():
    learn = [[0.2, 0.5, 0.8]] * 5
    fast = [[0.5 + 0.01 * i, 0.8, 0.9] for i in range(5)]
    row = S.speedup_row("c", "seed 000", "p", _grid(learn, fast), "sgd", (0.01,), "teleport")
    assert row.verdict == "yes" and all(p.met for p in row.preconditions)
    # control 1: the teleported arm is the untreated one (treated but unchanged training): no
    same = [[0.2 + 0.01 * i, 0.5, 0.8] for i in range(5)]
    row = S.speedup_row("c", "seed 000", "p", _grid(same, same), "sgd", (0.01,), "teleport")
    assert row.verdict == "no"
    # control 2: the baseline never leaves chance: untestable, whatever the teleported arm did
    chance = [[0.1, 0.11, 0.1]] * 5
    row = S.speedup_row("c", "seed 000", "p", _grid(chance, fast), "sgd", (0.01,), "teleport")
    assert row.verdict == "untestable" and "the baseline learns" in row.unmet[0].describe()
    # control 3: the teleport did not raise the gradient norm (gain 1.02): untestable
    row = S.speedup_row("c", "seed 000", "p", _grid(learn, fast, gains=[1.02] * 5), "sgd", (0.01,), "teleport")
    assert [p.name for p in row.unmet] == ["the treatment happened"]
    # control 4: 3 seeds: untestable (power)
    row = S.speedup_row("c", "seed 000", "p", _grid(learn[:3], fast[:3]), "sgd", (0.01,), "teleport")
    assert [p.name for p in row.unmet] == ["power"]


def test_lr_area_and_best_accuracy_by_hand():
    g = _grid([[0.1, 0.3], [0.1, 0.5]], [[0.2, 0.4], [0.6, 0.8]], lrs=(0.1, 0.01))
    g[("sgd", 0.01, "none")] = [_arm([0.1, 0.1]), _arm([0.1, 0.2])]
    # seed 0: mean over lrs of (0.2, 0.1) = 0.15; seed 1: (0.3 + 0.15) / 2
    assert S.lr_area(g, "sgd", "none", (0.1, 0.01)) == pytest.approx([0.15, 0.225])
    assert S.best_accuracy(g, "sgd", "none", (0.1, 0.01)) == pytest.approx((0.4, 0.1))


def test_train_arm_pairs_the_arms_and_measures_the_treatment():
    from gradcond.experiments._teleport_common import _model

    make = lambda seed: _model("mlp", in_features=64, seed=seed, depth=3, width=16, init="gaussian")  # noqa: E731
    a = S.train_arm(make, 0, "digits", "none", "sgd", 0.01, 1)
    b = S.train_arm(make, 0, "digits", "none", "sgd", 0.01, 1)
    c = S.train_arm(make, 0, "digits", "teleport", "sgd", 0.01, 1)
    p1 = S.train_arm(make, 0, "digits", "pseudo_l1", "sgd", 0.01, 1)
    assert a.val_acc == b.val_acc and len(a.val_acc) == 1 and a.grad_gain == 1.0 and a.rel_dist == 0.0
    assert c.val_acc != a.val_acc and c.rel_dist > 0.5 and c.grad_gain != 1.0
    assert p1.rel_dist > 0 and p1.rel_dist != c.rel_dist  # same CoB, L1 length per tensor: a different L2 length
    with pytest.raises(ValueError, match="unknown variant 'x'"):
        S.treat(make(0), torch.zeros(2, 64), "x", 0)


# ---- teleport-midtraining ------------------------------------------------------------------------------------
def test_jump_slopes_by_hand():
    jumps = {0.7: [0.1, 0.3], 0.8: [0.2, 0.3], 0.9: [0.3, float("nan")]}
    sl = T.jump_slopes((0.7, 0.8, 0.9), jumps)
    assert sl[0] == pytest.approx(1.0) and math.isnan(sl[1])


def test_midtraining_rows_fail_on_controls():
    n = 5
    acc0 = [0.6] * n
    gains = {0.7: [1.6] * n, 0.8: [2.0] * n, 0.9: [2.5] * n}
    good = {0.0: [0.05 + 0.01 * i for i in range(n)], 0.7: [0.10 + 0.01 * i for i in range(n)],
            0.8: [0.12 + 0.012 * i for i in range(n)], 0.9: [0.15 + 0.009 * i for i in range(n)]}
    r1, r2 = T.midtraining_rows(good, acc0, gains, 3, 5e-3)
    assert r1.verdict == "yes" and r2.verdict == "yes"
    # control: a teleport that changed nothing (every arm jumps like the untouched one): both rows say no
    flat = {s: list(good[0.0]) for s in good}
    r1, r2 = T.midtraining_rows(flat, acc0, gains, 3, 5e-3)
    assert r1.verdict == "no" and r2.verdict == "no"
    # the network had not left chance at the teleport: untestable
    r1, _ = T.midtraining_rows(good, [0.12] * n, gains, 3, 5e-3)
    assert r1.verdict == "untestable"
    # teleports that did not raise the gradient norm: untestable
    r1, r2 = T.midtraining_rows(good, acc0, {s: [1.01] * n for s in gains}, 3, 5e-3)
    assert r1.verdict == r2.verdict == "untestable"


# ---- teleport-level-curve, micro-teleport-angle, teleport-flatness -------------------------------------------
def test_level_curve_rows_controls():
    rows = G.level_curve_rows([1e-17] * 100, [0.15] * 100, [2.4] * 100, 0.09, 0.11, 2.3)
    assert rows[0].verdict == "yes" and rows[1].verdict == "reported"
    # a move that changed the loss: no
    assert G.level_curve_rows([1e-6] * 100, [0.15] * 100, [2.4] * 100, 0.09, 0.11, 2.3)[0].verdict == "no"
    # a 'teleport' that did not move the weights keeps the loss trivially: untestable
    r = G.level_curve_rows([0.0] * 100, [1e-6] * 100, [1e-5] * 100, 0.09, 0.11, 2.3)[0]
    assert r.verdict == "untestable" and r.unmet[0].name == "the treatment happened"
    # an untrained network: untestable
    assert G.level_curve_rows([1e-17] * 100, [0.15] * 100, [2.4] * 100, 0.09, 2.2, 2.3)[0].verdict == "untestable"


def test_judge_micro_angles_fails_with_a_random_vector_in_place_of_the_micro_teleport():
    g = torch.Generator().manual_seed(0)
    d = 5000
    grads = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(20)]
    tangent = []
    for v in grads:  # exactly perpendicular vectors (what a micro-teleport gives up to O(sigma))
        r = torch.randn(d, generator=g, dtype=torch.float64)
        tangent.append(r - (r @ v) / (v @ v) * v)
    rand = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(20)]
    ang = lambda a, b: math.degrees(math.acos(float(a @ b / (a.norm() * b.norm()))))  # noqa: E731
    base = {"micro-random": [90.0], "random-random": [90.0],
            "grad-random": [ang(v, r) for v, r in zip(grads, rand)]}
    ok, dev = G.judge_micro_angles({**base, "micro-grad": [ang(t, v) for t, v in zip(tangent, grads)]})
    assert ok and dev["micro-grad"] < 1e-10
    ok, dev = G.judge_micro_angles({**base, "micro-grad": [ang(r, v) for r, v in zip(rand, grads)]})
    assert not ok  # a random direction is only quasi-orthogonal: ~57 / sqrt(5000) = 0.8 degree
    row = G.micro_angle_row("m", 8, {**base, "micro-grad": [90.0] * 20}, [0.0] * 20, d)
    assert row.verdict == "untestable"  # the micro-teleports did not move: an angle to nothing


def test_flatness_row_controls():
    sharp = {0.0: [0.2], 0.6: [0.3, 0.35, 0.32, 0.4, 0.31], 0.9: [5.0, 6.0, 4.5, 7.0, 5.5],
             0.99: [150.0, 200.0, 120.0, 300.0, 180.0]}
    r = G.flatness_row(sharp, (0.1, 0.003), (2.3, 2.3), 5)
    assert r.verdict == "yes"
    # a teleport that does not change the sharpness: no
    same = {s: [0.2] * (1 if s == 0 else 5) for s in sharp}
    assert G.flatness_row(same, (0.1, 0.003), (2.3, 2.3), 5).verdict == "no"
    # 2 CoB pairs per sigma (the former protocol): untestable
    two = {s: v[:2] for s, v in sharp.items()}
    assert G.flatness_row(two, (0.1, 0.003), (2.3, 2.3), 2).verdict == "untestable"
    # a network that did not train: untestable
    assert G.flatness_row(sharp, (2.2, 0.003), (2.3, 2.3), 5).verdict == "untestable"


def _run(name, tmp_path):
    rows, out = run_experiment(name, tmp_path, quick=True)
    assert list(out.glob("*.png")), "figure not saved"
    res = json.loads((out / "result.json").read_text())
    assert res["rows"] and all(r["source"] and r["ours"] for r in res["rows"])
    assert all(r["criterion"] and r["tolerance"] and "seed 000" in r["source"] for r in res["rows"])
    md = (out / "result.md").read_text()
    assert md.index("## Protocol") < md.index("## Judged rows")  # protocol, preconditions, judged rows, in order
    for r in rows:
        print(f"[{r.holds}] {r.claim}\n   source: {r.source}\n   ours:   {r.ours}")
    return rows


def test_level_curve(tmp_path):
    rows = _run("teleport-level-curve", tmp_path)
    assert max(rows[0].data["loss_changes"]) < 1e-10  # seed 000 Sec. 4.2: ~1e-10, float64 here
    assert rows[0].verdict == "yes" and all(p.met for p in rows[0].preconditions)
    d = rows[1].data  # independent recomputation of the precondition's ratio
    assert rows[0].preconditions[0].value == pytest.approx(sum(d["mean_abs_diff"]) / 100 / d["weight_scale"])


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
        assert not rows[0].judged and rows[1].judged and rows[2].judged and "validation accuracy" in rows[1].criterion
        # the pseudo-teleport's other reading is reported beside the judged one
        assert any("other reading" in r.claim and r.verdict == "reported" for r in rows)
    if name == "teleport-midtraining":
        # the transport / reset / keep comparison is reported for both optimizers over 200 steps (21 points)
        st = [r for r in rows if "optimizer" not in r.claim and "after a mid-training" in r.claim]
        assert len(st) == 2 and all(len(r.data["transport"]) == 21 for r in st)
