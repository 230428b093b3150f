"""Reproductions of the sources' claims: ``gradcond repro list`` / ``gradcond repro run NAME``.

The rules every entry judges by (preconditions, statistics) are in :mod:`gradcond.experiments.judging`."""

from . import judging
from .judging import Precondition
from .registry import (Experiment, Row, entry_holds, entry_status, get, load_all, markdown_table, register, run_all,
                       run_experiment)

__all__ = ["Experiment", "Precondition", "Row", "entry_holds", "entry_status", "get", "judging", "load_all",
           "markdown_table", "register", "run_all", "run_experiment"]
