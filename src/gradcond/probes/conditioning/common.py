"""Shared pieces of the conditioning metrics (seed 004): the :class:`Result` type every metric returns, argument and
value validation (one-sentence ``ValueError``/``TypeError`` messages), mask selection and batch iteration.

The direction samplers live in :mod:`gradcond.probes.conditioning.directions`; the metrics in the other modules of
this package. :mod:`gradcond.probes.reference` uses the validation helpers too.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gradcond.probes.mask import LayerwiseMask
from gradcond.utils import as_batch

__all__ = ["Result", "Timer", "apply_select", "check_choice", "check_eta", "check_finite", "check_int", "check_nonzero",
           "is_single_batch", "mask_select", "need_samples", "take_batches"]


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


@dataclass
class Result:
    """Outcome of one metric evaluation.

    value: the metric; details: metric-specific extras (per-direction ratios, cosines, ...); n: number of samples the
    estimate is over (directions, pairs, batches — see each metric); b: batch size; eta: perturbation scale or None;
    mask: mask fraction or None; seconds: wall time of the call.
    """

    value: float
    details: dict = field(default_factory=dict)
    n: int = 0
    b: int = 0
    eta: float | None = None
    mask: float | None = None
    seconds: float = 0.0
    name: str = ""

    def to_dict(self) -> dict:
        return _plain(asdict(self))


class Timer:
    """Wall time of a ``with`` block in ``seconds`` (``time.perf_counter``)."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def check_eta(eta) -> float:
    """``eta`` as a float; ValueError unless it is a positive finite number (bool rejected)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"eta must be a positive finite number, got {eta!r}.")
    return float(eta)


def check_int(name: str, v, lo: int = 1) -> int:
    """``v`` unchanged; ValueError naming ``name`` unless it is an int (not bool) >= ``lo``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}.")
    return v


def check_choice(name: str, v, accepted) -> str:
    """``v`` unchanged; ValueError listing ``accepted`` unless ``v`` is one of them."""
    if v not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {v!r}.")
    return v


def mask_select(mask, model):
    """``(indices, fraction)`` of a :class:`LayerwiseMask` checked against ``model``'s layout, or ``(None, None)``."""
    if mask is None:
        return None, None
    if not isinstance(mask, LayerwiseMask):
        raise TypeError(f"mask must be a LayerwiseMask or None, got {type(mask).__name__}.")
    mask.check(model)
    return mask.indices, mask.fraction


def apply_select(v: torch.Tensor, select) -> torch.Tensor:
    """The selected coordinates of the last dimension of ``v`` (all of ``v`` when ``select`` is None)."""
    return v if select is None else v.index_select(-1, select)


def need_samples(b: int, k: int, what: str) -> None:
    """ValueError unless the batch size ``b`` is at least ``k``."""
    if b < k:
        raise ValueError(f"{what} needs a batch of at least {k} samples, got {b}.")


def check_finite(t: torch.Tensor, what: str) -> None:
    """ValueError if ``t`` holds NaN or inf (a metric never returns a silent NaN)."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf; the metric is undefined for non-finite gradients.")


def check_nonzero(norm: torch.Tensor | float, what: str) -> None:
    """ValueError if ``norm`` (a quantity the metric divides by) is exactly zero."""
    if float(norm) == 0.0:
        raise ValueError(f"{what} is zero; the metric divides by it and is undefined.")


def is_single_batch(obj) -> bool:
    """True for one batch ``(x, y, ...)`` of tensors, False for a loader or a list of batches."""
    return isinstance(obj, (tuple, list)) and len(obj) >= 2 and all(isinstance(t, torch.Tensor) for t in obj[:2])


def take_batches(obj, n_batches: int, what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """First ``n_batches`` batches of a loader / iterable (or a list of batches); a single batch is one batch."""
    if is_single_batch(obj):
        return [as_batch(obj)]
    try:
        it = iter(obj)
    except TypeError:
        raise ValueError(f"{what}: expected a loader or iterable of (x, y) batches, got {type(obj).__name__}.") from None
    out = []
    for batch in it:
        out.append(as_batch(batch))
        if len(out) >= n_batches:
            break
    if not out:
        raise ValueError(f"{what}: the loader yielded no batches.")
    return out
