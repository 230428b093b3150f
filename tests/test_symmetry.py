"""Symmetry-teleport baseline (Zhao et al. 2022, seed 001 Section 2.1; issue 4)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.teleport.symmetry import SymmetryTeleport, SymmetryTeleportCallback, TeleportError, parse_mlp
from gradcond.train import fit


def _mlp(d_in=20, width=40, d_out=5, depth=3, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    mods, d = [], d_in
    for i in range(depth - 1):
        mods += [nn.Linear(d, width, bias=bias), nn.LeakyReLU(0.1)]
        d = width
    mods.append(nn.Linear(d, d_out, bias=bias))
    return nn.Sequential(*mods).to(dtype)


def _data(n=12, d_in=20, d_out=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(n, d_out, generator=g, dtype=dtype)


# exact action: loss kept to rounding (float64 / float32 bounds)
EXACT_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("action", ["inverse", "expm"])
@pytest.mark.parametrize("bias", [True, False])
def test_exact_action_keeps_loss_first_order_does_not(dtype, action, bias):
    model = _mlp(bias=bias, dtype=dtype)
    x, y = _data(dtype=dtype)
    exact = copy.deepcopy(model)
    r = SymmetryTeleport("mse", eta=0.5, steps=4, action=action).teleport(exact, (x, y)).batches[0]
    assert r.steps == 4
    assert r.rel_loss_change < EXACT_TOL[dtype]
    assert r.grad_norm_after > r.grad_norm_before * 1.01
    # the authors' W(I - T) with stale activations: same ascent, the loss moves at first order
    # (so the batch-loss guard, on by default, is switched off to see it)
    fo = copy.deepcopy(model)
    r1 = SymmetryTeleport("mse", eta=0.5, steps=4, action="first_order", batch_loss_tol=None).teleport(
        fo, (x, y)).batches[0]
    assert r1.rel_loss_change > max(1e-5, 100 * r.rel_loss_change)


def test_action_is_identity_at_zero_and_a_group_action():
    """e.W = W and g2.(g1.W) = (g2 g1).W for one layer pair (exact modes)."""
    model = _mlp(depth=2)
    x, _ = _data()
    tp = SymmetryTeleport("mse", action="inverse")
    mlp = parse_mlp(model)
    Ws = tp._weights(mlp)
    biases = [True, True]
    dims = [40, 5]
    X = x.T
    zero = [torch.zeros(40, 40, dtype=torch.float64)]
    for a, b in zip(tp._apply(mlp, X, Ws, zero, biases, dims), Ws):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.manual_seed(3)
    T1 = [0.05 * torch.randn(40, 40, dtype=torch.float64)]
    T2 = [0.05 * torch.randn(40, 40, dtype=torch.float64)]
    I = torch.eye(40, dtype=torch.float64)
    two_steps = tp._apply(mlp, X, tp._apply(mlp, X, Ws, T1, biases, dims), T2, biases, dims)
    composed = [(I + b) @ (I + a) - I for a, b in zip(T1, T2)]  # g2 g1 = I + T12
    one_step = tp._apply(mlp, X, Ws, composed, biases, dims)
    for a, b in zip(two_steps, one_step):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_lie_algebra_gradient_matches_finite_difference():
    """T = eta * d/dT 1/2||grad_W L(g.W)||^2 at T = 0: one applied step against central differences."""
    model = _mlp(width=16, d_in=8)
    x, y = _data(n=6, d_in=8)
    eta = 0.5
    tp = SymmetryTeleport("mse", eta=eta, steps=1, action="inverse")
    mlp = parse_mlp(model)
    W0 = tp._weights(mlp)

    def obj_at(Ts):
        Ws = [W.requires_grad_() for W in tp._apply(mlp, x.T, W0, Ts, [True] * 3, [16, 16, 5])]
        L = F.mse_loss(torch.func.functional_call(model, tp._params(mlp, Ws), (x,)), y)
        return 0.5 * sum((v ** 2).sum() for v in torch.autograd.grad(L, Ws))

    seen = []
    orig = tp._apply

    def spy(mlp_, X, Ws, Ts, biases, dims):
        seen.append([t.clone() for t in Ts])
        return orig(mlp_, X, Ws, Ts, biases, dims)

    tp._apply = spy
    tp.teleport(copy.deepcopy(model), (x, y))
    T_last = seen[0][1] / eta
    h = 1e-6
    for i in range(16):
        for j in (0, 5, 11):
            E = torch.zeros(16, 16, dtype=torch.float64)
            E[i, j] = 1.0
            zero = torch.zeros(16, 16, dtype=torch.float64)
            fd = (obj_at([zero, h * E]) - obj_at([zero, -h * E])) / (2 * h)
            torch.testing.assert_close(T_last[i, j], fd, rtol=1e-4, atol=1e-6)


def test_bad_models():
    x, y = _data()
    with pytest.raises(ValueError, match="layer '1' \\(ReLU\\) is not supported"):
        SymmetryTeleport("mse").teleport(nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 5)), (x.float(), y.float()))
    with pytest.raises(ValueError, match="the last module must be an nn.Linear"):
        parse_mlp(nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2), nn.LeakyReLU(0.1)))
    with pytest.raises(ValueError, match="at least two nn.Linear"):
        parse_mlp(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="needs an nn.Sequential MLP"):
        parse_mlp(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="action must be one of"):
        SymmetryTeleport(action="taylor")


def test_nonfinite_restores_model_and_optimizer():
    model = _mlp(dtype=torch.float32)
    x, y = _data(dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    osd = copy.deepcopy(opt.state_dict())
    calls = {"n": 0}

    def poisoned(out, target):
        calls["n"] += 1
        loss = F.mse_loss(out, target)
        return loss + 0.0 * torch.sqrt(out - out).sum() if calls["n"] > 2 else loss

    with pytest.raises(TeleportError, match="non-finite gradient"):
        SymmetryTeleport(poisoned, eta=0.1).teleport(model, (x, y), optimizer=opt, optimizer_state="reset")
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    new = opt.state_dict()
    assert all(torch.equal(new["state"][i][k], osd["state"][i][k]) for i in osd["state"] for k in osd["state"][i])


def test_callback_with_trainer():
    d = load_dataset("digits", form="flat")
    tr, te = d.loaders(64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LeakyReLU(0.1), nn.Linear(64, 64), nn.LeakyReLU(0.1), nn.Linear(64, 10))
    cb = SymmetryTeleportCallback(eta=0.05, steps=2, schedule=1, num_batches=2, batch_size=16, optimizer_state="reset")
    h = fit(model, tr, te, optimizer="momentum", lr=0.01, epochs=1, callbacks=[cb])
    ev = [e for e in h.events if e["kind"] == "teleport"]
    assert len(ev) == 1 and ev[0]["method"] == "symmetry" and ev[0]["optimizer_state"] == "reset"
    assert ev[0]["max_rel_loss_change"] < 1e-4
    assert all(a > b for a, b in zip(ev[0]["grad_norm_after"], ev[0]["grad_norm_before"]))


def test_default_callback_in_a_configured_run_teleports(run_cli, tmp_path):
    """Issue 20: ``[[callbacks]] name = "symmetry_teleport"`` with every option at its default, on the
    zoo MLP (LeakyReLU) in a ``gradcond run`` (float32), teleports successfully at least once."""
    import json

    rc, _, err = run_cli("run", "--out", str(tmp_path), "--quiet", "--set", "train.epochs=1",
                         "--set", "model.act=leaky_relu", "--set", 'callbacks=[{name="symmetry_teleport"}]',
                         "--set", "name=sym")
    assert rc == 0, err
    events = [json.loads(line) for line in (tmp_path / "sym" / "events.jsonl").read_text().splitlines()]
    ok = [e for e in events if e["kind"] == "teleport"]
    assert [e["kind"] for e in events if e["kind"].startswith("teleport")] == ["teleport"]  # no refusal
    ev = ok[0]
    assert ev["method"] == "symmetry" and ev["batches"] >= 1 and ev["steps"] >= 1
    assert ev["max_rel_loss_change"] < 1e-3  # float32, exact action
    assert all(a > b for a, b in zip(ev["grad_norm_after"], ev["grad_norm_before"]))
    assert ev["stopped_by"] in (None, "batch_loss_change", "held_out_loss", "weight_growth", "non_finite")


def test_step_size_control_keeps_every_step_within_the_limit():
    """max_step_change: each applied step moves every layer by at most that fraction of its norm;
    without it the same ascent overflows (the failure of the default callback in issue 20)."""
    d = load_dataset("digits", form="flat")
    X, Y = d.train.tensors
    torch.manual_seed(0)
    model = zoo.mlp(in_features=64, out_features=10, depth=4, width=32, act="leaky_relu")  # LeakyReLU(0.01)
    x, y = X[:16], Y[:16]
    tp = SymmetryTeleport("cross_entropy", eta=0.01, steps=8, batch_loss_tol=None, max_weight_growth=None)
    applied = []
    orig = tp._apply

    def spy(mlp_, X_, Ws, Ts, biases, dims):
        out = orig(mlp_, X_, Ws, Ts, biases, dims)
        applied.append((Ws, out))
        return out

    tp._apply = spy
    r = tp.teleport(copy.deepcopy(model), (x, y)).batches[0]
    assert r.steps >= 1 and r.rel_loss_change < 1e-3 and r.grad_norm_after > r.grad_norm_before
    # the accepted steps are the last try of each step; check all tries that were accepted
    accepted = [(a, b) for a, b in applied
                if all(torch.isfinite(w).all() for w in b)
                and all(float((w1 - w0).norm()) <= 0.05 * float(w0.norm()) for w0, w1 in zip(a, b))]
    assert len(accepted) == r.steps
    assert r.backtracks == len(applied) - r.steps
    with pytest.raises(TeleportError):
        SymmetryTeleport("cross_entropy", eta=0.01, steps=8, max_step_change=None, batch_loss_tol=None,
                         max_weight_growth=None).teleport(copy.deepcopy(model), (x, y))
    with pytest.raises(ValueError, match="max_step_change must be > 0 or None, got 0"):
        SymmetryTeleport(max_step_change=0)
