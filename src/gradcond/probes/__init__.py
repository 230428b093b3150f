"""Diagnostics as pure functions returning small typed results.

Gradient scale (seed 003): ``gsc_profile``, ``gsc``, ``domain_stats``, ``dilution_profile``, ``taylor_truncate``,
and the trainer callbacks ``ResidualTracker`` and ``EffectiveDepth``. Gradient conditioning (seed 004):
``step_consistency``, ``step_metrics``, ``consecutive_step_consistency``, ``batch_dissonance``,
``relative_gradient_rank``, ``gradient_confusion``, ``gradient_diversity``, ``gradient_coherence``,
``batch_efficiency_ratio``, the per-sample ``Engine``, ``per_sample_stats`` and ``LayerwiseMask``. Gradient noise scale (McCandlish et al.
2018): ``gradient_noise_scale``, ``noise_scale_from_norms``, ``NoiseScaleRecorder``. Per-layer norms from rank-local
values (single process, DDP, FSDP2): ``layer_norms``, ``update_norms``. Names are imported lazily.

Where things live: ``scale``, ``domain``, ``dilution``, ``taylor``, ``tracking`` (seed 003); the ``conditioning``
subpackage (seed 004 metrics, one module per metric family; ``from gradcond.probes import conditioning as C`` gives
all of them); the ``per_sample`` subpackage (the per-sample gradient ``Engine`` and ``per_sample_stats``, per-sample
gradient norms and Grams from layer identities; its files read plan -> capture -> identities -> engine), ``flat_vectors``
(flat weight-vector helpers), ``mask`` (``LayerwiseMask``) and ``reference`` (exact condition
numbers used to check the estimators).  Representations (seed 002 ch. 5): ``representation`` (LSD, k-redundancy,
selection entropy, stable rank, weight entropy) and ``voronoi`` (pure Voronoi maps and the pure entropy H*:
``pure_entropy``).
"""

from __future__ import annotations

from ..utils import lazy_exports

_EXPORTS = {
    "scale": ["gsc_profile", "gsc", "gsc_verdict", "GSCProfile", "GSCEstimate", "ExplosionFit"],
    "domain": ["domain_stats", "DomainStats"],
    "dilution": ["dilution_profile", "DilutionProfile", "find_blocks", "composed_dilution"],
    "tracking": ["ResidualTracker", "EffectiveDepth"],
    "taylor": ["taylor_truncate", "TaylorTruncated"],
    "per_sample": ["Engine", "per_sample_stats", "PerSampleStats"],
    "conditioning": ["step_consistency", "step_metrics", "consecutive_step_consistency", "ConsecutiveStepConsistency",
                     "batch_dissonance", "input_condition_exact", "relative_gradient_rank", "gradient_confusion", "gradient_diversity",
                     "gradient_coherence", "batch_efficiency_ratio", "conditioning_summary"],
    "mask": ["LayerwiseMask"],
    "noise": ["NoiseScale", "gradient_noise_scale", "noise_scale_from_norms", "NoiseScaleRecorder"],
    "norms": ["weight_layers", "layer_norms", "snapshot_weights", "update_norms", "gradients_finite"],
    "representation": ["least_squares_distance", "k_redundancy", "redundant_mask", "knn_indices", "selection_entropy",
                       "SelectionEntropy", "stable_rank", "weight_entropy", "error_gradient_rms"],
    "voronoi": ["pure_entropy", "PureEntropy", "voronoi_cells"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
