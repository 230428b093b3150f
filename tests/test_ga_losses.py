"""Gradient-amplifying output losses (seed 002, ch. 4): autograd gradients equal the closed forms y - t."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradcond.train import fit, get_loss
from gradcond.train.losses import LinearMSE, NegCorrelationLoss, SparseCrossEntropy
from gradcond.utils import TrainingDiverged


def _batch(seed=0, B=7, C=5):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(B, C, generator=g, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, C, (B,), generator=g)
    return x, labels


def _t(labels, C, t0, t1):
    return t0 + (t1 - t0) * torch.nn.functional.one_hot(labels, C).double()


def _closed_forms(x, labels, C):
    """(loss, closed-form dL/dx for reduction='sum') with the default parameters, written out independently."""
    xd = x.detach()
    return {
        "exp": (SparseCrossEntropy(reduction="sum"), 0.1 * torch.exp(xd) - _t(labels, C, 0.0, 1.0)),
        "pow3": (NegCorrelationLoss(reduction="sum"), 1e-3 * xd ** 3 + 0.4 - _t(labels, C, 0.0, 10.0)),
        "linear": (LinearMSE(reduction="sum"), xd - _t(labels, C, -1.0, 1.0)),
    }


@pytest.mark.parametrize("which", ["exp", "pow3", "linear"])
def test_autograd_gradient_equals_closed_form_float64(which):
    x, labels = _batch()
    loss, ref = _closed_forms(x, labels, 5)[which]
    (g,) = torch.autograd.grad(loss(x, labels), x)
    assert g.dtype == torch.float64
    assert (g - ref).abs().max().item() <= 1e-12
    # mean reduction: the same divided by the batch size
    loss.reduction = "mean"
    (gm,) = torch.autograd.grad(loss(x, labels), x)
    assert (gm - ref / 7).abs().max().item() <= 1e-12


def test_non_default_parameters_and_explicit_targets():
    x, labels = _batch(1)
    xd = x.detach()
    for alpha, t0, t1 in ((0.5, 0.0, 16.0), (1.0, 0.0, 2.0)):
        (g,) = torch.autograd.grad(SparseCrossEntropy(alpha, (t0, t1), "sum")(x, labels), x)
        assert (g - (alpha * torch.exp(xd) - _t(labels, 5, t0, t1))).abs().max().item() <= 1e-12
    (g,) = torch.autograd.grad(NegCorrelationLoss(7e-4, 0.0, (-2.0, 10.0), "sum")(x, labels), x)
    assert (g - (7e-4 * xd ** 3 - _t(labels, 5, -2.0, 10.0))).abs().max().item() <= 1e-12
    # a (B, C) float target is used as the target values themselves
    T = torch.rand(7, 5, dtype=torch.float64)
    (g,) = torch.autograd.grad(SparseCrossEntropy(reduction="sum")(x, T), x)
    assert (g - (0.1 * torch.exp(xd) - T)).abs().max().item() <= 1e-12


def test_loss_values_match_source_formulas():
    x, labels = _batch(2)
    xd = x.detach()
    t = _t(labels, 5, 0.0, 1.0)
    y = 0.1 * torch.exp(xd)  # sparse cross-entropy: sum(|y| - t ln y)
    assert SparseCrossEntropy(reduction="sum")(xd, labels).item() == pytest.approx(
        float((y.abs() - t * torch.log(y)).sum()), rel=1e-12)
    t = _t(labels, 5, 0.0, 10.0)
    assert NegCorrelationLoss(reduction="sum")(xd, labels).item() == pytest.approx(
        float((0.25e-3 * xd ** 4 + 0.4 * xd - t * xd).sum()), rel=1e-12)
    t = _t(labels, 5, -1.0, 1.0)
    assert LinearMSE()(xd, labels).item() == pytest.approx(float(((xd - t) ** 2).sum() / 2 / 7), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_ga_overflow_is_a_clear_error(dtype):
    x = torch.tensor([[1.0, 2.0], [3.0, 800.0 if dtype == torch.float64 else 95.0]], dtype=dtype)
    with pytest.raises(TrainingDiverged, match=r"exp-GA overflow: .* use a smaller alpha than 0.1"):
        SparseCrossEntropy()(x, torch.tensor([0, 1]))
    # just below the limit: finite
    lim = math.log(torch.finfo(dtype).max) - math.log(0.1)
    assert torch.isfinite(SparseCrossEntropy()(torch.tensor([[lim - 1.0, 0.0]], dtype=dtype), torch.tensor([0])))


def test_bad_parameters_and_labels():
    for a in (0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="SparseCrossEntropy alpha must be a positive finite number"):
            SparseCrossEntropy(alpha=a)
        with pytest.raises(ValueError, match="NegCorrelationLoss alpha must be a positive finite number"):
            NegCorrelationLoss(alpha=a)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got -1"):
        NegCorrelationLoss(beta=-1)
    with pytest.raises(ValueError, match=r"targets must be a pair \(t_neg, t_pos\)"):
        LinearMSE(targets=(1.0,))
    x, labels = _batch()
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 4\] for 5 logits"):
        SparseCrossEntropy()(x, labels + 5)
    with pytest.raises(ValueError, match="needs hard labels .* got a float64 tensor of shape \\(7,\\)"):
        LinearMSE()(x, labels.double())


def test_losses_by_name_and_training_reports_accuracy():
    assert isinstance(get_loss("exp_ga"), SparseCrossEntropy)
    assert isinstance(get_loss("pow3_ga"), NegCorrelationLoss)
    assert isinstance(get_loss("linear_mse"), LinearMSE)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g)
    y = (X[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True, generator=g)
    for name in ("exp_ga", "pow3_ga", "linear_mse"):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        h = fit(model, loader, loss=name, optimizer="momentum", lr=0.05, epochs=10)
        assert "train_acc" in h.rows[-1] and h.rows[-1]["train_acc"] > 0.8
