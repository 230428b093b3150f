"""Relative gradient rank Δ R (seed 004, Defs 3.6-3.7): the stable rank of the per-sample gradient matrix
(:func:`effective_rank`, from its b×b Gram matrix) relative to that of a Gaussian matrix of the same shape
(:func:`gaussian_effective_rank`, cached per shape).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from gradcond.probes.conditioning.common import (
    Result,
    Timer,
    check_choice,
    check_finite,
    check_int,
    check_nonzero,
    mask_select,
    need_samples,
)
from gradcond.probes.per_sample import Engine
from gradcond.utils import as_batch

__all__ = ["effective_rank", "gaussian_effective_rank", "relative_gradient_rank"]


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
    with Timer() as t:
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
