"""Micro- and pseudo-teleportation (seed 000, Sec. 4.3 and 5), and the flat parameter vector they work with.

* :func:`micro_teleport`: a teleport by an intra CoB with small ``sigma``, and ``V - W`` (tangent to the loss level
  set up to O(sigma^2)).
* :func:`pseudo_teleport`: the source's control -- a random step of the same length as a teleport, function not
  preserved.
* :func:`flat_params`: all parameters concatenated (``named_parameters`` order), the layout of those vectors.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from gradcond.graph import CoBStructure
from gradcond.graph._modules import repair_deepcopy

from .apply import teleport
from .cob import _params_checked, random_cob, weight_scale_factors

__all__ = ["micro_teleport", "pseudo_teleport", "flat_params"]


def micro_teleport(model: nn.Module, structure: CoBStructure, sigma: float = 1e-3,
                   generator: torch.Generator | None = None):
    """Micro-teleportation (seed 000 Sec. 4.3): an intra CoB with small ``sigma``.

    Returns ``(teleported model, vector)`` where ``vector = V - W`` over all parameters (``named_parameters``
    order, flattened, dtype of the parameters), computed as ``W * (factor - 1)`` with ``factor - 1`` in float64
    (no cancellation).  The vector is tangent to the loss level set up to O(sigma^2).
    """
    cob = random_cob(structure, sigma, "intra", generator)
    _params_checked(model, structure)
    tp = teleport(model, cob)
    fac = weight_scale_factors(structure, cob)
    vec = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            d = (fac[name] - 1).to(p.dtype)
            vec.append((p * d).expand(p.shape).reshape(-1))
    return tp, torch.cat(vec)


def pseudo_teleport(model: nn.Module, structure: CoBStructure, sigma: float = 0.5, mode: str = "intra",
                    generator: torch.Generator | None = None) -> nn.Module:
    """Pseudo-teleportation, the source's control (seed 000 Sec. 5): draw a CoB, measure
    ``r = ||W - tau W||`` over all parameters, and return a copy of ``model`` with parameters ``W + r * u``,
    ``u`` uniform on the unit sphere -- same distance, random direction, function not preserved."""
    cob = random_cob(structure, sigma, mode, generator)
    _params_checked(model, structure)
    fac = weight_scale_factors(structure, cob)
    sq = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            sq += ((fac[name] - 1) * p.to(torch.float64)).pow(2).sum()
        r = float(sq.sqrt())
        dirs = {name: torch.randn(p.shape, generator=generator, dtype=torch.float64)
                for name, p in model.named_parameters()}
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in dirs.values()))
        params = dict(model.named_parameters())
        memo = {id(p): nn.Parameter(p + (r / norm) * dirs[name].to(p.dtype), requires_grad=p.requires_grad)
                for name, p in params.items()}
        return repair_deepcopy(model, copy.deepcopy(model, memo))


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters concatenated (``named_parameters`` order), detached."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
