"""Diagnostics as pure functions returning small typed results.

Gradient scale (seed 003): ``gsc_profile``, ``gsc``, ``domain_stats``, ``dilution_profile``, ``taylor_truncate``,
and the trainer callbacks ``ResidualTracker`` and ``EffectiveDepth``. Gradient conditioning (seed 004):
``step_consistency``, ``step_metrics``, ``consecutive_step_consistency``, ``batch_dissonance``,
``relative_gradient_rank``, ``gradient_confusion``, ``gradient_diversity``, ``gradient_coherence``,
``batch_efficiency_ratio``, the per-sample ``Engine`` and ``LayerwiseMask``. Names are imported lazily.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "gsc": ["gsc_profile", "gsc", "GSCProfile", "GSCEstimate", "ExplosionFit"],
    "domain": ["domain_stats", "DomainStats"],
    "dilution": ["dilution_profile", "DilutionProfile", "find_blocks", "composed_dilution"],
    "tracking": ["ResidualTracker", "EffectiveDepth"],
    "taylor": ["taylor_truncate", "TaylorTruncated"],
    "per_sample": ["Engine"],
    "conditioning": ["step_consistency", "step_metrics", "consecutive_step_consistency", "ConsecutiveStepConsistency",
                     "batch_dissonance", "relative_gradient_rank", "gradient_confusion", "gradient_diversity",
                     "gradient_coherence", "batch_efficiency_ratio"],
    "mask": ["LayerwiseMask"],
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
