"""The callback protocol of the trainer: hook names and the resume contract (``state_dict``/``load_state_dict``).

This module sits low in the package (layer 1, beside ``losses``, ``config``, ``zoo`` and ``data``) so that the
probes and the teleports can offer callbacks without importing the trainer: ``gradcond.teleport`` and
``gradcond.probes`` subclass :class:`Callback` from here, and ``gradcond.train`` re-exports the same class
(``gradcond.train.Callback is gradcond.callbacks.Callback``).  It imports nothing from ``gradcond``; the
:class:`~gradcond.train.TrainState` the hooks receive is named for type checkers only.

Not to be confused with ``gradcond.train.callbacks``, the registry that builds callbacks by name from a TOML config.

The contract a callback follows:

* every hook receives the trainer's ``TrainState`` and returns nothing; a hook may change the model's parameters or
  the optimizer's state in place (a teleport does), and may set ``state.stop_training``;
* ``state_dict()`` returns what exact resume needs, as plain values (numbers, strings, lists, dicts of those --
  the trainer writes it into the checkpoint, which is read back with ``torch.load(weights_only=True)``);
  ``load_state_dict(d)`` restores it.  The defaults keep nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotation only: importing the trainer here would point the dependency upwards
    from gradcond.train.trainer import TrainState

__all__ = ["Callback", "HOOKS"]

# The hooks in the order the trainer calls them within a run.
HOOKS = ("on_train_start", "on_epoch_start", "on_step_start", "on_step_end", "on_epoch_end", "on_train_end")


class Callback:
    """Base class of trainer callbacks: override any hook; each receives the :class:`~gradcond.train.TrainState`.

    Callbacks may change the model's parameters or the optimizer's state in place (e.g. a teleport); the
    trainer keeps using the same objects. For exact resume, define ``state_dict()`` / ``load_state_dict()``
    (plain values only: the checkpoint is loaded with ``weights_only=True``).
    """

    def on_train_start(self, state: "TrainState") -> None: ...
    def on_epoch_start(self, state: "TrainState") -> None: ...
    def on_step_start(self, state: "TrainState") -> None: ...
    def on_step_end(self, state: "TrainState") -> None: ...
    def on_epoch_end(self, state: "TrainState") -> None: ...
    def on_train_end(self, state: "TrainState") -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
