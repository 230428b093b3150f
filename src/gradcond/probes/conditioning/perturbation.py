"""Conditioning metrics from perturbed gradients (seed 004): step-consistency κ≈_W (eq. 2.24), its batch-metric
versions C*_n, D_n(w,χ), H_n(w,χ) (Def 4.1, eqs. 4.1-4.3), and batch-dissonance κ̄≈_X (eqs. 3.15-3.16).

Weight directions come from :func:`gradcond.probes.conditioning.directions.weight_directions`, input directions from
:func:`gradcond.probes.conditioning.directions.input_directions`; gradients from
:class:`gradcond.probes.per_sample.Engine` (functional: the model is never written).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gradcond.probes.conditioning.common import (
    Result,
    Timer,
    apply_select,
    check_choice,
    check_eta,
    check_finite,
    check_int,
    check_nonzero,
    mask_select,
    need_samples,
)
from gradcond.probes.conditioning.directions import input_directions, weight_directions
from gradcond.probes.conditioning.train_mode import engine_for
from gradcond.utils import accepts_model_output, as_batch

__all__ = ["step_consistency", "step_metrics", "batch_dissonance"]

_NORMS = (None, "inf", "2")


# ---------------------------------------------------------------------------------------------- κ≈_W and Def 4.1
def _weight_perturbation(model, loss_fn, batch_or_loader, *, sampler, n, eta, norm, mode, mask, seed, bn, chunk_size,
                         directions):
    check_choice("sampler", sampler, ("limited_targeted", "targeted", "random"))
    check_choice("norm", norm, _NORMS)
    check_choice("mode", mode, ("finite_difference", "jvp"))
    eta = check_eta(eta)
    if n is None:
        n = 2 if sampler == "limited_targeted" else 16
    check_int("n", n)
    x, y = as_batch(batch_or_loader)
    select, frac = mask_select(mask, model)
    gen = torch.Generator().manual_seed(int(seed))
    with engine_for(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
        g0 = e.batch_grad()
        check_finite(g0, "the batch gradient")
        check_nonzero(g0.abs().max(), "the batch gradient")
        if directions is not None:
            omegas = torch.as_tensor(directions, dtype=e.dtype, device=g0.device).reshape(-1, e.m)
            info = {"sampler": "explicit", "norm": "none"}
        else:
            omegas, info = weight_directions(e, sampler, n, eta, norm, gen, g0)
        w_norm = e.flat_w().norm()
        g0m = apply_select(g0, select)
        g0m_norm = g0m.norm()
        check_nonzero(g0m_norm, "the (masked) batch gradient")
        perturbed, ratios = [], []
        for om in omegas:
            check_nonzero(om.norm(), "a perturbation direction")
            if mode == "finite_difference":
                gk = e.batch_grad(om)
                check_finite(gk, "a perturbed batch gradient")
                gkm = apply_select(gk, select)
                diff = gkm - g0m
            else:
                hv = apply_select(e.hvp(om), select)
                check_finite(hv, "a Hessian-vector product")
                diff = hv
                gkm = g0m + hv  # first-order perturbed gradient
            perturbed.append(gkm)
            ratios.append(float(diff.norm() * w_norm / (om.norm() * g0m_norm)))
    return dict(g0m=g0m, perturbed=perturbed, ratios=ratios, info=info, n=len(omegas), b=e.b, eta=eta, frac=frac,
                w_norm=float(w_norm), g_norm=float(g0m_norm), omega_norms=[float(o.norm()) for o in omegas])


@accepts_model_output
def step_consistency(
    model: nn.Module,
    loss_fn: Callable,
    batch_or_loader,
    *,
    sampler: str = "limited_targeted",
    n: int | None = None,
    eta: float = 1e-3,
    norm: str | None = None,
    mode: str = "finite_difference",
    mask=None,
    seed: int = 0,
    bn: str = "batch",
    chunk_size: int | None = None,
    directions: torch.Tensor | None = None,
) -> Result:
    """Step-consistency κ≈_{h̄_W,W}(w) (seed 004, eq. 2.24, i = j):

        max_k ‖h̄_W(w+ω_k, χ) − h̄_W(w, χ)‖ · ‖w‖ / (‖ω_k‖ · ‖h̄_W(w, χ)‖)

    Directions ω_k: ``sampler`` (see :func:`gradcond.probes.conditioning.directions.weight_directions`; default the source's
    Def 2.7 ``±η ḡ/‖ḡ‖_∞``, n = 2), or explicit ``directions`` (an (n, m) tensor). ``norm`` ("inf"|"2") only sets
    how directions are scaled to size η; the ratio always uses Euclidean norms (the source's ‖·‖_𝕎), so with
    ``norm="inf"`` ‖ω‖₂ can reach η√m (notes §1.3). ``mode="jvp"`` replaces the finite difference by the exact
    directional derivative Hω (forward-over-reverse), the η → 0 limit; the jvp value is a lower bound of the exact
    κ = ‖H‖₂‖w‖/‖ḡ‖ (Def 2.4). The finite difference is one only up to o(η) in smooth networks: in ReLU/BN
    networks activation switches inside the step can make it exceed κ (measured: exact 922, finite difference
    1318 and 7052), so it is an estimate, not a bound. ‖w‖ covers all trainable parameters, unmasked.
    ``bn``: ``"batch"`` (BatchNorm statistics frozen from the batch), ``"eval"`` (running statistics) or ``"train"``
    (train-mode statistics that move with ω: the function SGD differentiates; buffer copies, never written; the
    per-sample ``targeted`` sampler is refused in this mode).

    Cost: one batch forward+backward for ḡ plus one per direction (an HVP ≈ 2-3 backward passes in jvp mode); the
    targeted sampler adds one per-sample pass over the n chosen samples. details: ``ratios`` per direction,
    ``sampler``/``norm``/``mode``, ``w_norm``, ``g_norm``, ``omega_norms`` (and sample ``indices``/``signs``).
    """
    with Timer() as t:
        r = _weight_perturbation(model, loss_fn, batch_or_loader, sampler=sampler, n=n, eta=eta, norm=norm, mode=mode,
                                 mask=mask, seed=seed, bn=bn, chunk_size=chunk_size, directions=directions)
    details = dict(r["info"], mode=mode, ratios=r["ratios"], w_norm=r["w_norm"], g_norm=r["g_norm"],
                   omega_norms=r["omega_norms"])
    return Result(max(r["ratios"]), details, r["n"], r["b"], r["eta"], r["frac"], t.seconds, "step_consistency")


@accepts_model_output
def step_metrics(
    model: nn.Module,
    loss_fn: Callable,
    batch_or_loader,
    *,
    sampler: str = "limited_targeted",
    n: int | None = None,
    eta: float = 1e-3,
    norm: str | None = None,
    mode: str = "finite_difference",
    mask=None,
    seed: int = 0,
    bn: str = "batch",
    chunk_size: int | None = None,
    directions: torch.Tensor | None = None,
) -> dict[str, Result]:
    """Step-consistency versions of the batch metrics (seed 004, Def 4.1) on a fixed batch χ, sharing the perturbed
    gradients g_k = h̄_W(w+ω_k, χ) of :func:`step_consistency` (same arguments; g_0 = h̄_W(w, χ)):

    * ``min_cosine``  C*_n = min_k cos(g_k, g_0)                       (eq. 4.1; no outer min(·, 0))
    * ``weight_diversity`` D_n(w,χ) = Σ_k ‖g_k‖² / ‖Σ_k g_k‖²           (eq. 4.2)
    * ``weight_coherence`` H_n(w,χ) = Σ_k ⟨g_0, g_k⟩ / Σ_k ‖g_k‖²        (eq. 4.3)
    * ``step_consistency`` κ≈_W as in :func:`step_consistency`.

    In ``mode="jvp"`` g_k is the first-order gradient g_0 + Hω_k. With the default ± sampler D_n ≈ 1/2.
    ``bn="train"`` is accepted as in :func:`step_consistency`.
    Returns a dict name -> Result (all with the shared wall time). Zero Σ_k g_k raises ValueError.
    """
    with Timer() as t:
        r = _weight_perturbation(model, loss_fn, batch_or_loader, sampler=sampler, n=n, eta=eta, norm=norm, mode=mode,
                                 mask=mask, seed=seed, bn=bn, chunk_size=chunk_size, directions=directions)
        g0, P = r["g0m"], torch.stack(r["perturbed"])
        norms = P.norm(dim=1)
        check_nonzero(norms.min(), "a perturbed batch gradient")
        cos = (P @ g0) / (norms * g0.norm())
        s = P.sum(0)
        check_nonzero(s.norm(), "the sum of the perturbed gradients")
        sq = (norms ** 2).sum()
        vals = {
            "step_consistency": max(r["ratios"]),
            "min_cosine": float(cos.min()),
            "weight_diversity": float(sq / (s @ s)),
            "weight_coherence": float((P @ g0).sum() / sq),
        }
    base = dict(r["info"], mode=mode)
    extra = {"step_consistency": {"ratios": r["ratios"]}, "min_cosine": {"cosines": cos.tolist()},
             "weight_diversity": {}, "weight_coherence": {}}
    return {k: Result(v, dict(base, **extra[k]), r["n"], r["b"], r["eta"], r["frac"], t.seconds, k)
            for k, v in vals.items()}


# ---------------------------------------------------------------------------------------------- κ̄≈_X
@accepts_model_output
def batch_dissonance(
    model: nn.Module,
    loss_fn: Callable,
    batch_or_loader,
    *,
    sampler: str = "targeted",
    n: int = 8,
    m: int | None = None,
    eta: float = 1e-3,
    norm: str | None = None,
    mode: str = "finite_difference",
    mask=None,
    seed: int = 0,
    bn: str = "batch",
    chunk_size: int | None = None,
) -> Result:
    """Batch-dissonance κ̄≈_{h_W,X}(w, χ) (seed 004, eqs. 3.15-3.16):

        (1/m) Σ_{i<m} max_{k<n} ‖h_W(w, x_i+δ_{ik}, t_i) − h_W(w, x_i, t_i)‖·‖x_i‖ / (‖δ_{ik}‖·‖h_W(w, x_i, t_i)‖)

    over the first ``m`` samples (default b). Directions (:func:`gradcond.probes.conditioning.directions.input_directions`):
    ``targeted`` (Def 3.5, the same set Γ_n for every sample), ``random`` (uniform with the batch's mean/std, × η) or
    ``interpolation`` (η(x_j − x_i) toward a random other sample). The label t_i is kept for x_i + δ (source's
    assumption). ``mode="jvp"``: exact mixed derivative (∂h_W/∂x)δ instead of the finite difference.
    BN (``bn="batch"``): statistics are those of the clean batch, so each sample's perturbation affects only itself.

    Cost: n per-sample gradient passes over m samples (+1 base, +1 input-gradient pass for ``targeted``); memory two
    chunks of per-sample gradients. details: ``ratios`` (m × n list), ``per_sample`` maxima. A sample whose gradient
    is exactly zero raises ValueError (the ratio divides by it).
    """
    check_choice("sampler", sampler, ("targeted", "random", "interpolation"))
    check_choice("norm", norm, _NORMS)
    check_choice("mode", mode, ("finite_difference", "jvp"))
    eta = check_eta(eta)
    check_int("n", n)
    with Timer() as t:
        x, y = as_batch(batch_or_loader)
        if not x.is_floating_point():
            raise ValueError("batch_dissonance perturbs inputs and needs floating-point inputs; got integer inputs.")
        m = x.shape[0] if m is None else check_int("m", m)
        need_samples(x.shape[0], m, f"batch_dissonance with m={m}")
        select, frac = mask_select(mask, model)
        gen = torch.Generator().manual_seed(int(seed))
        with engine_for(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
            xm, ym = e.x[:m], y[:m]
            deltas, info = input_directions(e, xm, ym, sampler, n, eta, norm, gen)
            ratios = torch.empty(m, n, dtype=torch.float64)
            for sl, G in e.per_sample_grads(xm, ym, select=select):
                check_finite(G, "a per-sample weight gradient")
                gn = G.norm(dim=1)
                if (gn == 0).any():
                    i = int(sl.start + (gn == 0).nonzero()[0, 0])
                    raise ValueError(f"the weight gradient of sample {i} is zero; its dissonance ratio is undefined.")
                xn = xm[sl].reshape(G.shape[0], -1).norm(dim=1)
                for k in range(n):
                    d = deltas[sl, k]
                    dn = d.reshape(d.shape[0], -1).norm(dim=1)
                    if (dn == 0).any():
                        raise ValueError("an input perturbation direction is zero; the ratio is undefined.")
                    if mode == "finite_difference":
                        Gk = e.per_sample_matrix(xm[sl] + d, ym[sl], select=select)
                        diff = Gk - G
                    else:
                        diff = e.mixed_jvp(xm[sl], ym[sl], d, select=select)
                    check_finite(diff, "a perturbed per-sample gradient")
                    ratios[sl, k] = (diff.norm(dim=1) * xn / (dn * gn)).double()
            per = ratios.max(dim=1).values
    return Result(float(per.mean()), dict(info, mode=mode, ratios=ratios.tolist(), per_sample=per.tolist()), n, m,
                  eta, frac, t.seconds, "batch_dissonance")
