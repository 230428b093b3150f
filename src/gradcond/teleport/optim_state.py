"""Optimizer state across a teleport: transport it to the new coordinates, reset it, or keep it.

A teleport by a change of basis (CoB) maps every parameter ``W`` to ``V = factor * W`` (per entry, the ``factor``
of :func:`gradcond.teleport.weight_scale_factors`, ``tau_out / tau_in`` for a weight).  By Theorem 5.1 of
seed 000 the gradient of the teleported network is ``dV = dW / factor`` entrywise (``tau_in / tau_out``), at every
point and for every batch.  Optimizer state that is a linear statistic of past gradients therefore has an exact
image in the new coordinates:

=====================  ==========================================  ==========================================
optimizer              state multiplied by ``1 / factor``          state multiplied by ``1 / factor**2``
=====================  ==========================================  ==========================================
SGD (momentum)         ``momentum_buffer``                         --
Adam / AdamW           ``exp_avg``                                 ``exp_avg_sq``, ``max_exp_avg_sq``
Adagrad                --                                          ``sum - initial_accumulator_value`` (*)
RMSprop                ``grad_avg`` (centered)                     ``square_avg``
=====================  ==========================================  ==========================================

Step counters (``step``) never change.  (*) Adagrad starts its sum at ``initial_accumulator_value``; only the
accumulated squared gradients scale, so the transported sum is ``iav + (sum - iav) / factor**2`` (exact).

``RMSprop.momentum_buffer`` accumulates ``g / (sqrt(square_avg) + eps)``; in new coordinates that is
``sign(factor) * g / (sqrt(square_avg) + eps * |factor|)``, so *decision*: it is multiplied by ``sign(factor)``,
exact when ``eps = 0`` and off by a relative ``O(eps / sqrt(square_avg))`` otherwise
(:attr:`TransportReport.exact` is False then).

"Exact" means: the transported state equals the state a fresh optimizer would have reached had it been fed the
gradients of the teleported network at the teleported images of the same iterates on the same batches (tested).
It does not make the trajectory equal to the untransported one -- no first-order optimizer is invariant under a
CoB (the update ``-lr * dV`` is not ``factor * (-lr * dW)``); teleportation changes the trajectory on purpose.

With ``weight_decay != 0`` the optimizers add ``weight_decay * W`` (a parameter, which scales by ``factor``) to the
gradient (which scales by ``1 / factor``), and the regularised loss is not CoB-invariant: no exact transport
exists; the state is still transported by the rules above and ``TransportReport.exact`` is False.

Modes: ``"transport"`` (the table above), ``"reset"`` (the moved parameters get the state of a freshly built
optimizer: SGD/Adam/AdamW/RMSprop state dropped, Adagrad sum refilled with ``initial_accumulator_value`` and step
set to 0; parameters whose factor is exactly 1 keep their state), ``"keep"`` (nothing changes: the old-coordinate
buffers are used as they are).

Supported optimizers: ``torch.optim.SGD``, ``Adam``, ``AdamW``, ``Adagrad``, ``RMSprop`` (and subclasses whose state
uses only the keys above).  Anything else -- or a state key not in the table -- raises ``TypeError`` /
``ValueError`` before anything is changed.  Cost: one elementwise multiply per state tensor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

__all__ = ["transport_optimizer_state", "check_optimizer_supported", "TransportReport", "MODES", "SUPPORTED"]

MODES = ("transport", "reset", "keep")

# optimizer class -> (keys scaled by 1/factor, keys scaled by 1/factor**2, keys scaled by sign(factor), keys kept)
_RULES: dict[type, tuple[tuple, tuple, tuple, tuple]] = {
    torch.optim.SGD: (("momentum_buffer",), (), (), ()),
    torch.optim.Adam: (("exp_avg",), ("exp_avg_sq", "max_exp_avg_sq"), (), ("step",)),
    torch.optim.AdamW: (("exp_avg",), ("exp_avg_sq", "max_exp_avg_sq"), (), ("step",)),
    torch.optim.Adagrad: ((), ("sum",), (), ("step",)),
    torch.optim.RMSprop: (("grad_avg",), ("square_avg",), ("momentum_buffer",), ("step",)),
}
SUPPORTED = tuple(c.__name__ for c in _RULES)


@dataclass
class TransportReport:
    """What :func:`transport_optimizer_state` did.

    ``params``: number of parameters whose state was changed; ``keys``: the state keys touched;
    ``exact``: False when no exact transport exists (weight decay, RMSprop momentum with eps > 0) or mode is
    ``keep``/``reset`` (which do not produce the new-coordinate state); ``notes``: why.
    """

    mode: str
    optimizer: str
    params: int = 0
    keys: list = field(default_factory=list)
    exact: bool = True
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _rules_for(optimizer) -> tuple:
    for cls in type(optimizer).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def check_optimizer_supported(optimizer, mode: str = "transport") -> None:
    """Raise ``ValueError`` / ``TypeError`` (one sentence) if ``optimizer`` cannot be handled in ``mode``.

    ``keep`` accepts every optimizer; ``transport`` and ``reset`` need one of :data:`SUPPORTED` with known state
    keys.  Changes nothing.
    """
    if mode not in MODES:
        raise ValueError(f"optimizer_state mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or None), got {type(optimizer).__name__}.")
    if mode == "keep":
        return
    rules = _rules_for(optimizer)
    if rules is None:
        raise TypeError(
            f"optimizer {type(optimizer).__name__} is not supported for optimizer_state={mode!r}; supported: "
            f"{', '.join(SUPPORTED)} (or use optimizer_state='keep')."
        )
    known = set().union(*rules)
    for p, st in optimizer.state.items():
        bad = sorted(set(st) - known)
        if bad:
            raise ValueError(
                f"{type(optimizer).__name__} state has unknown key(s) {', '.join(bad)} with no transport rule; "
                f"known keys: {', '.join(sorted(known))}."
            )


def _resolve(model: nn.Module, factors: dict) -> list:
    """[(name, param, factor)] for the factors given by parameter name (validated, nothing changed)."""
    if not isinstance(factors, dict):
        raise TypeError(f"factors must be a dict {{parameter name: factor}}, got {type(factors).__name__}.")
    params = dict(model.named_parameters())
    out = []
    for name, f in factors.items():
        if name not in params:
            raise ValueError(f"factor given for {name!r}, which is not a parameter of the model "
                             f"(parameters: {', '.join(list(params)[:6])}{', ...' if len(params) > 6 else ''}).")
        out.append((name, params[name], f))
    return out


def _check_factors(pairs: list) -> list:
    checked = []
    for name, p, f in pairs:
        f = torch.as_tensor(f)
        if not f.is_floating_point():
            f = f.to(torch.float64)
        fd = f.detach()
        if not bool(torch.isfinite(fd).all()) or bool((fd == 0).any()):
            raise ValueError(f"factor of {name!r} contains 0, NaN or inf; factors must be finite and non-zero.")
        try:
            ok = torch.broadcast_shapes(fd.shape, p.shape) == p.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"factor of {name!r} has shape {tuple(fd.shape)}, which does not broadcast to the "
                             f"parameter's shape {tuple(p.shape)}.") from None
        checked.append((name, p, fd.to(p.device)))  # CoB factors live on the CPU; the state sits with the parameter
    return checked


def transport_optimizer_state(optimizer, model: nn.Module, factors: dict, mode: str = "transport") -> TransportReport:
    """Bring ``optimizer``'s state to the coordinates of a teleport ``V = factors[name] * W`` (see module doc).

    ``factors``: ``{parameter name in model: factor}`` as returned by ``weight_scale_factors(structure, cob)``
    (factors broadcast to the parameter; names of ``model.named_parameters()`` *before* any activation rewrite --
    the parameter objects are looked up here).  Call it right after ``teleport(model, cob, inplace=True)`` (the
    order does not matter: only the state is touched).  ``mode``: ``"transport"`` | ``"reset"`` | ``"keep"``.

    Validation happens before any change: an unsupported optimizer, an unknown state key, a factor with 0/NaN/inf
    or of the wrong shape, or an unknown parameter name raises and leaves the optimizer unchanged.
    Returns a :class:`TransportReport`.  Cost: one elementwise multiply per state tensor.
    """
    check_optimizer_supported(optimizer, mode)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}.")
    return _transport_pairs(optimizer, _check_factors(_resolve(model, factors)), mode)


def _transport_pairs(optimizer, pairs: list, mode: str) -> TransportReport:
    """Apply ``mode`` given validated ``[(name, param, factor)]``; all new tensors are built before assignment."""
    rep = TransportReport(mode=mode, optimizer=type(optimizer).__name__ if optimizer is not None else "None")
    if mode != "transport":
        rep.exact = False
        rep.notes.append(f"mode {mode!r} does not produce the new-coordinate state")
    if optimizer is None or mode == "keep":
        return rep
    lin, sq, sgn, _ = _rules_for(optimizer)
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    moved = [(n, p, f) for n, p, f in pairs if not bool((f == 1).all())]
    updates = []  # (param, key, new value) or (param, None, None) for deletion
    keys = set()
    for name, p, f in moved:
        if p not in optimizer.state or id(p) not in groups:
            continue
        st, g = optimizer.state[p], groups[id(p)]
        if mode == "reset":
            if isinstance(optimizer, torch.optim.Adagrad):
                updates.append((p, "sum", torch.full_like(p, g["initial_accumulator_value"])))
                step = st.get("step")
                updates.append((p, "step", torch.zeros_like(step) if torch.is_tensor(step) else 0.0))
                keys.update(("sum", "step"))
            else:
                updates.append((p, None, None))
                keys.update(st)
            continue
        if g.get("weight_decay", 0):
            if rep.exact:
                rep.notes.append("weight_decay != 0: the regularised loss is not CoB-invariant; no exact transport")
            rep.exact = False
        for key, val in st.items():
            if not torch.is_tensor(val) or key == "step":
                continue
            fk = f.to(device=val.device)
            if key in lin:
                new = (val.to(torch.float64) / fk.to(torch.float64)).to(val.dtype)
            elif key in sq:
                f2 = fk.to(torch.float64) ** 2
                if key == "sum" and isinstance(optimizer, torch.optim.Adagrad):
                    iav = float(g["initial_accumulator_value"])
                    new = (iav + (val.to(torch.float64) - iav) / f2).to(val.dtype)
                else:
                    new = (val.to(torch.float64) / f2).to(val.dtype)
            elif key in sgn:
                new = val * torch.sign(fk).to(val.dtype)
                if g.get("eps", 0):
                    if not any("RMSprop" in n for n in rep.notes):
                        rep.notes.append("RMSprop momentum_buffer with eps > 0: transported by sign(factor), "
                                         "exact only for eps = 0")
                    rep.exact = False
            else:
                continue
            updates.append((p, key, new.expand_as(val).clone() if new.shape != val.shape else new))
            keys.add(key)
    touched = set()
    for p, key, new in updates:
        touched.add(id(p))
        if key is None:
            del optimizer.state[p]
        else:
            optimizer.state[p][key] = new
    rep.params = len(touched)
    rep.keys = sorted(keys)
    return rep
