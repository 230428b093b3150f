"""Pure Voronoi maps and the pure entropy H* (seed 002, Øland, ch. 5, Defs. 5-7, eqs. 5.4/5.5, Figs. 5.11/5.12).

A *pure Voronoi map* of a labelled data set ``D(X, Y)`` is a tuple of labelled centroids whose Voronoi cells (each
sample goes to its nearest centroid, Def. 5) are pure: every sample's nearest centroid carries the sample's label
(Def. 6).  Its *pure entropy* is the Shannon entropy of the share of samples per cell (Def. 7).  ``H*`` is the
pure entropy of the optimal map: the fewest cells, and among maps with that many cells the sharpest distribution
(lowest entropy).  The source computes its maps "with a naive, and very inefficient, recursive algorithm" that it
does not describe and that "does not guarantee that the map is optimal" (§5.3.4); this module is our own design.

Decisions (the source is silent on each; all tested):

* **Centroids are samples.**  The centroids are drawn from the data points themselves (each labelled with its own
  label), which makes a minimal pure map a *minimum consistent subset* for the 1-nearest-neighbour rule (Hart's
  problem; NP-hard in general -- Wilfong 1991).  Free centroids anywhere in the space could only need fewer cells;
  the sample restriction is what makes the optimum computable by exhaustive search on small sets.
* **Ties are impure.**  Def. 6 puts a sample equidistant from two centroids into both cells (``<=``); a tie between
  centroids of *different* labels therefore makes a cell impure and the map is not pure.  A tie between centroids
  of the same label sends the sample to the centroid with the smaller sample index.
* **Lexicographic optimum.**  ``H*`` minimises the number of cells first and the entropy second (the source's
  "minimal with respect to the number of Voronoi regions, and ... as sharp as possible").
* **Entropy in bits** (log base 2), like the other entropies of :mod:`gradcond.probes.representation`.

Algorithms (:func:`pure_entropy`):

* **Exact** (``method="exact"``): iterative deepening over the number of cells ``k`` with a complete
  branch-and-bound enumeration of the consistent subsets of size ``k``.  At each node the misclassified sample
  ``x`` with the fewest candidates is chosen and the search branches over the same-label samples strictly closer
  to ``x`` than its nearest enemy centroid -- any pure superset must contain one of them, since adding centroids
  only brings enemies closer -- excluding in branch ``j`` the candidates of branches ``< j`` (so every subset is
  enumerated once).  A node is pruned when a misclassified sample has no candidate left, or when a packing of
  misclassified samples with pairwise disjoint candidate sets needs more centroids than ``k`` leaves.  The first
  ``k`` with a solution is the minimum; every pure subset of that size is enumerated and the lowest-entropy one
  kept.  Checked against a plain enumeration of all subsets in the tests.  Exponential in the worst case, so
  bounded by ``max_nodes``: when the budget runs out, the largest ``k`` whose search space was exhausted without a
  solution proves that at least ``k + 1`` cells are needed.  In practice: a few seconds for 100 points of the 2-D
  sinusoid problems of Fig. 5.11 (``benchmarks/pure_entropy.py``).
* **Heuristic** (``method="heuristic"``): Angiulli's FCNN growth (one centroid per class at the sample nearest the
  class mean, then for every cell its misclassified sample nearest to the centroid, until pure), Gates' reduction
  (drop centroids, smallest cells first, while the map stays pure), then a *large-neighbourhood search* that uses
  the exact search as its sub-solver: for each centroid (smallest cells first), free it and its ``region - 1``
  nearest centroids, keep the others fixed, and re-solve the freed cells exactly (at most ``region_nodes`` nodes)
  with fewer centroids chosen among their samples (at most 128 of them, those nearest the freed centroids);
  passes until no region improves; then the same with as many centroids, kept when the entropy of the whole map
  falls.  A phase is skipped when its lower bound is already reached (one cell per class; entropy H(Y)).  At most ``search_nodes`` nodes in all (a node budget,
  not a clock, so the result does not depend on the machine's load).  The sub-search runs only on the samples a
  freed candidate could take from their fixed nearest centroid.  Cost: the pairwise distances, O(n^2 d) time and
  O(n^2) memory (float64 up to 4,096 samples, float32 above, at most :data:`MAX_SAMPLES`), FCNN and Gates about
  O(n |C|) per step, and per search node O(universe + misclassified x candidates).
* **Auto** (``method="auto"``, the default): exact when ``n <= exact_max_samples`` and the exact search finishes
  within ``max_nodes`` nodes; otherwise the heuristic, with the exact search's proven bound when it ran.

Bounds reported with every result: ``lower_bound_cells`` -- the number of classes present, raised by an exhausted
exact search -- and ``lower_bound_entropy`` -- the label entropy ``H(Y)``: the cells of a pure map refine the
classes, so ``H(V) >= H(Y)`` for every pure map (and ``H(V) - H(Y) = H(V | Y)``, the entropy of the cell given the
label).  ``benchmarks/pure_entropy.py`` measures the heuristic against the exact optimum on small sets and against
these bounds on larger ones, with its cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["pure_entropy", "PureEntropy", "voronoi_cells", "MAX_SAMPLES", "METHODS"]

METHODS = ("auto", "exact", "heuristic")
MAX_SAMPLES = 20_000  # the pairwise distance matrix: 1.6 GB in float32 at this size
_FLOAT64_UP_TO = 4096
_PACK_ROWS = 64  # misclassified samples tried for the packing bound at each node
_REGION_CANDIDATES = 128  # samples of a freed region offered as new centroids (those nearest the freed centroids)


@dataclass
class PureEntropy:
    """A pure Voronoi map and its entropy (:func:`pure_entropy`).

    ``entropy``: H(V) in bits of the map found (``H*`` when ``exact``); ``num_cells``: its number of cells;
    ``centroids``: sample indices of the centroids (ascending, int64) and ``centroid_labels`` their labels;
    ``assignment``: for each sample, the position in ``centroids`` of its cell; ``cell_sizes``: samples per cell.
    ``exact``: True when the map is proven optimal (fewest cells, then lowest entropy).  ``lower_bound_cells`` /
    ``lower_bound_entropy``: proven lower bounds on the optimum's cell count and entropy (see the module
    docstring); ``label_entropy``: H(Y) in bits.  ``method``: ``"exact"`` or ``"heuristic"`` (what produced the
    map); ``nodes``: branch-and-bound nodes visited (by the exact search and by the heuristic's neighbourhood
    searches); ``seconds``: wall time.
    """

    entropy: float
    num_cells: int
    centroids: torch.Tensor
    centroid_labels: torch.Tensor
    assignment: torch.Tensor
    cell_sizes: torch.Tensor
    exact: bool
    lower_bound_cells: int
    lower_bound_entropy: float
    label_entropy: float
    method: str
    nodes: int
    seconds: float

    @property
    def cells_gap(self) -> int:
        """``num_cells - lower_bound_cells`` (0 when proven optimal)."""
        return self.num_cells - self.lower_bound_cells

    @property
    def entropy_gap(self) -> float:
        """``entropy - lower_bound_entropy`` in bits (an upper bound on the distance to ``H*``)."""
        return self.entropy - self.lower_bound_entropy

    def summary(self) -> str:
        how = "optimal" if self.exact else f"heuristic; >= {self.lower_bound_cells} cells, H* >= " \
                                          f"{self.lower_bound_entropy:.3f} bits"
        return (f"pure Voronoi map: {self.num_cells} cells, H = {self.entropy:.3f} bits ({how}; "
                f"{len(self.assignment)} samples, {self.seconds:.2f} s)")


# ----------------------------------------------------------------------------------------------- helpers

def _entropy_bits(sizes) -> float:
    p = np.asarray(sizes, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0


def _check(features, labels):
    from .representation import hard_labels

    if not isinstance(features, torch.Tensor) or features.dim() < 2:
        raise ValueError("pure_entropy needs features as a tensor with one row per sample (at least 2-D).")
    X = features.detach().flatten(1)
    if not X.is_floating_point():
        X = X.to(torch.float64)
    n = X.shape[0]
    y = hard_labels(labels.detach() if isinstance(labels, torch.Tensor) else labels, n, what="pure_entropy")
    if n == 0:
        raise ValueError("pure_entropy needs at least one sample.")
    if n > MAX_SAMPLES:
        raise ValueError(f"pure_entropy takes at most {MAX_SAMPLES} samples (it holds the {n} x {n} distance matrix); "
                         "pass a random subset of the samples.")
    if not torch.isfinite(X).all():
        raise ValueError("pure_entropy got non-finite features (NaN or inf); distances would be meaningless.")
    return X, y


def _distances(X: torch.Tensor) -> np.ndarray:
    """Euclidean distances: exact differences (no ``|a|^2 + |b|^2 - 2ab`` cancellation) in float64 for small sets,
    the matrix-product form in float32 for large ones."""
    n = X.shape[0]
    if n <= _FLOAT64_UP_TO:
        Xd = X.to("cpu", torch.float64)
        mode = "donot_use_mm_for_euclid_dist" if n <= 512 else "use_mm_for_euclid_dist"
        D = torch.cdist(Xd, Xd, compute_mode=mode)
    else:
        Xf = X.to("cpu", torch.float32)
        D = torch.cdist(Xf, Xf, compute_mode="use_mm_for_euclid_dist")
    D.fill_diagonal_(0)
    return D.numpy()


def voronoi_cells(features: torch.Tensor, labels: torch.Tensor, centroids) -> tuple[torch.Tensor, bool]:
    """The cells of the Voronoi map with the given sample indices as centroids (Defs. 5-6).

    Returns ``(assignment, pure)``: ``assignment[i]`` is the position in ``centroids`` (sorted ascending) of sample
    ``i``'s nearest centroid (ties to the smaller sample index); ``pure`` is True when every sample's nearest
    centroid has the sample's label and no sample is equidistant from centroids of two labels.  Cost O(n |C| d).
    """
    X, y = _check(features, labels)
    c = torch.as_tensor(centroids, dtype=torch.long).unique()
    if c.numel() == 0 or int(c.min()) < 0 or int(c.max()) >= len(y):
        raise ValueError(f"centroids must be a non-empty list of sample indices in [0, {len(y) - 1}].")
    D = torch.cdist(X.double(), X[c].double(), compute_mode="donot_use_mm_for_euclid_dist")
    a = D.argmin(1)
    dmin = D.min(1, keepdim=True).values
    tied = D == dmin
    labs = y[c]
    pure = bool((labs[a] == y).all()) and bool(((labs[None, :] == y[:, None]) | ~tied).all())
    return a, pure


class _Budget(Exception):
    pass


# ----------------------------------------------------------------------------------------------- exact search

def _bnb(D: np.ndarray, y: np.ndarray, max_nodes: int, k_from: int, k_to: int, fixed=(), allowed=None):
    """Iterative-deepening branch and bound (module docstring) over ``k = k_from .. k_to`` centroids chosen among
    ``allowed`` (default: every sample), on top of the centroids ``fixed`` (kept as they are).

    Only the samples that a candidate could take from their nearest fixed centroid (and those without a correct
    one) can change; the search runs on them alone.  Returns ``(chosen, nodes, refuted, complete)``: ``chosen`` --
    the new centroids of the first ``k`` with a solution, the one whose whole map (``fixed`` + chosen) has the
    lowest entropy (None if no ``k`` in the range has one); ``refuted`` -- the largest ``k`` whose search space was
    exhausted without a solution (``k_from - 1`` if none); ``complete`` -- False when the ``max_nodes`` budget ran
    out (then ``chosen`` is the best solution found at the level being searched, if any)."""
    n = len(y)
    allowed = np.arange(n) if allowed is None else np.asarray(allowed, dtype=np.int64)
    fixed = [int(f) for f in fixed]
    df0, de0 = np.full(n, np.inf), np.full(n, np.inf)
    for f in fixed:
        same = y == y[f]
        df0 = np.where(same, np.minimum(df0, D[:, f]), df0)
        de0 = np.where(same, de0, np.minimum(de0, D[:, f]))
    if fixed:
        reach = D[:, allowed].min(1) <= np.minimum(df0, de0)
        U = np.flatnonzero(reach | (df0 >= de0))
    else:
        U = np.arange(n)
    if (df0 >= de0).any() and not np.isin(np.flatnonzero(df0 >= de0), U).all():  # pragma: no cover
        raise AssertionError("internal error: a misclassified sample outside the search universe")
    Dl = D[np.ix_(U, allowed)]  # universe x candidates
    yU, ya = y[U], y[allowed]
    df0, de0 = df0[U], de0[U]
    sameU = yU[:, None] == ya[None, :]
    nodes = 0
    refuted = k_from - 1

    def h_of(sol):
        S = np.array(sorted(fixed + [int(allowed[j]) for j in sol]))
        return _entropy_bits(np.bincount(_assign(D, S), minlength=len(S)))

    def done(sols):
        if not sols:
            return None
        best = min(sols, key=lambda s: (h_of(s), s))
        return tuple(int(allowed[j]) for j in best)

    for k in range(max(k_from, 0), k_to + 1):
        sols: list[tuple] = []
        in_s = np.zeros(len(allowed), dtype=bool)
        forbidden = np.zeros(len(allowed), dtype=bool)
        chosen: list[int] = []

        def dfs(df, de):
            nonlocal nodes
            nodes += 1
            if nodes > max_nodes:
                raise _Budget
            mis = df >= de
            if not mis.any():
                if len(chosen) == k:
                    sols.append(tuple(sorted(chosen)))
                return
            r = k - len(chosen)
            if r == 0:
                return
            rows = np.flatnonzero(mis)
            C = sameU[rows] & (Dl[rows] < de[rows, None]) & ~in_s & ~forbidden
            cnt = C.sum(1)
            if (cnt == 0).any():
                return
            # packing bound: misclassified samples with pairwise disjoint candidate sets each need their own centroid
            used = np.zeros(len(allowed), dtype=bool)
            packed = 0
            for i in np.argsort(cnt, kind="stable")[:_PACK_ROWS]:  # any subset of the rows gives a valid bound
                if not (C[i] & used).any():
                    used |= C[i]
                    packed += 1
                    if packed > r:
                        return
            i = int(np.argmin(cnt))
            js = np.flatnonzero(C[i])
            js = js[np.argsort(Dl[rows[i], js], kind="stable")]
            for jl in js:
                in_s[jl] = True
                chosen.append(int(jl))
                col = Dl[:, jl]
                same = sameU[:, jl]
                dfs(np.where(same, np.minimum(df, col), df), np.where(same, de, np.minimum(de, col)))
                chosen.pop()
                in_s[jl] = False
                forbidden[jl] = True
            forbidden[js] = False

        try:
            dfs(df0, de0)
        except _Budget:
            return done(sols), nodes, refuted, False
        if sols:
            return done(sols), nodes, refuted, True
        refuted = k
    return None, nodes, refuted, True


def _exact(D: np.ndarray, y: np.ndarray, max_nodes: int, k_start: int):
    """The whole problem by :func:`_bnb`: ``(optimal centroids or None, nodes, refuted)``."""
    sol, nodes, refuted, complete = _bnb(D, y, max_nodes, k_start, len(y))
    if not complete:
        return None, nodes, refuted
    return np.array(sol), nodes, refuted


def _assign(D: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Position in ``S`` (ascending sample indices) of each sample's nearest centroid (ties: first in ``S``)."""
    return D[:, S].argmin(1)


# ----------------------------------------------------------------------------------------------- heuristic

class _Search:
    """A centroid set under swaps, with each sample's nearest and second-nearest centroid (``n1, d1, n2, d2``).

    A sample is an *error* when its nearest centroid has another label, or when its second-nearest centroid is
    at the same distance with another label (a tie between labels is impure, Def. 6)."""

    def __init__(self, D: np.ndarray, y: np.ndarray, S):
        self.D, self.y, self.n = D, y, len(y)
        self.S = np.array(sorted(int(s) for s in S), dtype=np.int64)
        self.n1, self.d1, self.n2, self.d2 = self._top2(np.arange(self.n), self.S)

    def _top2(self, rows: np.ndarray, S: np.ndarray):
        sub = self.D[np.ix_(rows, S)]
        if len(S) == 1:
            return (np.full(len(rows), S[0]), sub[:, 0].copy(), np.full(len(rows), S[0]),
                    np.full(len(rows), np.inf))
        o = np.argpartition(sub, 1, axis=1)[:, :2]
        d = np.take_along_axis(sub, o, 1)
        # order the two by (distance, sample index): ties go to the smaller index
        i0, i1 = S[o[:, 0]], S[o[:, 1]]
        sw = (d[:, 0] > d[:, 1]) | ((d[:, 0] == d[:, 1]) & (i0 > i1))
        n1, n2 = np.where(sw, i1, i0), np.where(sw, i0, i1)
        d1, d2 = np.where(sw, d[:, 1], d[:, 0]), np.where(sw, d[:, 0], d[:, 1])
        return n1, d1, n2, d2

    def copy(self) -> "_Search":
        c = object.__new__(_Search)
        c.D, c.y, c.n, c.S = self.D, self.y, self.n, self.S.copy()
        c.n1, c.d1, c.n2, c.d2 = self.n1.copy(), self.d1.copy(), self.n2.copy(), self.d2.copy()
        return c

    def errors(self) -> np.ndarray:
        y = self.y
        return (y[self.n1] != y) | ((self.d2 == self.d1) & (y[self.n2] != y))

    def pure(self) -> bool:
        """Exact check over all centroids (ties with a third centroid included)."""
        if self.errors().any():
            return False
        tied = self.D[:, self.S] == self.d1[:, None]
        return not (tied & (self.y[self.S][None, :] != self.y[:, None])).any()

    def sizes(self) -> np.ndarray:
        return np.bincount(np.searchsorted(self.S, self.n1), minlength=len(self.S))

    def edit(self, remove=(), add=()) -> None:
        """Remove the centroids ``remove`` and add ``add``, updating the top-2 tables incrementally."""
        S = np.array(sorted((set(self.S.tolist()) - set(remove)) | set(add)), dtype=np.int64)
        self.S = S
        if len(remove):
            aff = np.flatnonzero(np.isin(self.n1, remove) | np.isin(self.n2, remove))
        else:
            aff = np.zeros(0, dtype=np.int64)
        keep = np.ones(self.n, dtype=bool)
        keep[aff] = False
        for j in add:
            col = self.D[:, j]
            first = keep & ((col < self.d1) | ((col == self.d1) & (j < self.n1)))
            second = keep & ~first & ((col < self.d2) | ((col == self.d2) & (j < self.n2)))
            self.n2[first], self.d2[first] = self.n1[first], self.d1[first]
            self.n1[first], self.d1[first] = j, col[first]
            self.n2[second], self.d2[second] = j, col[second]
        if len(aff):
            self.n1[aff], self.d1[aff], self.n2[aff], self.d2[aff] = self._top2(aff, S)

    def removal_errors(self) -> np.ndarray:
        """Errors after removing each centroid alone: its samples go to their second-nearest centroid, and a tie
        with a removed second-nearest goes away (exact up to ties with a third centroid)."""
        y = self.y
        e = self.errors()
        k = len(self.S)
        pos1 = np.searchsorted(self.S, self.n1)
        pos2 = np.searchsorted(self.S, self.n2)
        two = self.n2 != self.n1
        out = float(e.sum()) + np.bincount(pos1, weights=(y[self.n2] != y).astype(np.int64) - e, minlength=k)
        out += np.bincount(pos2[two], weights=((y[self.n1] != y).astype(np.int64) - e)[two], minlength=k)
        return out


def _nearest_enemy(D: np.ndarray, y: np.ndarray) -> np.ndarray:
    ne = np.empty(len(y))
    for s in range(0, len(y), 1024):
        ne[s:s + 1024] = np.where(y[s:s + 1024, None] != y[None, :], D[s:s + 1024], np.inf).min(1)
    return ne


def _fcnn(D: np.ndarray, y: np.ndarray, X: np.ndarray) -> list[int]:
    """Angiulli's FCNN1: class-mean seeds, then per cell the misclassified sample nearest to its centroid, until no
    sample is misclassified or tied between labels."""
    S = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        mu = X[idx].mean(0)
        S.append(int(idx[np.argmin(((X[idx] - mu) ** 2).sum(1))]))
    m = _Search(D, y, S)
    while True:
        wrong = np.flatnonzero(m.errors())
        if not len(wrong):
            return m.S.tolist()
        new = []
        for c in np.unique(m.n1[wrong]):
            w = wrong[m.n1[wrong] == c]
            new.append(int(w[np.argmin(D[c, w])]))
        m.edit(add=new)


def _heuristic(D: np.ndarray, y: np.ndarray, X: np.ndarray, region: int, sub_nodes: int, budget: int
               ) -> tuple[np.ndarray, int]:
    """FCNN, Gates' reduction, then large-neighbourhood search with the exact search as the sub-solver: for each
    centroid (smallest cells first), free it and its ``region - 1`` nearest centroids and re-solve their cells
    exactly (:func:`_bnb`, at most ``sub_nodes`` nodes) for fewer centroids, the others fixed; passes until none
    improves; then the same with as many centroids, kept when the whole map's entropy falls.  At most ``budget``
    nodes in all.  Returns (centroids, nodes used)."""
    m = _Search(D, y, _fcnn(D, y, X))
    _gates(m)
    S = m.S.tolist()
    used = 0
    classes = len(np.unique(y))
    floor = _entropy_bits(np.bincount(y))
    for phase in ("cells", "entropy"):
        h = _entropy_bits(np.bincount(_assign(D, np.array(S)), minlength=len(S)))
        # nothing to gain at the lower bounds: one cell per class, or the entropy of the labels
        improved = len(S) > classes if phase == "cells" else h > floor + 1e-12
        while improved and used < budget:
            improved = False
            Sa = np.array(S)
            sizes = np.bincount(_assign(D, Sa), minlength=len(Sa))
            for c in Sa[np.argsort(sizes, kind="stable")]:
                c = int(c)
                if c not in S or used >= budget:
                    continue
                Sa = np.array(S)
                reg = Sa[np.argsort(D[c, Sa], kind="stable")[:region]]
                if phase == "cells" and len(reg) < 2:
                    continue
                near = Sa[_assign(D, Sa)]
                R = np.flatnonzero(np.isin(near, reg))
                if len(R) > _REGION_CANDIDATES:  # the samples nearest to the freed centroids, in turn
                    order = np.argsort(D[np.ix_(reg, R)], axis=1, kind="stable")
                    pick: list[int] = []
                    for col in range(order.shape[1]):
                        for r in range(len(reg)):
                            j = int(R[order[r, col]])
                            if j not in pick:
                                pick.append(j)
                        if len(pick) >= _REGION_CANDIDATES:
                            break
                    R = np.array(sorted(pick[:_REGION_CANDIDATES]))
                fixed = [int(f) for f in Sa if f not in set(reg.tolist())]
                k = len(reg) - 1 if phase == "cells" else len(reg)
                sol, nodes, _, _ = _bnb(D, y, min(sub_nodes, budget - used), 1 if phase == "cells" else k, k,
                                        fixed, R)
                used += nodes
                if sol is None:
                    continue
                new = sorted(fixed + list(sol))
                h_new = _entropy_bits(np.bincount(_assign(D, np.array(new)), minlength=len(new)))
                if phase == "cells" or h_new < h - 1e-12:
                    S, h, improved = new, h_new, True
    return np.array(S), used


def _gates(m: _Search) -> None:
    """Gates' reduction: remove centroids whose removal alone keeps every sample correct (smallest cells first)."""
    while len(m.S) > 1:
        sc = m.removal_errors()
        free = np.flatnonzero(sc == 0)
        if not len(free):
            return
        sizes = m.sizes()
        c = int(m.S[free[np.argmin(sizes[free])]])
        t = m.copy()
        t.edit(remove=[c])
        if not t.pure():  # a tie with a third centroid: keep c
            return
        m.S, m.n1, m.d1, m.n2, m.d2 = t.S, t.n1, t.d1, t.n2, t.d2


# ----------------------------------------------------------------------------------------------- entry point

def pure_entropy(features: torch.Tensor, labels: torch.Tensor, *, method: str = "auto", max_nodes: int = 50_000,
                 exact_max_samples: int = 64, region: int = 6, region_nodes: int = 2_000,
                 search_nodes: int = 20_000) -> PureEntropy:
    """The pure Voronoi map with the fewest cells (then the lowest entropy) and its pure entropy H* in bits
    (seed 002, Defs. 6-7; the algorithms and decisions are in the module docstring).

    ``features``: ``(n, ...)`` inputs or a layer's features (flattened after the first dimension; Euclidean
    distance); ``labels``: ``(n,)`` integer class labels.  ``method``: ``"exact"`` (branch and bound, proven
    optimal; raises ``ValueError`` when ``max_nodes`` is not enough), ``"heuristic"`` (seconds for a few thousand
    samples), or ``"auto"`` (exact for ``n <= exact_max_samples`` within ``max_nodes`` nodes, else the heuristic).
    ``region``, ``region_nodes``, ``search_nodes``: the heuristic's neighbourhood size (centroids freed at once),
    node budget per neighbourhood and node budget in all.  Deterministic (no random draws).  Refuses: samples that coincide but carry different labels (no pure map exists), one-hot or soft
    labels, non-finite features, more than :data:`MAX_SAMPLES` samples.

    Returns a :class:`PureEntropy` with the map, its entropy, whether it is proven optimal, and lower bounds on the
    optimum.  Cost: see the module docstring; ``benchmarks/pure_entropy.py`` measures it.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown pure_entropy method {method!r}; accepted: {', '.join(METHODS)}.")
    for name, v, lo in (("max_nodes", max_nodes, 1), ("exact_max_samples", exact_max_samples, 0),
                        ("region", region, 1), ("region_nodes", region_nodes, 1), ("search_nodes", search_nodes, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}.")
    X, yt = _check(features, labels)
    y = yt.cpu().numpy()
    n = len(y)
    D = _distances(X)
    ne = _nearest_enemy(D, y) if len(np.unique(y)) > 1 else np.full(n, np.inf)
    if (ne == 0).any():
        i = int(np.flatnonzero(ne == 0)[0])
        j = int(np.flatnonzero((D[i] == 0) & (y != y[i]))[0])
        raise ValueError(f"samples {i} and {j} coincide but have different labels ({int(y[i])} and {int(y[j])}): no "
                         "pure Voronoi map exists; remove or merge such duplicates first.")
    classes = len(np.unique(y))
    label_h = _entropy_bits(np.bincount(y))
    lb_cells, nodes, S, exact = classes, 0, None, False
    if method == "exact" or (method == "auto" and n <= exact_max_samples):
        S, nodes, refuted = _exact(D, y, max_nodes, classes)
        lb_cells = max(classes, refuted + 1)
        if S is not None:
            exact = True
            lb_cells = len(S)
        elif method == "exact":
            raise ValueError(f"the exact search ran out of its {max_nodes} nodes (it proved at least {lb_cells} "
                             f"cells are needed); raise max_nodes or use method='heuristic'.")
    if S is None:
        S, used = _heuristic(D, y, X.to("cpu", torch.float64).numpy(), region, region_nodes, search_nodes)
        nodes += used
    S = np.asarray(S, dtype=np.int64)
    if not _Search(D, y, S).pure():  # pragma: no cover - every step keeps the map pure
        raise AssertionError("internal error: pure_entropy built an impure map.")
    a = _assign(D, S)
    sizes = np.bincount(a, minlength=len(S))
    h = _entropy_bits(sizes)
    return PureEntropy(
        entropy=h, num_cells=len(S), centroids=torch.from_numpy(S), centroid_labels=torch.from_numpy(y[S]),
        assignment=torch.from_numpy(a.astype(np.int64)), cell_sizes=torch.from_numpy(sizes.astype(np.int64)),
        exact=exact, lower_bound_cells=int(lb_cells), lower_bound_entropy=label_h if not exact else h,
        label_entropy=label_h, method="exact" if exact else "heuristic", nodes=nodes,
        seconds=time.perf_counter() - t0)
