"""Issue 18 (teleport <= 1x a parameter clone): the numpy table shared by factors() and sites(), and the skipped
re-check of a CoB whose tau is unchanged since validation, give the same results as the reference paths."""

import copy

import pytest
import torch

from gradcond import zoo
from gradcond.graph import analyze
from gradcond.teleport import CoB, random_cob, teleport, weight_scale_factors
from gradcond.teleport.scaling import _fast_plan


def _sd(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_table_equals_torch_table(dtype):
    torch.manual_seed(0)
    model = zoo.build("transformer").to(dtype)
    s = analyze(model, torch.randn(2, 8, 8, dtype=dtype))
    plan = _fast_plan(s, torch.device("cpu"), dtype)
    for seed in range(3):
        cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(seed))
        ref = plan.factors(cob.tau)  # torch ops, re-checked
        ref = [f.clone() for f in ref] if ref is not None else None
        g_ref = plan.G.clone()
        got = plan.factors(cob.tau, keep_table=True)  # numpy table kept for sites()
        assert torch.equal(plan.G, g_ref) and (ref is None) == (got is None) == (dtype != torch.float64)
        assert ref is None or all(torch.equal(a, b) for a, b in zip(ref, got))
        act_np, val_np = plan.sites(s, cob.tau)  # reuses the table of the same tau object
        act_t, val_t = plan._sites_torch(s, cob.tau)
        assert act_np == act_t and any(act_np)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(val_np, val_t))


def test_inplace_teleport_matches_definition_float64_and_restores():
    torch.manual_seed(0)
    model = zoo.build("transformer").double()
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    s = analyze(model, x[:2])
    cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(3))
    assert cob._trusted(torch.float64) and cob._trusted(torch.float32)
    fac = weight_scale_factors(s, cob)
    ref = {n: p.detach() * fac[n] for n, p in model.named_parameters()}
    before = _sd(model)
    m2 = copy.deepcopy(model)
    teleport(m2, cob, inplace=True, check=False)
    got = {n.replace(".inner.", "."): p.detach() for n, p in m2.named_parameters()}
    assert all(torch.equal(got[n], ref[n]) for n in ref)  # float64: bit-identical to the definition
    teleport(m2, cob.inverse(), inplace=True, check=False)
    assert type(m2.blocks[0].act) is torch.nn.GELU
    err = max(float(((p - before[n]).abs() / before[n].abs().clamp_min(1e-300)).max())
              for n, p in m2.state_dict().items() if n in before and p.is_floating_point())
    assert err < 1e-14


@pytest.mark.parametrize("name,shape", [("mlp", (2, 64)), ("transformer", (2, 8, 8))])
def test_edited_or_overflowing_tau_refused_on_every_path(name, shape):
    """A tau written after validation (through a view: the version counter is shared) or whose reciprocal overflows
    float32 is refused before anything changes, with and without activation sites to evaluate."""
    torch.manual_seed(0)
    model = zoo.build(name)
    s = analyze(model, torch.randn(*shape))
    before = _sd(model)
    for bad in (0.0, float("nan"), float("inf")):
        c = random_cob(s, 0.5, "intra", torch.Generator().manual_seed(1))
        assert c._trusted(torch.float32)
        view = c.tau[2:5]
        view[1] = bad  # edits tau[3] through a view
        assert not c._trusted(torch.float32)
        with pytest.raises(ValueError, match="finite and non-zero"):
            teleport(model, c, inplace=True, check=False)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tiny = torch.ones(s.num_free, dtype=torch.float64)
    tiny[0] = 1e-40  # valid in float64, 1/tau overflows float32
    c = CoB(s, tiny)
    assert c._trusted(torch.float64) and not c._trusted(torch.float32)
    with pytest.raises(ValueError, match="float32"):
        teleport(model, c, inplace=True, check=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name,kw,shape", [("resnet", dict(width=8), (2, 1, 8, 8)), ("transformer", {}, (2, 8, 8))])
def test_float32_passes_match_definition_and_copy(name, kw, shape):
    """float32 in-place teleports multiply by the factor terms one at a time (no factor tensor): within a few ulps
    of ``W * weight_scale_factors`` (computed in float64), equal to the copying teleport, and the function is kept."""
    torch.manual_seed(0)
    model = zoo.build(name, **kw)
    x = torch.randn(*shape)
    s = analyze(model, x)
    assert _fast_plan(s, torch.device("cpu"), torch.float32).passes
    cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(2))
    fac = weight_scale_factors(s, cob)
    ref = {n: (p.detach().double() * fac[n]).float() for n, p in model.named_parameters()}
    cp = teleport(model, cob, check=False)
    m2 = copy.deepcopy(model)
    teleport(m2, cob, inplace=True)  # self-checked: the function is preserved
    got = {n.replace(".inner.", "."): p.detach() for n, p in m2.named_parameters()}
    got_cp = {n.replace(".inner.", "."): p.detach() for n, p in cp.named_parameters()}
    for n in ref:
        assert torch.equal(got[n], got_cp[n]), n
        rel = float(((got[n] - ref[n]).abs() / ref[n].abs().clamp_min(1e-30)).max())
        assert rel <= 3 * torch.finfo(torch.float32).eps, (n, rel)


def test_cached_model_recognition_sees_replaced_nested_layer_and_shared_modules():
    """The cached recognition walk (no de-duplication) still sees a same-shape layer replaced deep inside the model,
    so the new layer's parameters are the ones scaled; a module reachable under two names is handled."""
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 6)
            self.body = torch.nn.Sequential(self.a, torch.nn.Tanh(), torch.nn.Sequential(torch.nn.Linear(6, 5)),
                                            torch.nn.ReLU(), torch.nn.Linear(5, 3))

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = Shared().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    s = analyze(model, x)
    cob = random_cob(s, 0.5, "intra", torch.Generator().manual_seed(0))
    teleport(model, cob, inplace=True)
    teleport(model, cob.inverse(), inplace=True)  # cached recognition
    new = torch.nn.Linear(6, 5).double()
    model.body[2][0] = new  # same shapes, new parameter objects
    w0 = new.weight.detach().clone()
    fac = weight_scale_factors(s, cob)
    with torch.no_grad():
        y = model(x)
    teleport(model, cob, inplace=True)  # self-checked
    assert torch.equal(new.weight.detach(), w0 * fac["body.2.0.weight"])
    with torch.no_grad():
        assert float((model(x) - y).abs().max()) < 1e-12


def test_wrapper_reuse_never_touches_a_wrapper_someone_holds():
    """A removed wrapper may be reused when its site is wrapped again, but not one the user still holds: that one
    keeps its tau, and the model gets a fresh wrapper; the function is preserved either way."""
    torch.manual_seed(0)
    model = zoo.build("transformer").double()
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    s = analyze(model, x[:2])
    with torch.no_grad():
        y = model(x)
    c1 = random_cob(s, 0.9, "intra", torch.Generator().manual_seed(1))
    c2 = random_cob(s, 0.9, "intra", torch.Generator().manual_seed(2))
    teleport(model, c1, inplace=True)
    held = model.blocks[0].act
    teleport(model, c1.inverse(), inplace=True)
    assert type(model.blocks[0].act) is torch.nn.GELU
    tau_held = held.tau.clone()
    teleport(model, c2, inplace=True)
    assert model.blocks[0].act is not held and torch.equal(held.tau, tau_held)
    assert model.blocks[0].act.inner is held.inner
    del held
    teleport(model, c2.inverse(), inplace=True)
    teleport(model, c1, inplace=True)  # may reuse the wrapper removed just before: same result as a fresh one
    with torch.no_grad():
        assert float((model(x) - y).abs().max() / y.abs().max()) < 1e-12
