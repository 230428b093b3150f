"""Representation diagnostics (seed 002 ch. 5) against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradcond.probes.representation import least_squares_distance


def _lsd_numpy(Z, Y):
    sol, *_ = np.linalg.lstsq(Z, Y, rcond=None)
    return float(((Y - Z @ sol) ** 2).sum() / Z.shape[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(50, 8), (8, 50), (40, 40)])
def test_lsd_matches_numpy_lstsq(dtype, shape):
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(*shape, generator=g, dtype=torch.float64)
    Y = torch.randn(shape[0], 3, generator=g, dtype=torch.float64)
    ref = _lsd_numpy(Z.numpy(), Y.numpy())
    got = least_squares_distance(Z.to(dtype), Y.to(dtype))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert abs(got - ref) <= tol * max(1.0, ref)


def test_lsd_rank_deficient_and_labels():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(60, 3, generator=g, dtype=torch.float64)
    Z = torch.cat([base, base @ torch.randn(3, 4, generator=g, dtype=torch.float64)], 1)  # rank 3 of 7 columns
    labels = torch.randint(0, 4, (60,), generator=g)
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    ref = _lsd_numpy(Z.numpy(), onehot.numpy())
    assert least_squares_distance(Z, labels) == pytest.approx(ref, rel=1e-10)
    # bias column: the same as appending ones by hand
    Zb = torch.cat([Z, torch.ones(60, 1, dtype=torch.float64)], 1)
    assert least_squares_distance(Z, onehot, bias=True) == pytest.approx(_lsd_numpy(Zb.numpy(), onehot.numpy()),
                                                                       rel=1e-10)
    # Y in the span of Z: distance 0
    assert least_squares_distance(Z, Z[:, :2]) < 1e-20


def test_lsd_bad_input():
    Z = torch.randn(10, 3)
    with pytest.raises(ValueError, match="targets have 9 rows but the features have 10"):
        least_squares_distance(Z, torch.randn(9, 2))
    with pytest.raises(ValueError, match="non-finite"):
        least_squares_distance(Z.masked_fill(Z > 0, float("nan")), torch.randn(10, 2))


# ------------------------------------------------------------------------------------------- k-NN / k-redundancy
from gradcond.probes.representation import (error_gradient_rms, k_redundancy, knn_indices, redundant_mask,  # noqa: E402
                                            selection_entropy, stable_rank, weight_entropy)


def _knn_naive(X, k):
    """k nearest other rows by (squared distance, index), by a plain loop in float64."""
    X = np.asarray(X, dtype=np.float64)
    out = []
    for i in range(len(X)):
        d = ((X - X[i]) ** 2).sum(1)
        j = np.arange(len(X))
        keep = j != i
        order = np.lexsort((j[keep], d[keep]))  # primary key distance, then index
        out.append(j[keep][order][:k])
    return np.array(out)


def _redundancy_naive(X, y, k):
    nn = _knn_naive(X, k)
    return float(np.mean([(y[nn[i]] == y[i]).all() for i in range(len(X))]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_knn_with_ties_matches_naive_loop(dtype, chunk):
    # integer coordinates on a 3x3x2 grid: many exact duplicates and equal distances, so ties decide the result
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, 3, (70, 3), generator=g)
    X[:, 2] %= 2
    y = torch.randint(0, 3, (70,), generator=g)
    for k in (1, 4, 9):
        ref = _knn_naive(X.numpy(), k)
        got = knn_indices(X.to(dtype), k, chunk_size=chunk).numpy()
        np.testing.assert_array_equal(got, ref)
    k = 4
    ref = _redundancy_naive(X.numpy(), y.numpy(), k)
    assert k_redundancy(X.to(dtype), y, k, chunk_size=chunk) == pytest.approx(ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k_redundancy_random_matches_naive(dtype):
    g = torch.Generator().manual_seed(4)
    X = torch.randn(150, 5, generator=g, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()  # clustered labels: redundancy strictly inside (0, 1)
    for k in (1, 5, 10):
        ref = _redundancy_naive(X.numpy(), y.numpy(), k)
        assert 0 < ref < 1
        assert k_redundancy(X.to(dtype), y, k, chunk_size=32) == pytest.approx(ref)
    mask = redundant_mask(X, y, 5)
    assert mask.dtype == torch.bool and mask.shape == (150,)


def test_k_redundancy_duplicates_and_ties_by_index():
    # class 1 sits at 20, 22, 24; a class-0 sample is an exact duplicate of the one at 20
    X = torch.tensor([[0.0], [1.0], [2.0], [3.0], [20.0], [22.0], [24.0], [20.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 0])
    mask = redundant_mask(X, y, 2)
    # row 4: the duplicate (row 7, class 0) is at distance 0 -> not redundant; row 7 likewise.
    # row 5 (22): rows 4, 6, 7 all at distance 2 -> the two lowest indices, 4 and 6 (class 1) -> redundant
    assert mask.tolist() == [True, True, True, True, False, True, True, False]
    assert knn_indices(X, 2)[5].tolist() == [4, 6]


def test_k_redundancy_bad_input():
    X = torch.randn(20, 3)
    y = torch.arange(20) % 2
    with pytest.raises(ValueError, match=r"k smaller than the number of samples: k = 20 but there are 20 samples"):
        k_redundancy(X, y, 20)
    with pytest.raises(ValueError, match=r"class 2 has 2 samples, fewer than k \+ 1 = 4"):
        k_redundancy(X, torch.cat([torch.zeros(9), torch.ones(9), torch.full((2,), 2)]).long(), 3)
    with pytest.raises(ValueError, match=r"needs hard labels \(a 1-D integer tensor of class indices\), got a 20x2"):
        k_redundancy(X, torch.nn.functional.one_hot(y, 2), 3)
    with pytest.raises(ValueError, match=r"needs hard labels .* got a 20 float32"):
        k_redundancy(X, y.float(), 3)
    with pytest.raises(ValueError, match="all 20 samples have label 0"):
        k_redundancy(X, torch.zeros(20, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="k a positive integer, got 0"):
        k_redundancy(X, y, 0)
    with pytest.raises(ValueError, match="labels have 19 entries but the features have 20 rows"):
        k_redundancy(X, y[:19], 3)
    with pytest.raises(ValueError, match="non-finite features"):
        k_redundancy(X.masked_fill(X > 1, float("inf")), y, 3)
    with pytest.raises(ValueError, match=r"knn_indices needs an integer k with 1 <= k < number of rows \(20\), got 20"):
        knn_indices(X, 20)


# ---------------------------------------------------------------------------------------------------- selection entropy
def test_selection_entropy_against_counts():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(200, 6, generator=g, dtype=torch.float64)
    A[:, 5] = -1.0  # a feature that selects nothing
    y = torch.randint(0, 4, (200,), generator=g)
    res = selection_entropy(A, y, "relu")
    for f in range(5):
        sel = y[A[:, f] > 0].numpy()
        p = np.bincount(sel, minlength=4) / len(sel)
        p = p[p > 0]
        assert res.per_feature[f].item() == pytest.approx(float(-(p * np.log2(p)).sum()), abs=1e-12)
        assert res.selected_fraction[f].item() == pytest.approx(len(sel) / 200)
    assert np.isnan(res.per_feature[5].item())
    assert res.mean == pytest.approx(float(res.per_feature[:5].mean()))
    # a feature that selects exactly one class has entropy 0; tanh selects |a| < 2
    B = torch.where(y[:, None] == 1, torch.ones(200, 1), -torch.ones(200, 1)).double()
    assert selection_entropy(B, y, "relu").per_feature[0].item() == 0.0
    C = torch.where(y[:, None] == 2, torch.zeros(200, 1), torch.full((200, 1), 5.0)).double()
    assert selection_entropy(C, y, "tanh").per_feature[0].item() == 0.0
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        selection_entropy(A, y, "gelu")
    with pytest.raises(ValueError, match="hard labels"):
        selection_entropy(A, torch.nn.functional.one_hot(y, 4), "relu")


# ---------------------------------------------------------------------------------------------------- weights, deltas
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_rank_and_weight_entropy(dtype):
    g = torch.Generator().manual_seed(6)
    W = torch.randn(30, 12, generator=g, dtype=torch.float64)
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    assert stable_rank(W.to(dtype)) == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-5)
    assert stable_rank(torch.ones(5, 4, dtype=dtype)) == pytest.approx(1.0, rel=1e-6)  # rank one
    assert stable_rank(torch.eye(7, dtype=dtype)) == pytest.approx(7.0, rel=1e-6)
    with pytest.raises(ValueError, match="zero matrix"):
        stable_rank(torch.zeros(3, 3, dtype=dtype))
    # histogram entropy: a uniform spread over 16 equal bins is 4 bits; constant weights 0 bits
    w = torch.arange(16, dtype=dtype) + 0.5
    assert weight_entropy(w, bits=4) == pytest.approx(4.0)
    assert weight_entropy(torch.full((10,), 0.3, dtype=dtype)) == 0.0
    v = W.flatten().numpy()
    idx = np.minimum(np.floor((v - v.min()) / (v.max() - v.min()) * 16), 15).astype(int)
    p = np.bincount(idx, minlength=16) / len(v)
    p = p[p > 0]
    assert weight_entropy(W) == pytest.approx(float(-(p * np.log2(p)).sum()))


def test_error_gradient_rms_matches_manual_and_restores_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = error_gradient_rms(model, x, y, torch.nn.functional.cross_entropy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # independent: the output layer's delta for mean cross-entropy is (softmax - onehot) / B
    with torch.no_grad():
        h = model[2](model[1](model[0](x)))
        out = model[3](h)
    delta = (out.softmax(1) - torch.nn.functional.one_hot(y, 3)) / 16
    assert got["3"] == pytest.approx(float(delta.pow(2).mean().sqrt()), rel=1e-12)
    assert set(got) == {"0", "3"} and got["0"] > 0
    with pytest.raises(ValueError, match="no module named 'nope'"):
        error_gradient_rms(model, x, y, torch.nn.functional.cross_entropy, layers=["nope"])


def test_monitor_representation_probe_rows():
    from gradcond.monitor.schedule import PROBES

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = {(layer, name): v for layer, name, v in PROBES["representation"](model, None, (x, y))}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert rows[("0", "stable_rank")] == pytest.approx(stable_rank(model[0].weight))
    assert rows[("3", "stable_rank")] == pytest.approx(stable_rank(model[3].weight))
    model.eval()
    with torch.no_grad():
        z0 = model[0](x).double()
        out = model(x).double()
    Y = torch.nn.functional.one_hot(y, 3).double().numpy()
    ones = np.ones((40, 1))
    assert rows[("0", "lsd")] == pytest.approx(_lsd_numpy(np.hstack([z0.numpy(), ones]), Y), rel=1e-8)
    assert rows[("3", "lsd")] == pytest.approx(_lsd_numpy(np.hstack([out.numpy(), ones]), Y), rel=1e-8)
