"""Scaling the parameters of a model by a CoB (``V = factor * W``, seed 000 eq. 1), batched.

:func:`gradcond.teleport.teleport` multiplies every ruled parameter by its factor with a fixed number of
vectorised calls: the fast plan (:class:`_FastPlan`, cached per (structure, device, dtype) when all ruled
parameters share a dtype and device), the general batched path (:func:`_scaled`, mixed dtypes) and the
half-precision path (:func:`_scaled_half`: factors and products in float64, rounded once).  The model is checked
against the structure once per model (:func:`_ruled_params`; later calls compare parameter identities and shapes).
"""

from __future__ import annotations

import operator
import weakref

import numpy as np
import torch
from torch import nn

from gradcond.graph import CoBStructure

from .cob import CoB, _params_checked, _term_views, ext_device, weight_scale_factors

__all__: list[str] = []


# ------------------------------------------------------------------------------------------------------------
# Fast in-place path: everything that depends only on (structure, device, dtype) is built once and cached on the
# structure; a teleport is then a fixed number of vectorised calls whatever the number of parameters:
#   ext[1:n+1] <- tau; ext[n+2:] <- 1/tau           (2 calls, into a cached buffer)
#   G <- ext[idx]                                    (1 index_select into a cached buffer; G holds every term)
#   float64 ("products", bit-identical to weight_scale_factors: V = W * (T1 * T2 ...)):
#     facs <- T1 * T2 (* T3 ...)                     (K-1 _foreach_mul calls over the multi-term parameters)
#     params *= facs                                 (1 _foreach_mul_ / _foreach_mul)
#   other dtypes ("passes": V = (W * T1) * T2 ..., a few ulps from the definition in float32):
#     params *= T1; params[:k] *= T2; ...            (K _foreach_mul_ calls, no factor tensor is allocated)
# T_k are views into G made once (parameters sorted by their number of terms, so each level is a list prefix).
# Why passes: a Linear / 1x1-conv factor T1 * T2 is as large as the weight (allocating and reading it doubles the
# memory traffic of a clone), and a k x k conv factor (O, I, 1, 1) broadcast over the kernel makes torch's kernel loop
# over 9-element blocks (2x a clone on a 512x512x3x3 weight); each pass by a row or column vector runs at copy speed
# once a term whose trailing broadcast block is short (the kernel dims) is stored expanded over it (_expand_term).
_BLOCK_BYTES = 512 * 1024  # parameters per block of the in-place passes on a CPU (within a core's L2 cache)


class _FastPlan:
    __slots__ = ("names", "ext", "ext_tau", "ext_inv", "zeros", "idx", "G", "first", "levels", "n_multi", "singles",
                 "scale_vars", "sign_vars", "_site_data", "_site_np", "_np", "_e", "passes", "blocks")

    def __init__(self, structure: CoBStructure, device, dtype):
        n = structure.num_free
        self.names = _rule_order(structure)
        rules = [structure.rules[name] for name in self.names]
        self.ext = torch.ones(2 * n + 2, dtype=dtype, device=device)
        self.ext_tau = self.ext[1:n + 1]
        self.ext_inv = self.ext[n + 2:]
        self.zeros = torch.zeros_like(self.ext)
        self.passes = dtype != torch.float64
        if self.passes:
            terms = [_expand_term(g, tuple(structure.param_shapes[r.name])) for r in rules for g in r.gidx]
        else:
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
        # CPU, several passes: parameters in cache-sized blocks (rule order), all passes over a block before the next,
        # so that the second pass reads weights the first one left in cache (mobilenet_v2: about one memory pass
        # fewer); one block on a GPU or for a model that fits (the same calls as one batched pass per level)
        self.blocks = [(0, len(rules))]
        if self.passes and self.levels and torch.device(device).type == "cpu":
            elem = torch.empty(0, dtype=dtype).element_size()
            blocks, start, size = [], 0, 0
            for i, r in enumerate(rules):
                numel = 1
                for d in structure.param_shapes[r.name]:
                    numel *= d
                if size and size + numel * elem > _BLOCK_BYTES:
                    blocks.append((start, i))
                    start, size = i, 0
                size += numel * elem
            blocks.append((start, len(rules)))
            self.blocks = blocks

        def vars_of(sites):
            if not sites:
                return None
            g = torch.cat([s.gidx.reshape(-1) for s in sites])
            g = g[(g != 0) & (g != n + 1)]
            v = torch.where(g <= n, g - 1, g - n - 2)
            return torch.unique(v) if v.numel() else None  # indices into tau (CPU, like CoB taus)

        self._site_data = None
        self._site_np = None
        self._np = None  # numpy views of the CPU buffers (built on first use, see _factors_np)
        # (tau, its table [1, tau, 1, 1/tau] in tau's dtype, tau._version) of the last _factors_np call, for sites()
        self._e = None
        self.scale_vars = vars_of([s for s in structure.sites if s.kind == "scale"])
        self.sign_vars = vars_of([s for s in structure.sites if s.kind == "sign"])

    def sites(self, structure: CoBStructure, tau: torch.Tensor):
        """``(active, values)`` for every activation site: activity decided in tau's precision (float64: tau != 1
        at scale sites, tau < 0 at sign sites), values (tau or sign(tau), in the parameters' dtype, each its own
        tensor) for the active ones.  A fixed number of vectorised calls plus one small copy per active site.
        CPU taus and float32/float64 parameters take the numpy path (:meth:`_sites_np`, same values: torch's
        per-call dispatch costs more than these small arrays)."""
        if tau.device.type == "cpu" and self.ext.device.type == "cpu" and self.ext.dtype in _NP_DTYPE \
                and tau.dtype in _NP_DTYPE:
            return self._sites_np(structure, tau)
        return self._sites_torch(structure, tau)

    def _sites_torch(self, structure: CoBStructure, tau: torch.Tensor):
        """:meth:`sites` with torch ops (any device and dtype)."""
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

    def _sites_np(self, structure: CoBStructure, tau: torch.Tensor):
        """:meth:`sites` in numpy: the same table ``[1, tau, 1, 1/tau]`` in tau's dtype (IEEE division, as
        ``torch.reciprocal``), the same activity tests and the same rounding to the parameters' dtype."""
        d = self._site_np  # built once (the plan is cached per structure)
        if d is None:
            sizes = [s.gidx.numel() for s in structure.sites]
            starts = np.cumsum([0] + sizes[:-1]).astype(np.int64)
            idx = np.concatenate([s.gidx.reshape(-1).numpy() for s in structure.sites]).astype(np.int64)
            scale = np.concatenate([np.full(k, s.kind == "scale") for s, k in zip(structure.sites, sizes)])
            kinds = {s.kind for s in structure.sites}
            d = (sizes, starts, idx, scale, kinds, [tuple(s.gidx.shape) for s in structure.sites],
                 [s.kind == "scale" for s in structure.sites])
            self._site_np = d
        sizes, starts, idx, scale, kinds, shapes, is_scale = d
        last = self._e
        if last is not None and last[0] is tau and last[2] == tau._version:  # factors() just built it for this tau
            return self._sites_np_eval(last[1], sizes, starts, idx, scale, kinds, shapes, is_scale)
        with np.errstate(all="ignore"):  # a zero / overflowing tau is refused by factors(), warning-free like torch
            t = tau.detach().numpy()
            n = t.shape[0]
            e = np.empty(2 * n + 2, dtype=t.dtype)
            e[0] = e[n + 1] = 1
            e[1:n + 1] = t
            np.divide(1, t, out=e[n + 2:])
            return self._sites_np_eval(e, sizes, starts, idx, scale, kinds, shapes, is_scale)

    def _sites_np_eval(self, e, sizes, starts, idx, scale, kinds, shapes, is_scale):
        v = e[idx]
        if kinds == {"scale"}:
            flag = v != 1
        elif kinds == {"sign"}:
            flag = v < 0
        else:
            flag = np.where(scale, v != 1, v < 0)
        active = np.logical_or.reduceat(flag, starts).tolist()
        if not any(active):
            return active, []
        out_dt = _NP_DTYPE[self.ext.dtype]
        vals = []
        for i, a in enumerate(active):
            if a:
                x = v[starts[i]:starts[i] + sizes[i]]
                if not is_scale[i]:
                    x = np.sign(x)
                vals.append(torch.from_numpy(x.astype(out_dt).reshape(shapes[i])))  # owned copy, numpy reshape
            else:
                vals.append(None)
        return active, vals

    def factors(self, tau: torch.Tensor, keep_table: bool = False, trusted: bool = False) -> list:
        """Gather every factor term of ``tau`` into ``G`` and return the per-parameter factors (order of
        ``self.names``; views into cached buffers, valid until the next call) -- or None in "passes" mode (not
        float64), where :meth:`scale_` / :meth:`scaled` multiply by the terms directly.
        ``ValueError`` (nothing touched) when some tau or 1/tau is not finite in the buffers' dtype.
        ``keep_table`` (the caller will call :meth:`sites` with the same ``tau`` object next): CPU taus and
        float32/float64 buffers build the table in numpy (:meth:`_factors_np`: the same values, and the table in
        tau's dtype is kept for :meth:`sites`, which then skips building its own); otherwise torch ops (fewer
        calls when no site is evaluated).  ``trusted``: the caller knows every tau and 1/tau is finite in the
        buffers' dtype (:meth:`CoB._trusted`), so the torch path skips its re-check."""
        if keep_table and tau.device.type == "cpu" and self.ext.device.type == "cpu" \
                and self.ext.dtype in _NP_DTYPE and tau.dtype in _NP_DTYPE and not tau.requires_grad:
            self._factors_np(tau)
            return self._products()
        self._e = None
        self.ext_tau.copy_(tau)
        if tau.device == self.ext.device:
            torch.reciprocal(tau, out=self.ext_inv)  # computed in tau's dtype (float64), rounded once
        else:
            self.ext_inv.copy_(torch.reciprocal(tau))
        # taus are validated when the CoB is made; this re-check also catches a tau tensor edited since, before any
        # parameter is touched: dot(ext, 0) is NaN iff some entry of ext = [1, tau, 1, 1/tau] is inf or NaN (one
        # call, vs three for isfinite(ext).all())
        if not trusted and not float(torch.dot(self.ext, self.zeros)) == 0.0:
            raise ValueError("CoB tau must be finite and non-zero everywhere, with 1/tau finite in the parameters' "
                             f"dtype {self.ext.dtype} (found 0, NaN, inf or an overflowing reciprocal).")
        torch.index_select(self.ext, 0, self.idx, out=self.G)
        return self._products()

    def _factors_np(self, tau: torch.Tensor) -> None:
        """The table ``[1, tau, 1, 1/tau]`` in tau's dtype (IEEE division, as ``torch.reciprocal``), checked, rounded
        once to the buffers' dtype (numpy, on a CPU view of the torch buffer) and gathered into ``G`` (one
        ``index_select``); bit-identical to the torch path: copies, one division in tau's dtype, one rounding."""
        d = self._np
        if d is None:
            d = self._np = dict(ext=self.ext.numpy(), tables={},
                                lim=float(torch.finfo(self.ext.dtype).max))
        t = tau.numpy()
        n = t.shape[0]
        e = d["tables"].get(t.dtype)
        if e is None:
            e = np.ones(2 * n + 2, dtype=t.dtype)
            d["tables"][t.dtype] = e = (e, torch.from_numpy(e)[n + 2:])
        e, inv = e
        e[1:n + 1] = t
        torch.reciprocal(tau, out=inv)  # torch: no floating-point warnings for a zero tau (refused just below)
        # NaN fails the comparison; inf, and values that overflow the buffers' dtype, exceed lim: nothing touched yet
        if not float(np.abs(e).max()) <= d["lim"]:
            self._e = None
            raise ValueError("CoB tau must be finite and non-zero everywhere, with 1/tau finite in the parameters' "
                             f"dtype {self.ext.dtype} (found 0, NaN, inf or an overflowing reciprocal).")
        np.copyto(d["ext"], e, casting="same_kind")
        torch.index_select(self.ext, 0, self.idx, out=self.G)  # ext shares memory with d["ext"]
        self._e = (tau, e, tau._version)

    def scale_(self, params: list, facs) -> None:
        """``params *= factors`` in place (order of ``self.names``; ``facs`` from :meth:`factors`)."""
        if facs is not None:
            torch._foreach_mul_(params, facs)
            return
        if len(self.blocks) == 1:
            torch._foreach_mul_(params, self.first)
            for lv in self.levels:
                torch._foreach_mul_(params[:len(lv)], lv)
            return
        for a, b in self.blocks:  # every pass over one cache-sized block before the next block
            torch._foreach_mul_(params[a:b], self.first[a:b])
            for lv in self.levels:
                k = min(b, len(lv))
                if k <= a:
                    break
                torch._foreach_mul_(params[a:k], lv[a:k])

    def scaled(self, params: list, facs) -> list:
        """``params * factors`` as new tensors (order of ``self.names``; ``facs`` from :meth:`factors`)."""
        if facs is not None:
            return torch._foreach_mul(params, facs)
        out = torch._foreach_mul(params, self.first)
        for lv in self.levels:
            torch._foreach_mul_(out[:len(lv)], lv)
        return out

    def _products(self) -> list | None:
        """The factors from the gathered terms in ``G``: ``K - 1`` batched products for rules of ``K`` terms
        (None in "passes" mode: :meth:`scale_` multiplies by the terms one level at a time)."""
        if self.passes:
            return None
        if not self.levels:
            return self.first
        prods = torch._foreach_mul(self.first[:self.n_multi], self.levels[0])
        for lv in self.levels[1:]:
            torch._foreach_mul_(prods[:len(lv)], lv)
        return [*prods, *self.singles]


def _expand_term(g: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``g`` (a factor term's index tensor, broadcastable to a parameter of ``shape``) expanded over the dimensions
    after its last non-singleton one when they hold fewer than 64 elements (a conv's kernel dims), so that the
    in-place multiply runs over long contiguous blocks; otherwise ``g`` itself.  Same values either way."""
    if g.dim() != len(shape):
        return g
    last = max((d for d in range(g.dim()) if g.shape[d] != 1), default=None)
    if last is None:
        return g
    block = 1
    for d in shape[last + 1:]:
        block *= d
    if not 1 < block < 64:
        return g
    return g.expand(*g.shape[:last + 1], *shape[last + 1:])


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
_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


def _walk_params(model: nn.Module) -> list:
    """``list(model.parameters())`` without the generator machinery (same order: modules depth first, pre-order, each
    module's ``_parameters`` in order, modules and parameters de-duplicated by identity): one loop over an explicit
    stack instead of recursion (a module is marked when popped, so a module reachable twice is visited where the
    recursive walk first reaches it).  :func:`_ruled_params` recognises a model with the cheaper
    :func:`_walk_tokens` (no per-parameter de-duplication); this exact-order walk is kept for callers that need
    ``parameters()`` order."""
    out, seen = [], set()
    stack = [model]
    pop, push, add, append = stack.pop, stack.append, seen.add, out.append
    while stack:
        m = pop()
        if id(m) in seen:
            continue
        add(id(m))
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                add(id(p))
                append(p)
        kids = m._modules
        if kids:
            for c in reversed(kids.values()):
                if c is not None and id(c) not in seen:
                    push(c)
    return out


def _ruled_params(model: nn.Module, structure: CoBStructure, names: list):
    """``([parameters of model named names], same_dtype_and_device)`` after checking the model against the structure.

    The full name/shape check (:func:`_params_checked`) runs once per model; later calls only compare the identities
    of the model's parameters (:func:`_walk_tokens`) and the shapes of the ruled ones with those seen at that check
    (last model only, held by weak reference).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}.")
    last = structure._cache.get("last_model")
    if last is not None and last[0]() is model:
        _, ids, shapes, where, same, visits = last
        walk = _walk_tokens(model, visits)
        plist = walk[0] if walk is not None else None
        if plist is not None and ids == tuple(map(id, plist)):
            ruled = list(map(plist.__getitem__, where))
            if shapes == list(map(_SHAPE, ruled)):
                return ruled, same
    params = _params_checked(model, structure)
    ruled = [params[n] for n in names]
    # bound the token walk (it does not de-duplicate modules): a model with shared modules visits some twice
    n_mod = sum(1 for _ in model.modules())
    walk = _walk_tokens(model, 4 * n_mod + 16)
    if walk is None:  # modules shared many times over: not cached, every call takes the full check
        return ruled, all(p.dtype == ruled[0].dtype and p.device == ruled[0].device for p in ruled)
    plist, visits = walk
    pos = {}
    for i, p in enumerate(plist):
        pos.setdefault(id(p), i)
    same = all(p.dtype == ruled[0].dtype and p.device == ruled[0].device for p in ruled)
    if all(id(p) in pos for p in ruled):
        structure._cache["last_model"] = (weakref.ref(model), tuple(map(id, plist)), list(map(_SHAPE, ruled)),
                                          tuple(pos[id(p)] for p in ruled), same, visits)
    return ruled, same


def _walk_tokens(model: nn.Module, limit: int):
    """``(tokens, visits)``: every entry of every module's ``_parameters`` (None entries included), modules depth
    first *without* de-duplication (a module reachable twice is walked twice), or None after more than ``limit``
    module visits (a changed model, or modules shared many times over).  Cheaper than :func:`_walk_params` (no identity sets); used
    only to *recognise* a model already checked against the structure -- the same model gives the same list, and a
    replaced module or parameter anywhere changes the identities in it; ``visits`` counts the module visits."""
    out = []
    stack = [model]
    pop, extend, push_all = stack.pop, out.extend, stack.extend
    n = 0
    while stack:
        m = pop()
        if m is None:
            continue
        n += 1
        if n > limit:
            return None
        ps = m._parameters
        if ps:
            extend(ps.values())
        kids = m._modules
        if kids:
            push_all(kids.values())
    return out, n


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


def _scaled_half(structure: CoBStructure, cob: CoB, model: nn.Module, inplace: bool) -> dict:
    """Like :func:`_scaled` for float16 / bfloat16 parameters: factors and products in float64, rounded once."""
    params = _params_checked(model, structure)
    fac = weight_scale_factors(structure, CoB(structure, cob.tau.detach().to(torch.float64)))
    out = {}
    for name in structure.rules:
        p = params[name]
        v = (p.detach().to(torch.float64) * fac[name].to(p.device)).to(p.dtype)
        if inplace:
            p.copy_(v)
            v = p
        out[name] = v
    return out

