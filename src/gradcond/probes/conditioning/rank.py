"""Relative gradient rank Δ R (seed 004, Defs 3.6-3.7): the stable rank of the per-sample gradient matrix
(:func:`effective_rank`, from its b×b Gram matrix) relative to that of a Gaussian matrix of the same shape
(:func:`gaussian_effective_rank`, sampled from the Wishart law of its Gram matrix in O(b³), cached per shape).
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
from gradcond.probes.conditioning.train_mode import engine_for
from gradcond.utils import accepts_model_output, as_batch

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


@functools.lru_cache(maxsize=256, typed=True)  # typed: 10.0 must be refused even after 10 is cached
def gaussian_effective_rank(d: int, b: int, samples: int = 5, seed: int = 0) -> float:
    """Mean stable rank R(Y) (seed 004, eq. 3.18) of ``samples`` i.i.d. N(0, 1) matrices Y of shape (b, d), the
    baseline of the relative gradient rank (eq. 3.20); deterministic per ``seed``, cached per arguments.

    R(Y) = tr(Y Yᵀ)/λ_max(Y Yᵀ) depends on Y only through its Gram matrix, and the non-zero eigenvalues of Y Yᵀ
    (b × b) and Yᵀ Y (d × d) coincide; with k = min(b, d) and n = max(b, d), the k × k Gram is Wishart(n, I_k). It is
    sampled directly by the Bartlett decomposition W = B Bᵀ (B lower-triangular, B_ii² ~ χ²(n − i + 1),
    B_ij ~ N(0, 1) for i > j), so no b × d matrix is ever drawn. Cost: O(samples · k³) time and O(samples · k²)
    memory, independent of the larger dimension (b = 64, d = 10⁹ takes milliseconds). The eigenvalues are computed
    in float64 and clamped at 0. ValueError unless d, b and samples are ints >= 1 and seed is an int.
    """
    check_int("d", d)
    check_int("b", b)
    check_int("samples", samples)
    check_int("seed", seed, lo=-(2 ** 63))
    return float(_gaussian_stable_ranks(d, b, samples, seed).mean())


def _gaussian_stable_ranks(d: int, b: int, samples: int, seed: int) -> torch.Tensor:
    """The ``samples`` stable ranks (float64 tensor) behind :func:`gaussian_effective_rank` (Bartlett sampler)."""
    gen = torch.Generator().manual_seed(seed)
    k, n = min(b, d), max(b, d)
    dof = torch.arange(n, n - k, -1, dtype=torch.float64).expand(samples, k)  # χ² degrees of freedom n - i + 1
    diag = (2.0 * _standard_gamma(dof / 2.0, gen)).sqrt()  # χ²(ν) = 2·Gamma(ν/2)
    B = torch.randn(samples, k, k, generator=gen, dtype=torch.float64).tril(-1) + torch.diag_embed(diag)
    return _stable_rank_of_grams(B @ B.mT)


def _gaussian_stable_ranks_bruteforce(d: int, b: int, samples: int, seed: int) -> torch.Tensor:
    """Reference for tests and benchmarks: the same stable ranks from explicit N(0, 1) draws of shape (b, d), Gram
    accumulated over column chunks; O(samples · b² d) time, O(b · 65536) memory."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.zeros(samples, b, b, dtype=torch.float64)
    for i in range(samples):
        for s in range(0, d, 65536):
            Y = torch.randn(b, min(65536, d - s), generator=gen, dtype=torch.float64)
            G[i] += Y @ Y.T
    return _stable_rank_of_grams(G)


def _stable_rank_of_grams(G: torch.Tensor) -> torch.Tensor:
    """tr(G)/λ_max(G) for a batch (..., k, k) of Gram matrices, from their eigenvalues clamped at 0 (rounding can make
    the zero eigenvalues of a rank-deficient Gram slightly negative)."""
    lam = torch.linalg.eigvalsh(G).clamp(min=0)
    return lam.sum(-1) / lam[..., -1]


def _standard_gamma(alpha: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gamma(alpha, 1) draws (float64, alpha > 0) from ``gen`` by Marsaglia & Tsang (2000), vectorized rejection
    (acceptance >= 95 % per round). torch.distributions cannot take a Generator, hence this sampler. alpha < 1 uses
    Gamma(alpha) = Gamma(alpha + 1)·U^(1/alpha). The acceptance test is written with log1p so that it stays accurate
    for huge alpha (χ²(10⁹)), where 1 − v + log v cancels catastrophically."""
    shape = alpha.shape
    alpha = alpha.to(torch.float64).reshape(-1)
    a = torch.where(alpha < 1, alpha + 1, alpha)
    dd = a - 1.0 / 3.0
    c = 1.0 / (9.0 * dd).sqrt()
    out = torch.empty_like(a)
    todo = torch.arange(a.numel())
    while todo.numel():
        x = torch.randn(todo.numel(), generator=gen, dtype=torch.float64)
        u = 1.0 - torch.rand(todo.numel(), generator=gen, dtype=torch.float64)  # in (0, 1]: log(u) finite
        t = c[todo] * x
        ok = t > -1
        t = torch.where(ok, t, torch.zeros_like(t))
        # log acceptance ratio: x²/2 + d(1 − v + log v), v = (1 + t)³, 1 − v = −t(3 + 3t + t²)
        crit = 0.5 * x * x + dd[todo] * (3.0 * torch.log1p(t) - t * (3.0 + t * (3.0 + t)))
        acc = ok & (u.log() < crit)
        out[todo[acc]] = dd[todo[acc]] * (1.0 + t[acc]) ** 3
        todo = todo[~acc]
    small = alpha < 1
    if small.any():
        u = 1.0 - torch.rand(int(small.sum()), generator=gen, dtype=torch.float64)
        out[small] = out[small] * u.pow(1.0 / alpha[small])
    return out.reshape(shape)


@accepts_model_output
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
    Y is Gaussian of the same shape b × d (baseline :func:`gaussian_effective_rank`: its b×b Gram sampled from the
    Wishart law in O(b³), independent of d, and cached per shape). With a mask, A is replaced by its masked
    columns but Y keeps the *unmasked* shape b × m (decision): the mask is applied to gradient vectors only, and the
    masked stable rank R(MA) estimates R(A) (coordinate subsampling leaves the stable rank of structured, low-rank
    gradients nearly unchanged), whereas the Gaussian baseline depends on the aspect ratio itself (b = 64: ≈62.3 at
    d = 3·10⁵ but ≈56.9 at d = 1.5·10⁴), so renormalizing at the masked shape would shift the value by ~10% for
    reasons unrelated to the gradients. ``details["relative_to_masked_shape"]`` gives R(MA)/R(Y_masked) too.
    Near 1: white-noise gradients; near 0: highly correlated. Cost: one per-sample pass, O(d b²) for the Gram matrix,
    O(gaussian_samples · b³) for the baseline; A is materialized
    (b × d) for ``wrt="input"``; for ``wrt="weight"`` only the b×b Gram matrix is formed layer by layer (layer
    identities of :mod:`gradcond.probes.per_sample.identities`: Linear, Conv1d/2d incl. grouped, Embedding, norm affines; nothing of
    size b × m; see :meth:`Engine.per_sample_stats`). Needs b >= 2. The mask applies only to
    ``wrt="weight"``.
    """
    check_choice("wrt", wrt, ("input", "weight"))
    check_int("gaussian_samples", gaussian_samples)
    with Timer() as t:
        x, y = as_batch(batch_or_loader)
        need_samples(x.shape[0], 2, "relative_gradient_rank")
        select, frac = mask_select(mask, model)
        with engine_for(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
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
