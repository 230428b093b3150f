"""Teleport reproductions (issue 9 item 6): registered, run in quick mode, print source vs ours, save figures.

Reference values from seed 000 are checked with their tolerance: the expectation formula of Sec. 4.1
(E[tau_a^2/tau_b^2] = (sigma^2+3)/(3(1-sigma^2)), within 4 Monte-Carlo standard errors), the level-curve loss change
(~1e-10, Sec. 4.2) and micro-teleport orthogonality (Sec. 4.3; Must-show: mean |angle - 90| < 0.1 degree).
"""

from __future__ import annotations

import json

import pytest

from gradcond.experiments.registry import load_all, run_experiment

NAMES = ["teleport-level-curve", "teleport-grad-scaling", "micro-teleport-angle", "teleport-flatness",
         "teleport-sgd", "teleport-midtraining"]


def test_all_entries_registered_with_claim_and_source():
    exps = load_all()
    for n in NAMES:
        assert n in exps and exps[n].claim and "seed 000" in exps[n].source


def _run(name, tmp_path):
    rows, out = run_experiment(name, tmp_path, quick=True)
    assert list(out.glob("*.png")), "figure not saved"
    res = json.loads((out / "result.json").read_text())
    assert res["rows"] and all(r["source"] and r["ours"] for r in res["rows"])
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
        assert dev["micro-grad"] < 0.1  # issue 9 Must-show (seed 000 Fig. 3: Dirac at 90 degrees)
        assert dev["grad-random"] > 10 * dev["micro-grad"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["teleport-flatness", "teleport-sgd", "teleport-midtraining"])
def test_training_reproductions_quick(name, tmp_path):
    rows = _run(name, tmp_path)
    if name == "teleport-midtraining":
        # the transport / reset / keep comparison is reported for both optimizers over 200 steps (21 points)
        st = [r for r in rows if "optimizer" not in r.claim and "after a mid-training" in r.claim]
        assert len(st) == 2 and all(len(r.data["transport"]) == 21 for r in st)
