"""Neural teleportation of unmodified PyTorch models (seed 000, Armenta et al.).

A change of basis (CoB) assigns a non-zero tau to every free neuron / channel of a :class:`CoBStructure`
(:func:`gradcond.graph.analyze`).  Teleporting maps every weight ``w_ab`` (neuron a -> b) to
``v_ab = tau_b / tau_a * w_ab`` (seed 000 eq. 1; biases: ``* tau_b``; norm gamma/beta: ``* tau_out``) and every
activation ``f`` to ``g(x) = tau * f(x / tau)`` (eq. 2), so the network function is unchanged (Theorem 2.1) while
gradients scale inversely, ``dV = dW / factor`` (Theorem 5.1).

Public API
----------
* ``CoB(structure, tau)``; ``CoB.identity(structure)``; ``CoB.from_vector(structure, log_abs, signs=None)``
  (differentiable in ``log_abs``); ``cob.tau``, ``cob.log_abs``, ``cob.signs``; ``cob.inverse()``;
  ``cob.compose(other)`` (teleport by ``cob`` then ``other`` == teleport by ``cob.compose(other)``).
* ``teleport(model, cob, inplace=False) -> nn.Module``.
* ``random_cob(structure, sigma=0.5, mode="intra"|"inter", generator=None) -> CoB`` (seed 000 Sec. 4.1).
* ``micro_teleport(model, structure, sigma=1e-3, generator=None) -> (model, vector)`` (Sec. 4.3).
* ``pseudo_teleport(model, structure, sigma=0.5, mode="intra", generator=None) -> nn.Module`` (Sec. 5 control).
* ``weight_scale_factors(structure, cob) -> dict[name, Tensor]``: ``V = factor * W`` for every parameter.
* ``teleported_params(model, structure, cob) -> dict[name, Tensor]`` (differentiable; for
  ``torch.func.functional_call(model, ...)`` when no activation needs rewriting, see :func:`needs_rewrite`).
* ``functional_teleport(model, structure) -> TeleportFunctional``: a rewritable copy whose
  ``state(cob)`` (params + activation taus) is exact for every CoB, for ``functional_call``.
* ``TeleportedActivation`` (the rewritten activation module).

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
import operator
import weakref

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from gradcond.graph import CoBStructure, analyze  # noqa: F401  (re-exported for convenience)
from gradcond.graph._modules import TeleportedActivation

__all__ = [
    "CoB",
    "teleport",
    "random_cob",
    "micro_teleport",
    "pseudo_teleport",
    "weight_scale_factors",
    "teleported_params",
    "needs_rewrite",
    "functional_teleport",
    "TeleportFunctional",
    "TeleportedActivation",
    "flat_params",
]


# ------------------------------------------------------------------------------------------------------------
class CoB:
    """A change of basis for one :class:`CoBStructure`: ``tau`` of shape ``(structure.num_free,)``.

    Construct from taus (``CoB(structure, tau)``), or from log-magnitudes and signs
    (``CoB.from_vector(structure, log_abs, signs)``, differentiable in ``log_abs`` -- the parametrisation used for
    gradient ascent on log|tau|).  Validation (finite, non-zero, right length, sign constraints) happens at
    construction and raises ``ValueError``.  Default dtype float64.
    """

    def __init__(self, structure: CoBStructure, tau: torch.Tensor | None = None, *, _log=None):
        if not isinstance(structure, CoBStructure):
            raise TypeError(f"CoB needs a CoBStructure from gradcond.graph.analyze, got {type(structure).__name__}.")
        self.structure = structure
        n = structure.num_free
        if _log is not None:
            log_abs, signs = _log
            self._log_abs, self._signs = log_abs, signs
            self._tau = None
            chk = log_abs.detach()
            if not bool(torch.isfinite(chk).all()):
                raise ValueError("CoB log-magnitudes must be finite (tau must be finite and non-zero).")
        else:
            tau = torch.as_tensor(tau)
            if not tau.is_floating_point():
                tau = tau.to(torch.float64)
            if tau.shape != (n,):
                raise ValueError(f"CoB tau must have shape ({n},) for this structure (num_free={n}), got "
                                 f"{tuple(tau.shape)}.")
            chk = tau.detach()
            if not bool(torch.isfinite(chk).all()) or bool((chk == 0).any()):
                raise ValueError("CoB tau must be finite and non-zero everywhere (found 0, NaN or inf).")
            self._tau = tau
            self._log_abs = None
            self._signs = None
        self._any_negative = bool((self.signs < 0).any()) if n else False
        if n and bool(structure.positive.any()):
            s = self.signs
            bad = structure.positive & (s < 0)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"CoB violates a sign constraint: tau[{i}] < 0 but the structure requires tau > 0 "
                                 f"there (max-reduction over features); {int(bad.sum())} entries affected.")

    # ---- constructors --------------------------------------------------------------------------------
    @classmethod
    def identity(cls, structure: CoBStructure, dtype=torch.float64) -> "CoB":
        return cls(structure, torch.ones(structure.num_free, dtype=dtype))

    @classmethod
    def from_vector(cls, structure: CoBStructure, log_abs: torch.Tensor, signs: torch.Tensor | None = None) -> "CoB":
        """tau = signs * exp(log_abs); ``signs`` (+-1, default +1) are fixed, ``log_abs`` may require grad."""
        n = structure.num_free
        log_abs = torch.as_tensor(log_abs)
        if log_abs.shape != (n,):
            raise ValueError(f"log_abs must have shape ({n},) for this structure, got {tuple(log_abs.shape)}.")
        if not log_abs.is_floating_point():
            log_abs = log_abs.to(torch.float64)
        if signs is None:
            signs = torch.ones(n, dtype=log_abs.dtype, device=log_abs.device)
        signs = torch.as_tensor(signs).to(log_abs.dtype)
        if signs.shape != (n,) or not bool(((signs == 1) | (signs == -1)).all()):
            raise ValueError(f"signs must be a ({n},) tensor of +1/-1 entries.")
        return cls(structure, _log=(log_abs, signs))

    # ---- views ---------------------------------------------------------------------------------------
    @property
    def tau(self) -> torch.Tensor:
        if self._tau is not None:
            return self._tau
        return self._signs * torch.exp(self._log_abs)

    @property
    def log_abs(self) -> torch.Tensor:
        return self._log_abs if self._log_abs is not None else torch.log(self._tau.abs())

    @property
    def signs(self) -> torch.Tensor:
        if self._signs is not None:
            return self._signs
        return torch.sign(self._tau.detach())

    def ext(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Lookup table ``[1, tau, 1, 1/tau]`` used by every factor (cached per dtype unless it needs grad)."""
        src = self._log_abs if self._log_abs is not None else self._tau
        cache = self.__dict__.setdefault("_ext_cache", {})
        key = dtype or src.dtype
        if not src.requires_grad and key in cache:
            return cache[key]
        if dtype is not None and dtype != src.dtype:
            e = self.ext().to(dtype)
        elif self._log_abs is not None:
            e = self.structure.ext_table_log(self._log_abs, self._signs)
        else:
            e = self.structure.ext_table(self._tau)
        if not src.requires_grad:
            cache[key] = e
        return e

    # ---- group operations ----------------------------------------------------------------------------
    def inverse(self) -> "CoB":
        """The CoB that undoes this one: ``teleport(teleport(m, c), c.inverse())`` equals ``m`` up to rounding."""
        if self._log_abs is not None:
            return CoB.from_vector(self.structure, -self._log_abs, self._signs)
        return CoB(self.structure, 1.0 / self._tau)

    def compose(self, other: "CoB") -> "CoB":
        """Teleporting by ``self`` then by ``other`` equals teleporting by ``self.compose(other)`` (taus multiply)."""
        _check_same(self.structure, other)
        if self._log_abs is not None and other._log_abs is not None:
            return CoB.from_vector(self.structure, self._log_abs + other._log_abs, self._signs * other._signs)
        return CoB(self.structure, self.tau * other.tau)

    def __repr__(self) -> str:
        t = self.tau.detach()
        if t.numel():
            return (f"CoB(num_free={t.numel()}, |tau| in [{t.abs().min():.3g}, {t.abs().max():.3g}], "
                    f"{int((t < 0).sum())} negative)")
        return "CoB(num_free=0)"


def _check_same(structure: CoBStructure, cob) -> None:
    if not isinstance(cob, CoB):
        raise TypeError(f"expected a CoB, got {type(cob).__name__}.")
    if cob.structure is not structure and cob.structure.fingerprint != structure.fingerprint:
        raise ValueError(
            f"the CoB belongs to a different structure ({cob.structure.model_class}, num_free="
            f"{cob.structure.num_free}) than the one given ({structure.model_class}, num_free={structure.num_free})."
        )


def _check_model(model: nn.Module, structure: CoBStructure) -> None:
    _params_checked(model, structure)


# ------------------------------------------------------------------------------------------------------------
def _factor(ext: torch.Tensor, rule) -> torch.Tensor:
    f = ext[rule.gidx[0]]
    for g in rule.gidx[1:]:
        f = f * ext[g]
    return f


def _term_views(structure: CoBStructure, ext: torch.Tensor):
    """All factor terms (gathered from ``ext``): returns (slots, views); slot = (param name, indices into views)."""
    plan = structure._flat(ext.device)
    # one torch.take per term (cheaper than one gather + split + views for small models)
    return plan["slots"], [torch.take(ext, g) for g in plan["terms"]]


def _params_checked(model: nn.Module, structure: CoBStructure) -> dict:
    """``dict(model.named_parameters())`` after checking names and shapes against the structure."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}.")
    params = dict(model.named_parameters())
    ref = structure.param_shapes
    if len(params) != len(ref) or any(params[n].shape != s if n in params else True for n, s in ref.items()):
        for name, shape in ref.items():
            got = tuple(params[name].shape) if name in params else None
            if got != tuple(shape):
                raise ValueError(
                    f"the CoB structure does not match this model: parameter {name!r} has shape {got} in the model "
                    f"but {tuple(shape)} in the structure (analyze the model you teleport)."
                )
        extra = sorted(set(params) - set(ref))
        raise ValueError(f"the CoB structure does not match this model: parameters {extra[:3]} are not in the "
                         "structure (analyze the model you teleport).")
    return params


def _quick_active(structure: CoBStructure, cob: "CoB", ext64: torch.Tensor) -> bool:
    """Whether any activation site needs rewriting (cheap: sign sites only matter when some tau < 0)."""
    plan = structure._flat(ext64.device)
    if plan["scale_idx"] is not None and bool((torch.take(ext64, plan["scale_idx"]) != 1).any()):
        return True
    if cob._any_negative and plan["sign_idx"] is not None and bool((torch.take(ext64, plan["sign_idx"]) < 0).any()):
        return True
    return False


def weight_scale_factors(structure: CoBStructure, cob: CoB) -> dict[str, torch.Tensor]:
    """``{name: factor}`` with ``V = factor * W`` (broadcastable) for every parameter of the analysed model.

    Untouched parameters get a scalar 1.  Gradients transform as ``dV = dW / factor`` and squared-gradient
    statistics as ``/ factor**2`` (Theorem 5.1).  Differentiable w.r.t. the CoB (dtype of ``cob.tau``).
    """
    _check_same(structure, cob)
    ext = cob.ext()
    one = torch.ones((), dtype=ext.dtype, device=ext.device)
    out = {name: one for name in structure.param_shapes}
    slots, views = _term_views(structure, ext)
    for name, ks in slots:
        f = views[ks[0]]
        for k in ks[1:]:
            f = f * views[k]
        out[name] = f
    return out


def _site_taus(structure: CoBStructure, ext: torch.Tensor) -> list:
    return [ext[s.gidx] for s in structure.sites]


def needs_rewrite(structure: CoBStructure, cob: CoB) -> bool:
    """True when teleporting by ``cob`` must rewrite some activation (tau != 1 at a non-homogeneous
    activation, or tau < 0 at a ReLU-like activation / max-pool)."""
    _check_same(structure, cob)
    ext = cob.ext().detach()
    return any(_site_active(s, t) for s, t in zip(structure.sites, _site_taus(structure, ext)))


def _site_active(site, tau: torch.Tensor) -> bool:
    if site.kind == "scale":
        return bool((tau != 1).any())
    return bool((tau < 0).any())


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


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters concatenated (``named_parameters`` order), detached."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------------------------------------------------
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
    parent_path, _, last = path.rpartition(".")
    parent = _get_module(root, parent_path) if parent_path else root
    if last in parent._modules:
        parent._modules[last] = new  # same effect as setattr for an existing submodule, without its checks
    else:
        setattr(parent, last, new)


def _buf_name(site) -> str:
    return f"cob_tau_{site.node}"


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
    t = tau if site.kind == "scale" else torch.sign(tau)
    return t.to(dtype)


def _realise(model: nn.Module, structure: CoBStructure, plan: list, dtype, final: bool = False) -> nn.Module:
    """Apply a plan to ``model`` (mutated; may return a new GraphModule wrapping it).  ``final``: the plan's
    values are already the buffer values (sign or tau, in ``dtype``, owned), as made by :meth:`_FastPlan.sites`."""
    graph_sites = []
    composed, factors = [], []
    for how, site, tau in plan:
        val = tau if final else _site_value(site, tau.detach(), dtype)
        if how == "compose_buffer":
            buf = model._buffers[_buf_name(site)]
            buf.mul_(val.to(buf.dtype))
        elif how == "compose_wrapper":
            w = _get_module(model, site.module_path)
            composed.append((site, w))
            factors.append(val.to(w.tau.dtype))
        elif how == "wrap":
            inner = _get_module(model, site.module_path)
            _set_module(model, site.module_path, TeleportedActivation._make(inner, val if final else val.clone(),
                                                                            site.kind))
        else:
            graph_sites.append((site, val))
    if composed:
        taus = [w.tau for _, w in composed]
        torch._foreach_mul_(taus, factors)
        # composed back to the identity (all |tau - 1| <= 4 eps; sign taus are +-1, so exactly 1): restore the
        # user's module.  One batched max-norm for all wrappers.
        dev = torch.stack(torch._foreach_norm(torch._foreach_sub(taus, 1), float("inf"))).tolist()
        for (site, w), d in zip(composed, dev):
            eps = torch.finfo(w.tau.dtype).eps if w.tau.is_floating_point() else 0
            if d <= 4 * eps:
                _set_module(model, site.module_path, w.inner)
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


def teleport(model: nn.Module, cob: CoB, inplace: bool = False) -> nn.Module:
    """Teleport ``model`` by ``cob`` (seed 000 eqs. 1-2): same network function, new weights.

    Returns a new module (``inplace=False``; parameters are new tensors, buffers copied) or ``model`` itself
    (``inplace=True``: parameters multiplied in place, so optimizers keep referring to them; activation modules
    swapped in their parents).  See the module docstring for the returned class.  ``ValueError`` (model
    unchanged) on a CoB of another structure, non-finite / zero taus, violated sign constraints, a model that
    does not match the structure, or ``inplace=True`` when a function-call activation would need rewriting.
    Cost: a fixed number of vectorised calls (one gather of every factor term from the lookup table into a
    cached buffer, ``K - 1`` batched products for rules of ``K`` terms, one batched multiply of all parameters),
    whatever the number of parameters; plus the module copy when ``inplace=False`` and one module swap per
    activation that must be rewritten.  Plans are cached per (structure, device, dtype); the full parameter
    name/shape check runs once per model (later calls compare parameter identities and shapes).
    """
    if not isinstance(cob, CoB):
        raise TypeError(f"teleport expects a CoB as second argument, got {type(cob).__name__}.")
    structure = cob.structure
    tau = cob.tau.detach()
    ruled, same = _ruled_params(model, structure, _rule_order(structure))
    fplan = _fast_plan(structure, ruled[0].device, ruled[0].dtype) if (ruled and same) else None
    plan, final = [], False
    if structure.sites:
        if fplan is not None:
            # sign sites matter only when some tau < 0; sites() decides per site in one vectorised pass
            if fplan.scale_vars is not None or (cob._any_negative and fplan.sign_vars is not None):
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
            facs = fplan.factors(tau)
            if inplace:
                torch._foreach_mul_(ruled, facs)
                new = None
            else:
                new = dict(zip(fplan.names, torch._foreach_mul(ruled, facs)))
        else:
            new = _scaled(structure, cob, _params_checked(model, structure), inplace)
        if inplace:
            out = model
        else:
            params = _params_checked(model, structure)
            memo = {id(params[name]): nn.Parameter(v, requires_grad=params[name].requires_grad)
                    for name, v in new.items()}
            out = copy.deepcopy(model, memo)
        if plan:
            tau_dtype = ruled[0].dtype if ruled else next(
                (p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            out = _realise(out, structure, plan, tau_dtype, final=final)
    finally:
        torch._C._set_grad_enabled(grad_was)
    return out


# ------------------------------------------------------------------------------------------------------------
# Fast in-place path: everything that depends only on (structure, device, dtype) is built once and cached on the
# structure; a teleport is then a fixed number of vectorised calls whatever the number of parameters:
#   ext[1:n+1] <- tau; ext[n+2:] <- 1/tau           (2 calls, into a cached buffer)
#   G <- ext[idx]                                    (1 index_select into a cached buffer; G holds every term)
#   facs <- T1 * T2 (* T3 ...)                       (K-1 _foreach_mul calls over the multi-term parameters)
#   params *= facs                                   (1 _foreach_mul_ / _foreach_mul)
# T_k are views into G made once (parameters sorted by their number of terms, so each level is a list prefix).
class _FastPlan:
    __slots__ = ("names", "ext", "ext_tau", "ext_inv", "zeros", "idx", "G", "first", "levels", "n_multi", "singles",
                 "scale_vars", "sign_vars", "_site_data")

    def __init__(self, structure: CoBStructure, device, dtype):
        n = structure.num_free
        self.names = _rule_order(structure)
        rules = [structure.rules[name] for name in self.names]
        self.ext = torch.ones(2 * n + 2, dtype=dtype, device=device)
        self.ext_tau = self.ext[1:n + 1]
        self.ext_inv = self.ext[n + 2:]
        self.zeros = torch.zeros_like(self.ext)
        terms = [g for r in rules for g in r.gidx]
        self.idx = (torch.cat([g.reshape(-1) for g in terms]) if terms
                    else torch.zeros(0, dtype=torch.int64)).to(device)
        self.G = torch.empty(self.idx.numel(), dtype=dtype, device=device)
        views, k = [], 0
        for g in terms:
            views.append(self.G[k:k + g.numel()].view(g.shape))
            k += g.numel()
        per_rule, k = [], 0
        for r in rules:
            per_rule.append(views[k:k + len(r.gidx)])
            k += len(r.gidx)
        self.first = [v[0] for v in per_rule]
        self.n_multi = sum(1 for v in per_rule if len(v) > 1)
        self.singles = self.first[self.n_multi:]
        # level j (j >= 1): the j-th term of every rule that has more than j terms (a prefix of the sorted rules)
        depth = max((len(v) for v in per_rule), default=1)
        self.levels = [[v[j] for v in per_rule if len(v) > j] for j in range(1, depth)]

        def vars_of(sites):
            if not sites:
                return None
            g = torch.cat([s.gidx.reshape(-1) for s in sites])
            g = g[(g != 0) & (g != n + 1)]
            v = torch.where(g <= n, g - 1, g - n - 2)
            return torch.unique(v) if v.numel() else None  # indices into tau (CPU, like CoB taus)

        self._site_data = None
        self.scale_vars = vars_of([s for s in structure.sites if s.kind == "scale"])
        self.sign_vars = vars_of([s for s in structure.sites if s.kind == "sign"])

    def sites(self, structure: CoBStructure, tau: torch.Tensor):
        """``(active, values)`` for every activation site: activity decided in tau's precision (float64: tau != 1
        at scale sites, tau < 0 at sign sites), values (tau or sign(tau), in the parameters' dtype, each its own
        tensor) for the active ones.  A fixed number of vectorised calls plus one small copy per active site."""
        d = self._site_data
        if d is None or d[0] != tau.device:
            n = structure.num_free
            idx = torch.cat([s.gidx.reshape(-1) for s in structure.sites]).to(tau.device)
            sizes = [s.gidx.numel() for s in structure.sites]
            starts = [0]
            for k in sizes[:-1]:
                starts.append(starts[-1] + k)
            scale = torch.cat([torch.full((k,), s.kind == "scale") for s, k in zip(structure.sites, sizes)])
            e64 = torch.ones(2 * n + 2, dtype=tau.dtype, device=tau.device)
            kinds = {s.kind for s in structure.sites}
            d = self._site_data = (tau.device, idx, sizes, starts, scale.to(tau.device), e64, e64[1:n + 1],
                                   e64[n + 2:], kinds, [tuple(s.gidx.shape) for s in structure.sites])
        _, idx, sizes, starts, scale, e64, e64_tau, e64_inv, kinds, shapes = d
        e64_tau.copy_(tau)
        torch.reciprocal(tau, out=e64_inv)
        v = e64.take(idx)
        if kinds == {"scale"}:
            flag = v != 1
        elif kinds == {"sign"}:
            flag = v < 0
        else:
            flag = torch.where(scale, v != 1, v < 0)
        active = np.logical_or.reduceat(flag.cpu().numpy(), starts).tolist()
        if not any(active):
            return active, []
        vals = []
        sv = torch.sign(v) if "sign" in kinds else None
        for i, s in enumerate(structure.sites):
            if active[i]:
                src = v if s.kind == "scale" else sv
                vals.append(src[starts[i]:starts[i] + sizes[i]].to(self.ext.dtype, copy=True).view(shapes[i]))
            else:
                vals.append(None)
        return active, vals

    def factors(self, tau: torch.Tensor) -> list:
        """Per-parameter factors (order of ``self.names``); views into cached buffers, valid until the next call.
        ``ValueError`` (nothing touched) when some tau or 1/tau is not finite in the buffers' dtype."""
        self.ext_tau.copy_(tau)
        if tau.device == self.ext.device:
            torch.reciprocal(tau, out=self.ext_inv)  # computed in tau's dtype (float64), rounded once
        else:
            self.ext_inv.copy_(torch.reciprocal(tau))
        # taus are validated when the CoB is made; this re-check also catches a tau tensor edited since, before any
        # parameter is touched: dot(ext, 0) is NaN iff some entry of ext = [1, tau, 1, 1/tau] is inf or NaN (one
        # call, vs three for isfinite(ext).all())
        if not float(torch.dot(self.ext, self.zeros)) == 0.0:
            raise ValueError("CoB tau must be finite and non-zero everywhere, with 1/tau finite in the parameters' "
                             f"dtype {self.ext.dtype} (found 0, NaN, inf or an overflowing reciprocal).")
        torch.index_select(self.ext, 0, self.idx, out=self.G)
        if not self.levels:
            return self.first
        prods = torch._foreach_mul(self.first[:self.n_multi], self.levels[0])
        for lv in self.levels[1:]:
            torch._foreach_mul_(prods[:len(lv)], lv)
        return [*prods, *self.singles]


def _fast_plan(structure: CoBStructure, device, dtype) -> _FastPlan:
    key = ("fast", device, dtype)
    plan = structure._cache.get(key)
    if plan is None:
        plan = structure._cache[key] = _FastPlan(structure, device, dtype)
    return plan


def _rule_order(structure: CoBStructure) -> list:
    """Names of the ruled parameters, most factor terms first (the order of :class:`_FastPlan`)."""
    names = structure._cache.get("order")
    if names is None:
        names = structure._cache["order"] = [r.name for r in sorted(structure.rules.values(),
                                                                      key=lambda r: -len(r.gidx))]
    return names


_SHAPE = operator.attrgetter("shape")


def _walk_params(model: nn.Module) -> list:
    """``list(model.parameters())`` without the generator machinery (same order: modules pre-order, each module's
    ``_parameters`` in order, modules and parameters de-duplicated by identity).  Used only to *recognise* a model
    already checked against the structure; any mismatch falls back to the full ``named_parameters`` check."""
    out, seen = [], {id(model)}

    def visit(m):
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        for c in m._modules.values():
            if c is not None and id(c) not in seen:
                seen.add(id(c))
                visit(c)

    visit(model)
    return out


def _ruled_params(model: nn.Module, structure: CoBStructure, names: list):
    """``([parameters of model named names], same_dtype_and_device)`` after checking the model against the structure.

    The full name/shape check (:func:`_params_checked`) runs once per model; later calls only compare the identities
    and shapes of the model's parameters with those seen at that check (last model only, held by weak reference).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}.")
    plist = _walk_params(model)
    last = structure._cache.get("last_model")
    if last is not None and last[0]() is model:
        _, ids, shapes, where, same = last
        if ids == tuple(map(id, plist)) and shapes == list(map(_SHAPE, plist)):
            return [plist[i] for i in where], same
    params = _params_checked(model, structure)
    ruled = [params[n] for n in names]
    pos = {id(p): i for i, p in enumerate(plist)}
    same = all(p.dtype == ruled[0].dtype and p.device == ruled[0].device for p in ruled)
    if all(id(p) in pos for p in ruled):
        structure._cache["last_model"] = (weakref.ref(model), tuple(map(id, plist)), list(map(_SHAPE, plist)),
                                          tuple(pos[id(p)] for p in ruled), same)
    return ruled, same


def _scaled(structure: CoBStructure, cob: CoB, params: dict, inplace: bool) -> dict:
    """Multiply every ruled parameter by its factor (in place, or into new tensors); batched with _foreach."""
    by_dtype: dict = {}
    for name, ks in structure._flat(ext_device(cob))["slots"]:
        by_dtype.setdefault(params[name].dtype, []).append((name, ks))
    out = {}
    for dtype, slots_d in by_dtype.items():
        _, views = _term_views(structure, cob.ext(dtype))
        ps = [params[name] for name, _ in slots_d]
        # multiply the (small, broadcastable) terms first, then touch each parameter once
        facs = [views[ks[0]] for _, ks in slots_d]
        multi = [i for i, (_, ks) in enumerate(slots_d) if len(ks) > 1]
        if multi:
            prods = torch._foreach_mul([facs[i] for i in multi], [views[slots_d[i][1][1]] for i in multi])
            for i, f in zip(multi, prods):
                for k in slots_d[i][1][2:]:
                    f = f * views[k]
                facs[i] = f
        if inplace:
            torch._foreach_mul_(ps, facs)
            cur = ps
        else:
            cur = torch._foreach_mul(ps, facs)
        for (name, _), v in zip(slots_d, cur):
            out[name] = v
    return out


def ext_device(cob: CoB):
    src = cob._log_abs if cob._log_abs is not None else cob._tau
    return src.device


# ------------------------------------------------------------------------------------------------------------
def random_cob(structure: CoBStructure, sigma: float = 0.5, mode: str = "intra",
               generator: torch.Generator | None = None) -> CoB:
    """Random CoB of seed 000 Sec. 4.1: ``tau ~ U[1 - sigma, 1 + sigma]`` (``intra``) or an equal mixture of
    ``U[1 - sigma, 1 + sigma]`` and ``U[-1 - sigma, -1 + sigma]`` (``inter``); sign-constrained taus stay positive.
    ``0 <= sigma < 1`` (the source's CoB-range).  float64."""
    if not isinstance(structure, CoBStructure):
        raise TypeError(f"random_cob needs a CoBStructure, got {type(structure).__name__}.")
    if not (isinstance(sigma, (int, float)) and 0 <= sigma < 1):
        raise ValueError(f"sigma must be a number in [0, 1) (the CoB-range of seed 000), got {sigma!r}.")
    if mode not in ("intra", "inter"):
        raise ValueError(f"mode must be 'intra' or 'inter', got {mode!r}.")
    n = structure.num_free
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    tau = 1.0 + sigma * (2.0 * u - 1.0)
    if mode == "inter":
        flip = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
        flip &= ~structure.positive
        tau = torch.where(flip, -tau, tau)
    return CoB(structure, tau)


def micro_teleport(model: nn.Module, structure: CoBStructure, sigma: float = 1e-3,
                   generator: torch.Generator | None = None):
    """Micro-teleportation (seed 000 Sec. 4.3): an intra CoB with small ``sigma``.

    Returns ``(teleported model, vector)`` where ``vector = V - W`` over all parameters (``named_parameters``
    order, flattened, dtype of the parameters), computed as ``W * (factor - 1)`` with ``factor - 1`` in float64
    (no cancellation).  The vector is tangent to the loss level set up to O(sigma^2).
    """
    cob = random_cob(structure, sigma, "intra", generator)
    _check_model(model, structure)
    tp = teleport(model, cob)
    fac = weight_scale_factors(structure, cob)
    vec = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            d = (fac[name] - 1).to(p.dtype)
            vec.append((p * d).expand(p.shape).reshape(-1))
    return tp, torch.cat(vec)


def pseudo_teleport(model: nn.Module, structure: CoBStructure, sigma: float = 0.5, mode: str = "intra",
                    generator: torch.Generator | None = None) -> nn.Module:
    """Pseudo-teleportation, the source's control (seed 000 Sec. 5): draw a CoB, measure
    ``r = ||W - tau W||`` over all parameters, and return a copy of ``model`` with parameters ``W + r * u``,
    ``u`` uniform on the unit sphere -- same distance, random direction, function not preserved."""
    cob = random_cob(structure, sigma, mode, generator)
    _check_model(model, structure)
    fac = weight_scale_factors(structure, cob)
    sq = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            sq += ((fac[name] - 1) * p.to(torch.float64)).pow(2).sum()
        r = float(sq.sqrt())
        dirs = {name: torch.randn(p.shape, generator=generator, dtype=torch.float64)
                for name, p in model.named_parameters()}
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in dirs.values()))
        params = dict(model.named_parameters())
        memo = {id(p): nn.Parameter(p + (r / norm) * dirs[name].to(p.dtype), requires_grad=p.requires_grad)
                for name, p in params.items()}
        return copy.deepcopy(model, memo)


# ------------------------------------------------------------------------------------------------------------
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
    path, _, last = name.rpartition(".")
    m = _get_module(root, path) if path else root
    return getattr(m, last)


def functional_teleport(model: nn.Module, structure: CoBStructure) -> TeleportFunctional:
    """Rewritable copy of ``model`` for differentiable teleports (see :class:`TeleportFunctional`)."""
    _check_model(model, structure)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    ones = [torch.ones(s.gidx.shape, dtype=torch.float64) for s in structure.sites]
    base = copy.deepcopy(model)
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
