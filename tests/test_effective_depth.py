"""Effective-depth DP (seed 003 App. D.2) and the residual tracker, against independent per-sample gradients."""


import pytest
import torch
from torch import nn

from gradcond.probes.tracking import EffectiveDepth, ResidualTracker, power_op_norm
from gradcond.zoo import resnet_mlp


def _per_sample_weight_grad_norms(model, x, y, names):
    """sum over samples of ||d loss_b / d W_l||_F via torch.func (independent of the hooks)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xb, yb):
        out = torch.func.functional_call(model, p, (xb[None],))
        return -(out * yb[None]).sum() / x.shape[0]  # term of the mean dot loss

    g = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return [float(g[f"{n}.weight"].flatten(1).norm(dim=1).sum()) for n in names]


def _dot(o, t):
    return -(o * t).sum(1).mean()


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_zero_residual_gives_exact_gradient_norms_and_depth_zero(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(),
                              nn.Linear(8, 5)).double()
        names = ["0", "2", "5"]
    else:
        model = resnet_mlp(6, 5, 8, blocks=2, act="tanh", norm="layer", skip="gaussian", seed=0).double()
        names = ["0", "1.branch.2", "1.branch.5", "2.branch.2", "2.branch.5", "4"]
    x = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randn(20, 5, dtype=torch.float64)
    ed = EffectiveDepth()
    trk = ResidualTracker()

    class S:  # minimal TrainState stand-in
        pass

    s = S()
    s.model = model
    trk.theta0 = {n: w.detach().clone() for n, w in trk._w(model).items()}
    ops = trk.delta_op_norms(model)
    assert all(v == 0.0 for v in ops.values())
    lr = 0.1
    est = ed.estimate_step(model, _dot, x, y, ops, {id(p): lr for p in model.parameters()})
    assert ed.linear_names == names
    ref = _per_sample_weight_grad_norms(model, x, y, names)
    # with zero residuals arr[0] carries exactly ||df0/df_l|| (the ResNet rule adds back the skip path)
    for i in range(len(names)):
        assert float(est[i, 0]) == pytest.approx(lr * ref[i], rel=1e-10)
    assert float(est[:, 1:].abs().max()) == 0.0


def test_dp_two_layer_hand_computation():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randn(7, 3, dtype=torch.float64)
    ed = EffectiveDepth()
    ops = {"0": 0.3, "2": 0.7}
    est = ed.estimate_step(model, _dot, x, y, ops, {id(p): 0.5 for p in model.parameters()})
    h1 = model[0](x)
    h1.retain_grad()
    a = model[1](h1)
    a.retain_grad()
    out = model[2](a)
    out.retain_grad()
    _dot(out, y).backward()
    g2, ga, g1 = out.grad.norm(dim=1), a.grad.norm(dim=1), h1.grad.norm(dim=1)
    # top linear layer: arr = [||g2||]
    assert float(est[1, 0]) == pytest.approx(float((0.5 * a.detach().norm(dim=1) * g2).sum()), rel=1e-12)
    # after layer 2: [ga, g2*op2]; after tanh (ratio g1/ga): [g1, g2*op2*g1/ga]
    arr1 = g2 * 0.7 * g1 / ga
    xn = x.norm(dim=1)
    assert float(est[0, 0]) == pytest.approx(float((0.5 * xn * (g1 + arr1)).sum()), rel=1e-12)
    assert float(est[0, 1]) == pytest.approx(float((0.5 * xn * arr1).sum()), rel=1e-12)
    assert float(est[0, 2]) == 0.0


def test_callbacks_in_training_loop():
    from gradcond.train import fit

    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = torch.randn(64, 3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trk = ResidualTracker(gsc_every=2)
    ed = EffectiveDepth(tracker=trk)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hist = fit(model, loader, loss="mse", optimizer="sgd", lr=0.05, epochs=2, callbacks=[trk, ed])
    names = {(m["name"]) for m in hist.metrics}
    assert {"delta_op", "rel_update", "inv_gsc", "lambda"} <= names
    rel = [m["value"] for m in hist.metrics if m["name"] == "rel_update"]
    assert all(r > 0 for r in rel)
    # delta_op agrees with the exact spectral norm of W - W(0) (power iteration converges from below)
    last = {m["layer"]: m["value"] for m in hist.metrics if m["name"] == "delta_op"}
    for n in ("0", "2", "4"):
        exact = float(torch.linalg.matrix_norm(model.state_dict()[f"{n}.weight"] - before[f"{n}.weight"], ord=2))
        assert last[n] == pytest.approx(exact, rel=0.05)
        assert last[n] <= exact * (1 + 1e-6)
    assert 1 <= ed.value <= 3  # residuals are non-zero after a step; at most 3 linear layers
    assert ed.contributions()[0] >= ed.contributions()[1]


def test_power_iteration_and_bad_input():
    m = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
    s, v = power_op_norm(m, iters=50)
    assert s == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError, match="threshold"):
        EffectiveDepth(threshold=0)
    with pytest.raises(ValueError, match="unknown or weight-less"):
        ResidualTracker(layers=["nope"])._w(nn.Sequential(nn.Linear(2, 2)))
