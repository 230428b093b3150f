"""Every conditioning metric against an independent naive computation (explicit per-sample autograd loops, no
torch.func) on a small MLP and a small CNN with train-mode BatchNorm, in float64 (rel. < 1e-8, issue 6)."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond.probes import conditioning as C
from gradcond.probes.mask import LayerwiseMask

REL = 1e-8


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12, 3)).double()


def data(model, b=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 6) if isinstance(model[0], nn.Linear) else (b, 1, 4, 4)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


MODELS = [mlp, cnn]
LOSS = F.cross_entropy


# ------------------------------------------------------------------ naive reference (no torch.func)
def prepared(model, x):
    """Eval-mode copy whose BN running buffers hold the batch statistics (momentum-1 trick, biased variance)."""
    mc = copy.deepcopy(model)
    bns = [m for m in mc.modules() if isinstance(m, nn.BatchNorm2d)]
    if model.training and bns:
        counts = {}
        hs = [m.register_forward_hook(lambda mod, a, o: counts.__setitem__(mod, a[0].numel() / a[0].shape[1]))
              for m in bns]
        for m in bns:
            m.momentum = 1.0
        with torch.no_grad():
            mc(x)
        for h in hs:
            h.remove()
        for m in bns:
            m.running_var.mul_((counts[m] - 1) / counts[m])
    return mc.eval()


def shifted(mc, omega):
    m2 = copy.deepcopy(mc)
    torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(m2.parameters()) + omega,
                                        m2.parameters())
    return m2


def flatgrad(mc):
    return torch.cat([p.grad.reshape(-1) for p in mc.parameters()]).clone()


def naive_ps(mc, x, y):
    rows = []
    for i in range(x.shape[0]):
        mc.zero_grad()
        LOSS(mc(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(flatgrad(mc))
    return torch.stack(rows)


def naive_input_grad(mc, x, y):
    rows = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone().requires_grad_(True)
        rows.append(torch.autograd.grad(LOSS(mc(xi), y[i:i + 1]), xi)[0][0])
    return torch.stack(rows)


def wvec(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(b), 1e-300)


def snap(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, s):
    return all(torch.equal(v, s[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ κ≈_W and Def 4.1
def naive_kappa_w(model, x, y, omegas, sel=None):
    mc = prepared(model, x)
    g0 = naive_ps(mc, x, y).mean(0)
    pick = (lambda v: v) if sel is None else (lambda v: v[sel])
    ratios, gks = [], []
    for om in omegas:
        gk = naive_ps(shifted(mc, om), x, y).mean(0)
        gks.append(pick(gk))
        ratios.append(float((pick(gk) - pick(g0)).norm() * wvec(model).norm() / (om.norm() * pick(g0).norm())))
    return ratios, pick(g0), gks


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("norm", [None, "2"])
def test_step_consistency_limited_targeted_matches_naive(make, norm):
    model = make()
    x, y = data(model)
    s = snap(model)
    r = C.step_consistency(model, LOSS, (x, y), norm=norm, eta=1e-3)
    mc = prepared(model, x)
    g0 = naive_ps(mc, x, y).mean(0)
    d = 1e-3 * g0 / (g0.abs().max() if norm is None else g0.norm())
    ratios, _, _ = naive_kappa_w(model, x, y, [d, -d])
    assert r.n == 2 and r.b == 8 and r.eta == 1e-3 and r.mask is None and r.seconds > 0
    assert all(close(a, b) for a, b in zip(r.details["ratios"], ratios))
    assert close(r.value, max(ratios))
    assert unchanged(model, s) and model.training


@pytest.mark.parametrize("make", MODELS)
def test_step_consistency_targeted_and_explicit_match_naive(make):
    model = make()
    x, y = data(model)
    r = C.step_consistency(model, LOSS, (x, y), sampler="targeted", n=3, seed=5)
    G = naive_ps(prepared(model, x), x, y)
    oms = [1e-3 * s * G[i] / G[i].norm() for i, s in zip(r.details["indices"], r.details["signs"])]
    ratios, _, _ = naive_kappa_w(model, x, y, oms)
    assert all(close(a, b) for a, b in zip(r.details["ratios"], ratios))
    D = torch.randn(2, G.shape[1], dtype=torch.float64) * 1e-4
    r2 = C.step_consistency(model, LOSS, (x, y), directions=D)
    ratios2, _, _ = naive_kappa_w(model, x, y, list(D))
    assert close(r2.value, max(ratios2))


@pytest.mark.parametrize("make", MODELS)
def test_step_consistency_jvp_matches_naive_hvp(make):
    model = make()
    x, y = data(model)
    r = C.step_consistency(model, LOSS, (x, y), mode="jvp")
    mc = prepared(model, x)
    ps = list(mc.parameters())
    loss = sum(LOSS(mc(x[i:i + 1]), y[i:i + 1]) for i in range(8)) / 8
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, ps, create_graph=True)])
    om = 1e-3 * g.detach() / g.detach().abs().max()
    hv = torch.cat([t.reshape(-1) for t in torch.autograd.grad(g @ om, ps)])
    ref = float(hv.norm() * wvec(model).norm() / (om.norm() * g.detach().norm()))
    assert close(r.value, ref)


def test_step_consistency_finite_difference_tends_to_jvp():
    model = mlp()  # smooth enough around the base point for small eta
    x, y = data(model)
    fd = C.step_consistency(model, LOSS, (x, y), eta=1e-7).value
    jv = C.step_consistency(model, LOSS, (x, y), mode="jvp").value
    assert abs(fd - jv) <= 1e-4 * jv


def test_random_weight_sampler_matches_layer_statistics():
    model = nn.Sequential(nn.Linear(200, 100)).double()
    x, y = torch.randn(4, 200, dtype=torch.float64), torch.randint(0, 100, (4,))
    r = C.step_consistency(model, LOSS, (x, y), sampler="random", n=3)
    assert r.n == 3 and r.details["norm"] == "none"
    # norms of η·N(μ, σ) vectors: ≈ η·sqrt(numel·(σ²+μ²)) per tensor
    w = model[0].weight.detach()
    expect = 1e-3 * math.sqrt(w.numel() * float(w.var(unbiased=False) + w.mean() ** 2))
    assert all(abs(o - expect) < 0.1 * expect for o in r.details["omega_norms"])


@pytest.mark.parametrize("make", MODELS)
def test_step_metrics_match_naive(make):
    model = make()
    x, y = data(model)
    s = snap(model)
    out = C.step_metrics(model, LOSS, (x, y))
    mc = prepared(model, x)
    g0 = naive_ps(mc, x, y).mean(0)
    d = 1e-3 * g0 / g0.abs().max()
    ratios, g0, gks = naive_kappa_w(model, x, y, [d, -d])
    P = torch.stack(gks)
    cos = min(float(gk @ g0 / (gk.norm() * g0.norm())) for gk in gks)
    div = float((P.norm(dim=1) ** 2).sum() / P.sum(0).norm() ** 2)
    coh = float((P @ g0).sum() / (P.norm(dim=1) ** 2).sum())
    assert close(out["min_cosine"].value, cos) and close(out["weight_diversity"].value, div)
    assert close(out["weight_coherence"].value, coh) and close(out["step_consistency"].value, max(ratios))
    assert unchanged(model, s)


# ------------------------------------------------------------------ κ̄≈_X
@pytest.mark.parametrize("make", MODELS)
def test_batch_dissonance_targeted_matches_naive(make):
    model = make()
    x, y = data(model)
    s = snap(model)
    r = C.batch_dissonance(model, LOSS, (x, y), n=3, m=5, seed=2)
    H = naive_input_grad(prepared(model, x), x, y)
    D = torch.stack([1e-3 * sg * H[j] / H[j].norm() for j, sg in zip(r.details["indices"], r.details["signs"])])
    mc = prepared(model, x)  # BN statistics of the full batch, although only the first m = 5 samples are measured
    ref = naive_dissonance_prepared(mc, x[:5], y[:5], D.unsqueeze(0).expand(5, *D.shape))
    assert r.b == 5 and r.n == 3
    assert torch.allclose(torch.tensor(r.details["ratios"], dtype=torch.float64), ref, rtol=REL, atol=0)
    assert close(r.value, float(ref.max(1).values.mean()))
    assert unchanged(model, s)


def naive_dissonance_prepared(mc, x, y, deltas):
    G = naive_ps(mc, x, y)
    ratios = torch.zeros(deltas.shape[0], deltas.shape[1], dtype=torch.float64)
    for i in range(deltas.shape[0]):
        for k in range(deltas.shape[1]):
            mc.zero_grad()
            LOSS(mc(x[i:i + 1] + deltas[i, k][None]), y[i:i + 1]).backward()
            ratios[i, k] = (flatgrad(mc) - G[i]).norm() * x[i].norm() / (deltas[i, k].norm() * G[i].norm())
    return ratios


@pytest.mark.parametrize("make", MODELS)
def test_batch_dissonance_interpolation_matches_naive(make):
    model = make()
    x, y = data(model)
    r = C.batch_dissonance(model, LOSS, (x, y), sampler="interpolation", n=2, seed=4)
    j = torch.tensor(r.details["partners"])
    assert (j != torch.arange(8).unsqueeze(1)).all()
    deltas = 1e-3 * (x[j] - x.unsqueeze(1))
    ref = naive_dissonance_prepared(prepared(model, x), x, y, deltas)
    assert torch.allclose(torch.tensor(r.details["ratios"], dtype=torch.float64), ref, rtol=REL, atol=0)


@pytest.mark.parametrize("make", MODELS)
def test_batch_dissonance_jvp_matches_naive_mixed_derivative(make):
    model = make()
    x, y = data(model)
    r = C.batch_dissonance(model, LOSS, (x, y), n=2, mode="jvp", seed=1)
    mc = prepared(model, x)
    H = naive_input_grad(mc, x, y)
    G = naive_ps(mc, x, y)
    D = [1e-3 * sg * H[j] / H[j].norm() for j, sg in zip(r.details["indices"], r.details["signs"])]
    per = []
    for i in range(8):
        best = 0.0
        for d in D:
            xi = x[i:i + 1].clone().requires_grad_(True)
            gx = torch.autograd.grad(LOSS(mc(xi), y[i:i + 1]), xi, create_graph=True)[0]
            mixed = torch.cat([t.reshape(-1) for t in torch.autograd.grad((gx * d).sum(), list(mc.parameters()))])
            best = max(best, float(mixed.norm() * x[i].norm() / (d.norm() * G[i].norm())))
        per.append(best)
    assert close(r.value, sum(per) / 8)


def test_batch_dissonance_random_sampler_is_seeded():
    model = mlp()
    x, y = data(model)
    a = C.batch_dissonance(model, LOSS, (x, y), sampler="random", n=3, seed=0)
    b = C.batch_dissonance(model, LOSS, (x, y), sampler="random", n=3, seed=0)
    c = C.batch_dissonance(model, LOSS, (x, y), sampler="random", n=3, seed=1)
    assert a.value == b.value and a.value != c.value and a.value > 0


# ------------------------------------------------------------------ rank
@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("wrt", ["input", "weight"])
def test_relative_rank_matches_naive_svd(make, wrt):
    model = make()
    x, y = data(model)
    s = snap(model)
    r = C.relative_gradient_rank(model, LOSS, (x, y), wrt=wrt)
    mc = prepared(model, x)
    A = naive_ps(mc, x, y) if wrt == "weight" else naive_input_grad(mc, x, y).reshape(8, -1)
    sv = torch.linalg.svdvals(A)
    ref_rank = float((sv ** 2).sum() / sv[0] ** 2)
    assert close(r.details["rank"], ref_rank)
    assert close(r.value, ref_rank / r.details["gaussian_rank"])
    assert unchanged(model, s)


def test_gaussian_rank_baseline_matches_marchenko_pastur():
    # stable rank of a b×d Gaussian ≈ b·d/(√b+√d)² (‖Y‖_F² ≈ bd, ‖Y‖₂ ≈ √b+√d)
    for d, b in [(4000, 16), (300, 30)]:
        v = C.gaussian_effective_rank(d, b)
        assert abs(v - b * d / (math.sqrt(b) + math.sqrt(d)) ** 2) < 0.08 * v


# ------------------------------------------------------------------ batch metrics
def batches(model, k=4, b=5):
    return [data(model, b=b, seed=10 + i) for i in range(k)]


def naive_batch_grads(model, bs, sel=None):
    out = []
    for x, y in bs:
        g = naive_ps(prepared(model, x), x, y).mean(0)
        out.append(g if sel is None else g[sel])
    return out


@pytest.mark.parametrize("make", MODELS)
def test_confusion_and_diversity_match_naive(make):
    model = make()
    bs = batches(model)
    s = snap(model)
    gs = naive_batch_grads(model, bs)
    cos = [float(gs[i] @ gs[j] / (gs[i].norm() * gs[j].norm())) for i, j in itertools.combinations(range(4), 2)]
    r = C.gradient_confusion(model, LOSS, bs, n_batches=4, n_pairs=None)
    assert r.n == 6 and close(r.details["min_cosine"], min(cos)) and r.value == pytest.approx(max(-min(cos), 0.0),
                                                                                                 rel=REL, abs=0)
    d = C.gradient_diversity(model, LOSS, bs, n_batches=4)
    ref = sum(float(g @ g) for g in gs) / float(sum(gs) @ sum(gs))
    assert d.n == 4 and close(d.value, ref)
    sub = C.gradient_confusion(model, LOSS, bs, n_batches=4, n_pairs=3, seed=1)
    assert len(sub.details["pairs"]) == 3 and len(set(map(tuple, sub.details["pairs"]))) == 3
    assert unchanged(model, s)


@pytest.mark.parametrize("make", MODELS)
def test_coherence_diversity_efficiency_match_naive(make):
    model = make()
    x, y = data(model)
    s = snap(model)
    G = naive_ps(prepared(model, x), x, y)
    gbar = G.mean(0)
    # eq. 3.26 in its original (un-simplified) form
    ref_h = float(sum(gbar @ G[i] for i in range(8)) / sum(G[i] @ G[i] for i in range(8)))
    h = C.gradient_coherence(model, LOSS, (x, y))
    assert close(h.value, ref_h)
    dps = C.gradient_diversity(model, LOSS, (x, y), per_sample=True)
    assert close(dps.value, float((G ** 2).sum() / (G.sum(0) @ G.sum(0))))
    # identity H_b = 1 / (b · D_per-sample)
    assert close(h.value, 1.0 / (8 * dps.value))
    bs = batches(model, k=3)
    gs = naive_batch_grads(model, bs)
    sq = sum(float((naive_ps(prepared(model, xb), xb, yb) ** 2).sum()) for xb, yb in bs) / 15
    e = C.batch_efficiency_ratio(model, LOSS, bs, n_batches=3)
    assert close(e.value, sum(float(g @ g) for g in gs) / 3 / sq) and e.value <= 1
    assert close(C.batch_efficiency_ratio(model, LOSS, (x, y)).value, h.value)
    assert unchanged(model, s)


def test_batch_efficiency_ratio_decreases_with_batch_size():
    # eq. 3.9 claim (notes §4.3): ratio <= 1 and decreasing in b (in expectation; here over disjoint batches)
    model = mlp()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    vals = [C.batch_efficiency_ratio(model, LOSS, [(x[i:i + b], y[i:i + b]) for i in range(0, 64, b)],
                                     n_batches=64 // b).value for b in (2, 8, 32)]
    assert vals[0] > vals[1] > vals[2] and vals[0] <= 1


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("make", MODELS)
def test_masked_metrics_match_naive_on_masked_vectors(make):
    model = make()
    x, y = data(model)
    mask = LayerwiseMask(model, 0.3, seed=0)
    sel = mask.indices
    G = naive_ps(prepared(model, x), x, y)[:, sel]
    h = C.gradient_coherence(model, LOSS, (x, y), mask=mask)
    assert h.mask == 0.3 and close(h.value, float(G.mean(0) @ G.mean(0) / (G ** 2).sum(1).mean()))
    r = C.step_consistency(model, LOSS, (x, y), mask=mask)
    g0 = naive_ps(prepared(model, x), x, y).mean(0)
    d = 1e-3 * g0 / g0.abs().max()  # directions use the unmasked ḡ; only the measured gradients are masked
    ratios, _, _ = naive_kappa_w(model, x, y, [d, -d], sel=sel)
    assert close(r.value, max(ratios))
    k = C.batch_dissonance(model, LOSS, (x, y), sampler="interpolation", n=2, mask=mask)
    j = torch.tensor(k.details["partners"])
    mc = prepared(model, x)
    Gf = naive_ps(mc, x, y)
    ref = []
    for i in range(8):
        best = 0.0
        for kk in range(2):
            dl = 1e-3 * (x[j[i, kk]] - x[i])
            mc.zero_grad()
            LOSS(mc(x[i:i + 1] + dl[None]), y[i:i + 1]).backward()
            best = max(best, float((flatgrad(mc)[sel] - Gf[i, sel]).norm() * x[i].norm()
                                   / (dl.norm() * Gf[i, sel].norm())))
        ref.append(best)
    assert close(k.value, sum(ref) / 8)
    rk = C.relative_gradient_rank(model, LOSS, (x, y), wrt="weight", mask=mask)
    sv = torch.linalg.svdvals(G)
    assert rk.details["d_masked"] == mask.size and close(rk.details["rank"], float((sv ** 2).sum() / sv[0] ** 2))
    # decision (relative_gradient_rank docstring): the Gaussian baseline keeps the unmasked shape b x m
    m_total = sum(p.numel() for p in model.parameters())
    assert rk.details["d"] == m_total
    assert close(rk.value, rk.details["rank"] / C.gaussian_effective_rank(m_total, x.shape[0], 5))
    assert close(rk.details["relative_to_masked_shape"],
                 rk.details["rank"] / C.gaussian_effective_rank(mask.size, x.shape[0], 5))


def test_mask_for_other_model_rejected():
    model = mlp()
    x, y = data(model)
    with pytest.raises(ValueError, match="different parameter layout"):
        C.gradient_coherence(model, LOSS, (x, y), mask=LayerwiseMask(cnn(), 0.5))
    with pytest.raises(TypeError, match="LayerwiseMask"):
        C.gradient_coherence(model, LOSS, (x, y), mask=0.05)


# ------------------------------------------------------------------ consecutive steps
def test_consecutive_step_consistency_matches_manual_steps():
    model = mlp()
    bs = batches(model, k=2, b=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # give the optimizer some momentum state first
    LOSS(model(bs[0][0]), bs[0][1]).backward()
    opt.step()
    opt.zero_grad()
    s = snap(model)
    opt_state = copy.deepcopy(opt.state_dict())
    r = C.consecutive_step_consistency(model, LOSS, bs, optimizer=opt)
    assert unchanged(model, s) and str(opt.state_dict()) == str(opt_state)
    mc = copy.deepcopy(model)
    oc = torch.optim.SGD(mc.parameters(), lr=0.1, momentum=0.9)
    oc.load_state_dict(copy.deepcopy(opt_state))
    w0 = wvec(mc).clone()
    oc.zero_grad()
    LOSS(mc(bs[0][0]), bs[0][1]).backward()
    g0 = flatgrad(mc)
    oc.step()
    w1 = wvec(mc).clone()
    oc.zero_grad()
    LOSS(mc(bs[1][0]), bs[1][1]).backward()
    g1 = flatgrad(mc)
    ref = float((g1 - g0).norm() * w0.norm() / ((w1 - w0).norm() * g0.norm()))
    assert close(r.value, ref)
    # with momentum ‖Δw‖ != lr‖g0‖: the actual step is used
    assert not close(r.details["step_norm"], 0.1 * float(g0.norm()), rel=1e-3)


def test_consecutive_callback_logs_ratio():
    model = mlp()
    cb = C.ConsecutiveStepConsistency()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logged = []

    class S:
        pass

    st = S()
    st.model = model
    st.log_metric = lambda probe, name, value, layer="": logged.append(value)
    grads, ws = [], []
    for step, (xb, yb) in enumerate(batches(model, k=3, b=6), start=1):
        cb.on_step_start(st)
        ws.append(wvec(model).clone())
        opt.zero_grad()
        LOSS(model(xb), yb).backward()
        grads.append(flatgrad(model))
        opt.step()
        st.step = step
        cb.on_step_end(st)
    assert len(logged) == 2
    ref = C.consecutive_ratio(grads[0], grads[1], ws[1] - ws[0], ws[0])
    assert close(logged[0], ref) and close(ref, float((grads[1] - grads[0]).norm() * ws[0].norm()
                                                     / (0.05 * grads[0].norm() ** 2)))
