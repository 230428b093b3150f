"""Shared pieces of the seed-000 (Neural Teleportation) reproductions in :mod:`.teleport_geometry` and
:mod:`.teleport_training`: cached data sets, the small zoo models they use, full-data loss and accuracy, figures.

A private module (leading underscore): :func:`gradcond.experiments.registry.load_all` does not treat it as an
experiment module; it registers nothing.
"""

from __future__ import annotations

import torch

F = torch.nn.functional


def _plt():
    # figures on their own Agg canvas: never switch the process-wide matplotlib backend (a user's notebook)
    from ..report.figures import object_pyplot

    return object_pyplot()


_DATA: dict = {}


def _data(name: str = "digits", form: str = "flat", dtype=torch.float32):
    """``(X, y, X_test, y_test)`` of data set ``name`` in ``form`` and ``dtype``, loaded once per process."""
    key = (name, form, dtype)
    if key not in _DATA:
        from ..data import load_dataset

        d = load_dataset(name, form=form, dtype=dtype)
        X, y = d.train.tensors
        Xt, yt = d.test.tensors
        _DATA[key] = (X.to(dtype), y, Xt.to(dtype), yt)
    return _DATA[key]


def _model(kind: str, in_features: int = 64, seed: int = 0, dtype=torch.float32, **kw):
    """A fresh zoo ``mlp`` / ``cnn`` (8x8 images) / ``resnet`` with 10 outputs, initialised under ``seed``."""
    from ..zoo import mlp, resnet, simple_cnn

    torch.manual_seed(seed)
    if kind == "mlp":
        m = mlp(in_features, 10, depth=kw.get("depth", 4), width=kw.get("width", 64), act=kw.get("act", "relu"),
                init=kw.get("init", "default"))
    elif kind == "cnn":
        m = simple_cnn(1, 10, channels=kw.get("channels", (16, 32)), image_size=8)
    elif kind == "resnet":
        m = resnet(1, 10, depth=10, width=kw.get("width", 8))
    else:
        raise ValueError(kind)
    return m.to(dtype)


def _full_loss(model, X, y, bs: int = 2048) -> float:
    """Mean cross-entropy over all of ``X, y`` in eval mode (chunks of ``bs``); the model's mode is restored."""
    with torch.no_grad():
        was = model.training
        model.eval()
        tot = sum(float(F.cross_entropy(model(X[i:i + bs]), y[i:i + bs], reduction="sum"))
                  for i in range(0, len(X), bs))
        model.train(was)
    return tot / len(X)


def _accuracy(model, X, y) -> float:
    """Classification accuracy on ``X, y`` in eval mode; the model's mode is restored."""
    with torch.no_grad():
        was = model.training
        model.eval()
        acc = float((model(X).argmax(1) == y).float().mean())
        model.train(was)
    return acc
