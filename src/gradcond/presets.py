"""The thesis's own settings (seed 002, Øland, *Efficient Deep Learning*), in one place, each with its section.

``preset="thesis"`` (or another name listed here) on :func:`gradcond.train.fit_layerwise`,
:func:`gradcond.train.fit_partitionwise`, the GA losses (:class:`gradcond.losses.SparseCrossEntropy`,
:class:`~gradcond.losses.NegCorrelationLoss`, :class:`~gradcond.losses.LinearMSE`) and
:func:`gradcond.closedform.fit_platonic` fills every argument the caller did not pass with the value below; an
argument passed explicitly always wins.  Settings the thesis states that are not arguments of the function (the
batch size, which belongs to the data loader; the data augmentation) are listed with ``argument=False``: they are
part of the recipe, and the caller applies them.

The library's own defaults stay where they suit small data better (each function's docstring says where and why
it differs from the thesis): e.g. ``fit_layerwise`` trains 10 epochs per block, not 300, and has no gradient
dropout by default (0.6 in the thesis), because at laptop scale a block converges in a few epochs and gradient
noise then only slows it down.  :func:`table` renders this registry as markdown (``docs/methods/efficient-training.md``
shows it).

This module sits at the bottom of the package (it imports nothing from it): values are plain data; the functions
turn dicts into their filter objects.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

__all__ = ["Setting", "PRESETS", "settings", "presettable", "table", "names"]


@dataclass(frozen=True)
class Setting:
    """One stated setting: ``value``, the thesis ``source`` (section, table or figure) and a ``note``;
    ``argument=False`` when it is part of the recipe but not an argument of the function."""

    value: object
    source: str
    note: str = ""
    argument: bool = True


S = Setting

PRESETS: dict[str, dict[str, dict[str, Setting]]] = {
    "fit_layerwise": {
        # Table 6.3 defaults, the main DLL experiments of §6.7 (Table 6.2)
        "thesis": {
            "method": S("dll", "§6.7 (strictly bottom-up)", "subnet size 1 (Table 6.3)"),
            "optimizer": S("adamw", "§6.7 main DLL setup"),
            "epochs": S(300, "Table 6.3 (default epochs per layer)",
                        "more were added when DLL ended > 0.5 pp below the baseline (10 of 44 runs)"),
            "lr": S(3e-3, "Table 6.3 (base learning rate)"),
            "weight_decay": S(1e-6, "Table 6.3 (base weight decay)"),
            "lr_decay": S(0.8, "Table 6.3 caption: LR = base x 0.8^i"),
            "wd_growth": S(1.15, "Table 6.3 caption: WD = base x 1.15^i"),
            "lr_drops": S((0.5, 0.75), "§6.7: LR x 0.1 at 50 % and 75 % of the epochs"),
            "input_dropout": S(0.8, "Table 6.3 (dropout, first epoch) and §6.6.3"),
            "input_dropout_decay": S(0.95, "Table 6.3 caption: decays by 0.95 after each epoch"),
            "grad_dropout": S(0.6, "Table 6.3 (grad noise 0.6; 0.3 in several runs)"),
            "max_decision_convs": S(4, "Table 6.3 (Max DC 4; 3 in several runs)"),
            "memory_target": S(0.30, "Table 6.3 caption: memory restriction of 30 +- 0.5 %"),
            "memory_tolerance": S(0.005, "Table 6.3 caption: 30 +- 0.5 %"),
            "batch_size": S(128, "§6.7 (and Table 6.1)", "the data loader's batch size", argument=False),
            "augmentation": S("Cutout + AutoAugment", "§6.7", "applied by the data pipeline", argument=False),
        },
    },
    "fit_partitionwise": {
        # §6.8.1-6.8.2: EfficientNetV2-S on CINIC10+, 4 partitions, one GPU
        "thesis": {
            "lr_scale": S(0.5, "§6.8.1: LR x 0.5^i at partition i"),
            "wd_scale": S(0.5, "§6.8.1: WD x 0.5^i at partition i"),
            "epochs": S(300, "§6.8.1 (the baseline's 300 epochs, 'exactly the same settings')"),
            "lr_drops": S((0.5,), "Fig. 6.5 caption: the learning rate drops after 50 % of the epochs"),
            "schedule": S("round_robin", "§6.8.2: round-robin training scheme (Algorithm 4)"),
            "epochs_per_round": S(10, "§6.8.2: 10 epochs per round"),
            "feature_checkpoint": S("device", "§6.8.2: feature-checkpointing in device memory"),
            "k_filter": S({"k": 10, "warmup_epochs": 30, "filter_batch": 6148, "max_removed": 0.6},
                          "§6.8.2: k-filtering paused for 30 epochs, then batches of 6148, k = 10, capped at 60 %"),
            "batch_size": S(512, "§6.8.1", "the data loader's batch size", argument=False),
            "dropout": S("none", "§6.8.1: no dropout, forward or backward", argument=False),
        },
        # §6.8.4: ImageNet, two partitions on several GPUs, loss filtering instead of k-NN
        "thesis-imagenet": {
            "schedule": S("concurrent", "§6.8.4: one process per partition, each waits for the previous one's output"),
            "loss_filter": S({"fraction": 0.25, "from_epoch": 30},
                             "§6.8.4: 25 % with the lowest first-partition loss filtered from epoch 31"),
            "lr": S(0.016, "§6.8.4: learning rate 0.016 for batch 160 at crop 224"),
            "batch_size": S(160, "§6.8.4 (the baseline's batch)", "the data loader's batch size", argument=False),
        },
    },
    "SparseCrossEntropy": {
        "thesis": {  # §4.5: the first experiment, a 5-layer CNN on CIFAR-10
            "alpha": S(0.1, "§4.5: alpha = 0.1, 'worked well in all our experiments'"),
            "targets": S((0.0, 16.0), "§4.5: t in {0, 16} instead of {0, 1}"),
        },
        "thesis-allconv": {  # §4.10: the 10-layer all-convolutional net
            "alpha": S(0.1, "§4.10: the same alpha as before"),
            "targets": S((0.0, 6.0), "§4.10: t in {0, 6} produced better results for exp-GA"),
        },
    },
    "NegCorrelationLoss": {
        "thesis": {  # §4.7: the first experiment
            "alpha": S(1e-3, "§4.7: alpha = 0.001"),
            "beta": S(0.4, "§4.7: beta = 0.4"),
            "targets": S((0.0, 10.0), "§4.7: t in {0, 10}"),
        },
        "thesis-allconv": {
            "alpha": S(1e-3, "§4.10: the same alpha and beta as before"),
            "beta": S(0.4, "§4.10: the same alpha and beta as before"),
            "targets": S((-2.0, 10.0), "§4.10: t in {-2, 10}: negative targets helped"),
        },
    },
    "LinearMSE": {
        "thesis": {"targets": S((-1.0, 1.0), "§4.11, Table 4.2: linear + MSE with targets {-1, 1}")},
    },
    "fit_platonic": {
        "thesis": {  # §7.5-7.6: the sine and two-spirals fits
            "alpha": S(0.1, "§7.6: alpha = 0.1 (two spirals)"),
            "beta": S(10.0, "§7.6: beta = 10"),
            "n_tries": S(1, "§7.6 (N_tries = 1: 99.99 % in fp64)"),
            "solver": S("pinv", "§7.6: torch.linalg.pinv"),
            "dtype": S("float64", "§7.6, Table 7.1: fp64 greatly improves stability"),
        },
        "thesis-mnist": {  # §7.9.2, Table 7.2: one hidden layer on MNIST
            "act": S("relu", "§7.9.2 (ReLU MLPs)"),
            "alpha": S(1.0, "§7.9.2: alpha = 1"),
            "beta": S(10.0, "§7.9.2: beta = 10 for random projections (10,000 for the deterministic ones)"),
            "solver": S("ridge", "§7.9.2: closed-form ridge regression with torch.linalg.solve"),
            "ridge": S(50_000.0, "§7.9.2: L2 penalty 50,000"),
        },
        "thesis-deterministic": {  # §7.8.3, §7.9.3, Table 7.3: Sorted PCA + weighted Platonic PCA
            "act": S("relu", "Table 7.3 (ReLU MLPs)"),
            "projection": S("sorted_pca", "§7.8.3: Sorted PCA in layer 1, Platonic PCA afterwards"),
            "alpha": S(1.0, "§7.9.3: alpha = 1"),
            "beta": S(1e6, "§7.9.3: beta from 1e6 to 8e7"),
            "reweight": S(0.2, "§7.9.3 text: lambda_EMA = 0.2 (the caption of Table 7.3 says 0.02)"),
            "solver": S("ridge", "Table 7.3 caption: ridge regression with torch.linalg.solve"),
            "ridge": S(0.01, "Table 7.3: L2 0.01-0.50 depending on the network"),
        },
    },
}


def names(function: str) -> list[str]:
    """The preset names registered for ``function``."""
    return list(PRESETS.get(function, {}))


def settings(function: str, name: str) -> dict[str, Setting]:
    """The settings of preset ``name`` for ``function``; ``ValueError`` naming the accepted ones otherwise."""
    if function not in PRESETS:
        raise ValueError(f"no presets for {function!r}; functions with presets: {', '.join(PRESETS)}.")
    if name not in PRESETS[function]:
        raise ValueError(f"unknown preset {name!r} for {function}; accepted: {', '.join(PRESETS[function])}.")
    return PRESETS[function][name]


def _convert(value):
    if value == "float64" or value == "float32":
        import torch

        return getattr(torch, value)
    return value


def presettable(function: str):
    """Decorator: ``fn(..., preset=NAME)`` fills every argument of ``fn`` that is a setting of preset ``NAME`` and was
    not passed explicitly (positionally or by keyword).  On a class, decorate ``__init__``."""

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            name = kwargs.pop("preset", None)
            if name is not None:
                if not isinstance(name, str):
                    raise ValueError(f"preset must be a preset name (a string), got {type(name).__name__}; "
                                     f"accepted: {', '.join(names(function))}.")
                given = sig.bind_partial(*args, **kwargs).arguments
                for key, s in settings(function, name).items():
                    if s.argument and key not in given and key in sig.parameters:
                        kwargs[key] = _convert(s.value)
            return fn(*args, **kwargs)

        return wrapper

    return deco


def table(function: str | None = None) -> str:
    """The registry as a markdown table: function, preset, setting, value, thesis source, note."""
    lines = ["| function | preset | setting | value | source | note |", "|---|---|---|---|---|---|"]
    for fn, presets in PRESETS.items():
        if function is not None and fn != function:
            continue
        for name, items in presets.items():
            for key, s in items.items():
                note = s.note + ("" if s.argument else (" -- " if s.note else "") + "not an argument: apply it yourself")
                lines.append(f"| `{fn}` | `{name}` | `{key}` | `{s.value!r}` | {s.source} | {note} |")
    return "\n".join(lines) + "\n"
