"""Choosing a change of basis (CoB): gradient ascent on log|tau| (:func:`optimize_cob`) and the authors' baseline,
the best of N random CoBs (:func:`best_of_random`).

Both search the CoB group of a :class:`~gradcond.graph.CoBStructure`, so the network function is exact by
construction (seed 000, Theorem 2.1): only the parameters and therefore the gradients change.

How the objective is evaluated (the cost decision)
--------------------------------------------------
By Theorem 5.1 of seed 000 the gradient of the teleported network is ``dV = dW / factor`` entrywise
(``V = factor * W``, :func:`gradcond.teleport.weight_scale_factors`), for every batch.  So the gradient is
computed **once** at the current weights (one forward/backward per batch, BatchNorm buffers untouched), and every
objective below is an explicit, differentiable function of the factors: the ascent costs one elementwise pass over
the parameters per step -- no forward pass, no double backward.  The objective value is *at the teleported
point*; tests check it against autograd on the actually teleported model.

Objectives (``L`` = mean loss over the given batches, ``dV`` its gradient at the teleported weights):

* ``"grad_norm"``: ``||dV||`` over all parameters (seed 001 eq. 4 maximises ``1/2 ||dV||^2``; same maximiser).
* ``"normalized_grad_norm"``: ``sqrt(sum_p ||dV_p||^2 / ||V_p||^2)`` over parameter tensors ``p`` with
  ``||V_p|| > 0`` -- the relative (per-tensor) gradient, which cannot be inflated just by shrinking weights
  (the quantity of seed 000 Fig. on ``||dW||/||W||``).
* a callable ``objective(grads, params) -> scalar tensor`` with ``grads`` / ``params`` the dicts ``{name: dV}``
  and ``{name: V}`` (differentiable in the CoB).  Objectives that need second derivatives are not expressible.

Search space: ``|tau| in [1 - sigma_max, 1 + sigma_max]`` (the source's CoB-range; ``sigma_max=None`` disables the
clamp -- ``grad_norm`` is then unbounded, since shrinking a layer's taus grows its gradient without limit).
Signs are fixed during the ascent: all +1 for ``mode="intra"``, drawn at random (as in ``random_cob``) for
``"inter"``, or those of ``init``.  The ascent is Adam on ``log|tau|`` (steps in log units, ``lr``), projected on
the clamp box after every step; the best iterate is returned.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from gradcond.graph import CoBStructure, analyze
from gradcond.utils import as_batches, progress

from .cob import CoB, random_cob, weight_scale_factors

__all__ = ["optimize_cob", "best_of_random", "gradient_at", "cob_objective", "CoBSearchLog", "OBJECTIVES"]

OBJECTIVES = ("grad_norm", "normalized_grad_norm")


@dataclass
class CoBSearchLog:
    """Result of a CoB search: objective before (identity CoB) and after (returned CoB), per-step history."""

    method: str
    objective: str
    objective_before: float
    objective_after: float
    loss: float
    steps: int
    seconds: float
    num_free: int
    history: list = field(default_factory=list)

    @property
    def gain(self) -> float:
        return self.objective_after / self.objective_before if self.objective_before else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gain"] = self.gain
        return d


def _cast(t: torch.Tensor, dtype):
    return t.to(dtype) if t.is_floating_point() else t


def gradient_at(model: nn.Module, loss_fn: Callable, batches) -> tuple[float, dict]:
    """Mean loss over ``batches`` and its gradient ``{name: dW}`` at the current weights.

    Uses ``torch.func.functional_call`` with copies of the buffers, so BatchNorm running statistics and ``.grad``
    are untouched; the model's train/eval mode is used as is.  Cost: one forward and backward per batch.
    """
    batches = as_batches(batches)
    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    dtype = next(iter(params.values())).dtype
    total, grads = 0.0, {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in batches:
        bufs = {n: b.clone() for n, b in model.named_buffers()}
        out = functional_call(model, {**params, **bufs}, (_cast(x, dtype),))
        loss = loss_fn(out, _cast(y, dtype))
        gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, gs):
            if g is not None:
                grads[n] += g.detach()
        total += float(loss.detach())
    k = len(batches)
    return total / k, {n: g / k for n, g in grads.items()}


def _objective_fn(objective):
    if callable(objective):
        return objective
    if objective == "grad_norm":
        return lambda grads, params: torch.sqrt(sum((g * g).sum() for g in grads.values()))
    if objective == "normalized_grad_norm":
        def f(grads, params):
            terms = []
            for n, g in grads.items():
                vv = (params[n] * params[n]).sum()
                if float(vv.detach()) > 0:
                    terms.append((g * g).sum() / vv)
            return torch.sqrt(sum(terms))
        return f
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} or a callable(grads, params), "
                     f"got {objective!r}.")


def cob_objective(structure: CoBStructure, cob: CoB, weights: dict, grads: dict, objective="grad_norm"):
    """The objective at the teleported point, from the weights and gradients at the current point
    (``dV = dW / factor``, ``V = factor * W``); differentiable in the CoB.  float64."""
    fac = weight_scale_factors(structure, cob)
    # the CoB lives on the CPU, the weights on the model's device: factors follow the weights (differentiably)
    fac = {n: fac[n].to(w.device) for n, w in weights.items()}
    V = {n: w.to(torch.float64) * fac[n] for n, w in weights.items()}
    G = {n: grads[n].to(torch.float64) / fac[n] for n in weights}
    return _objective_fn(objective)(G, V)


class _Reduced:
    """For the built-in objectives: ``cob -> objective`` equal to :func:`cob_objective`, evaluated in a fixed number
    of vectorised calls per step whatever the number of parameters, never touching P-sized tensors.

    A factor is constant along the dimensions where it broadcasts (a conv weight's factor is (1, C, 1, 1) or
    (O, 1, 1, 1)), so ``Σ (g / f)² = Σ S / f²`` with ``S = Σ g²`` over those dimensions, precomputed once in float64
    (likewise ``Σ (f w)² = Σ f² Σ w²``). The reduced entries of every parameter are concatenated (M entries; 14k on
    the 11M-parameter ResNet), and the factor of entry i is ``Π_k ext[IDX_k[i]]`` -- K gathers from the CoB's table
    ``[1, tau, 1, 1/tau]`` (a parameter with fewer than K terms points its missing ones at the table's leading 1).
    A step of the ascent is then about ten kernels and their backward (issue 26: the per-parameter loop of issue 18
    launched a few hundred small kernels per step, which dominated ``diagnose`` on a GPU). Parameters no factor
    touches contribute a constant. Everything lives on the gradients' device."""

    def __init__(self, structure: CoBStructure, weights: dict, grads: dict, objective: str):
        self.objective = objective
        some = next(iter(grads.values()))
        self.device = dev = some.device
        const_num, const_terms = 0.0, 0.0
        S, Wsum, idx_parts, seg = [], [], [], []
        rules = structure.rules
        kmax = max((len(r.gidx) for r in rules.values()), default=0)
        idx_cols = [[] for _ in range(kmax)]
        n_seg = 0
        for n, w in weights.items():
            g = grads[n].to(torch.float64)
            w64 = w.to(torch.float64) if objective == "normalized_grad_norm" else None
            rule = rules.get(n)
            if rule is None or not rule.gidx:  # factor 1: a constant term
                s_all = float((g * g).sum())
                if objective == "grad_norm":
                    const_num += s_all
                else:
                    vv = float((w64 * w64).sum())
                    if vv > 0:
                        const_terms += s_all / vv
                continue
            shape = torch.broadcast_shapes(*[tuple(t.shape) for t in rule.gidx])
            shape = (1,) * (w.ndim - len(shape)) + tuple(shape)
            dims = tuple(d for d in range(w.ndim) if shape[d] == 1)
            Sn = (g * g).sum(dims, keepdim=True) if dims else g * g
            S.append(Sn.reshape(-1))
            m = Sn.numel()
            for k in range(kmax):
                if k < len(rule.gidx):
                    gi = rule.gidx[k]
                    gi = gi.reshape((1,) * (len(shape) - gi.ndim) + tuple(gi.shape))
                    idx_cols[k].append(gi.expand(shape).reshape(-1).to(dev))
                else:
                    idx_cols[k].append(torch.zeros(m, dtype=torch.int64, device=dev))
            if objective == "normalized_grad_norm":
                Wn = (w64 * w64).sum(dims, keepdim=True) if dims else w64 * w64
                Wsum.append(Wn.reshape(-1))
                seg.append(torch.full((m,), n_seg, dtype=torch.int64, device=dev))
            n_seg += 1
        self.S = torch.cat(S) if S else torch.zeros(0, dtype=torch.float64, device=dev)
        self.idx = [torch.cat(c) for c in idx_cols] if S else []
        self.const = const_num if objective == "grad_norm" else const_terms
        if objective == "normalized_grad_norm" and S:
            self.W = torch.cat(Wsum)
            self.seg = torch.cat(seg)
            self.n_seg = n_seg
            # Σ W f² > 0 exactly when Σ W > 0 (the factors never vanish): decided once, no test per step
            self.keep = torch.zeros(n_seg, dtype=torch.float64, device=dev).index_add_(0, self.seg, self.W) > 0

    def from_ext(self, ext: torch.Tensor) -> torch.Tensor:
        """The objective from the CoB's table ``[1, tau, 1, 1/tau]`` (on :attr:`device`); differentiable."""
        if not self.idx:
            return torch.sqrt(torch.as_tensor(self.const, dtype=torch.float64, device=self.device))
        f = ext[self.idx[0]]
        for ix in self.idx[1:]:
            f = f * ext[ix]
        f2 = f * f
        if self.objective == "grad_norm":
            return torch.sqrt((self.S / f2).sum() + self.const)
        z = torch.zeros(self.n_seg, dtype=f2.dtype, device=f2.device)
        num = z.index_add(0, self.seg, self.S / f2)
        den = z.index_add(0, self.seg, self.W * f2)
        terms = torch.where(self.keep, num / torch.where(self.keep, den, torch.ones_like(den)), torch.zeros_like(num))
        return torch.sqrt(terms.sum() + self.const)

    def __call__(self, cob: CoB) -> torch.Tensor:
        return self.from_ext(cob.ext().to(self.device))


def _reduced_objective(structure: CoBStructure, weights: dict, grads: dict, objective):
    """:class:`_Reduced` for a built-in ``objective`` (a function ``cob -> objective`` equal to
    :func:`cob_objective`), None for a callable one."""
    if not isinstance(objective, str):
        return None
    return _Reduced(structure, weights, grads, objective)


def _prepare(model, loss_fn, batches, structure):
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}.")
    batches = as_batches(batches)
    if structure is None:
        structure = analyze(model, batches[0][0][:2])
    elif not isinstance(structure, CoBStructure):
        raise TypeError(f"structure must be a CoBStructure (gradcond.graph.analyze) or None, got "
                        f"{type(structure).__name__}.")
    weights = {n: p.detach() for n, p in model.named_parameters()}
    for name, shape in structure.param_shapes.items():
        if name not in weights or tuple(weights[name].shape) != tuple(shape):
            got = tuple(weights[name].shape) if name in weights else None
            raise ValueError(f"the structure does not match the model: parameter {name!r} has shape {got} in the "
                             f"model but {tuple(shape)} in the structure (analyze the model you optimise).")
    loss, grads = gradient_at(model, loss_fn, batches)
    return batches, structure, loss, grads, weights


def _signs(structure, mode, init, generator):
    n = structure.num_free
    if init is not None:
        if not isinstance(init, CoB):
            raise TypeError(f"init must be a CoB or None, got {type(init).__name__}.")
        return init.signs.to(torch.float64), init.log_abs.detach().to(torch.float64).clone()
    if mode == "intra":
        s = torch.ones(n, dtype=torch.float64)
    elif mode == "inter":
        flip = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
        flip &= ~structure.positive
        s = torch.where(flip, -1.0, 1.0).to(torch.float64)
    else:
        raise ValueError(f"mode must be 'intra' or 'inter', got {mode!r}.")
    return s, torch.zeros(n, dtype=torch.float64)


def optimize_cob(model: nn.Module, loss_fn: Callable, batches, structure: CoBStructure | None = None,
                 objective: str | Callable = "grad_norm", steps: int = 50, lr: float = 0.05,
                 sigma_max: float | None = 0.9, mode: str = "intra", init: CoB | None = None,
                 generator: torch.Generator | None = None) -> tuple[CoB, CoBSearchLog]:
    """Gradient ascent of ``objective`` over the CoB group of ``model`` (see the module doc).

    ``batches``: ``(x, y)`` or a list of them (the objective uses their mean loss); ``structure``: from
    ``analyze`` (analysed on ``batches[0]`` when None); ``steps`` Adam steps of size ``lr`` on ``log|tau|``;
    ``sigma_max``: clamp ``|tau|`` to ``[1 - sigma_max, 1 + sigma_max]`` (``0 < sigma_max < 1``, or None);
    ``mode``/``init``: the fixed signs.  Returns ``(cob, log)``; apply with ``teleport(model, cob)``.
    The model is not changed.  Cost: one forward/backward per batch + ``steps`` elementwise passes.
    """
    t0 = time.perf_counter()
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be a non-negative int, got {steps!r}.")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}.")
    if sigma_max is not None and not (isinstance(sigma_max, (int, float)) and 0 < sigma_max < 1):
        raise ValueError(f"sigma_max must be in (0, 1) or None, got {sigma_max!r}.")
    name = objective if isinstance(objective, str) else getattr(objective, "__name__", "callable")
    _objective_fn(objective)  # validate early
    batches, structure, loss, grads, weights = _prepare(model, loss_fn, batches, structure)
    signs, log0 = _signs(structure, mode, init, generator)
    lo, hi = (math.log(1 - sigma_max), math.log(1 + sigma_max)) if sigma_max is not None else (-math.inf, math.inf)
    reduced = _reduced_objective(structure, weights, grads, objective)
    with torch.no_grad():
        ident = CoB.identity(structure)
        before = float(reduced(ident) if reduced is not None else cob_objective(structure, ident, weights, grads,
                                                                                objective))
    if reduced is not None:
        # the built-in objectives: the whole ascent on the gradients' device, without a host sync per step (the
        # values and the best step are read once, at the end)
        dev = reduced.device
        theta = log0.clamp(lo, hi).to(dev).requires_grad_(True)
        sg = signs.to(dev)

        def value(th):
            return reduced.from_ext(structure.ext_table_log(th, sg))
    else:
        theta = log0.clamp(lo, hi).requires_grad_(True)

        def value(th):
            return cob_objective(structure, CoB.from_vector(structure, th, signs), weights, grads, objective)
    opt = torch.optim.Adam([theta], lr=lr)
    values = []
    best_v = torch.full((), -math.inf, dtype=torch.float64, device=theta.device)
    best_th = theta.detach().clone()
    for _ in progress(range(steps + 1), desc="optimize_cob", unit="step"):  # a bar only on a terminal, after 1 s
        v = value(theta)
        vd = v.detach()
        values.append(vd)
        better = torch.isfinite(vd) & (vd > best_v)  # on the device: no sync
        best_v = torch.where(better, vd, best_v)
        best_th = torch.where(better, theta.detach(), best_th)
        if len(values) > steps or structure.num_free == 0:
            break
        opt.zero_grad()
        (-v).backward()
        opt.step()
        with torch.no_grad():
            theta.clamp_(lo, hi)
    history = [float(t) for t in torch.stack(values).cpu()]  # one transfer for the whole ascent
    best_v = float(best_v)
    best_th = best_th.cpu()
    cob = CoB.from_vector(structure, best_th, signs)
    log = CoBSearchLog("optimize_cob", name, before, best_v if math.isfinite(best_v) else before, loss,
                       len(history) - 1, time.perf_counter() - t0, structure.num_free, history)
    return cob, log


def best_of_random(model: nn.Module, loss_fn: Callable, batches, n: int = 10, sigma: float = 0.5,
                   mode: str = "intra", structure: CoBStructure | None = None,
                   objective: str | Callable = "grad_norm",
                   generator: torch.Generator | None = None) -> tuple[CoB, CoBSearchLog]:
    """The authors' baseline: draw ``n`` CoBs with ``random_cob(structure, sigma, mode)`` and keep the one with the
    largest ``objective`` (same objectives and evaluation as :func:`optimize_cob`).  The model is not changed.
    Cost: one forward/backward per batch + ``n`` elementwise passes."""
    t0 = time.perf_counter()
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be a positive int, got {n!r}.")
    name = objective if isinstance(objective, str) else getattr(objective, "__name__", "callable")
    _objective_fn(objective)
    batches, structure, loss, grads, weights = _prepare(model, loss_fn, batches, structure)
    with torch.no_grad():
        before = float(cob_objective(structure, CoB.identity(structure), weights, grads, objective))
        best, best_v, history = None, -math.inf, []
        for _ in range(n):
            c = random_cob(structure, sigma, mode, generator)
            v = float(cob_objective(structure, c, weights, grads, objective))
            history.append(v)
            if best is None or v > best_v:
                best, best_v = c, v
    log = CoBSearchLog("best_of_random", name, before, best_v, loss, n, time.perf_counter() - t0,
                       structure.num_free, history)
    return best, log
