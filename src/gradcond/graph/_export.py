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
* parameters and buffers (persistent or not) become ``get_attr`` nodes of their names in the model (so the analyzer
  sees the user's own ``nn.Parameter`` objects); lifted tensor constants (tensors the forward builds from Python
  values, plain tensor attributes) become buffers ``_export_const_<name>`` of the returned ``GraphModule`` (its
  root is a dict of exactly what the graph reads, so nothing is set on the user's model);
* the program is exported with the model's outputs reduced to the ones the analysis preserves
  (:func:`gradcond.utils.output_tensors`: a ``ModelOutput``'s logits, else every tensor, or the ``output=``
  selection), so outputs torch.export cannot return (a ``DynamicCache``) never reach it; keyword example inputs
  (``input_ids=``, ``attention_mask=``) are exported as such and become placeholders in the program's order
  (:func:`flat_inputs`);
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

from ..utils import output_tensors


def aten_slice(x, dim=0, start=None, end=None, step=1):
    """``aten.slice.Tensor`` as a plain function (works on the analyzer's integer id tensors)."""
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


def aten_expand(x, size, implicit=False):
    return x.expand(size)


def aten_alias(x):
    return x


def aten_addmm(bias, a, b, beta=1, alpha=1):
    """``aten.addmm``: ``beta * bias + alpha * (a @ b)`` (Hugging Face ``Conv1D``, GPT-2's projections)."""
    out = torch.mm(a, b)
    if alpha != 1:
        out = out * alpha
    return out + (bias if beta == 1 else beta * bias)


def aten_to(x, *args, **kwargs):
    """``aten.to.dtype`` / ``aten.to.dtype_layout`` / ``aten._to_copy``: a dtype / device cast (no copy flags)."""
    dtype = kwargs.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
    device = kwargs.get("device")
    return x.to(device=device, dtype=dtype) if device is not None else x.to(dtype=dtype) if dtype else x


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
    "aten.where.self": _same(torch.where), "aten.where.ScalarOther": _same(torch.where),
    "aten.where.ScalarSelf": _same(torch.where),
    "aten.addmm.default": _same(aten_addmm),
    "aten.masked_fill.Scalar": _same(torch.masked_fill), "aten.masked_fill.Tensor": _same(torch.masked_fill),
    "aten.lift_fresh_copy.default": _same(torch.clone), "aten.detach.default": _same(aten_alias),
    "aten.detach_.default": _same(aten_alias),
    "aten.to.dtype": _same(aten_to), "aten.to.dtype_layout": _same(aten_to), "aten._to_copy.default": _same(aten_to),
    "aten.pow.Tensor_Scalar": _same(torch.pow), "aten.rsqrt.default": _same(torch.rsqrt),
    "aten.repeat_interleave.self_int": lambda a, k: (torch.repeat_interleave, tuple(a[:3]), {}),
}
# ops that only assert or carry metadata: dropped from the rebuilt graph
_SKIP_PREFIX = ("aten._assert", "aten.sym_constrain_range", "aten._assert_tensor_metadata")

MOVE_FUNCS = {aten_slice, aten_expand}
COMMUTE_FUNCS = {aten_alias}
CAST_FUNCS = {aten_to}
ADDMM_FUNCS = {aten_addmm}


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


class _preserved_outputs:
    """Context: ``model(...)`` returns only the tensors the analysis preserves (:func:`gradcond.utils.output_tensors`
    of what the forward returns: one tensor, or a tuple of them), so that the exported program's outputs are those
    tensors.  A ``ModelOutput`` holding a key/value cache object (``DynamicCache``), which torch.export cannot
    return, is exported through its logits.  Same mechanism as :class:`gradcond.utils.selecting_output` (an
    instance ``forward`` shadowing the class's, removed on exit), so parameter and module names stay the user's."""

    def __init__(self, model: nn.Module, output):
        self.model, self.output = model, output

    def __enter__(self):
        import functools
        import types

        m, output = self.model, self.output
        self.had, self.prev = "forward" in m.__dict__, m.__dict__.get("forward")
        inner = self.prev if self.had else type(m).forward.__get__(m)

        @functools.wraps(type(m).forward)
        def forward(self_, *args, **kwargs):
            ts = tuple(t for _, t in output_tensors(inner(*args, **kwargs), output))
            return ts[0] if len(ts) == 1 else ts

        m.forward = types.MethodType(forward, m)
        return m

    def __exit__(self, *exc):
        if self.had:
            self.model.forward = self.prev
        else:
            self.model.__dict__.pop("forward", None)
        return False


def export_program(model: nn.Module, inputs: tuple, leaf_paths: tuple, kwargs: dict | None = None, output=None):
    """``torch.export.export`` (non-strict) with the leaves' call signatures preserved, on positional ``inputs``
    and keyword ``kwargs``, exporting the outputs the analysis preserves (``output``: the selector of
    :func:`gradcond.utils.output_tensors`); torch's diagnostic output is held back and dropped when export fails
    (see :class:`_quiet`)."""
    with _quiet(), _preserved_outputs(model, output):
        return torch.export.export(model, tuple(inputs), dict(kwargs or {}), strict=False,
                                   preserve_module_call_signature=leaf_paths)


def _reachable(model: nn.Module, name: str, mod: nn.Module) -> bool:
    """Whether attribute access ``model.<name>`` reaches ``mod``.  A submodule can be shadowed by an instance
    attribute of the same name (a deep-copied ``nn.TransformerDecoderLayer`` whose ``activation`` module is
    shadowed by ``F.relu``); its forward then never calls it, and torch.export cannot preserve its signature."""
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part, None)
    return obj is mod


def module_graph(model: nn.Module, inputs: tuple, is_leaf, kwargs: dict | None = None,
                 output=None) -> fx.GraphModule:
    """Export ``model`` on ``inputs`` (positional) and ``kwargs`` (keyword inputs) and rebuild a module-level
    ``GraphModule`` -- see the module docstring.  ``is_leaf(module, qualname)``: the fx tracer's leaf test;
    ``output``: which outputs are exported (:func:`gradcond.utils.output_tensors`).  The graph's placeholders are
    the leaves of ``(inputs, kwargs)`` in the exported program's order (:func:`flat_inputs` gives them).

    Everything the exported program reads besides the user inputs is carried into the returned module: parameters
    and buffers (persistent or not) as ``get_attr`` nodes of their names in ``model`` (the same objects), lifted
    tensor constants (tensors the forward builds from Python values, constant tensor attributes) as buffers
    ``_export_const_<name>`` of the returned module.  Raises whatever export raises."""
    leaves, inside = [], set()
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if is_leaf(mod, name) and _reachable(model, name, mod):
            leaves.append(name)
            inside.add(name)
    ep = export_program(model, inputs, tuple(leaves), kwargs, output)
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
    # the root is a dict of exactly what the graph reads: the user's submodules / parameters / buffers (by their
    # names in the model) and the lifted constants (not attributes of the model, so they cannot be copied from it)
    root: dict = {}
    for n in g.nodes:
        if n.op in ("get_attr", "call_module") and n.target not in root:
            if n.target in const_bufs:
                root[n.target] = const_bufs[n.target]
            else:
                obj = model
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                root[n.target] = obj
    gm = fx.GraphModule(root, g, class_name=type(model).__name__)
    gm._gradcond_in_spec = ep.call_spec.in_spec  # how (inputs, kwargs) flatten onto the placeholders
    return gm


def flat_inputs(gm: fx.GraphModule, inputs: tuple, kwargs: dict | None):
    """The values of the placeholders of a graph made by :func:`module_graph`: the leaves of ``(inputs, kwargs)``
    flattened in the exported program's order (keyword inputs by name, whatever order they were given in)."""
    spec = getattr(gm, "_gradcond_in_spec", None)
    tree = (tuple(inputs), dict(kwargs or {}))
    if spec is None:
        return tuple(pytree.tree_leaves(tree))
    from torch.fx._pytree import tree_flatten_spec

    return tuple(tree_flatten_spec(tree, spec))


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
