"""Per-op propagation rules of :func:`gradcond.graph.analyze` (the rule list is in :mod:`gradcond.graph.analyze`).

:class:`Rules` adds to the :class:`~gradcond.graph.propagate.Propagator` primitives what each kind of operation
does to atom ids: layers that create fresh taus and record how their parameters scale (Linear, Conv/ConvTranspose,
norm affines, Embedding, MultiheadAttention), ops that move, tie or pin atoms (elementwise activation sites,
pooling, moves, add/sub, mul/div, matmul, reductions, softmax, masked_fill, where, scaled-dot-product attention),
and the parameter side: :meth:`Rules.add_param_site` with the weights computed from other tensors (weight norm,
pruning, other parametrizations: :meth:`Rules._virtual_param`) and frozen (``requires_grad=False``) parameters.
Which rule an fx node gets is decided in :mod:`gradcond.graph.dispatch`.

Cost: each rule is a few integer tensor operations on the atom ids of its operands, plus the union-find ties.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch import nn

from ._unionfind import CONST, WILD
from .propagate import Propagator, cat_ids, full_ids, op_name

__all__ = ["Rules"]


class Rules(Propagator):
    """The rules (methods named after the op they handle) and the parameter-site bookkeeping."""

    # ---- parameters ---------------------------------------------------------------------------------
    def add_param_site(self, name: str, terms: list) -> None:
        """Record that parameter ``name`` is multiplied by ``prod(terms)`` (atom-id tensors broadcasting to it).

        A virtual name (a weight computed by a parametrization / pre-hook, see :meth:`_virtual_param`) is mapped onto
        the tensors it is computed from, or its terms are pinned; a ``requires_grad=False`` parameter is pinned
        unless ``analyze(..., teleport_frozen_params=True)``."""
        spec = self.virtual.get(name)
        if spec is not None:
            kind = spec[0]
            if kind == "frozen":
                for t in terms:
                    self.uf.pin_tensor(t)
                self._note_once(self.frozen, spec[1], spec[2], spec[3])
                return
            if kind == "alias":  # pruning: weight = weight_orig * mask, the mask commutes with any factor
                name = spec[1]
            else:  # weight norm: weight = g * v / ||v|| (norm over every dim but `dim`)
                _, gname, dim, api, wshape, what = spec
                gshape = tuple(self.params[gname].shape)
                nd = len(wshape)
                gterms, pinned = [], False
                for t in terms:
                    tt = t.reshape((1,) * (nd - t.dim()) + tuple(t.shape)) if t.dim() < nd else t
                    if dim is not None and len(gshape) == nd and all(tt.shape[d] == 1 for d in range(nd) if d != dim):
                        gterms.append(tt.expand(gshape))
                    else:
                        self.uf.pin_tensor(t)
                        pinned = True
                if pinned:
                    self._note_once(self.pins, what, api,
                                    "weight norm: g * v / ||v|| is normalised per slice along dim "
                                    f"{dim}; factors that vary within a slice (e.g. the layer's input taus) would "
                                    "change ||v|| and are pinned; g takes the factors constant on each slice")
                if not gterms:
                    return
                name, terms = gname, gterms
        p = self.params.get(name)
        if p is not None and not p.requires_grad and not self.teleport_frozen_params:
            for t in terms:
                self.uf.pin_tensor(t)
            self._note_once(self.frozen, name, "parameter",
                            "requires_grad=False (frozen layer): pinned and left unchanged; "
                            "analyze(..., teleport_frozen_params=True) teleports it")
            return
        self.param_sites.setdefault(name, []).append(terms)

    def _virtual_param(self, mod: nn.Module, attr: str) -> str:
        """A name standing for ``mod.<attr>`` when it is a tensor computed from other tensors (not an
        ``nn.Parameter``), with its spec in ``self.virtual``:

        * ``torch.nn.utils.parametrizations.weight_norm`` and legacy ``torch.nn.utils.weight_norm``
          (``W = g * v / ||v||``): ``("wn", g, dim, ...)`` -- *decision*: ``g`` takes the factor terms that are
          constant on each normalised slice (for ``dim=0``: the output taus), ``v`` is left unchanged, and the other
          terms (the input taus) are pinned.  Exact: ``g' v / ||v|| = tau_out * W``.  (Putting the input factors
          into ``v`` would make ``g`` depend on ``||v'|| / ||v||``, a value-dependent, non-diagonal map that
          gradient and optimizer-state transport cannot follow.)
        * ``torch.nn.utils.prune`` (``W = weight_orig * weight_mask``): ``("alias", weight_orig)`` -- the factor
          goes to ``weight_orig``, the mask is kept (exact: the mask multiplies elementwise).
        * anything else (``spectral_norm``, ``orthogonal``, user parametrizations, a plain tensor attribute):
          ``("frozen", ...)``, every term pinned and the construct listed in ``structure.frozen``.  *Decision*:
          a parametrization with a right inverse is not enough -- ``P(F * X) = F * P(X)`` must hold for the factors
          ``F``, which is known only for the cases above.
        """
        path = self.mod_path.get(id(mod), type(mod).__name__)
        what = f"{path}.{attr}" if path else attr
        vname = f"<computed>{what}"
        if vname in self.virtual:
            return vname
        from torch.nn.utils import parametrize
        wshape = tuple(getattr(mod, attr).shape)
        spec = None
        if parametrize.is_parametrized(mod, attr):
            plist = mod.parametrizations[attr]
            kinds = [type(q).__name__ for q in plist]
            if kinds == ["_WeightNorm"] and hasattr(plist, "original0") and hasattr(plist, "original1"):
                g = plist.original0
                dim = plist[0].dim
                dim = None if dim is None or dim == -1 else dim % len(wshape)
                spec = ("wn", self.pname[id(g)], dim, "parametrizations.weight_norm", wshape, what)
            else:
                spec = ("frozen", what, "parametrization",
                        f"{attr} is computed by parametrization {' -> '.join(kinds)}, which has no exact "
                        "change-of-basis rule; the factors of the tensors it feeds are pinned")
        else:
            from torch.nn.utils.prune import BasePruningMethod
            from torch.nn.utils.weight_norm import WeightNorm
            for h in mod._forward_pre_hooks.values():
                if isinstance(h, WeightNorm) and h.name == attr:
                    g = getattr(mod, attr + "_g")
                    dim = None if h.dim is None or h.dim == -1 else h.dim % len(wshape)
                    spec = ("wn", self.pname[id(g)], dim, "torch.nn.utils.weight_norm", wshape, what)
                elif isinstance(h, BasePruningMethod) and getattr(h, "_tensor_name", None) == attr:
                    orig = getattr(mod, attr + "_orig", None)
                    if isinstance(orig, nn.Parameter) and spec is None:
                        spec = ("alias", self.pname[id(orig)])
            if spec is not None and spec[0] == "wn" and any(
                    isinstance(h, BasePruningMethod) for h in mod._forward_pre_hooks.values()):
                spec = None  # weight norm and pruning on one module: no combined rule
            if spec is None:
                spec = ("frozen", what, "tensor attribute",
                        f"{attr} is a tensor computed outside the module's parameters (not an nn.Parameter, no "
                        "known parametrization); the factors of the tensors it feeds are pinned")
        self.virtual[vname] = spec
        return vname

    def mod_param(self, mod: nn.Module, attr: str) -> str | None:
        p = getattr(mod, attr, None)
        if isinstance(p, nn.Parameter):
            return self.pname[id(p)]
        if isinstance(p, torch.Tensor) and p.is_floating_point():
            # weight_norm / pruning / parametrizations: a tensor computed from other tensors (see _virtual_param)
            return self._virtual_param(mod, attr)
        return None

    # ---- rules --------------------------------------------------------------------------------------
    def linear(self, node, x, out_features, wname, bname, v):
        tin = self.channel_rep(x, -1)
        tout = self.fresh(out_features, node, f"{op_name(node, self.modules)} output")
        if wname:
            self.add_param_site(wname, [tout.view(-1, 1), -tin.view(1, -1)])
        if bname:
            self.add_param_site(bname, [tout])
        self.idx[node] = tout.expand(v.shape)

    def conv(self, node, x, xv, k, cout, groups, wname, bname, v, transposed):
        cdim = xv.dim() - 1 - k
        tin = self.channel_rep(x, cdim)
        cin = tin.numel()
        tout = self.fresh(cout, node, f"{op_name(node, self.modules)} output channels")
        ones = (1,) * k
        if wname:
            if not transposed:
                # weight (C_out, C_in/g, *k): entry (o, i) reads input channel (o // (C_out/g)) * (C_in/g) + i
                og, ig = cout // groups, cin // groups
                o = torch.arange(cout).view(-1, 1)
                i = torch.arange(ig).view(1, -1)
                in_ch = (o // og) * ig + i
                # groups == 1: in_ch[o, i] = i, the input taus broadcast over the rows (no (C_out, C_in) gather)
                tin_w = (-tin).view((1, cin) + ones).expand((cout, ig) + ones) if groups == 1 else \
                    -tin[in_ch].view((cout, ig) + ones)
                terms = [tout.view((cout, 1) + ones), tin_w]
            else:
                # weight (C_in, C_out/g, *k): entry (i, o) writes output channel (i // (C_in/g)) * (C_out/g) + o
                og, ig = cout // groups, cin // groups
                i = torch.arange(cin).view(-1, 1)
                o = torch.arange(og).view(1, -1)
                out_ch = (i // ig) * og + o
                tout_w = tout.view((1, cout) + ones).expand((cin, og) + ones) if groups == 1 else \
                    tout[out_ch].view((cin, og) + ones)
                terms = [tout_w, -tin.view((cin, 1) + ones)]
            self.add_param_site(wname, terms)
        if bname:
            self.add_param_site(bname, [tout])
        shape = [1] * v.dim()
        shape[v.dim() - 1 - k] = cout
        self.idx[node] = tout.view(shape).expand(v.shape)

    def channel_norm(self, node, op, x, v, wname, bname, reason):
        self.uf.pin_tensor(x)
        self.pin_note(node, op, reason)
        if wname is None and bname is None:
            self.idx[node] = self.const_like(v)
            return
        cdim = 1 if v.dim() > 1 else 0
        c = v.shape[cdim]
        tout = self.fresh(c, node, f"{op} affine output")
        if wname:
            self.add_param_site(wname, [tout])
        if bname:
            self.add_param_site(bname, [tout])
        shape = [1] * v.dim()
        shape[cdim] = c
        self.idx[node] = tout.view(shape).expand(v.shape)

    def last_norm(self, node, op, x, v, nshape, wname, bname):
        self.uf.pin_tensor(x)
        self.pin_note(node, op, f"{op} input pinned (normalisation over features is not per-neuron homogeneous)")
        if wname is None and bname is None:
            self.idx[node] = self.const_like(v)
            return
        n = math.prod(nshape)
        tout = self.fresh(n, node, f"{op} affine output").view(nshape)
        if wname:
            self.add_param_site(wname, [tout])
        if bname:
            self.add_param_site(bname, [tout])
        self.idx[node] = tout.expand(v.shape)

    def embedding(self, node, v, dim, wname):
        tout = self.fresh(dim, node, f"{op_name(node, self.modules)} output")
        if wname:
            self.add_param_site(wname, [tout.view(1, -1)])
        self.idx[node] = tout.expand(v.shape)

    def elementwise_site(self, node, kind, op, x):
        self.idx[node] = x
        self.add_site(node, kind, op, x, x.dim())

    def pooled(self, node, x, xv, v, k, site, op):
        lead = xv.dim() - k
        rep = self.uf.union_along(x, tuple(range(lead, xv.dim())))  # shape lead + (1,)*k
        if site is not None:
            self.add_site(node, site, op, rep, xv.dim())
        self.idx[node] = rep.expand(v.shape)

    def move(self, node, v, fn):
        args = list(node.args)
        kwargs = self.V(dict(node.kwargs))
        first = args[0]
        if isinstance(first, (list, tuple)):  # cat / stack
            data = [self.I(a) for a in first]
            rest = [self.V(a) for a in args[1:]]
            out = cat_ids(fn, data, rest, kwargs)
        else:
            x = self.I(first)
            name = node.target if isinstance(node.target, str) else ""
            if name == "view":
                x = x.contiguous()
            rest = [self.V(a) for a in args[1:]]
            self.I(args[1:])
            out = fn(x, *rest, **kwargs)
        self.idx[node] = out

    def _scalar(self, a):
        return not isinstance(self.V(a), torch.Tensor)

    def add(self, node, a, b, v):
        if self._scalar(a) or self._scalar(b):
            t, c = (b, a) if self._scalar(a) else (a, b)
            x = self.I(t)
            if self.V(c) != 0:
                self.uf.pin_tensor(x)
                self.pin_note(node, op_name(node, self.modules), "adding a non-zero constant pins the operand")
            self.idx[node] = x.expand(v.shape)
            return
        pa, pb = self.param_of(a), self.param_of(b)
        if (pa is None) != (pb is None):
            p, t = (a, b) if pa else (b, a)
            pname = pa or pb
            x = self.I(t)
            pshape = self.val[p].shape
            if tuple(torch.broadcast_shapes(pshape, x.shape)) == tuple(x.shape):
                # parameter acts as a bias: scale it by the tau of the position it is added to
                xf = x.expand(v.shape)
                nd = len(v.shape)
                pfull = (1,) * (nd - len(pshape)) + tuple(pshape)
                dims = tuple(d for d in range(nd) if pfull[d] == 1 and v.shape[d] != 1)
                rep = self.uf.union_along(xf, dims) if dims else xf
                rep = rep.expand(tuple(1 if d in dims else v.shape[d] for d in range(nd)))
                self.add_param_site(pname, [rep.reshape(pshape)])
                self.idx[node] = xf
                return
        ia, ib = self.I(a), self.I(b)
        ia, ib = torch.broadcast_tensors(ia, ib)
        self.uf.union_tensors(ia, ib)
        self.idx[node] = torch.where(ia == WILD, ib, ia)

    def mul(self, node, a, b, v):
        if self._scalar(a) or self._scalar(b):
            t = b if self._scalar(a) else a
            self.idx[node] = self.I(t).expand(v.shape)
            return
        ia, ib = self.I(a), self.I(b)
        if self.is_const(ib):
            self.idx[node] = ia.expand(v.shape)
        elif self.is_const(ia):
            self.idx[node] = ib.expand(v.shape)
        else:
            self.uf.pin_tensor(ib)
            self.pin_note(node, op_name(node, self.modules), "tensor * tensor: second operand pinned")
            self.idx[node] = ia.expand(v.shape)

    def div(self, node, a, b, v):
        if self._scalar(b):
            self.idx[node] = self.I(a).expand(v.shape)
            return
        ib = self.I(b)
        if not self.is_const(ib):
            self.uf.pin_tensor(ib)
            self.pin_note(node, op_name(node, self.modules), "divisor pinned")
        if self._scalar(a):
            self.idx[node] = self.const_like(v)
        else:
            self.idx[node] = self.I(a).expand(v.shape)

    def matmul(self, node, op, a, b, v):
        ia, ib = self.I(a), self.I(b)
        if ia is None or ib is None or ia.dim() < 2 or ib.dim() < 2:
            return self.frozen_node(node, op, "matmul with a 1-D operand", [ia, ib], v)
        uf = self.uf
        if self.is_const(ib):
            rep = uf.union_along(ia, (-1,))
            self.idx[node] = rep.expand(v.shape)
            return
        if self.is_const(ia):
            rep = uf.union_along(ib, (-2,))
            self.idx[node] = rep.expand(v.shape)
            return
        ra, rb = uf.resolve_tensor(ia), uf.resolve_tensor(ib)
        if bool((ra == ra[..., :1, :]).all()) and bool((rb == rb[..., :1]).all()):
            # contraction only: tau_a[k] * tau_b[k] = 1
            uf.union_tensors(ra[..., :1, :], -rb[..., :1].transpose(-1, -2))
            self.idx[node] = self.const_like(v)
            return
        uf.pin_tensor(ib)
        self.pin_note(node, op, "matmul: right operand pinned")
        rep = uf.union_along(ia, (-1,))
        self.idx[node] = rep.expand(v.shape)

    def _dims(self, node, x):
        args, kw = node.args, node.kwargs
        dim = self.V(kw["dim"]) if "dim" in kw else (self.V(args[1]) if len(args) > 1 else None)
        keep = self.V(kw["keepdim"]) if "keepdim" in kw else (self.V(args[2]) if len(args) > 2 else False)
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            dims = tuple(range(x.dim()))
        elif isinstance(dim, int):
            dims = (dim,)
        else:
            dims = tuple(dim)
        return tuple(d % max(1, x.dim()) for d in dims), bool(keep)

    def reduce(self, node, op, v, positive):
        x = self.I(node.args[0])
        if len(node.args) > 1 and isinstance(self.V(node.args[1]), torch.Tensor):  # torch.max(a, b)
            return self.frozen_node(node, op, "elementwise max/min of two tensors", self.I(node.args), v)
        dims, keep = self._dims(node, x)
        if x.dim() == 0:
            rep = x
        else:
            rep = self.uf.union_along(x, dims)
            if positive:
                self.uf.positive_tensor(rep)
            if not keep:
                rep = rep.reshape([s for d, s in enumerate(rep.shape) if d not in dims])
        if isinstance(v, torch.Tensor):
            self.idx[node] = rep.expand(v.shape)
        else:  # (values, indices)
            self.idx[node] = (rep.expand(v[0].shape), full_ids(v[1].shape, CONST))

    def softmax(self, node, op, v):
        self.pin_all(self.I(node.args[0]))
        self.pin_note(node, op, "softmax input pinned (not homogeneous)")
        self.idx[node] = self.const_like(v)

    def masked_fill(self, node, op, v):
        x = self.I(node.args[0])
        self.I(node.args[1:])
        value = self.V(node.args[2]) if len(node.args) > 2 else self.V(node.kwargs.get("value"))
        if isinstance(value, torch.Tensor) or value != 0:
            self.uf.pin_tensor(x)
            self.pin_note(node, op, "masked_fill with a non-zero value pins the input")
        self.idx[node] = x.expand(v.shape)

    def where(self, node, op, args, v):
        self.I(args[0])
        outs = []
        for a in args[1:]:
            if self._scalar(a):
                outs.append(full_ids(v.shape, WILD if self.V(a) == 0 else CONST))
            else:
                outs.append(self.I(a).expand(v.shape))
        self.uf.union_tensors(outs[0], outs[1])
        self.idx[node] = torch.where(outs[0] == WILD, outs[1], outs[0])

    def sdpa(self, node, op, v):
        args, kw = node.args, node.kwargs
        q, k, val = (self.I(args[i]) for i in range(3))
        mask = args[3] if len(args) > 3 else kw.get("attn_mask")
        if isinstance(mask, fx.Node):
            self.pin_all(self.I(mask))
        if (self.V(kw.get("enable_gqa", False)) and q.dim() >= 3 and k.dim() == q.dim() and val.dim() == q.dim()
                and k.shape[-3] == val.shape[-3] and q.shape[-3] % k.shape[-3] == 0):
            # grouped-query attention inside sdpa: k and v heads are repeated (repeat_interleave) to the q heads,
            # so the same per-head-dim ties hold on the repeated ids (exact, like an explicit repeat_kv)
            rep = q.shape[-3] // k.shape[-3]
            k, val = k.repeat_interleave(rep, dim=-3), val.repeat_interleave(rep, dim=-3)
        if q.shape[:-2] != k.shape[:-2] and torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]) != q.shape[:-2]:
            self.pin_all([q, k, val])
            self.pin_note(node, op, "attention with q and k heads that do not broadcast: q, k and v pinned")
            val = self.const_like(self.V(args[2]))
        else:
            rq = self.uf.union_along(q, (-2,))
            rk = self.uf.union_along(k, (-2,))
            self.uf.union_tensors(*torch.broadcast_tensors(rq, -rk))
        rv = self.uf.union_along(val, (-2,))
        self.idx[node] = rv.expand(v.shape)

    def mha(self, node, mod: nn.MultiheadAttention, op, v):
        args, kw = node.args, node.kwargs
        names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"]
        got = {n: (args[i] if i < len(args) else kw.get(n)) for i, n in enumerate(names)}
        for extra in ("key_padding_mask", "attn_mask"):
            if isinstance(got[extra], fx.Node):
                self.I(got[extra])
        tq_in = self.channel_rep(self.I(got["query"]), -1)
        tk_in = self.channel_rep(self.I(got["key"]), -1)
        tv_in = self.channel_rep(self.I(got["value"]), -1)
        E = mod.embed_dim
        tq = self.fresh(E, node, "MultiheadAttention q dims (k = 1/q)")
        tk = -tq
        tv = self.fresh(E, node, "MultiheadAttention v dims")
        tout = self.fresh(E, node, "MultiheadAttention output")
        P = lambda a: self.mod_param(mod, a)  # noqa: E731
        if mod._qkv_same_embed_dim:
            if P("in_proj_weight"):
                rows = torch.cat([tq, tk, tv]).view(-1, 1)
                cols = torch.cat([-tq_in.view(1, -1).expand(E, -1), -tk_in.view(1, -1).expand(E, -1),
                                  -tv_in.view(1, -1).expand(E, -1)])
                self.add_param_site(P("in_proj_weight"), [rows, cols])
        else:
            for name, to, ti in (("q_proj_weight", tq, tq_in), ("k_proj_weight", tk, tk_in),
                                 ("v_proj_weight", tv, tv_in)):
                if P(name):
                    self.add_param_site(P(name), [to.view(-1, 1), -ti.view(1, -1)])
        if P("in_proj_bias"):
            self.add_param_site(P("in_proj_bias"), [torch.cat([tq, tk, tv])])
        if P("bias_k"):
            self.add_param_site(P("bias_k"), [tk.view(1, 1, -1)])
        if P("bias_v"):
            self.add_param_site(P("bias_v"), [tv.view(1, 1, -1)])
        op_w = self.mod_param(mod.out_proj, "weight")
        op_b = self.mod_param(mod.out_proj, "bias")
        if op_w:
            self.add_param_site(op_w, [tout.view(-1, 1), -tv.view(1, -1)])
        if op_b:
            self.add_param_site(op_b, [tout])
        out, weights = v
        self.idx[node] = (tout.expand(out.shape), None if weights is None else full_ids(weights.shape, CONST))

    # ---- rules for the ops of Hugging Face decoder LMs (issue 19) ---------------------------------------
    def linear_t(self, node, x, wname, wshape, bname, v):
        """``x @ W (+ b)`` with ``W`` a 2-D parameter stored ``(in, out)`` (Hugging Face ``Conv1D`` via
        ``addmm``, hand-written ``x @ W``): the Linear rule with the weight transposed,
        ``W'[i, j] = W[i, j] * tau_out[j] / tau_in[i]``, bias ``* tau_out``.  Exact."""
        tin = self.channel_rep(x, -1)
        tout = self.fresh(wshape[1], node, f"{op_name(node, self.modules)} output")
        self.add_param_site(wname, [-tin.view(-1, 1), tout.view(1, -1)])
        if bname:
            self.add_param_site(bname, [tout])
        self.idx[node] = tout.expand(v.shape)

    def param_scale(self, node, a, b, v) -> bool:
        """``p * x`` / ``x * p`` with ``p`` a parameter and ``x`` constant (every tau of ``x`` pinned or constant):
        ``p`` acts as an affine scale, like a norm's gamma -- the hand-written RMSNorm ``weight * (x *
        rsqrt(mean(x**2) + eps))``, T5's ``T5LayerNorm``, LLaMA's ``LlamaRMSNorm`` -- and gets fresh output taus
        (``p' = p * tau_out``).  Exact: the product scales by ``tau_out`` wherever ``p`` does.  Returns False (no
        rule applied) otherwise."""
        pa, pb = self.param_of(a), self.param_of(b)
        if (pa is None) == (pb is None):
            return False
        p, x = (a, b) if pa else (b, a)
        pname = pa or pb
        pv, xv = self.val[p], self.V(x)
        if not isinstance(xv, torch.Tensor) or not isinstance(v, torch.Tensor) or pv.dim() == 0:
            return False
        if tuple(torch.broadcast_shapes(pv.shape, xv.shape)) != tuple(v.shape) or pv.dim() > v.dim():
            return False
        if not self.is_const(self.I(x)):
            return False
        tout = self.fresh(pv.numel(), node, f"{op_name(node, self.modules)} scale parameter").view(pv.shape)
        self.add_param_site(pname, [tout])
        self.idx[node] = tout.expand(v.shape)
        return True

    def power(self, node, op, x, exponent, v):
        """``x ** p``: ``p == 1`` commutes; otherwise ``(tau x)**p = tau**p x**p`` is not a tau of the same kind, so
        the input is pinned (the ``mean(x**2)`` of RMSNorm: normalisation over features is not per-neuron
        homogeneous, like LayerNorm's input).  A constant input gives a constant."""
        if not isinstance(exponent, (int, float)) or exponent != 1:
            if not self.is_const(x):
                self.uf.pin_tensor(x)
                self.pin_note(node, op, "x ** p (p != 1) pins its input (e.g. RMSNorm's mean(x**2): normalisation "
                                        "over features is not per-neuron homogeneous)")
            self.idx[node] = self.const_like(v)
            return
        self.idx[node] = x.expand(v.shape)

    def all_const(self, node) -> bool:
        """Whether every tensor input of ``node`` carries no free tau (all atoms constant or zero).  Then the output
        does not depend on any tau (constants built from Python values: ``arange``, causal masks, rotary
        ``cos``/``sin`` tables, position ids, comparisons), so it is constant -- exact, no freezing needed.
        Parameters read here count as plain uses (they are pinned at finalisation if they are teleported
        elsewhere), so they never change under the node's feet."""
        ids = [t for t in _tensors(self.I(list(node.args)) + self.I(list(node.kwargs.values())))]
        return all(self.is_const(t) for t in ids)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
