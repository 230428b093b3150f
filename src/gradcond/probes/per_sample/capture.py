"""Step 2 of the per-sample path: the **capture** -- ONE batched forward and ONE backward to the outputs of every
parameter-owning module of a :class:`~gradcond.probes.per_sample.plan.LayerPlan`.

For each module call it returns the detached inputs ``a`` and the output gradient ``e = ∂(Σ_j ℓ_j)/∂out``. Because a
per-sample measurement treats samples independently (eval mode, BatchNorm statistics frozen), ``e_i = ∂ℓ_i/∂out_i``,
and every per-sample parameter gradient of the module is a per-sample contraction of ``a_i`` and ``e_i`` (step 3,
:mod:`~gradcond.probes.per_sample.identities`). The same backward can also return autograd's gradient of Σ_i ℓ_i with
respect to the trainable parameters (``leaves``): b times the batch-mean gradient, at the cost of the weight-gradient
products only (the shared engine of the conditioning probe uses it instead of a second pass).

BatchNorm layers in train mode under the engine's ``bn="batch"`` policy (``bn_layers``) are normalised with the
batch's own statistics, held constant, and those statistics are recorded (one forward fewer than computing them in a
separate pass).

Outputs are differentiated as they are; an output that a later in-place operation modifies (``ReLU(inplace=True)``,
``out += identity``) is detected by its version counter, and the capture is repeated with a copy of every output
(remembered on the plan, so a model pays the detection once). Nothing here writes parameters or buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gradcond.probes.per_sample.plan import LayerPlan, Unsupported

__all__ = ["Capture", "capture"]


@dataclass
class Capture:
    """One captured batch. ``calls``: per module call ``(module name, inputs, e)`` (inputs as the forward saw them, still
    in the graph: use them under ``torch.no_grad()``); ``param_grads``: autograd's
    gradients of Σ_i ℓ_i for the requested leaves (None when none were asked for); ``bn_stats``: BN module name ->
    (batch mean, biased variance) recorded in the forward (empty unless BN layers were given)."""

    calls: list
    param_grads: list | None
    bn_stats: dict


def _bn_stats_hook(name: str, stats: dict):
    """Forward hook of a BN module (eval mode) that normalises its input with the input's own batch statistics, held
    constant (detached), and records them in ``stats[name]``."""
    def hook(module, args, output):
        inp = args[0]
        dims = [0] + list(range(2, inp.ndim))
        d = inp.detach()
        mean, var = d.mean(dims), d.var(dims, unbiased=False)
        stats.setdefault(name, []).append((mean, var))
        shape = [1, -1] + [1] * (inp.ndim - 2)
        out = (inp - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
        if module.affine:
            out = out * module.weight.view(shape) + module.bias.view(shape)
        return out
    return hook


class _Modified(Exception):
    """A captured output was modified in place after its module returned it."""


def capture(plan: LayerPlan, scaled_loss: Callable, x: torch.Tensor, y: torch.Tensor, *, leaves=None,
            bn_layers=()) -> Capture:
    """Run ``scaled_loss(x, y)`` -> ``(loss, k)`` with Σ_i ℓ_i = k · loss (one batched forward) with hooks on
    ``plan.modules`` and differentiate Σ_i ℓ_i with respect to their outputs (and ``leaves``, when given). ``bn_layers``: (name, module) of train-mode BN layers
    to normalise with their batch statistics (see the module docstring). Raises :class:`Unsupported` for a module
    called with keyword, non-tensor or non-batched arguments, or a parameter-owning module not called at all."""
    try:
        return _capture(plan, scaled_loss, x, y, leaves, bn_layers, getattr(plan, "copy_outputs", False))
    except _Modified:
        plan.copy_outputs = True  # remembered with the plan (cached per model object)
        return _capture(plan, scaled_loss, x, y, leaves, bn_layers, True)


_SEEDS: dict = {}  # (k, dtype, device) -> the scalar tensor k that seeds the backward


def _seed(k: int, loss: torch.Tensor) -> torch.Tensor:
    key = (k, loss.dtype, loss.device)
    t = _SEEDS.get(key)
    if t is None:
        t = _SEEDS[key] = torch.full((), float(k), dtype=loss.dtype, device=loss.device)
    return t


def _batched(t, b) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == b


def _capture(plan, scaled_loss, x, y, leaves, bn_layers, copy_outputs) -> Capture:
    b = x.shape[0]
    rec: list = []
    names = {mod: name for name, mod in plan.modules.items()}

    def hook(module, args, kwargs, output):
        if kwargs or not args or not _batched(output, b) or not all(_batched(a, b) for a in args):
            raise Unsupported(f"module {names[module]!r} is called with keyword, non-tensor or non-batched "
                              "arguments or returns a non-batched output")
        rec.append((names[module], args, output, output._version))
        # later in-place ops must not touch the tensor we differentiate against: they get a copy to modify
        return output.clone() if copy_outputs else output

    stats: dict[str, list] = {}
    handles = [mod.register_forward_hook(_bn_stats_hook(name, stats)) for name, mod in bn_layers]
    # registered after the BN hooks, so that a captured BN module's output is the replaced one
    handles += [mod.register_forward_hook(hook, with_kwargs=True) for mod in names]
    try:
        with torch.enable_grad():
            loss, k = scaled_loss(x, y)
    finally:
        for h in handles:
            h.remove()
    if any(o._version != v for _, _, o, v in rec):
        raise _Modified
    called = {name for name, _, _, _ in rec}
    if len(called) != len(plan.modules):
        missing = [name for name in plan.modules if name not in called]
        raise Unsupported(f"module(s) {missing} own parameters but were not called in the forward pass")
    outs = [o for _, _, o, _ in rec]
    leaves = list(leaves) if leaves is not None else []
    es = torch.autograd.grad(loss, outs + leaves, grad_outputs=_seed(k, loss), allow_unused=True)
    # the inputs are kept as the forward saw them (part of the graph: evaluate the identities under no_grad); the
    # gradients from autograd.grad do not require grad
    calls = [(name, args, torch.zeros_like(o) if e is None else e) for (name, args, o, _), e in zip(rec, es[: len(outs)])]
    grads = None
    if leaves:
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, es[len(outs):])]
    return Capture(calls, grads, stats)
