"""Callbacks by name for TOML configs (``[[callbacks]] name = "..."``).

(The callback protocol itself -- the ``Callback`` base class and its hooks -- is :mod:`gradcond.callbacks`.)

The registry maps a name to ``"module:attribute"`` and imports lazily, so listing names costs nothing and a
subpackage adds its callback with one line here.
"""

from __future__ import annotations

import importlib
import inspect

from ..callbacks import Callback

_REGISTRY: dict[str, str] = {}


def register_callback(name: str, target: str) -> None:
    """Register ``target`` (``"package.module:ClassName"``) under ``name``."""
    _REGISTRY[name] = target


def callback_names() -> list[str]:
    return sorted(_REGISTRY)


def build_callback(spec: dict):
    """Instantiate ``spec = {"name": ..., **kwargs}``; unknown names and keywords are errors naming what is accepted."""
    spec = dict(spec)
    name = spec.pop("name")
    if name not in _REGISTRY:
        raise ValueError(f"unknown callback {name!r}; accepted: {', '.join(callback_names()) or 'none'}.")
    module, attr = _REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    params = inspect.signature(cls).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(spec) - set(params))
        if bad:
            raise ValueError(f"unknown option(s) {', '.join(bad)} for callback {name!r}; accepted: {', '.join(params)}.")
    return cls(**spec)


register_callback("stop_after", "gradcond.train.callbacks:StopAfterEpochs")
register_callback("monitor", "gradcond.monitor:Monitor")
register_callback("teleport", "gradcond.teleport.cob_callback:TeleportCallback")
register_callback("nullspace_teleport", "gradcond.teleport.nullspace:NullSpaceTeleportCallback")
register_callback("symmetry_teleport", "gradcond.teleport.symmetry:SymmetryTeleportCallback")
register_callback("residual_tracker", "gradcond.probes.tracking:ResidualTracker")
register_callback("effective_depth", "gradcond.probes.tracking:EffectiveDepth")
register_callback("consecutive_step_consistency", "gradcond.probes.conditioning:ConsecutiveStepConsistency")
register_callback("k_filter", "gradcond.train.filters:KFilter")
register_callback("loss_filter", "gradcond.train.filters:LossFilter")


class StopAfterEpochs(Callback):
    """Stop (as if interrupted) once ``epochs`` epochs have run in this process: the checkpoint of the last finished
    epoch is kept and ``--resume`` continues from there. Useful for splitting a long run into time slices."""

    def __init__(self, epochs: int = 1):
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"stop_after epochs must be a positive integer, got {epochs!r}.")
        self.epochs = epochs
        self._seen = 0

    def on_epoch_end(self, state) -> None:
        self._seen += 1
        if self._seen >= self.epochs:
            state.stop_training = True

    def state_dict(self) -> dict:
        return {}  # per-process counter: deliberately not resumed
