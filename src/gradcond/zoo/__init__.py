"""Model zoo: ``build(name, **kwargs)`` or the factory functions directly. Every model is a plain ``nn.Module``."""

from __future__ import annotations

import inspect
import math

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


# Models that take images (N, C, H, W); the transformer takes sequences (N, T, d); every other model flat vectors.
CNN_MODELS = frozenset({"vgg", "resnet", "densenet", "simple_cnn"})


def input_form(model_name: str) -> str:
    """The data form zoo model ``model_name`` takes: ``"image"`` for the CNNs, ``"sequence"`` for the transformer,
    ``"flat"`` otherwise -- what ``form = "auto"`` in a config (and ``gradcond diagnose``) resolves to."""
    if model_name in CNN_MODELS:
        return "image"
    if model_name == "transformer":
        return "sequence"
    return "flat"


def model_kwargs_for(model_name: str, bundle) -> dict:
    """The size keywords of zoo model ``model_name`` that follow from the data (user values take precedence).

    ``bundle`` is anything with ``input_shape`` (per sample) and ``num_outputs``, e.g. a
    :class:`gradcond.data.DatasetBundle`; models not listed here get no keywords (``{}``)."""
    shape, k = bundle.input_shape, bundle.num_outputs
    if model_name in ("mlp", "looks_linear_crelu_mlp", "resnet_mlp"):
        return {"in_features": int(math.prod(shape)), "out_features": k}
    if model_name in CNN_MODELS:
        kw = {"in_channels": shape[0], "num_classes": k}
        if model_name == "simple_cnn":
            kw["image_size"] = shape[-1]
        return kw
    if model_name == "transformer":
        return {"in_features": shape[-1], "seq_len": shape[0], "num_classes": k}
    return {}


__all__ = ["build", "names", "factory", "input_form", "model_kwargs_for", "CNN_MODELS", "init", "layers", "CReLU",
           "LONorm", "ResidualBlock", *_REGISTRY]
