"""Teleportation: function-preserving change of basis (seed 000) and null-space gradient projection (seed 001).

Public names are imported lazily from their modules (``core``, ``optim_state``, ``optimize``, ``callback``,
``nullspace``, ``symmetry``), so ``import gradcond.teleport`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "core": ["CoB", "teleport", "random_cob", "micro_teleport", "pseudo_teleport", "weight_scale_factors",
             "teleported_params", "functional_teleport", "needs_rewrite", "flat_params"],
    "optim_state": ["transport_optimizer_state"],
    "optimize": ["optimize_cob", "best_of_random"],
    "callback": ["TeleportCallback"],
    "nullspace": ["NullSpaceTeleport", "NullSpaceTeleportCallback", "null_space_basis", "supported_layers", "TeleportError"],
    "symmetry": ["SymmetryTeleport", "SymmetryTeleportCallback"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
