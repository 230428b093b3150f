"""Training: a plain loop with callbacks (:func:`fit`), losses, optimizers, schedules, run directories."""

from .losses import LOSSES, dot_error, get_loss
from .run import METRIC_FIELDS, RunLogger, read_events, read_metrics
from .trainer import OPTIMIZERS, SCHEDULES, Callback, History, TrainState, evaluate, fit, make_optimizer, make_schedule

__all__ = [
    "Callback", "TrainState", "History", "fit", "evaluate", "make_optimizer", "make_schedule", "get_loss", "dot_error",
    "LOSSES", "OPTIMIZERS", "SCHEDULES", "RunLogger", "read_metrics", "read_events", "METRIC_FIELDS",
]
