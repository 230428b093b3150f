"""GSC profile and GSC(k, l) (seed 003 Def. 2, protocol I.2) against independent computations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradcond.probes.scale import GSCProfile, gsc, gsc_profile


def _data(n=64, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype) / math.sqrt(d)


def _net(norm=None, act=nn.Tanh, d=8, depth=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(depth):
        layers.append(nn.Linear(d, d, bias=False))
        if norm is not None:
            layers.append(norm(d))
        if i < depth - 1:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def dot_loss(out, y):
    return -(out * y).sum(1).mean()


def _manual(model, x, y, summed=True):
    """Independent reference: run the Sequential by hand, keep every output, backprop sum of per-sample errors."""
    acts, h = [], x
    for m in model:
        h = m(h)
        h.retain_grad()
        acts.append(h)
    f0 = -(h * y).sum(1)
    f0.sum().backward()
    q = lambda t: math.sqrt(float((t.detach().double() ** 2).mean()))  # noqa: E731
    ql = q(f0)
    out = []
    for a in acts:
        gn = a.grad.norm(dim=1)
        an = a.detach().norm(dim=1)
        out.append(q(gn) / math.sqrt(a.shape[1]) * q(an) / ql)
    model.zero_grad(set_to_none=True)
    return out, acts, f0.detach()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_profile_matches_manual_ratio_of_q(dtype, tol):
    model = _net(dtype=dtype)
    x, y = _data(dtype=dtype)
    prof = gsc_profile(model, dot_loss, (x, y))
    ref, acts, f0 = _manual(model, x, y)
    assert prof.layers == [str(i) for i in range(len(model))]
    assert prof.kinds == ["linear", "act", "linear", "act", "linear"]
    assert prof.linear_index == [2, 2, 1, 1, 0]
    np.testing.assert_allclose(prof.gsc, ref, rtol=tol)
    # per-sample values: ||g||/sqrt(d) * ||f|| / |f0| for the first layer
    ps = prof.per_sample()[:, 0]
    a = acts[0]
    np.testing.assert_allclose(prof.act_norms[:, 0], a.detach().norm(dim=1).double().numpy(), rtol=tol)
    assert ps.shape == (64,)
    # the aggregate is the ratio of quadratic means, not the mean of per-sample ratios
    agg = np.sqrt(np.mean(prof.grad_norms[:, 0] ** 2)) / math.sqrt(8) * np.sqrt(np.mean(prof.act_norms[:, 0] ** 2)) \
        / np.sqrt(np.mean(prof.loss_values ** 2))
    assert prof.gsc[0] == pytest.approx(agg, rel=1e-12)
    assert abs(np.mean(ps) - prof.gsc[0]) > 1e-6 * prof.gsc[0]


def test_loss_name_and_batches_equal_single_batch():
    model = _net()
    x, y = _data(n=60)
    one = gsc_profile(model, "dot", (x, y))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    many = gsc_profile(model, "dot", loader)
    np.testing.assert_allclose(one.gsc, many.gsc, rtol=1e-12)
    assert many.n_samples == 60


def test_batchnorm_train_mode_summed_error_and_buffers_unchanged():
    model = _net(norm=nn.BatchNorm1d)
    x, y = _data(n=50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = gsc_profile(model, "dot", (x, y))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats / counter untouched
    ref, _, _ = _manual(model, x, y)  # batch statistics, gradient of the summed error (cross-sample BN terms)
    for k in before:  # the manual reference ran BN in train mode: restore for the eval check below
        after[k].copy_(before[k])
    np.testing.assert_allclose(prof.gsc, ref, rtol=1e-10)
    assert prof.training
    model.eval()
    ev = gsc_profile(model, "dot", (x, y))
    ref_ev, _, _ = _manual(model, x, y)
    np.testing.assert_allclose(ev.gsc, ref_ev, rtol=1e-10)
    assert not np.allclose(ev.gsc, prof.gsc)


def test_inplace_relu_is_measured_correctly_and_restored():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8)).double()
    ref_model = nn.Sequential(model[0], nn.ReLU(), model[2])
    x, y = _data()
    a = gsc_profile(model, "dot", (x, y)).gsc
    b = gsc_profile(ref_model, "dot", (x, y)).gsc
    np.testing.assert_allclose(a, b, rtol=1e-12)
    assert model[1].inplace is True


def test_named_layers_and_unknown_names():
    model = _net()
    x, y = _data()
    p = gsc_profile(model, "dot", (x, y), layers=["0", "4"])
    full = gsc_profile(model, "dot", (x, y))
    assert p.layers == ["0", "4"]
    assert p["0"] == pytest.approx(full["0"], rel=1e-12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unknown layer name"):
        gsc_profile(model, "dot", (x, y), layers=["0", "nope"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_non_scalar_loss_is_an_error():
    model = _net()
    x, y = _data()
    with pytest.raises(ValueError, match="scalar"):
        gsc_profile(model, lambda o, t: -(o * t).sum(1), (x, y))
    with pytest.raises(ValueError, match="targets"):
        gsc_profile(model, "dot", x)


def test_all_zero_layer_gives_nan_with_warning():
    model = _net()
    with torch.no_grad():
        model[0].weight.zero_()  # f_L = 0: GSC(L, 0) undefined, loss also 0 everywhere
    x, y = _data()
    with pytest.warns(RuntimeWarning, match="GSC undefined"):
        p = gsc_profile(model, "dot", (x, y))
    assert all(math.isnan(v) for v in p.gsc)
    model = _net()
    torch.manual_seed(0)
    m2 = nn.Sequential(model[0], nn.ReLU(), nn.Linear(8, 8).double())
    with torch.no_grad():
        model[0].weight.copy_(-torch.eye(8, dtype=torch.float64))
        m2[2].bias.fill_(1.0)
    xp = x.abs() + 0.1  # ReLU(-x) = 0 for every sample: the ReLU output is all zero, the loss is not
    with pytest.warns(RuntimeWarning, match=r"layer '1'.*all its activations are zero"):
        p = gsc_profile(m2, "dot", (xp, y))
    assert math.isnan(p["1"]) and math.isfinite(p["2"])


def test_fit_explosion_recovers_known_rate():
    li = list(range(10, -1, -1))
    prof = GSCProfile(layers=[str(i) for i in li], kinds=["linear"] * 11, linear_index=li, dims=[4] * 11,
                      gsc=[0.7 * 1.3 ** i for i in li], q_grad=[1.0] * 11, q_act=[1.0] * 11, q_loss=1.0,
                      n_samples=1, training=False)
    fit = prof.fit_explosion()
    assert fit.rate == pytest.approx(1.3, rel=1e-10)
    assert fit.intercept == pytest.approx(0.7, rel=1e-10)
    assert fit.r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="distinct linear indices"):
        GSCProfile(["a"], ["linear"], [0], [1], [1.0], [1.0], [1.0], 1.0, 1, False).fit_explosion()


def test_result_objects_serialise_and_plot():
    x, y = _data()
    p = gsc_profile(_net(), "dot", (x, y))
    d = p.to_dict()
    assert d["lowest"] == p.gsc[0] and "grad_norms" not in d
    rows = p.to_frame()
    assert len(rows) == len(p.layers) and set(rows[0]) >= {"layer", "gsc", "linear_index"}
    from matplotlib.figure import Figure

    assert isinstance(p.plot(), Figure)


def test_prop4_invariance_bias_free_relu():
    """Prop. 4: per-layer scalar rescaling with product 1 leaves the GSC unchanged (float64: rel < 1e-6)
    while raw gradient norms change by orders of magnitude."""
    model = _net(act=nn.ReLU, depth=6, d=16)
    x, y = _data(d=16, n=128)
    p0 = gsc_profile(model, "dot", (x, y))
    gammas = [10.0, 10.0, 10.0, 0.1, 0.1, 0.1]
    with torch.no_grad():
        for lin, g in zip([m for m in model if isinstance(m, nn.Linear)], gammas):
            lin.weight.mul_(g)
    p1 = gsc_profile(model, "dot", (x, y))
    np.testing.assert_allclose(p1.gsc, p0.gsc, rtol=1e-6)
    ratio = np.array(p1.q_grad) / np.array(p0.q_grad)
    assert ratio.max() / ratio.min() > 100


# ------------------------------------------------------------------------------------------- GSC(k, l)


def _exact_jac_q2(model, x, k_idx, l_idx):
    """mean_i ||d f_l,i / d f_k,i||_F^2 from torch.autograd.functional.jacobian on each sample (eval mode)."""
    sub = nn.Sequential(*list(model)[k_idx + 1 : l_idx + 1])
    with torch.no_grad():
        fk = nn.Sequential(*list(model)[: k_idx + 1])(x)
    tot = 0.0
    for i in range(x.shape[0]):
        j = torch.autograd.functional.jacobian(sub, fk[i : i + 1])
        tot += float(j.pow(2).sum())
    return tot / x.shape[0], fk


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_hutchinson_within_5_percent_of_full_jacobian(mode):
    model = _net(d=12, depth=4, seed=2)
    x, y = _data(n=48, d=12)
    m2, fk = _exact_jac_q2(model, x, 0, 4)
    with torch.no_grad():
        fl = nn.Sequential(*list(model)[:5])(x)
    ref = math.sqrt(m2 / 12) * float(fk.norm(dim=1).pow(2).mean().sqrt()) / float(fl.norm(dim=1).pow(2).mean().sqrt())
    est = gsc(model, "dot", (x, y), k="0", l="4", probes=64, mode=mode, seed=1)
    assert est.value == pytest.approx(ref, rel=0.05)
    assert 0 < est.stderr < 0.05 * ref
    exact = gsc(model, "dot", (x, y), k="0", l="4", mode="exact")
    assert exact.value == pytest.approx(ref, rel=1e-10) and exact.stderr == 0.0


def test_gsc_to_loss_equals_profile():
    model = _net(norm=nn.LayerNorm)
    x, y = _data()
    p = gsc_profile(model, "dot", (x, y))
    for name in ("0", "3"):
        assert gsc(model, "dot", (x, y), k=name).value == pytest.approx(p[name], rel=1e-12)


def test_gsc_bad_input():
    model = _net()
    x, y = _data()
    with pytest.raises(ValueError, match="before"):
        gsc(model, "dot", (x, y), k="4", l="0")
    with pytest.raises(ValueError, match="unknown mode"):
        gsc(model, "dot", (x, y), k="0", l="4", mode="nope")
    with pytest.raises(ValueError, match="unknown layer"):
        gsc(model, "dot", (x, y), k="zz", l="4")
    with pytest.raises(ValueError, match="probes"):
        gsc(model, "dot", (x, y), k="0", l="4", probes=1)


def test_outputs_without_batch_dimension_are_skipped_and_integer_inputs_work():
    from gradcond.zoo import transformer

    model = transformer(in_features=None, vocab_size=20, seq_len=8, num_classes=10)
    x = torch.randint(0, 20, (16, 8))
    y = torch.randint(0, 10, (16,))
    p = gsc_profile(model, "cross_entropy", (x, y))
    assert "pos" not in p.layers  # the position table (8, d) has no batch dimension
    assert p.layers[0] == "embed" and all(math.isfinite(v) and v > 0 for v in p.gsc)
    with pytest.raises(ValueError, match="batch as dimension 0"):
        gsc_profile(model, "cross_entropy", (x, y), layers=["pos"])
