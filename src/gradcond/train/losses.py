"""Losses by name: re-exported from :mod:`gradcond.losses`, where they live (low in the package, so the probes and the
teleports resolve loss names without importing the trainer).  New output losses are added there and re-exported here.
"""

from __future__ import annotations

from ..losses import LOSSES, LinearMSE, NegCorrelationLoss, SparseCrossEntropy, cross_entropy, dot_error, get_loss, mse

__all__ = ["LOSSES", "get_loss", "dot_error", "cross_entropy", "mse", "SparseCrossEntropy", "NegCorrelationLoss",
           "LinearMSE"]
