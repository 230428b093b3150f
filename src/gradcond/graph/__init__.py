"""Graph analysis of unmodified PyTorch models: which change-of-basis (teleportation) symmetries they have.

``analyze(model, example_input, rewrite=True, leaf_modules=()) -> CoBStructure`` -- see
:mod:`gradcond.graph.analyze` for the rules and :class:`CoBStructure` for the result.
"""

from ._modules import TeleportedActivation
from .analyze import analyze
from .structure import ActSite, CoBStructure, Group, Note, ParamRule

__all__ = ["analyze", "CoBStructure", "Group", "ActSite", "ParamRule", "Note", "TeleportedActivation"]
