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

import torch

WILD = 0
CONST = 1


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = [0, 1]
        self.parity: list[int] = [1, 1]
        self.size: list[int] = [1, 1]
        self.positive: list[bool] = [False, True]

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
    def resolve_tensor(self, ids: torch.Tensor) -> torch.Tensor:
        """Elementwise :meth:`resolve` (cost: one Python find per *distinct* id)."""
        if ids.numel() == 0:
            return ids.clone()
        u, inv = torch.unique(ids, return_inverse=True)
        mapped = torch.tensor([self.resolve(int(s)) for s in u.tolist()], dtype=torch.int64)
        return mapped[inv].reshape(ids.shape)

    def union_tensors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Tie a and b elementwise (after broadcasting)."""
        a, b = torch.broadcast_tensors(a, b)
        ra = self.resolve_tensor(a)
        rb = self.resolve_tensor(b)
        mask = (ra != rb) & (ra != WILD) & (rb != WILD)
        if not bool(mask.any()):
            return
        pairs = torch.unique(torch.stack([ra[mask], rb[mask]]), dim=1)
        for x, y in pairs.t().tolist():
            self.union(x, y)

    def pin_tensor(self, a: torch.Tensor) -> None:
        r = self.resolve_tensor(a)
        for s in torch.unique(r).tolist():
            if s not in (WILD, CONST):
                self.union(s, CONST)

    def positive_tensor(self, a: torch.Tensor) -> None:
        for s in torch.unique(self.resolve_tensor(a)).tolist():
            self.require_positive(s)

    def union_along(self, ids: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Tie all entries that differ only along ``dims``; return the representative ids with those dims kept
        as size 1 (a WILD fibre stays WILD)."""
        dims = tuple(sorted(d % ids.dim() for d in dims))
        if not dims:
            return self.resolve_tensor(ids)
        keep = [d for d in range(ids.dim()) if d not in dims]
        perm = keep + list(dims)
        r = self.resolve_tensor(ids).permute(perm)
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
            rep = self.resolve_tensor(rep)
        out = rep.reshape(tuple(kshape) + (1,) * len(dims))
        # undo the permutation: out currently has dims ordered keep + dims
        inv = [0] * len(perm)
        for i, d in enumerate(perm):
            inv[d] = i
        return out.permute(inv)
