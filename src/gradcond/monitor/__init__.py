"""Monitoring gradient health during training (:class:`Monitor`); the one-shot analysis is :mod:`gradcond.diagnose`."""

from .monitor import SCHEDULE_FILE, Monitor, coverage_sentences, plan_schedule
from .schedule import PRESETS, PROBES, Schedule

__all__ = ["Monitor", "PRESETS", "PROBES", "SCHEDULE_FILE", "Schedule", "coverage_sentences", "plan_schedule"]
