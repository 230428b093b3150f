"""The one exception family of every teleport: :class:`TeleportError` and its subclass :class:`TeleportRejected`.

``TeleportError`` covers the three ways a teleport is refused, always AFTER the model (and the optimizer, where one
was given) has been restored bit-identically to its pre-teleport state:

* non-finite values -- a non-finite loss, gradient or parameter, or a singular group element (null-space and
  symmetry teleports; ``reason == "non_finite"``);
* a guard refusal -- one of :class:`~gradcond.teleport.level_set.TeleportGuards` tripped on the first batch
  (:class:`TeleportRejected`, ``reason`` one of :data:`GUARD_REASONS`);
* a changed function -- the change-of-basis teleport's self-check found the output moved by more than its tolerance
  (:func:`gradcond.teleport.teleport`; ``reason`` is None).

It subclasses ``FloatingPointError`` (an ``ArithmeticError``), as the first teleports did, so existing ``except``
clauses keep working.  Exported as ``gradcond.teleport.TeleportError`` / ``gradcond.teleport.TeleportRejected``.
The module imports nothing, so every teleport module (and user code) can import it cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .level_set import TeleportResult

__all__ = ["TeleportError", "TeleportRejected", "GUARD_REASONS"]

# Values of ``TeleportError.reason`` set by the null-space and symmetry teleports.
GUARD_REASONS = ("non_finite", "batch_loss_change", "held_out_loss", "weight_growth")


class TeleportError(FloatingPointError):
    """A teleport was refused: non-finite values, a guard trip, or a changed function (see the module docstring).

    Raised only after the model (and the optimizer, where one was given) has been restored to
    its exact pre-teleport state. ``reason``: one of ``GUARD_REASONS`` when raised by the
    null-space/symmetry teleports (``"non_finite"`` here: non-finite loss, gradient, parameter, or
    a singular group element), None when another caller gave none; ``result`` is the
    ``TeleportResult`` of what was tried before the rollback, where known.
    """

    def __init__(self, message: str, reason: str | None = None, result: "TeleportResult | None" = None):
        super().__init__(message)
        self.reason = reason
        self.result = result


class TeleportRejected(TeleportError):
    """A teleport tripped one of the default guards (``TeleportGuards``) on its first batch.

    Raised only after the model and the optimizer have been restored bit-identically to their
    pre-teleport state. ``reason`` is ``"batch_loss_change"``, ``"held_out_loss"`` or
    ``"weight_growth"``. A subclass of ``TeleportError`` so that one ``except`` handles every
    refused teleport.
    """
