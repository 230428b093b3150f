"""Change-of-basis (CoB) analysis of an unmodified ``nn.Module`` (seed 000, Sec. 3 and appendix).

:func:`analyze` traces the model with ``torch.fx`` (standard layers are leaves; where fx fails, e.g. on Python control
flow over tensor shapes, it falls back to ``torch.export`` and rebuilds a module-level graph, see
:mod:`gradcond.graph._export`), runs the traced graph once on the
example input, and propagates, next to every tensor, a tensor of the same shape holding *atom ids*: the tau that
multiplies that entry in the teleported network (z_V = z_W * tau, seed 000 eq. 12).  Each operation either
creates fresh atoms (the outputs of Linear / Conv / norm affine parameters / embeddings / attention dims), moves
them (reshape, permute, cat, split, slicing, pooling...), ties them (residual add: equal taus; attention
q.k: tau_q * tau_k = 1) or pins them (tau = 1: model inputs and outputs, norm inputs, softmax, unknown ops).
Ties are kept in a union-find with inversion parity (:mod:`._unionfind`).

Rules (decisions where the source is silent are marked *decision*):

* Linear / Conv1d/2d/3d (any groups, stride, dilation, padding mode) / ConvTranspose1d/2d/3d: ``v = tau_out /
  tau_in * w`` (eq. 1), bias ``* tau_out``; one tau per channel, shared over space (condition 3) -- a layer whose
  input taus vary over space ties them.
* BatchNorm1d/2d/3d (train and eval): the input is pinned (tau = 1, seed 000 appendix) so running and batch
  statistics stay valid; gamma and beta are scaled by the free output tau.  *Decision*: no running-statistics
  rescaling -- with eps inside the square root that is not exact per channel.  LayerNorm / GroupNorm /
  InstanceNorm / RMSNorm / zoo ``LONorm``: input pinned, output tau free through the affine parameters (pinned
  without them).
* ReLU / LeakyReLU / PReLU / abs / max-pooling (positively homogeneous, per channel): pass tau; when tau < 0 they
  are rewritten as ``s * f(s * x)`` (exact, no rounding) -- ``kind="sign"`` sites.  Max-pooling ties the taus of
  one channel over space.
* Every other elementwise activation (tanh, sigmoid, GELU, SiLU, ELU, SELU, softplus, ...): passes tau and is
  rewritten as ``tau * f(x / tau)`` (eq. 2) when tau != 1 -- ``kind="scale"`` sites.  With ``rewrite=False`` the
  taus at such sites are pinned (and the sign sites constrained to tau > 0) so teleport never rewrites a module.
* Dropout / Identity / neg / dtype casts commute; avg / adaptive-avg pooling and interpolation tie a channel's
  taus over space and commute.
* add / sub of two tensors ties the operands (condition 2); adding a non-zero constant pins the other operand;
  ``x + p`` with ``p`` a parameter (e.g. learned positions) makes ``p`` a bias scaled by tau.
* mul / div: scalar factors commute; for tensor * tensor the second operand is pinned (*decision*; gating and
  ``x * sigmoid(x)`` stay exact), division pins the divisor.
* cat concatenates atoms (condition 5); split / chunk / getitem / unbind / view / reshape / flatten / permute /
  transpose / squeeze / expand... move them (zero padding is compatible with any tau).
* matmul: ``(A @ B)`` with B pinned scales rows of A; A pinned, columns of B; if A varies only over its last dim
  and B only over its second-to-last dim, ``tau_A * tau_B = 1`` is tied per contraction index (the explicit
  ``q @ k^T`` of attention); otherwise B is pinned.  ``F.scaled_dot_product_attention``: per head-dim
  ``tau_q * tau_k = 1``, output tau = tau_v.
* ``nn.MultiheadAttention``: per embedding dim ``tau_q = 1 / tau_k`` (free, any sign) and ``tau_v`` (free) for the
  in-projection, ``out_proj`` maps tau_v to a free output tau; ``bias_k`` / ``bias_v`` follow tau_k / tau_v.
* Embedding: output tau free (weight columns scaled); ``max_norm`` embeddings are frozen.
* softmax / log-softmax: input pinned.  sum / mean: tie along the reduced dims and commute; amax / amin / max /
  min over dims: tie, and constrain tau > 0.
* A parameter used at several places gets the ties that make its factors agree (a Linear called twice ties the
  input taus and output taus of both calls); if the roles differ, the parameter is pinned.
* Anything else (unknown functions, unknown ``torch.nn`` leaf modules such as ``nn.LSTM``): inputs and outputs
  pinned, listed in ``structure.frozen`` with the reason.  The function is never changed silently.

Cost: one traced forward on the example input plus integer tensors of the same sizes (keep the example batch
small, 2 is enough) and one Python union-find operation per distinct tied pair.
"""

from __future__ import annotations

import math
import operator
import traceback

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import _export
from ._modules import TeleportedActivation
from ._unionfind import CONST, WILD, UnionFind
from .structure import ActSite, CoBStructure, Group, Note, ParamRule

__all__ = ["analyze"]

# ---------------------------------------------------------------------------------------------------------
# operation tables

_SIGN_ACT_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
_SCALE_ACT_MODULES = (
    nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.ReLU6,
    nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink,
    nn.Threshold,
)
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                    nn.AdaptiveMaxPool3d)
_AVGPOOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveAvgPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
_COMMUTE_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
                 nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                 nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
                 nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
_CONSTPAD_MODULES = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_IN_MODULES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONVT_MODULES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)

_SIGN_FUNCS = {F.relu, torch.relu, F.leaky_relu, F.prelu, torch.abs, F.relu_, torch.relu_}
_SIGN_METHODS = {"relu", "abs", "relu_"}
_SCALE_FUNCS = {
    torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.gelu, F.silu, F.elu, F.selu, F.celu, F.mish, F.softplus,
    F.hardtanh, F.relu6, F.hardswish, F.hardsigmoid, F.logsigmoid, F.softsign, F.tanhshrink, F.softshrink,
    F.hardshrink, F.threshold, torch.selu, torch.celu,
}
_SCALE_METHODS = {"tanh", "sigmoid"}
_MAXPOOL_FUNCS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.adaptive_max_pool1d: 1,
                  F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}
_AVGPOOL_FUNCS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1,
                  F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
_COMMUTE_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout, operator.neg, torch.neg,
                  operator.pos, torch.clone, torch.Tensor.contiguous, torch.Tensor.detach}
_COMMUTE_METHODS = {"neg", "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda",
                    "contiguous", "clone", "detach", "requires_grad_", "dropout"}
_MOVE_FUNCS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.movedim,
    torch.moveaxis, torch.narrow, torch.select, torch.flip, torch.roll, torch.t, torch.split, torch.chunk,
    torch.unbind, torch.cat, torch.concat, torch.concatenate, torch.stack, torch.tile, torch.swapaxes,
    torch.swapdims, torch.broadcast_to, torch.unflatten, F.pixel_shuffle, F.pixel_unshuffle, torch.hstack,
    torch.vstack, torch.tensor_split, torch.repeat_interleave, torch.atleast_2d,
}
_MOVE_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "unsqueeze", "squeeze",
                 "expand", "expand_as", "view_as", "reshape_as", "repeat", "flip", "roll", "movedim", "moveaxis",
                 "narrow", "select", "split", "chunk", "unbind", "swapaxes", "swapdims", "tile", "tensor_split",
                 "repeat_interleave", "__getitem__"}
_ADD_FUNCS = {operator.add, torch.add, operator.sub, torch.sub, operator.iadd, operator.isub}
_ADD_METHODS = {"add", "sub", "add_", "sub_"}
_MUL_FUNCS = {operator.mul, torch.mul, operator.imul}
_MUL_METHODS = {"mul", "mul_"}
_DIV_FUNCS = {operator.truediv, torch.div, operator.itruediv, torch.true_divide}
_DIV_METHODS = {"div", "div_", "true_divide"}
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_MATMUL_METHODS = {"matmul", "bmm", "mm"}
_SUM_FUNCS = {torch.sum, torch.mean}
_SUM_METHODS = {"sum", "mean"}
_MAX_FUNCS = {torch.amax, torch.amin, torch.max, torch.min}
_MAX_METHODS = {"amax", "amin", "max", "min"}
_SOFTMAX_FUNCS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, F.softmin}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_NOINFO_FUNCS = {torch.ones_like, torch.full_like, torch.rand_like, torch.randn_like, torch.empty_like,
                 torch.randint_like}
_ZERO_FUNCS = {torch.zeros_like}
_SHAPE_QUERY = {"size", "dim", "numel", "__len__", "ndimension", "nelement", "stride", "is_contiguous"}


def _is_lonorm(m: nn.Module) -> bool:
    return type(m).__name__ == "LONorm" and hasattr(m, "weight")


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple):
        super().__init__()
        self._extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, TeleportedActivation) or _is_lonorm(m):
            return True
        if self._extra_leaves and isinstance(m, self._extra_leaves):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return super().is_leaf_module(m, qualname)


def _op_name(node: fx.Node, modules: dict) -> str:
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


def _tensors_in(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors_in(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors_in(y)


def _full(shape, value: int) -> torch.Tensor:
    return torch.full((), value, dtype=torch.int64).expand(shape)


class _ExportRequested(Exception):
    """Internal: analyze(..., tracer="export") skips fx."""


def _fx_failure(exc: Exception) -> str:
    """Where and why torch.fx symbolic tracing failed: the first frame outside torch, and the message."""
    where = ""
    tb = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(tb):
        if "/torch/" not in fr.filename.replace("\\", "/"):
            where = f" at {fr.filename}:{fr.lineno} ({(fr.line or '').strip()})"
            break
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{where}: {msg}"


def _trace_error(model: nn.Module, fx_why: str, export_exc: Exception) -> ValueError:
    emsg = str(export_exc).strip().splitlines()[0] if str(export_exc).strip() else ""
    return ValueError(
        f"analyze could not trace {type(model).__name__} with torch.fx symbolic tracing{fx_why}; the torch.export "
        f"fallback (non-strict export on example_input) failed too: {type(export_exc).__name__}: {emsg}. "
        "Pass the offending submodule classes as analyze(..., leaf_modules=(...,)) to keep them as frozen leaves "
        "(their inputs and outputs are then pinned to tau = 1), or make their control flow independent of tensor "
        "values."
    )


class _Analyzer:
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
            return _full(v.shape, fill)
        if isinstance(v, (list, tuple)):
            return type(v)(self.const_like(x, fill) for x in v) if not hasattr(v, "_fields") else tuple(
                self.const_like(x, fill) for x in v)
        return None

    def add_param_site(self, name: str, terms: list) -> None:
        self.param_sites.setdefault(name, []).append(terms)

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

    def mod_param(self, mod: nn.Module, attr: str) -> str | None:
        p = getattr(mod, attr, None)
        if isinstance(p, nn.Parameter):
            return self.pname[id(p)]
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
        unique = path is not None and self.module_calls.get(id(self.modules[path]), 0) == 1
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

    # ---- execution --------------------------------------------------------------------------------
    def run(self, inputs: tuple) -> None:
        it = iter(inputs)
        for node in self.gm.graph.nodes:
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
                for t in self._idx_tensors(node.args[0]):
                    self.uf.pin_tensor(t)
                continue
            args = self.V(node.args)
            kwargs = self.V(dict(node.kwargs))
            if node.op == "call_module":
                v = self.modules[node.target](*args, **kwargs)
            elif node.op == "call_function":
                v = node.target(*args, **kwargs)
            else:
                v = getattr(args[0], node.target)(*args[1:], **kwargs)
            self.val[node] = v
            if not any(True for _ in _tensors_in(v)):
                # shape queries (x.shape, x.size(0)...) carry no tau and constrain nothing
                self.idx[node] = None
                continue
            self.step(node, v)

    def _idx_tensors(self, a):
        if isinstance(a, fx.Node):
            yield from _tensors_in(self.idx.get(a))
        elif isinstance(a, (list, tuple)):
            for x in a:
                yield from self._idx_tensors(x)
        elif isinstance(a, dict):
            for x in a.values():
                yield from self._idx_tensors(x)

    # ---- dispatch -----------------------------------------------------------------------------------
    def step(self, node: fx.Node, v) -> None:
        op = _op_name(node, self.modules)
        if node.op == "call_module":
            mod = self.modules[node.target]
            return self.module_rule(node, mod, op, v)
        t = node.target
        if node.op == "call_method":
            return self.method_rule(node, t, op, v)
        return self.function_rule(node, t, op, v)

    def module_rule(self, node, mod, op, v):
        a0 = node.args[0] if node.args else None
        x = self.I(a0)
        xv = self.V(a0)
        if isinstance(mod, TeleportedActivation):
            if mod.kind == "scale":
                return self.elementwise_site(node, "scale", op, x)
            if isinstance(mod.inner, _MAXPOOL_MODULES):
                return self.pooled(node, x, xv, v, self._pool_k(mod.inner, xv), site="sign", op=op)
            return self.elementwise_site(node, "sign", op, x)
        if isinstance(mod, nn.Linear):
            return self.linear(node, x, mod.out_features, self.mod_param(mod, "weight"), self.mod_param(mod, "bias"),
                               v)
        for cls, k in _CONV_MODULES.items():
            if isinstance(mod, cls):
                return self.conv(node, x, xv, k, mod.out_channels, mod.groups, self.mod_param(mod, "weight"),
                                 self.mod_param(mod, "bias"), v, transposed=False)
        for cls, k in _CONVT_MODULES.items():
            if isinstance(mod, cls):
                return self.conv(node, x, xv, k, mod.out_channels, mod.groups, self.mod_param(mod, "weight"),
                                 self.mod_param(mod, "bias"), v, transposed=True)
        if isinstance(mod, _BN_MODULES):
            return self.channel_norm(node, op, x, v, self.mod_param(mod, "weight"), self.mod_param(mod, "bias"),
                                     "BatchNorm input pinned (seed 000 appendix: mean/var stay valid)")
        if isinstance(mod, (nn.GroupNorm,) + _IN_MODULES):
            return self.channel_norm(node, op, x, v, self.mod_param(mod, "weight"), self.mod_param(mod, "bias"),
                                     f"{op} input pinned (normalisation is not per-channel homogeneous)")
        if isinstance(mod, nn.LayerNorm) or isinstance(mod, getattr(nn, "RMSNorm", ())) or _is_lonorm(mod):
            nshape = tuple(getattr(mod, "normalized_shape", None) or (mod.num_features,))
            return self.last_norm(node, op, x, v, nshape, self.mod_param(mod, "weight"), self.mod_param(mod, "bias"))
        if isinstance(mod, nn.Embedding):
            if mod.max_norm is not None:
                return self.frozen_node(node, op, "Embedding with max_norm renormalises rows", [x], v)
            return self.embedding(node, v, mod.embedding_dim, self.mod_param(mod, "weight"))
        if isinstance(mod, nn.MultiheadAttention):
            return self.mha(node, mod, op, v)
        if isinstance(mod, _SIGN_ACT_MODULES):
            return self.elementwise_site(node, "sign", op, x)
        if isinstance(mod, _SCALE_ACT_MODULES):
            return self.elementwise_site(node, "scale", op, x)
        if isinstance(mod, _MAXPOOL_MODULES):
            return self.pooled(node, x, xv, v, self._pool_k(mod, xv), site="sign", op=op)
        if isinstance(mod, _AVGPOOL_MODULES):
            return self.pooled(node, x, xv, v, self._pool_k(mod, xv), site=None, op=op)
        if isinstance(mod, _COMMUTE_MODULES):
            self.idx[node] = x
            return
        if isinstance(mod, _MOVE_MODULES):
            self.idx[node] = self._apply_move(mod, x)
            return
        if isinstance(mod, _CONSTPAD_MODULES):
            fill = WILD if mod.value == 0 else CONST
            self.idx[node] = F.pad(x, mod.padding, value=fill)
            return
        if isinstance(mod, _SOFTMAX_MODULES):
            self.pin_all(x)
            self.pin_note(node, op, "softmax input pinned (not homogeneous)")
            self.idx[node] = self.const_like(v)
            return
        for name, p in mod.named_parameters():
            self.plain_use.add(self.pname[id(p)])
        return self.frozen_node(node, op, "unsupported module; inputs/outputs pinned", self.I(node.args), v)

    def _pool_k(self, mod, xv) -> int:
        name = type(mod).__name__
        for k in (1, 2, 3):
            if name.endswith(f"{k}d"):
                return k
        return xv.dim() - 2  # Upsample: all dims after (N, C)

    def _apply_move(self, fn, x):
        try:
            return fn(x)
        except (RuntimeError, NotImplementedError):
            return fn(x.to(torch.float64)).round().to(torch.int64)

    def method_rule(self, node, name, op, v):
        args = node.args
        if name in _SIGN_METHODS:
            return self.elementwise_site(node, "sign", op, self.I(args[0]))
        if name in _SCALE_METHODS:
            return self.elementwise_site(node, "scale", op, self.I(args[0]))
        if name in _COMMUTE_METHODS:
            self.I(args[1:])
            self.idx[node] = self.I(args[0])
            return
        if name in _MOVE_METHODS:
            return self.move(node, v, lambda x, *a, **k: getattr(x, name)(*a, **k))
        if name in _ADD_METHODS:
            return self.add(node, args[0], args[1], v)
        if name in _MUL_METHODS:
            return self.mul(node, args[0], args[1], v)
        if name in _DIV_METHODS and "rounding_mode" not in node.kwargs:
            return self.div(node, args[0], args[1], v)
        if name in _MATMUL_METHODS:
            return self.matmul(node, op, args[0], args[1], v)
        if name in _SUM_METHODS:
            return self.reduce(node, op, v, positive=False)
        if name in _MAX_METHODS:
            return self.reduce(node, op, v, positive=True)
        if name in _SOFTMAX_METHODS:
            return self.softmax(node, op, v)
        if name == "masked_fill":
            return self.masked_fill(node, op, v)
        if name in ("new_zeros",):
            self.idx[node] = self.const_like(v, WILD)
            return
        if name in ("new_ones", "new_full", "new_empty", "new_tensor"):
            self.idx[node] = self.const_like(v)
            return
        return self.frozen_node(node, op, "unsupported tensor method; inputs/outputs pinned", self.I(args), v)

    def function_rule(self, node, t, op, v):
        args = node.args
        kw = node.kwargs
        if t is operator.getitem:
            base = self.V(args[0])
            if isinstance(base, torch.Tensor):
                return self.move(node, v, operator.getitem)
            self.idx[node] = self.I(args[0])[self.V(args[1])]
            return
        if t is getattr:
            self.idx[node] = self.const_like(v)
            return
        if t in _SIGN_FUNCS:
            if t is F.prelu:
                self.I(args[1:])
            return self.elementwise_site(node, "sign", op, self.I(args[0]))
        if t in _SCALE_FUNCS:
            self.I(args[1:])
            return self.elementwise_site(node, "scale", op, self.I(args[0]))
        if t in _MAXPOOL_FUNCS:
            if not isinstance(v, torch.Tensor):
                return self.frozen_node(node, op, "max-pooling with return_indices", self.I(args), v)
            x = self.I(args[0])
            return self.pooled(node, x, self.V(args[0]), v, _MAXPOOL_FUNCS[t], site="sign", op=op)
        if t in _AVGPOOL_FUNCS or t is F.interpolate or t is F.upsample:
            x = self.I(args[0])
            xv = self.V(args[0])
            k = _AVGPOOL_FUNCS.get(t, xv.dim() - 2)
            return self.pooled(node, x, xv, v, k, site=None, op=op)
        if t in _COMMUTE_FUNCS or t in _export.COMMUTE_FUNCS:
            self.idx[node] = self.I(args[0])
            return
        if t in _MOVE_FUNCS or t in _export.MOVE_FUNCS:
            return self.move(node, v, t)
        if t is F.pad:
            x = self.I(args[0])
            pad = self.V(args[1])
            mode = self.V(kw.get("mode", args[2] if len(args) > 2 else "constant"))
            value = self.V(kw.get("value", args[3] if len(args) > 3 else None))
            if mode == "constant":
                fill = WILD if not value else CONST
                self.idx[node] = F.pad(x, pad, value=fill)
            else:
                self.idx[node] = self._apply_move(lambda z: F.pad(z, pad, mode=mode), x)
            return
        if t in _ADD_FUNCS:
            if "alpha" in kw:
                self.V(kw["alpha"])
            if t in (operator.sub, torch.sub, operator.isub):
                return self.add(node, args[0], args[1], v)
            return self.add(node, args[0], args[1], v)
        if t in _MUL_FUNCS:
            return self.mul(node, args[0], args[1], v)
        if t in _DIV_FUNCS and "rounding_mode" not in kw:
            return self.div(node, args[0], args[1], v)
        if t in _MATMUL_FUNCS:
            return self.matmul(node, op, args[0], args[1], v)
        if t in _SUM_FUNCS:
            return self.reduce(node, op, v, positive=False)
        if t in _MAX_FUNCS:
            return self.reduce(node, op, v, positive=True)
        if t in _SOFTMAX_FUNCS:
            return self.softmax(node, op, v)
        if t in _NOINFO_FUNCS:
            self.idx[node] = self.const_like(v)
            return
        if t in _ZERO_FUNCS:
            self.idx[node] = self.const_like(v, WILD)
            return
        if t is torch.where and len(args) == 3:
            return self.where(node, op, args, v)
        if t is F.scaled_dot_product_attention:
            return self.sdpa(node, op, v)
        if t is F.linear and self.param_of(args[1]) is not None:
            b = args[2] if len(args) > 2 else kw.get("bias")
            w = self.val[args[1]]
            return self.linear(node, self.I(args[0]), w.shape[0], self.param_of(args[1]), self.param_of(b), v)
        if t in (F.conv1d, F.conv2d, F.conv3d) and self.param_of(args[1]) is not None:
            k = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[t]
            b = args[2] if len(args) > 2 else kw.get("bias")
            groups = self.V(args[6] if len(args) > 6 else kw.get("groups", 1))
            w = self.val[args[1]]
            return self.conv(node, self.I(args[0]), self.V(args[0]), k, w.shape[0], groups, self.param_of(args[1]),
                             self.param_of(b), v, transposed=False)
        if t is F.embedding and self.param_of(args[1]) is not None and kw.get("max_norm") is None:
            w = self.val[args[1]]
            return self.embedding(node, v, w.shape[1], self.param_of(args[1]))
        if t is F.layer_norm:
            x = self.I(args[0])
            w = args[2] if len(args) > 2 else kw.get("weight")
            b = args[3] if len(args) > 3 else kw.get("bias")
            if (w is None or self.param_of(w)) and (b is None or self.param_of(b)):
                return self.last_norm(node, op, x, v, tuple(self.V(args[1])), self.param_of(w), self.param_of(b))
        if t in (F.group_norm, F.batch_norm, F.instance_norm):
            names = {F.group_norm: (2, 3), F.batch_norm: (3, 4), F.instance_norm: (3, 4)}[t]
            w = args[names[0]] if len(args) > names[0] else kw.get("weight")
            b = args[names[1]] if len(args) > names[1] else kw.get("bias")
            if (w is None or self.param_of(w)) and (b is None or self.param_of(b)):
                self.I([a for a in args[1:] if a is not w and a is not b])
                return self.channel_norm(node, op, self.I(args[0]), v, self.param_of(w), self.param_of(b),
                                         f"{op} input pinned")
        return self.frozen_node(node, op, "unsupported function; inputs/outputs pinned", self.I(args), v)

    # ---- rules --------------------------------------------------------------------------------------
    def linear(self, node, x, out_features, wname, bname, v):
        tin = self.channel_rep(x, -1)
        tout = self.fresh(out_features, node, f"{_op_name(node, self.modules)} output")
        if wname:
            self.add_param_site(wname, [tout.view(-1, 1), -tin.view(1, -1)])
        if bname:
            self.add_param_site(bname, [tout])
        self.idx[node] = tout.expand(v.shape)

    def conv(self, node, x, xv, k, cout, groups, wname, bname, v, transposed):
        cdim = xv.dim() - 1 - k
        tin = self.channel_rep(x, cdim)
        cin = tin.numel()
        tout = self.fresh(cout, node, f"{_op_name(node, self.modules)} output channels")
        ones = (1,) * k
        if wname:
            if not transposed:
                # weight (C_out, C_in/g, *k): entry (o, i) reads input channel (o // (C_out/g)) * (C_in/g) + i
                og, ig = cout // groups, cin // groups
                o = torch.arange(cout).view(-1, 1)
                i = torch.arange(ig).view(1, -1)
                in_ch = (o // og) * ig + i
                terms = [tout.view((cout, 1) + ones), -tin[in_ch].view((cout, ig) + ones)]
            else:
                # weight (C_in, C_out/g, *k): entry (i, o) writes output channel (i // (C_in/g)) * (C_out/g) + o
                og, ig = cout // groups, cin // groups
                i = torch.arange(cin).view(-1, 1)
                o = torch.arange(og).view(1, -1)
                out_ch = (i // ig) * og + o
                terms = [tout[out_ch].view((cin, og) + ones), -tin.view((cin, 1) + ones)]
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
        tout = self.fresh(dim, node, f"{_op_name(node, self.modules)} output")
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
            out = fn(data, *rest, **kwargs)
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
                self.pin_note(node, _op_name(node, self.modules), "adding a non-zero constant pins the operand")
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
            self.pin_note(node, _op_name(node, self.modules), "tensor * tensor: second operand pinned")
            self.idx[node] = ia.expand(v.shape)

    def div(self, node, a, b, v):
        if self._scalar(b):
            self.idx[node] = self.I(a).expand(v.shape)
            return
        ib = self.I(b)
        if not self.is_const(ib):
            self.uf.pin_tensor(ib)
            self.pin_note(node, _op_name(node, self.modules), "divisor pinned")
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
            self.idx[node] = (rep.expand(v[0].shape), _full(v[1].shape, CONST))

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
                outs.append(_full(v.shape, WILD if self.V(a) == 0 else CONST))
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
        if kw.get("enable_gqa") or q.shape[:-2] != k.shape[:-2]:
            self.pin_all([q, k])
            self.pin_note(node, op, "grouped-query attention: q and k pinned")
        else:
            rq = self.uf.union_along(q, (-2,))
            rk = self.uf.union_along(k, (-2,))
            self.uf.union_tensors(rq, -rk)
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
        self.idx[node] = (tout.expand(out.shape), None if weights is None else _full(weights.shape, CONST))

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
            base = s[0]
            ok = all(len(o) == len(base) and all(ta.shape == tb.shape for ta, tb in zip(o, base)) for o in s[1:])
            if ok:
                for o in s[1:]:
                    for ta, tb in zip(o, base):
                        uf.union_tensors(ta, tb)
            else:
                for o in s:
                    for ta in o:
                        uf.pin_tensor(ta)
                self.frozen.append(Note(name, "parameter", "used at several places in different roles; pinned"))
            if base:
                rules_raw[name] = base
        # free variables = roots of atom classes not tied to the constant
        n_atoms = len(uf)
        roots = []
        root_of = torch.empty(n_atoms, dtype=torch.int64)
        for a in range(2, n_atoms):
            r, p = uf.find(a)
            root_of[a] = 0 if r == CONST else r
        root_of[:2] = 0
        uniq = torch.unique(root_of[2:]) if n_atoms > 2 else torch.zeros(0, dtype=torch.int64)
        roots = [int(r) for r in uniq.tolist() if r != 0]
        n = len(roots)
        free_of_root = torch.zeros(n_atoms, dtype=torch.int64)
        for i, r in enumerate(roots):
            free_of_root[r] = i + 1
        positive = torch.tensor([uf.positive[r] for r in roots], dtype=torch.bool)
        # lookup from a signed resolved id to a gidx into [1, tau, 1, 1/tau]
        lut = torch.zeros(2 * n_atoms + 1, dtype=torch.int64)
        if n:
            rt = torch.tensor(roots)
            lut[n_atoms + rt] = torch.arange(1, n + 1)
            lut[n_atoms - rt] = torch.arange(1, n + 1) + n + 1

        def to_gidx(ids: torch.Tensor) -> torch.Tensor:
            r = uf.resolve_tensor(ids)
            r = torch.where(r == CONST, torch.zeros_like(r), r)
            return lut[r + n_atoms]

        rules = {}
        for name, terms in rules_raw.items():
            g = [_compact(to_gidx(t)) for t in terms]
            g = [x for x in g if bool((x != 0).any())]
            if g:
                rules[name] = ParamRule(name=name, shape=tuple(param_shapes[name]), gidx=g)
        sites = []
        for (nname, kind, op, path, unique, ids, in_ndim) in self.sites_raw:
            g = _compact(to_gidx(ids))
            if not bool((g != 0).any()):
                continue
            # strip leading singleton dims so the tau broadcasts against any batch size
            shape = list(g.shape)
            while len(shape) > 1 and shape[0] == 1:
                shape.pop(0)
            if len(shape) == in_ndim and shape[0] != 1 and in_ndim > 1:
                # varies along the batch dim: cannot happen for per-neuron taus; tie to be safe
                g = _compact(to_gidx(uf.union_along(ids, (0,))))
                shape = list(g.shape)
                while len(shape) > 1 and shape[0] == 1:
                    shape.pop(0)
            sites.append(ActSite(node=nname, kind=kind, op=op, module_path=path, unique=unique,
                                 gidx=g.reshape(shape)))
        # group summary
        owner_seen = set()
        free_group = torch.zeros(n, dtype=torch.int64)
        for gi, grp in enumerate(self.groups):
            for a in range(grp.start, grp.start + grp.size):
                r = int(root_of[a])
                if r == 0:
                    grp.pinned += 1
                elif r in owner_seen:
                    grp.tied += 1
                else:
                    owner_seen.add(r)
                    grp.free += 1
                    fi = int(free_of_root[r]) - 1
                    free_group[fi] = gi
                    if uf.positive[r]:
                        grp.positive += 1
        return CoBStructure(
            model_class=type(self.model).__name__, num_free=n, positive=positive, rules=rules, sites=sites,
            groups=self.groups, frozen=self.frozen, pins=self.pins, param_shapes=param_shapes,
            graph_module=self.gm, rewrite=self.rewrite, tau_dtype=tau_dtype, free_group=free_group,
            tracer=self.tracer,
        )


def _compact(g: torch.Tensor) -> torch.Tensor:
    """Keep only the dims along which ``g`` varies (size-1 elsewhere); contiguous result."""
    for d in range(g.dim()):
        if g.shape[d] > 1:
            first = g.narrow(d, 0, 1)
            if bool((g == first).all()):
                g = first
    return g.contiguous()


def analyze(model: nn.Module, example_input, *, rewrite: bool = True, leaf_modules: tuple = (),
            tracer: str = "auto") -> CoBStructure:
    """Derive the change-of-basis structure of ``model`` (see the module docstring for the rules).

    ``example_input``: a tensor or a tuple of positional inputs (a batch of 2 is enough; only shapes matter).
    ``rewrite=False``: never plan activation rewrites (pin the taus of non-homogeneous activations, keep the taus
    of ReLU-like ones and max-pools positive), so :func:`gradcond.teleport.core.teleport` always returns an
    instance of the user's class.  ``leaf_modules``: extra module classes to keep as opaque (frozen) leaves.
    ``tracer``: ``"auto"`` (torch.fx symbolic tracing, falling back to ``torch.export`` when fx fails, e.g. on
    Python control flow over tensor shapes), ``"fx"`` (no fallback) or ``"export"`` (export only; see
    :mod:`gradcond.graph._export`: the structure then holds for inputs of the example's shapes, and activations
    that are function calls or modules called several times are pinned instead of rewritten).
    ``structure.tracer`` (and the summary) say which was used, and why fx failed.

    The model is run once on ``example_input`` in eval mode under ``torch.no_grad()`` (its modes are restored;
    no buffer changes).  Raises ``ValueError`` when the model cannot be traced, naming the construct.
    Cost: one forward pass plus integer bookkeeping; densenet/resnet-18 analyse in well under a second.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze expects an nn.Module, got {type(model).__name__}.")
    if tracer not in ("auto", "fx", "export"):
        raise ValueError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}.")
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    which = tracer
    tracer = _Tracer(tuple(leaf_modules))
    modes = {m: m.training for m in model.modules()}
    exported, how = False, "torch.fx symbolic tracing"
    try:
        if which == "export":
            raise _ExportRequested()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001 -- fall back to torch.export, else a ValueError naming the construct
        if which == "fx":
            raise ValueError(
                f"analyze could not trace {type(model).__name__} with torch.fx symbolic tracing{_fx_failure(exc)}; "
                "tracer='auto' falls back to torch.export, or pass the offending submodule classes as "
                "analyze(..., leaf_modules=(...,)) to keep them as frozen leaves."
            ) from None
        fx_why = "" if isinstance(exc, _ExportRequested) else _fx_failure(exc)
        state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
        try:
            model.eval()  # no batch statistics or running-stat updates while exporting
            gm = _export.module_graph(model, tuple(inputs), tracer.is_leaf_module)
        except Exception as exc2:  # noqa: BLE001
            if which == "export":
                first = str(exc2).strip().splitlines()[0] if str(exc2).strip() else ""
                raise ValueError(f"analyze could not export {type(model).__name__} with torch.export (non-strict): "
                                 f"{type(exc2).__name__}: {first}") from None
            raise _trace_error(model, fx_why, exc2) from None
        finally:
            for m, t in modes.items():
                m.training = t
            with torch.no_grad():  # export runs on fake tensors; make sure no buffer changed anyway
                for k, v in model.state_dict(keep_vars=True).items():
                    if k in state and not torch.equal(v, state[k]):
                        v.copy_(state[k])
        exported = True
        how = ("torch.export (non-strict), as requested" if which == "export"
               else f"torch.export (non-strict) fallback; torch.fx failed{fx_why}")
    param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    fp = [p for p in model.parameters() if p.is_floating_point()]
    tau_dtype = fp[0].dtype if fp else torch.float32
    an = _Analyzer(model, gm, rewrite, exported=exported)
    an.tracer = how
    try:
        model.eval()
        with torch.no_grad():
            an.run(tuple(inputs))
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ValueError(
            f"analyze could not run the traced {type(model).__name__} on example_input: {exc}".rstrip(".") + "."
        ) from exc
    finally:
        for m, t in modes.items():
            m.training = t
    return an.finalize(param_shapes, tau_dtype)
