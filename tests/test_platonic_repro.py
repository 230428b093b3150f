"""Seed-002 ch. 7 reproductions (platonic-spirals, -sine, -checkerboard, -digits)."""

import json

import pytest
import torch

from gradcond.experiments import platonic_repro
from gradcond.experiments.registry import load_all, run_experiment

NAMES = ("platonic-spirals", "platonic-sine", "platonic-checkerboard", "platonic-digits")


def test_registered():
    assert set(NAMES) <= set(load_all())


def test_singular_fit_is_an_outcome_not_a_crash():
    X, Y, y = platonic_repro.spirals_data(torch.float32, n_train=1000)
    acc, sec = platonic_repro.spirals_fit(X, Y, y, seed=0, dtype=torch.float32, solver="ridge")
    assert acc is None and sec > 0
    assert platonic_repro._cell([None, None]) == "singular system in 2/2 runs (Failed)"
    assert platonic_repro._cell([0.5, None]) == "50.00 ± 0.00 (1/2 singular)"


def test_backprop_baseline_learns():
    X, _, y = platonic_repro.spirals_data(n_train=1000)
    acc, sec, reached = platonic_repro.backprop_spirals(X, y, epochs=2, target_acc=0.0)
    assert 0.5 <= acc <= 1.0 and sec > 0 and reached is not None and reached <= sec


def test_spirals_quick(tmp_path):
    rows, out = run_experiment("platonic-spirals", tmp_path, quick=True)
    result = json.loads((out / "result.json").read_text())
    assert len(result["rows"]) == len(rows) == 9
    assert rows[0].holds is True and min(rows[0].data["accuracies"]) > 0.95
    solve = [r for r in rows if ", solve:" in r.claim]
    assert len(solve) == 2
    for r in solve:  # Table 7.1's CPU float32 "Failed" cells: a singular-system outcome in every run
        assert r.ours.startswith("singular system in 5/5 runs (Failed) | singular system in 5/5 runs (Failed) | ")
        assert all(a is None for a in r.data["accuracies"]["fp32"])
    # float64 with alpha 1, beta 2 solves where float32 is singular (the row's float64 cell is a number)
    assert solve[1].holds is True and solve[1].ours.split(" | ")[2][0].isdigit()
    assert rows[-1].holds is None and rows[-2].holds is None  # quick backprop and timing: reported, not judged


def test_sine_quick(tmp_path):
    rows, out = run_experiment("platonic-sine", tmp_path, quick=True)
    assert len(rows) == 3 and (out / "sine_deep_lsd.png").exists()
    assert rows[1].holds is True  # 5 tries: median MSE <= 1e-4
    assert rows[2].data["depth"] == 300 and rows[2].holds is True
    assert all(m > 0 for m in rows[0].data["mse"])


def test_digits_quick(tmp_path):
    rows, _ = run_experiment("platonic-digits", tmp_path, quick=True)
    assert len(rows) == 5 + 4 + 2
    first = rows[0].data["test_accuracy"]
    assert first["random W (ELM)"] < min(first["random P"], first["Platonic PCA"], first["Sorted PCA"])
    assert rows[0].holds is True
    widest = [r for r in rows if "width 128 (ReLU" in r.claim][0]
    assert widest.data["test_accuracy"]["Platonic PCA"] is None  # at most 64 + 10 directions: the source's N/A
    assert all(r.holds in (True, False) for r in rows)


@pytest.mark.slow
def test_checkerboard_quick(tmp_path):
    rows, _ = run_experiment("platonic-checkerboard", tmp_path, quick=True)
    assert len(rows) == 2 and all(r.holds for r in rows), [r.ours for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_full(tmp_path, name):
    rows, out = run_experiment(name, tmp_path, quick=False)
    assert json.loads((out / "result.json").read_text())["quick"] is False
    assert any(r.holds is not None for r in rows)
    if name == "platonic-spirals":
        assert rows[0].holds and rows[-2].holds is not None
    if name == "platonic-checkerboard":
        assert all(r.holds for r in rows), [r.ours for r in rows]
    if name == "platonic-sine":
        assert rows[2].data["depth"] == 10_000 and rows[2].holds
