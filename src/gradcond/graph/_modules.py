"""What teleportation puts into a model, and the repair every model copy it makes goes through.

:class:`TeleportedActivation` replaces an activation module that must be rewritten; :func:`repair_deepcopy` undoes
a torch bug in ``copy.deepcopy`` of ``nn.TransformerDecoderLayer`` (teleport, pseudo-teleport and the functional
teleport copy the user's model with it).
"""

from __future__ import annotations

import torch
from torch import nn


class TeleportedActivation(nn.Module):
    """The teleported form of an activation module (seed 000, eq. 2), per neuron / channel.

    ``kind="scale"``: ``g(x) = tau * f(x / tau)`` -- any elementwise ``f`` (tanh, GELU, SELU, ...).
    ``kind="sign"``:  ``g(x) = s * f(s * x)`` with ``s = sign(tau)`` stored in ``tau`` -- for positively homogeneous,
    per-channel ``f`` (ReLU, LeakyReLU, PReLU, max-pooling), for which ``tau * f(x / tau) == s * f(s * x)`` exactly
    (no rounding: only signs flip).  For ReLU and s = -1 this is ``min(0, x)`` (seed 000, Sec. 3).

    ``tau`` is a buffer (saved in ``state_dict``) of the shape that broadcasts against the activation's input
    (e.g. ``(C,)`` after a Linear, ``(C, 1, 1)`` after a Conv2d).  The wrapped module is ``self.inner`` (so the
    slope of a wrapped ``PReLU`` is named ``<path>.inner.weight``).
    """

    def __init__(self, inner: nn.Module, tau: torch.Tensor, kind: str):
        super().__init__()
        if kind not in ("scale", "sign"):
            raise ValueError(f"kind must be 'scale' or 'sign', got {kind!r}.")
        self.training = inner.training
        self.inner = inner
        self.kind = kind
        self.register_buffer("tau", tau.detach().clone())

    @classmethod
    def _make(cls, inner: nn.Module, tau: torch.Tensor, kind: str) -> "TeleportedActivation":
        """Same result as ``cls(inner, tau, kind)`` (``tau`` is used as is, not copied; ``training`` follows
        ``inner``) without ``nn.Module.__init__``: the instance dict is a copy of a template's, with fresh
        containers.  Used on the teleport hot path (a few microseconds instead of ~15)."""
        tmpl = cls.__dict__.get("_template_state")
        if tmpl is None:
            t = cls(nn.Identity(), torch.ones(1), "scale").__dict__
            # the template's state and the names of its containers (copied per instance, never shared)
            tmpl = (t, [k for k, v in t.items() if isinstance(v, (dict, set, list))])
            type.__setattr__(cls, "_template_state", tmpl)
        tmpl, containers = tmpl
        obj = cls.__new__(cls)
        state = tmpl.copy()
        for k in containers:
            state[k] = tmpl[k].copy()
        state["_modules"]["inner"] = inner
        state["_buffers"]["tau"] = tau.detach()
        state["kind"] = kind
        state["training"] = inner.training
        obj.__dict__.update(state)
        return obj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "scale":
            return self.tau * self.inner(x / self.tau)
        return self.tau * self.inner(self.tau * x)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, tau_shape={tuple(self.tau.shape)}"


def repair_deepcopy(source: nn.Module, copied: nn.Module) -> nn.Module:
    """Undo a torch bug in ``copy.deepcopy`` of ``nn.TransformerDecoderLayer`` (torch 2.x): its ``__setstate__``
    puts ``activation = F.relu`` into the instance dict when ``activation`` is a submodule (kept in
    ``_modules``), so the copy silently computes relu instead of the user's GELU/Tanh/....  Removes every
    instance attribute of a module of ``copied`` that shadows a submodule, parameter or buffer of the same name,
    unless the module of the same path in ``source`` has that instance attribute too (then the source computes
    the same thing, e.g. the clones inside ``nn.TransformerDecoder``, which torch itself deep-copies).
    ``copied`` is a deep copy of ``source``.  Returns ``copied`` (mutated).  Cost: one walk over the modules;
    only classes with their own ``__setstate__`` are inspected."""
    src = None
    for name, b in copied.named_modules():
        if type(b).__setstate__ is nn.Module.__setstate__:
            continue
        shadow = [k for k in b.__dict__ if k in b._modules or k in b._parameters or k in b._buffers]
        if not shadow:
            continue
        if src is None:
            src = dict(source.named_modules())
        a = src.get(name)
        for k in shadow:
            if a is not None and k not in a.__dict__:
                del b.__dict__[k]
    return copied
