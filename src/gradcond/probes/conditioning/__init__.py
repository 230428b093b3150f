"""Gradient-conditioning metrics of Nelson, "Gradient Conditioning in Deep Neural Networks" (seed 004).

Every metric has the form ``metric(model, loss_fn, batch_or_loader, ...) -> Result`` (``Result(value, details, n, b,
eta, mask, seconds)`` with ``.to_dict()``), is computed functionally by :class:`gradcond.probes.per_sample.Engine`
(parameters and BatchNorm buffers are never written; see that module for the per-sample loss convention and the
BatchNorm policy ``bn="batch"|"eval"``; the batch-level metrics also take ``bn="train"``), and accepts
``mask=LayerwiseMask(...)``, which is applied to *every weight gradient vector* the metric uses (never to ‖w‖, to
ω, or to input gradients; decision, notes erratum 5).

Bad input: a metric that needs >= 2 samples (or batches) given 1, a zero gradient it has to divide by, and NaN/inf
gradients all raise ``ValueError`` with one sentence; no metric returns a silent NaN.

What lives where (``from gradcond.probes import conditioning as C; C.step_consistency(...)`` reaches all of them):

* :mod:`~gradcond.probes.conditioning.perturbation` — :func:`step_consistency` κ≈_W (eq. 2.24; samplers of
  Defs 2.6/2.7 + random; ``mode="jvp"`` gives the exact directional derivative ‖Hω‖ instead of the finite
  difference), :func:`step_metrics` C*_n, D_n(w,χ), H_n(w,χ) (eqs. 4.1-4.3) sharing the perturbed gradients of κ≈_W,
  and :func:`batch_dissonance` κ̄≈_X (eqs. 3.15-3.16; samplers of Def 3.5 + random + interpolation).
* :mod:`~gradcond.probes.conditioning.exact` — :func:`input_condition_exact`, the exact κ_X = ‖∂h_W/∂x‖₂‖x‖/‖h_W‖
  per sample (power iteration with JVP/VJP, or the dense Jacobian), the quantity κ̄≈_X estimates.
* :mod:`~gradcond.probes.conditioning.train_mode` — ``bn="train"`` for the batch-level metrics (step-consistency,
  C*/D/H, confusion, batch diversity): BatchNorm in train mode with statistics that depend on w, evaluated on buffer
  copies (the train-mode function SGD differentiates; ``"batch"`` freezes the statistics, ``"eval"`` uses running ones).
* :mod:`~gradcond.probes.conditioning.consecutive` — :func:`consecutive_step_consistency` (free in-training
  variant, n = 1, i ≠ j), the pure :func:`consecutive_ratio` and the :class:`ConsecutiveStepConsistency` callback.
* :mod:`~gradcond.probes.conditioning.rank` — :func:`relative_gradient_rank` Δ R (Defs 3.6-3.7) w.r.t. input or
  weights via the b×b Gram matrix, :func:`effective_rank`, and the Gaussian baseline :func:`gaussian_effective_rank`.
* :mod:`~gradcond.probes.conditioning.batch_metrics` — :func:`gradient_confusion` (eq. 3.24),
  :func:`gradient_diversity` (eq. 3.25), :func:`gradient_coherence` (eq. 3.26), :func:`batch_efficiency_ratio`
  (eq. 3.9).
* :mod:`~gradcond.probes.conditioning.summary` — :func:`conditioning_summary`: coherence, step-consistency and the
  weight-gradient rank from one per-sample engine (three passes instead of seven; the monitor's probe).
* :mod:`~gradcond.probes.conditioning.directions` — the weight/input perturbation samplers;
  :mod:`~gradcond.probes.conditioning.common` — :class:`Result`, validation, mask selection, batch iteration.
"""

from __future__ import annotations

from gradcond.probes.conditioning.batch_metrics import (
    batch_efficiency_ratio,
    gradient_coherence,
    gradient_confusion,
    gradient_diversity,
)
from gradcond.probes.conditioning.common import Result
from gradcond.probes.conditioning.consecutive import (
    ConsecutiveStepConsistency,
    consecutive_ratio,
    consecutive_step_consistency,
)
from gradcond.probes.conditioning.exact import input_condition_exact
from gradcond.probes.conditioning.perturbation import batch_dissonance, step_consistency, step_metrics
from gradcond.probes.conditioning.rank import effective_rank, gaussian_effective_rank, relative_gradient_rank
from gradcond.probes.conditioning.summary import conditioning_summary

__all__ = [
    "Result",
    "step_consistency",
    "step_metrics",
    "consecutive_step_consistency",
    "consecutive_ratio",
    "ConsecutiveStepConsistency",
    "batch_dissonance",
    "input_condition_exact",
    "relative_gradient_rank",
    "effective_rank",
    "gaussian_effective_rank",
    "gradient_confusion",
    "gradient_diversity",
    "gradient_coherence",
    "batch_efficiency_ratio",
    "conditioning_summary",
]
