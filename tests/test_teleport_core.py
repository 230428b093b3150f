"""Teleportation (seed 000, Armenta et al.): function preservation, Theorem 5.1, level curves, micro-teleportation,
plain-module results, undo/composition, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond import zoo
from gradcond.graph import TeleportedActivation, analyze
from gradcond.teleport import (
    CoB,
    functional_teleport,
    micro_teleport,
    needs_rewrite,
    pseudo_teleport,
    random_cob,
    teleport,
    teleported_params,
    weight_scale_factors,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # issue 9, "Must show": max|f - f_tp| / max|f|


def _input(name, kw, batch=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name in ("mlp", "looks_linear_crelu_mlp"):
        return torch.randn(batch, kw.get("in_features", 64), generator=g, dtype=dtype)
    if name == "resnet_mlp":
        return torch.randn(batch, kw.get("in_features", 100), generator=g, dtype=dtype)
    if name == "transformer":
        if kw.get("vocab_size"):
            return torch.randint(0, kw["vocab_size"], (batch, 8), generator=g)
        return torch.randn(batch, 8, 8, generator=g, dtype=dtype)
    return torch.randn(batch, 1, 8, 8, generator=g, dtype=dtype)


def _rel(y, y2):
    return float((y - y2).abs().max() / y.abs().max())


def _check_preserved(name, kw, dtype, sigma=0.99, seed=1):
    torch.manual_seed(seed)
    model = zoo.build(name, **kw).to(dtype)
    x = _input(name, kw, dtype=dtype)
    s = analyze(model, x[:2])
    worst = 0.0
    for mode in ("intra", "inter"):
        cob = random_cob(s, sigma, mode, torch.Generator().manual_seed(seed))
        tp = teleport(model, cob)
        for train in (False, True):
            a, b = copy.deepcopy(model).train(train), copy.deepcopy(tp).train(train)
            with torch.no_grad():
                worst = max(worst, _rel(a(x), b(x)))
    assert worst < TOL[dtype], (name, kw, dtype, worst)
    return worst, s


ZOO_FAST = [
    ("mlp", dict(act="relu")),
    ("mlp", dict(act="tanh", norm="batch")),
    ("mlp", dict(act="gelu", norm="layer")),
    ("mlp", dict(act="crelu", norm="lo", affine=True)),
    ("resnet_mlp", dict(blocks=3, width=16, norm="none", out_features=3)),
    ("vgg", dict(batch_norm=True)),
    ("vgg", dict(batch_norm=False)),
    ("resnet", dict()),
    ("densenet", dict()),
    ("simple_cnn", dict()),
    ("transformer", dict(attention="mha")),
    ("transformer", dict(attention="qkv", vocab_size=11)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kw", ZOO_FAST, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in ZOO_FAST])
def test_function_preserved_zoo(name, kw, dtype):
    """sigma = 0.99, intra and inter, train and eval mode."""
    _check_preserved(name, kw, dtype)


ZOO_ALL = (
    [("mlp", dict(act=a, norm=n, width=24)) for a in zoo.models.ACTIVATIONS for n in zoo.models.NORMS]
    + [("mlp", dict(act="relu", norm=n, affine=False, final_norm=True, width=24)) for n in ("batch", "layer", "lo")]
    + [("resnet_mlp", dict(blocks=3, width=16, act=a, norm=n, skip=sk, affine=af, out_features=3))
       for a in ("relu", "tanh") for n in ("none", "batch", "layer", "lo") for sk in ("identity", "gaussian")
       for af in (False, True)]
    + [("looks_linear_crelu_mlp", dict(norm=n)) for n in ("none", "batch")]
    + [("vgg", dict(batch_norm=b)) for b in (True, False)]
    + [("resnet", dict(depth=d)) for d in (10, 18)]
    + [("densenet", dict()), ("simple_cnn", dict())]
    + [("transformer", dict(attention=a, **e)) for a in ("mha", "qkv") for e in ({}, {"vocab_size": 13})]
)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_function_preserved_zoo_exhaustive(dtype):
    worst = {}
    for name, kw in ZOO_ALL:
        for sigma in (0.5, 0.9, 0.99):
            w, _ = _check_preserved(name, kw, dtype, sigma=sigma)
            worst[(name, str(kw))] = max(w, worst.get((name, str(kw)), 0.0))
    print(f"\nworst relative error ({dtype}): {max(worst.values()):.2e} over {len(worst)} configurations")


# ------------------------------------------------------------------------------------------------------------
def _grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,kw", [
    ("mlp", dict(act="relu")), ("mlp", dict(act="tanh", norm="batch")), ("resnet", dict()),
    ("transformer", dict(attention="mha")), ("transformer", dict(attention="qkv")), ("densenet", dict()),
])
def test_theorem_5_1_gradient_scaling(name, kw):
    """Seed 000 Theorem 5.1: dV = tau_in * dW / tau_out entrywise, i.e. grad_V = grad_W / factor (float64)."""
    torch.manual_seed(0)
    model = zoo.build(name, **kw).double().train()
    x = _input(name, kw)
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    s = analyze(model, x[:2])
    cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(3))
    tp = teleport(model, cob)
    gw, gv = _grads(model, x, y), _grads(tp, x, y)
    fac = weight_scale_factors(s, cob)
    params_v = dict(tp.named_parameters())
    worst = 0.0
    n_checked = 0
    preds = {n: g / fac[n] for n, g in gw.items()}
    # per-parameter relative error.  A bias in front of a train-mode BatchNorm has an exactly-zero gradient in
    # exact arithmetic (rounding noise ~1e-17 here): for such parameters only |dV| ~ noise is asserted.
    gmax = max(float(p.abs().max()) for p in preds.values())
    for name_p, pred in preds.items():
        if name_p not in params_v:  # a wrapped PReLU would be renamed; none in these models
            continue
        got = gv[name_p]
        if float(pred.abs().max()) < 1e-9 * gmax:
            assert float(got.abs().max()) < 1e-9 * gmax, name_p
        else:
            worst = max(worst, float((got - pred).abs().max() / pred.abs().max()))
        n_checked += 1
    assert n_checked == len(gw)
    assert worst < 1e-10, worst


# ------------------------------------------------------------------------------------------------------------
def _trained_mlp(steps=300):
    torch.manual_seed(0)
    model = zoo.build("mlp", in_features=20, out_features=5, depth=3, width=32).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=g, dtype=torch.float64)
    y = (x[:, :5] + 0.3 * torch.randn(256, 5, generator=g, dtype=torch.float64)).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_level_curve_100_inter_teleports():
    """Seed 000 Sec. 4.2: 100 inter-landscape teleports (sigma = 0.9) of a trained MLP keep the loss (source:
    average loss difference ~1e-10, float error) while moving the weights far (source: mean |W - V| 0.08 vs
    weight magnitude 0.18)."""
    model, x, y = _trained_mlp()
    s = analyze(model, x[:2])
    with torch.no_grad():
        loss0 = float(F.cross_entropy(model(x), y))
        w = torch.cat([p.reshape(-1) for p in model.parameters()])
        gen = torch.Generator().manual_seed(7)
        dloss, dist = [], []
        for _ in range(100):
            tp = teleport(model, random_cob(s, 0.9, "inter", gen))
            v = torch.cat([p.reshape(-1) for p in tp.parameters()])
            dloss.append(abs(float(F.cross_entropy(tp(x), y)) - loss0))
            dist.append(float((w - v).abs().mean() / w.abs().mean()))
    print(f"\nlevel curve: max |dloss| = {max(dloss):.2e}, mean |W-V| / mean |W| = {sum(dist) / 100:.2f} "
          f"(source: 0.08 / 0.18 = 0.44)")
    assert max(dloss) < 1e-10
    assert min(dist) > 0.2


# ------------------------------------------------------------------------------------------------------------
def _angles(model, s, x_all, y_all, batch, n, gen):
    """Angles (deg) between micro-teleport vectors and gradients; gradients and random vectors."""
    micro, rnd = [], []
    for i in range(n):
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=gen)
        model.zero_grad()
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        _, vec = micro_teleport(model, s, 1e-3, gen)
        r = torch.randn(g.shape, generator=gen, dtype=g.dtype)
        for out, v in ((micro, vec), (rnd, r)):
            c = float(torch.dot(g, v) / (g.norm() * v.norm()))
            out.append(math.degrees(math.acos(max(-1.0, min(1.0, c)))))
    return micro, rnd


@pytest.mark.parametrize("name,kw", [("mlp", dict(in_features=64, width=128, depth=2)),
                                     ("simple_cnn", dict(channels=(8, 16))),
                                     ("resnet", dict(width=4))])
@pytest.mark.parametrize("batch", [8, 64])
def test_micro_teleport_perpendicular_to_gradients(name, kw, batch):
    """Seed 000 Sec. 4.3 / Conjecture 4.1: micro-teleport vectors (sigma = 1e-3) are perpendicular to
    back-propagated gradients for any batch size and data (random data, random labels here), while gradient-vs-
    random angles spread much wider (Fig. 4)."""
    torch.manual_seed(0)
    model = zoo.build(name, **kw).train()
    gen = torch.Generator().manual_seed(1)
    x = _input(name, kw, batch=256, dtype=torch.float32, seed=2)
    y = torch.randint(0, 10, (256,), generator=gen)
    s = analyze(model, x[:2])
    micro, rnd = _angles(model, s, x, y, batch, 20, gen)
    dev_micro = sum(abs(a - 90) for a in micro) / len(micro)
    dev_rnd = sum(abs(a - 90) for a in rnd) / len(rnd)
    print(f"\n{name} batch {batch}: mean |angle - 90| micro-teleport vs gradient = {dev_micro:.4f} deg, "
          f"random vs gradient = {dev_rnd:.4f} deg")
    assert dev_micro < 0.1
    assert dev_rnd > 5 * dev_micro


# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [("vgg", dict(batch_norm=True)), ("resnet", dict()), ("densenet", dict())])
def test_plain_module_result_loads_into_fresh_instance(name, kw):
    """With tau > 0 and positively homogeneous activations no module is rewritten: the teleported state_dict loads
    into a fresh instance of the user's class (BatchNorm included) and computes the same function."""
    torch.manual_seed(0)
    model = zoo.build(name, **kw).double()
    x = _input(name, kw)
    with torch.no_grad():  # non-trivial running statistics
        model.train()(x)
    s = analyze(model, x[:2])
    cob = random_cob(s, 0.9, "intra", torch.Generator().manual_seed(5))
    tp = teleport(model, cob)
    assert type(tp) is type(model)
    assert not any(isinstance(m, TeleportedActivation) for m in tp.modules())
    fresh = zoo.build(name, **kw).double()
    fresh.load_state_dict(tp.state_dict(), strict=True)
    changed = sum(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert changed > 0
    for train in (False, True):
        a, b = copy.deepcopy(model).train(train), copy.deepcopy(fresh).train(train)
        with torch.no_grad():
            assert _rel(a(x), b(x)) < 1e-12
    # inter-landscape: ReLU/max-pool with tau < 0 are rewritten; the plain network would compute something else
    cob_i = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(5))
    tpi = teleport(model, cob_i)
    assert type(tpi) is type(model) and any(isinstance(m, TeleportedActivation) for m in tpi.modules())
    plain = zoo.build(name, **kw).double()
    sd = {k: v for k, v in tpi.state_dict().items() if not k.endswith(".tau")}
    plain.load_state_dict({k.replace(".inner.", "."): v for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        model.eval(), tpi.eval(), plain.eval()
        assert _rel(model(x), tpi(x)) < 1e-12
        assert _rel(model(x), plain(x)) > 1e-3  # the wrapped activations are needed


# ------------------------------------------------------------------------------------------------------------
def test_undo_and_compose():
    torch.manual_seed(0)
    model = zoo.build("mlp", act="tanh", norm="batch", width=16).double()
    x = _input("mlp", {})
    s = analyze(model, x[:2])
    g = torch.Generator().manual_seed(0)
    c1, c2 = random_cob(s, 0.9, "inter", g), random_cob(s, 0.9, "inter", g)
    two = teleport(teleport(model, c1), c2)
    one = teleport(model, c1.compose(c2))
    for (n, a), b in zip(two.named_parameters(), one.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    with torch.no_grad():
        assert _rel(model(x), two(x)) < 1e-12
    back = teleport(teleport(model, c1), c1.inverse())
    assert not any(isinstance(m, TeleportedActivation) for m in back.modules())  # wrappers removed
    for a, b in zip(model.parameters(), back.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    # in place, with the optimizer-relevant identity of parameters kept
    m2 = copy.deepcopy(model)
    ids = [id(p) for p in m2.parameters()]
    out = teleport(m2, c1, inplace=True)
    assert out is m2 and [id(p) for p in m2.parameters()] == ids
    with torch.no_grad():
        assert _rel(model(x), m2(x)) < 1e-12


def test_factors_params_and_functional():
    torch.manual_seed(0)
    model = zoo.build("mlp", act="tanh", width=16).double()
    x = _input("mlp", {})
    s = analyze(model, x[:2])
    cob = random_cob(s, 0.7, "inter", torch.Generator().manual_seed(0))
    tp = teleport(model, cob)
    fac = weight_scale_factors(s, cob)
    assert set(fac) == {n for n, _ in model.named_parameters()}
    for (n, w), v in zip(model.named_parameters(), tp.parameters()):
        assert torch.equal((w * fac[n]).expand(w.shape), v.detach())
    assert needs_rewrite(s, cob)
    with pytest.raises(ValueError, match="functional_teleport"):
        teleported_params(model, s, cob)
    # differentiable functional form, exact for every CoB
    ft = functional_teleport(model, s)
    log_abs = cob.log_abs.clone().requires_grad_(True)
    c = CoB.from_vector(s, log_abs, cob.signs)
    out = ft(c, x)
    with torch.no_grad():
        assert _rel(model(x), out.detach()) < 1e-12
    out.pow(2).sum().backward()
    assert log_abs.grad is not None and bool(torch.isfinite(log_abs.grad).all())
    # the function does not depend on tau: its gradient w.r.t. log|tau| vanishes (up to rounding)
    assert float(log_abs.grad.abs().max()) < 1e-8 * float(out.detach().pow(2).sum())
    # relu + positive CoB: plain functional_call on the user's model
    relu = zoo.build("mlp", width=16).double()
    s2 = analyze(relu, x[:2])
    la = torch.zeros(s2.num_free, dtype=torch.float64, requires_grad=True)
    c2 = CoB.from_vector(s2, la + 0.3)
    p = teleported_params(relu, s2, c2)
    y = torch.func.functional_call(relu, p, (x,))
    with torch.no_grad():
        assert _rel(relu(x), y) < 1e-12


def test_function_call_activation_gives_graph_module():
    """CReLU uses F.relu: with tau < 0 the rewrite lives in a torch.fx.GraphModule (inplace refused)."""
    torch.manual_seed(0)
    model = zoo.build("mlp", act="crelu", width=8).double()
    x = _input("mlp", {})
    s = analyze(model, x[:2])
    cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(0))
    tp = teleport(model, cob)
    assert isinstance(tp, torch.fx.GraphModule)
    assert [n for n, _ in tp.named_parameters()] == [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        assert _rel(model(x), tp(x)) < 1e-12
    tp2 = teleport(tp, cob.inverse())  # composes the graph buffers
    with torch.no_grad():
        assert _rel(model(x), tp2(x)) < 1e-12
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="inplace=True"):
        teleport(model, cob, inplace=True)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    # intra: nothing to rewrite, plain Sequential
    assert type(teleport(model, random_cob(s, 0.9, "intra"))) is nn.Sequential


def test_pseudo_teleport_same_distance_random_direction():
    torch.manual_seed(0)
    model = zoo.build("mlp", width=16).double()
    x = _input("mlp", {})
    s = analyze(model, x[:2])
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    tp = teleport(model, random_cob(s, 0.8, "intra", torch.Generator().manual_seed(4)))
    ps = pseudo_teleport(model, s, 0.8, "intra", torch.Generator().manual_seed(4))
    v = torch.cat([p.detach().reshape(-1) for p in tp.parameters()])
    u = torch.cat([p.detach().reshape(-1) for p in ps.parameters()])
    assert abs(float((u - w).norm() / (v - w).norm()) - 1) < 1e-12
    cos = float(torch.dot(u - w, v - w) / ((u - w).norm() * (v - w).norm()))
    assert abs(cos) < 0.2
    with torch.no_grad():
        assert _rel(model(x), ps(x)) > 1e-3


def test_pseudo_teleport_l1_per_tensor_matches_each_tensors_l1_step():
    """The authors' reading (reference implementation): per parameter tensor, the L1 length of the teleport's step,
    in a random direction; tensors the CoB leaves unchanged stay put; the model itself is not modified."""
    torch.manual_seed(0)
    model = zoo.build("mlp", width=16).double()
    x = _input("mlp", {})
    s = analyze(model, x[:2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tp = teleport(model, random_cob(s, 0.9, "inter", torch.Generator().manual_seed(4)))
    ps = pseudo_teleport(model, s, 0.9, "inter", torch.Generator().manual_seed(4), norm="l1_per_tensor")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    moved = 0
    for (n, w), v, u in zip(model.named_parameters(), tp.parameters(), ps.parameters()):
        w, v, u = w.detach(), v.detach(), u.detach()
        l1_tele, l1_pseudo = float((v - w).abs().sum()), float((u - w).abs().sum())
        assert l1_pseudo == pytest.approx(l1_tele, rel=1e-12, abs=1e-300), n
        if l1_tele == 0:
            assert torch.equal(u, w)  # e.g. the output bias: tau = 1 at both ends
        else:
            moved += 1
            d_t, d_p = (v - w).reshape(-1), (u - w).reshape(-1)
            if d_t.numel() > 50:
                assert abs(float(d_t @ d_p / (d_t.norm() * d_p.norm()))) < 0.3  # a random direction
    assert moved >= 3
    with torch.no_grad():
        assert _rel(model(x), ps(x)) > 1e-3
    # the L2 reading is unchanged by the new option (same draws as before for the default)
    a = pseudo_teleport(model, s, 0.9, "inter", torch.Generator().manual_seed(4))
    b = pseudo_teleport(model, s, 0.9, "inter", torch.Generator().manual_seed(4), norm="l2")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="unknown pseudo-teleport norm 'l1'; accepted: l2, l1_per_tensor"):
        pseudo_teleport(model, s, 0.9, "inter", norm="l1")


def test_random_cob_distribution():
    """tau ~ U[1 - sigma, 1 + sigma] (intra) or with random sign (inter), seed 000 Sec. 4.1."""
    model = zoo.build("mlp", width=200, depth=3)
    s = analyze(model, torch.randn(2, 64))
    g = torch.Generator().manual_seed(0)
    t = random_cob(s, 0.5, "intra", g).tau
    assert float(t.min()) >= 0.5 and float(t.max()) <= 1.5 and abs(float(t.mean()) - 1) < 0.05
    t = random_cob(s, 0.5, "inter", g).tau
    frac_neg = float((t < 0).double().mean())
    assert 0.4 < frac_neg < 0.6 and float(t.abs().min()) >= 0.5 and float(t.abs().max()) <= 1.5


# ------------------------------------------------------------------------------------------------------------
class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return x


class _MaxFeat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h - h.amax(dim=-1, keepdim=True))


def _sd(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_clear_errors_model_unchanged():
    with pytest.raises(ValueError, match="could not trace _Untraceable.*leaf_modules"):
        analyze(_Untraceable(), torch.randn(2, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        analyze(lambda x: x, torch.randn(2, 4))
    torch.manual_seed(0)
    model = zoo.build("mlp", width=8).double()
    x = torch.randn(2, 64, dtype=torch.float64)
    s = analyze(model, x)
    before = _sd(model)
    for bad in (0.0, float("nan"), float("inf")):
        tau = torch.ones(s.num_free, dtype=torch.float64)
        tau[3] = bad
        with pytest.raises(ValueError, match="finite and non-zero"):
            CoB(s, tau)
    with pytest.raises(ValueError, match="shape"):
        CoB(s, torch.ones(s.num_free + 1))
    with pytest.raises(ValueError, match="sigma"):
        random_cob(s, 1.0)
    with pytest.raises(ValueError, match="mode"):
        random_cob(s, 0.5, "sideways")
    # a CoB of another structure
    other = zoo.build("mlp", width=9).double()
    s_other = analyze(other, x)
    with pytest.raises(ValueError, match="does not match this model"):
        teleport(model, random_cob(s_other, 0.5), inplace=True)
    with pytest.raises(ValueError, match="different structure"):
        weight_scale_factors(s, random_cob(s_other, 0.5))
    assert _same(before, _sd(model))
    # sign constraint: amax over features needs tau > 0
    mf = _MaxFeat().double()
    sm = analyze(mf, torch.randn(2, 4, dtype=torch.float64))
    # h - amax(h) ties the 6 hidden taus into one (the subtraction), which amax constrains to be positive
    assert sm.num_free == 1 and int(sm.positive.sum()) == 1
    tau = torch.ones(sm.num_free, dtype=torch.float64)
    tau[int(sm.positive.nonzero()[0])] = -1.0
    with pytest.raises(ValueError, match="sign constraint"):
        CoB(sm, tau)
    bmf = _sd(mf)
    cob = random_cob(sm, 0.9, "inter")
    assert bool((cob.tau[sm.positive] > 0).all())
    tp = teleport(mf, cob)
    xx = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(mf(xx), tp(xx)) < 1e-12
    assert _same(bmf, _sd(mf))


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", [("mlp", dict(in_features=64, width=128, depth=2)),
                                     ("vgg", dict(batch_norm=True)), ("resnet", dict(width=8)),
                                     ("densenet", dict())])
def test_micro_teleport_100_per_config(name, kw):
    """The source's protocol size: 100 micro-teleports per (model, batch size)."""
    torch.manual_seed(0)
    model = zoo.build(name, **kw).train()
    gen = torch.Generator().manual_seed(1)
    x = _input(name, kw, batch=256, dtype=torch.float32, seed=2)
    y = torch.randint(0, 10, (256,), generator=gen)
    s = analyze(model, x[:2])
    for batch in (8, 64):
        micro, rnd = _angles(model, s, x, y, batch, 100, gen)
        dev_micro = sum(abs(a - 90) for a in micro) / 100
        dev_rnd = sum(abs(a - 90) for a in rnd) / 100
        print(f"\n{name} batch {batch}: mean |angle-90| micro {dev_micro:.4f} deg, random {dev_rnd:.4f} deg")
        assert dev_micro < 0.1 and dev_rnd > 5 * dev_micro


# ------------------------------------------------------------------------------------------------------------
# fast in-place path (cached plans, parameter walk, batched factors) -- issue 9 benchmark target
def test_param_walk_matches_parameters_order():
    from gradcond.teleport.scaling import _walk_params

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Sequential(self.a, nn.ReLU(), nn.Linear(3, 2))
            self.c = self.b  # same module under two names

    for m in [Shared()] + [zoo.build(n, **kw) for n, kw in ZOO_FAST]:
        assert [id(p) for p in _walk_params(m)] == [id(p) for p in m.parameters()]


def test_fast_wrapper_equals_constructor():
    g = nn.GELU().eval()
    tau = torch.rand(5) + 0.5
    a, b = TeleportedActivation(g, tau, "scale"), TeleportedActivation._make(g, tau.clone(), "scale")
    assert a.__dict__.keys() == b.__dict__.keys() and a.training == b.training == g.training
    assert a.state_dict().keys() == b.state_dict().keys() and a._buffers is not b._buffers
    x = torch.randn(4, 5)
    assert torch.equal(a(x), b(x))
    c = TeleportedActivation._make(nn.ReLU(), torch.ones(5), "sign")
    assert b._modules["inner"] is g and c.kind == "sign" and torch.equal(c.tau, torch.ones(5))
    assert list(b.state_dict()) == ["tau"] and b.tau.data_ptr() != a.tau.data_ptr()


def test_fast_path_rechecks_tau_and_model():
    torch.manual_seed(0)
    model = zoo.build("mlp", width=8)
    x = torch.randn(4, 64)
    s = analyze(model, x[:2])
    cob = random_cob(s, 0.5, "inter", torch.Generator().manual_seed(0))
    teleport(model, cob, inplace=True)  # caches the plan and this model's parameter layout
    before = _sd(model)
    for bad in (0.0, float("nan"), float("inf")):
        c = random_cob(s, 0.5)
        c.tau[3] = bad  # edited after construction: caught by teleport's vectorised re-check
        with pytest.raises(ValueError, match="finite and non-zero"):
            teleport(model, c, inplace=True)
        with pytest.raises(ValueError, match="finite and non-zero"):
            teleport(model, c)
        assert _same(before, _sd(model))
    # a tau valid in float64 whose reciprocal overflows float32
    tiny = torch.ones(s.num_free, dtype=torch.float64)
    tiny[0] = 1e-40
    with pytest.raises(ValueError, match="float32"):
        teleport(model, CoB(s, tiny), inplace=True)
    assert _same(before, _sd(model))
    # the model changed since the cached check: a layer replaced by one of another shape
    model[2] = nn.Linear(8, 9)
    before = _sd(model)
    with pytest.raises(ValueError, match="does not match this model"):
        teleport(model, cob, inplace=True)
    assert _same(before, _sd(model))


def test_fast_path_equals_factor_definition_and_inverse_unwraps():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        model = zoo.build("transformer").to(dtype)
        x = torch.randn(3, 8, 8, dtype=dtype)
        s = analyze(model, x[:2])
        cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(1))
        fac = weight_scale_factors(s, cob)
        ref = {n: p.detach() * fac[n].to(dtype) for n, p in model.named_parameters()}
        m2 = copy.deepcopy(model)
        with torch.no_grad():
            y = model(x)
        teleport(m2, cob, inplace=True)
        got = dict(m2.named_parameters())
        got = {n.replace(".inner.", "."): p for n, p in got.items()}
        # float64: bit-identical to the definition; float32: factors are multiplied in float32 (a few ulps)
        err = max(float(((got[n].detach() - ref[n]).abs() / ref[n].abs().clamp_min(1e-30)).max()) for n in ref)
        assert err == 0.0 if dtype == torch.float64 else err < 1e-6, (dtype, err)
        assert isinstance(m2.blocks[0].act, TeleportedActivation) and _rel(y, m2(x).detach()) < TOL[dtype]
        teleport(m2, cob.inverse(), inplace=True)  # taus compose back to 1: the user's GELU modules return
        assert type(m2.blocks[0].act) is nn.GELU and type(m2.blocks[1].act) is nn.GELU
        assert _rel(y, m2(x).detach()) < TOL[dtype]


def test_mixed_dtype_parameters_use_general_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    s = analyze(model, torch.randn(2, 4, dtype=torch.float64))
    model[2].float()
    cob = random_cob(s, 0.9, "intra", torch.Generator().manual_seed(0))
    fac = weight_scale_factors(s, cob)
    ref = {n: p.detach() * fac[n].to(p.dtype) for n, p in model.named_parameters()}
    # this model cannot run a forward (float64 then float32 layers): the self-check refuses, the model is unchanged
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="self-check could not run the model on the analysis example"):
        teleport(model, cob, inplace=True)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    teleport(model, cob, inplace=True, check=False)
    assert all(torch.equal(p.detach(), ref[n]) for n, p in model.named_parameters())
