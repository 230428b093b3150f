"""Reference relative condition numbers (seed 004, §1.4; Defs 1.4-1.7, Thm 1.6, Def 2.4) used to check estimators.

* :func:`relative_condition` — exact κ_f(x) = ‖J_f(x)‖₂‖x‖/‖f(x)‖ (Def 1.5) via ``torch.func.jacrev``.
* :func:`sampled_relative_condition` — the sampled finite-difference lower bound κ≈_f(x) (Def 1.7).
* :func:`linear_map_condition` — closed form ‖A‖₂‖x‖/‖Ax‖ for f(x) = Ax.
* :func:`quadratic_loss_condition` — closed form κ_W = ‖H‖₂‖w‖/‖Hw − c‖ for L(w) = ½wᵀHw − cᵀw (H symmetric).
* :func:`hessian_condition` — exact κ_{h̄_W,W}(w) = ‖H_W(w)‖₂‖w‖/‖h̄_W(w,χ)‖ (Def 2.4) of a model's batch loss by
  power iteration on Hessian-vector products (|largest-magnitude eigenvalue|; cost ``iters`` HVPs).

Worked values (seed 004 §1.4): for f = eˣ, κ(1) = 1 and κ(50) = 50.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import jacrev

from gradcond.probes.conditioning.common import check_eta, check_int, check_nonzero
from gradcond.probes.conditioning.train_mode import engine_for
from gradcond.utils import as_batch

__all__ = [
    "relative_condition",
    "sampled_relative_condition",
    "linear_map_condition",
    "quadratic_loss_condition",
    "hessian_condition",
]


def relative_condition(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Exact relative condition number ‖J_f(x)‖₂·‖x‖/‖f(x)‖ (Def 1.5; Euclidean norms, spectral norm of J)."""
    x = torch.as_tensor(x)
    fx = f(x)
    J = jacrev(f)(x).reshape(fx.numel(), x.numel())
    check_nonzero(fx.norm(), "f(x)")
    return float(torch.linalg.matrix_norm(J, ord=2) * x.norm() / fx.norm())


def sampled_relative_condition(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    eta: float = 1e-3,
    n: int = 16,
    seed: int = 0,
    directions: torch.Tensor | None = None,
) -> float:
    """κ≈_f(x) = max_k ‖f(x+h_k) − f(x)‖·‖x‖ / (‖h_k‖·‖f(x)‖) (Def 1.7), a lower bound of κ_f(x) up to o(η)
    (Thm 1.6). Directions: rows of ``directions`` or ``n`` Gaussian directions; each is rescaled to ‖h‖ = η‖x‖
    (relative step; η if x = 0)."""
    eta = check_eta(eta)
    x = torch.as_tensor(x)
    fx = f(x)
    check_nonzero(fx.norm(), "f(x)")
    if directions is None:
        check_int("n", n)
        gen = torch.Generator().manual_seed(seed)
        directions = torch.randn((n,) + tuple(x.shape), generator=gen, dtype=torch.float64).to(x.dtype)
    scale = eta * (float(x.norm()) or 1.0)
    best = 0.0
    for d in directions:
        h = d.reshape(x.shape) * (scale / d.norm())
        r = (f(x + h) - fx).norm() * x.norm() / (h.norm() * fx.norm())
        best = max(best, float(r))
    return best


def linear_map_condition(A: torch.Tensor, x: torch.Tensor) -> float:
    """κ of f(x) = Ax: ‖A‖₂‖x‖/‖Ax‖."""
    Ax = A @ x
    check_nonzero(Ax.norm(), "Ax")
    return float(torch.linalg.matrix_norm(A, ord=2) * x.norm() / Ax.norm())


def quadratic_loss_condition(H: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> float:
    """κ_W of L(w) = ½wᵀHw − cᵀw (gradient Hw − c, Hessian H symmetric): ‖H‖₂‖w‖/‖Hw − c‖ (notes §4.1)."""
    g = H @ w - c
    check_nonzero(g.norm(), "the gradient Hw - c")
    return float(torch.linalg.matrix_norm(H, ord=2) * w.norm() / g.norm())


def hessian_condition(model, loss_fn, batch_or_loader, *, iters: int = 100, seed: int = 0, bn: str = "batch",
                      tol: float = 1e-10) -> float:
    """Exact step-consistency κ_{h̄_W,W}(w) = ‖H‖₂‖w‖/‖ḡ‖ (Def 2.4) of the mean batch loss, ‖H‖₂ by power
    iteration on HVPs (stops when the eigenvalue estimate changes by < ``tol`` relative). Functional: the model is
    not modified. ``bn="train"``: the train-mode function (BatchNorm statistics that depend on w; see
    :mod:`gradcond.probes.conditioning.train_mode`)."""
    check_int("iters", iters)
    x, y = as_batch(batch_or_loader)
    gen = torch.Generator().manual_seed(seed)
    with engine_for(model, loss_fn, x, y, bn=bn) as e:
        g = e.batch_grad()
        check_nonzero(g.norm(), "the batch gradient")
        v = torch.randn(e.m, generator=gen, dtype=torch.float64).to(e.dtype)
        v = v / v.norm()
        lam = 0.0
        for _ in range(iters):
            hv = e.hvp(v)
            new = float(hv.norm())
            if new == 0.0:
                break
            v = hv / new
            if abs(new - lam) <= tol * new:
                lam = new
                break
            lam = new
        return lam * float(e.flat_w().norm()) / float(g.norm())
