"""Teleportation: function-preserving change of basis (seed 000) and null-space gradient projection (seed 001).

Public names are imported lazily from their modules (``core``, ``optim_state``, ``optimize``, ``callback``,
``nullspace``, ``symmetry``), so ``import gradcond.teleport`` stays cheap.
"""

from __future__ import annotations

from ..utils import lazy_exports

_EXPORTS = {
    "core": ["CoB", "teleport", "random_cob", "micro_teleport", "pseudo_teleport", "weight_scale_factors",
             "teleported_params", "functional_teleport", "needs_rewrite", "flat_params"],
    "optim_state": ["transport_optimizer_state"],
    "optimize": ["optimize_cob", "best_of_random"],
    "callback": ["TeleportCallback"],
    "nullspace": ["NullSpaceTeleport", "NullSpaceTeleportCallback", "null_space_basis", "supported_layers", "TeleportError"],
    "symmetry": ["SymmetryTeleport", "SymmetryTeleportCallback"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
