"""Per-sample gradients (seed 004, Def 1.3): the :class:`Engine` and :func:`per_sample_stats` (norms and Gram
matrices without the b × P matrix).

The code reads in one direction, one file into the next: :mod:`.plan` (which module owns each parameter) ->
:mod:`.capture` (one hooked forward and one backward to the layer outputs) -> :mod:`.identities` (per-layer
per-sample gradients, norms and Grams, and their first-use check) -> :mod:`.engine` (the :class:`Engine`, the
``vmap(grad)`` fallback and :func:`per_sample_stats`).
"""

from gradcond.probes.per_sample.engine import DEFAULT_MEMORY_BYTES, Engine, PerSampleStats, as_batch, per_sample_stats

__all__ = ["DEFAULT_MEMORY_BYTES", "Engine", "PerSampleStats", "as_batch", "per_sample_stats"]
