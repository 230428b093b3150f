"""The gradient noise scale (issue 24 §5): B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, eq. 2.9 and App. A.1),
checked against an exact per-example computation (materialised per-sample gradients, float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradcond.probes import gradient_noise_scale, noise_scale_from_norms


def _exact(model, loss_fn, x, y):
    """Unbiased per-example estimates from the b × P per-sample gradient matrix: tr Σ = Σ|g_i - ḡ|²/(b-1),
    |G|² = |ḡ|² - tr Σ / b (independent of the ghost norms and of the two-batch formula)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([v.reshape(x.shape[0], -1) for v in g.values()], 1)
    b = flat.shape[0]
    mean = flat.mean(0)
    trace = float(((flat - mean) ** 2).sum() / (b - 1))
    gsq = float(mean @ mean) - trace / b
    return trace, gsq, trace / gsq


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 4)).double()


@pytest.mark.parametrize("seed", [0, 1])
def test_per_sample_noise_scale_equals_the_exact_per_example_computation(seed):
    model = _mlp(seed)
    g = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64)
    y = torch.where(torch.rand(24, generator=g) < 0.8, 0, torch.randint(0, 4, (24,), generator=g))  # mostly class 0
    ce = nn.functional.cross_entropy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ns = gradient_noise_scale(model, ce, (x, y))
    trace, gsq, b = _exact(model, ce, x, y)
    assert ns.method == "per_sample" and ns.b_small == 1 and ns.b_big == 24
    assert ns.trace_sigma == pytest.approx(trace, rel=1e-10)
    assert ns.grad_sq == pytest.approx(gsq, rel=1e-10)
    assert ns.b_simple == pytest.approx(b, rel=1e-10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert gsq > 0 and b > 0  # the comparison is of a defined noise scale


def test_a_gradient_lost_in_the_noise_gives_nan_not_a_negative_batch_size():
    model = _mlp(0)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (24,), generator=g)  # balanced random labels: the mean gradient is mostly noise
    ns = gradient_noise_scale(model, nn.functional.cross_entropy, (x, y))
    trace, gsq, _ = _exact(model, nn.functional.cross_entropy, x, y)
    assert gsq < 0 and ns.grad_sq == pytest.approx(gsq, rel=1e-10) and math.isnan(ns.b_simple)


def test_noise_scale_of_a_conv_net_with_mse():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 2)).double()
    x = torch.randn(10, 2, 5, 5, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64) + 3.0  # an offset every sample's gradient shares
    mse = nn.functional.mse_loss
    ns = gradient_noise_scale(model, mse, (x, y))
    trace, gsq, b = _exact(model, mse, x, y)
    assert gsq > 0 and ns.b_simple == pytest.approx(b, rel=1e-10) and ns.trace_sigma == pytest.approx(trace, rel=1e-10)


def test_two_batch_formula_against_a_hand_computation():
    # |G_small|² = 5 at B=2, |G_big|² = 3 at B=8: |G|² = (8*3 - 2*5)/6 = 7/3, S = 2/(1/2 - 1/8) = 16/3, B = 16/7
    ns = noise_scale_from_norms(5.0, 3.0, 2, 8)
    assert ns.grad_sq == pytest.approx(7 / 3) and ns.trace_sigma == pytest.approx(16 / 3)
    assert ns.b_simple == pytest.approx(16 / 7)
    # a gradient lost in the noise: |G|² estimate <= 0 gives NaN, not a negative batch size
    assert math.isnan(noise_scale_from_norms(5.0, 1.0, 1, 2).b_simple)
    with pytest.raises(ValueError, match=r"needs batch sizes 0 < b_small < b_big, got b_small=4, b_big=4"):
        noise_scale_from_norms(1.0, 1.0, 4, 4)
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        gradient_noise_scale(_mlp(), nn.functional.cross_entropy, (torch.randn(1, 6).double(), torch.tensor([0])))
