"""From an ``nn.Module`` to the module-level fx graph that :func:`gradcond.graph.analyze` propagates through.

* :func:`trace`: ``torch.fx`` symbolic tracing, falling back to ``torch.export`` (:mod:`gradcond.graph._export`)
  when fx fails (``tracer="auto"``), with the error messages that name the construct when both fail.
* Leaf decisions (:class:`Tracer`): standard ``torch.nn`` layers, zoo ``LONorm``, ``TeleportedActivation``,
  ``leaf_modules`` and modules with user hooks stay leaves; containers and the ``torch.nn`` transformer composites
  (:data:`COMPOSITE_MODULES`) are traced into, with the MHA fast path off (:class:`NoMHAFastPath`).  When tracing
  into a composite fails, :class:`CompositesUntraceable` asks the caller to retry with them as frozen leaves.
* Recognition by name of optional-dependency constructs (``LONorm``, torchvision's stochastic depth) and of the
  forward hooks no rule covers (:func:`user_hooks`, :func:`global_hooks`), shared with the op rules.

Cost: one symbolic trace (fx), or one non-strict export on fake tensors (the fallback).
"""

from __future__ import annotations

import traceback

import torch
import torch.fx as fx
from torch import nn

from . import _export
from ._modules import TeleportedActivation

__all__ = ["COMPOSITE_MODULES", "CompositesUntraceable", "NoMHAFastPath", "Tracer", "trace", "is_lonorm",
           "is_hf_activation",
           "is_stochastic_depth", "is_stochastic_depth_module", "user_hooks", "global_hooks"]

# torch.nn modules built from other modules: traced into (as when they are the root model) instead of being kept
# as opaque, frozen leaves -- fx's default ``is_leaf_module`` treats every ``torch.nn`` module as a leaf.
COMPOSITE_MODULES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                     nn.TransformerDecoder, nn.Transformer)


def is_lonorm(m: nn.Module) -> bool:
    """The zoo's ``LONorm`` (recognised by class name: ``graph`` does not import the zoo), kept as a leaf and
    handled like a LayerNorm over its features."""
    return type(m).__name__ == "LONorm" and hasattr(m, "weight")


def is_hf_activation(m: nn.Module) -> bool:
    """An activation module of Hugging Face ``transformers.activations`` (``GELUActivation``,
    ``NewGELUActivation``, ``SiLUActivation``, ``QuickGELUActivation``...; recognised by module name: transformers
    is an optional, unimported dependency).  All of them are elementwise, so they are kept as leaves and handled
    like ``nn.GELU``: a scale site rewritten as ``tau * f(x / tau)`` (exact for any elementwise ``f``)."""
    return (type(m).__module__ or "").startswith("transformers.activations") and not list(m.children())


def _supported_hooks():
    """Hook objects that a supported construct registers itself: legacy ``torch.nn.utils.weight_norm`` and
    ``torch.nn.utils.prune`` forward pre-hooks (their effect, ``weight = g * v / ||v||`` and ``weight = orig * mask``,
    has an exact change-of-basis rule, see :meth:`gradcond.graph.rules.Rules._virtual_param`)."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.weight_norm import WeightNorm
    return (WeightNorm, BasePruningMethod)


def user_hooks(m: nn.Module) -> list:
    """Descriptions of the forward hooks / forward pre-hooks on ``m`` that no rule covers (any user hook: it may
    change the module's output or input in a way the analysis cannot see)."""
    known = _supported_hooks()
    out = []
    for h in m._forward_pre_hooks.values():
        if not isinstance(h, known):
            out.append(f"forward pre-hook {getattr(h, '__qualname__', type(h).__name__)}")
    for h in m._forward_hooks.values():
        out.append(f"forward hook {getattr(h, '__qualname__', type(h).__name__)}")
    return out


def global_hooks() -> list:
    """Global forward (pre-)hooks (``nn.modules.module.register_module_forward_hook``): they run on every module."""
    from torch.nn.modules import module as _m
    return ([f"global forward pre-hook {getattr(h, '__qualname__', type(h).__name__)}"
             for h in getattr(_m, "_global_forward_pre_hooks", {}).values()]
            + [f"global forward hook {getattr(h, '__qualname__', type(h).__name__)}"
               for h in getattr(_m, "_global_forward_hooks", {}).values()])


def is_stochastic_depth(t) -> bool:
    """``torchvision.ops.stochastic_depth`` (recognised by module and name: torchvision is an optional, unimported
    dependency).  It multiplies each sample (``mode="row"``) or the whole batch by a random 0 or 1/(1-p): a
    per-sample scale, which commutes with per-channel taus."""
    return (getattr(t, "__name__", None) == "stochastic_depth"
            and str(getattr(t, "__module__", "") or "").startswith("torchvision.ops"))


def is_stochastic_depth_module(m: nn.Module) -> bool:
    """``torchvision.ops.StochasticDepth`` (by class name and module, see :func:`is_stochastic_depth`)."""
    cls = type(m)
    return cls.__name__ == "StochasticDepth" and cls.__module__.startswith("torchvision.ops")


class NoMHAFastPath:
    """Context: ``torch.backends.mha`` fast path off while tracing.  The eval-mode fast-path checks of
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` branch on tensor properties (``src.dim()``), which
    fx cannot trace; with the fast path off the first check short-circuits and the traced graph is the reference
    (slow) path, which computes the same function."""

    def __enter__(self):
        self.was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.was)
        return False


class Tracer(fx.Tracer):
    """``torch.fx`` tracer with the analysis' leaf decisions: ``TeleportedActivation``, ``LONorm``, the classes in
    ``leaf_modules`` and modules with user hooks are leaves; containers and :data:`COMPOSITE_MODULES` are traced
    into; every other ``torch.nn`` module is a leaf (fx's default)."""

    def __init__(self, leaf_modules: tuple):
        super().__init__()
        self._extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, TeleportedActivation) or is_lonorm(m) or is_hf_activation(m):
            return True
        if self._extra_leaves and isinstance(m, self._extra_leaves):
            return True
        if user_hooks(m):
            return True  # traced through, its hooks would be skipped: keep it as a (frozen) leaf instead
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict) + COMPOSITE_MODULES):
            return False
        return super().is_leaf_module(m, qualname)


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

class CompositesUntraceable(Exception):
    """Internal: tracing failed, and the model has nested ``torch.nn`` composites that the tracer traced into.
    :func:`gradcond.graph.analyze` then analyses again with them kept as frozen leaves; ``why`` (where and why
    tracing failed) goes into ``structure.tracer``."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _traced_composites(model: nn.Module, tracer: Tracer) -> bool:
    """Whether ``model`` has a nested ``torch.nn`` composite that ``tracer`` traces into (not kept as a leaf)."""
    return any(isinstance(m, COMPOSITE_MODULES) and not tracer.is_leaf_module(m, n)
               for n, m in model.named_modules() if n)


def trace(model: nn.Module, inputs: tuple, leaf_modules: tuple, which: str, kwargs: dict | None = None,
          output=None) -> tuple[fx.GraphModule, bool, str]:
    """``(graph module, exported, how)``: the module-level fx graph of ``model`` that the analysis runs.

    ``which``: ``"auto"`` (torch.fx, falling back to non-strict ``torch.export`` on ``inputs``), ``"fx"`` or
    ``"export"`` (see :func:`gradcond.graph.analyze`); ``exported`` says whether the export fallback made the
    graph; ``how`` is the ``structure.tracer`` line (which tracer, and why fx failed).  Raises
    :class:`CompositesUntraceable` when tracing failed and nested ``torch.nn`` composites were traced into (retry
    with them as leaves), else ``ValueError`` naming the construct.  Module modes are restored, and so is any
    buffer an export changed (it runs on fake tensors; this is a safety net).
    Cost: one symbolic trace, plus one export when fx fails.
    """
    tracer = Tracer(tuple(leaf_modules))
    try:
        if which == "export":
            raise _ExportRequested()
        with NoMHAFastPath():
            graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__), False, "torch.fx symbolic tracing"
    except Exception as exc:  # noqa: BLE001 -- fall back to torch.export, else a ValueError naming the construct
        if which == "fx":
            if _traced_composites(model, tracer):
                raise CompositesUntraceable(_fx_failure(exc)) from None
            raise ValueError(
                f"analyze could not trace {type(model).__name__} with torch.fx symbolic tracing{_fx_failure(exc)}; "
                "tracer='auto' falls back to torch.export, or pass the offending submodule classes as "
                "analyze(..., leaf_modules=(...,)) to keep them as frozen leaves."
            ) from None
        fx_why = "" if isinstance(exc, _ExportRequested) else _fx_failure(exc)
    modes = {m: m.training for m in model.modules()}
    state = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    try:
        model.eval()  # no batch statistics or running-stat updates while exporting
        with NoMHAFastPath():
            gm = _export.module_graph(model, tuple(inputs), tracer.is_leaf_module, kwargs, output)
    except Exception as exc2:  # noqa: BLE001
        first = str(exc2).strip().splitlines()[0] if str(exc2).strip() else ""
        if _traced_composites(model, tracer):
            raise CompositesUntraceable(f"{fx_why}; torch.export: {type(exc2).__name__}: {first}") from None
        if which == "export":
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
    how = ("torch.export (non-strict), as requested" if which == "export"
           else f"torch.export (non-strict) fallback; torch.fx failed{fx_why}")
    return gm, True, how
