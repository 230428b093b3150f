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


PSEUDO_NORMS = ("l2", "l1_per_tensor")


def pseudo_teleport(model: nn.Module, structure: CoBStructure, sigma: float = 0.5, mode: str = "intra",
                    generator: torch.Generator | None = None, norm: str = "l2") -> nn.Module:
    """Pseudo-teleportation, the source's control (seed 000 Sec. 5.2): draw a CoB ``tau`` and move ``W`` by a random
    step as long as the teleport ``W -> tau W`` would have moved it -- same distance, random direction, function not
    preserved.  Returns a copy of ``model``; ``model`` is left unchanged.

    The source's sentence ("sampling V from the sphere with center W and radius vector W - tau W") has two readings,
    chosen by ``norm``:

    * ``"l2"`` (default, the text): ``r = ||W - tau W||_2`` over all parameters, ``V = W + r u`` with ``u`` uniform on
      the unit sphere of the whole parameter vector;
    * ``"l1_per_tensor"`` (the authors' reference implementation, ``simulate_teleportation_sphere``): for each
      parameter tensor ``t`` separately, a Gaussian direction scaled to unit L1 norm times the L1 norm of that
      tensor's teleport step ``||W_t - tau W_t||_1``; tensors the CoB leaves unchanged (e.g. the output bias) do
      not move.  Its L2 step is smaller than the teleport's where the teleport's step is heavy-tailed.

    Cost: one CoB draw and one pass over the parameters.  Raises ValueError for an unknown ``norm``."""
    if norm not in PSEUDO_NORMS:
        raise ValueError(f"unknown pseudo-teleport norm {norm!r}; accepted: {', '.join(PSEUDO_NORMS)}.")
    cob = random_cob(structure, sigma, mode, generator)
    _params_checked(model, structure)
    fac = weight_scale_factors(structure, cob)
    params = dict(model.named_parameters())
    with torch.no_grad():
        steps = {name: ((fac[name] - 1) * p.to(torch.float64)).expand(p.shape) for name, p in params.items()}
        dirs = {name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in params.items()}
        if norm == "l2":
            r = math.sqrt(sum(float(s.pow(2).sum()) for s in steps.values()))
            n2 = math.sqrt(sum(float(d.pow(2).sum()) for d in dirs.values()))
            shift = {name: (r / n2) * d for name, d in dirs.items()}
        else:
            shift = {name: d * (float(steps[name].abs().sum()) / float(d.abs().sum())) for name, d in dirs.items()}
        memo = {id(p): nn.Parameter(p + shift[name].to(p.dtype), requires_grad=p.requires_grad)
                for name, p in params.items()}
        return repair_deepcopy(model, copy.deepcopy(model, memo))


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters concatenated (``named_parameters`` order), detached."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
