"""Losses by name. Each takes (output, target) and returns a scalar mean over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dot_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Seed 003's dot-product error f_0 = f_1 . y, as a loss to minimise: mean over the batch of -(f . y)."""
    return -(output * target).flatten(1).sum(1).mean()


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target.reshape(output.shape))


LOSSES = {"cross_entropy": cross_entropy, "mse": mse, "dot": dot_error}


def get_loss(name):
    """The loss function called ``name`` (cross_entropy, mse, dot); a callable is returned unchanged."""
    if callable(name):
        return name
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; accepted: {', '.join(sorted(LOSSES))}.")
    return LOSSES[name]
