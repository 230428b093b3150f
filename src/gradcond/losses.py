"""Output losses by name, and the one resolver :func:`get_loss` that every part of the package uses.

Each loss takes ``(output, target)`` and returns a scalar: the mean over the batch.  The module sits low in the
package (layer 1: it imports only torch and ``gradcond.utils``) so that the probes, the teleports and the trainer
resolve loss names the same way without importing each other; ``gradcond.train.losses`` (and ``gradcond.train``)
re-export everything here.

Where new losses go: future output losses (seed 002's GA losses ``SparseCrossEntropy``, ``NegCorrelationLoss``,
``LinearMSE``) are added to THIS module, registered in :data:`LOSSES` when they have a config name, and re-exported
from ``gradcond.train.losses``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .presets import presettable
from .utils import TrainingDiverged

__all__ = ["LOSSES", "get_loss", "dot_error", "cross_entropy", "mse", "SparseCrossEntropy", "NegCorrelationLoss",
           "LinearMSE"]


def dot_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Seed 003's dot-product error f_0 = f_1 . y, as a loss to minimise: mean over the batch of -(f . y)."""
    return -(output * target).flatten(1).sum(1).mean()


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of logits ``output`` (B, C) against class indices (or probabilities) ``target``."""
    return F.cross_entropy(output, target)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error; ``target`` is reshaped to the output's shape (so (B,) targets fit (B, 1) outputs)."""
    return F.mse_loss(output, target.reshape(output.shape))


LOSSES = {"cross_entropy": cross_entropy, "mse": mse, "dot": dot_error}


def get_loss(name) -> Callable:
    """The loss function called ``name`` (``cross_entropy``, ``mse``, ``dot``, and seed 002's ``exp_ga``,
    ``pow3_ga``, ``linear_mse`` -- default-parameter instances of :class:`SparseCrossEntropy`,
    :class:`NegCorrelationLoss`, :class:`LinearMSE`); a callable is returned unchanged.

    An unknown name is a ValueError naming the accepted ones; anything that is neither a string nor a callable is a
    TypeError.  Cost: a dictionary look-up.
    """
    if callable(name):
        return name
    if not isinstance(name, str):
        raise TypeError(f"loss must be a loss name ({', '.join(sorted(LOSSES))}) or a callable "
                        f"(output, target) -> scalar, got {type(name).__name__}.")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; accepted: {', '.join(sorted(LOSSES))}.")
    return LOSSES[name]


# ----------------------------------------------------------------------------------------------- seed 002, ch. 4
# Gradient-amplifying (GA) output losses on logits (Øland, "gradient amplification"): each has dL/dx = y - t for an
# unbounded output map y(x), so the error signal backpropagated from the output layer is not squashed to [-1, 1]
# as with softmax + cross-entropy.  Labels are hard class indices (B,), turned into targets t = t_neg + (t_pos -
# t_neg) * onehot; an explicit (B, C) float tensor is used as the target values t directly.  The prediction is the
# argmax of the logits (both output maps are monotone), so accuracy is computed as for cross-entropy.


def _positive(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {v!r}.")
    return float(v)


def _targets_pair(v) -> tuple[float, float]:
    try:
        t0, t1 = (float(t) for t in v)
    except (TypeError, ValueError):
        raise ValueError(f"targets must be a pair (t_neg, t_pos) of finite numbers, got {v!r}.") from None
    if not (math.isfinite(t0) and math.isfinite(t1)):
        raise ValueError(f"targets must be a pair (t_neg, t_pos) of finite numbers, got {v!r}.")
    return t0, t1


class _GALoss(torch.nn.Module):
    """Common part: target construction, reduction, the classification marker the trainer reads."""

    task = "classification"  # fit() reports accuracy (argmax of the logits) for these losses

    def __init__(self, targets, reduction: str):
        super().__init__()
        self.targets = _targets_pair(targets)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' (sum over classes, mean over the batch) or 'sum', "
                             f"got {reduction!r}.")
        self.reduction = reduction

    def target_values(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The per-logit targets t: (t_neg, t_pos) for hard labels, or ``target`` itself when it is (B, C) floats."""
        if logits.dim() != 2:
            raise ValueError(f"{type(self).__name__} needs logits of shape (batch, classes), "
                             f"got {tuple(logits.shape)}.")
        if target.dim() == 2 and target.is_floating_point():
            if target.shape != logits.shape:
                raise ValueError(f"target values of shape {tuple(target.shape)} do not match the logits "
                                 f"{tuple(logits.shape)}.")
            return target.to(logits.dtype)
        if target.dim() != 1 or target.is_floating_point() or target.shape[0] != logits.shape[0]:
            raise ValueError(f"{type(self).__name__} needs hard labels (a 1-D integer tensor, one class index per "
                             f"row of the logits) or a (batch, classes) float tensor of target values, got a "
                             f"{str(target.dtype).replace('torch.', '')} tensor of shape {tuple(target.shape)}.")
        C = logits.shape[1]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= C):
            raise ValueError(f"class indices must lie in [0, {C - 1}] for {C} logits, got "
                             f"{int(target.min())}..{int(target.max())}.")
        t0, t1 = self.targets
        onehot = torch.nn.functional.one_hot(target.long(), C).to(logits.dtype)
        return t0 + (t1 - t0) * onehot

    def _reduce(self, per_elem: torch.Tensor) -> torch.Tensor:
        total = per_elem.sum()
        return total if self.reduction == "sum" else total / per_elem.shape[0]

    @staticmethod
    def predict(logits: torch.Tensor) -> torch.Tensor:
        """Class prediction: the argmax of the logits (the output maps are monotone)."""
        return logits.argmax(1)


class SparseCrossEntropy(_GALoss):
    """exp-GA (seed 002, §4.5-4.6): output y = alpha * exp(x), loss on logits x

        L = sum_k ( alpha e^{x_k} - t_k (ln alpha + x_k) ),      dL/dx = alpha e^x - t = y - t,

    i.e. the source's sparse cross-entropy sum (|y| - t ln y) (the L1-penalised cross-entropy).  ``alpha > 0``
    (source default 0.1); ``targets = (t_neg, t_pos)`` (the source uses e.g. {0, 16} or {0, 6} to amplify further).
    ``reduction="mean"`` sums over classes and averages over the batch; ``"sum"`` is the source's sum over both.
    Overflow of e^x (a logit above ln(max float / alpha)) raises :class:`~gradcond.utils.TrainingDiverged` with
    advice instead of returning inf.  ``preset="thesis"`` (§4.5: alpha 0.1, targets {0, 16}) or
    ``"thesis-allconv"`` (§4.10: targets {0, 6}) fills the arguments not given (:mod:`gradcond.presets`).  The
    default targets (0, 1) differ from the thesis's on purpose: they are the one-hot targets every other loss uses,
    so swapping the loss changes only the output map; raise them to amplify.  Cost O(B C).
    """

    @presettable("SparseCrossEntropy")
    def __init__(self, alpha: float = 0.1, targets=(0.0, 1.0), reduction: str = "mean", preset: str | None = None):
        super().__init__(targets, reduction)
        self.alpha = _positive("SparseCrossEntropy alpha", alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = self.target_values(logits, target)
        # y = alpha e^x as exp(x + ln alpha): it overflows only where y itself exceeds the float range, so a
        # smaller alpha really moves the limit (alpha * exp(x) would overflow at x > ln(max float) for any alpha < 1)
        y = torch.exp(logits + math.log(self.alpha))
        if not torch.isfinite(y).all():
            limit = math.log(torch.finfo(logits.dtype).max) - math.log(self.alpha)
            raise TrainingDiverged(
                f"exp-GA overflow: alpha * exp(logit) is not finite in {str(logits.dtype).replace('torch.', '')} "
                f"(largest logit {float(logits.detach().max()):.4g}, limit {limit:.4g} = ln(max float) - ln(alpha)); "
                f"use a smaller alpha than {self.alpha:g}, smaller targets or a lower learning rate.")
        return self._reduce(y - t * (math.log(self.alpha) + logits))


class NegCorrelationLoss(_GALoss):
    """pow3-GA (seed 002, §4.7-4.8): output y = alpha x^3 + beta with a linear output x, loss on logits

        L = sum_k ( alpha x_k^4 / 4 + beta x_k - t_k x_k ),      dL/dx = alpha x^3 + beta - t = y - t,

    the source's negative correlation loss.  ``alpha > 0`` (default 1e-3), ``beta >= 0`` (default 0.4),
    ``targets`` default (0, 10) -- the source's first experiment (§4.7; ``preset="thesis"`` states them,
    ``"thesis-allconv"`` is §4.10's targets {-2, 10}).  Reduction as :class:`SparseCrossEntropy`.  Cost O(B C).
    """

    @presettable("NegCorrelationLoss")
    def __init__(self, alpha: float = 1e-3, beta: float = 0.4, targets=(0.0, 10.0), reduction: str = "mean",
                 preset: str | None = None):
        super().__init__(targets, reduction)
        self.alpha = _positive("NegCorrelationLoss alpha", alpha)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"NegCorrelationLoss beta must be a finite number >= 0, got {beta!r}.")
        self.beta = float(beta)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = self.target_values(logits, target)
        return self._reduce(0.25 * self.alpha * logits ** 4 + self.beta * logits - t * logits)


class LinearMSE(_GALoss):
    """Linear output + squared error for classification (seed 002, §4.3): L = sum_k (x_k - t_k)^2 / 2, so
    dL/dx = x - t; ``targets`` default (-1, 1) (the source's VGG setting, §4.11; ``preset="thesis"``).  Reduction
    as :class:`SparseCrossEntropy`.  Cost O(B C)."""

    @presettable("LinearMSE")
    def __init__(self, targets=(-1.0, 1.0), reduction: str = "mean", preset: str | None = None):
        super().__init__(targets, reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = self.target_values(logits, target)
        return self._reduce(0.5 * (logits - t) ** 2)


# config names -> default-parameter instances (classes for other parameters)
LOSSES.update({"exp_ga": SparseCrossEntropy(), "pow3_ga": NegCorrelationLoss(), "linear_mse": LinearMSE()})
