"""Training: a plain loop with callbacks (:func:`fit`), losses, optimizers, schedules, run directories."""

from .filters import KFilter, LossFilter, k_filter
from .layerwise import LayerwiseResult, MemoryReport, build_head, fit_layerwise, memory_accounting, split_blocks
from .losses import LOSSES, dot_error, get_loss
from .run import METRIC_FIELDS, TIMING_NAMES, RunLogger, read_events, read_metrics
from .trainer import (OPTIMIZERS, SCHEDULES, Callback, History, TrainState, evaluate, fit, load_checkpoint,
                      make_optimizer, make_schedule)

__all__ = [
    "Callback", "TrainState", "History", "fit", "evaluate", "make_optimizer", "make_schedule", "get_loss", "dot_error",
    "LOSSES", "OPTIMIZERS", "SCHEDULES", "RunLogger", "read_metrics", "read_events", "METRIC_FIELDS", "TIMING_NAMES",
    "load_checkpoint", "k_filter", "KFilter", "LossFilter",
    "fit_layerwise", "LayerwiseResult", "split_blocks", "build_head", "memory_accounting", "MemoryReport",
]
from .layerwise import PartitionPeerLost, PartitionwiseResult, fit_partitionwise, make_partitions  # noqa: E402

__all__ += ["fit_partitionwise", "PartitionwiseResult", "PartitionPeerLost", "make_partitions"]
