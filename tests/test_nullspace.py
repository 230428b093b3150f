"""Null-space gradient-projection teleport (seed 001, Algorithm 1; issue 4)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.teleport.nullspace import (
    NullSpaceTeleport,
    NullSpaceTeleportCallback,
    TeleportError,
    TeleportRejected,
    null_space_basis,
    supported_layers,
)
from gradcond.train import fit

# relative loss change allowed per teleport with tau = 1 (issue 4 "Must show": < 1e-4);
# float64 is held to a much tighter bound (rounding only).
REL_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_sd(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_opt(a, b):
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for k in a["state"]:
        sa, sb = a["state"][k], b["state"][k]
        if sa.keys() != sb.keys():
            return False
        for kk in sa:
            va, vb = sa[kk], sb[kk]
            if torch.is_tensor(va):
                if not torch.equal(va, vb):
                    return False
            elif va != vb:
                return False
    return True


def _layer_outputs(model, x, types=(nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)):
    outs, hs = {}, []
    for n, m in model.named_modules():
        if isinstance(m, types):
            hs.append(m.register_forward_hook(
                lambda mod, a, o, n=n: outs.__setitem__(n, (o[0] if isinstance(o, tuple) else o).detach().clone())))
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return outs


@pytest.fixture(scope="module")
def digits():
    return {f: load_dataset("digits", form=f) for f in ("flat", "image", "sequence")}


def _case(kind, digits, dtype):
    torch.manual_seed(0)
    if kind == "mlp":
        model, form, n = zoo.mlp(in_features=64, width=128, depth=3), "flat", 32
    elif kind == "cnn":
        model, form, n = zoo.simple_cnn(), "image", 8
    else:
        model = zoo.transformer(d_model=32, nhead=2, dim_ff=64, attention=kind.split("-")[1])
        form, n = "sequence", 3
    X, Y = digits[form].train.tensors
    return model.to(dtype), X[:n].to(dtype), Y[:n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer-mha", "transformer-qkv"])
def test_tau1_keeps_batch_loss_and_raises_grad_norm(kind, digits, dtype):
    model, x, y = _case(kind, digits, dtype)
    before = _layer_outputs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # first conv / embedding layers have an empty null space
        res = NullSpaceTeleport("cross_entropy", eta=0.05, steps=8, cap_ratio=4).teleport(model, (x, y))
    rec = res.batches[0]
    assert rec.steps >= 1
    assert rec.rel_loss_change < REL_TOL[dtype]
    assert rec.grad_norm_after > rec.grad_norm_before * 1.01
    # every layer's output on the teleport batch is unchanged (eqs. 11-13 keep W x fixed)
    after = _layer_outputs(model, x)
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    for k in before:
        scale = before[k].abs().max().clamp_min(1.0)
        assert (after[k] - before[k]).abs().max() <= tol * scale, k


def test_update_equals_independent_projection():
    """One step on one Linear layer = eta * G (I - R R^+) with G = grad of 1/2||grad L||^2 (eqs. 4, 5, 11)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5)).double()
    x, y = torch.randn(12, 20, dtype=torch.float64), torch.randint(0, 5, (12,))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def obj(p):
        g = torch.func.grad(lambda q: F.cross_entropy(torch.func.functional_call(model, q, (x,)), y))(p)
        return 0.5 * sum((v ** 2).sum() for v in g.values())

    G = torch.func.grad(obj)(params)
    h = torch.tanh(x @ params["0.weight"].T + params["0.bias"])  # input of layer "2"
    R = torch.cat([h, torch.ones(12, 1, dtype=torch.float64)], 1).T  # (31, 12), eq. 8 with bias row
    P = R @ torch.linalg.pinv(R)
    Gaug = torch.cat([G["2.weight"], G["2.bias"][:, None]], 1)
    expected = Gaug - Gaug @ P
    eta = 0.3
    NullSpaceTeleport("cross_entropy", layers=["2"], eta=eta, steps=1).teleport(model, (x, y))
    got = torch.cat([model[2].weight - params["2.weight"], (model[2].bias - params["2.bias"])[:, None]], 1) / eta
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    assert torch.equal(model[0].weight, params["0.weight"])  # unselected layer untouched


def test_null_space_basis_energy_rule():
    """k = min{k : ||R_k||_F^2 >= tau ||R||_F^2} (eq. 3), capped by the numerical rank."""
    torch.manual_seed(2)
    feats = torch.randn(50, 4, dtype=torch.float64) @ torch.randn(4, 12, dtype=torch.float64)  # rank 4
    s = torch.linalg.svdvals(feats)
    e = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    for tau in (0.5, 0.9, 0.99, 0.999999):
        B, k = null_space_basis(feats, tau)
        assert k == int((e < tau).sum()) + 1
        assert B.shape == (12, k)
        torch.testing.assert_close(B.T @ B, torch.eye(k, dtype=torch.float64))
    B, k = null_space_basis(feats, 1.0)
    assert k == 4  # exact null space has dimension 12 - 4
    torch.testing.assert_close(feats - feats @ B @ B.T, torch.zeros_like(feats), atol=1e-10, rtol=0)
    _, kb = null_space_basis(feats, 1.0, bias=True)
    assert kb == 5


def test_smaller_tau_bigger_null_space_faster_ascent(digits):
    model, x, y = _case("mlp", digits, torch.float64)
    gains, ranks = [], []
    for tau in (1.0, 0.9):
        m = copy.deepcopy(model)
        r = NullSpaceTeleport("cross_entropy", eta=0.05, steps=4, tau=tau).teleport(m, (x, y)).batches[0]
        gains.append(r.grad_norm_after / r.grad_norm_before)
        ranks.append(sum(r.ranks.values()))
    assert ranks[1] < ranks[0] and gains[1] > gains[0]


def test_conv_variants_and_cross_attention_keep_outputs():
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(4, 6, 3, stride=2, padding=1, padding_mode="reflect")
            self.c2 = nn.Conv2d(6, 8, 3, padding="same", groups=2, dilation=1, bias=False)
            self.c3 = nn.Conv2d(8, 8, 2, stride=2, groups=4)
            self.mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=7)
            self.head = nn.Linear(8, 3)

        def forward(self, x, ctx_k, ctx_v):
            h = torch.relu(self.c1(x))  # (n, 6, 8)
            h = torch.relu(self.c2(h.reshape(h.shape[0], 6, 2, 4)))
            h = torch.relu(self.c3(h))  # (n, 8, 1, 2)
            q = h.flatten(2).permute(2, 0, 1)  # (T=2, n, 8)
            a, _ = self.mha(q, ctx_k, ctx_v)
            return self.head(a.mean(0))

    net = Net().double()
    n = 3
    x = torch.randn(n, 4, 16, dtype=torch.float64)
    ck, cv = torch.randn(4, n, 5, dtype=torch.float64), torch.randn(4, n, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))

    class Wrap(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x, ck, cv)

    model = Wrap(net)
    before = _layer_outputs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = NullSpaceTeleport("cross_entropy", eta=0.1, steps=3).teleport(model, (x, y)).batches[0]
    assert {"net.c2.g0", "net.c2.g1", "net.c3.g3", "net.mha.q", "net.mha.k", "net.mha.out"} <= set(r.ranks)
    assert r.dims["net.c2.g0"] == 3 * 9 and r.dims["net.c3.g0"] == 2 * 4 + 1 and r.dims["net.mha.k"] == 6
    after = _layer_outputs(model, x)
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-9, rtol=1e-9)
    assert r.grad_norm_after > r.grad_norm_before
    assert any(not torch.equal(a, b) for a, b in zip(_sd(model).values(), _sd(Wrap(Net().double())).values()))


def test_batchnorm_buffers_untouched_and_dropout_off():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(10, 40), nn.BatchNorm1d(40), nn.ReLU(), nn.Dropout(0.5), nn.Linear(40, 3))
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    r = NullSpaceTeleport("cross_entropy", eta=0.1, steps=3).teleport(model, (x, y)).batches[0]
    assert all(torch.equal(v, bufs[k]) for k, v in model.named_buffers())
    assert model.training and model[3].training
    assert r.rel_loss_change < 1e-4  # deterministic forward (dropout off) and BN batch statistics unchanged


def test_bad_layer_selection():
    model = zoo.transformer(d_model=16, nhead=2, dim_ff=16)
    tp = NullSpaceTeleport("cross_entropy", layers=["norm"])
    x, y = torch.randn(2, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"layer 'norm' \(LayerNorm\) is not supported by NullSpaceTeleport"):
        tp.teleport(model, (x, y))
    with pytest.raises(ValueError, match="output projection of a MultiheadAttention"):
        NullSpaceTeleport("cross_entropy", layers=["blocks.0.attn.attn.out_proj"]).teleport(model, (x, y))
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        NullSpaceTeleport("cross_entropy", layers=["nope"]).teleport(model, (x, y))
    with pytest.raises(ValueError, match="tau must be in"):
        NullSpaceTeleport(tau=1.5)
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        NullSpaceTeleport("cross_entropy").teleport(model, (x, y), optimizer_state="transport")
    # issue 19: an nn.Embedding is a layer (one-hot representation), so the learned positions are supported
    assert "pos" in supported_layers(model) and "blocks.0.attn.attn.out_proj" not in supported_layers(model)


def test_empty_null_space_warns_and_skips():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    sd = _sd(model)
    with pytest.warns(UserWarning, match="empty input null space"):
        r = NullSpaceTeleport("cross_entropy", eta=0.1).teleport(model, (x, y)).batches[0]
    assert set(r.skipped) == {"0", "2"} and r.ranks == {"0": 4, "2": 5}
    assert _same_sd(sd, _sd(model))


@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "adagrad", "adam"])
def test_nonfinite_restores_model_and_optimizer(opt_name):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1), "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
           "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1), "adam": lambda p: torch.optim.Adam(p, lr=0.1)}[opt_name](model.parameters())
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    sd, osd = _sd(model), copy.deepcopy(opt.state_dict())
    calls = {"n": 0}

    def poisoned(out, target):  # finite for the first few calls, then a NaN gradient
        calls["n"] += 1
        loss = F.cross_entropy(out, target)
        return loss + 0.0 * torch.sqrt(out - out).sum() if calls["n"] > 3 else loss

    with pytest.raises(TeleportError, match="non-finite gradient"):
        NullSpaceTeleport(poisoned, eta=0.1, steps=8).teleport(model, (x, y), optimizer=opt, optimizer_state="reset")
    assert _same_sd(sd, _sd(model)) and _same_opt(osd, opt.state_dict())


@pytest.mark.parametrize("opt_name", ["momentum", "adagrad", "adam"])
def test_optimizer_state_keep_and_reset(opt_name):
    torch.manual_seed(7)
    make = {"momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
            "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, initial_accumulator_value=0.1),
            "adam": lambda p: torch.optim.Adam(p, lr=0.05)}[opt_name]
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    opt = make(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    # keep: the optimizer state is bit-identical after the teleport
    osd = copy.deepcopy(opt.state_dict())
    NullSpaceTeleport("cross_entropy", eta=0.1, steps=2).teleport(model, (x, y), optimizer=opt, optimizer_state="keep")
    assert _same_opt(osd, opt.state_dict())
    # reset: the next step equals that of a freshly built optimizer at the teleported point
    NullSpaceTeleport("cross_entropy", eta=0.1, steps=2).teleport(model, (x, y), optimizer=opt, optimizer_state="reset")
    ref = copy.deepcopy(model)
    ref_opt = make(ref.parameters())
    for m, o in ((model, opt), (ref, ref_opt)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    assert _same_sd(_sd(model), _sd(ref))


def test_callback_schedule_warmup_events_and_resume(digits):
    d = digits["flat"]
    tr, te = d.loaders(64, seed=0)
    torch.manual_seed(0)
    model = zoo.mlp(in_features=64, width=64, depth=3)
    cb = NullSpaceTeleportCallback(eta=0.05, steps=2, schedule=(0, 1, 3), num_batches=2, batch_size=16,
                                   warmup_steps=5, held_out_size=64)
    h = fit(model, tr, te, optimizer="adam", lr=1e-3, epochs=3, callbacks=[cb])
    ev = [e for e in h.events if e["kind"] == "teleport"]
    assert [(e["epoch"], e["step"]) for e in ev] == [(0, 5), (1, len(tr))]  # epoch 3 never runs
    for e in ev:
        assert e["method"] == "nullspace" and e["batches"] == 2
        assert len(e["loss_before"]) == len(e["loss_after"]) == 2 and e["max_rel_loss_change"] < 1e-4
        assert e["held_out_loss_before"] is not None and e["held_out_loss_after"] is not None
        assert set(e["rank_kept"]) == {"0", "2", "4"} and e["time_s"] > 0
        assert all(a > b for a, b in zip(e["grad_norm_after"], e["grad_norm_before"]))
    assert cb.state_dict() == {"done": [0, 1], "count": 2}
    cb2 = NullSpaceTeleportCallback(eta=0.05)
    cb2.load_state_dict(cb.state_dict())
    assert cb2.state_dict() == cb.state_dict()
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        NullSpaceTeleportCallback(optimizer_state="transport")


def test_callback_nonfinite_warns_and_training_continues(digits):
    d = digits["flat"]
    tr, te = d.loaders(64, seed=0)
    torch.manual_seed(0)
    model = zoo.mlp(in_features=64, width=32, depth=2)

    def nan_loss(out, target):
        return F.cross_entropy(out, target) + 0.0 * torch.sqrt(out - out).sum()

    cb = NullSpaceTeleportCallback(eta=0.05, steps=2, schedule=1, num_batches=1, batch_size=8, loss=nan_loss)
    with pytest.warns(RuntimeWarning, match="teleport skipped"):
        h = fit(model, tr, te, optimizer="sgd", lr=0.01, epochs=1, callbacks=[cb])
    assert [e["kind"] for e in h.events] == ["teleport_failed"] and len(h.rows) == 1
    with pytest.raises(TeleportError):
        fit(model, tr, te, optimizer="sgd", lr=0.01, epochs=1, callbacks=[
            NullSpaceTeleportCallback(eta=0.05, steps=2, schedule=1, num_batches=1, batch_size=8, loss=nan_loss,
                                      on_nonfinite="raise")])


def test_max_loss_change_guard_undoes_the_violating_step():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    x, y = torch.randn(3, 1, 6, 6), torch.randint(0, 4, (3,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 10-dim first conv input has an empty null space
        # the default guards (issue 20) would refuse this runaway as a whole; switched off here to
        # look at the per-step max_loss_change option alone
        off = dict(batch_loss_tol=None, held_out_tol=None, max_weight_growth=None)
        free = NullSpaceTeleport("cross_entropy", eta=0.5, steps=8, **off).teleport(copy.deepcopy(model), (x, y)).batches[0]
        assert free.rel_loss_change > 1e-6  # runaway ascent: float32 rounding of huge weights moves the loss
        r = NullSpaceTeleport("cross_entropy", eta=0.5, steps=8, max_loss_change=1e-6, **off).teleport(
            model, (x, y)).batches[0]
    assert r.reverted and r.steps < 8 and r.rel_loss_change <= 1e-6


# --------------------------------------------------------------------------------------------
# issue 20: default guards (batch loss, held-out loss, weight growth, non-finite)
# --------------------------------------------------------------------------------------------

from gradcond.teleport.level_set import GUARD_REASONS  # noqa: E402

GUARDS_OFF = dict(batch_loss_tol=None, held_out_tol=None, max_weight_growth=None)
RUNAWAY_ETA = 5.0  # oversized for the zoo MLP on digits: the ascent runs away within one batch


def _runaway_case(digits, n_batches=2, dtype=torch.float32):
    from gradcond.teleport.level_set import sample_batches, split_held_out  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    held, pool = split_held_out(digits["flat"].train, 256, gen)
    batches = sample_batches(digits["flat"].train, n_batches, 32, gen, pool)
    held = (held[0].to(dtype), held[1])
    batches = [(x.to(dtype), y) for x, y in batches]
    torch.manual_seed(0)
    model = zoo.mlp(in_features=64, width=64, depth=3).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in batches:  # give the optimizer some state to protect
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, batches, held


def _max_growth(before, model):
    return max(float(p.detach().norm()) / float(before[n].norm()) for n, p in model.named_parameters())


def test_oversized_eta_runs_away_without_guards(digits):
    """The failure the guards exist for: weights blow up, the held-out loss is destroyed, and the
    teleport reports success."""
    model, _, batches, held = _runaway_case(digits)
    w0 = _sd(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = NullSpaceTeleport("cross_entropy", eta=RUNAWAY_ETA, **GUARDS_OFF).teleport(model, batches[:1], held_out=held)
    assert res.stopped_by is None and len(res.batches) == 1
    assert _max_growth(w0, model) > 100
    assert res.held_out_rel_change > 1.0  # more than doubled


@pytest.mark.parametrize("reason, opts", [
    ("batch_loss_change", {}),  # the defaults
    ("weight_growth", {"batch_loss_tol": None}),
    ("held_out_loss", {"batch_loss_tol": None, "max_weight_growth": None}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_guard_rolls_back_runaway_bit_identically(digits, reason, opts, dtype):
    model, opt, batches, held = _runaway_case(digits, dtype=dtype)
    sd, osd = _sd(model), copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TeleportRejected) as info:
            NullSpaceTeleport("cross_entropy", eta=RUNAWAY_ETA, **opts).teleport(
                model, batches, held_out=held, optimizer=opt, optimizer_state="reset")
    exc = info.value
    assert exc.reason == reason and isinstance(exc, TeleportError)
    limit = {"batch_loss_change": "batch_loss_tol = 0.001", "weight_growth": "max_weight_growth = 4",
             "held_out_loss": "held_out_tol = 0.05"}[reason]
    assert str(exc).startswith("teleport rolled back: teleport batch 0: ") and limit in str(exc)
    assert str(exc).endswith("model and optimizer were restored to their pre-teleport state")
    assert exc.result is not None and exc.result.stopped_by == reason and exc.result.batches == []
    assert _same_sd(sd, _sd(model)) and _same_opt(osd, opt.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sane_eta_passes_the_default_guards(digits, dtype):
    model, _, batches, held = _runaway_case(digits, dtype=dtype)
    res = NullSpaceTeleport("cross_entropy", eta=0.05).teleport(model, batches, held_out=held)
    assert res.stopped_by is None and res.stop_message is None and len(res.batches) == 2
    assert res.max_rel_loss_change < 1e-3
    assert all(b.grad_norm_after > b.grad_norm_before for b in res.batches)
    assert abs(res.held_out_rel_change) < 0.05


def test_guard_trip_on_a_later_batch_keeps_the_earlier_ones(digits):
    """Batch 0 passes, batch 1 exceeds max_weight_growth: the result is exactly batch 0 alone."""
    model, _, batches, held = _runaway_case(digits)
    start = _sd(model)
    kw = dict(eta=0.3, steps=8, batch_loss_tol=None, held_out_tol=None)
    one = copy.deepcopy(model)
    NullSpaceTeleport("cross_entropy", max_weight_growth=None, **kw).teleport(one, batches[:1])
    two = copy.deepcopy(model)
    NullSpaceTeleport("cross_entropy", max_weight_growth=None, **kw).teleport(two, batches)
    g1, g2 = _max_growth(start, one), _max_growth(start, two)
    assert 1 < g1 < g2  # the second batch grows the weights further
    res = NullSpaceTeleport("cross_entropy", max_weight_growth=(g1 + g2) / 2, **kw).teleport(model, batches)
    assert res.stopped_by == "weight_growth" and len(res.batches) == 1
    assert res.stop_message.startswith("teleport batch 1: the parameter norm of layer ")
    assert _same_sd(_sd(one), _sd(model))


def test_guard_options_are_validated():
    with pytest.raises(ValueError, match=r"batch_loss_tol must be a positive finite number or None \(guard off\), got -1"):
        NullSpaceTeleport(batch_loss_tol=-1)
    with pytest.raises(ValueError, match=r"held_out_tol must be a positive finite number or None"):
        NullSpaceTeleport(held_out_tol=float("nan"))
    with pytest.raises(ValueError, match=r"max_weight_growth must be a finite number > 1 or None \(guard off\), got 0.5"):
        NullSpaceTeleportCallback(max_weight_growth=0.5)


def test_callback_logs_rollback_with_reason_and_warns_once(digits):
    d = digits["flat"]
    tr, te = d.loaders(64, seed=0)
    torch.manual_seed(0)
    model = zoo.mlp(in_features=64, width=64, depth=3)
    seen = []

    from gradcond.train import Callback

    class Rec(Callback):  # listed before and after the teleport callback: weights just before/after it
        def on_epoch_start(self, state):
            seen.append(_sd(state.model))

    cb = NullSpaceTeleportCallback(eta=RUNAWAY_ETA, schedule=2, num_batches=2, batch_size=32)
    with pytest.warns(RuntimeWarning) as rec:
        warnings.simplefilter("ignore", UserWarning)
        h = fit(model, tr, te, optimizer="sgd", lr=0.01, epochs=2, callbacks=[Rec(), cb, Rec()])
    ours = [w for w in rec if "teleport" in str(w.message)]
    assert len(ours) == 1 and "teleport rolled back" in str(ours[0].message)  # warned once for two refusals
    ev = [e for e in h.events if e["kind"].startswith("teleport")]
    assert [e["kind"] for e in ev] == ["teleport_failed", "teleport_failed"]
    # epoch 0: a guard, not an overflow, caught the finite runaway; epoch 1: whichever trips first
    assert ev[0]["reason"] == "batch_loss_change"
    assert ev[0]["error"].startswith("teleport rolled back: teleport batch 0: the teleport-batch loss changed")
    assert ev[1]["reason"] in GUARD_REASONS
    for e in ev:
        assert e["error"].endswith("model and optimizer were restored to their pre-teleport state")
    assert _same_sd(seen[0], seen[1]) and _same_sd(seen[2], seen[3])  # bit-identical around each refusal


def test_held_out_batch_is_set_aside_from_the_teleport_batches():
    """The callback's held-out batch (training samples) never appears in a teleport batch."""
    from torch.utils.data import TensorDataset

    from gradcond.teleport.level_set import sample_batches, split_held_out

    ds = TensorDataset(torch.arange(100).float()[:, None], torch.arange(100))
    gen = torch.Generator().manual_seed(3)
    held, pool = split_held_out(ds, 30, gen)
    batches = sample_batches(ds, 20, 16, gen, pool)
    kept = set(held[1].tolist())
    assert len(kept) == 30 and set(pool.tolist()) == set(range(100)) - kept
    for x, y in batches:
        assert len(set(y.tolist())) == 16 and not kept & set(y.tolist())
        assert torch.equal(x[:, 0].long(), y)
    assert split_held_out(ds, 500, gen)[0][1].numel() == 50  # at most half the data set


def test_guards_switch_off_from_a_config():
    """TOML has no null: ``false`` turns a guard off in a ``[[callbacks]]`` table."""
    from gradcond.train.callbacks import build_callback

    cb = build_callback({"name": "nullspace_teleport", "batch_loss_tol": False, "held_out_tol": 0.2,
                         "max_weight_growth": False})
    g = cb.teleporter.guards
    assert (g.batch_loss_tol, g.held_out_tol, g.max_weight_growth) == (None, 0.2, None)
    sym = build_callback({"name": "symmetry_teleport", "max_step_change": False, "held_out_tol": False})
    assert sym.teleporter.max_step_change is None and sym.teleporter.guards.held_out_tol is None
    assert sym.batch_size is None  # chosen from the model at the first teleport


def test_float32_basis_comes_from_a_float64_svd():
    """A float32 representation with a wide spectrum (singular values 1 .. 1e-3, rank 20 of 48): the kept basis
    must span it to float32 rounding of B (leakage into the null space ~1e-8), not to the accuracy of a float32 SVD
    (eps32 * s_max / s_k, here ~6e-7), which moved a float32 MLP's batch loss by 2.5e-4 over a 32-batch teleport."""
    import numpy as np

    rng = np.random.RandomState(0)
    U, _ = np.linalg.qr(rng.randn(64, 20))
    V, _ = np.linalg.qr(rng.randn(48, 20))
    feats = torch.from_numpy((U * np.logspace(0, -3, 20)) @ V.T).float()
    B, k = null_space_basis(feats, 1.0)
    assert k == 20 and B.dtype == torch.float32 and B.shape == (48, 20)
    F = feats.double().numpy()

    def leak(basis):  # share of the features outside span(basis), in float64 (independent of the code under test)
        b = basis.double().numpy()
        return np.linalg.norm(F - F @ b @ b.T) / np.linalg.norm(F)

    _, _, vh32 = torch.linalg.svd(feats, full_matrices=False)
    assert leak(B) < 1e-7
    assert leak(vh32[:20].T) > 5 * leak(B)  # the case is one where a float32 SVD is not accurate enough


def test_float32_numerical_rank_ignores_float32_rounding_noise():
    # rank 4 in exact arithmetic, computed in float32: the rounding noise (~1e-7 relative) must not count as rank
    # (a float64 tolerance would keep all 12 directions and leave no null space)
    torch.manual_seed(2)
    feats = torch.randn(50, 4) @ torch.randn(4, 12)
    assert int((torch.linalg.svdvals(feats.double()) > 1e-12 * 50).sum()) > 4  # the noise is there
    _, k = null_space_basis(feats, 1.0)
    assert k == 4


def test_projection_of_a_float32_gradient_mostly_in_the_kept_space():
    """G = 1e4 x (kept-space part) + (null-space part), float32: pi(G) must carry no kept-space component beyond
    float32 rounding of the *result* (~1e-7 of ||pi(G)||); the float32 formula G - G B B^T leaves ~eps32 * ||G||,
    i.e. ~1e-3 of ||pi(G)|| here (the leak that moved a float32 MLP's batch loss by 2.6e-4 in a teleport)."""
    from gradcond.teleport.nullspace import project_out

    g = torch.Generator().manual_seed(0)
    B, _ = torch.linalg.qr(torch.randn(40, 12, generator=g, dtype=torch.float64))
    kept = torch.randn(30, 12, generator=g, dtype=torch.float64) @ B.T
    free = torch.randn(30, 40, generator=g, dtype=torch.float64)
    free = free - free @ B @ B.T
    G = (1e4 * kept + free).float()
    P = project_out(G, B)  # the teleport passes its float64 basis
    assert P.dtype == torch.float32 and P.shape == G.shape

    def leak(Q):  # kept-space share of Q, in float64 with the exact basis (independent of the code under test)
        Qd = Q.double()
        return float((Qd @ B).norm() / Qd.norm())

    assert leak(P) < 1e-6
    naive = G - (G @ B.float()) @ B.float().T
    assert leak(naive) > 100 * leak(P)  # the case is one where float32 arithmetic is not enough
    torch.testing.assert_close(P.double(), G.double() - G.double() @ B @ B.T, rtol=0, atol=1e-2)
