"""The fast paths of ``graph.analyze`` (issue 18) give the same analysis as the direct computation.

* the union-find's vectorised resolution (:meth:`UnionFind._resolve_np`, :meth:`UnionFind.roots`) agrees with the
  per-atom ``find`` on random tie sequences (attention-like inverse ties and pins included);
* :func:`shrink` is lossless, and ``union_along`` / ``union_tensors`` / ``pin_tensor`` on broadcast id tensors
  induce the same partition as on their materialised copies;
* ``analyze`` with the shrinking switched off (every id tensor kept at activation size, as before) gives the same
  structure (free taus and their numbering, parameter rules, sites, groups, pins, frozen list) on zoo models and on
  small DenseNet- and MobileNetV2-shaped models;
* the free taus of the torchvision-shaped densenet121 / mobilenet_v2 of the benchmarks equal hand counts derived
  from the architecture (BatchNorm inputs pinned, ReLU/ReLU6 sites, residual ties).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradcond import zoo
from gradcond.graph import _unionfind, analyze, propagate
from gradcond.graph._unionfind import CONST, WILD, UnionFind, shrink


def _tvshaped():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_tvshaped.py"
    spec = importlib.util.spec_from_file_location("_tvshaped_for_tests", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


TV = _tvshaped()


# ---- union-find primitives -----------------------------------------------------------------------------------
def _random_uf(seed: int, n: int = 60, ties: int = 80) -> UnionFind:
    g = torch.Generator().manual_seed(seed)
    uf = UnionFind()
    uf.fresh(n)
    for _ in range(ties):
        a, b = torch.randint(2, n + 2, (2,), generator=g).tolist()
        sa, sb = (1 if x else -1 for x in torch.randint(0, 2, (2,), generator=g).tolist())
        r = int(torch.randint(0, 10, (1,), generator=g))
        if r == 0:
            uf.pin(sa * a)
        else:
            uf.union(sa * a, sb * b)
        if r == 1:
            uf.fresh(3)  # atoms created between ties (the mirror must catch up)
    return uf


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_resolve_matches_find(seed):
    uf = _random_uf(seed)
    n = len(uf)
    ids = np.arange(-(n - 1), n, dtype=np.int64)
    fast = uf._resolve_np(ids)
    # a fresh copy of the lists (no shared path compression) resolved one id at a time
    ref = UnionFind()
    ref.parent, ref.parity, ref.size, ref.positive = list(uf.parent), list(uf.parity), list(uf.size), list(uf.positive)
    slow = [ref.resolve(int(s)) for s in ids]
    assert fast.tolist() == slow
    root, parity = uf.roots()
    assert [(int(r), int(p)) for r, p in zip(root, parity)] == [ref.find(a) for a in range(n)]


def _partition(uf: UnionFind, n: int) -> list:
    """Canonical form of the classes of atoms 2..n-1: (root class of each atom relative to the first member, parity
    relative to it, pinned)."""
    out, first = [], {}
    for a in range(2, n):
        r, p = uf.find(a)
        if r == CONST:
            out.append("const")
            continue
        if r not in first:
            first[r] = (a, p)
        b, pb = first[r]
        out.append((b, p * pb))
    return out


def _pair(seed: int):
    """Two union-finds in the same state and an id tensor that is a broadcast (expanded) view."""
    g = torch.Generator().manual_seed(seed)
    ufs = [UnionFind(), UnionFind()]
    for uf in ufs:
        uf.fresh(40)
    c = torch.randint(2, 42, (5,), generator=g) * (torch.randint(0, 2, (5,), generator=g) * 2 - 1)
    c[0] = WILD
    ids = c.view(1, 5, 1, 1).expand(3, 5, 4, 2)
    return ufs, ids


@pytest.mark.parametrize("seed", range(4))
def test_shrink_is_lossless(seed):
    _, ids = _pair(seed)
    for t in (ids, ids.contiguous(), ids.contiguous()[:, :2], torch.cat([ids, ids], 2)):
        s = shrink(t)
        assert torch.equal(s.expand(t.shape), t)
        assert s.numel() <= t.numel()


@pytest.mark.parametrize("seed", range(4))
def test_ties_on_broadcast_ids_match_materialised(seed):
    (fast, slow), ids = _pair(seed)
    other = torch.arange(2, 42).view(1, 40, 1, 1)[:, :5].expand(3, 5, 4, 2)
    full = ids.contiguous()
    for uf, x in ((fast, ids), (slow, full)):
        rep = uf.union_along(x, (0, 2, 3))
        uf.union_tensors(rep, other[:1, :, :1, :1])
        uf.pin_tensor(x[:, :1])
    assert _partition(fast, len(fast)) == _partition(slow, len(slow))
    assert torch.equal(fast.resolve_tensor(ids).contiguous(), slow.resolve_tensor(full))


# ---- whole analyses -------------------------------------------------------------------------------------------
def _canon(s) -> dict:
    return dict(
        num_free=s.num_free, positive=s.positive.tolist(), free_group=s.free_group.tolist(),
        rules={k: [(tuple(g.shape), g.tolist()) for g in r.gidx] for k, r in s.rules.items()},
        sites=[(x.node, x.kind, x.op, x.module_path, x.unique, tuple(x.gidx.shape), x.gidx.tolist()) for x in s.sites],
        groups=[g.to_dict() for g in s.groups], frozen=[f.to_dict() for f in s.frozen],
        pins=[p.to_dict() for p in s.pins])


def _models():
    torch.manual_seed(0)
    yield "mlp", zoo.build("mlp", act="tanh", norm="layer"), torch.randn(2, 64)
    yield "vgg", zoo.build("vgg", batch_norm=True), torch.randn(2, 1, 8, 8)
    yield "resnet", zoo.build("resnet", depth=10, width=8), torch.randn(2, 1, 8, 8)
    yield "densenet", zoo.build("densenet"), torch.randn(2, 1, 8, 8)
    yield "transformer", zoo.build("transformer"), torch.randn(2, 8, 8)
    yield "dense-shaped", TV.DenseNet(8, (2, 3), 16, 2, 10), torch.randn(2, 3, 16, 16)
    mb = TV.MobileNetV2(10)
    mb.features = mb.features[:6]  # stem + the first inverted-residual stages (residual adds included)
    mb.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))
    yield "mobile-shaped", mb, torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("rewrite", [True, False])
def test_analysis_without_shrinking_is_identical(monkeypatch, rewrite):
    fast = {name: _canon(analyze(m, x, rewrite=rewrite)) for name, m, x in _models()}
    keep = lambda ids: ids  # noqa: E731 -- the direct computation: id tensors at activation size
    monkeypatch.setattr(_unionfind, "shrink", keep)
    monkeypatch.setattr(propagate, "shrink", keep)
    slow = {name: _canon(analyze(m, x, rewrite=rewrite)) for name, m, x in _models()}
    for name in fast:
        assert fast[name] == slow[name], name
    assert fast["dense-shaped"]["num_free"] > 0 and fast["mobile-shaped"]["num_free"] > 0


def test_densenet121_shaped_free_taus_hand_count():
    """BatchNorm inputs are pinned, so every conv output (the concatenated features) is pinned; every BatchNorm
    affine output is free (it feeds a ReLU and a conv or the classifier) except norm0's, which reaches the dense
    block's concatenation (a BatchNorm input)."""
    model = TV.densenet121(num_classes=10)
    s = analyze(model, torch.randn(2, 3, 32, 32))
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    expected = sum(m.num_features for n, m in bns if n != "features.norm0")
    assert s.num_free == expected
    assert not s.frozen


def test_mobilenet_v2_shaped_free_taus_hand_count():
    """rewrite=False pins the ReLU6 inputs (non-homogeneous), leaving one free tau per channel of each stage's
    projection output (tied along the stage by the residual adds); rewrite=True adds every BatchNorm that feeds a
    ReLU6."""
    model = TV.mobilenet_v2(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    stages = [16, 24, 32, 64, 96, 160, 320]
    assert analyze(model, x, rewrite=False).num_free == sum(stages)
    relu6_fed = sum(m[1].num_features for m in model.modules()
                    if isinstance(m, TV._ConvBNReLU) and isinstance(m[-1], nn.ReLU6))
    assert analyze(model, x).num_free == sum(stages) + relu6_fed


def test_parameter_walk_order_with_shared_modules():
    """The teleport's parameter walk (one loop, explicit stack) lists parameters in ``model.parameters()`` order,
    also when a module is reachable twice and a sibling comes between (root -> [x, w, y], x -> y)."""
    from gradcond.teleport.scaling import _walk_params

    y = nn.Linear(2, 2)
    root = nn.Module()
    root.x = nn.Sequential(nn.Linear(2, 2), y)
    root.w = nn.Linear(2, 3)
    root.y = y
    root.z = nn.Sequential(nn.ReLU(), root.x, nn.Linear(3, 1))
    assert [id(p) for p in _walk_params(root)] == [id(p) for p in root.parameters()]
    m = TV.DenseNet(8, (2, 2), 16, 2, 10)
    assert [id(p) for p in _walk_params(m)] == [id(p) for p in m.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teleport_site_activity_numpy_path_matches_torch(dtype):
    """The CPU (numpy) evaluation of which activation sites a CoB rewrites, and of their taus, equals the torch one
    (scale sites: GELU of the zoo transformer; sign sites: ReLU of an MLP under a CoB with negative taus)."""
    from gradcond.teleport import random_cob
    from gradcond.teleport.scaling import _fast_plan

    torch.manual_seed(0)
    cases = [(zoo.build("transformer"), torch.randn(2, 8, 8), "intra"), (zoo.build("mlp"), torch.randn(2, 64), "inter")]
    for model, x, kind in cases:
        model = model.to(dtype)
        s = analyze(model, x.to(dtype))
        plan = _fast_plan(s, torch.device("cpu"), dtype)
        for seed in range(3):
            cob = random_cob(s, 0.9, kind, torch.Generator().manual_seed(seed))
            tau = cob.tau.detach()
            tau[:2] = 1.0  # exactly-identity entries stay inactive
            a_np, v_np = plan._sites_np(s, tau)
            a_t, v_t = plan._sites_torch(s, tau)
            assert a_np == a_t and any(a_np)
            assert len(v_np) == len(v_t)
            for p, q in zip(v_np, v_t):
                assert (p is None) == (q is None)
                if p is not None:
                    assert p.dtype == q.dtype == dtype and p.shape == q.shape and torch.equal(p, q)
