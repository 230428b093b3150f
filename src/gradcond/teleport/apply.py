"""Applying a change of basis to a model (seed 000, Armenta et al.): :func:`teleport`, verified.

Teleporting maps every weight ``w_ab`` (neuron a -> b) to ``v_ab = tau_b / tau_a * w_ab`` (seed 000 eq. 1;
biases: ``* tau_b``; norm gamma/beta: ``* tau_out``) and every activation ``f`` to ``g(x) = tau * f(x / tau)``
(eq. 2), so the network function is unchanged (Theorem 2.1) while gradients scale inversely, ``dV = dW / factor``
(Theorem 5.1).  :func:`teleport` scales the parameters (:mod:`gradcond.teleport.scaling`), rewrites the activations
that need it (:mod:`gradcond.teleport.rewrite`) and checks the result: the original and teleported outputs are
compared on the analysis example (and ``check_inputs``); beyond :func:`check_tolerance` it raises
``TeleportError`` (``gradcond.teleport.TeleportError``) and the model is unchanged.  Cost of the check: one
forward pass of each model on the (small) check input.

What ``teleport`` returns
-------------------------
* No activation needs rewriting (positively homogeneous activations with tau > 0, or non-homogeneous
  activations whose tau is pinned): a deep copy of the user's model, same class, only parameter values differ --
  its ``state_dict`` loads into a fresh instance of the user's class and computes the same function (BatchNorm
  included: BN inputs are pinned, running statistics untouched).
* Activation modules called once that need rewriting (``nn.Tanh``, ``nn.ReLU`` with tau < 0, ``nn.MaxPool2d``
  with tau < 0...): the same class, with those submodules replaced by :class:`TeleportedActivation` wrappers
  (``state_dict`` gains ``<path>.tau`` buffers; a wrapped ``PReLU`` slope becomes ``<path>.inner.weight``).
  Teleporting again composes the wrapper's tau; a wrapper whose tau returns to 1 is removed.
* Activations that are function calls (``F.relu`` in a ``forward``) or modules called at several places with
  different taus: a ``torch.fx.GraphModule`` (same parameter names) whose graph computes ``tau * f(x / tau)``
  with buffers ``cob_tau_<node>``.  This needs ``inplace=False``.
Parameters keep their ``requires_grad``; ``.grad`` is not copied.  Buffers (BatchNorm statistics) never change.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from gradcond.graph import CoBStructure
from gradcond.graph._modules import TeleportedActivation, repair_deepcopy

from gradcond.utils import output_tensors, split_inputs

from .cob import CoB, _params_checked
from .errors import TeleportError  # one exception class for every teleport failure (model restored)
from .rewrite import _buf_name, _get_module, _plan, _quick_active, _realise, _set_module, _site_taus
from .scaling import _fast_plan, _ruled_params, _rule_order, _scaled, _scaled_half

__all__ = ["teleport", "check_tolerance"]

_HALF = (torch.float16, torch.bfloat16)


def teleport(model: nn.Module, cob: CoB, inplace: bool = False, *, check: bool = True,
             check_inputs=None) -> nn.Module:
    """Teleport ``model`` by ``cob`` (seed 000 eqs. 1-2): same network function, new weights -- verified.

    Returns a new module (``inplace=False``; parameters are new tensors, buffers copied) or ``model`` itself
    (``inplace=True``: parameters multiplied in place, so optimizers keep referring to them; activation modules
    swapped in their parents).  See the module docstring for the returned class.  ``ValueError`` (model
    unchanged) on a CoB of another structure, non-finite / zero taus, violated sign constraints, a model that
    does not match the structure, or ``inplace=True`` when a function-call activation would need rewriting.

    Self-check (``check=True``, the default): the original and the teleported model are run on the analysis
    example (``structure.example_input`` and ``example_kwargs``) and on ``check_inputs`` (optional: a tensor, a
    tuple of positional inputs or a dict of keyword inputs, e.g. the batch at hand), in eval mode under
    ``torch.no_grad()`` (no BatchNorm buffer changes; dropout off; the global RNG state is restored after each
    forward so random ops see the same numbers).  When some floating output deviates by more than
    :func:`check_tolerance` (relative: ``max|f - f_tp| / max|f|``), ``TeleportError`` is raised naming the
    output with the largest deviation, and the model is left unchanged (``inplace=True``:
    parameters, activation modules and wrapper taus are restored exactly).  Only the outputs the structure
    preserves are compared (``analyze(..., output=)``: a ``ModelOutput``'s logits by default, else every tensor;
    :func:`gradcond.utils.output_tensors`).  Non-floating outputs are not compared;
    a structure without ``example_input`` (not made by ``analyze``) is checked on ``check_inputs`` only.
    Cost of the check: one forward pass of the original and one of the teleported model per check input (keep the
    analysis example small: a batch of 2 is enough), plus, for ``inplace=True``, a copy of the parameters the
    teleport changes (for the restore).  ``check=False`` skips it: preserving the function is then the caller's
    responsibility.

    float16 / bfloat16 parameters are scaled in float64 and rounded once to their dtype (not in half precision);
    the first checked teleport of a structure warns with the measured relative output change.

    Cost without the check: a fixed number of vectorised calls (one gather of every factor term from the lookup
    table into a cached buffer; float64: ``K - 1`` batched products for rules of ``K`` terms and one batched
    multiply of all parameters, bit-identical to ``W * weight_scale_factors(...)``; other dtypes: ``K`` batched
    in-place multiplies by the terms themselves -- no weight-sized factor is ever allocated, results within a few
    ulps of the definition: a weight with an output and an input tau takes two passes by small row / column
    vectors, each at about copy speed), whatever the number of parameters.  Plus the module copy when ``inplace=False`` and one module swap per
    activation that must be rewritten (a wrapper removed when its tau returned to 1 is reused when that site is
    wrapped again, unless someone else still holds it).  Plans are cached per (structure, device, dtype); the full
    parameter name/shape check runs once per model (later calls compare parameter identities and shapes).  The
    finiteness re-check of tau (one reduction) is skipped when the CoB's tau tensor is unchanged since the CoB
    validated it (its autograd version counter; edits that bypass it -- ``tau.data[...] = ``, writes through a numpy
    view -- are then not re-checked: with ``check=True`` such a tau is still caught by the self-check and the model
    restored).
    """
    if not check:
        return _teleport(model, cob, inplace)
    if not isinstance(cob, CoB):
        raise TypeError(f"teleport expects a CoB as second argument, got {type(cob).__name__}.")
    structure = cob.structure
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}.")
    _ruled_params(model, structure, _rule_order(structure))  # model vs structure first (ValueError, cached)
    inputs = _check_inputs(model, structure, check_inputs)
    if not inputs:  # a hand-made structure without an example, and no batch: say so rather than pass silently
        warnings.warn("teleport could not verify the function: the structure keeps no analysis example and no "
                      "check_inputs were given; pass check_inputs=<a batch> to verify.", RuntimeWarning, stacklevel=2)
        return _teleport(model, cob, inplace)
    ref = []
    for where, x in inputs:
        try:
            ref.append(_eval_forward(model, x))
        except Exception as exc:  # noqa: BLE001 -- nothing changed yet
            raise ValueError(f"teleport's self-check could not run the model on {where}: {type(exc).__name__}: "
                             f"{exc}. Pass check_inputs that the model accepts, or check=False (then preserving "
                             "the function is your responsibility); the model is unchanged.") from exc
    snap = _snapshot(model, structure) if inplace else None
    try:
        out = _teleport(model, cob, inplace)
    except BaseException:
        if snap is not None:
            _restore(model, snap)
        raise
    try:
        new = [_eval_forward(out, x) for _, x in inputs]
        worst = None
        for (where, _), a, b in zip(inputs, ref, new):
            for name, dev in _deviations(a, b, getattr(structure, "output", None)):
                if worst is None or dev > worst[0]:
                    worst = (dev, name, where)
    except BaseException:
        if snap is not None:
            _restore(model, snap)
        raise
    dtype = _model_dtype(model)
    tol = check_tolerance(dtype, structure)
    if worst is not None and not worst[0] <= tol:
        if snap is not None:
            _restore(model, snap)
        raise TeleportError(
            f"teleport would change the model's function: {worst[1]} deviates by {worst[0]:.3g} (relative, "
            f"max|f - f_tp| / max|f|) on {worst[2]}, above the {str(dtype).replace('torch.', '')} tolerance "
            f"{tol:.3g}; the model is unchanged. Some construct escaped the analysis (see structure.frozen); "
            "please report it."
        )
    if dtype in (torch.float16, torch.bfloat16) and worst is not None and not structure._cache.get("half_warned"):
        structure._cache["half_warned"] = True
        warnings.warn(f"teleport of a {str(dtype).replace('torch.', '')} model: parameters scaled in float64 and "
                      f"rounded once to {str(dtype).replace('torch.', '')}; measured relative output change "
                      f"{worst[0]:.3g} ({worst[1]} on {worst[2]}; tolerance {tol:.3g}).", RuntimeWarning,
                      stacklevel=2)
    return out


def check_tolerance(dtype: torch.dtype, structure: CoBStructure) -> float:
    """Largest relative output change ``max|f - f_tp| / max|f|`` the self-check of :func:`teleport` accepts.

    ``c * eps(dtype) * sqrt(L)`` with ``L`` the number of layer groups of the structure (a depth proxy: rounding
    errors of independent layers add in quadrature) and ``c = 1024`` for float32/float64 (float64: about
    ``2.3e-13 * sqrt(L)``; float32: ``1.2e-4 * sqrt(L)``), ``c = 16`` for float16/bfloat16 (``1.6e-2 * sqrt(L)``
    and ``0.125 * sqrt(L)``: the forward pass itself rounds at that level).  A construct that escaped the analysis
    changes the output by O(1) (0.2 - 3.5 relative with ``random_cob(sigma=0.9)``).
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    c = 16.0 if dtype in (torch.float16, torch.bfloat16) else 1024.0
    return c * eps * math.sqrt(max(1, len(structure.groups)))


def _model_dtype(model: nn.Module) -> torch.dtype:
    """dtype of the model's first floating parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _check_inputs(model: nn.Module, structure: CoBStructure, extra) -> list:
    """``[(description, positional inputs)]``: the analysis example and ``extra``, floating tensors cast to the
    model's parameter dtype and every tensor moved to its device."""
    p = next(iter(model.parameters()), None)
    dtype, device = _model_dtype(model), (p.device if p is not None else None)

    def one(t):
        if isinstance(t, torch.Tensor):
            t = t.detach()
            if device is not None and t.device != device:
                t = t.to(device)
            if t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
        return t

    def prep(x, kw=None):
        args, kwargs = split_inputs(x)  # a tensor, a tuple of positional inputs, or a dict of keyword inputs
        kwargs.update(kw or {})
        return tuple(one(t) for t in args), {k: one(t) for k, t in kwargs.items()}

    res = []
    if structure.example_input is not None or getattr(structure, "example_kwargs", None):
        res.append(("the analysis example", prep(structure.example_input or (),
                                                 getattr(structure, "example_kwargs", None))))
    if extra is not None:
        res.append(("the given check input", prep(extra)))
    return res


def _eval_forward(model: nn.Module, inputs: tuple):
    """``model(*args, **kwargs)`` (``inputs = (args, kwargs)``) in eval mode without grad (modes restored;
    BatchNorm running statistics untouched, any buffer the forward writes in place restored), with the global RNG
    state restored afterwards (random ops in the forward see the same numbers each call)."""
    modes = [(m, m.training) for m in model.modules()]
    # buffers a forward may write (counters, caches; BatchNorm does not in eval mode): put back if touched
    bufs = [(b, b._version, b.clone()) for b in model.buffers()]
    rng = torch.get_rng_state()
    devs = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    cuda = [torch.cuda.get_rng_state(d) for d in devs]
    try:
        for m, _ in modes:
            m.training = False
        with torch.no_grad():
            return model(*inputs[0], **inputs[1])
    finally:
        for m, t in modes:
            m.training = t
        with torch.no_grad():
            for b, v, c in bufs:
                if b._version != v:
                    b.copy_(c)
        torch.set_rng_state(rng)
        for d, st in zip(devs, cuda):
            torch.cuda.set_rng_state(st, d)


def _deviations(a, b, output=None):
    """``(name, relative deviation)`` for every floating output tensor the structure preserves
    (:func:`gradcond.utils.output_tensors` with the ``output`` selector given to ``analyze``: the logits of a
    ``ModelOutput`` that has them, else every tensor; ``inf`` on a structure / shape / non-finite-pattern
    mismatch)."""
    fa, fb = output_tensors(a, output), output_tensors(b, output)
    if [n for n, _ in fa] != [n for n, _ in fb]:
        yield "the output structure", math.inf
        return
    for (name, x), (_, y) in zip(fa, fb):
        if not x.is_floating_point() and not x.is_complex():
            continue
        if x.shape != y.shape:
            yield name, math.inf
            continue
        dt = torch.promote_types(x.dtype, torch.float32)  # half -> float32; float64 stays (MPS has no float64)
        x64, y64 = x.detach().to(dt), y.detach().to(dt)
        fin = torch.isfinite(x64)
        if not torch.equal(fin, torch.isfinite(y64)) or not torch.equal(x64[~fin], y64[~fin]):
            yield name, math.inf
            continue
        if x64.numel() == 0 or bool(fin.sum() == 0):
            yield name, 0.0
            continue
        scale = float(x64[fin].abs().max())
        diff = float((x64[fin] - y64[fin]).abs().max())
        yield name, (diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))


def _snapshot(model: nn.Module, structure: CoBStructure) -> dict:
    """What an in-place teleport can change: ruled parameters (copied), the modules at activation sites (objects)
    and the taus of wrappers / site buffers there (copied)."""
    params = dict(model.named_parameters())
    ps = [params[n] for n in structure.rules if n in params]
    mods, taus = [], []
    for site in structure.sites:
        if site.module_path:
            m = _get_module(model, site.module_path)
            if m is not None:
                mods.append((site.module_path, m))
                if isinstance(m, TeleportedActivation):
                    taus.append((m.tau, m.tau.clone()))
        b = model._buffers.get(_buf_name(site))
        if b is not None:
            taus.append((b, b.clone()))
    return dict(params=ps, values=[p.detach().clone() for p in ps], mods=mods, taus=taus)


def _restore(model: nn.Module, snap: dict) -> None:
    """Put back what :func:`_snapshot` recorded (parameter values, taus, swapped modules), exactly."""
    with torch.no_grad():
        for p, v in zip(snap["params"], snap["values"]):
            p.copy_(v)
        for t, v in snap["taus"]:
            t.copy_(v)
    for path, m in snap["mods"]:
        if _get_module(model, path) is not m:
            _set_module(model, path, m)


def _teleport(model: nn.Module, cob: CoB, inplace: bool = False) -> nn.Module:
    """:func:`teleport` without the self-check."""
    if not isinstance(cob, CoB):
        raise TypeError(f"teleport expects a CoB as second argument, got {type(cob).__name__}.")
    structure = cob.structure
    tau = cob._tau if (cob._tau is not None and not cob._tau.requires_grad) else cob.tau.detach()
    ruled, same = _ruled_params(model, structure, _rule_order(structure))
    # `same`: every ruled parameter has the first one's dtype and device (then one look decides)
    half = bool(ruled) and (ruled[0].dtype in _HALF if same else any(p.dtype in _HALF for p in ruled))
    fplan = _fast_plan(structure, ruled[0].device, ruled[0].dtype) if (ruled and same and not half) else None
    # factors first: they validate tau (ValueError before anything is touched) and leave the table [1, tau, 1, 1/tau]
    # that sites() reuses; views into the plan's buffers, used below before any other call of factors()
    # sign sites matter only when some tau < 0; sites() decides per site in one vectorised pass
    need_sites = bool(structure.sites) and fplan is not None and (
        fplan.scale_vars is not None or (cob._any_negative and fplan.sign_vars is not None))
    facs = fplan.factors(tau, keep_table=need_sites, trusted=cob._tau is not None and cob._trusted(ruled[0].dtype)) \
        if fplan is not None else None
    plan, final = [], False
    if structure.sites:
        if fplan is not None:
            if need_sites:
                active, vals = fplan.sites(structure, tau)
                if any(active):
                    plan, final = _plan(model, structure, vals, active=active), True
        elif _quick_active(structure, cob, cob.ext().detach()):
            plan = _plan(model, structure, _site_taus(structure, cob.ext().detach()))
    if inplace and any(how == "graph" for how, _, _ in plan):
        names = ", ".join(s.node for how, s, _ in plan if how == "graph")
        raise ValueError(
            f"teleport(inplace=True) cannot rewrite activations that are function calls or shared modules ({names}); "
            "use inplace=False (returns a torch.fx.GraphModule) or analyze(..., rewrite=False)."
        )
    grad_was = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # = torch.no_grad(), without the context-manager overhead
    try:
        if fplan is not None:
            if inplace:
                fplan.scale_(ruled, facs)
                new = None
            else:
                new = dict(zip(fplan.names, fplan.scaled(ruled, facs)))
        else:
            new = _scaled_half(structure, cob, model, inplace) if half else \
                _scaled(structure, cob, _params_checked(model, structure), inplace)
        if inplace:
            out = model
        else:
            params = _params_checked(model, structure)
            memo = {id(params[name]): nn.Parameter(v, requires_grad=params[name].requires_grad)
                    for name, v in new.items()}
            out = repair_deepcopy(model, copy.deepcopy(model, memo))
        if plan:
            tau_dtype = ruled[0].dtype if ruled else next(
                (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            out = _realise(out, structure, plan, tau_dtype, final=final,
                           device=ruled[0].device if (ruled and same) else None)
    finally:
        torch._C._set_grad_enabled(grad_was)
    return out
