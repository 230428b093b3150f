"""Which rule of :mod:`gradcond.graph.rules` an fx node gets: the operation tables and the dispatch.

The tables name the ``torch.nn`` modules, functions and ``Tensor`` methods each rule covers (ReLU-like sign
activations, other elementwise activations, pooling, commuting ops, moves, arithmetic, reductions, softmax...);
:class:`Analyzer` (the analyser :func:`gradcond.graph.analyze` runs) looks a node up by kind
(``call_module`` / ``call_method`` / ``call_function``) and calls the rule.  Anything not in a table is frozen
(inputs and outputs pinned, listed in ``structure.frozen`` with the reason).  The ATen-level functions that the
export fallback emits (:mod:`gradcond.graph._export`) are recognised too.

Cost: one table lookup (a few ``isinstance`` checks for modules) per node.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import _export
from ._modules import TeleportedActivation
from ._unionfind import CONST, WILD
from .propagate import op_name
from .rules import Rules
from .tracing import (COMPOSITE_MODULES, is_hf_activation, is_lonorm, is_stochastic_depth, is_stochastic_depth_module,
                      user_hooks)

__all__ = ["Analyzer"]

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
# functions / methods that build constants (masks, positions, rotary tables) from constants: the result is constant
# (exact).  Unknown ATen ops of an exported graph (torch._ops.OpOverload) are treated the same way.
_CONST_FUNCS = {torch.arange, torch.cos, torch.sin, torch.exp, torch.log, torch.rsqrt, torch.sqrt, torch.pow,
                torch.triu, torch.tril, torch.full, torch.ones, torch.zeros, torch.outer, torch.where, torch.minimum,
                torch.maximum, torch.clamp, torch.masked_fill, operator.lt, operator.le, operator.gt, operator.ge,
                operator.eq, operator.ne, operator.and_, operator.or_, operator.invert, operator.pow, torch.lt,
                torch.le, torch.gt, torch.ge, torch.eq, torch.ne, torch.logical_and, torch.logical_or,
                torch.logical_not, torch.bitwise_and, torch.bitwise_or, torch.bitwise_not, torch.cumsum, torch.abs,
                torch.log1p, torch.floor, torch.ceil, torch.round} | _export.CAST_FUNCS
_CONST_METHODS = {"cos", "sin", "exp", "log", "rsqrt", "sqrt", "pow", "float", "long", "int", "bool", "triu",
                  "tril", "cumsum", "masked_fill", "clamp", "clamp_min", "clamp_max", "lt", "le", "gt", "ge", "eq",
                  "ne", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "__and__", "__or__",
                  "__invert__", "logical_and", "logical_or", "logical_not", "any", "all", "floor", "ceil", "round"}
_ADDMM_FUNCS = {torch.addmm} | _export.ADDMM_FUNCS
_POW_FUNCS = {torch.pow, operator.pow}
_SHAPE_QUERY = {"size", "dim", "numel", "__len__", "ndimension", "nelement", "stride", "is_contiguous"}


class Analyzer(Rules):
    """The analyser of one traced model: :class:`~gradcond.graph.propagate.Propagator` state, the rules of
    :class:`~gradcond.graph.rules.Rules`, and the dispatch from fx nodes to rules (``step``)."""

    # ---- dispatch -----------------------------------------------------------------------------------
    def step(self, node: fx.Node, v) -> None:
        op = op_name(node, self.modules)
        if node.op == "call_module":
            mod = self.modules[node.target]
            return self.module_rule(node, mod, op, v)
        t = node.target
        if node.op == "call_method":
            return self.method_rule(node, t, op, v)
        return self.function_rule(node, t, op, v)

    def module_rule(self, node, mod, op, v):
        hooks = user_hooks(mod)
        if hooks:
            for name, p in mod.named_parameters():
                self.plain_use.add(self.pname[id(p)])
            return self.frozen_node(node, op, f"{', '.join(hooks)} registered on this module: what it does to the "
                                    "module's input/output is not covered by a rule; module frozen, inputs/outputs "
                                    "pinned", self.I(node.args), v)
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
        if isinstance(mod, nn.LayerNorm) or isinstance(mod, getattr(nn, "RMSNorm", ())) or is_lonorm(mod):
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
        if isinstance(mod, _SCALE_ACT_MODULES) or is_hf_activation(mod):
            return self.elementwise_site(node, "scale", op, x)
        if isinstance(mod, _MAXPOOL_MODULES):
            return self.pooled(node, x, xv, v, self._pool_k(mod, xv), site="sign", op=op)
        if isinstance(mod, _AVGPOOL_MODULES):
            return self.pooled(node, x, xv, v, self._pool_k(mod, xv), site=None, op=op)
        if isinstance(mod, _COMMUTE_MODULES) or is_stochastic_depth_module(mod):
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
        if isinstance(mod, COMPOSITE_MODULES):
            return self.frozen_node(node, op, "torch.nn composite kept as a leaf (leaf_modules, or tracing into it "
                                    "failed: see the tracer line); inputs/outputs pinned", self.I(node.args), v)
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
            if self.param_scale(node, args[0], args[1], v):
                return
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
        if name == "pow" and len(args) > 1:
            return self.power(node, op, self.I(args[0]), self.V(args[1]), v)
        if name in ("new_zeros",):
            self.idx[node] = self.const_like(v, WILD)
            return
        if name in ("new_ones", "new_full", "new_empty", "new_tensor"):
            self.idx[node] = self.const_like(v)
            return
        if name in _CONST_METHODS and self.all_const(node):  # masks, position ids, rotary tables: constant
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
            base = self.I(args[0])
            if isinstance(base, dict) and self.V(args[1]) in base:  # a field of an output dataclass built here
                self.idx[node] = base[self.V(args[1])]
                return
            self.idx[node] = self.const_like(v)
            return
        if isinstance(t, type) and dataclasses.is_dataclass(t) and not isinstance(v, torch.Tensor):
            # a dataclass output (ModelOutput-like) built in the graph: its fields keep their ids (by name); the
            # output node pins only the fields the analysis preserves (Propagator._preserved)
            names = [f.name for f in dataclasses.fields(t)]
            ids = dict(zip(names, (self.I(a) for a in args)))
            ids.update({k: self.I(a) for k, a in kw.items()})
            self.idx[node] = ids
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
        if is_stochastic_depth(t):  # per-sample scale: commutes with channel taus
            self.idx[node] = self.I(args[0] if args else kw["input"])
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
            if self.param_scale(node, args[0], args[1], v):
                return
            return self.mul(node, args[0], args[1], v)
        if t in _DIV_FUNCS and "rounding_mode" not in kw:
            return self.div(node, args[0], args[1], v)
        if t in _MATMUL_FUNCS:
            w = self.V(args[1])
            if self.param_of(args[1]) is not None and w.dim() == 2 and self.V(args[0]).dim() >= 1:
                return self.linear_t(node, self.I(args[0]), self.param_of(args[1]), tuple(w.shape), None, v)
            return self.matmul(node, op, args[0], args[1], v)
        if t in _ADDMM_FUNCS:
            bias, a, w = args[0], args[1], args[2]
            scal = [self.V(kw.get(n, args[i] if len(args) > i else 1)) for i, n in ((3, "beta"), (4, "alpha"))]
            wv = self.V(w)
            if (self.param_of(w) is not None and wv.dim() == 2 and scal == [1, 1]
                    and (self.param_of(bias) is not None or not isinstance(self.V(bias), torch.Tensor))):
                return self.linear_t(node, self.I(a), self.param_of(w), tuple(wv.shape), self.param_of(bias), v)
        if t in _POW_FUNCS and len(args) > 1 and isinstance(self.V(args[0]), torch.Tensor):
            return self.power(node, op, self.I(args[0]), self.V(args[1]), v)
        if t is torch.masked_fill:
            return self.masked_fill(node, op, v)
        if t in _export.CAST_FUNCS:
            if isinstance(v, torch.Tensor) and v.is_floating_point() and self.V(args[0]).is_floating_point():
                self.idx[node] = self.I(args[0])  # a float -> float cast commutes with the taus
                return
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
        if (isinstance(t, torch._ops.OpOverload) or t in _CONST_FUNCS) and self.all_const(node):
            # a function of constants (arange, causal masks, rotary cos/sin tables, T5 position buckets): constant
            self.idx[node] = self.const_like(v)
            return
        return self.frozen_node(node, op, "unsupported function; inputs/outputs pinned",
                                self.I(list(args) + list(kw.values())), v)

