"""Step 1 of the per-sample path: the **layer plan** -- which module owns each trainable parameter, and what is known
about a model before any pass runs.

The per-sample code reads in one direction, one file into the next:

1. :mod:`~gradcond.probes.per_sample.plan` (this file): :class:`LayerPlan` (which module owns each trainable
   parameter; cached per model object), the forwards the identities describe (:func:`plain_forward`), the losses
   whose batch value times b is Σ_i ℓ_i (:func:`is_batch_mean_loss`), and what is remembered per model (the layer
   path failed / was validated);
2. :mod:`~gradcond.probes.per_sample.capture`: ONE batched forward and ONE backward to the outputs of every
   parameter-owning module, giving per module call its inputs ``a`` and output gradients ``e``;
3. :mod:`~gradcond.probes.per_sample.identities`: per-sample gradients, squared norms and Gram matrices of each layer
   from ``(a, e)`` (Linear/Conv outer products, Embedding rows, norm-layer closed forms, a per-module ``vmap`` fallback),
   and the first-use check of those identities against autograd;
4. :mod:`~gradcond.probes.per_sample.engine`: the :class:`~gradcond.probes.per_sample.Engine` (eval mode, BatchNorm
   policy, losses, batch gradients, ``vmap(grad)`` for what the layer path cannot do) and :func:`per_sample_stats`.

Nothing here runs the model.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from gradcond import losses as _L

__all__ = ["BN_TYPES", "LayerPlan", "Unsupported", "is_batch_mean_loss", "is_validated", "layer_plan",
           "mark_unsupported", "mark_validated", "plain_forward"]

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


class Unsupported(Exception):
    """The layer path cannot handle this model; the engine falls back to vmap(grad)."""


# per model object (weak references, so models are not kept alive): why the layer path failed, for which trainable
# names; and the trainable names whose identities passed the first-use check
_UNSUPPORTED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_VALIDATED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_IGNORED = WeakTensorKeyDictionary()  # target tensor -> (version, ignore_index, any target == ignore_index)


def mark_unsupported(model: nn.Module, names, reason: str) -> None:
    """Remember that the layer path failed on ``model`` (with these trainable names) and why."""
    _UNSUPPORTED[model] = (tuple(names), reason)


def mark_validated(model: nn.Module, names) -> None:
    """Remember that the identities passed the first-use check on ``model`` (with these trainable names)."""
    _VALIDATED[model] = tuple(names)


def is_validated(model: nn.Module, names) -> bool:
    return _VALIDATED.get(model) == tuple(names)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# the forwards whose per-sample gradients the identities describe; a subclass that overrides them (a masked Linear, a
# custom conv) computes something else and takes the fallback
_PLAIN_FORWARDS = {
    nn.Linear: (nn.Linear.forward,),
    nn.Conv1d: (nn.Conv1d.forward, nn.Conv1d._conv_forward),
    nn.Conv2d: (nn.Conv2d.forward, nn.Conv2d._conv_forward),
    nn.Embedding: (nn.Embedding.forward,),
    nn.modules.batchnorm._BatchNorm: (nn.modules.batchnorm._BatchNorm.forward,),
    nn.SyncBatchNorm: (nn.SyncBatchNorm.forward,),
    nn.LayerNorm: (nn.LayerNorm.forward,),
    nn.GroupNorm: (nn.GroupNorm.forward,),
}
_PLAIN_CACHE: dict[tuple, bool] = {}


def plain_forward(mod: nn.Module) -> bool:
    """True when ``mod`` is one of the supported classes and computes that class's own forward (decided per class;
    an instance whose ``forward`` was replaced on the object itself is never plain)."""
    if "forward" in mod.__dict__ or "_conv_forward" in mod.__dict__:
        return False
    cls = type(mod)
    key = (cls, cls.forward, getattr(cls, "_conv_forward", None))  # a class patched later gets a new key
    hit = _PLAIN_CACHE.get(key)
    if hit is None:
        hit = False
        for base, fns in _PLAIN_FORWARDS.items():
            if issubclass(cls, base):
                names = ("forward", "_conv_forward")[: len(fns)]
                if all(getattr(cls, n) is f for n, f in zip(names, fns)):
                    hit = True
                    break
        _PLAIN_CACHE[key] = hit
    return hit


class LayerPlan:
    """Which module owns each trainable parameter (its *direct* parameter), for the layer path.

    ``modules``: module name -> module; ``params``: module name -> {local name: full name}; ``ok`` is False (with
    ``reason``) when the layer path cannot be used: a parameter owned by the root module, a parameter shared between
    modules, or the model previously failed at run time (remembered per model object)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.modules: dict[str, nn.Module] = {}
        self.params: dict[str, dict[str, str]] = {}
        self.ok, self.reason = True, ""
        trainable = set(names)
        seen: dict[int, str] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for pname, p in mod.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                full = _join(mname, pname)
                if id(p) in seen and seen[id(p)] != full or full not in trainable:
                    self.ok, self.reason = False, f"parameter {full!r} is shared between modules"
                    return
                seen[id(p)] = full
                if not mname:
                    self.ok, self.reason = False, f"parameter {pname!r} belongs to the root module"
                    return
                self.modules[mname] = mod
                self.params.setdefault(mname, {})[pname] = full
        bad = _UNSUPPORTED.get(model)
        if bad is not None and bad[0] == tuple(names):
            self.ok, self.reason = False, bad[1]

    @staticmethod
    def module_tensors(name: str, params: dict, buffers: dict) -> dict[str, torch.Tensor]:
        """Parameters and buffers below module ``name``, keyed relative to it (for functional_call on the module)."""
        pre = name + "."
        out = {k[len(pre):]: v for k, v in params.items() if k.startswith(pre)}
        out.update({k[len(pre):]: v for k, v in buffers.items() if k.startswith(pre)})
        return out


def layer_plan(model: nn.Module, names: list[str], param_ids: tuple) -> LayerPlan:
    """The model's :class:`LayerPlan`, cached per model object while its trainable parameters (names and tensor
    identities) are unchanged, so repeated metric calls do not re-walk the module tree."""
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == (tuple(names), param_ids) and cached[1].ok:
        bad = _UNSUPPORTED.get(model)
        if bad is None or bad[0] != tuple(names):
            return cached[1]
    plan = LayerPlan(model, names)
    _PLANS[model] = ((tuple(names), param_ids), plan)
    return plan


def is_batch_mean_loss(loss_fn, out: torch.Tensor, y: torch.Tensor) -> bool:
    """True when ``loss_fn(out, y)`` is *known* to be the plain mean of the per-sample losses
    ``ℓ_i = loss_fn(out[i:i+1], y[i:i+1])``, so that Σ_i ℓ_i = b · loss_fn(out, y):

    * ``F.cross_entropy``, ``gradcond.losses`` ``cross_entropy`` and ``nn.CrossEntropyLoss`` (mean reduction, no class
      weights): with class-index targets none may equal ``ignore_index`` (those are dropped from the batch mean);
    * ``F.mse_loss`` / ``nn.MSELoss`` (mean reduction) with ``y`` shaped like ``out``; ``gradcond.losses`` ``mse`` (which
      reshapes ``y``) with as many entries as ``out``; ``gradcond.losses`` ``dot`` with ``y`` shaped like ``out``.

    Anything else (user losses, weighted or summed reductions) returns False and is evaluated per sample."""
    f = loss_fn
    if isinstance(f, nn.CrossEntropyLoss):
        if f.reduction != "mean" or f.weight is not None:
            return False
        ignore = f.ignore_index
    elif f is F.cross_entropy or f is _L.cross_entropy:
        ignore = -100
    elif isinstance(f, nn.MSELoss):
        return f.reduction == "mean" and y.shape == out.shape
    elif f is F.mse_loss:
        return y.shape == out.shape
    elif f is _L.mse:
        return y.numel() == out.numel() and y.is_floating_point()
    elif f is _L.dot_error:
        return y.shape == out.shape
    else:
        return False
    if out.ndim < 2 or y.shape[0] != out.shape[0]:
        return False
    if y.is_floating_point():  # class probabilities: every sample counts with weight 1
        return y.shape == out.shape
    # whether a target equals ignore_index, remembered per target tensor and version (a comparison and a host sync
    # saved on every later call with the same targets, e.g. a probe batch measured during training)
    hit = _IGNORED.get(y)
    if hit is None or hit[0] != y._version or hit[1] != ignore:
        hit = (y._version, ignore, bool((y == ignore).any()))
        _IGNORED[y] = hit
    return not hit[2]
