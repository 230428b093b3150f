"""Closed-form network fitting (seed 002, ch. 7): :func:`fit_platonic` fits an MLP with Platonic projections --
a sequence of least-squares solves, no gradients -- and returns a plain ``nn.Sequential``.

Depends only on :mod:`gradcond.utils` (architecture: a stand-alone idea of seed 002).
"""

from ._factor import SingularSystemError
from .init import platonic_init_
from .platonic import FitDiverged, FitReport, ReLUActivityWarning, fit_platonic

__all__ = ["fit_platonic", "FitReport", "FitDiverged", "SingularSystemError", "ReLUActivityWarning", "platonic_init_"]
