"""Union-find over CoB atoms with an inversion parity.

An *atom* is one scalar change-of-basis factor tau (one neuron / channel).  Atoms are referred to by *signed
ids*: ``+a`` means tau_a and ``-a`` means 1 / tau_a (``a >= 1``).  Two ids are reserved:

* ``WILD = 0``: a position that holds an exact zero (e.g. zero padding); it is compatible with every tau, so
  ties with it are no-ops;
* ``CONST = 1``: the constant tau = 1 (model inputs and outputs, pinned neurons).

``union(x, y)`` records tau(x) == tau(y).  Each set keeps, for every member, the parity p with
tau_member = tau_root ** p, so the multiplicative ties tau_q * tau_k = 1 of attention (``union(q, -k)``) live in
the same structure as ordinary ties.  A tie tau_a = 1 / tau_a inside one set forces tau_a = +-1; we pin it to
the constant (tau = 1), which is exact and conservative.
"""

from __future__ import annotations

import numpy as np
import torch

WILD = 0
CONST = 1


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = [0, 1]
        self.parity: list[int] = [1, 1]
        self.size: list[int] = [1, 1]
        self.positive: list[bool] = [False, True]
        # numpy mirror of the forest for vectorised finds (see _sync): parent / parity arrays with spare capacity,
        # the number of atoms they cover, and the links made since the last sync
        self._mp = np.arange(2, dtype=np.int64)
        self._mq = np.ones(2, dtype=np.int64)
        self._mn = 2
        self._log: list[tuple[int, int, int]] = []

    def __len__(self) -> int:
        return len(self.parent)

    def fresh(self, n: int) -> torch.Tensor:
        """Allocate ``n`` new free atoms; returns their ids as a 1-D int64 tensor."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.parity.extend([1] * n)
        self.size.extend([1] * n)
        self.positive.extend([False] * n)
        return torch.arange(start, start + n, dtype=torch.int64)

    def find(self, a: int) -> tuple[int, int]:
        """Root and parity of atom ``a >= 0`` (tau_a = tau_root ** parity)."""
        parent, parity = self.parent, self.parity
        p = 1
        x = a
        path = []
        while parent[x] != x:
            path.append(x)
            p *= parity[x]
            x = parent[x]
        root = x
        # path compression: recompute parity of each node on the path relative to the root
        acc = p
        for node in path:
            nxt_par = parity[node]
            parent[node] = root
            parity[node] = acc
            acc *= nxt_par
        return root, p

    def resolve(self, s: int) -> int:
        """Signed root id of signed id ``s`` (0 stays 0, the constant stays 1)."""
        if s == 0:
            return 0
        r, p = self.find(abs(s))
        if r == CONST:
            return CONST
        return r * p * (1 if s > 0 else -1)

    def union(self, x: int, y: int) -> None:
        """Record tau(x) == tau(y) for signed ids x, y."""
        if x == WILD or y == WILD:
            return
        rx, px = self.find(abs(x))
        ry, py = self.find(abs(y))
        ex = px * (1 if x > 0 else -1)
        ey = py * (1 if y > 0 else -1)
        if rx == ry:
            if ex != ey and rx != CONST:
                # tau_r == 1 / tau_r: pin (tau = 1 is one of the two exact solutions).
                self._link(rx, CONST, 1)
            return
        # tau_rx ** ex == tau_ry ** ey  ->  tau_rx = tau_ry ** (ex * ey)
        if rx == CONST or (ry != CONST and self.size[rx] > self.size[ry]):
            rx, ry = ry, rx
        self._link(rx, ry, ex * ey)

    def _link(self, child: int, root: int, parity: int) -> None:
        self._log.append((child, root, parity))
        self.parent[child] = root
        self.parity[child] = parity
        self.size[root] += self.size[child]
        self.positive[root] = self.positive[root] or self.positive[child]

    def pin(self, x: int) -> None:
        self.union(x, CONST)

    def require_positive(self, x: int) -> None:
        if x == WILD:
            return
        r, _ = self.find(abs(x))
        self.positive[r] = True

    # ---- vectorised helpers over tensors of signed ids -------------------------------------------------
    # Atom-id tensors are mostly broadcasts: a layer's taus are shared over the batch and over space, so the id
    # tensor of a (N, C, H, W) activation holds only C distinct values.  Every helper first narrows the dims along
    # which its operand is constant (:func:`shrink`: free for expanded views, one comparison otherwise), so the
    # sorting (``torch.unique``) and Python work scale with the number of *distinct* positions, not with the
    # activation size.  The ties recorded, and their order, are the same as on the full tensors (same sets of
    # distinct ids and pairs, visited in the same sorted order), so the union-find ends in the same state.

    def _sync(self) -> None:
        """Bring the numpy mirror up to date: new atoms (roots of their own) and the links made since the last sync.
        The mirror holds the same classes and parities as the lists (it lacks only their path compression, which
        never changes a root or a parity relative to it)."""
        n = len(self.parent)
        if n > self._mn:
            if n > len(self._mp):
                cap = max(n, 2 * len(self._mp))
                mp = np.arange(cap, dtype=np.int64)
                mq = np.ones(cap, dtype=np.int64)
                mp[:self._mn] = self._mp[:self._mn]
                mq[:self._mn] = self._mq[:self._mn]
                self._mp, self._mq = mp, mq
            else:
                self._mp[self._mn:n] = np.arange(self._mn, n)
                self._mq[self._mn:n] = 1
            self._mn = n
        if self._log:
            c, r, q = np.asarray(self._log, dtype=np.int64).T
            self._mp[c] = r
            self._mq[c] = q
            self._log.clear()

    def _resolve_np(self, s: np.ndarray) -> np.ndarray:
        """:meth:`resolve` of every entry of the int64 array ``s``, vectorised: pointer jumping over the numpy
        mirror (a few array operations per tree level; union by size keeps trees shallow), with path compression
        of the queried atoms."""
        self._sync()
        mp, mq = self._mp, self._mq
        a = np.abs(s)
        r = mp[a]
        p = mq[a]
        while True:
            rr = mp[r]
            if np.array_equal(rr, r):
                break
            p = p * mq[r]  # roots have parity 1, so finished entries are unchanged
            r = rr
        mp[a] = r
        mq[a] = p
        return np.where(r == CONST, CONST, r * p * np.sign(s))

    def _resolve_small(self, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`resolve` of every entry of ``ids`` (no shrinking; vectorised, :meth:`_resolve_np`)."""
        if ids.numel() == 0:
            return ids.clone()
        s = ids.detach().to(torch.int64).contiguous().numpy()
        return torch.from_numpy(self._resolve_np(s.reshape(-1))).reshape(ids.shape)

    def resolve_tensor(self, ids: torch.Tensor) -> torch.Tensor:
        """Elementwise :meth:`resolve` (cost: :func:`shrink`, then a few numpy passes over the remaining entries,
        :meth:`_resolve_np`).  The result may be an expanded view (read it, do not write into it)."""
        if ids.numel() == 0:
            return ids.clone()
        s = shrink(ids)
        return self._resolve_small(s).expand(ids.shape)

    def union_tensors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Tie a and b elementwise (after broadcasting)."""
        shape = torch.broadcast_shapes(a.shape, b.shape)
        a, b = torch.broadcast_tensors(shrink(a.expand(shape)), shrink(b.expand(shape)))
        ra = self._resolve_small(a)
        rb = self._resolve_small(b)
        mask = (ra != rb) & (ra != WILD) & (rb != WILD)
        if not bool(mask.any()):
            return
        pairs = torch.unique(torch.stack([ra[mask], rb[mask]]), dim=1)
        for x, y in pairs.t().tolist():
            self.union(x, y)

    def pin_tensor(self, a: torch.Tensor) -> None:
        """Pin every atom in ``a`` (tau = 1).  Same result as ``union(s, CONST)`` for each distinct resolved id
        ``s`` in sorted order: each of them is a root, so that union is one link of the root to the constant (a
        root met twice, as ``-r`` then ``r``, is linked once, with the parity of the first)."""
        if a.numel() == 0:
            return
        r = self._resolve_small(shrink(a))
        seen = set()
        link = self._link
        for s in torch.unique(r).tolist():
            if s == WILD or s == CONST:
                continue
            root = -s if s < 0 else s
            if root not in seen:
                seen.add(root)
                link(root, CONST, 1 if s > 0 else -1)

    def positive_tensor(self, a: torch.Tensor) -> None:
        if a.numel() == 0:
            return
        for s in torch.unique(self._resolve_small(shrink(a))).tolist():
            self.require_positive(s)

    def union_along(self, ids: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Tie all entries that differ only along ``dims``; return the representative ids with those dims kept
        as size 1 (a WILD fibre stays WILD).  The representative of a fibre is its first non-WILD entry (row-major
        over ``dims``); the result may be an expanded view."""
        dims = tuple(sorted(d % ids.dim() for d in dims))
        if not dims:
            return self.resolve_tensor(ids)
        full = ids.shape
        if ids.numel() == 0:
            r = ids
        else:
            # constant dims narrowed: a fibre's first non-WILD entry and its set of distinct ids are unchanged
            r = self._resolve_small(shrink(ids))
            if all(r.shape[d] == 1 for d in dims):  # every fibre is one entry: nothing to tie
                return r.expand(tuple(1 if d in dims else full[d] for d in range(len(full))))
        keep = [d for d in range(ids.dim()) if d not in dims]
        perm = keep + list(dims)
        r = r.permute(perm)
        kshape = r.shape[: len(keep)]
        k = 1
        for n in r.shape[len(keep):]:
            k *= n
        flat = r.reshape(-1, k)
        nonwild = flat != WILD
        first = torch.argmax(nonwild.to(torch.int8), dim=1, keepdim=True)
        rep = torch.gather(flat, 1, first)
        mask = nonwild & (flat != rep)
        if bool(mask.any()):
            reps = rep.expand_as(flat)
            pairs = torch.unique(torch.stack([reps[mask], flat[mask]]), dim=1)
            for x, y in pairs.t().tolist():
                self.union(x, y)
            rep = self._resolve_small(rep)
        out = rep.reshape(tuple(kshape) + (1,) * len(dims))
        # undo the permutation: out currently has dims ordered keep + dims
        inv = [0] * len(perm)
        for i, d in enumerate(perm):
            inv[d] = i
        out = out.permute(inv)
        return out.expand(tuple(1 if d in dims else full[d] for d in range(len(full))))

    def roots(self) -> tuple:
        """``(root, parity)`` of every atom as int64 numpy arrays (index = atom id), by vectorised pointer jumping
        over a snapshot of the forest: O(n log depth) array operations instead of one Python :meth:`find` per
        atom.  Roots are those :meth:`find` returns (path compression never changes a root)."""
        self._sync()
        parent = self._mp[:self._mn].copy()
        parity = self._mq[:self._mn].copy()
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent, parity
            parity = parity * parity[parent]
            parent = grand


def shrink(ids: torch.Tensor) -> torch.Tensor:
    """A view of ``ids`` narrowed to size 1 along every dim where it is constant (same values after broadcasting
    back).  Expanded (stride-0) dims are narrowed for free; when two or more dims of size > 1 remain on a tensor
    of more than 64 entries, each costs one comparison of the tensor with its first slice.  (Narrowing is an
    optimisation only: every caller gets the same result from any lossless narrowing.)"""
    shape = ids.shape
    if not shape:
        return ids
    if ids.numel() == 0:
        return ids
    stride = ids.stride()
    if 0 in stride:
        shape = tuple(1 if st == 0 else n for n, st in zip(shape, stride))
        ids = ids.as_strided(shape, stride, ids.storage_offset())
    big = [d for d, n in enumerate(shape) if n > 1]
    if len(big) < 2 or ids.numel() <= 64:
        return ids
    for d in big:
        first = ids.narrow(d, 0, 1)
        if bool((ids == first).all()):
            ids = first
    return ids
