"""Platonic projections as an initialiser: fit a plain MLP's weights in closed form before backprop training
(seed 002, sec. 7.10.3, future-work item 9; ``init = "platonic"`` in run configs)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..utils import module_device
from .platonic import FitReport, fit_platonic

__all__ = ["platonic_init_"]


def _mlp_layout(model: nn.Module) -> tuple[list[nn.Linear], nn.Module]:
    """(Linear layers in order, the activation module between them) of a plain MLP, else ValueError."""
    leaves = [m for m in model.modules() if not list(m.children())]
    linears = [m for m in leaves if isinstance(m, nn.Linear)]
    name = type(model).__name__
    why = None
    if not linears:
        why = "it has no nn.Linear layer"
    elif len(leaves) != 2 * len(linears) - 1 or not all(isinstance(m, nn.Linear) == (i % 2 == 0)
                                                        for i, m in enumerate(leaves)):
        kinds = ", ".join(dict.fromkeys(type(m).__name__ for m in leaves))
        why = f"its layers ({kinds}) are not Linear, activation, ..., Linear"
    elif any(lin.bias is None for lin in linears):
        why = "a Linear layer has no bias (the fit sets a bias in every layer)"
    elif len({type(m) for m in leaves[1::2]}) > 1:
        why = "its activations differ between layers"
    elif any(a.out_features != b.in_features for a, b in zip(linears, linears[1:])):
        why = "a layer's input width differs from the previous layer's output width (e.g. crelu)"
    if why:
        raise ValueError(f"init='platonic' fits plain MLPs (Linear layers with bias and one elementwise activation "
                         f"between them); model {name} cannot be initialised because {why}.")
    act = leaves[1] if len(leaves) > 1 else nn.Identity()
    return linears, act


def platonic_init_(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, **fit_kwargs) -> FitReport:
    """Set the weights of the plain MLP ``model`` to a closed-form Platonic fit of ``(X, Y)`` (in place).

    ``model`` must be Linear, activation, ..., Linear with biases and one activation type (e.g. ``zoo.mlp`` with
    ``norm="none"``); its hidden widths and activation are used for :func:`fit_platonic`, on its device, solved in
    float64 (``fit_kwargs`` may pass ``dtype``) and cast to the model's dtype; ``fit_kwargs`` go to :func:`fit_platonic` (``alpha``, ``beta``, ``n_tries``, ``solver``, ...).
    Integer labels are fitted as one-hot 0/1 targets, so a classifier starts from the least-squares read-out.

    The fitted weights are first loaded into a copy of ``model``, whose outputs on up to 256 samples must match the
    fitted network's (relative error <= 1e-4); only then is ``model`` changed. Any failure (layout, shapes,
    singular system) raises ``ValueError`` and leaves ``model`` unchanged. Cost: one fit (see :func:`fit_platonic`).
    Returns the fit's :class:`FitReport`.
    """
    linears, act = _mlp_layout(model)
    dev = module_device(model)
    dtype = linears[0].weight.dtype
    if X.dim() != 2 or X.shape[1] != linears[0].in_features:
        raise ValueError(f"init='platonic' needs flat inputs of {linears[0].in_features} features for model "
                         f"{type(model).__name__}, got data of shape {tuple(X.shape)}.")
    X = X.to(device=dev, dtype=dtype)
    Y = Y.to(dev)
    widths = [lin.out_features for lin in linears[:-1]]
    fitted, report = fit_platonic(X, Y, widths, act=copy.deepcopy(act), return_report=True,
                                  **{"model_dtype": dtype, **fit_kwargs})
    fitted_lin = [m for m in fitted if isinstance(m, nn.Linear)]
    if fitted_lin[-1].out_features != linears[-1].out_features:
        raise ValueError(f"init='platonic': the targets have {fitted_lin[-1].out_features} columns but model "
                         f"{type(model).__name__} has {linears[-1].out_features} outputs.")
    trial = copy.deepcopy(model)
    with torch.no_grad():
        for dst, src in zip([m for m in trial.modules() if isinstance(m, nn.Linear)], fitted_lin):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        trial.eval()
        xs = X[:256]
        want, got = fitted(xs), trial(xs)
        err = float((got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(dtype).tiny))
    if not err <= 1e-4:
        raise ValueError(f"init='platonic': model {type(model).__name__} with the fitted weights does not compute the "
                         f"fitted network (relative difference {err:.2e}); its weights are left unchanged.")
    with torch.no_grad():
        for dst, src in zip(linears, fitted_lin):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    return report
