"""Flat weight vectors: the weight space 𝕎 of seed 004 as one vector.

The flat vector of a model is the concatenation of its parameters with ``requires_grad=True`` in
``named_parameters()`` order (biases and normalization parameters included; notes erratum 5). The per-sample engine
(:mod:`gradcond.probes.per_sample`), its layer fast path and the conditioning metrics all use this order, so masks
(:class:`gradcond.probes.mask.LayerwiseMask`) and perturbation directions index the same coordinates everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["flatten", "unflatten", "weight_vector"]


def flatten(tensors: dict[str, torch.Tensor], names: list[str], batched: bool = False) -> torch.Tensor:
    """Concatenate ``tensors[name]`` in ``names`` order into one vector (or (B, m) matrix when ``batched``)."""
    if batched:
        return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in names], dim=1)
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflatten(vec: torch.Tensor, like: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors shaped like ``like`` (inverse of :func:`flatten`)."""
    out, i = {}, 0
    for n in names:
        k = like[n].numel()
        out[n] = vec[i : i + k].view_as(like[n])
        i += k
    if i != vec.numel():
        raise ValueError(f"flat vector has {vec.numel()} entries but the model has {i} trainable parameters.")
    return out


def weight_vector(model: nn.Module) -> torch.Tensor:
    """All trainable parameters of ``model`` as one detached flat vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).clone()

