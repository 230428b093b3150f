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
    """Build zoo model ``name`` with keyword arguments of its factory (unknown keywords, or values of the wrong type
    or range, are a one-sentence ``ValueError``: :func:`check_options`)."""
    fn = factory(name)
    check_options(name, kwargs)
    return fn(**kwargs)


# The smallest value of each integer size option of the zoo factories (also for every entry of a sequence option
# such as channels = [16, 32]); the types come from the factories' signatures. One place for the ranges of the
# [model] options of a run config and of `gradcond diagnose --set`.
OPTION_MINIMUM = {
    "in_features": 1, "out_features": 1, "depth": 1, "width": 1, "blocks": 1, "in_channels": 1, "num_classes": 1,
    "growth": 1, "init_features": 1, "block_layers": 1, "channels": 1, "image_size": 1, "cfg": 1, "vocab_size": 1,
    "seq_len": 1, "d_model": 1, "nhead": 1, "num_layers": 1, "dim_ff": 1, "seed": 0,
}


def check_options(name: str, options: dict, prefix: str = "") -> None:
    """Check zoo model ``name``'s keyword ``options`` against its factory's signature (known names; the annotated
    types: int, float, bool, str, None, sequences of them) and :data:`OPTION_MINIMUM`; the first bad one raises a
    one-sentence ``ValueError`` (``{prefix}key must be ..., got ...``). Cheap: no model is built."""
    import typing

    fn = factory(name)
    params = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; accepted: {', '.join(params)}."
        )
    hints = typing.get_type_hints(fn)
    for key, value in options.items():
        hint = hints.get(key)
        if hint is None:
            continue
        low = OPTION_MINIMUM.get(key)
        if not _fits(value, hint, low):
            raise ValueError(f"{prefix}{key} must be {_words(hint, low)}, got {_show(value)}.")


def _fits(v, hint, low) -> bool:
    import collections.abc
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(v, h, low) for h in typing.get_args(hint))
    if hint is type(None):
        return v is None
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if hint is str:
        return isinstance(v, str)
    if origin in (collections.abc.Sequence, list, tuple):
        args = typing.get_args(hint) or (object,)
        return (isinstance(v, (list, tuple)) and len(v) > 0
                and all(_fits(e, args[0], low) for e in v))
    return True  # an annotation this check does not know: the factory checks it


def _words(hint, low, plural: bool = False) -> str:
    import collections.abc
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # None has no TOML form: not offered in words
        parts = [_words(h, low, plural) for h in typing.get_args(hint) if h is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if hint is bool:
        return "true or false"
    if hint is int:
        what = "positive integer" if low == 1 else "integer" if low is None else f"integer >= {low}"
        return what.replace("integer", "integers") if plural else ("an " if what[0] == "i" else "a ") + what
    if hint is float:
        return "numbers" if plural else "a number"
    if hint is str:
        return "strings" if plural else "a string"
    if origin in (collections.abc.Sequence, list, tuple):
        return "a non-empty array of " + _words((typing.get_args(hint) or (object,))[0], low, plural=True)
    return str(hint)


def _show(v) -> str:
    text = "true" if v is True else "false" if v is False else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


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
