"""Closed-form pitfalls of ch. 7 (issue 28 item 5): ReLU layers that are linear or dead on the data, input
standardisation, Sorted PCA on [X | Y], the sign convention of Platonic PCA, float64 solves by default."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from gradcond.closedform import ReLUActivityWarning, fit_platonic
from gradcond.closedform import platonic as P
from gradcond.data import load_dataset


def digits(dtype=torch.float32):
    X, y = load_dataset("digits", dtype=dtype).train.tensors
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0  # pixels in [0, 1]: non-negative inputs
    return X, y


def _fit(X, y, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, rep = fit_platonic(X, y, [96], act="relu", alpha=1.0, beta=1e4, projection="sorted_pca",
                                  solver="ridge", ridge=1.0, return_report=True, **kw)
    return model, rep, [w for w in caught if issubclass(w.category, ReLUActivityWarning)]


def test_sorted_pca_relu_on_digits_in_0_1_warns_always_on_and_standardize_fixes_it():
    X, y = digits()
    _, rep, caught = _fit(X, y)
    # independent check of the claim: x . x_j >= 0 for non-negative pixels, so every pre-activation is >= 0
    W = X[P._sorted_pca_rows(X.double(), 96)]
    pre = X.double() @ W.double().T
    assert bool((pre >= 0).all())
    assert rep.active_fraction[0] == pytest.approx(float((pre > 0).double().mean()), abs=1e-12)
    assert rep.active_fraction[0] >= P.ALWAYS_ON
    assert len(caught) == 1
    assert str(caught[0].message).startswith("hidden layer 1: the ReLU is active on ")
    assert "so the layer is (almost) linear on the data" in str(caught[0].message)
    assert "standardize=True" in str(caught[0].message)
    _, rep_s, caught_s = _fit(X, y, standardize=True)
    assert not caught_s and rep_s.standardized
    assert P.DEAD < rep_s.active_fraction[0] < P.ALWAYS_ON


def test_a_layer_of_units_each_always_on_or_off_warns_and_a_dead_one_too():
    X, y = digits()
    with pytest.warns(ReLUActivityWarning, match=r"units always on or never on, so the layer is \(almost\) linear"):
        # inputs far from the origin: each random unit's sign is fixed by its weights, whatever the sample
        fit_platonic(X + 100.0, y, [32], act="relu", first_layer="random_w",
                     generator=torch.Generator().manual_seed(0))
    with pytest.warns(ReLUActivityWarning, match=r"active on only 0\.0 % .* \(almost\) dead on the data"):
        frac, fixed = P._relu_activity(nn.ReLU(), 2, torch.zeros(10, 4))
    assert frac == 0.0 and fixed == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other activations are not measured and never warn
        assert all(math.isnan(v) for v in P._relu_activity(nn.Tanh(), 1, torch.zeros(3, 2)))


def test_standardize_equals_a_fit_on_standardised_inputs_and_takes_raw_inputs():
    X, y = digits(torch.float64)
    mu, sd = X.mean(0, keepdim=True), X.std(0, keepdim=True, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    kw = dict(act="tanh", alpha=1.0, beta=10.0, generator=None)
    ref = fit_platonic((X - mu) / sd, y, [40], **{**kw, "generator": torch.Generator().manual_seed(0)})
    got, rep = fit_platonic(X, y, [40], standardize=True, return_report=True,
                            **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert [type(m) for m in got] == [nn.Linear, nn.Tanh, nn.Linear]  # still a plain MLP
    with torch.no_grad():
        torch.testing.assert_close(got(X), ref((X - mu) / sd), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(rep.predictions, got(X))
    assert rep.cast_error <= 1e-6


def test_float32_inputs_are_solved_in_float64_unless_asked_otherwise():
    X, y = digits(torch.float32)
    kw = dict(act="tanh", alpha=1.0, beta=10.0)
    m, rep = fit_platonic(X, y, [32], return_report=True, generator=torch.Generator().manual_seed(1), **kw)
    assert rep.dtype == "float64" and rep.model_dtype == "float32" and m[0].weight.dtype == torch.float32
    m64 = fit_platonic(X.double(), y, [32], generator=torch.Generator().manual_seed(1), **kw)
    for a, b in zip(m.parameters(), m64.parameters()):  # the same float64 fit, rounded to float32
        assert torch.equal(a, b.float())
    assert 0 < rep.cast_error <= 1e-3
    _, rep32 = fit_platonic(X, y, [32], dtype=torch.float32, return_report=True,
                            generator=torch.Generator().manual_seed(1), **kw)
    assert rep32.dtype == "float32" and rep32.cast_error == 0.0
    with pytest.raises(ValueError, match=r"^model_dtype must be None, torch.float32 or torch.float64, got "):
        fit_platonic(X, y, [4], model_dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^standardize must be True or False, got 'yes'\.$"):
        fit_platonic(X, y, [4], standardize="yes")


def test_sorted_pca_on_x_and_y_picks_samples_along_the_first_component_of_the_augmented_data():
    X, y = digits(torch.float64)
    Y = nn.functional.one_hot(y, 10).double()
    model = fit_platonic(X, y, [20], act="tanh", first_layer="sorted_pca_xy", alpha=1.0, beta=10.0)
    A = torch.cat([X, Y], 1)
    _, _, Vh = torch.linalg.svd(A - A.mean(0), full_matrices=False)
    order = torch.argsort(A @ Vh[0], stable=True)
    idx = order[(torch.arange(20, dtype=torch.float64) * (len(X) / 20)).round().long()]
    rows = {tuple(r.tolist()) for r in X[idx]}
    assert {tuple(w.tolist()) for w in model[0].weight} == rows
    plain = fit_platonic(X, y, [20], act="tanh", first_layer="sorted_pca", alpha=1.0, beta=10.0)
    assert not torch.equal(plain[0].weight, model[0].weight)


def test_platonic_pca_sign_convention_is_fixed_and_matters_under_relu(monkeypatch):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 6, generator=g, dtype=torch.float64)
    Pa, Pb = P._platonic_pca(A, 4, 6, 1), P._platonic_pca(-A, 4, 6, 1)
    torch.testing.assert_close(Pa, Pb)  # the SVD's arbitrary signs are fixed: A and -A give the same directions
    cols = torch.arange(4)
    assert bool((Pa[Pa.abs().argmax(0), cols] > 0).all())  # largest-magnitude entry positive
    X, y = digits(torch.float64)
    kw = dict(projection="platonic_pca", first_layer="random", alpha=1.0, beta=10.0,
              generator=torch.Generator().manual_seed(0))
    base = fit_platonic(X, y, [24, 12], act="relu", **kw)
    orig = P._platonic_pca
    monkeypatch.setattr(P, "_platonic_pca", lambda *a: -orig(*a))  # the opposite convention
    flipped = fit_platonic(X, y, [24, 12], act="relu", **{**kw, "generator": torch.Generator().manual_seed(0)})
    with torch.no_grad():
        assert not torch.allclose(base(X), flipped(X), atol=1e-6)  # another network under ReLU
