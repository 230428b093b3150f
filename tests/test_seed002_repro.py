"""Seed-002 reproduction entries (ch. 4-5): registered, rows carry the source's number and ours, quick runs (slow)."""

import pytest

from gradcond.experiments import ga_repro as G
from gradcond.experiments import representation_repro as R
from gradcond.experiments.registry import load_all

NAMES = ["checkerboard-conundrum", "lsd-depth", "selection-entropy-depth", "ga-vs-softmax", "kfilter-tradeoff"]


def test_entries_registered():
    reg = load_all()
    assert all(n in reg for n in NAMES)
    assert all(reg[n].source.startswith("seed 002") for n in NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("fn", [R.checkerboard, R.lsd_depth, R.selection_entropy_depth, G.ga_vs_softmax])
def test_quick_runs(fn, tmp_path):
    rows = fn(True, tmp_path)
    assert rows and all(r.claim and r.ours and r.criterion and r.source.startswith("seed 002") for r in rows)
    assert any(r.judged for r in rows)
    assert list(tmp_path.glob("*.png"))


# ---- ga-vs-softmax: the row builders on controls (no training) -----------------------------------------------


def _run(epochs_to_converge, test_error, lr=0.05, hidden=1.0, diverged=False, seed=0):
    return {"epochs_to_converge": epochs_to_converge, "test_error": test_error, "lr": lr, "hidden_rms": hidden,
            "diverged": diverged, "seed": seed}


def test_ga_losses_use_the_thesis_targets():
    exp, pow3, lin = G.make_loss("exp_ga"), G.make_loss("pow3_ga"), G.make_loss("linear_mse")
    assert exp.targets == (0.0, 6.0) and exp.alpha == 0.1  # §4.5 alpha, §4.10 targets
    assert pow3.targets == (-2.0, 10.0) and (pow3.alpha, pow3.beta) == (1e-3, 0.4)  # §4.7 / §4.10
    assert lin.targets == (-1.0, 1.0) and G.make_loss("cross_entropy") == "cross_entropy"


def test_ga_convergence_row_is_untestable_when_the_baseline_is_capped_by_the_run():
    sm = [_run(20, 0.03, seed=s) for s in range(5)]  # softmax's best epoch is the last one: capped
    ga = [_run(10, 0.03, seed=s) for s in range(5)]
    row = G.convergence_row("setup", "exp_ga", ga, sm, budget=20)
    assert row.holds is True and row.verdict == "untestable"
    assert [p.name for p in row.unmet] == ["the setting is the claim's"] and "median epoch 20 of 20" in \
        row.unmet[0].measured
    # the same numbers inside a longer run are judged, both ways
    assert G.convergence_row("setup", "exp_ga", ga, sm, budget=100).verdict == "yes"
    assert G.convergence_row("setup", "exp_ga", [_run(18, 0.03)] * 5, sm, budget=100).verdict == "no"


def test_ga_rows_need_five_seeds_and_a_learning_baseline():
    sm3, ga3 = [_run(10, 0.03)] * 3, [_run(5, 0.02)] * 3
    assert [p.name for p in G.convergence_row("s", "exp_ga", ga3, sm3, 100).unmet] == ["power"]
    assert [p.name for p in G.error_row("s", "exp_ga", ga3, sm3).unmet] == ["power"]
    chance = [_run(10, 0.85)] * 5  # the baseline never left chance (15 % accuracy)
    assert "the baseline learns" in [p.name for p in G.rms_row("s", "exp_ga", [_run(5, 0.8)] * 5, chance).unmet]


def test_ga_error_row_is_a_paired_t_test_not_a_median_comparison():
    sm = [_run(10, e, seed=s) for s, e in enumerate((0.030, 0.025, 0.028, 0.031, 0.026))]
    same = [dict(r) for r in sm]  # identical errors: no advantage
    assert G.error_row("s", "exp_ga", same, sm).verdict == "no"
    # lower median but one large loss: not significant
    mixed = [_run(10, e) for e in (0.029, 0.024, 0.027, 0.030, 0.060)]
    assert G.error_row("s", "exp_ga", mixed, sm).verdict == "no"
    better = [_run(10, r["test_error"] - d) for r, d in zip(sm, (0.004, 0.006, 0.005, 0.003, 0.005))]
    assert G.error_row("s", "exp_ga", better, sm).verdict == "yes"


def test_ga_rms_row_bands_and_diverged_runs():
    sm = [_run(10, 0.03, hidden=1.0)] * 5
    assert G.rms_row("s", "exp_ga", [_run(10, 0.03, hidden=8.0)] * 5, sm).verdict == "yes"
    assert G.rms_row("s", "exp_ga", [_run(10, 0.03, hidden=1.2)] * 5, sm).verdict == "no"  # no amplification
    assert G.rms_row("s", "pow3_ga", [_run(10, 0.03, hidden=57.0)] * 5, sm).verdict == "no"
    diverged = [_run(10, 0.9, hidden=float("nan"), diverged=True)] * 5
    assert G.rms_row("s", "pow3_ga", diverged, sm).verdict == "untestable"


def test_ga_hidden_rms_averages_the_first_ten_epochs_over_hidden_layers_only():
    per_epoch = [{"0": 1.0 * e, "2": 3.0 * e, "4": 100.0} for e in range(1, 13)]  # "4" is the output layer
    assert G.hidden_rms(per_epoch) == pytest.approx(2.0 * 5.5)


@pytest.mark.slow
def test_kfilter_tradeoff_quick(tmp_path):
    rows = R.kfilter_tradeoff(True, tmp_path)
    judged = [r for r in rows if r.holds is not None]
    assert len(judged) == 2 and all(r.criterion and r.tolerance for r in judged)  # one verdict per dataset
    assert all("kept" in r.ours for r in rows if r.holds is None)
    assert (tmp_path / "kfilter_tradeoff.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fn", [R.checkerboard, R.lsd_depth, R.selection_entropy_depth, G.ga_vs_softmax,
                                R.kfilter_tradeoff])
def test_full_runs(fn, tmp_path):
    rows = fn(False, tmp_path)
    assert rows and any(r.holds in (True, False) for r in rows)


def test_entry_is_deterministic_and_leaves_the_global_rng(tmp_path):
    import torch

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = R.selection_entropy_depth(True, tmp_path)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    torch.manual_seed(7)  # a different global state must not change the result
    b = R.selection_entropy_depth(True, tmp_path)
    assert [(r.claim, r.ours, r.holds) for r in a] == [(r.claim, r.ours, r.holds) for r in b]
