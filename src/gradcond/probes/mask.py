"""Layer-wise random coordinate masks (seed 004, §1.6; notes §1.10).

A fixed random subset of coordinates is taken from every parameter tensor ("layer") in proportion to its size —
``ceil(fraction · numel)``, so every layer contributes at least one coordinate — and the subsets are stacked. The
mask is drawn once (at construction, from ``seed``) and reused for every gradient vector a metric uses, so distances
and inner products are estimated on the same random projection throughout a run (Kaski 1998 justification).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LayerwiseMask"]


class LayerwiseMask:
    """Fixed per-layer random coordinate subset of a model's flat trainable-parameter vector.

    Args:
        model: the model whose ``requires_grad`` parameters (``named_parameters()`` order) define the flat vector.
        fraction: in (0, 1]; each parameter tensor keeps ``max(1, ceil(fraction * numel))`` coordinates.
        seed: seed of the private ``torch.Generator`` that draws the subsets.

    Attributes:
        indices: sorted ``LongTensor`` of kept flat coordinates; ``size`` its length; ``total`` the model's m;
        ``layer_sizes``: dict name -> kept count.

    ``mask(vec)`` / ``mask.apply(vec)`` gathers the kept coordinates from the last dimension of ``vec``
    (shape (..., m) -> (..., size)). Cost O(size) per vector.
    """

    def __init__(self, model: nn.Module, fraction: float, seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0.0 < fraction <= 1.0):
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}.")
        gen = torch.Generator().manual_seed(int(seed))
        self.fraction, self.seed = float(fraction), int(seed)
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.layer_sizes: dict[str, int] = {}
        idx, offset = [], 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            k = max(1, math.ceil(self.fraction * p.numel()))
            k = min(k, p.numel())
            sel = torch.randperm(p.numel(), generator=gen)[:k].sort().values
            idx.append(sel + offset)
            self.shapes.append((name, tuple(p.shape)))
            self.layer_sizes[name] = k
            offset += p.numel()
        if not idx:
            raise ValueError("the model has no trainable parameters to mask.")
        self.indices = torch.cat(idx)
        self.size = int(self.indices.numel())
        self.total = offset

    def check(self, model: nn.Module) -> None:
        """Raise ValueError unless ``model`` has the parameter layout this mask was drawn for."""
        shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
        if shapes != self.shapes:
            raise ValueError(
                "the mask was drawn for a different parameter layout; build LayerwiseMask(model, fraction, seed) "
                "for this model."
            )

    def apply(self, vec: torch.Tensor) -> torch.Tensor:
        if vec.shape[-1] != self.total:
            raise ValueError(f"vector has last dimension {vec.shape[-1]}, the mask expects {self.total}.")
        return vec.index_select(-1, self.indices.to(vec.device))

    __call__ = apply

    def __repr__(self) -> str:
        return f"LayerwiseMask(fraction={self.fraction}, seed={self.seed}, size={self.size}/{self.total})"
