"""Rewriting activations for a CoB (seed 000 eq. 2: ``g(x) = tau * f(x / tau)``): the plan and its realisation.

An activation site of the structure needs rewriting when tau != 1 at a non-homogeneous activation or tau < 0 at
a ReLU-like one / max-pool (:func:`_site_active`).  :func:`_plan` decides how each active site is realised --
composing an existing ``TeleportedActivation`` wrapper or ``cob_tau_<node>`` buffer, wrapping a module called once
(``wrap``), or rewriting the fx graph (``graph``: function calls, shared modules) -- and :func:`_realise` applies
the plan to a model (a new ``torch.fx.GraphModule`` when some site needs the graph).  Used by
:func:`gradcond.teleport.teleport` and :func:`gradcond.teleport.functional_teleport`.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from gradcond.graph import CoBStructure
from gradcond.graph._modules import TeleportedActivation
from gradcond.utils import module_device

from .cob import CoB

__all__: list[str] = []

_NP_FLOAT = (torch.float32, torch.float64)
_EPS: dict = {}  # dtype -> machine epsilon (torch.finfo costs a call per use)


def _eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (0 for other dtypes), cached."""
    e = _EPS.get(dtype)
    if e is None:
        e = _EPS[dtype] = float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
    return e


def _get_module(root: nn.Module, path: str):
    """The submodule at ``path`` (through ``_modules``, no attribute fallbacks), or None."""
    m = root
    for part in path.split("."):
        sub = m._modules.get(part) if isinstance(m, nn.Module) else None
        if sub is None:
            return None
        m = sub
    return m


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at ``path`` (dotted, under ``root``) by ``new``."""
    parent_path, _, last = path.rpartition(".")
    parent = _get_module(root, parent_path) if parent_path else root
    if last in parent._modules:
        parent._modules[last] = new  # same effect as setattr for an existing submodule, without its checks
    else:
        setattr(parent, last, new)


def _parent_slot(root: nn.Module, path: str):
    """``(parent module, key)`` of the submodule at ``path`` (which exists: ``parent._modules[key]`` is it)."""
    parent_path, _, last = path.rpartition(".")
    return (_get_module(root, parent_path) if parent_path else root), last


def _buf_name(site) -> str:
    """Name of the tau buffer of a graph-rewritten site (on the returned ``GraphModule``)."""
    return f"cob_tau_{site.node}"


def _site_taus(structure: CoBStructure, ext: torch.Tensor) -> list:
    """The taus (or 1/taus) of every activation site, gathered from ``ext`` (one tensor per site)."""
    return [ext[s.gidx] for s in structure.sites]


def _site_active(site, tau: torch.Tensor) -> bool:
    """Whether ``site`` needs rewriting for these taus (scale sites: tau != 1; sign sites: tau < 0)."""
    if site.kind == "scale":
        return bool((tau != 1).any())
    return bool((tau < 0).any())


def _quick_active(structure: CoBStructure, cob: "CoB", ext64: torch.Tensor) -> bool:
    """Whether any activation site needs rewriting (cheap: sign sites only matter when some tau < 0)."""
    plan = structure._flat(ext64.device)
    if plan["scale_idx"] is not None and bool((torch.take(ext64, plan["scale_idx"]) != 1).any()):
        return True
    if cob._any_negative and plan["sign_idx"] is not None and bool((torch.take(ext64, plan["sign_idx"]) < 0).any()):
        return True
    return False


def _plan(model: nn.Module, structure: CoBStructure, taus: list, force_all: bool = False, active=None):
    """Decide how each active site is realised: 'compose_buffer', 'compose_wrapper', 'wrap' or 'graph'.
    ``active`` (optional): precomputed per-site activity flags (else computed from ``taus``)."""
    plan = []
    for i, (site, tau) in enumerate(zip(structure.sites, taus)):
        if not force_all and not (active[i] if active is not None else _site_active(site, tau)):
            continue
        if _buf_name(site) in model._buffers:
            plan.append(("compose_buffer", site, tau))
            continue
        mod = _get_module(model, site.module_path) if site.module_path else None
        if isinstance(mod, TeleportedActivation):
            plan.append(("compose_wrapper", site, tau))
        elif mod is not None and site.unique:
            plan.append(("wrap", site, tau))
        else:
            plan.append(("graph", site, tau))
    return plan


def _site_value(site, tau: torch.Tensor, dtype) -> torch.Tensor:
    """The buffer value of a site: tau (scale sites) or sign(tau) (sign sites), in ``dtype``."""
    t = tau if site.kind == "scale" else torch.sign(tau)
    return t.to(dtype)


def _realise(model: nn.Module, structure: CoBStructure, plan: list, dtype, final: bool = False,
             device=None) -> nn.Module:
    """Apply a plan to ``model`` (mutated; may return a new GraphModule wrapping it).  ``final``: the plan's
    values are already the buffer values (sign or tau, in ``dtype``, owned), as made by :meth:`_FastPlan.sites`.
    ``device``: the model's device when the caller knows it (all its ruled parameters are there), else found from
    the first parameter or buffer."""
    graph_sites = []
    composed, factors = [], []
    spare = structure._cache.setdefault("spare_wrappers", {})  # site node -> the wrapper last removed there
    # The taus come from the CoB (often drawn on the CPU); the wrappers and buffers live on the model's device.
    if device is None:
        device = module_device(model)
    for how, site, tau in plan:
        val = tau if final else _site_value(site, tau.detach(), dtype)
        if val.device != device:
            val = val.to(device)
        if how == "compose_buffer":
            buf = model._buffers[_buf_name(site)]
            buf.mul_(val.to(buf.dtype))
        elif how == "compose_wrapper":
            parent, key = _parent_slot(model, site.module_path)
            w = parent._modules[key]
            composed.append((parent, key, w, site.node))
            factors.append(val if val.dtype == w.tau.dtype else val.to(w.tau.dtype))
        elif how == "wrap":
            parent, key = _parent_slot(model, site.module_path)  # one walk for the read and the swap
            inner = parent._modules[key]
            w = spare.pop(site.node, None) if spare else None
            # reuse the wrapper this site had before it was unwrapped: only when it wraps this very module, and no
            # one else holds it (references: the local name and getrefcount's argument) or hooked it
            if w is not None and w.inner is inner and w.kind == site.kind and sys.getrefcount(w) == 2 \
                    and not w._forward_hooks and not w._forward_pre_hooks:
                w._buffers["tau"] = val if final else val.clone()
                w.training = inner.training
            else:
                w = TeleportedActivation._make(inner, val if final else val.clone(), site.kind)
            parent._modules[key] = w
        else:
            graph_sites.append((site, val))
    if composed:
        taus = [w.tau for _, _, w, _ in composed]
        torch._foreach_mul_(taus, factors)
        # composed back to the identity (all |tau - 1| <= 4 eps; sign taus are +-1, so exactly 1): restore the
        # user's module.  One batched max-norm for all wrappers (small CPU taus, up to a few hundred wrappers: numpy,
        # cheaper per call than four batched torch calls; mobilenet_v2 unwraps 35 at a time).
        if len(taus) <= 256 and all(t.device.type == "cpu" and t.dtype in _NP_FLOAT for t in taus):
            arrs = [(t.detach() if t.requires_grad else t).numpy() for t in taus]
            # one max over all wrappers: when it is within the threshold every wrapper returns to the identity (the
            # usual teleport-back case); otherwise each wrapper is decided on its own
            top = float(np.abs(np.concatenate(arrs) - 1).max(initial=0.0)) if len({a.dtype for a in arrs}) == 1 \
                else None
            if top is not None and top <= 4 * _eps(taus[0].dtype):
                dev = [top] * len(arrs)
            else:
                dev = [float(np.abs(a - 1).max(initial=0.0)) for a in arrs]
        else:
            dev = torch.stack(torch._foreach_norm(torch._foreach_sub(taus, 1), float("inf"))).tolist()
        for (parent, key, w, node), d in zip(composed, dev):
            if d <= 4 * _eps(w.tau.dtype):
                parent._modules[key] = w.inner
                spare[node] = w  # one spare wrapper per site (bounded), reused by the next wrap of this module
    if not graph_sites:
        return model
    graph = copy.deepcopy(structure.graph_module.graph)
    gm = fx.GraphModule(model, graph, class_name=f"Teleported{structure.model_class}")
    nodes = {n.name: n for n in gm.graph.nodes}
    for site, val in graph_sites:
        node = nodes[site.node]
        bname = _buf_name(site)
        gm.register_buffer(bname, val.clone())
        with gm.graph.inserting_before(node):
            t = gm.graph.get_attr(bname)
            x = node.args[0]
            x2 = gm.graph.call_function(torch.div if site.kind == "scale" else torch.mul, (x, t))
        node.args = (x2,) + tuple(node.args[1:])
        with gm.graph.inserting_after(node):
            y = gm.graph.call_function(torch.mul, (t, node))
        node.replace_all_uses_with(y, delete_user_cb=lambda u: u is not y)
    gm.graph.lint()
    gm.recompile()
    return gm
