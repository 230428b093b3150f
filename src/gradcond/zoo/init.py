"""Initialisers of seed 003 (App. I.1, H): Gaussian (He after ReLU), orthogonal and looks-linear."""

from __future__ import annotations

import math

import torch
from torch import nn


def _haar_orthogonal(n: int, generator: torch.Generator | None, dtype) -> torch.Tensor:
    """A Haar-distributed n x n orthogonal matrix (QR of a Gaussian matrix with the sign fix of Mezzadri)."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype)


@torch.no_grad()
def gaussian_(weight: torch.Tensor, after_relu: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian init: variance 2/fan_in for a matrix that follows a ReLU (He), 1/fan_in otherwise (seed 003 I.1)."""
    fan_in = weight.shape[1] * (weight[0, 0].numel() if weight.dim() > 2 else 1)
    std = math.sqrt((2.0 if after_relu else 1.0) / fan_in)
    weight.copy_(torch.randn(weight.shape, generator=generator, dtype=torch.float64).mul_(std).to(weight.dtype))
    return weight


@torch.no_grad()
def orthogonal_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random (Haar) orthogonal matrix; for a non-square m x n matrix, the top-left block of a
    Haar matrix of size max(m, n) (orthonormal rows or columns). Gain 1, as in seed 003 (no ReLU correction)."""
    m, n = weight.shape
    q = _haar_orthogonal(max(m, n), generator, weight.dtype)
    weight.copy_(q[:m, :n])
    return weight


@torch.no_grad()
def looks_linear_(weight: torch.Tensor, position: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Looks-linear init of seed 003 App. H with 0-based pairs (2i, 2i+1) (see notes/003 §2 and errata).

    ``position`` is ``"lowest"`` (m x n, m even), ``"intermediate"`` (m, n even) or ``"highest"`` (n even).
    With chi(i) = X(2i) - X(2i+1) every ReLU pair passes its input through, so a bias-free ReLU MLP
    initialised this way computes a linear map.
    """
    m, n = weight.shape
    if position == "lowest":
        if m % 2:
            raise ValueError(f"looks-linear needs an even output width for the lowest layer, got {m}.")
        size = max(m // 2, n)
        w = _haar_orthogonal(size, generator, weight.dtype)[: m // 2, :n] * max(math.sqrt(m / (2 * n)), 1.0)
        out = torch.empty(m, n, dtype=weight.dtype)
        out[0::2], out[1::2] = w, -w
    elif position == "intermediate":
        if m % 2 or n % 2:
            raise ValueError(f"looks-linear needs even widths, got a {m}x{n} layer.")
        size = max(m // 2, n // 2)
        w = _haar_orthogonal(size, generator, weight.dtype)[: m // 2, : n // 2] * max(math.sqrt(m / n), 1.0)
        out = torch.empty(m, n, dtype=weight.dtype)
        out[0::2, 0::2], out[0::2, 1::2], out[1::2, 0::2], out[1::2, 1::2] = w, -w, -w, w
    elif position == "highest":
        if n % 2:
            raise ValueError(f"looks-linear needs an even input width for the highest layer, got {n}.")
        size = max(m, n // 2)
        w = _haar_orthogonal(size, generator, weight.dtype)[:m, : n // 2] * max(math.sqrt(2 * m / n), 1.0)
        out = torch.empty(m, n, dtype=weight.dtype)
        out[:, 0::2], out[:, 1::2] = w, -w
    else:
        raise ValueError(f"unknown looks-linear position {position!r}; accepted: lowest, intermediate, highest.")
    weight.copy_(out)
    return weight


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]
