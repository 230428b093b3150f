"""Atom-id propagation for :func:`gradcond.graph.analyze`: the state, the run loop and the final structure.

Next to every tensor of the traced graph the analysis keeps a tensor of the same shape holding *atom ids* (the
tau that multiplies that entry in the teleported network); ties between atoms live in a union-find with inversion
parity (:mod:`gradcond.graph._unionfind`).  :class:`Propagator` holds that state and the primitives the rules use
(fresh atoms, pins, ties along dims, activation sites), runs the graph node by node on the example input
(:meth:`Propagator.run`, which hands every node with a tensor result to ``step``), and turns the atom classes into
the :class:`~gradcond.graph.CoBStructure` (:meth:`Propagator.finalize`: free taus, parameter rules, activation
sites, group summary).  The rules themselves live in :mod:`gradcond.graph.rules` (what an op does to atom ids)
and :mod:`gradcond.graph.dispatch` (which rule an fx node gets).

Cost: one forward pass of the traced graph, and bookkeeping that scales with the number of *distinct* atom
positions rather than with activation sizes: id tensors stay broadcast views where they are (a layer's taus are
shared over the batch and over space; :func:`cat_ids` keeps concatenations broadcast too), every union-find helper
first narrows an operand to the dims along which it varies (:func:`gradcond.graph._unionfind.shrink`), ids are
resolved in vectorised numpy passes (:meth:`UnionFind._resolve_np`), and one Python union-find operation is made
per distinct tied pair; :meth:`Propagator.finalize` resolves every atom at once (pointer jumping,
:meth:`UnionFind.roots`) and maps id tensors to table indices with one gather each.
"""

from __future__ import annotations

import numpy as np
import dataclasses

import torch
import torch.fx as fx
from torch import nn

from ..utils import output_tensors
from ._unionfind import CONST, WILD, UnionFind, shrink
from .structure import ActSite, CoBStructure, Group, Note, ParamRule
from .tracing import is_stochastic_depth

__all__ = ["Propagator", "op_name", "tensors_in", "full_ids", "compact", "cat_ids"]


def op_name(node: fx.Node, modules: dict) -> str:
    """Short name of a node's operation for notes and group names (``Linear``, ``F.relu``, ``Tensor.view``...)."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("_operator") or mod == "operator":
        return f"operator.{name}"
    return f"torch.{name}" if mod.startswith("torch") else name


def tensors_in(x):
    """The tensors in ``x`` (a tensor, or nested lists / tuples / dicts), depth first."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from tensors_in(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from tensors_in(y)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):  # an output dataclass (ModelOutput-like)
        for f in dataclasses.fields(x):
            yield from tensors_in(getattr(x, f.name))


def full_ids(shape, value: int) -> torch.Tensor:
    """Atom-id tensor of ``shape`` with every entry ``value`` (e.g. ``CONST``, ``WILD``); an expanded view."""
    return torch.full((), value, dtype=torch.int64).expand(shape)


class Propagator:
    """Atom-id state of one analysis and the primitives of the rules; ``step(node, value)`` (one rule per fx
    node) is provided by the subclass :class:`gradcond.graph.dispatch.Analyzer`."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, rewrite: bool, exported: bool = False):
        self.model = model
        self.gm = gm
        self.rewrite = rewrite
        self.exported = exported
        self.tracer = "torch.fx symbolic tracing"
        self.modules = dict(gm.named_modules())
        self.uf = UnionFind()
        self.val: dict = {}
        self.idx: dict = {}
        self.param_node: dict = {}
        self.groups: list[Group] = []
        self.sites_raw: list = []
        self.frozen: list[Note] = []
        self.pins: list[Note] = []
        self.param_sites: dict[str, list] = {}
        self.plain_use: set[str] = set()
        # canonical parameter names (named_parameters de-duplicates shared parameters)
        self.pname = {id(p): n for n, p in model.named_parameters()}
        self.params = dict(model.named_parameters())
        self.mod_path: dict[int, str] = {}
        for mname, m in model.named_modules(remove_duplicate=False):
            self.mod_path.setdefault(id(m), mname)
        self.virtual: dict[str, tuple] = {}  # virtual parameter name -> spec (see Rules._virtual_param)
        self.teleport_frozen_params = False
        self._noted: set = set()
        self.module_calls: dict[int, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                k = id(self.modules[node.target])
                self.module_calls[k] = self.module_calls.get(k, 0) + 1

    # ---- small helpers ------------------------------------------------------------------------------
    def fresh(self, n: int, node: fx.Node, what: str) -> torch.Tensor:
        ids = self.uf.fresh(n)
        self.groups.append(Group(name=f"{node.name}: {what}", node=node.name, size=n, start=int(ids[0]) if n else 0))
        return ids

    def I(self, a):
        """Atom ids of argument ``a`` (a Node or a constant); marks plain use of a parameter."""
        if isinstance(a, fx.Node):
            if a in self.param_node:
                self.plain_use.add(self.param_node[a])
            return self.idx.get(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self.I(x) for x in a)
        return None

    def V(self, a):
        if isinstance(a, fx.Node):
            return self.val[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.V(x) for x in a)
        if isinstance(a, dict):
            return {k: self.V(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self.V(a.start), self.V(a.stop), self.V(a.step))
        return a

    def pin_all(self, x) -> None:
        if isinstance(x, torch.Tensor):
            self.uf.pin_tensor(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                self.pin_all(y)
        elif isinstance(x, dict):
            for y in x.values():
                self.pin_all(y)

    def const_like(self, v, fill=CONST):
        if isinstance(v, torch.Tensor):
            return full_ids(v.shape, fill)
        if isinstance(v, (list, tuple)):
            return type(v)(self.const_like(x, fill) for x in v) if not hasattr(v, "_fields") else tuple(
                self.const_like(x, fill) for x in v)
        return None

    def _note_once(self, where: list, node: str, op: str, reason: str) -> None:
        key = (id(where), node, reason)
        if key not in self._noted:
            self._noted.add(key)
            where.append(Note(node, op, reason))

    def channel_rep(self, ids: torch.Tensor, cdim: int) -> torch.Tensor:
        """Tie the taus of each channel (dim ``cdim``) over all other dims; returns (C,) signed ids."""
        cdim = cdim % ids.dim()
        others = tuple(d for d in range(ids.dim()) if d != cdim)
        rep = self.uf.union_along(ids, others)
        return rep.reshape(-1)

    def param_of(self, a) -> str | None:
        if isinstance(a, fx.Node) and a in self.param_node:
            return self.param_node[a]
        return None

    def is_const(self, ids: torch.Tensor) -> bool:
        r = self.uf.resolve_tensor(ids)
        return bool(((r == CONST) | (r == WILD)).all())

    def frozen_node(self, node: fx.Node, op: str, reason: str, args_idx, value) -> None:
        self.pin_all(args_idx)
        self.frozen.append(Note(node.name, op, reason))
        self.idx[node] = self.const_like(value)

    def pin_note(self, node: fx.Node, op: str, reason: str) -> None:
        self.pins.append(Note(node.name, op, reason))

    def add_site(self, node: fx.Node, kind: str, op: str, ids: torch.Tensor, in_ndim: int) -> None:
        """Register an activation site; with rewrite=False pin (scale) or constrain (sign) instead."""
        if not self.rewrite:
            if kind == "scale":
                self.uf.pin_tensor(ids)
                self.pin_note(node, op, "rewrite=False: a non-homogeneous activation needs tau = 1")
            else:
                self.uf.positive_tensor(ids)
            return
        path = node.target if node.op == "call_module" else None
        unique = (path is not None and self.module_calls.get(id(self.modules[path]), 0) == 1
                  and not self._fast_path_bypassed(path))
        if self.exported and not unique:
            # an exported graph is never rewritten (teleport must keep running the user's forward): pin instead
            if kind == "scale":
                self.uf.pin_tensor(ids)
                self.pin_note(node, op, "activation is a function call or a module called several times in an "
                                        "exported (torch.export) graph: tau = 1")
            else:
                self.uf.positive_tensor(ids)
            return
        self.sites_raw.append((node.name, kind, op, path, unique, ids, in_ndim))

    def _fast_path_bypassed(self, path: str) -> bool:
        """Whether module ``path`` sits in an ``nn.TransformerEncoderLayer`` (or is the root one): in eval mode
        without grad its fast path (``torch._transformer_encoder_layer_fwd``) applies relu/gelu from a flag set at
        construction and never calls ``self.activation``, so swapping that module for a wrapper would be ignored
        there.  Such sites are treated like shared modules: rewritten in the graph (fx) or pinned (export)."""
        parts = path.split(".")
        for k in range(len(parts)):
            try:
                owner = self.model.get_submodule(".".join(parts[:k]))
            except AttributeError:
                return False
            if isinstance(owner, nn.TransformerEncoderLayer):
                return True
        return False

    # ---- execution --------------------------------------------------------------------------------
    def run(self, inputs: tuple, kwargs: dict | None = None) -> None:
        """Run the graph on positional ``inputs`` and keyword ``kwargs`` (matched to placeholders by name)."""
        it = iter(inputs)
        named = dict(kwargs or {})
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and str(node.target).lstrip("*") in named:
                v = named.pop(str(node.target).lstrip("*"))
                self.val[node] = v
                self.idx[node] = self.const_like(v)
                continue
            if node.op == "placeholder":
                try:
                    v = next(it)
                except StopIteration:
                    if node.args:
                        v = node.args[0]
                    else:
                        raise ValueError(
                            f"example_input has too few entries for the model's forward (missing {node.target!r}); "
                            "pass a tuple with one entry per positional argument.") from None
                self.val[node] = v
                self.idx[node] = self.const_like(v)
                continue
            if node.op == "get_attr":
                v = self.gm
                for part in node.target.split("."):
                    v = getattr(v, part)
                self.val[node] = v
                self.idx[node] = self.const_like(v)
                if isinstance(v, nn.Parameter) and id(v) in self.pname:
                    self.param_node[node] = self.pname[id(v)]
                continue
            if node.op == "output":
                self.I(node.args[0])
                for t in self._idx_tensors(self._preserved(node.args[0])):
                    self.uf.pin_tensor(t)
                if named:
                    raise ValueError(f"example_input has keyword inputs the model's forward does not take: "
                                     f"{', '.join(sorted(named))}; pass only the forward's argument names.")
                continue
            args = self.V(node.args)
            kwargs = self.V(dict(node.kwargs))
            if node.op == "call_module":
                v = self.modules[node.target](*args, **kwargs)
            elif node.op == "call_function" and is_stochastic_depth(node.target):
                # the analysis runs in eval mode, where stochastic depth is the identity; the traced graph may hold
                # training=True from trace time, and running it would draw from the global RNG
                v = args[0] if args else kwargs["input"]
            elif node.op == "call_function":
                v = node.target(*args, **kwargs)
            else:
                v = getattr(args[0], node.target)(*args[1:], **kwargs)
            self.val[node] = v
            if not any(True for _ in tensors_in(v)):
                # shape queries (x.shape, x.size(0)...) carry no tau and constrain nothing
                self.idx[node] = None
                continue
            self.step(node, v)

    def _preserved(self, out):
        """The part of the graph's output that the analysis preserves (pins): the nodes holding the tensors
        :func:`gradcond.utils.output_tensors` picks with ``self.output`` (default: a ``logits`` field, else every
        tensor).  An exported graph already returns only those; a selector that computes a new tensor (not one of
        the output's nodes) pins the whole output."""
        if self.exported:
            return out
        chosen = {id(t) for _, t in output_tensors(self.V(out), getattr(self, "output", None))}
        leaves: list = []

        def walk(a):
            if isinstance(a, fx.Node):
                if (a.op == "call_function" and isinstance(a.target, type) and isinstance(self.idx.get(a), dict)):
                    walk(list(a.args) + list(a.kwargs.values()))  # an output dataclass built in the graph
                else:
                    leaves.append(a)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    walk(x)
            elif isinstance(a, dict):
                for x in a.values():
                    walk(x)

        walk(out)
        found = [n for n in leaves if id(self.val.get(n)) in chosen]
        return found if {id(self.val[n]) for n in found} == chosen else leaves

    def _idx_tensors(self, a):
        if isinstance(a, fx.Node):
            yield from tensors_in(self.idx.get(a))
        elif isinstance(a, (list, tuple)):
            for x in a:
                yield from self._idx_tensors(x)
        elif isinstance(a, dict):
            for x in a.values():
                yield from self._idx_tensors(x)

    def step(self, node: fx.Node, v) -> None:
        """Apply the rule of ``node`` (output value ``v``): set ``self.idx[node]``, record ties, pins, sites."""
        raise NotImplementedError

    # ---- finalisation -------------------------------------------------------------------------------
    def finalize(self, param_shapes: dict, tau_dtype) -> CoBStructure:
        uf = self.uf
        # parameters used at several places: tie term-wise, or pin when the roles differ
        sites_by_param = {}
        for name in set(self.param_sites) | self.plain_use:
            s = list(self.param_sites.get(name, []))
            if name in self.plain_use:
                s.append([])
            sites_by_param[name] = s
        rules_raw = {}
        for name, s in sites_by_param.items():
            if len(s) > 1:  # shared (tied) weights, e.g. an input embedding tied to the LM head: factors fixed
                s = [[t for t in o if not self.is_const(t)] for o in s]  # to 1 (pinned logits) drop out (exact)
            base = s[0]
            ok = all(len(o) == len(base) and all(ta.shape == tb.shape for ta, tb in zip(o, base)) for o in s[1:])
            if ok:
                for o in s[1:]:
                    for ta, tb in zip(o, base):
                        uf.union_tensors(ta, tb)
            elif any(not o for o in s):  # one use keeps it unchanged (factor 1): so must every other use
                for o in s:
                    for ta in o:
                        uf.pin_tensor(ta)
                self.pins.append(Note(name, "parameter", "shared (tied) parameter, e.g. an embedding tied to the LM "
                                      "head: one of its uses keeps it unchanged (pinned taus), so its factors at "
                                      "the other uses are pinned too"))
            else:
                for o in s:
                    for ta in o:
                        uf.pin_tensor(ta)
                self.frozen.append(Note(name, "parameter", "used at several places in different roles; pinned"))
            if base:
                rules_raw[name] = base
        # free variables = roots of atom classes not tied to the constant (vectorised over all atoms: one
        # pointer-jumping pass instead of one Python find per atom)
        n_atoms = len(uf)
        root_np, parity_np = uf.roots()
        root_np = np.where(root_np == CONST, 0, root_np)
        root_np[:2] = 0
        roots = [int(r) for r in np.unique(root_np[2:]).tolist() if r != 0]
        n = len(roots)
        free_of_root = np.zeros(n_atoms, dtype=np.int64)
        free_of_root[roots] = np.arange(1, n + 1)
        pos_list = uf.positive
        positive = torch.tensor([pos_list[r] for r in roots], dtype=torch.bool)
        # lookup from a signed resolved id to a gidx into [1, tau, 1, 1/tau]
        lut = torch.zeros(2 * n_atoms + 1, dtype=torch.int64)
        if n:
            rt = torch.tensor(roots)
            lut[n_atoms + rt] = torch.arange(1, n + 1)
            lut[n_atoms - rt] = torch.arange(1, n + 1) + n + 1
        # the same lookup from a signed *unresolved* id (resolution folded in from the snapshot of the forest):
        # to_gidx becomes one gather; valid while the union-find is unchanged (see `stale` below)
        signed = root_np * parity_np  # resolved id of +a (0 for pinned atoms and WILD)
        table = torch.empty(2 * n_atoms + 1, dtype=torch.int64)
        table[n_atoms:2 * n_atoms] = lut[torch.from_numpy(n_atoms + signed)]
        table[1:n_atoms + 1] = lut[torch.from_numpy(n_atoms - signed[::-1].copy())]
        table[0] = table[2 * n_atoms] = 0  # out of range for signed atom ids
        stale = False

        def to_gidx(ids: torch.Tensor) -> torch.Tensor:
            ids = shrink(ids)  # constant dims narrowed: compact() of the result is unchanged, and it is smaller
            if not stale:
                return table[ids + n_atoms]
            r = uf.resolve_tensor(ids)
            r = torch.where(r == CONST, torch.zeros_like(r), r)
            return lut[r + n_atoms]

        rules = {}
        for name, terms in rules_raw.items():
            g = [compact(to_gidx(t)) for t in terms]
            g = [x for x in g if bool((x != 0).any())]
            if g:
                rules[name] = ParamRule(name=name, shape=tuple(param_shapes[name]), gidx=g)
        sites = []
        for (nname, kind, op, path, unique, ids, in_ndim) in self.sites_raw:
            g = compact(to_gidx(ids))
            if not bool((g != 0).any()):
                continue
            # strip leading singleton dims so the tau broadcasts against any batch size
            shape = list(g.shape)
            while len(shape) > 1 and shape[0] == 1:
                shape.pop(0)
            if len(shape) == in_ndim and shape[0] != 1 and in_ndim > 1:
                # varies along the batch dim: cannot happen for per-neuron taus; tie to be safe
                stale = True  # the tie may merge classes: resolve through the union-find from here on
                g = compact(to_gidx(uf.union_along(ids, (0,))))
                shape = list(g.shape)
                while len(shape) > 1 and shape[0] == 1:
                    shape.pop(0)
            sites.append(ActSite(node=nname, kind=kind, op=op, module_path=path, unique=unique,
                                 gidx=g.reshape(shape)))
        # group summary: an atom is pinned (root 0), free (the first atom of its class, in group order) or tied
        free_group = torch.zeros(n, dtype=torch.int64)
        if self.groups:
            atoms = np.concatenate([np.arange(g.start, g.start + g.size, dtype=np.int64) for g in self.groups])
            gid = np.repeat(np.arange(len(self.groups)), [g.size for g in self.groups])
            r = root_np[atoms]
            first = np.zeros(len(atoms), dtype=bool)
            _, first_at = np.unique(r, return_index=True)
            first[first_at] = True
            free = first & (r != 0)
            pinned = r == 0
            pos_root = np.asarray(pos_list, dtype=bool)
            n_groups = len(self.groups)
            c_free = np.bincount(gid[free], minlength=n_groups)
            c_pin = np.bincount(gid[pinned], minlength=n_groups)
            c_pos = np.bincount(gid[free & pos_root[r]], minlength=n_groups)
            for gi, grp in enumerate(self.groups):
                grp.free += int(c_free[gi])
                grp.pinned += int(c_pin[gi])
                grp.tied += grp.size - int(c_free[gi]) - int(c_pin[gi])
                grp.positive += int(c_pos[gi])
            fr = r[free]
            free_group[torch.from_numpy(free_of_root[fr] - 1)] = torch.from_numpy(gid[free])
        return CoBStructure(
            model_class=type(self.model).__name__, num_free=n, positive=positive, rules=rules, sites=sites,
            groups=self.groups, frozen=self.frozen, pins=self.pins, param_shapes=param_shapes,
            graph_module=self.gm, rewrite=self.rewrite, tau_dtype=tau_dtype, free_group=free_group,
            tracer=self.tracer,
        )


_CAT_FUNCS = (torch.cat, torch.concat, torch.concatenate)


def cat_ids(fn, data: list, rest: list, kwargs: dict):
    """``fn(data, *rest, **kwargs)`` for a list-taking move (cat, stack...); for ``torch.cat`` of id tensors the
    dims along which every operand is constant are concatenated at size 1 and broadcast back (same values, an
    expanded view): concatenating the broadcast ids of a DenseNet's feature maps would otherwise materialise
    activation-sized integer tensors at every layer."""
    if fn not in _CAT_FUNCS or not data or not all(isinstance(t, torch.Tensor) and t.numel() > 0 for t in data):
        return fn(data, *rest, **kwargs)
    nd = data[0].dim()
    dim = kwargs.get("dim", rest[0] if rest else 0)
    if not isinstance(dim, int) or any(t.dim() != nd for t in data) or len(rest) > 1 or set(kwargs) - {"dim"}:
        return fn(data, *rest, **kwargs)
    d = dim % nd
    small = [shrink(t) for t in data]
    narrow = [e for e in range(nd) if e != d and all(t.shape[e] == 1 for t in small)]
    if not narrow:
        return fn(data, *rest, **kwargs)
    shape = list(data[0].shape)
    shape[d] = sum(t.shape[d] for t in data)
    parts = []
    for t in data:
        for e in narrow:
            t = t.narrow(e, 0, 1)
        parts.append(t)
    return torch.cat(parts, d).expand(shape)


def compact(g: torch.Tensor) -> torch.Tensor:
    """Keep only the dims along which ``g`` varies (size-1 elsewhere); contiguous result."""
    for d in range(g.dim()):
        if g.shape[d] > 1:
            first = g.narrow(d, 0, 1)
            if bool((g == first).all()):
                g = first
    return g.contiguous()

