"""Optimizer-state transport across a teleport (issue 9 item 3; seed 000 Theorem 5.1).

The central check is independent of the transport formula: a fresh optimizer of the teleported model is fed the
gradients of the teleported model (autograd, not Theorem 5.1) at the teleported images of the same k iterates on
the same batches; its state must equal the transported state.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gradcond.graph import analyze
from gradcond.teleport import random_cob, teleport, weight_scale_factors
from gradcond.teleport.optim_state import TransportReport, check_optimizer_supported, transport_optimizer_state
from gradcond.zoo import mlp

K = 5
F = torch.nn.functional


def _setup(act="leaky_relu", norm="none", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    model = mlp(8, 3, depth=3, width=6, act=act, norm=norm, seed=seed).to(dtype)
    batches = [(torch.randn(16, 8, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g))
               for _ in range(K)]
    structure = analyze(model, batches[0][0][:2])
    cob = random_cob(structure, 0.9, "inter", torch.Generator().manual_seed(seed + 1))
    return model, batches, structure, cob


def _run_k_steps(model, opt, batches):
    """K optimizer steps; returns the iterates at which the gradients were taken."""
    iterates = []
    for x, y in batches:
        iterates.append(copy.deepcopy(model.state_dict()))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return iterates


def _reference_state(model_template, iterates, batches, cob, make_opt):
    """State of a fresh optimizer fed the teleported model's own gradients at the teleported iterates."""
    names = [n for n, _ in model_template.named_parameters()]
    ref_model = teleport(model_template, cob)  # its parameters carry the reference optimizer
    ref_params = dict(ref_model.named_parameters())
    ref_opt = make_opt(ref_model.parameters())
    for sd, (x, y) in zip(iterates, batches):
        m = copy.deepcopy(model_template)
        m.load_state_dict(sd)
        tp = teleport(m, cob)  # teleported image of the iterate (activations rewritten where tau < 0)
        loss = F.cross_entropy(tp(x), y)
        grads = torch.autograd.grad(loss, [dict(tp.named_parameters())[n] for n in names])
        with torch.no_grad():
            for n, gr in zip(names, grads):
                ref_params[n].copy_(dict(tp.named_parameters())[n])
                ref_params[n].grad = gr.clone()
        ref_opt.step()
    return {n: ref_opt.state[ref_params[n]] for n in names}


OPTS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_nesterov_dampening0": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamw_nodecay": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.0),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "adagrad_iav": lambda p: torch.optim.Adagrad(p, lr=0.05, initial_accumulator_value=0.3),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=0.001, centered=True),
    "rmsprop_momentum_eps0": lambda p: torch.optim.RMSprop(p, lr=0.001, momentum=0.9, eps=0.0),
}


ARCHS = {"leaky_relu": dict(act="leaky_relu"), "relu_bn": dict(act="relu", norm="batch"), "tanh": dict(act="tanh")}
# RMSprop with eps = 0 divides by sqrt(square_avg) = 0 for a bias in front of BatchNorm (its gradient is 0): NaN in
# the optimizer itself, so that pair is left out.
CASES = [(o, a) for o in OPTS for a in ARCHS if not (o == "rmsprop_momentum_eps0" and a == "relu_bn")]


@pytest.mark.parametrize("name,arch_name", CASES)
def test_transport_equals_state_of_optimizer_run_in_teleported_coordinates(name, arch_name):
    arch = ARCHS[arch_name]
    # sigma 0.9, inter-landscape (negative taus: ReLU-like activations rewritten, tanh rewritten as tau*f(x/tau))
    model, batches, structure, cob = _setup(**arch)
    template = copy.deepcopy(model)
    opt = OPTS[name](model.parameters())
    iterates = _run_k_steps(model, opt, batches)
    last = copy.deepcopy(model)
    fac = weight_scale_factors(structure, cob)
    params_by_name = dict(model.named_parameters())
    teleport(model, cob, inplace=True)
    rep = transport_optimizer_state(opt, model, fac, "transport")
    assert isinstance(rep, TransportReport) and rep.exact and rep.params > 0
    # the model was teleported in place: same parameter objects, function unchanged
    assert all(params_by_name[n] is p for n, p in model.named_parameters())
    x = batches[0][0]
    with torch.no_grad():
        model.eval(), last.eval()
        assert (model(x) - last(x)).abs().max() <= 1e-12 * last(x).abs().max()
    template.load_state_dict(iterates[0])
    ref = _reference_state(template, iterates, batches, cob, OPTS[name])
    # relative error per state key over all parameters (a bias followed by BatchNorm has a gradient that is
    # mathematically 0, ~1e-17 in floats: a per-tensor relative error would compare rounding noise)
    diff, scale = {}, {}
    for n, p in params_by_name.items():
        st = opt.state[p]
        assert set(st) == set(ref[n]), (n, set(st), set(ref[n]))
        for key, val in st.items():
            r = ref[n][key]
            if key == "step":
                assert float(val) == float(r) == K
                continue
            diff[key] = max(diff.get(key, 0.0), float((val - r).abs().max()))
            scale[key] = max(scale.get(key, 0.0), float(r.abs().max()))
    assert diff
    worst = max(diff[k] / scale[k] for k in diff)
    print(f"transport vs reference, {name} / {arch_name}: worst relative error {worst:.2e}")
    assert worst < 1e-10, worst


def test_transport_float32_close():
    model, batches, structure, cob = _setup(dtype=torch.float32)
    template = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    iterates = _run_k_steps(model, opt, batches)
    fac = weight_scale_factors(structure, cob)
    teleport(model, cob, inplace=True)
    transport_optimizer_state(opt, model, fac)
    template.load_state_dict(iterates[0])
    ref = _reference_state(template, iterates, batches, cob, lambda p: torch.optim.Adam(p, lr=0.01))
    for (n, p) in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt.state[p][key], ref[n][key]
            assert float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())  # float32 tolerance


def test_rmsprop_momentum_with_eps_is_flagged_inexact_but_close():
    model, batches, structure, cob = _setup()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.001, momentum=0.9, eps=1e-8)
    _run_k_steps(model, opt, batches)
    rep = transport_optimizer_state(opt, model, weight_scale_factors(structure, cob))
    assert not rep.exact and any("eps" in n for n in rep.notes)


def test_weight_decay_flagged_inexact():
    model, batches, structure, cob = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    _run_k_steps(model, opt, batches)
    rep = transport_optimizer_state(opt, model, weight_scale_factors(structure, cob))
    assert not rep.exact and "weight_decay" in rep.notes[0]


def _state_copy(opt):
    return {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for p, st in opt.state.items()}


def _same_state(opt, snap):
    if {id(p) for p in opt.state} != set(snap):
        return False
    for p, st in opt.state.items():
        s = snap[id(p)]
        if set(st) != set(s):
            return False
        for k, v in st.items():
            if torch.is_tensor(v) and not torch.equal(v, s[k]):
                return False
    return True


@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "adagrad_iav", "rmsprop_centered"])
def test_keep_leaves_state_and_reset_matches_fresh_optimizer(name):
    model, batches, structure, cob = _setup()
    opt = OPTS[name](model.parameters())
    _run_k_steps(model, opt, batches)
    fac = weight_scale_factors(structure, cob)
    snap = _state_copy(opt)
    rep = transport_optimizer_state(opt, model, fac, "keep")
    assert _same_state(opt, snap) and not rep.exact
    transport_optimizer_state(opt, model, fac, "reset")
    moved = {n for n, f in fac.items() if not bool((f == 1).all())}
    fresh = OPTS[name]([torch.zeros(1, dtype=torch.float64, requires_grad=True)])
    for n, p in model.named_parameters():
        if n not in moved:
            assert all(torch.equal(v, snap[id(p)][k]) for k, v in opt.state[p].items() if torch.is_tensor(v))
        elif isinstance(opt, torch.optim.Adagrad):
            iav = fresh.param_groups[0]["initial_accumulator_value"]
            assert torch.equal(opt.state[p]["sum"], torch.full_like(p, iav)) and float(opt.state[p]["step"]) == 0
        else:
            assert p not in opt.state or len(opt.state[p]) == 0
    assert moved and len(moved) < len(fac)  # the output bias is pinned (tau = 1 at outputs)


@pytest.mark.parametrize("bad_opt", [
    lambda p: torch.optim.Adamax(p, lr=0.01),
    lambda p: torch.optim.NAdam(p, lr=0.01),
    lambda p: torch.optim.Rprop(p, lr=0.01),
])
def test_unsupported_optimizer_raises_and_changes_nothing(bad_opt):
    model, batches, structure, cob = _setup()
    opt = bad_opt(model.parameters())
    _run_k_steps(model, opt, batches)
    sd = copy.deepcopy(model.state_dict())
    snap = _state_copy(opt)
    with pytest.raises(TypeError, match=r"not supported.*supported: SGD, Adam, AdamW, Adagrad, RMSprop"):
        transport_optimizer_state(opt, model, weight_scale_factors(structure, cob))
    with pytest.raises(TypeError, match="not supported"):
        transport_optimizer_state(opt, model, weight_scale_factors(structure, cob), "reset")
    assert _same_state(opt, snap)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # keep works with every optimizer
    transport_optimizer_state(opt, model, weight_scale_factors(structure, cob), "keep")
    assert _same_state(opt, snap)


def test_bad_factors_and_mode_raise_and_change_nothing():
    model, batches, structure, cob = _setup()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    _run_k_steps(model, opt, batches)
    fac = weight_scale_factors(structure, cob)
    snap = _state_copy(opt)
    bad_nan = dict(fac, **{"0.weight": fac["0.weight"] * float("nan")})
    with pytest.raises(ValueError, match="0, NaN or inf"):
        transport_optimizer_state(opt, model, bad_nan)
    bad_zero = dict(fac, **{"2.bias": torch.zeros(6, dtype=torch.float64)})
    with pytest.raises(ValueError, match="0, NaN or inf"):
        transport_optimizer_state(opt, model, bad_zero)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        transport_optimizer_state(opt, model, {"nope.weight": torch.tensor(2.0)})
    with pytest.raises(ValueError, match="does not broadcast"):
        transport_optimizer_state(opt, model, {"0.weight": torch.ones(5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="must be one of transport, reset, keep"):
        transport_optimizer_state(opt, model, fac, "teleport")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        check_optimizer_supported("adam")
    assert _same_state(opt, snap)


def test_unknown_state_key_in_subclass_raises():
    class MyAdam(torch.optim.Adam):
        def step(self, closure=None):
            out = super().step(closure)
            for p in self.state:
                self.state[p]["extra"] = torch.zeros(1)
            return out

    model, batches, structure, cob = _setup()
    opt = MyAdam(model.parameters(), lr=0.01)
    _run_k_steps(model, opt, batches)
    snap = _state_copy(opt)
    with pytest.raises(ValueError, match="unknown key.*extra"):
        transport_optimizer_state(opt, model, weight_scale_factors(structure, cob))
    assert _same_state(opt, snap)


def test_transport_twice_with_inverse_restores_state():
    model, batches, structure, cob = _setup()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05, initial_accumulator_value=0.2)
    _run_k_steps(model, opt, batches)
    snap = _state_copy(opt)
    transport_optimizer_state(opt, model, weight_scale_factors(structure, cob))
    transport_optimizer_state(opt, model, weight_scale_factors(structure, cob.inverse()))
    for p, st in opt.state.items():
        assert torch.allclose(st["sum"], snap[id(p)]["sum"], rtol=1e-13, atol=0)
