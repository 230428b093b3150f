"""Reproductions of the sources' claims: ``gradcond repro list`` / ``gradcond repro run NAME``."""

from .registry import Experiment, Row, entry_holds, get, load_all, markdown_table, register, run_all, run_experiment

__all__ = ["Experiment", "Row", "entry_holds", "get", "load_all", "markdown_table", "register", "run_all",
           "run_experiment"]
