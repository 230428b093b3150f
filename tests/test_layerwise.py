"""Layer-wise training (seed 002 ch. 6): blocks, heads, gradient dropout, memory accounting, DLL, DSL, random robin."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradcond import zoo
from gradcond.train.layerwise import (GradientDropout, LayerwiseResult, MemoryReport, build_head, fit_layerwise,
                                      gradient_dropout, head_configs, input_dropout_p, make_head, memory_accounting,
                                      split_blocks)


def _data(n=240, classes=3, shape=(1, 6, 6), seed=0, dtype=torch.float32):
    """A learnable toy problem: the class decides which image quadrant is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.3 * torch.randn((n,) + shape, generator=g, dtype=dtype)
    for c in range(classes):
        x[y == c, :, (c % 2) * 3:(c % 2) * 3 + 3, (c // 2) * 3:(c // 2) * 3 + 3] += 2.0
    return x, y


def _loaders(shuffle=True, dtype=torch.float32, flat=False):
    x, y = _data(dtype=dtype)
    xt, yt = _data(n=60, seed=1, dtype=dtype)
    if flat:
        x, xt = x.flatten(1), xt.flatten(1)
    tr = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
    return tr, DataLoader(TensorDataset(xt, yt), batch_size=64)


def _cnn(dtype=torch.float32):
    torch.manual_seed(0)
    return zoo.simple_cnn(in_channels=1, num_classes=3, channels=(4, 6), image_size=6).to(dtype)


# ----------------------------------------------------------------------------------------------- blocks


def test_split_blocks_folds_parameter_free_and_norm_layers_into_the_preceding_block():
    model = zoo.vgg(cfg=(4, "M", 8), batch_norm=True)
    blocks = split_blocks(model)
    kinds = [[type(m).__name__ for m in b] for b in blocks]
    assert kinds == [["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"],
                     ["Conv2d", "BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Flatten"], ["Linear"]]
    assert blocks[0][0] is model[0]  # shares the model's modules
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    assert torch.equal(nn.Sequential(*blocks)(x), model(x))


def test_split_blocks_leading_parameter_free_layers_join_the_first_block_and_lists_pass_through():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert [[type(m).__name__ for m in b] for b in split_blocks(model)] == [["Flatten", "Linear", "ReLU"], ["Linear"]]
    given = [nn.Linear(2, 2), nn.Linear(2, 2)]
    assert split_blocks(given) == given


def test_unsplittable_model_without_blocks_is_refused_with_what_to_pass():
    model = zoo.transformer(in_features=4, seq_len=3, d_model=8, nhead=2, num_layers=1, dim_ff=8, num_classes=2)
    with pytest.raises(ValueError) as err:
        fit_layerwise(model, *_loaders())
    assert str(err.value) == (
        "cannot split a SequenceClassifier into blocks: only an nn.Sequential is split automatically (its forward "
        "chains its children); pass the blocks as a list of modules instead, e.g. "
        "fit_layerwise([stem, block1, block2, classifier], ...).")
    with pytest.raises(ValueError, match="has no layer with a weight matrix"):
        split_blocks(nn.Sequential(nn.ReLU(), nn.Flatten()))


# ----------------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_memory_accounting_matches_a_hand_count_on_a_two_layer_model(dtype):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    x, y = torch.randn(5, 4, dtype=dtype), torch.randint(0, 3, (5,))
    s = torch.finfo(dtype).bits // 8
    n_params = 4 * 8 + 8 + 8 * 3 + 3
    # Saved for backward: the input x (the first Linear needs it for its weight gradient; x needs no gradient, so
    # its weight is not saved), the ReLU output (saved by ReLU and, the same storage, by the second Linear, whose
    # saved weight is a parameter and not counted), the log-softmax output (5 x 3), the int64 targets (5 x 8 bytes)
    # and nll_loss's scalar total weight.
    activations = 5 * 4 * s + 5 * 8 * s + 5 * 3 * s + 5 * 8 + s
    report = memory_accounting(model, (x, y), optimizer="adamw")
    assert report == MemoryReport(parameters=n_params * s, gradients=n_params * s, optimizer_state=2 * n_params * s,
                                  activations=activations, method="saved-tensors")
    assert report.total == 4 * n_params * s + activations
    assert memory_accounting(model, (x, y), optimizer="sgd").optimizer_state == 0
    assert memory_accounting(model, (x, y), optimizer="momentum").optimizer_state == n_params * s


def test_memory_accounting_counts_a_frozen_feednet_without_its_activations_and_touches_nothing():
    feed = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
    top = nn.Sequential(nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def state():
        return {**feed.state_dict(), **{"top." + k: v for k, v in top.state_dict().items()}}

    before = {k: v.clone() for k, v in state().items()}
    report = memory_accounting(top, (x, y), frozen=feed, optimizer="sgd")
    s = 4
    feed_params = (4 * 6 + 6 + 6 + 6) * s
    top_params = (6 * 3 + 3) * s
    assert report.parameters == feed_params + top_params and report.gradients == top_params
    # only the feednet's output z (5 x 6, the input of the trained Linear) and the loss's tensors are saved
    assert report.activations == 5 * 6 * s + 5 * 3 * s + 5 * 8 + s
    after = state()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm buffers untouched
    assert all(p.grad is None for p in list(feed.parameters()) + list(top.parameters()))


# ----------------------------------------------------------------------------------------------- heads, dropout


def test_gradient_dropout_is_identity_forward_and_drops_the_gradient_backward():
    x = torch.randn(4000, requires_grad=True)
    g = torch.randn(4000)
    out = gradient_dropout(x, 0.6, rescale=True)
    assert torch.equal(out, x)
    (out * g).sum().backward()
    kept = x.grad != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.04
    assert torch.allclose(x.grad[kept], g[kept] / 0.4)
    x.grad = None
    (GradientDropout.apply(x, 0.3, False) * g).sum().backward()
    kept = x.grad != 0
    assert torch.equal(x.grad[kept], g[kept]) and abs(kept.float().mean().item() - 0.7) < 0.04
    x.grad = None
    (gradient_dropout(x, 0.0) * g).sum().backward()
    assert torch.equal(x.grad, g)
    with pytest.raises(ValueError, match=r"gradient dropout probability must be in \[0, 1\], got 1.5"):
        gradient_dropout(x, 1.5)


def test_input_dropout_schedule_is_p0_times_decay_to_the_epoch():
    assert input_dropout_p(0) == 0.8
    assert input_dropout_p(3) == pytest.approx(0.8 * 0.95 ** 3)
    assert input_dropout_p(2, p0=0.5, decay=0.5) == pytest.approx(0.125)


def test_build_head_shapes_and_configurations():
    assert head_configs((8, 8, 8), 2) == [{"convs": 2, "pool": False}, {"convs": 1, "pool": False},
                                          {"convs": 0, "pool": False}, {"convs": 0, "pool": True}]
    assert head_configs((8, 2, 2), 4)[0] == {"convs": 1, "pool": False}  # 2x2 can be halved once only
    head = build_head((8, 8, 8), 5, max_decision_convs=2)
    assert [type(m).__name__ for m in head] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten", "Linear"]
    assert head(torch.randn(3, 8, 8, 8)).shape == (3, 5)
    flat = build_head((12,), 4, dtype=torch.float64)
    assert [type(m).__name__ for m in flat] == ["Flatten", "Linear"] and flat[1].weight.dtype == torch.float64


def test_build_head_with_a_budget_takes_the_richest_that_fits_and_refuses_an_impossible_budget():
    shape = (4, 4, 4)
    reports = {}
    for cfg in head_configs(shape, 2):
        head = make_head(shape, 3, cfg)
        reports[str(cfg)] = memory_accounting(head, (torch.zeros(8, *shape), torch.zeros(8, dtype=torch.long))).total
    order = [str(c) for c in head_configs(shape, 2)]
    # a budget just enough for the second configuration (when the first needs more) picks a fitting head
    budget = sorted(reports.values())[1]
    head = build_head(shape, 3, max_decision_convs=2, memory_budget=budget, batch_size=8)
    chosen = next(o for o in order if reports[o] <= budget)
    assert str({"convs": sum(isinstance(m, nn.Conv2d) for m in head),
                "pool": any(isinstance(m, nn.AdaptiveAvgPool2d) for m in head)}) == chosen
    cheapest = min(reports.values())
    with pytest.raises(ValueError) as err:
        build_head(shape, 3, max_decision_convs=2, memory_budget=10, batch_size=8)
    assert str(err.value) == (
        f"no decision head meets the memory budget: the cheapest (global average pool + Linear) needs {cheapest} "
        "bytes per training step but the budget is 10 bytes; raise memory_budget or lower the batch size.")


def test_a_memory_budget_no_head_can_meet_is_one_clear_error_and_leaves_the_model_unchanged():
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        fit_layerwise(model, *_loaders(), memory_budget=0.01, epochs=1, progress_bar=False)
    msg = str(err.value)
    m = re.fullmatch(r"no decision head meets the memory budget: the cheapest \(global average pool \+ Linear\) needs "
                     r"(\d+) bytes = ([\d.]+)% of full backprop's peak \((\d+) bytes\) to train block 0, but "
                     r"memory_budget=0.01 allows (\d+) bytes; raise memory_budget \(a fraction of full-backprop peak "
                     r"memory in \(0, 1\]\) or lower the batch size.", msg)
    assert m, msg
    need, pct, full, allowed = int(m[1]), float(m[2]), int(m[3]), int(m[4])
    x, y = next(iter(_loaders()[0]))
    assert full == memory_accounting(model, (x, y)).total  # full backprop of the whole model on a training batch
    assert allowed == int(0.01 * full) and need > allowed and pct == pytest.approx(100 * need / full, abs=0.05)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------- fit_layerwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dll_result_is_consistent_and_leaves_the_model_unchanged(dtype):
    model = _cnn(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr, te = _loaders(dtype=dtype)
    res = fit_layerwise(model, tr, te, epochs=[6, 4], lr=3e-2, input_dropout=0.1, progress_bar=False)
    assert isinstance(res, LayerwiseResult) and res.method == "dll"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(res.test_accuracy) == 2 and res.val_accuracy is None and res.epochs_run == [6, 4]
    assert res.best_depth == 1 + max(range(2), key=lambda i: (res.test_accuracy[i], -i))
    # the returned model is a plain Sequential (blocks + head) whose accuracy is the recorded one
    assert isinstance(res.model, nn.Sequential) and next(res.model.parameters()).dtype == dtype
    xt, yt = te.dataset.tensors
    with torch.no_grad():
        acc = (res.model.eval()(xt).argmax(1) == yt).float().mean().item()
    assert acc == pytest.approx(res.best_test_accuracy)
    assert res.best_test_accuracy > 0.6  # learnable toy problem: well above chance (1/3)
    # memory: each step's accounting is below full backprop's, and the ratio is their quotient
    assert res.memory_ratio == max(m.total for m in res.memory) / res.backprop_memory.total < 1
    assert [r["block"] for r in res.history] == [0] * 6 + [1] * 4
    lr0 = [r["lr"] for r in res.history if r["epoch"] == 0]
    assert lr0 == pytest.approx([3e-2, 3e-2 * 0.8])
    assert [r["input_dropout"] for r in res.history[:3]] == pytest.approx([0.1, 0.095, 0.1 * 0.95 ** 2])
    assert "best depth" in res.summary()


def test_dll_never_changes_a_frozen_block_and_runs_the_feednet_without_autograd():
    calls = []
    tr, te = _loaders(shuffle=False)
    full = _cnn()
    full[0].register_forward_hook(lambda m, i, o: calls.append((torch.is_grad_enabled(), m.training)))
    two = fit_layerwise(full, tr, te, epochs=[2, 2], input_dropout=0.0, progress_bar=False, num_classes=3)
    # every call of block 0 in eval mode (as feednet or under evaluation) ran without autograd
    assert any(not training for _, training in calls)
    assert all(not grad for grad, training in calls if not training)
    # the same first block trained alone (same seed, same data): training block 1 afterwards left it unchanged
    blocks = split_blocks(_cnn())
    one = fit_layerwise([blocks[0], nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 3))], tr, te, epochs=[2],
                        input_dropout=0.0, progress_bar=False, num_classes=3)
    for a, b in zip(two.blocks[0].parameters(), one.blocks[0].parameters()):
        assert torch.equal(a, b)
    assert two.test_accuracy[0] == one.test_accuracy[0]


def test_dsl_with_window_one_is_dll_and_wider_windows_train_more_blocks():
    tr, te = _loaders(shuffle=False)
    kw = dict(epochs=2, input_dropout=0.2, progress_bar=False)
    dll = fit_layerwise(_cnn(), tr, te, method="dll", **kw)
    dsl1 = fit_layerwise(_cnn(), tr, te, method="dsl", window=1, **kw)
    assert dsl1.test_accuracy == dll.test_accuracy
    for a, b in zip(dsl1.model.parameters(), dll.model.parameters()):
        assert torch.equal(a, b)
    dsl2 = fit_layerwise(_cnn(), tr, te, method="dsl", window=2, **kw)
    # the second window trains blocks 0 and 1 together: block 0 changes, and it needs more memory than DLL's step
    assert not torch.equal(dsl2.blocks[0][0].weight, dll.blocks[0][0].weight)
    assert dsl2.memory[1].total > dll.memory[1].total


def test_random_robin_visits_every_block_each_round_in_shuffled_orders():
    tr, te = _loaders()
    res = fit_layerwise(_cnn(), tr, te, method="random_robin", rounds=4, epochs_per_round=2, input_dropout=0.0,
                        progress_bar=False)
    rounds = {}
    for r in res.history:
        rounds.setdefault(r["round"], []).append(r["block"])
    assert sorted(rounds) == [0, 1, 2, 3]
    assert all(sorted(v) == [0, 0, 1, 1] for v in rounds.values())
    assert res.epochs_run == [8, 8]
    # epoch counters run on per block across rounds: one training state per block
    assert [r["epoch"] for r in res.history if r["block"] == 0] == list(range(8))
    # every block's optimizer state and head stay resident: each step holds more than the DLL step alone
    dll = fit_layerwise(_cnn(), tr, te, method="dll", epochs=1, progress_bar=False)
    assert all(a.optimizer_state > b.optimizer_state for a, b in zip(res.memory, dll.memory))


def test_plain_round_robin_visits_the_blocks_bottom_up_every_round():
    tr, te = _loaders()
    res = fit_layerwise(_cnn(), tr, te, method="round_robin", rounds=3, epochs_per_round=1, input_dropout=0.0,
                        progress_bar=False)
    assert [(r["round"], r["block"]) for r in res.history] == [(r, b) for r in range(3) for b in range(2)]
    assert res.epochs_run == [3, 3]


@pytest.mark.parametrize("where", ["ram", "disk"])
def test_feature_checkpoints_replay_the_same_batches_as_the_feednet(where, tmp_path):
    tr, te = _loaders(shuffle=False)
    model = zoo.mlp(in_features=36, out_features=3, depth=4, width=16, seed=0)
    kw = dict(epochs=2, input_dropout=0.2, progress_bar=False)
    plain = fit_layerwise(model, *_loaders(shuffle=False, flat=True), **kw)
    cached = fit_layerwise(model, *_loaders(shuffle=False, flat=True), feature_checkpoint=where,
                           checkpoint_dir=tmp_path if where == "disk" else None, **kw)
    assert cached.test_accuracy == plain.test_accuracy
    for a, b in zip(cached.model.parameters(), plain.model.parameters()):
        assert torch.equal(a, b)


def test_early_stopping_restores_the_best_epoch_of_each_block():
    tr, te = _loaders()
    res = fit_layerwise(_cnn(), tr, te, val_loader=te, epochs=8, patience=1, lr=5e-2, input_dropout=0.0,
                        progress_bar=False)
    for i in range(2):
        vals = [r["val_acc"] for r in res.history if r["block"] == i]
        assert res.epochs_run[i] == len(vals) <= 8
        assert res.val_accuracy[i] == max(vals)
    assert res.accuracy is res.val_accuracy


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "backprop"}, "unknown layer-wise method 'backprop'; accepted: dll, dsl, random_robin, round_robin."),
    ({"memory_budget": 1.5}, "memory_budget must be a fraction of full-backprop peak memory in (0, 1], got 1.5."),
    ({"epochs": [1, 2, 3]}, "epochs lists 3 values but there are 2 blocks to train; give one per block or a single "
                            "integer."),
    ({"method": "random_robin", "feature_checkpoint": "ram"},
     "feature checkpoints need frozen lower blocks, but random robin keeps training every block; use "
     "feature_checkpoint=None with method='random_robin'."),
    ({"input_dropout": 1.0}, "input_dropout must be a number in [0, 1), got 1.0."),
])
def test_bad_arguments_are_one_clear_sentence(kwargs, message):
    with pytest.raises(ValueError) as err:
        fit_layerwise(_cnn(), *_loaders(), progress_bar=False, **kwargs)
    assert str(err.value) == message
