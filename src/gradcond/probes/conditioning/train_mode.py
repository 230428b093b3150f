"""Batch-level gradients of a BatchNorm network *in training mode* (``bn="train"``; seed 004 eq. 2.24 reads h̄_W as
the gradient SGD follows, which for a BN network is the train-mode batch gradient).

:class:`gradcond.probes.per_sample.Engine` offers two BN policies, ``"batch"`` (statistics frozen from the batch and
treated as constants) and ``"eval"`` (running statistics). Neither is the function a train-mode SGD step
differentiates: there the batch mean and variance depend on w (and on every sample of the batch), so gradients flow
through them. :class:`TrainModeBatch` evaluates exactly that function: every BatchNorm layer runs in train mode, all
other modules in eval mode (dropout off, deterministic), on **copies** of the buffers made for each evaluation, so the
model's running statistics and ``num_batches_tracked`` are never written (``tests/test_measurement_purity.py``) and
every evaluation sees the same buffers.

Only batch-level quantities are defined in this mode (a train-mode BN couples the samples of a batch, so a
"per-sample gradient" is not a gradient of a per-sample loss); per-sample methods raise ``ValueError``.
Gradients use plain autograd (``torch.autograd.grad``; the HVP by double backward), not ``torch.func``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from gradcond.probes.flat_vectors import flatten, unflatten
from gradcond.probes.per_sample.plan import BN_TYPES

__all__ = ["BN_MODES", "TrainModeBatch", "engine_for"]

BN_MODES = ("batch", "eval", "train")

_PER_SAMPLE_MSG = ("bn='train' couples the samples of a batch through the BatchNorm statistics, so per-sample "
                   "gradients are undefined; use bn='batch' (statistics frozen from the batch) or bn='eval' for a "
                   "per-sample metric.")


@contextlib.contextmanager
def _train_bn_flags(model: nn.Module):
    """BatchNorm layers in train mode, every other module in eval mode; every flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m in model.modules():
            m.training = isinstance(m, BN_TYPES)
        yield
    finally:
        for m, t in flags:
            m.training = t


class TrainModeBatch:
    """Batch-level view of ``model`` + ``loss_fn`` with BatchNorm in train mode (module docstring).

    Same attributes and batch-level methods as :class:`~gradcond.probes.per_sample.Engine` (``names``, ``w``, ``m``,
    ``b``, ``x``, ``y``, ``dtype``, ``flat_w``, ``add``, ``batch_grad``, ``hvp``), so the batch-level conditioning
    metrics use either. The batch objective is the mean of per-sample losses ``loss_fn(out_i[None], t_i[None])`` of
    the train-mode batch output (the Engine's convention). Cost: one forward+backward per ``batch_grad``; an HVP is
    one double backward.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, **_ignored):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable(output, target) -> scalar, got {type(loss_fn).__name__}.")
        self.model, self.loss_fn, self.bn = model, loss_fn, "train"
        raw = dict(model.named_parameters())
        self.names = [n for n, p in raw.items() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to measure.")
        self.w = {n: raw[n].detach() for n in self.names}
        self.fixed = {n: p.detach() for n, p in raw.items() if n not in self.names}
        self.dtype = self.w[self.names[0]].dtype
        self.m = sum(t.numel() for t in self.w.values())
        self.x = x.to(self.dtype) if x.is_floating_point() else x
        self.y = y
        self.b = x.shape[0]
        if self.b < 2 and any(isinstance(m, BN_TYPES) for m in model.modules()):
            raise ValueError("bn='train' needs a batch of at least 2 samples (BatchNorm batch statistics).")
        self._ctx = None

    def __enter__(self) -> "TrainModeBatch":
        self._ctx = _train_bn_flags(self.model)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    # ------------------------------------------------------------------ basics (Engine-compatible)
    def flat_w(self) -> torch.Tensor:
        return flatten(self.w, self.names)

    def add(self, omega: torch.Tensor) -> dict[str, torch.Tensor]:
        d = unflatten(omega.to(self.dtype), self.w, self.names)
        return {n: self.w[n] + d[n] for n in self.names}

    def _loss(self, w: dict[str, torch.Tensor], x, y) -> torch.Tensor:
        # fresh buffer copies per evaluation: the train-mode forward updates running statistics in place (on the copies)
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        out = functional_call(self.model, ({**self.fixed, **w}, buffers), (x,))
        return vmap(lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y).mean()

    def batch_grad(self, omega: torch.Tensor | None = None, x=None, y=None) -> torch.Tensor:
        """Flat train-mode batch-mean gradient h̄_W(w + ω, χ) (one forward+backward; statistics depend on w)."""
        base = self.w if omega is None else self.add(omega)
        x = self.x if x is None else (x.to(self.dtype) if x.is_floating_point() else x)
        y = self.y if y is None else y
        w = {n: t.detach().requires_grad_(True) for n, t in base.items()}
        with torch.enable_grad():
            g = torch.autograd.grad(self._loss(w, x, y), [w[n] for n in self.names], allow_unused=True)
        return torch.cat([(torch.zeros_like(w[n]) if gi is None else gi).reshape(-1) for n, gi in zip(self.names, g)])

    def hvp(self, omega: torch.Tensor) -> torch.Tensor:
        """Exact Hessian-vector product Hω of the train-mode batch loss (double backward)."""
        d = unflatten(omega.to(self.dtype), self.w, self.names)
        w = {n: t.detach().requires_grad_(True) for n, t in self.w.items()}
        params = [w[n] for n in self.names]
        with torch.enable_grad():
            g = torch.autograd.grad(self._loss(w, self.x, self.y), params, create_graph=True, allow_unused=True)
            dot = sum((gi * d[n]).sum() for n, gi in zip(self.names, g) if gi is not None)
            if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                return torch.zeros(self.m, dtype=self.dtype, device=self.x.device)
            h = torch.autograd.grad(dot, params, allow_unused=True)
        return torch.cat([(torch.zeros_like(w[n]) if hi is None else hi).reshape(-1) for n, hi in zip(self.names, h)])

    # ------------------------------------------------------------------ per-sample: undefined in train mode
    def per_sample_grads(self, *args, **kwargs):
        raise ValueError(_PER_SAMPLE_MSG)

    per_sample_matrix = per_sample_sq_norms = per_sample_gram = mixed_jvp = per_sample_grads


def engine_for(model, loss_fn, x, y, *, bn: str = "batch", chunk_size=None):
    """The measurement view for ``bn``: :class:`TrainModeBatch` for ``"train"``, the per-sample
    :class:`~gradcond.probes.per_sample.Engine` for ``"batch"``/``"eval"``; ValueError listing the three otherwise."""
    from gradcond.probes.per_sample import Engine

    if bn not in BN_MODES:
        raise ValueError(f"bn must be 'batch' (statistics frozen from the batch), 'eval' (running statistics) or "
                         f"'train' (train-mode statistics that depend on the weights; batch-level metrics only), "
                         f"got {bn!r}.")
    if bn == "train":
        return TrainModeBatch(model, loss_fn, x, y)
    return Engine(model, loss_fn, x, y, bn=bn, chunk_size=chunk_size)
