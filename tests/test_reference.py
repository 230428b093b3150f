"""Reference condition numbers (seed 004 §1.4, Defs 1.5-1.7, Def 2.4) and the estimators checked against them."""


import pytest
import torch
from torch import nn

from gradcond.probes import conditioning as C
from gradcond.probes import reference as R


@pytest.mark.parametrize("x0", [1.0, 50.0])
def test_exp_relative_condition_equals_x(x0):
    # seed 004 §1.4: for f = e^x, κ(1) = 1 and κ(50) = 50 (exact: κ = |x|)
    x = torch.tensor([x0], dtype=torch.float64)
    assert R.relative_condition(torch.exp, x) == pytest.approx(x0, rel=1e-12)
    # the sampled finite-difference bound approaches it as η → 0 (Thm 1.6): |κ≈ − κ| <= ~η·x²/2 relative
    est = R.sampled_relative_condition(torch.exp, x, eta=1e-7, n=2)
    assert est == pytest.approx(x0, rel=1e-4)


def test_exp_relative_condition_float32():
    x = torch.tensor([1.0])
    assert R.relative_condition(torch.exp, x) == pytest.approx(1.0, rel=1e-6)


def test_linear_map_condition():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 4, generator=g, dtype=torch.float64)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    exact = R.linear_map_condition(A, x)
    assert R.relative_condition(lambda v: A @ v, x) == pytest.approx(exact, rel=1e-12)
    # random directions give a lower bound; the top right singular vector attains it (f is linear: no o(η) term)
    assert R.sampled_relative_condition(lambda v: A @ v, x, n=8) <= exact * (1 + 1e-12)
    v1 = torch.linalg.svd(A).Vh[0]
    assert R.sampled_relative_condition(lambda v: A @ v, x, directions=v1[None]) == pytest.approx(exact, rel=1e-10)
    sv = torch.linalg.svdvals(A)
    assert exact == pytest.approx(float(sv[0] * x.norm() / (A @ x).norm()), rel=1e-14)


class Quadratic(nn.Module):
    """Per-sample loss ½wᵀHw − x_iᵀw, so the batch loss is ½wᵀHw − c̄ᵀw with c̄ the batch mean of x."""

    def __init__(self, H, w):
        super().__init__()
        self.register_buffer("H", H)
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return 0.5 * self.w @ self.H @ self.w - x @ self.w


def mean_loss(out, target):
    return out.mean()


def quadratic(d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    H = Q @ torch.diag(torch.linspace(0.5, 4.0, d, dtype=torch.float64)) @ Q.T
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    return Quadratic(H, w), H, w, x


def test_quadratic_loss_closed_form_and_estimators():
    model, H, w, x = quadratic()
    c = x.mean(0)
    exact = R.quadratic_loss_condition(H, c, w)
    assert exact == pytest.approx(4.0 * float(w.norm() / (H @ w - c).norm()), rel=1e-12)
    batch = (x, torch.zeros(5))
    # Def 2.4 via power iteration on HVPs
    assert R.hessian_condition(model, mean_loss, batch, iters=500, tol=1e-14) == pytest.approx(exact, rel=1e-8)
    # κ≈_W along the top Hessian eigenvector attains κ_W; finite difference = jvp for a quadratic
    top = torch.linalg.eigh(H).eigenvectors[:, -1] * 1e-3
    fd = C.step_consistency(model, mean_loss, batch, directions=top[None]).value
    jv = C.step_consistency(model, mean_loss, batch, directions=top[None], mode="jvp").value
    assert fd == pytest.approx(exact, rel=1e-8) and jv == pytest.approx(exact, rel=1e-12)
    # the default sampler (±ḡ) is a lower bound, equal to ‖Hḡ‖‖w‖/‖ḡ‖²
    g = H @ w - c
    lt = C.step_consistency(model, mean_loss, batch).value
    assert lt <= exact * (1 + 1e-10)
    assert lt == pytest.approx(float((H @ g).norm() * w.norm() / g.norm() ** 2), rel=1e-8)


def test_sampled_step_consistency_is_a_lower_bound_of_hessian_condition():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(10, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
    exact = R.hessian_condition(model, torch.nn.functional.cross_entropy, batch, iters=2000, tol=1e-13)
    for sampler, n in [("limited_targeted", 2), ("targeted", 10), ("random", 8)]:
        est = C.step_consistency(model, torch.nn.functional.cross_entropy, batch, sampler=sampler, n=n,
                                 eta=1e-6, norm="2", mode="jvp").value
        assert 0 < est <= exact * (1 + 1e-6)


def test_reference_bad_input():
    with pytest.raises(ValueError, match="f\\(x\\) is zero"):
        R.relative_condition(lambda v: v * 0, torch.ones(2))
    with pytest.raises(ValueError, match="eta must be"):
        R.sampled_relative_condition(torch.exp, torch.ones(1), eta=-1)
    with pytest.raises(ValueError, match="Ax is zero"):
        R.linear_map_condition(torch.zeros(2, 2), torch.ones(2))
