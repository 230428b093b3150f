"""Three conditioning metrics from ONE per-sample engine: gradient coherence (eq. 3.26), step-consistency κ≈_W
(eq. 2.24, the source's limited-targeted directions ±η ḡ/‖ḡ‖_∞) and the relative weight-gradient rank (Def 3.7).

Computed one by one (:func:`~gradcond.probes.conditioning.gradient_coherence`,
:func:`~gradcond.probes.conditioning.step_consistency`, :func:`~gradcond.probes.conditioning.relative_gradient_rank`)
they cost seven forward+backward passes of the batch: ḡ twice and a per-sample capture twice, plus the two perturbed
gradients. Here one :class:`~gradcond.probes.per_sample.Engine` captures the batch ONCE (its backward goes to the
layer outputs and to the parameters: the per-sample Gram matrix -- whose diagonal is the squared per-sample norms --
and ḡ from the same pass), and only the two perturbed gradients of κ≈_W need passes of their own: three in all. The
values are those of the three functions (same definitions, same directions; floating-point rounding aside, e.g. the
squared norms are the Gram diagonal instead of the norm identities).

Each metric is computed on its own: one that cannot be computed (a zero gradient) is reported as an error string and
the others are still returned. This is what the monitor's ``conditioning`` probe measures.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gradcond.probes.conditioning.common import Result, Timer, check_eta, check_finite, check_nonzero, need_samples
from gradcond.probes.conditioning.directions import weight_directions
from gradcond.probes.conditioning.rank import _rank_from_gram, gaussian_effective_rank
from gradcond.probes.conditioning.train_mode import engine_for
from gradcond.utils import accepts_model_output, as_batch

__all__ = ["conditioning_summary"]


@accepts_model_output
def conditioning_summary(model: nn.Module, loss_fn: Callable, batch, *, eta: float = 1e-3, bn: str = "batch",
                         gaussian_samples: int = 5, seed: int = 0) -> dict:
    """``{"coherence", "step_consistency", "relative_rank_weight"}`` -> :class:`Result`, or -> the error sentence
    (``str``) of a metric that cannot be computed, for one batch ``(x, y)`` (module docstring).

    ``eta``: size of the step-consistency directions (``‖ω‖_∞ = η``); ``bn``: ``"batch"`` or ``"eval"`` (per-sample
    gradients need one of them; see :class:`~gradcond.probes.per_sample.Engine`); ``gaussian_samples``: draws of the
    rank's Gaussian baseline; ``seed``: the direction sampler's generator (the limited-targeted sampler draws
    nothing). Cost: three forward+backward passes of the batch, the b × b Gram (per layer the cheaper of the ghost and
    the materialised identity) and one b × b eigen-decomposition; nothing of size b × P is formed. Needs b >= 2.
    """
    eta = check_eta(eta)
    if bn not in ("batch", "eval"):
        raise ValueError(f"conditioning_summary needs per-sample gradients: bn must be 'batch' or 'eval', got {bn!r}.")
    x, y = as_batch(batch)
    need_samples(x.shape[0], 2, "conditioning_summary")
    out: dict = {}
    with engine_for(model, loss_fn, x, y, bn=bn) as e:
        with Timer() as t:
            st, g = e.stats_and_batch_grad(norms=True, gram=True, batch_grad=True)
        shared = t.seconds  # the capture serves all three metrics
        b = e.b

        def attempt(name, fn, result_name):
            try:
                with Timer() as tm:
                    value, details, n, eta_ = fn()
                out[name] = Result(value, details, n, b, eta_, None, shared + tm.seconds, result_name)
            except (ValueError, FloatingPointError) as exc:
                out[name] = f"{exc}"

        g_ok = bool(torch.isfinite(g).all())  # checked once for coherence and step-consistency

        def coherence():
            if not g_ok:
                check_finite(g, "the batch gradient")
            check_finite(st.sq_norms, "a per-sample gradient")
            mean_sq = float(st.sq_norms.mean())
            check_nonzero(mean_sq, "every per-sample gradient")
            gg = float(g @ g)
            return gg / mean_sq, {"batch_sq_norm": gg, "mean_sample_sq_norm": mean_sq}, b, None

        def step():
            if not g_ok:
                check_finite(g, "the batch gradient")
            check_nonzero(g.abs().max(), "the batch gradient")
            omegas, info = weight_directions(e, "limited_targeted", 2, eta, None, torch.Generator().manual_seed(seed),
                                             g)
            w_norm, g_norm = e.flat_w().norm(), g.norm()
            ratios = []
            for om in omegas:
                gk = e.batch_grad(om)
                check_finite(gk, "a perturbed batch gradient")
                ratios.append(float((gk - g).norm() * w_norm / (om.norm() * g_norm)))
            details = dict(info, mode="finite_difference", ratios=ratios, w_norm=float(w_norm), g_norm=float(g_norm),
                           omega_norms=[float(o.norm()) for o in omegas])
            return max(ratios), details, len(omegas), eta

        def rank():
            r = _rank_from_gram(st.gram)
            rg = gaussian_effective_rank(e.m, b, gaussian_samples)
            return r / rg, {"wrt": "weight", "rank": r, "gaussian_rank": rg, "d": e.m}, b, None

        attempt("coherence", coherence, "gradient_coherence")
        attempt("step_consistency", step, "step_consistency")
        attempt("relative_rank_weight", rank, "relative_gradient_rank")
    return out
