"""The result of :func:`gradcond.graph.analyze`: the change-of-basis (CoB) structure of a model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Group:
    """One set of atoms created together (the output neurons/channels of one layer, or attention dims).

    After the ties are resolved each atom is ``free`` (it carries its own free tau, counted in the group that
    created it first), ``tied`` (it shares the tau of an atom of an earlier group: residual adds, concatenation,
    attention q/k) or ``pinned`` (tau = 1).
    """

    name: str
    node: str
    size: int
    start: int
    free: int = 0
    tied: int = 0
    pinned: int = 0
    positive: int = 0

    def to_dict(self) -> dict:
        return dict(name=self.name, node=self.node, size=self.size, free=self.free, tied=self.tied,
                    pinned=self.pinned, positive=self.positive)


@dataclass
class ActSite:
    """An activation (or max-pool) whose teleported form differs from the original for some tau.

    ``kind="scale"``: rewritten as ``tau * f(x / tau)`` whenever some tau != 1 (non-homogeneous ``f``).
    ``kind="sign"``: rewritten as ``s * f(s * x)`` whenever some tau < 0 (positively homogeneous ``f``).
    ``gidx`` indexes :meth:`CoBStructure.ext_table` and broadcasts against the activation's input.
    ``module_path`` is set for ``call_module`` nodes, ``unique`` when that module is called only here.
    """

    node: str
    kind: str
    op: str
    module_path: str | None
    unique: bool
    gidx: torch.Tensor

    def to_dict(self) -> dict:
        return dict(node=self.node, kind=self.kind, op=self.op, module_path=self.module_path, unique=self.unique,
                    shape=list(self.gidx.shape))


@dataclass
class ParamRule:
    """``V = W * prod_k ext[gidx[k]]`` for one parameter (each ``gidx[k]`` broadcasts to the parameter)."""

    name: str
    shape: tuple
    gidx: list


@dataclass
class Note:
    node: str
    op: str
    reason: str

    def to_dict(self) -> dict:
        return dict(node=self.node, op=self.op, reason=self.reason)


@dataclass(eq=False)
class CoBStructure:
    """Free per-neuron / per-channel change-of-basis factors of a model and how they act on its parameters.

    * ``num_free``: number of free taus (the dimension of the CoB group acting on the model);
    * ``positive``: bool mask (num_free,), taus that must stay positive (max-reductions over features);
    * ``rules``: parameter name -> :class:`ParamRule`; parameters without a rule are never changed;
    * ``sites``: activations that are rewritten when their tau requires it (see :class:`ActSite`);
    * ``groups``: per-layer summary; ``frozen``: unsupported operations whose inputs/outputs were pinned (with
      the reason); ``pins``: supported operations that require tau = 1 on some tensor (norm inputs, softmax...);
    * ``tracer``: how the graph was obtained (``"torch.fx symbolic tracing"``, or the ``torch.export`` fallback
      with the reason fx failed);
    * ``example_input``: the analysis example (positional inputs, detached copies), on which every teleport
      compares the original and teleported outputs (:func:`gradcond.teleport.teleport`); ``example_kwargs``: its
      keyword inputs (``input_ids=``, ``attention_mask=``...), or None;
    * ``output``: the output selector given to ``analyze`` (see :func:`gradcond.utils.output_tensors`): which
      outputs the structure preserves and teleport's self-check compares.

    The tau of free variable ``i`` acts through the lookup table ``ext = [1, tau_1..tau_n, 1, 1/tau_1..1/tau_n]``
    (:meth:`ext_table`): every factor is a product of gathers from it, so teleporting is a few vectorised
    multiplies per parameter.
    """

    model_class: str
    num_free: int
    positive: torch.Tensor
    rules: dict
    sites: list
    groups: list
    frozen: list
    pins: list
    param_shapes: dict
    graph_module: object = field(repr=False, default=None)
    rewrite: bool = True
    tau_dtype: torch.dtype = torch.float32
    free_group: torch.Tensor | None = None
    tracer: str = "torch.fx symbolic tracing"
    example_input: tuple | None = field(repr=False, default=None)
    example_kwargs: dict | None = field(repr=False, default=None)
    output: object = field(repr=False, default=None)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def _flat(self, device) -> dict:
        """Precomputed gather plan: the term indices of every rule in one list (``terms``, one ``torch.take`` each),
        their concatenation (``flat``) and the concatenated site indices per kind."""
        key = ("flat", str(device))
        plan = self._cache.get(key)
        if plan is None:
            names, terms = [], []
            for name, rule in self.rules.items():
                names.append(name)
                terms.append(rule.gidx)
            flat_terms = [g for ts in terms for g in ts]
            sizes = [g.numel() for g in flat_terms]
            shapes = [tuple(g.shape) for g in flat_terms]
            flat = (torch.cat([g.reshape(-1) for g in flat_terms]) if flat_terms
                    else torch.zeros(0, dtype=torch.int64)).to(device)
            slots, k = [], 0
            for name, ts in zip(names, terms):
                slots.append((name, list(range(k, k + len(ts)))))
                k += len(ts)
            scale = [s.gidx.reshape(-1) for s in self.sites if s.kind == "scale"]
            sign = [s.gidx.reshape(-1) for s in self.sites if s.kind == "sign"]
            plan = dict(
                flat=flat, sizes=sizes, shapes=shapes, slots=slots,
                terms=[g.contiguous().to(device) for g in flat_terms],
                scale_idx=torch.cat(scale).to(device) if scale else None,
                sign_idx=torch.cat(sign).to(device) if sign else None,
            )
            self._cache[key] = plan
        return plan

    # ------------------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> tuple:
        return (self.model_class, tuple((k, tuple(v)) for k, v in self.param_shapes.items()), self.num_free)

    def ext_table(self, tau: torch.Tensor) -> torch.Tensor:
        """``[1, tau, 1, 1/tau]`` (length 2 * num_free + 2); differentiable in ``tau``."""
        one = torch.ones(1, dtype=tau.dtype, device=tau.device)
        return torch.cat([one, tau, one, 1.0 / tau])

    def ext_table_log(self, log_abs: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """Same table from log-magnitudes and signs: ``1/tau = sign * exp(-log|tau|)`` (no division)."""
        one = torch.ones(1, dtype=log_abs.dtype, device=log_abs.device)
        s = signs.to(log_abs.dtype)
        return torch.cat([one, s * torch.exp(log_abs), one, s * torch.exp(-log_abs)])

    @property
    def num_atoms(self) -> int:
        return sum(g.size for g in self.groups)

    def to_dict(self) -> dict:
        return dict(
            model_class=self.model_class,
            num_free=self.num_free,
            num_positive=int(self.positive.sum()),
            groups=[g.to_dict() for g in self.groups],
            sites=[s.to_dict() for s in self.sites],
            frozen=[f.to_dict() for f in self.frozen],
            pins=[p.to_dict() for p in self.pins],
            params_changed=sorted(self.rules),
            tracer=self.tracer,
        )

    def __str__(self) -> str:
        lines = [
            f"CoBStructure of {self.model_class}: num_free={self.num_free} free taus "
            f"({int(self.positive.sum())} sign-constrained to tau > 0), "
            f"{len(self.rules)}/{len(self.param_shapes)} parameters teleported"
            + ("" if self.rewrite else ", activation rewriting disabled"),
            f"  traced with {self.tracer}",
            f"  {'group':<44} {'size':>6} {'free':>6} {'tied':>6} {'pinned':>6} {'tau>0':>6}",
        ]
        for g in self.groups:
            lines.append(f"  {g.name[:44]:<44} {g.size:>6} {g.free:>6} {g.tied:>6} {g.pinned:>6} {g.positive:>6}")
        if self.sites:
            sc = [s for s in self.sites if s.kind == "scale"]
            sg = [s for s in self.sites if s.kind == "sign"]
            if sc:
                lines.append(f"  rewritten as tau*f(x/tau) when tau != 1 ({len(sc)}): "
                             + ", ".join(f"{s.node} ({s.op})" for s in sc))
            if sg:
                lines.append(f"  rewritten as s*f(s*x) when tau < 0 ({len(sg)}): "
                             + ", ".join(f"{s.node} ({s.op})" for s in sg))
        if self.pins:
            lines.append(f"  pinned to tau = 1 by rule ({len(self.pins)}):")
            lines += [f"    {p.node} ({p.op}): {p.reason}" for p in self.pins]
        if self.frozen:
            lines.append(f"  frozen, inputs/outputs pinned to tau = 1 ({len(self.frozen)}):")
            lines += [f"    {f.node} ({f.op}): {f.reason}" for f in self.frozen]
        else:
            lines.append("  frozen: none")
        return "\n".join(lines)

    __repr__ = __str__
