"""Teleportation: function-preserving change of basis (seed 000) and null-space gradient projection (seed 001).

Public names are imported lazily from their modules, so ``import gradcond.teleport`` stays cheap:

* the change-of-basis (CoB) teleport: ``cob`` -- :class:`CoB`, :func:`random_cob`, :func:`weight_scale_factors`;
  ``apply`` -- :func:`teleport` (self-checked) and :func:`check_tolerance`, on top of ``scaling`` (parameters
  ``V = factor * W``, batched) and ``rewrite`` (activations ``tau * f(x / tau)``); ``functional`` -- differentiable
  forms for ``torch.func.functional_call``; ``micro`` -- micro- and pseudo-teleportation, :func:`flat_params`;
  ``optim_state`` -- optimizer-state transport; ``optimize`` -- choosing a CoB; ``cob_callback`` --
  :class:`TeleportCallback`, the trainer callback of the CoB teleport;
* ``nullspace`` / ``symmetry`` -- the loss-level-set teleports; ``level_set`` -- their shared guards, records and
  driver; ``level_set_callback`` -- :class:`LevelSetTeleportCallback`, the base of their trainer callbacks;
* ``errors`` -- :class:`TeleportError` (every refused teleport) and its subclass :class:`TeleportRejected`.
"""

from __future__ import annotations

from ..utils import lazy_exports

_EXPORTS = {
    "cob": ["CoB", "random_cob", "weight_scale_factors"],
    "apply": ["teleport", "check_tolerance"],
    "functional": ["teleported_params", "functional_teleport", "needs_rewrite"],
    "micro": ["micro_teleport", "pseudo_teleport", "flat_params"],
    "optim_state": ["transport_optimizer_state"],
    "optimize": ["optimize_cob", "best_of_random"],
    "cob_callback": ["TeleportCallback"],
    "errors": ["TeleportError", "TeleportRejected"],
    "level_set": ["TeleportGuards", "TeleportResult"],
    "level_set_callback": ["LevelSetTeleportCallback"],
    "nullspace": ["NullSpaceTeleport", "NullSpaceTeleportCallback", "null_space_basis", "supported_layers"],
    "symmetry": ["SymmetryTeleport", "SymmetryTeleportCallback"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
