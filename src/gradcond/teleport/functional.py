"""Differentiable teleports for ``torch.func.functional_call`` (no model is built, hence no self-check).

* :func:`needs_rewrite`: whether a CoB must rewrite some activation (tau != 1 at a non-homogeneous activation, or
  tau < 0 at a ReLU-like one).
* :func:`teleported_params`: ``{name: V}`` (differentiable w.r.t. the CoB and the weights), exact with
  ``functional_call(model, ...)`` when no activation needs rewriting.
* :func:`functional_teleport` -> :class:`TeleportFunctional`: a copy of the model whose activations are already
  rewritten with tau = 1, so ``state(cob)`` (parameters and activation taus) is exact for every CoB.

They use the same rules as :func:`gradcond.teleport.teleport` but run no forward: only ``teleport``, which returns
a model, verifies the function.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gradcond.graph import CoBStructure
from gradcond.graph._modules import TeleportedActivation, repair_deepcopy

from .cob import CoB, _check_same, _factor, _params_checked, weight_scale_factors
from .rewrite import _buf_name, _get_module, _plan, _realise, _site_active, _site_taus
from .scaling import _scaled

__all__ = ["needs_rewrite", "teleported_params", "functional_teleport", "TeleportFunctional"]


def needs_rewrite(structure: CoBStructure, cob: CoB) -> bool:
    """True when teleporting by ``cob`` must rewrite some activation (tau != 1 at a non-homogeneous
    activation, or tau < 0 at a ReLU-like activation / max-pool)."""
    _check_same(structure, cob)
    ext = cob.ext().detach()
    return any(_site_active(s, t) for s, t in zip(structure.sites, _site_taus(structure, ext)))


def teleported_params(model: nn.Module, structure: CoBStructure, cob: CoB, *, check: bool = True) -> dict:
    """``{name: V}`` for every parameter of ``model`` (differentiable w.r.t. the CoB and the weights).

    ``torch.func.functional_call(model, teleported_params(...), x)`` computes the teleported function only when no
    activation needs rewriting (:func:`needs_rewrite` is False): otherwise this raises ``ValueError`` (set
    ``check=False`` to skip the test) -- use :func:`functional_teleport` then.
    """
    _check_same(structure, cob)
    if check and needs_rewrite(structure, cob):
        raise ValueError("this CoB needs activation rewriting (tau != 1 at a non-homogeneous activation or tau < 0 at "
                         "a ReLU-like one); use functional_teleport(model, structure).state(cob) instead.")
    params = _params_checked(model, structure)
    if not torch.is_grad_enabled() or not (cob.tau.requires_grad or any(p.requires_grad for p in params.values())):
        out = dict(params)
        out.update(_scaled(structure, cob, params, inplace=False))
        return out
    fac = weight_scale_factors(structure, cob)
    return {name: (p * fac[name].to(p.dtype) if name in structure.rules else p) for name, p in params.items()}


class TeleportFunctional:
    """A copy of a model in which every activation that a CoB might rewrite is already rewritten with tau = 1.

    ``state(cob)`` returns the parameters and activation taus of the teleported model (differentiable w.r.t. the
    CoB), so ``torch.func.functional_call(self.module, self.state(cob), inputs)`` is exact for every CoB of the
    structure; ``self(cob, *inputs)`` does that call.
    """

    def __init__(self, module: nn.Module, structure: CoBStructure, buffers: dict):
        self.module = module
        self.structure = structure
        self._buffers = buffers  # buffer name -> site index

    def state(self, cob: CoB) -> dict:
        _check_same(self.structure, cob)
        ext = cob.ext()
        out = {}
        for name, p in self.module.named_parameters():
            rule = self.structure.rules.get(name)
            out[name] = p * _factor(ext, rule).to(p.dtype) if rule is not None else p
        for bname, i in self._buffers.items():
            site = self.structure.sites[i]
            t = ext[site.gidx]
            buf = _get_module_buffer(self.module, bname)
            if site.kind == "sign":
                t = torch.sign(t.detach())
            out[bname] = buf * t.to(buf.dtype)
        return out

    def __call__(self, cob: CoB, *inputs):
        return torch.func.functional_call(self.module, self.state(cob), inputs)


def _get_module_buffer(root, name):
    """The buffer named ``name`` (dotted path) under ``root``."""
    path, _, last = name.rpartition(".")
    m = _get_module(root, path) if path else root
    return getattr(m, last)


def functional_teleport(model: nn.Module, structure: CoBStructure) -> TeleportFunctional:
    """Rewritable copy of ``model`` for differentiable teleports (see :class:`TeleportFunctional`)."""
    _params_checked(model, structure)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    ones = [torch.ones(s.gidx.shape, dtype=torch.float64) for s in structure.sites]
    base = repair_deepcopy(model, copy.deepcopy(model))
    plan = _plan(base, structure, ones, force_all=True)
    # compose on existing wrappers is a no-op with tau = 1; realise the rest with tau = 1
    mod = _realise(base, structure, [p for p in plan if p[0] in ("wrap", "graph")], dtype)
    buffers = {}
    for i, site in enumerate(structure.sites):
        if _buf_name(site) in mod._buffers:
            buffers[_buf_name(site)] = i
        elif site.module_path and isinstance(_get_module(mod, site.module_path), TeleportedActivation):
            buffers[f"{site.module_path}.tau"] = i
    return TeleportFunctional(mod, structure, buffers)
