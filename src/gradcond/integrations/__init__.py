"""Thin adapters of the one :class:`~gradcond.monitor.Monitor` to other training stacks, each importing its library
lazily from an optional extra: ``hf`` (``transformers.Trainer``: :class:`GradcondCallback`; ``pip install
'gradcond[hf]'``) and ``accelerate`` (:func:`monitor_step` for a loop with an ``accelerate.Accelerator``). The
Lightning adapter is :class:`gradcond.monitor.lightning.LightningMonitor`.
"""

from __future__ import annotations

from ..utils import lazy_exports

_EXPORTS = {
    "hf": ["GradcondCallback", "causal_lm_loss"],
    "accelerate": ["unwrap_prepared"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
