"""torch.export fallback for :func:`gradcond.graph.analyze`: a module-level fx graph from an exported program.

When ``torch.fx`` symbolic tracing fails (Python control flow on tensor shapes, ``for i in range(x.shape[1])``,
data-structure tricks...), the model is exported with ``torch.export.export(model, example_input, strict=False)``
(non-strict: the user's Python runs as in eager mode on fake tensors, so shape-dependent control flow is resolved
for the example input's shapes).  The exported graph is ATen-level; :func:`module_graph` turns it back into the
graph the analyzer consumes:

* every call of a *leaf* module (the same leaves as the fx tracer: standard ``torch.nn`` layers, ``LONorm``,
  ``TeleportedActivation``, ``leaf_modules``) is collapsed into one ``call_module`` node.  Its inputs and outputs
  come from the exported program's module call signatures (``preserve_module_call_signature`` for every leaf
  path; repeated calls appear as ``path@1``, ``path@2``...), and its ATen nodes are recognised by their
  ``node.meta["nn_module_stack"]`` entry (path and call index);
* parameters and buffers become ``get_attr`` nodes of their names in the model (so the analyzer sees the user's
  own ``nn.Parameter`` objects); lifted constants become buffers of the returned ``GraphModule``;
* the remaining ATen ops (the model's own forward: residual adds, cat, views, slicing, means, F.relu...) are
  mapped to the torch functions the analyzer's rules know (``aten.add.Tensor`` -> ``operator.add``,
  ``aten.view`` -> ``torch.reshape``, ``aten.slice.Tensor`` -> :func:`aten_slice`...); unknown ATen ops are kept
  as they are and frozen by the analyzer (inputs and outputs pinned, named ``aten.<op>`` in the summary).

*Decisions*: the export is specialised to the example input's shapes, so the structure describes the model on
inputs of those shapes (like the fx structure describes the traced path).  Teleporting never runs this graph: it
changes the user's parameters and wraps the user's activation modules, so the teleported model still runs the
user's own ``forward``.  Activations that are function calls or modules called several times would need a graph
rewrite; in an exported structure they are pinned instead (tau = 1 at non-homogeneous ones, tau > 0 at
ReLU-like ones), so the teleported model is always the user's class.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import sys

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree


def aten_slice(x, dim=0, start=None, end=None, step=1):
    """``aten.slice.Tensor`` as a plain function (works on the analyzer's integer id tensors)."""
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


def aten_expand(x, size, implicit=False):
    return x.expand(size)


def aten_alias(x):
    return x


def _same(fn):
    return lambda a, k: (fn, a, k)


def _arith(fn):
    def f(a, k):
        if k.get("alpha", 1) != 1 or "rounding_mode" in k:
            return None
        return fn, tuple(a[:2]), {}
    return f


def _drop_kw(fn, *names):
    return lambda a, k: (fn, a, {n: v for n, v in k.items() if n not in names})


_ATEN = {
    "aten.add.Tensor": _arith(operator.add), "aten.sub.Tensor": _arith(operator.sub),
    "aten.mul.Tensor": _arith(operator.mul), "aten.div.Tensor": _arith(operator.truediv),
    "aten.neg.default": _same(torch.neg),
    "aten.view.default": _same(torch.reshape), "aten.reshape.default": _same(torch.reshape),
    "aten._unsafe_view.default": _same(torch.reshape),
    "aten.permute.default": _same(torch.permute), "aten.transpose.int": _same(torch.transpose),
    "aten.t.default": _same(torch.t), "aten.unsqueeze.default": _same(torch.unsqueeze),
    "aten.squeeze.dim": _same(torch.squeeze), "aten.squeeze.dims": _same(torch.squeeze),
    "aten.squeeze.default": _same(torch.squeeze),
    "aten.flatten.using_ints": _same(torch.flatten), "aten.unflatten.int": _same(torch.unflatten),
    "aten.cat.default": _same(torch.cat), "aten.stack.default": _same(torch.stack),
    "aten.split.Tensor": _same(torch.split), "aten.split_with_sizes.default": _same(torch.split),
    "aten.chunk.default": _same(torch.chunk), "aten.unbind.int": _same(torch.unbind),
    "aten.select.int": _same(torch.select), "aten.narrow.default": _same(torch.narrow),
    "aten.slice.Tensor": _same(aten_slice), "aten.expand.default": _same(aten_expand),
    "aten.alias.default": _same(aten_alias), "aten.clone.default": _drop_kw(torch.clone, "memory_format"),
    "aten.contiguous.default": _drop_kw(torch.clone, "memory_format"),
    "aten.dropout.default": _same(torch.dropout),
    "aten.relu.default": _same(torch.relu), "aten.leaky_relu.default": _same(F.leaky_relu),
    "aten.abs.default": _same(torch.abs), "aten.tanh.default": _same(torch.tanh),
    "aten.sigmoid.default": _same(torch.sigmoid), "aten.gelu.default": _same(F.gelu),
    "aten.silu.default": _same(F.silu),
    "aten.softmax.int": _same(torch.softmax), "aten.log_softmax.int": _same(torch.log_softmax),
    "aten.mean.dim": _same(torch.mean), "aten.mean.default": _same(torch.mean),
    "aten.sum.dim_IntList": _same(torch.sum), "aten.sum.default": _same(torch.sum),
    "aten.amax.default": _same(torch.amax), "aten.amin.default": _same(torch.amin),
    "aten.matmul.default": _same(torch.matmul), "aten.bmm.default": _same(torch.bmm),
    "aten.mm.default": _same(torch.mm),
    "aten.linear.default": _same(F.linear), "aten.conv1d.default": _same(F.conv1d),
    "aten.conv2d.default": _same(F.conv2d), "aten.conv3d.default": _same(F.conv3d),
    "aten.max_pool1d.default": _same(F.max_pool1d), "aten.max_pool2d.default": _same(F.max_pool2d),
    "aten.max_pool3d.default": _same(F.max_pool3d),
    "aten.avg_pool1d.default": _same(F.avg_pool1d), "aten.avg_pool2d.default": _same(F.avg_pool2d),
    "aten.avg_pool3d.default": _same(F.avg_pool3d),
    "aten.adaptive_avg_pool1d.default": _same(F.adaptive_avg_pool1d),
    "aten.adaptive_avg_pool2d.default": _same(F.adaptive_avg_pool2d),
    "aten.adaptive_avg_pool3d.default": _same(F.adaptive_avg_pool3d),
    "aten.layer_norm.default": lambda a, k: (F.layer_norm, tuple(a[:5]), {}),
    "aten.embedding.default": lambda a, k: (F.embedding, (a[1], a[0]), {}),
    "aten.scaled_dot_product_attention.default": _same(F.scaled_dot_product_attention),
    "aten.zeros_like.default": _drop_kw(torch.zeros_like, "pin_memory", "memory_format"),
    "aten.ones_like.default": _drop_kw(torch.ones_like, "pin_memory", "memory_format"),
    "aten.where.self": _same(torch.where),
}
# ops that only assert or carry metadata: dropped from the rebuilt graph
_SKIP_PREFIX = ("aten._assert", "aten.sym_constrain_range", "aten._assert_tensor_metadata")

MOVE_FUNCS = {aten_slice, aten_expand}
COMMUTE_FUNCS = {aten_alias}


def _call_key(stack_key: str, path: str) -> str:
    """``nn_module_stack`` key + path -> the module call graph's fqn (``path`` or ``path@k``)."""
    return path + (stack_key[stack_key.rindex("@"):] if "@" in stack_key else "")


class _Held(logging.Filter):
    """Holds back the log records of a handler (see :class:`_quiet`)."""

    def __init__(self, records: list):
        super().__init__()
        self.records = records

    def filter(self, record):
        self.records.append(record)
        return False


class _quiet:
    """Context: hold back what torch prints while exporting (``sys.stderr`` writes and log records reaching the
    handlers of the ``torch.*`` and root loggers).  When export fails, e.g. on data-dependent control flow, torch
    prints the partial graph (tens of lines) and logs warnings before raising; the caller turns the exception
    into one clear error, so the held output is dropped.  On success it is written out as it would have been."""

    def __enter__(self):
        self.records: list = []
        self.buf = io.StringIO()
        self.filt = _Held(self.records)
        loggers = [logging.getLogger()] + [lg for name, lg in list(logging.Logger.manager.loggerDict.items())
                                           if name.split(".")[0] == "torch" and isinstance(lg, logging.Logger)]
        self.handlers = list({id(h): h for lg in loggers for h in lg.handlers}.values())
        for h in self.handlers:
            h.addFilter(self.filt)
        self.redirect = contextlib.redirect_stderr(self.buf)
        self.redirect.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.redirect.__exit__(None, None, None)
        for h in self.handlers:
            h.removeFilter(self.filt)
        if exc_type is None:
            sys.stderr.write(self.buf.getvalue())
            seen = set()
            for rec in self.records:  # one record can reach several handlers: re-emit it once
                if id(rec) not in seen:
                    seen.add(id(rec))
                    logging.getLogger(rec.name).handle(rec)
        return False


def export_program(model: nn.Module, inputs: tuple, leaf_paths: tuple):
    """``torch.export.export`` (non-strict) with the leaves' call signatures preserved; torch's diagnostic output
    is held back and dropped when export fails (see :class:`_quiet`)."""
    with _quiet():
        return torch.export.export(model, tuple(inputs), strict=False, preserve_module_call_signature=leaf_paths)


def _reachable(model: nn.Module, name: str, mod: nn.Module) -> bool:
    """Whether attribute access ``model.<name>`` reaches ``mod``.  A submodule can be shadowed by an instance
    attribute of the same name (a deep-copied ``nn.TransformerDecoderLayer`` whose ``activation`` module is
    shadowed by ``F.relu``); its forward then never calls it, and torch.export cannot preserve its signature."""
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return obj is mod


def module_graph(model: nn.Module, inputs: tuple, is_leaf) -> fx.GraphModule:
    """Export ``model`` on ``inputs`` and rebuild a module-level ``GraphModule`` (root ``model``) -- see the module
    docstring.  ``is_leaf(module, qualname)``: the fx tracer's leaf test.  Raises whatever export raises."""
    leaves, inside = [], set()
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if is_leaf(mod, name) and _reachable(model, name, mod):
            leaves.append(name)
            inside.add(name)
    ep = export_program(model, inputs, tuple(leaves))
    sig = ep.graph_signature
    param_of = dict(sig.inputs_to_parameters)
    param_of.update(sig.inputs_to_buffers)
    const_of = dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    calls = {}
    for entry in ep.module_call_graph:
        base = entry.fqn.split("@")[0]
        if entry.signature is not None and base in inside:
            calls[entry.fqn] = entry.signature
    consts = dict(ep.constants) if hasattr(ep, "constants") else {}

    g = fx.Graph()
    env: dict = {}
    done_calls: dict = {}
    const_bufs: dict = {}
    leaf_set = set(leaves)

    def arg(a):
        return fx.node.map_arg(a, lambda n: env[n])

    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in param_of:
                env[node] = g.get_attr(param_of[node.name])
            elif node.name in const_of:
                key = const_of[node.name]
                bname = "_export_const_" + key.replace(".", "_")
                const_bufs[bname] = consts.get(key)
                env[node] = g.get_attr(bname)
            else:
                env[node] = g.placeholder(node.name)
            continue
        if node.op == "output":
            outs = node.args[0]
            user = outs[len(outs) - len(sig.user_outputs):] if isinstance(outs, (list, tuple)) else outs
            g.output(arg(user[0] if isinstance(user, (list, tuple)) and len(user) == 1 else tuple(user)))
            continue
        stack = node.meta.get("nn_module_stack") or {}
        call = None
        for key, (path, _cls) in stack.items():
            if path in leaf_set:
                call = _call_key(key, path)
                break
        if call is not None and call in calls:
            if call not in done_calls:
                done_calls[call] = _emit_call(g, env, ep, calls[call], call.split("@")[0])
            continue  # an ATen node inside a collapsed leaf call
        if node.op != "call_function":
            raise RuntimeError(f"unexpected node {node.op} {node.target} in the exported graph")
        name = str(node.target)
        if name.startswith(_SKIP_PREFIX):
            continue
        a, k = arg(tuple(node.args)), arg(dict(node.kwargs))
        rule = _ATEN.get(name)
        mapped = rule(a, k) if rule is not None else None
        if mapped is None:
            env[node] = g.call_function(node.target, a, k)
        else:
            env[node] = g.call_function(mapped[0], tuple(mapped[1]), mapped[2])
        env[node].meta["aten"] = name
    gm = fx.GraphModule(model, g, class_name=type(model).__name__)
    for bname, t in const_bufs.items():
        gm.register_buffer(bname, t)
    return gm


def _emit_call(g: fx.Graph, env: dict, ep, sig, path: str):
    """One ``call_module`` node for a preserved leaf call; binds its output nodes in ``env``."""
    by_name = {n.name: n for n in ep.graph.nodes}
    leaves_in = []
    for spec in sig.inputs:
        nm = getattr(spec, "name", None)
        if nm is not None and nm in by_name:
            leaves_in.append(env[by_name[nm]])
        else:
            leaves_in.append(getattr(spec, "value", None))
    args, kwargs = pytree.tree_unflatten(leaves_in, sig.in_spec)
    out = g.call_module(path, tuple(args), dict(kwargs))
    out_leaves = list(sig.outputs)
    if sig.out_spec.num_leaves == 1 and len(out_leaves) == 1:
        targets = [(out_leaves[0], out)]
    else:
        flat_idx = _leaf_paths(sig.out_spec)
        targets = []
        for spec, where in zip(out_leaves, flat_idx):
            n = out
            for i in where:
                n = g.call_function(operator.getitem, (n, i))
            targets.append((spec, n))
    for spec, n in targets:
        nm = getattr(spec, "name", None)
        if nm is not None and nm in by_name:
            env[by_name[nm]] = n
    return out


def _leaf_paths(spec) -> list:
    """Index paths (tuple/list nesting) of the leaves of a pytree spec, in flattening order."""
    if spec.is_leaf():
        return [()]
    if spec.type not in (tuple, list):
        raise RuntimeError(f"unsupported module output structure {spec.type.__name__} in an exported leaf call")
    out = []
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    for i, child in enumerate(children):
        out += [(i,) + p for p in _leaf_paths(child)]
    return out
