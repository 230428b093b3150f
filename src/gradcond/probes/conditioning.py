"""Gradient-conditioning metrics of Nelson, "Gradient Conditioning in Deep Neural Networks" (seed 004).

Every metric has the form ``metric(model, loss_fn, batch_or_loader, ...) -> Result`` (``Result(value, details, n, b,
eta, mask, seconds)`` with ``.to_dict()``), is computed functionally by :class:`gradcond.probes.per_sample.Engine`
(parameters and BatchNorm buffers are never written; see that module for the per-sample loss convention and the
BatchNorm policy ``bn="batch"|"eval"``), and accepts ``mask=LayerwiseMask(...)``, which is applied to *every weight
gradient vector* the metric uses (never to ‖w‖, to ω, or to input gradients; decision, notes erratum 5).

Bad input: a metric that needs >= 2 samples (or batches) given 1, a zero gradient it has to divide by, and NaN/inf
gradients all raise ``ValueError`` with one sentence; no metric returns a silent NaN.

Metrics (equation numbers of seed 004):

* :func:`step_consistency` κ≈_W (eq. 2.24), samplers of Defs 2.6/2.7 + random; ``mode="jvp"`` gives the exact
  directional derivative ‖Hω‖ instead of the finite difference.
* :func:`consecutive_step_consistency` (free in-training variant, n = 1, i ≠ j) and the pure
  :func:`consecutive_ratio` / :class:`ConsecutiveStepConsistency` callback.
* :func:`batch_dissonance` κ̄≈_X (eqs. 3.15-3.16), samplers of Def 3.5 + random + interpolation.
* :func:`relative_gradient_rank` Δ R (Defs 3.6-3.7) w.r.t. input or weights, via the b×b Gram matrix.
* :func:`gradient_confusion` (eq. 3.24), :func:`gradient_diversity` (eq. 3.25), :func:`gradient_coherence` (eq. 3.26),
  :func:`batch_efficiency_ratio` (eq. 3.9).
* :func:`step_metrics` C*_n, D_n(w,χ), H_n(w,χ) (eqs. 4.1-4.3) sharing the perturbed gradients of κ≈_W.
"""

from __future__ import annotations

import copy
import functools
import itertools
from typing import Callable

import torch
from torch import nn

from gradcond.probes._cond_common import (
    Result,
    _Timer,
    apply_select,
    check_choice,
    check_eta,
    check_finite,
    check_int,
    check_nonzero,
    input_directions,
    is_single_batch,
    mask_select,
    need_samples,
    take_batches,
    weight_directions,
)
from gradcond.probes.per_sample import Engine, as_batch, weight_vector

__all__ = [
    "Result",
    "step_consistency",
    "step_metrics",
    "consecutive_step_consistency",
    "consecutive_ratio",
    "ConsecutiveStepConsistency",
    "batch_dissonance",
    "relative_gradient_rank",
    "effective_rank",
    "gaussian_effective_rank",
    "gradient_confusion",
    "gradient_diversity",
    "gradient_coherence",
    "batch_efficiency_ratio",
]

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
    with Engine(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
        g0 = e.batch_grad()
        check_finite(g0, "the batch gradient")
        check_nonzero(g0.abs().max(), "the batch gradient")
        if directions is not None:
            omegas = torch.as_tensor(directions, dtype=e.dtype).reshape(-1, e.m)
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

    Directions ω_k: ``sampler`` (see :func:`gradcond.probes._cond_common.weight_directions`; default the source's
    Def 2.7 ``±η ḡ/‖ḡ‖_∞``, n = 2), or explicit ``directions`` (an (n, m) tensor). ``norm`` ("inf"|"2") only sets
    how directions are scaled to size η; the ratio always uses Euclidean norms (the source's ‖·‖_𝕎), so with
    ``norm="inf"`` ‖ω‖₂ can reach η√m (notes §1.3). ``mode="jvp"`` replaces the finite difference by the exact
    directional derivative Hω (forward-over-reverse), the η → 0 limit; both are lower bounds of the exact κ =
    ‖H‖₂‖w‖/‖ḡ‖ (Def 2.4) up to o(η). ‖w‖ covers all trainable parameters, unmasked.

    Cost: one batch forward+backward for ḡ plus one per direction (an HVP ≈ 2-3 backward passes in jvp mode); the
    targeted sampler adds one per-sample pass over the n chosen samples. details: ``ratios`` per direction,
    ``sampler``/``norm``/``mode``, ``w_norm``, ``g_norm``, ``omega_norms`` (and sample ``indices``/``signs``).
    """
    with _Timer() as t:
        r = _weight_perturbation(model, loss_fn, batch_or_loader, sampler=sampler, n=n, eta=eta, norm=norm, mode=mode,
                                 mask=mask, seed=seed, bn=bn, chunk_size=chunk_size, directions=directions)
    details = dict(r["info"], mode=mode, ratios=r["ratios"], w_norm=r["w_norm"], g_norm=r["g_norm"],
                   omega_norms=r["omega_norms"])
    return Result(max(r["ratios"]), details, r["n"], r["b"], r["eta"], r["frac"], t.seconds, "step_consistency")


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
    Returns a dict name -> Result (all with the shared wall time). Zero Σ_k g_k raises ValueError.
    """
    with _Timer() as t:
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


# ---------------------------------------------------------------------------------------------- consecutive steps
def consecutive_ratio(g_prev: torch.Tensor, g_curr: torch.Tensor, delta_w: torch.Tensor, w_prev: torch.Tensor,
                      mask=None) -> float:
    """Free in-training κ≈_W (notes §1.2; eq. 2.24 with n = 1, i ≠ j): ‖g_curr − g_prev‖·‖w_prev‖ / (‖Δw‖·‖g_prev‖),
    with the *actual* step Δw (so it is valid for momentum/Adam; for plain SGD ‖Δw‖ = lr‖g_prev‖). Flat vectors;
    ``mask`` (a LayerwiseMask) selects gradient coordinates only."""
    gp, gc = g_prev, g_curr
    if mask is not None:
        gp, gc = mask.apply(gp), mask.apply(gc)
    for v, what in ((gp, "the previous gradient"), (gc, "the current gradient"), (delta_w, "the weight step")):
        check_finite(v, what)
    check_nonzero(gp.norm(), "the previous gradient")
    check_nonzero(delta_w.norm(), "the weight step Δw")
    return float((gc - gp).norm() * w_prev.norm() / (delta_w.norm() * gp.norm()))


def _clone_optimizer(opt: torch.optim.Optimizer, model_copy: nn.Module, model: nn.Module) -> torch.optim.Optimizer:
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params_copy = list(model_copy.parameters())
    groups = []
    for g in opt.param_groups:
        try:
            ps = [params_copy[index[id(p)]] for p in g["params"]]
        except KeyError:
            raise ValueError("the optimizer holds parameters that are not in the model.") from None
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ps})
    new = type(opt)(groups, **opt.defaults)
    new.load_state_dict(copy.deepcopy(opt.state_dict()))
    return new


def consecutive_step_consistency(
    model: nn.Module,
    loss_fn: Callable,
    batch_or_loader,
    *,
    optimizer: torch.optim.Optimizer,
    mask=None,
) -> Result:
    """κ≈_W from two successive optimizer steps (notes §1.2, the thesis's free variant; not a joint W×X measure).

    On a deep copy of ``model`` and ``optimizer`` (the originals are untouched): gradient g_0 on batch χ_0 at w_0,
    one optimizer step to w_1, gradient g_1 on batch χ_1 at w_1; value = :func:`consecutive_ratio`. χ_0, χ_1 are the
    first two batches of a loader, or the same batch twice when a single batch is given. The gradients are ordinary
    training gradients (``loss_fn(model(x), y).backward()`` in the model's own mode, e.g. train-mode BatchNorm).
    Cost: two forward+backward passes and one optimizer step.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    with _Timer() as t:
        batches = take_batches(batch_or_loader, 2, "consecutive_step_consistency")
        if len(batches) == 1:
            batches = batches * 2
        if mask is not None:
            mask_select(mask, model)
        mc = copy.deepcopy(model)
        oc = _clone_optimizer(optimizer, mc, model)
        dtype = next(mc.parameters()).dtype

        def grad_at(x, y):
            oc.zero_grad(set_to_none=False)
            x = x.to(dtype) if x.is_floating_point() else x
            loss_fn(mc(x), y).backward()
            return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in mc.parameters() if p.requires_grad]).clone()

        w0 = weight_vector(mc)
        g0 = grad_at(*batches[0])
        check_finite(g0, "the first gradient")
        oc.step()
        w1 = weight_vector(mc)
        g1 = grad_at(*batches[1])
        value = consecutive_ratio(g0, g1, w1 - w0, w0, mask)
    return Result(value, {"step_norm": float((w1 - w0).norm()), "g_prev_norm": float(g0.norm())}, 1,
                  int(batches[0][0].shape[0]), None, None if mask is None else mask.fraction, t.seconds,
                  "consecutive_step_consistency")


try:  # the trainer's callback base, when present
    from gradcond.train import Callback as _CallbackBase  # type: ignore
except Exception:  # pragma: no cover - foundation not importable
    _CallbackBase = object


class ConsecutiveStepConsistency(_CallbackBase):
    """Training callback logging the free κ≈_W every ``every`` steps (probe "conditioning", name
    "consecutive_step_consistency"). Records w before each step and the gradient left in ``p.grad`` after it, so
    κ at step t uses (g_{t-1}, g_t, Δw_{t-1} = w_t − w_{t-1}, w_{t-1}). Cost: two flat copies of the weights per step.
    Values are also kept in ``self.values`` as (step, value)."""

    def __init__(self, every: int = 1, mask=None):
        check_int("every", every)
        self.every, self.mask = every, mask
        self.values: list[tuple[int, float]] = []
        self._prev = None  # (w_before, g, w_after)

    def on_step_start(self, state) -> None:
        self._w_before = weight_vector(state.model)

    def on_step_end(self, state) -> None:
        ps = [p for p in state.model.parameters() if p.requires_grad]
        if any(p.grad is None for p in ps):
            self._prev = None
            return
        g = torch.cat([p.grad.detach().reshape(-1) for p in ps]).clone()
        w_after = weight_vector(state.model)
        prev, self._prev = self._prev, (self._w_before, g, w_after)
        if prev is None or state.step % self.every:
            return
        w_prev, g_prev, w_prev_after = prev
        if not torch.equal(w_prev_after, self._w_before):  # weights changed between steps (e.g. teleport)
            return
        try:
            v = consecutive_ratio(g_prev, g, w_prev_after - w_prev, w_prev, self.mask)
        except ValueError:
            v = float("nan")
        self.values.append((state.step, v))
        if hasattr(state, "log_metric"):
            state.log_metric("conditioning", "consecutive_step_consistency", v)

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, d: dict) -> None:
        self.values = [tuple(v) for v in d.get("values", [])]


# ---------------------------------------------------------------------------------------------- κ̄≈_X
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

    over the first ``m`` samples (default b). Directions (:func:`gradcond.probes._cond_common.input_directions`):
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
    with _Timer() as t:
        x, y = as_batch(batch_or_loader)
        if not x.is_floating_point():
            raise ValueError("batch_dissonance perturbs inputs and needs floating-point inputs; got integer inputs.")
        m = x.shape[0] if m is None else check_int("m", m)
        need_samples(x.shape[0], m, f"batch_dissonance with m={m}")
        select, frac = mask_select(mask, model)
        gen = torch.Generator().manual_seed(int(seed))
        with Engine(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
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


# ---------------------------------------------------------------------------------------------- rank
def effective_rank(A: torch.Tensor) -> float:
    """Stable rank R(A) = ‖A‖_F² / ‖A‖₂² (Def 3.6) of a (b, d) matrix via its b×b Gram matrix (O(d b²), no SVD of
    A). Raises ValueError for a zero or non-finite matrix."""
    check_finite(A, "the gradient matrix")
    return _rank_from_gram(A.double() @ A.double().T)


def _rank_from_gram(G: torch.Tensor) -> float:
    """Stable rank trace(G)/λ_max(G) of the matrix whose Gram matrix is G."""
    check_finite(G, "the gradient matrix")
    lam = torch.linalg.eigvalsh(G)[-1]
    check_nonzero(lam, "the gradient matrix (all per-sample gradients)")
    return float(torch.trace(G) / lam)


@functools.lru_cache(maxsize=256)
def gaussian_effective_rank(d: int, b: int, samples: int = 5, seed: int = 0) -> float:
    """Mean stable rank of ``samples`` i.i.d. N(0, 1) matrices of shape (b, d) (float64), cached per shape; the
    Gram matrix is accumulated over column chunks so memory stays O(b² + b·65536)."""
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(samples):
        G = torch.zeros(b, b, dtype=torch.float64)
        for s in range(0, d, 65536):
            Y = torch.randn(b, min(65536, d - s), generator=gen, dtype=torch.float64)
            G += Y @ Y.T
        vals.append(float(torch.trace(G) / torch.linalg.eigvalsh(G)[-1]))
    return sum(vals) / len(vals)


def relative_gradient_rank(
    model: nn.Module,
    loss_fn: Callable,
    batch_or_loader,
    *,
    wrt: str = "input",
    mask=None,
    gaussian_samples: int = 5,
    bn: str = "batch",
    chunk_size: int | None = None,
) -> Result:
    """Relative gradient rank Δ R(h, w, χ) = R(A)/R(Y) (seed 004, Defs 3.6-3.7): A holds the b per-sample gradients
    (w.r.t. the input, Balduzzi's "shattered gradients", or w.r.t. the weights, the thesis's weight-gradient rank) and
    Y is Gaussian of the same shape b × d (baseline cached per shape). With a mask, A is replaced by its masked
    columns but Y keeps the *unmasked* shape b × m (decision): the mask is applied to gradient vectors only, and the
    masked stable rank R(MA) estimates R(A) (coordinate subsampling leaves the stable rank of structured, low-rank
    gradients nearly unchanged), whereas the Gaussian baseline depends on the aspect ratio itself (b = 64: ≈62.3 at
    d = 3·10⁵ but ≈56.9 at d = 1.5·10⁴), so renormalizing at the masked shape would shift the value by ~10% for
    reasons unrelated to the gradients. ``details["relative_to_masked_shape"]`` gives R(MA)/R(Y_masked) too.
    Near 1: white-noise gradients; near 0: highly correlated. Cost: one per-sample pass, O(d b²) for the Gram matrix; A is materialized
    (b × d) for ``wrt="input"``; for ``wrt="weight"`` only the b×b Gram matrix is formed layer by layer (ghost form
    (A Aᵀ)∘(E Eᵀ) for Linear layers, see :meth:`Engine.per_sample_gram`). Needs b >= 2. The mask applies only to
    ``wrt="weight"``.
    """
    check_choice("wrt", wrt, ("input", "weight"))
    check_int("gaussian_samples", gaussian_samples)
    with _Timer() as t:
        x, y = as_batch(batch_or_loader)
        need_samples(x.shape[0], 2, "relative_gradient_rank")
        select, frac = mask_select(mask, model)
        with Engine(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
            if wrt == "weight":
                gram = e.per_sample_gram(select=select)
                d = e.m if select is None else int(select.numel())
            else:
                A = e.per_sample_matrix(wrt=wrt)
                check_finite(A, "the gradient matrix")
                gram, d = A.double() @ A.double().T, A.shape[1]
        r = _rank_from_gram(gram)
        b = gram.shape[0]
        d_full = e.m if wrt == "weight" else d
        rg = gaussian_effective_rank(d_full, b, gaussian_samples)
        details = {"wrt": wrt, "rank": r, "gaussian_rank": rg, "d": d_full}
        if d != d_full:
            rgm = gaussian_effective_rank(d, b, gaussian_samples)
            details.update(d_masked=d, gaussian_rank_masked=rgm, relative_to_masked_shape=r / rgm)
    return Result(r / rg, details, b, b, None, frac if wrt == "weight" else None, t.seconds, "relative_gradient_rank")


# ---------------------------------------------------------------------------------------------- batch metrics
def _batch_grads(model, loss_fn, batches, select, bn, chunk_size):
    for x, y in batches:
        with Engine(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
            g = apply_select(e.batch_grad(), select)
        check_finite(g, "a batch gradient")
        yield g


def gradient_confusion(
    model: nn.Module,
    loss_fn: Callable,
    loader,
    *,
    n_batches: int = 8,
    n_pairs: int | None = 8,
    seed: int = 0,
    mask=None,
    bn: str = "batch",
    chunk_size: int | None = None,
) -> Result:
    """Gradient confusion C_n(w) = −min(min_{(i,j)} cos(h̄_W(w,χ_i), h̄_W(w,χ_j)), 0) (seed 004, eq. 3.24;
    Sankararaman et al.) over ``n_pairs`` distinct pairs i < j drawn at random (``seed``) from the first
    ``n_batches`` batches of ``loader`` (all pairs if ``n_pairs`` is None or exceeds them). Value >= 0.
    Cost: one forward+backward per batch; the n_batches (masked) gradients are stored. Needs >= 2 batches.
    """
    check_int("n_batches", n_batches, 2)
    if n_pairs is not None:
        check_int("n_pairs", n_pairs)
    with _Timer() as t:
        if is_single_batch(loader):
            raise ValueError("gradient_confusion needs at least 2 batches; pass a loader or a list of (x, y) batches.")
        batches = take_batches(loader, n_batches, "gradient_confusion")
        if len(batches) < 2:
            raise ValueError(f"gradient_confusion needs at least 2 batches, the loader gave {len(batches)}.")
        select, frac = mask_select(mask, model)
        gs = torch.stack(list(_batch_grads(model, loss_fn, batches, select, bn, chunk_size)))
        norms = gs.norm(dim=1)
        if (norms == 0).any():
            raise ValueError("a batch gradient is zero; its cosine similarity is undefined.")
        pairs = list(itertools.combinations(range(len(batches)), 2))
        if n_pairs is not None and n_pairs < len(pairs):
            gen = torch.Generator().manual_seed(int(seed))
            pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=gen)[:n_pairs].tolist()]
        cos = torch.stack([gs[i] @ gs[j] / (norms[i] * norms[j]) for i, j in pairs])
        value = max(-float(cos.min()), 0.0)
    return Result(value, {"pairs": pairs, "cosines": cos.tolist(), "min_cosine": float(cos.min()),
                          "n_batches": len(batches)}, len(pairs), int(batches[0][0].shape[0]), None, frac, t.seconds,
                  "gradient_confusion")


def gradient_diversity(
    model: nn.Module,
    loss_fn: Callable,
    batch_or_loader,
    *,
    n_batches: int = 8,
    per_sample: bool = False,
    mask=None,
    bn: str = "batch",
    chunk_size: int | None = None,
) -> Result:
    """Gradient diversity D_n(w) = Σ_i ‖g_i‖² / ‖Σ_i g_i‖² (seed 004, eq. 3.25; Yin et al.), streamed (running sum of
    vectors and of squared norms; nothing else stored).

    ``per_sample=False``: g_i are the batch-mean gradients of the first ``n_batches`` batches (the thesis's version;
    needs >= 2 batches). ``per_sample=True``: g_i are the per-sample gradients of one batch (Yin's original; needs
    b >= 2). Range 1/n (identical) .. 1 (orthogonal) .. >1 (cancelling). Depends on n: compare at equal n.
    Cost: one forward+backward per batch (or one per-sample pass). A zero Σ g_i raises ValueError.
    """
    check_int("n_batches", n_batches, 2)
    with _Timer() as t:
        select, frac = mask_select(mask, model)
        total, sq, count = None, 0.0, 0
        if per_sample:
            x, y = as_batch(batch_or_loader)
            need_samples(x.shape[0], 2, "gradient_diversity(per_sample=True)")
            with Engine(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
                for _, G in e.per_sample_grads(select=select):
                    check_finite(G, "a per-sample gradient")
                    total = G.sum(0) if total is None else total + G.sum(0)
                    sq += float((G * G).sum())
                    count += G.shape[0]
            b = count
        else:
            if is_single_batch(batch_or_loader):
                raise ValueError("gradient_diversity needs at least 2 batches (or per_sample=True for one batch); "
                                 "pass a loader or a list of (x, y) batches.")
            batches = take_batches(batch_or_loader, n_batches, "gradient_diversity")
            if len(batches) < 2:
                raise ValueError(f"gradient_diversity needs at least 2 batches, the loader gave {len(batches)}.")
            for g in _batch_grads(model, loss_fn, batches, select, bn, chunk_size):
                total = g.clone() if total is None else total + g
                sq += float(g @ g)
                count += 1
            b = int(batches[0][0].shape[0])
        denom = float(total @ total)
        check_nonzero(denom, "the sum of the gradients")
    return Result(sq / denom, {"per_sample": per_sample, "sum_sq_norms": sq, "sq_norm_of_sum": denom}, count, b, None,
                  frac, t.seconds, "gradient_diversity")


def gradient_coherence(
    model: nn.Module,
    loss_fn: Callable,
    batch_or_loader,
    *,
    mask=None,
    bn: str = "batch",
    chunk_size: int | None = None,
) -> Result:
    """Gradient coherence H_b(w) = Σ_i ⟨h̄_W, h_W(x_i)⟩ / Σ_i ‖h_W(x_i)‖² (seed 004, eq. 3.26; Chatterjee &
    Zielinski), computed in the O(b) form ‖ḡ‖² / mean_i ‖g_i‖² (since Σ_i⟨ḡ, g_i⟩ = b‖ḡ‖²): one batch
    forward+backward for ḡ plus streamed per-sample squared norms. Range 1/b (orthogonal) .. 1 (identical);
    C&Z's m-coherence is b·H_b. Identity: H_b = 1/(b · D_per-sample). Needs b >= 2.
    """
    with _Timer() as t:
        x, y = as_batch(batch_or_loader)
        need_samples(x.shape[0], 2, "gradient_coherence")
        select, frac = mask_select(mask, model)
        with Engine(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
            g = apply_select(e.batch_grad(), select)
            check_finite(g, "the batch gradient")
            sq = e.per_sample_sq_norms(select=select)
            check_finite(sq, "a per-sample gradient")
        mean_sq = float(sq.mean())
        check_nonzero(mean_sq, "every per-sample gradient")
        value = float(g @ g) / mean_sq
    return Result(value, {"batch_sq_norm": float(g @ g), "mean_sample_sq_norm": mean_sq}, e.b, e.b, None, frac,
                  t.seconds, "gradient_coherence")


def batch_efficiency_ratio(
    model: nn.Module,
    loss_fn: Callable,
    batch_or_loader,
    *,
    n_batches: int = 8,
    mask=None,
    bn: str = "batch",
    chunk_size: int | None = None,
) -> Result:
    """Batch-efficiency ratio E_χ‖h̄_W(w,χ)‖² / E_x‖h_W(w,x)‖² (seed 004, eq. 3.9), the fraction of per-sample
    first-order loss decrease that survives batch averaging; ≤ 1 by Jensen. E_χ is the mean over the first
    ``n_batches`` batches (or the single batch given), E_x the mean over all their samples; on one batch it equals
    :func:`gradient_coherence`. Cost: per batch one forward+backward plus one per-sample norm pass. Needs b >= 2.
    """
    check_int("n_batches", n_batches)
    with _Timer() as t:
        batches = take_batches(batch_or_loader, n_batches, "batch_efficiency_ratio")
        select, frac = mask_select(mask, model)
        bsq, ssq, ns = [], 0.0, 0
        for x, y in batches:
            need_samples(x.shape[0], 2, "batch_efficiency_ratio")
            with Engine(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
                g = apply_select(e.batch_grad(), select)
                check_finite(g, "a batch gradient")
                sq = e.per_sample_sq_norms(select=select)
                check_finite(sq, "a per-sample gradient")
            bsq.append(float(g @ g))
            ssq += float(sq.sum())
            ns += x.shape[0]
        check_nonzero(ssq, "every per-sample gradient")
        value = (sum(bsq) / len(bsq)) / (ssq / ns)
    return Result(value, {"batch_sq_norms": bsq, "mean_sample_sq_norm": ssq / ns}, len(batches),
                  int(batches[0][0].shape[0]), None, frac, t.seconds, "batch_efficiency_ratio")
