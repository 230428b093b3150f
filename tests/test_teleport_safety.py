"""Issue 20 §1-2: a teleport never silently changes the function.

Every construct below either has an exact rule (the teleport preserves the function to float64 rounding) or is
frozen with a reason in ``structure.frozen`` (its taus pinned); and whatever escapes the analysis is caught by
teleport's self-check (``TeleportError``, model and optimizer unchanged).

The two remaining variants of the issue's list live beside the tracing tests: nested ``nn.Transformer*`` composites
(free taus > 0, function preserved) and ``torchvision.ops.stochastic_depth`` in ``tests/test_graph_composite.py``;
the random-architecture property test is ``tests/test_teleport_core_property.py``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import prune

from gradcond.graph import analyze
from gradcond.teleport import TeleportError
from gradcond.teleport.cob_callback import TeleportCallback
from gradcond.teleport import CoB, check_tolerance, random_cob, teleport, weight_scale_factors
from gradcond.train import TrainState
from gradcond.train.run import RunLogger


def _rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _mlp(act=nn.ReLU, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 3)).to(dtype)


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wn(m):
    P.weight_norm(m[2])
    return m


def _wn_legacy(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(m[2])
    return m


def _wn_all(m):  # dim=None: one norm over the whole weight, g is a scalar -> no free factor can go to g
    P.weight_norm(m[2], dim=None)
    return m


def _spectral(m):
    P.spectral_norm(m[2])
    return m


def _spectral_legacy(m):
    torch.nn.utils.spectral_norm(m[2])
    return m


def _orthogonal(m):
    P.orthogonal(m[2])
    return m


def _prune(m):
    prune.l1_unstructured(m[2], "weight", amount=0.5)
    prune.random_unstructured(m[0], "weight", amount=0.3)
    return m


def _fwd_hook(m):
    m[2].register_forward_hook(lambda mod, i, o: o + 1.0)
    return m


def _pre_hook(m):
    m[2].register_forward_pre_hook(lambda mod, i: (2.0 * i[0] + 1.0,))
    return m


def _root_hook(m):
    m.register_forward_hook(lambda mod, i, o: o + mod[2].weight.sum())
    return m


def _block_hook(m):  # a hook on a container: fx would trace through it and skip the hook
    inner = nn.Sequential(m[2], m[3])
    inner.register_forward_hook(lambda mod, i, o: o + 0.5)
    return nn.Sequential(m[0], m[1], inner, m[4])


def _frozen_params(m):
    for p in m[2].parameters():
        p.requires_grad_(False)
    return m


# name -> (build, expected frozen/pin reason substring or None when the construct has an exact rule,
#          parameters that must stay bit-identical)
VARIANTS = {
    "weight_norm": (_wn, None, ["2.parametrizations.weight.original1"]),
    "weight_norm_legacy": (_wn_legacy, None, ["2.weight_v"]),
    "weight_norm_dim_none": (_wn_all, None, ["2.parametrizations.weight.original0",
                                             "2.parametrizations.weight.original1"]),
    "spectral_norm": (_spectral, "parametrization _SpectralNorm", ["2.parametrizations.weight.original"]),
    "spectral_norm_legacy": (_spectral_legacy, "forward pre-hook SpectralNorm", ["2.weight_orig"]),
    "orthogonal": (_orthogonal, "parametrization _Orthogonal", ["2.parametrizations.weight.original"]),
    "pruning": (_prune, None, []),
    "forward_hook": (_fwd_hook, "forward hook", ["2.weight", "2.bias"]),
    "forward_pre_hook": (_pre_hook, "forward pre-hook", ["2.weight", "2.bias"]),
    "root_hook": (_root_hook, "registered on the model itself", []),
    "container_hook": (_block_hook, "forward hook", ["2.0.weight", "2.0.bias"]),
    "frozen_params": (_frozen_params, "requires_grad=False", ["2.weight", "2.bias"]),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("mode", ["intra", "inter"])
def test_variant_preserves_function_or_is_frozen(name, mode):
    build, frozen_reason, unchanged = VARIANTS[name]
    model = build(_mlp()).eval()  # eval: spectral_norm's power iteration would change the function per call
    x = torch.randn(6, 5, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    s = analyze(model, x[:2])
    reasons = " | ".join(n.reason for n in s.frozen)
    if frozen_reason is not None:
        assert frozen_reason in reasons, reasons
    else:
        assert not s.frozen, reasons
    for seed in range(3):
        cob = random_cob(s, 0.9, mode, torch.Generator().manual_seed(seed))
        # the rules alone (no self-check) preserve the function ...
        tp = teleport(model, cob, check=False)
        with torch.no_grad():
            assert _rel(ref, tp(x)) < 1e-12, (name, _rel(ref, tp(x)))
        # ... and the checked teleport agrees
        tp2 = teleport(model, cob, check_inputs=x)
        params = dict(tp2.named_parameters())
        for p in unchanged:
            assert torch.equal(params[p], dict(model.named_parameters())[p]), p
        with torch.no_grad():
            assert _rel(ref, tp2(x)) < 1e-12
    if frozen_reason is None and name != "weight_norm_dim_none":
        assert s.num_free > 0


def test_weight_norm_rule_against_definition():
    """g' = tau_out * g (exactly the weight's output factor), v unchanged, the layer's input taus pinned."""
    for legacy in (False, True):
        model = _mlp()
        (_wn_legacy if legacy else _wn)(model)
        s = analyze(model, torch.randn(2, 5, dtype=torch.float64))
        assert any("weight norm" in p.reason for p in s.pins)
        gname, vname = (("2.weight_g", "2.weight_v") if legacy else
                        ("2.parametrizations.weight.original0", "2.parametrizations.weight.original1"))
        cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(1))
        fac = weight_scale_factors(s, cob)
        bias_f = fac["2.bias"]  # = tau_out of layer 2
        assert torch.equal(fac[gname].reshape(-1), bias_f.reshape(-1))
        assert gname in s.rules and vname not in s.rules
        # input taus of layer 2 = output taus of layer 0 (through the ReLU): pinned, so layer 0 is untouched
        assert "0.weight" not in s.rules and "0.bias" not in s.rules and "4.weight" in s.rules
        tp = teleport(model, cob)
        tpp = dict(tp.named_parameters())
        g0 = dict(model.named_parameters())[gname]
        torch.testing.assert_close(tpp[gname].reshape(-1), (g0.reshape(-1) * bias_f.reshape(-1)), rtol=0, atol=0)
        mod = tp[2]
        w_tp = mod.weight if not legacy else tpp[gname] * tpp[vname] / tpp[vname].norm(dim=1, keepdim=True)
        w0 = model[2].weight if not legacy else g0 * model[2].weight_v / model[2].weight_v.norm(dim=1, keepdim=True)
        torch.testing.assert_close(w_tp, bias_f.view(-1, 1) * w0, rtol=1e-14, atol=0)


def test_weight_norm_conv_and_pruning_mask_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).double()
    P.weight_norm(model[2])
    prune.l1_unstructured(model[5], "weight", amount=0.5)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    s = analyze(model, x[:2])
    assert not s.frozen and "5.weight_orig" in s.rules
    cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(0))
    tp = teleport(model, cob)
    with torch.no_grad():
        assert _rel(model(x), tp(x)) < 1e-12
    assert torch.equal(tp[5].weight_mask, model[5].weight_mask)
    fac = weight_scale_factors(s, cob)
    torch.testing.assert_close(tp[5].weight_orig, model[5].weight_orig * fac["5.weight_orig"], rtol=0, atol=0)


def test_tied_weights_pinned_with_reason():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.hidden = nn.Linear(6, 7)
            self.hidden2 = nn.Linear(7, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight  # tied: (11, 6) used as rows by the embedding, as W by the head

        def forward(self, idx):
            return self.head(torch.relu(self.hidden2(torch.relu(self.hidden(self.emb(idx))))))

    torch.manual_seed(0)
    model = Tied().double()
    idx = torch.randint(0, 11, (4, 5))
    s = analyze(model, idx[:2])
    # issue 19: a tied embedding / head weight gets one rule (embedding output tau = 1 / head input tau), exact
    assert not [n for n in s.frozen if n.node == "emb.weight"]
    assert "emb.weight" in s.rules and s.num_free > 0
    for mode in ("intra", "inter"):
        tp = teleport(model, random_cob(s, 0.9, mode, torch.Generator().manual_seed(0)), check_inputs=idx)
        with torch.no_grad():
            assert _rel(model(idx), tp(idx)) < 1e-12
        assert not torch.equal(tp.emb.weight, model.emb.weight) and tp.head.weight is tp.emb.weight


def test_frozen_params_option_includes_them():
    model = _frozen_params(_mlp())
    x = torch.randn(4, 5, dtype=torch.float64)
    s = analyze(model, x[:2], teleport_frozen_params=True)
    assert "2.weight" in s.rules and not s.frozen
    tp = teleport(model, random_cob(s, 0.9, "intra", torch.Generator().manual_seed(0)))
    assert not torch.equal(tp[2].weight, model[2].weight) and not tp[2].weight.requires_grad
    with torch.no_grad():
        assert _rel(model(x), tp(x)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_teleported_in_float64_and_warned(dtype):
    model = _mlp(dtype=torch.float64)
    x = torch.randn(16, 5, dtype=torch.float64)
    half = copy.deepcopy(model).to(dtype)
    s = analyze(half, x[:2].to(dtype))
    cob = random_cob(s, 0.9, "intra", torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="rounded once to .*measured relative output change"):
        tp = teleport(half, cob)
    # parameters: the float64 product rounded once (not a product of rounded factors)
    fac = weight_scale_factors(s, cob)
    for n, p in tp.named_parameters():
        p0 = dict(half.named_parameters())[n]
        assert torch.equal(p, (p0.double() * fac[n]).to(dtype)), n
    # the teleported half model computes the float64 function to half-precision accuracy
    with torch.no_grad():
        err = _rel(half(x.to(dtype)).double(), tp(x.to(dtype)).double())
    assert err <= check_tolerance(dtype, s)
    # second teleport of the same structure: no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teleport(half, cob)


# ---- the self-check -------------------------------------------------------------------------------------------
def _corrupt(s, name):
    """Drop one rule: a stand-in for a construct that escaped the analysis (the function then changes)."""
    del s.rules[name]
    s.param_shapes = dict(s.param_shapes)
    s._cache.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_self_check_raises_and_leaves_model_unchanged(dtype):
    model = _mlp(act=nn.Tanh, dtype=dtype)  # tanh: activation modules are swapped in place too
    x = torch.randn(4, 5, dtype=dtype)
    s = analyze(model, x[:2])
    cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(0))
    teleport(model, cob, inplace=True)  # wraps the tanh modules (passes the check)
    wrapped = [type(m).__name__ for m in model]
    assert wrapped[1] == "TeleportedActivation"
    _corrupt(s, "2.bias")
    before, mods = _sd(model), list(model)
    cob2 = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(1))
    silent = teleport(model, cob2, check=False)  # check=False: the caller's responsibility
    with torch.no_grad():
        assert _rel(model(x), silent(x)) > 1e-3
    tol = check_tolerance(dtype, s)
    msg = rf"output deviates by .* on the analysis example, above the {str(dtype)[6:]} tolerance {tol:.3g}"
    for inplace in (False, True):
        with pytest.raises(TeleportError, match=msg):
            teleport(model, cob2, inplace=inplace)
        assert _same(before, _sd(model)) and list(model) == mods
        assert all(a is b for a, b in zip(model, mods))


def test_self_check_names_largest_output_and_uses_given_batch():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 3)
            self.c = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return {"small": self.b(h), "big": self.c(h) * 100.0}

    torch.manual_seed(0)
    model = Two().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    s = analyze(model, x[:2])
    _corrupt(s, "c.weight")
    cob = random_cob(s, 0.9, "intra", torch.Generator().manual_seed(0))
    with pytest.raises(TeleportError, match=r"output\['big'\] deviates"):
        teleport(model, cob)
    # a zero analysis example hides a corrupted a.weight (a(0) = a.bias): only the batch at hand reveals it
    s2 = analyze(model, torch.zeros(2, 4, dtype=torch.float64))
    _corrupt(s2, "a.weight")
    cob2 = random_cob(s2, 0.9, "intra", torch.Generator().manual_seed(0))
    teleport(model, cob2)  # passes on the analysis example alone
    with pytest.raises(TeleportError, match="on the given check input"):
        teleport(model, cob2, check_inputs=x)


def test_self_check_keeps_batchnorm_buffers_and_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2)).double()
    model.train()
    x = torch.randn(8, 4, dtype=torch.float64)
    s = analyze(model, x[:2])
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    tp = teleport(model, random_cob(s, 0.9, "inter", torch.Generator().manual_seed(0)), inplace=True,
                  check_inputs=x)
    assert tp is model and model.training and model[1].training
    now = dict(model.named_buffers())
    assert all(torch.equal(now[k], v) for k, v in bufs.items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_bad_check_input_is_refused_before_any_change():
    model = _mlp()
    s = analyze(model, torch.randn(2, 5, dtype=torch.float64))
    before = _sd(model)
    with pytest.raises(ValueError, match="self-check could not run the model on the given check input"):
        teleport(model, random_cob(s, 0.9), inplace=True, check_inputs=torch.randn(2, 7))
    assert _same(before, _sd(model))


# ---- the callback ---------------------------------------------------------------------------------------------
class _DS(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 5, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _state(model, opt):
    loader = torch.utils.data.DataLoader(_DS(), batch_size=8)
    return TrainState(model=model, optimizer=opt, loss_fn=F.cross_entropy, train_loader=loader,
                      run=RunLogger(None))


def test_callback_rolls_back_failed_teleport_and_logs_it():
    model = _mlp(dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    st = _state(model, opt)
    x, y = next(iter(st.train_loader))
    F.cross_entropy(model(x), y).backward()
    opt.step()  # non-empty optimizer state
    cb = TeleportCallback(kind="random", sigma=0.9)
    cb.teleport_now(st)  # analyses and teleports (check passes)
    assert cb.events[-1]["kind"] == "teleport"
    _corrupt(cb._structure, "2.weight")
    before = _sd(model)
    opt_before = copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="TeleportCallback: teleport would change the model's function"):
        ev = cb.teleport_now(st)
    assert ev["kind"] == "teleport_failed" and "deviates" in ev["reason"]
    assert _same(before, _sd(model))
    osd = opt.state_dict()
    for k, v in opt_before["state"].items():
        assert all(torch.equal(v[n], osd["state"][k][n]) for n in v if isinstance(v[n], torch.Tensor))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        ev2 = cb.teleport_now(st)
    assert ev2["kind"] == "teleport_failed" and [e["kind"] for e in st.events].count("teleport_failed") == 2


def test_callback_skips_model_without_free_tau():
    model = _mlp(act=nn.Tanh, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    st = _state(model, opt)
    before = _sd(model)
    cb = TeleportCallback(kind="random", sigma=0.5, rewrite=False)
    with pytest.warns(RuntimeWarning, match="num_free=0"):
        ev = cb.teleport_now(st)
    assert ev["kind"] == "teleport_skipped" and ev["num_free"] == 0 and _same(before, _sd(model))


def test_check_tolerance_is_dtype_aware():
    s = analyze(_mlp(), torch.randn(2, 5, dtype=torch.float64))
    t64, t32, t16 = (check_tolerance(d, s) for d in (torch.float64, torch.float32, torch.float16))
    assert t64 < 1e-12 and t64 < t32 < 1e-3 < t16
    assert t32 / t64 == pytest.approx(torch.finfo(torch.float32).eps / torch.finfo(torch.float64).eps)


def test_callback_on_weight_norm_and_pruned_model_transports_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    P.weight_norm(model[2])
    prune.l1_unstructured(model[4], "weight", amount=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    st = _state(model, opt)
    x, y = next(iter(st.train_loader))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    mask = model[4].weight_mask.clone()
    ev = TeleportCallback(kind="random", sigma=0.9).teleport_now(st)
    assert ev["kind"] == "teleport" and ev["num_free"] > 0 and ev["transport_exact"]
    assert ev["max_output_change"] < 1e-5 and torch.equal(model[4].weight_mask, mask)


def test_global_forward_hook_pins_everything():
    model = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    handle = nn.modules.module.register_module_forward_hook(lambda mod, i, o: o)
    try:
        s = analyze(model, x[:2])
    finally:
        handle.remove()
    assert s.num_free == 0 and any("global forward hook" in n.reason for n in s.frozen)


def test_self_check_restores_buffers_a_forward_writes():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            self.calls += 1  # a forward with a side effect on a buffer
            return self.lin(torch.relu(x))

    model = nn.Sequential(nn.Linear(4, 4), Counting()).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    s = analyze(model, x[:2])
    calls = float(model[1].calls)
    teleport(model, random_cob(s, 0.9, "intra", torch.Generator().manual_seed(0)), inplace=True, check_inputs=x)
    assert float(model[1].calls) == calls


def test_unverifiable_teleport_warns():
    """A structure without an analysis example (hand-made) and no batch: the teleport says it was not verified."""
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    s = analyze(m, x[:2])
    s.example_input = None
    cob = random_cob(s, 0.5, "intra", torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="teleport could not verify the function"):
        teleport(m, cob)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        teleport(m, cob, check_inputs=x)  # verified on the batch: no warning
