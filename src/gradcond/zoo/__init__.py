"""Model zoo: ``build(name, **kwargs)`` or the factory functions directly. Every model is a plain ``nn.Module``."""

from __future__ import annotations

import inspect

from torch import nn

from . import init, layers
from .layers import CReLU, LONorm, ResidualBlock
from .models import densenet, looks_linear_crelu_mlp, mlp, resnet, resnet_mlp, simple_cnn, transformer, vgg

_REGISTRY = {
    "mlp": mlp,
    "resnet_mlp": resnet_mlp,
    "looks_linear_crelu_mlp": looks_linear_crelu_mlp,
    "vgg": vgg,
    "resnet": resnet,
    "densenet": densenet,
    "simple_cnn": simple_cnn,
    "transformer": transformer,
}


def names() -> list[str]:
    """Names accepted by :func:`build`."""
    return sorted(_REGISTRY)


def factory(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(names())}.")
    return _REGISTRY[name]


def build(name: str, **kwargs) -> nn.Module:
    """Build zoo model ``name`` with keyword arguments of its factory (unknown keywords are an error)."""
    fn = factory(name)
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; accepted: {', '.join(params)}."
        )
    return fn(**kwargs)


__all__ = ["build", "names", "factory", "init", "layers", "CReLU", "LONorm", "ResidualBlock", *_REGISTRY]
