"""Monitoring gradient health during training (:class:`Monitor`) and one-shot analysis (``gradcond diagnose``)."""

from .monitor import Monitor
from .probes import PRESETS, PROBES, Schedule

__all__ = ["Monitor", "PRESETS", "PROBES", "Schedule"]
