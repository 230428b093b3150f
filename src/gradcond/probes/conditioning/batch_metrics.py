"""Conditioning metrics over sets of gradients (seed 004 §3.4): gradient confusion (eq. 3.24), gradient diversity
(eq. 3.25), gradient coherence (eq. 3.26) and the batch-efficiency ratio (eq. 3.9). Batch gradients and per-sample
squared norms come from :class:`gradcond.probes.per_sample.Engine`; nothing beyond running sums and the requested
batch gradients is stored.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import nn

from gradcond.probes.conditioning.common import (
    Result,
    Timer,
    apply_select,
    check_finite,
    check_int,
    check_nonzero,
    is_single_batch,
    mask_select,
    need_samples,
    take_batches,
)
from gradcond.probes.conditioning.train_mode import engine_for
from gradcond.utils import accepts_model_output, as_batch

__all__ = ["gradient_confusion", "gradient_diversity", "gradient_coherence", "batch_efficiency_ratio"]


def _batch_grads(model, loss_fn, batches, select, bn, chunk_size):
    for x, y in batches:
        with engine_for(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
            g = apply_select(e.batch_grad(), select)
        check_finite(g, "a batch gradient")
        yield g


@accepts_model_output
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
    ``bn="train"``: batch gradients of the train-mode BatchNorm function (statistics depend on w; buffer copies).
    """
    check_int("n_batches", n_batches, 2)
    if n_pairs is not None:
        check_int("n_pairs", n_pairs)
    with Timer() as t:
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


@accepts_model_output
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
    ``bn="train"`` (train-mode BatchNorm statistics) is accepted for the batch version only.
    """
    check_int("n_batches", n_batches, 2)
    with Timer() as t:
        select, frac = mask_select(mask, model)
        total, sq, count = None, 0.0, 0
        if per_sample:
            x, y = as_batch(batch_or_loader)
            need_samples(x.shape[0], 2, "gradient_diversity(per_sample=True)")
            with engine_for(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
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


@accepts_model_output
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
    with Timer() as t:
        x, y = as_batch(batch_or_loader)
        need_samples(x.shape[0], 2, "gradient_coherence")
        select, frac = mask_select(mask, model)
        with engine_for(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
            g = apply_select(e.batch_grad(), select)
            check_finite(g, "the batch gradient")
            sq = e.per_sample_sq_norms(select=select)
            check_finite(sq, "a per-sample gradient")
        mean_sq = float(sq.mean())
        check_nonzero(mean_sq, "every per-sample gradient")
        value = float(g @ g) / mean_sq
    return Result(value, {"batch_sq_norm": float(g @ g), "mean_sample_sq_norm": mean_sq}, e.b, e.b, None, frac,
                  t.seconds, "gradient_coherence")


@accepts_model_output
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
    with Timer() as t:
        batches = take_batches(batch_or_loader, n_batches, "batch_efficiency_ratio")
        select, frac = mask_select(mask, model)
        bsq, ssq, ns = [], 0.0, 0
        for x, y in batches:
            need_samples(x.shape[0], 2, "batch_efficiency_ratio")
            with engine_for(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size) as e:
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
