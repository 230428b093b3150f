"""Pure Voronoi maps and pure entropy (seed 002, Defs. 5-7; issue 28 item 1): :func:`gradcond.probes.pure_entropy`.

The reference is a plain enumeration of every subset of samples (Def. 6 read literally: a sample goes to every
centroid at its minimal distance, so a tie between two labels is impure), written here independently of the
module's branch and bound.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gradcond.probes import PureEntropy, pure_entropy
from gradcond.probes.voronoi import voronoi_cells


def brute_force(X: torch.Tensor, y: torch.Tensor):
    """``(fewest cells, lowest entropy in bits among maps with that many, one optimal centroid tuple)``."""
    n = len(y)
    D = torch.cdist(X.double(), X.double(), compute_mode="donot_use_mm_for_euclid_dist")
    for k in range(1, n + 1):
        best = None
        for S in itertools.combinations(range(n), k):
            sub = D[:, list(S)]
            dmin = sub.min(1, keepdim=True).values
            at_min = sub == dmin
            labs = y[list(S)]
            if (at_min & (labs[None, :] != y[:, None])).any():
                continue  # some sample's nearest centroid (or a tied one) has another label
            cell = sub.argmin(1)  # ties between same-label centroids: the first (smaller sample index)
            sizes = torch.bincount(cell, minlength=k).double()
            p = sizes[sizes > 0] / n
            h = float(-(p * torch.log2(p)).sum())
            if best is None or h < best[1] - 1e-12:
                best = (k, h, S)
        if best is not None:
            return best
    raise AssertionError("no pure map")


def _random_set(g, n, classes, grid=None):
    X = torch.rand(n, 2, generator=g, dtype=torch.float64)
    if grid:
        X = (X * grid).round() / grid  # many exact ties (integer-valued coordinates up to scale)
    y = torch.randint(0, classes, (n,), generator=g)
    # no two coinciding samples with different labels (no pure map would exist)
    keep = []
    for i in range(n):
        if not any(torch.equal(X[i], X[j]) and y[i] != y[j] for j in keep):
            keep.append(i)
    return X[keep], y[keep]


@pytest.mark.parametrize("case", range(40))
def test_equals_the_brute_force_optimum_on_tiny_2d_sets(case):
    g = torch.Generator().manual_seed(1000 + case)
    n = 5 + case % 7  # 5..11 samples
    X, y = _random_set(g, n, 2 + case % 2, grid=4 if case % 4 == 0 else None)
    k, h, _ = brute_force(X, y)
    res = pure_entropy(X, y)  # the default (auto) method
    assert isinstance(res, PureEntropy) and res.exact and res.method == "exact"
    assert res.num_cells == k
    assert res.entropy == pytest.approx(h, abs=1e-12)
    assert res.lower_bound_cells == k and res.lower_bound_entropy == pytest.approx(h, abs=1e-12)
    # the map returned is the pure map it claims: cells, sizes and entropy agree with an independent check
    a, pure = voronoi_cells(X, y, res.centroids)
    assert pure and torch.equal(a, res.assignment)
    assert torch.equal(torch.bincount(res.assignment, minlength=k), res.cell_sizes)
    assert torch.equal(res.centroid_labels, y[res.centroids])


def test_heuristic_gives_a_pure_map_no_better_than_the_optimum():
    g = torch.Generator().manual_seed(7)
    for _ in range(12):
        X, y = _random_set(g, 10, 3)
        k, h, _ = brute_force(X, y)
        res = pure_entropy(X, y, method="heuristic")
        assert not res.exact and res.method == "heuristic"
        _, pure = voronoi_cells(X, y, res.centroids)
        assert pure
        assert res.num_cells >= k
        if res.num_cells == k:
            assert res.entropy >= h - 1e-12
        # the bounds it reports hold for the true optimum
        assert res.lower_bound_cells <= k
        assert res.lower_bound_entropy <= h + 1e-12


def test_entropy_is_at_least_the_label_entropy_and_one_cell_per_class_reaches_it():
    """Two well-separated clusters, one per class: the optimum is one cell per class and H* = H(Y)."""
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(30, 5, generator=g) * 0.05, torch.randn(20, 5, generator=g) * 0.05 + 3.0])
    y = torch.tensor([0] * 30 + [1] * 20)
    h_y = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    for method in ("exact", "heuristic"):
        res = pure_entropy(X, y, method=method)
        assert res.num_cells == 2
        assert res.entropy == pytest.approx(h_y, abs=1e-12)
        assert res.label_entropy == pytest.approx(h_y, abs=1e-12)
        assert res.cells_gap == 0 and res.entropy_gap == pytest.approx(0.0, abs=1e-12)


def test_out_of_budget_auto_falls_back_with_a_proven_lower_bound():
    """A set whose optimum needs many nodes: with a tiny budget the auto method returns the heuristic's map and a
    lower bound that the full search confirms."""
    g = torch.Generator().manual_seed(3)
    X = torch.rand(60, 2, generator=g, dtype=torch.float64)
    y = (X[:, 1] > 0.5 + 0.25 * torch.sin(2 * math.pi * 2 * X[:, 0])).long()
    full = pure_entropy(X, y, method="exact", max_nodes=2_000_000)
    assert full.exact
    small = pure_entropy(X, y, max_nodes=50)
    assert not small.exact and small.method == "heuristic"
    assert 2 <= small.lower_bound_cells <= full.num_cells <= small.num_cells
    with pytest.raises(ValueError, match=r"^the exact search ran out of its 50 nodes \(it proved at least \d+ cells "
                                         r"are needed\); raise max_nodes or use method='heuristic'\.$"):
        pure_entropy(X, y, method="exact", max_nodes=50)


def test_layer_features_are_flattened_and_sample_order_does_not_matter():
    g = torch.Generator().manual_seed(5)
    F = torch.randn(9, 2, 2, 1, generator=g)
    y = torch.randint(0, 2, (9,), generator=g)
    a = pure_entropy(F, y)
    b = pure_entropy(F.flatten(1), y)
    assert (a.num_cells, a.entropy) == (b.num_cells, b.entropy)
    perm = torch.randperm(9, generator=g)
    c = pure_entropy(F[perm], y[perm])
    assert c.num_cells == a.num_cells and c.entropy == pytest.approx(a.entropy, abs=1e-12)


def test_voronoi_cells_ties_between_labels_are_impure():
    X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    a, pure = voronoi_cells(X, y, [0, 1])
    assert not pure  # sample 2 is equidistant from a label-0 and a label-1 centroid
    a, pure = voronoi_cells(X, y, [0, 1, 2])
    assert pure and a.tolist() == [0, 1, 2]
    y2 = torch.tensor([0, 0, 1])
    a, pure = voronoi_cells(X, y2, [0, 1, 2])
    assert pure


def test_bad_input_one_sentence_each():
    X = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"^samples 0 and 1 coincide but have different labels \(0 and 1\): no pure "
                                         r"Voronoi map exists; remove or merge such duplicates first\.$"):
        pure_entropy(X, torch.tensor([0, 1, 1]))
    Xok = torch.rand(4, 2)
    with pytest.raises(ValueError, match="needs hard labels"):
        pure_entropy(Xok, torch.eye(2)[[0, 1, 0, 1]])
    with pytest.raises(ValueError, match="non-finite"):
        pure_entropy(torch.tensor([[0.0], [float("nan")]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^unknown pure_entropy method 'fast'; accepted: auto, exact, heuristic\.$"):
        pure_entropy(Xok, torch.tensor([0, 1, 0, 1]), method="fast")
    with pytest.raises(ValueError, match=r"^max_nodes must be an integer >= 1, got 0\.$"):
        pure_entropy(Xok, torch.tensor([0, 1, 0, 1]), max_nodes=0)
    with pytest.raises(ValueError, match="labels have 3 entries but the features have 4 rows"):
        pure_entropy(Xok, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"^centroids must be a non-empty list of sample indices in \[0, 3\]\.$"):
        voronoi_cells(Xok, torch.tensor([0, 1, 0, 1]), [7])
