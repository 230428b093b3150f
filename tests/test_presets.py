"""Thesis presets (issue 28 item 4): one registry of the thesis's stated settings, each with its section, applied
by ``preset="thesis"`` to fit_layerwise, fit_partitionwise, the GA losses and fit_platonic; explicit arguments win."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradcond import presets
from gradcond.losses import LinearMSE, NegCorrelationLoss, SparseCrossEntropy

# The thesis's stated settings, each with the section it comes from (seed 002): the values the presets must carry.
STATED = {
    ("SparseCrossEntropy", "thesis", "alpha"): 0.1,  # §4.5
    ("SparseCrossEntropy", "thesis", "targets"): (0.0, 16.0),  # §4.5: t in {0, 16}
    ("SparseCrossEntropy", "thesis-allconv", "targets"): (0.0, 6.0),  # §4.10: t in {0, 6}
    ("NegCorrelationLoss", "thesis", "alpha"): 1e-3,  # §4.7
    ("NegCorrelationLoss", "thesis", "beta"): 0.4,  # §4.7
    ("NegCorrelationLoss", "thesis", "targets"): (0.0, 10.0),  # §4.7
    ("NegCorrelationLoss", "thesis-allconv", "targets"): (-2.0, 10.0),  # §4.10
    ("LinearMSE", "thesis", "targets"): (-1.0, 1.0),  # §4.11, Table 4.2
    ("fit_layerwise", "thesis", "epochs"): 300,  # Table 6.3
    ("fit_layerwise", "thesis", "lr"): 3e-3,  # Table 6.3
    ("fit_layerwise", "thesis", "weight_decay"): 1e-6,  # Table 6.3
    ("fit_layerwise", "thesis", "lr_decay"): 0.8,  # Table 6.3 caption
    ("fit_layerwise", "thesis", "wd_growth"): 1.15,  # Table 6.3 caption
    ("fit_layerwise", "thesis", "lr_drops"): (0.5, 0.75),  # §6.7
    ("fit_layerwise", "thesis", "input_dropout"): 0.8,  # Table 6.3, §6.6.3
    ("fit_layerwise", "thesis", "input_dropout_decay"): 0.95,  # Table 6.3 caption
    ("fit_layerwise", "thesis", "grad_dropout"): 0.6,  # Table 6.3
    ("fit_layerwise", "thesis", "max_decision_convs"): 4,  # Table 6.3
    ("fit_layerwise", "thesis", "memory_target"): 0.30,  # Table 6.3 caption: 30 +- 0.5 %
    ("fit_layerwise", "thesis", "memory_tolerance"): 0.005,
    ("fit_layerwise", "thesis", "optimizer"): "adamw",  # §6.7
    ("fit_layerwise", "thesis", "batch_size"): 128,  # §6.7 (not an argument)
    ("fit_partitionwise", "thesis", "lr_scale"): 0.5,  # §6.8.1
    ("fit_partitionwise", "thesis", "wd_scale"): 0.5,  # §6.8.1
    ("fit_partitionwise", "thesis", "epochs_per_round"): 10,  # §6.8.2
    ("fit_partitionwise", "thesis", "schedule"): "round_robin",  # §6.8.2
    ("fit_partitionwise", "thesis", "feature_checkpoint"): "device",  # §6.8.2
    ("fit_partitionwise", "thesis", "k_filter"): {"k": 10, "warmup_epochs": 30, "filter_batch": 6148,
                                                  "max_removed": 0.6},  # §6.8.2
    ("fit_partitionwise", "thesis-imagenet", "loss_filter"): {"fraction": 0.25, "from_epoch": 30},  # §6.8.4
    ("fit_platonic", "thesis", "alpha"): 0.1,  # §7.6
    ("fit_platonic", "thesis", "beta"): 10.0,  # §7.6
    ("fit_platonic", "thesis-mnist", "ridge"): 50_000.0,  # §7.9.2
    ("fit_platonic", "thesis-mnist", "beta"): 10.0,  # §7.9.2 (random projections)
    ("fit_platonic", "thesis-deterministic", "reweight"): 0.2,  # §7.9.3 text
    ("fit_platonic", "thesis-deterministic", "projection"): "sorted_pca",  # §7.8.3
}


def test_the_registry_lists_every_setting_with_its_section():
    table = presets.table()
    print(table)  # the listing: function | preset | setting | value | source | note
    rows = [line for line in table.splitlines()[2:]]
    n = sum(len(items) for p in presets.PRESETS.values() for items in p.values())
    assert len(rows) == n
    for fn, ps in presets.PRESETS.items():
        for name, items in ps.items():
            for key, s in items.items():
                assert re.search(r"§\d|Table \d|Fig\. \d", s.source), (fn, name, key, s.source)
    for (fn, name, key), value in STATED.items():
        assert presets.settings(fn, name)[key].value == value, (fn, name, key)
    assert not presets.settings("fit_layerwise", "thesis")["batch_size"].argument


def test_losses_take_the_preset_and_explicit_arguments_win():
    exp = SparseCrossEntropy(preset="thesis")
    assert exp.alpha == 0.1 and exp.targets == (0.0, 16.0)
    assert SparseCrossEntropy(preset="thesis-allconv").targets == (0.0, 6.0)
    assert SparseCrossEntropy(0.5, preset="thesis").alpha == 0.5  # positional argument wins
    assert SparseCrossEntropy(preset="thesis", targets=(0, 3)).targets == (0.0, 3.0)
    pow3 = NegCorrelationLoss(preset="thesis-allconv")
    assert (pow3.alpha, pow3.beta, pow3.targets) == (1e-3, 0.4, (-2.0, 10.0))
    assert LinearMSE(preset="thesis").targets == (-1.0, 1.0)
    with pytest.raises(ValueError, match=r"^unknown preset 'paper' for SparseCrossEntropy; accepted: thesis, "
                                         r"thesis-allconv\.$"):
        SparseCrossEntropy(preset="paper")


def test_fit_platonic_preset():
    from gradcond.closedform import fit_platonic

    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g)
    y = (X[:, 0] > 0).long()
    _, rep = fit_platonic(X, y, [16], preset="thesis-mnist", return_report=True)
    assert (rep.act, rep.alpha, rep.beta, rep.solver) == ("relu", 1.0, 10.0, "ridge")
    _, rep = fit_platonic(X, y, [16], preset="thesis-mnist", beta=3.0, return_report=True)
    assert rep.beta == 3.0


def test_fit_layerwise_preset_sets_the_schedules_and_gradient_dropout(monkeypatch):
    from gradcond import zoo
    from gradcond.train.layerwise import fit as fitmod

    seen = []
    orig = fitmod.Subnet.__init__

    def spy(self, blocks, head, p_in=0.0, grad_p=0.0, rescale=True):
        seen.append(grad_p)
        orig(self, blocks, head, p_in, grad_p, rescale)

    monkeypatch.setattr(fitmod.Subnet, "__init__", spy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    dl = DataLoader(TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    model = zoo.mlp(8, 2, depth=3, width=16)
    res = fitmod.fit_layerwise(model, dl, dl, preset="thesis", epochs=4, memory_target=None, progress_bar=False)
    assert len(res.history) == 2 * 4
    for h in res.history:
        drops = (h["epoch"] >= 2) + (h["epoch"] >= 3)  # LR x 0.1 at 50 % and 75 % of 4 epochs (§6.7)
        assert h["lr"] == pytest.approx(3e-3 * 0.8 ** h["block"] * 0.1 ** drops)  # Table 6.3
        assert h["weight_decay"] == pytest.approx(1e-6 * 1.15 ** h["block"])  # Table 6.3
        assert h["input_dropout"] == pytest.approx(0.8 * 0.95 ** h["epoch"])  # Table 6.3, §6.6.3
    assert seen and all(p == 0.6 for p in seen)  # gradient dropout 0.6 (Table 6.3)
    assert res.head_search == [[], []]  # memory_target=None given explicitly: no search


def test_fit_partitionwise_preset_runs_round_robin_with_checkpoints():
    from gradcond.train.layerwise.dpl import fit_partitionwise

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long()
    dl = DataLoader(TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    parts = [nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())]
    heads = [nn.Linear(8, 2), nn.Linear(8, 2)]
    res = fit_partitionwise(parts, heads, dl, preset="thesis", epochs=2)
    assert res.schedule == "round_robin" and res.extra["epochs_per_round"] == 10
    assert res.extra["checkpoints"] == ["device"]
    res2 = fit_partitionwise(parts, heads, dl, preset="thesis", epochs=2, schedule="concurrent",
                             feature_checkpoint=None)
    assert res2.schedule == "concurrent"


def test_the_docs_show_the_registry_as_it_is():
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "methods" / "efficient-training.md").read_text()
    assert presets.table() in page  # regenerate the table in the page when a preset changes
