"""Graph analysis of unmodified PyTorch models: which change-of-basis (teleportation) symmetries they have.

``analyze(model, example_input, rewrite=True, leaf_modules=(), tracer="auto", teleport_frozen_params=False)
-> CoBStructure`` -- see :mod:`gradcond.graph.analyze` for the rules and :class:`CoBStructure` for the result.

Modules: ``analyze`` (the entry point and the rule list), ``tracing`` (model -> fx graph: fx, the torch.export
fallback in ``_export``, leaf decisions), ``propagate`` (atom-id state, run loop, final structure), ``rules``
(per-op rules), ``dispatch`` (op tables: which rule a node gets), ``_unionfind``, ``structure`` (the result
types), ``_modules`` (:class:`TeleportedActivation`, ``repair_deepcopy``).
"""

from ._modules import TeleportedActivation
from .analyze import analyze
from .structure import ActSite, CoBStructure, Group, Note, ParamRule

__all__ = ["analyze", "CoBStructure", "Group", "ActSite", "ParamRule", "Note", "TeleportedActivation"]
