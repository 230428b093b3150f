"""Pre-activation std / sign diversity / correlation (seed 003 I.2) against a direct NumPy computation."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradcond.probes.domain import domain_stats


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.ReLU(), nn.Linear(10, 10), nn.Tanh(),
                         nn.Linear(10, 3)).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_matches_numpy(dtype, tol):
    model = _model(dtype)
    x = torch.randn(300, 6, dtype=dtype)
    ds = domain_stats(model, x, correlation=True, corr_samples=100)
    with torch.no_grad():
        pre = [model[:2](x), model[:4](x)]  # inputs of the ReLU and of the Tanh
    assert ds.layers == ["2", "4"]
    for i, p in enumerate(pre):
        a = p.double().numpy()
        std = np.sqrt(np.mean(a.std(0) ** 2))  # quadratic mean over neurons of the population std
        pos = (a > 0).mean(0)
        sd = np.minimum(pos, 1 - pos).mean()
        u = a[:100] / np.linalg.norm(a[:100], axis=1, keepdims=True)
        g = u @ u.T
        corr = (g.sum() - np.trace(g)) / (100 * 99)
        assert ds.std[i] == pytest.approx(std, rel=tol)
        assert ds.sign_diversity[i] == pytest.approx(sd, abs=1e-12)
        assert ds.correlation[i] == pytest.approx(corr, rel=1e-6, abs=1e-9)
    assert ds.top["layer"] == "4" and ds.n_samples == 300


def test_batches_aggregate_and_buffers_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double().eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
    x = torch.randn(90, 5, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = domain_stats(model, x)
    many = domain_stats(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=32))
    assert one.std[0] == pytest.approx(many.std[0], rel=1e-12)
    assert one.sign_diversity == many.sign_diversity
    model.train()
    domain_stats(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sign_diversity_extremes_and_named_layers():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
    x = torch.rand(50, 4) + 0.1  # all positive pre-activations: sign diversity 0
    assert domain_stats(model, x).sign_diversity == [0.0]
    xs = torch.cat([x, -x])  # symmetric: exactly half positive
    assert domain_stats(model, xs, layers=["1"]).sign_diversity == [0.5]
    with pytest.raises(ValueError, match="unknown layer"):
        domain_stats(model, x, layers=["7"])


def test_lli_network_is_not_collapsed():
    """Table 1 LLI rows: std 1.00 and sign diversity 0.50 (we allow 0.01, from 4000 samples)."""
    from gradcond.data import load_dataset
    from gradcond.zoo import mlp

    x = load_dataset("gaussian", n=4000, dim=100, seed=5).train.tensors[0]
    model = mlp(100, 100, depth=10, width=100, init="looks_linear", bias=False, seed=5)
    top = domain_stats(model, x).top
    assert top["std"] == pytest.approx(1.0, abs=0.01)
    assert top["sign_diversity"] == pytest.approx(0.5, abs=0.01)
    assert math.isfinite(top["std"])
