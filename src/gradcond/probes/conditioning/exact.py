"""Exact input-space gradient conditioning κ_{h_W,X} (seed 004, Def. 3.3 / §1.4 of the notes):

    κ_X(w, x, t) = ‖J(x)‖₂ · ‖x‖ / ‖h_W(w, x, t)‖,   J(x) = ∂h_W(w, x, t)/∂x   (the m × k mixed Jacobian ∂²L/∂w∂x),

the quantity that batch-dissonance κ̄≈_X (eqs. 3.15-3.16, :func:`~gradcond.probes.conditioning.batch_dissonance`)
estimates from a few directions. ‖J‖₂ is the operator (spectral) norm, computed per sample either

* ``method="power"``: power iteration on JᵀJ with one forward-over-reverse JVP (Jv) and one VJP (Jᵀu) of
  x ↦ h_W(w, x, t) per iteration (``torch.func``), vectorised over the samples of a chunk; the estimate ‖Jv‖ rises
  monotonically to ‖J‖₂ from below and stops when its relative change is below ``tol`` for every sample (or after
  ``iters`` iterations; ``details["converged"]`` says which; default ``tol`` 1e-5 in float32, 1e-9 in float64), or
* ``method="dense"``: the full m × k Jacobian (k forward-mode JVPs, ``torch.func.jacfwd``) and its largest singular
  value; exact up to rounding, memory m·k per sample (small models only).

For every direction δ the exact directional derivative satisfies ‖Jδ‖/‖δ‖ ≤ ‖J‖₂, so the ``mode="jvp"`` estimate of
``batch_dissonance`` never exceeds this value; its finite-difference estimate agrees only up to O(η) in smooth
networks and can exceed it where ReLU kinks or BN statistics change inside the step.

BatchNorm follows the :class:`~gradcond.probes.per_sample.Engine` policies ``bn="batch"`` (statistics frozen from the
batch) or ``"eval"``; ``bn="train"`` is undefined per sample and rejected. The model is never written.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import grad, jacfwd, jvp, vjp, vmap

from gradcond.probes.conditioning.common import Result, Timer, check_choice, check_finite, check_int, need_samples
from gradcond.probes.flat_vectors import flatten
from gradcond.probes.per_sample import Engine
from gradcond.utils import accepts_model_output, as_batch

__all__ = ["input_condition_exact"]


@accepts_model_output
def input_condition_exact(
    model: nn.Module,
    loss_fn: Callable,
    batch,
    *,
    m: int | None = None,
    method: str = "power",
    iters: int = 200,
    tol: float | None = None,
    seed: int = 0,
    bn: str = "batch",
    chunk_size: int | None = None,
) -> Result:
    """Exact κ_X per sample and their mean over the first ``m`` samples of ``batch`` (module docstring).

    Returns a :class:`Result` with ``value`` = mean_i κ_X(x_i) (the exact counterpart of κ̄≈_X, eq. 3.16) and
    details ``per_sample`` (κ_X), ``op_norms`` (‖J_i‖₂), ``grad_norms`` (‖h_W(x_i)‖), ``x_norms``, ``method``,
    ``iterations`` and ``converged`` (power method). Cost: ``power``: 2 extra backward-sized passes per iteration per
    sample (vectorised over a chunk); ``dense``: k JVPs per sample and an SVD of an m × k matrix.
    Bad input: integer inputs, ``bn="train"``, an unknown method, ``m`` larger than the batch, or a sample whose weight
    gradient is zero (κ_X divides by it) raise ``ValueError``.
    """
    check_choice("method", method, ("power", "dense"))
    check_int("iters", iters)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}.")
    if bn not in ("batch", "eval"):
        raise ValueError(f"bn must be 'batch' or 'eval' for the per-sample κ_X (a train-mode BatchNorm couples the "
                         f"samples, so per-sample gradients are undefined), got {bn!r}.")
    with Timer() as t:
        x, y = as_batch(batch)
        if not x.is_floating_point():
            raise ValueError("input_condition_exact differentiates with respect to the inputs and needs floating-point "
                             "inputs; got integer inputs.")
        m = x.shape[0] if m is None else check_int("m", m)
        need_samples(x.shape[0], m, f"input_condition_exact with m={m}")
        with Engine(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
            if tol is None:  # a relative change that rounding of the model dtype can still resolve
                tol = 1e-5 if e.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
            xm, ym = e.x[:m], y[:m]
            shape = xm.shape[1:]

            def hw(xi, yi):  # x ↦ h_W(w, x, t) as a flat vector (the map whose Jacobian is J)
                return flatten(grad(e._loss_single)(e.w, xi, yi), e.names)

            ops, gns, its, conv = [], [], [], []
            step = e.chunk_size
            for s in range(0, m, step):
                xs, ys = xm[s:s + step], ym[s:s + step]
                c = xs.shape[0]
                if method == "dense":
                    def one(xi, yi):
                        J = jacfwd(lambda xx: hw(xx, yi))(xi).reshape(e.m, -1)
                        return hw(xi, yi), J

                    g, J = vmap(one)(xs, ys)
                    check_finite(J, "a mixed Jacobian")
                    ops.append(torch.linalg.matrix_norm(J.double(), ord=2))
                    gns.append(g.double().norm(dim=1))
                    its += [0] * c
                    conv += [True] * c
                    continue

                def jtj(xi, yi, vi):
                    g, jv = jvp(lambda xx: hw(xx, yi), (xi,), (vi,))
                    _, pull = vjp(lambda xx: hw(xx, yi), xi)
                    (u,) = pull(jv)
                    return g, jv, u

                gen = torch.Generator().manual_seed(int(seed) + s)
                v = torch.randn((c,) + tuple(shape), generator=gen, dtype=torch.float64).to(xs.device, xs.dtype)
                v = v / v.reshape(c, -1).norm(dim=1).reshape((c,) + (1,) * len(shape))
                sigma_prev = torch.zeros(c, dtype=torch.float64, device=xs.device)
                done = torch.zeros(c, dtype=torch.bool, device=xs.device)
                n_it = torch.zeros(c, dtype=torch.long)
                g = None
                for it in range(iters):
                    g, jv, u = vmap(jtj)(xs, ys, v)
                    check_finite(u, "a mixed-Jacobian product")
                    sigma = jv.double().norm(dim=1)  # ‖J v‖ with ‖v‖ = 1: a lower bound of ‖J‖₂
                    newly = (sigma - sigma_prev).abs() <= tol * sigma.clamp_min(1e-300)
                    n_it[~done] = it + 1
                    done = done | (newly & (it > 0))
                    sigma_prev = torch.maximum(sigma, sigma_prev)
                    un = u.reshape(c, -1).norm(dim=1)
                    if done.all() or (un == 0).any():
                        break
                    v = u / un.reshape((c,) + (1,) * len(shape))
                ops.append(sigma_prev)
                gns.append(g.double().norm(dim=1))
                its += n_it.tolist()
                conv += done.tolist()
        op = torch.cat(ops)
        gn = torch.cat(gns)
        if (gn == 0).any():
            i = int((gn == 0).nonzero()[0, 0])
            raise ValueError(f"the weight gradient of sample {i} is zero; its κ_X (which divides by it) is undefined.")
        xn = xm.reshape(m, -1).double().norm(dim=1).cpu()
        kappa = op.cpu() * xn / gn.cpu()
    details = {"per_sample": kappa.tolist(), "op_norms": op.tolist(), "grad_norms": gn.tolist(), "x_norms": xn.tolist(),
               "method": method, "iterations": its, "converged": conv}
    return Result(float(kappa.mean()), details, m, m, None, None, t.seconds, "input_condition_exact")
