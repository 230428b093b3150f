"""First-order Taylor truncation of the bottom layers around the initial network (seed 003 App. G, Fig. 2F).

Every layer is split by the residual trick into ``f_l = i_l + r_l`` with ``i_l = f_l(theta_l(0), .)`` and
``r_l(v) = f_l(theta_l, v) - f_l(theta_l(0), v)``. The truncated bottom block is (App. G)

    T_L = f_L(theta_L, X)
    T_l = i_l(T_{l+1}) + r_l(i_{l+1}(X)) + D r_l(i_{l+1}(X)) [delta_{l+1}],
    delta_l = D i_l(i_{l+1}(X)) [delta_{l+1}] + r_l(i_{l+1}(X)),   delta_{L+1} = 0,

where ``delta`` is the first-order change of the initial network's activations caused by the residual functions
below (notes/003 §1.8: for a linear layer ``D r_l[delta] = dW_l delta``). ``delta`` and the initial activations are
carried by ``torch.func.jvp`` through the initial network: about three forward passes per truncated layer.
Products of more than two residual functions inside the truncated block are dropped (compositional depth of
the block: 2). For a residual block ``skip(x) + branch(x)`` (modules with ``skip``/``branch`` attributes) the
three quantities pass through branch and skip separately and are added, i.e. ``s(T_m)`` is added where the skip
ends (App. G, ResNet). Layers above the cut run normally (trained parameters) on ``T``.

Decisions: ``bottom_k`` counts linear layers (Linear/Conv, not skip matrices) from the input; when the k-th one
lies inside a residual block the whole block is truncated. Buffers (BatchNorm running statistics) are shared by
``i`` and ``f`` (only parameters have an initial value); a train-mode BatchNorm normalises ``T`` and ``i(X)``
with their own batch statistics, and its buffers are restored after every call.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jvp

from . import _hooks as H

__all__ = ["TaylorTruncated", "taylor_truncate"]


def _is_block(m: nn.Module) -> bool:
    return hasattr(m, "skip") and hasattr(m, "branch")


def _count_linear(m: nn.Module) -> int:
    if _is_block(m):
        return _count_linear(m.branch)
    if H.layer_kind(m) == "linear":
        return 1
    return sum(_count_linear(c) for c in m.children())


class TaylorTruncated(nn.Module):
    """The network with its bottom ``n_children`` top-level children replaced by their first-order Taylor
    expansion around ``theta0``; ``replaced_linear`` linear layers are inside the truncated block."""

    def __init__(self, model: nn.Sequential, theta0: dict, n_children: int, replaced_linear: int):
        super().__init__()
        self.model = model
        self.theta0 = theta0
        self.n_children = n_children
        self.replaced_linear = replaced_linear

    def _step(self, mod: nn.Module, prefix: str, T, a, d):
        if isinstance(mod, nn.Sequential):
            for name, c in mod.named_children():
                T, a, d = self._step(c, f"{prefix}{name}.", T, a, d)
            return T, a, d
        if _is_block(mod):
            tb, ab, db = self._step(mod.branch, f"{prefix}branch.", T, a, d)
            ts, as_, ds = self._step(mod.skip, f"{prefix}skip.", T, a, d)
            return tb + ts, ab + as_, db + ds
        params = dict(mod.named_parameters())
        bufs = dict(mod.named_buffers())

        def call(p, v):
            # fresh buffer copies per call: a train-mode BatchNorm updates its running statistics in place, which
            # torch.func refuses on a captured tensor (and a measurement must not write the user's buffers anyway)
            return functional_call(mod, {**p, **{k: b.clone() for k, b in bufs.items()}}, (v,)) if bufs else \
                functional_call(mod, p, (v,))

        if not params:
            a_new, d_new = jvp(lambda v: call({}, v), (a,), (d,))
            return call({}, T), a_new, d_new
        p0 = {k: self.theta0[prefix + k] for k in params}

        def i_fn(v):
            return call(p0, v)

        def r_fn(v):
            return call(params, v) - i_fn(v)

        a_new, di = jvp(i_fn, (a,), (d,))
        r_a, dr = jvp(r_fn, (a,), (d,))
        return i_fn(T) + r_a + dr, a_new, di + r_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        children = list(self.model.named_children())
        with H.measurement(self.model):
            T, a, d = x, x, torch.zeros_like(x)
            for name, c in children[: self.n_children]:
                T, a, d = self._step(c, f"{name}.", T, a, d)
            for _, c in children[self.n_children :]:
                T = c(T)
        return T


def taylor_truncate(model: nn.Module, theta0, bottom_k: int) -> TaylorTruncated:
    """Replace the bottom ``bottom_k`` linear layers of ``model`` (an ``nn.Sequential``, e.g. a zoo ``mlp`` or
    ``resnet_mlp``) and the unparametrised layers among them by their first-order Taylor expansion around the
    initial parameters ``theta0`` (App. G); returns a callable module. The compositional depth drops by about
    ``bottom_k - 2`` (main text).

    ``theta0``: the initial parameters, as a mapping ``{parameter name: tensor}`` (e.g. a copy of
    ``dict(model.named_parameters())`` or of ``model.state_dict()`` taken at initialisation) or an ``nn.Module``
    copy of the initial network. The returned module shares ``model`` (later changes to it are seen).
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"taylor_truncate needs an nn.Sequential chain of layers (e.g. gradcond.zoo mlp / "
                        f"resnet_mlp), got {type(model).__name__}.")
    if isinstance(theta0, nn.Module):
        theta0 = dict(theta0.named_parameters())
    if not isinstance(theta0, dict):
        raise TypeError(f"theta0 must be a dict of initial parameters or an nn.Module, got {type(theta0).__name__}.")
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in theta0]
    if missing:
        raise ValueError(f"theta0 lacks initial values for {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}; "
                         f"pass every parameter of the model.")
    params = dict(model.named_parameters())
    bad = [n for n in names if tuple(theta0[n].shape) != tuple(params[n].shape)]
    if bad:
        raise ValueError(f"theta0 shapes differ from the model's for {', '.join(bad[:5])}.")
    theta0 = {n: theta0[n].detach().clone().to(params[n].dtype) for n in names}
    total = _count_linear(model)
    if not isinstance(bottom_k, int) or not 1 <= bottom_k <= total:
        raise ValueError(f"bottom_k must be an integer between 1 and the number of linear layers ({total}), got {bottom_k!r}.")
    seen, n_children = 0, 0
    for c in model.children():
        n_children += 1
        seen += _count_linear(c)
        if seen >= bottom_k:
            break
    return TaylorTruncated(model, theta0, n_children, seen)
