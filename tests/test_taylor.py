"""First-order Taylor truncation (seed 003 App. G) against closed forms and its O(eps^2) error."""

import copy

import pytest
import torch
from torch import nn

from gradcond.probes.taylor import taylor_truncate
from gradcond.zoo import mlp, resnet_mlp


def _perturb(model, eps, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(eps * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_linear_chain_drops_exactly_the_triple_residual_product():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(5, 5, bias=False) for _ in range(3)]).double()
    theta0 = {k: v.clone() for k, v in model.named_parameters()}
    _perturb(model, 0.3)
    x = torch.randn(11, 5, dtype=torch.float64)
    d = [model[i].weight - theta0[f"{i}.weight"] for i in range(3)]
    with torch.no_grad():
        t3 = taylor_truncate(model, theta0, 3)(x)
        exact = model(x)
        # App. G: T keeps every term with <= 2 residual matrices; the only dropped term is dW3 dW2 dW1 x
        assert torch.allclose(exact - t3, x @ (d[2] @ d[1] @ d[0]).T, atol=1e-12)
        assert torch.allclose(taylor_truncate(model, theta0, 2)(x), exact, atol=1e-12)  # 2 layers: exact


@pytest.mark.parametrize("build", ["mlp", "resnet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_at_init_and_second_order_error(build, dtype):
    if build == "mlp":
        model = mlp(6, 4, depth=5, width=8, act="tanh", norm="layer", init="gaussian", seed=1)
    else:
        model = resnet_mlp(6, 4, 8, blocks=3, act="tanh", norm="layer", skip="gaussian", seed=1)
    model = model.to(dtype)
    theta0 = {k: v.clone() for k, v in model.named_parameters()}
    x = torch.randn(9, 6, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        k = 4
        tt = taylor_truncate(model, theta0, k)
        assert torch.allclose(tt(x), model(x), atol=tol)  # no residual: the expansion is exact
        if dtype == torch.float32:
            return
        errs = []
        for eps in (5e-3, 2.5e-3):
            m = copy.deepcopy(model)
            _perturb(m, eps, seed=3)
            errs.append(float((taylor_truncate(m, theta0, k)(x) - m(x)).abs().max()))
        # i_l is applied to T exactly, so the dropped terms (D^2 r [delta, delta], 3-residual products) are
        # O(eps^3): halving eps divides the error by ~8
        assert 6.0 < errs[0] / errs[1] < 10.0
        assert tt.replaced_linear >= k


def test_bad_input():
    model = mlp(4, 2, depth=3, width=4, seed=0)
    theta0 = dict(model.named_parameters())
    with pytest.raises(ValueError, match="bottom_k"):
        taylor_truncate(model, theta0, 0)
    with pytest.raises(ValueError, match="bottom_k"):
        taylor_truncate(model, theta0, 4)
    with pytest.raises(ValueError, match="lacks"):
        taylor_truncate(model, {"0.weight": theta0["0.weight"]}, 2)
    with pytest.raises(TypeError, match="Sequential"):
        taylor_truncate(nn.Linear(2, 2), {}, 1)
    assert taylor_truncate(model, mlp(4, 2, depth=3, width=4, seed=0), 2).replaced_linear == 2


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_network_in_both_modes_keeps_its_buffers(mode):
    # a train-mode BatchNorm updates its running statistics in place, which torch.func's jvp refused on the
    # module's own buffers; the truncation must work in both modes and leave the buffers untouched
    model = mlp(6, 4, depth=4, width=8, act="tanh", norm="batch", seed=1).double()  # smooth: ReLU kinks near the
    # batch-centred zero would add a non-smooth error term
    getattr(model, mode)()
    theta0 = {k: v.clone() for k, v in model.named_parameters()}
    x = torch.randn(16, 6, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        got = taylor_truncate(model, theta0, 3)(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        want = copy.deepcopy(model)(x)  # a copy: the model's own forward would update its statistics in train mode
    assert torch.allclose(got, want, atol=1e-12)  # theta == theta0: the expansion is exact
    errs = []
    for eps in (5e-3, 2.5e-3):
        m = copy.deepcopy(model)
        _perturb(m, eps, seed=3)
        with torch.no_grad():
            errs.append(float((taylor_truncate(m, theta0, 3)(x) - copy.deepcopy(m)(x)).abs().max()))
    assert 6.0 < errs[0] / errs[1] < 10.0  # O(eps^3), as without BatchNorm
