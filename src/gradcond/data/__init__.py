"""Offline, deterministic datasets: ``load_dataset(name, form=..., seed=...)``.

Built in (generated or bundled, never downloaded): ``digits`` (scikit-learn), ``mnist1d`` (generated with the
``mnist1d`` package's ``make_dataset``), ``gaussian`` (seed 003's exploding-gradient protocol), ``spirals``,
``checkerboard``, ``sine``. From local files (``root=DIR``): ``mnist``, ``fashion_mnist``, ``kmnist`` (IDX, optionally
gzipped) and ``cifar10`` / ``cifar100`` (python pickles, read without executing code).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .files import DataFileError, UnsafePickleError, load_cifar_dir, load_idx_dir, read_idx, write_idx

FORMS = ("flat", "image", "sequence")


@dataclass
class DatasetBundle:
    """A train/test pair of ``TensorDataset``s plus what a model and loss need to know about them."""

    name: str
    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_outputs: int
    task: str  # "classification" | "regression"
    loss: str  # default loss name for gradcond.train.get_loss
    info: dict = field(default_factory=dict)

    def loaders(self, batch_size: int = 64, seed: int = 0, shuffle: bool = True, test_batch_size: int = 512):
        """(train_loader, test_loader); the train order is a deterministic function of ``seed``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        gen = torch.Generator().manual_seed(seed)
        train = DataLoader(self.train, batch_size=batch_size, shuffle=shuffle, generator=gen)
        test = DataLoader(self.test, batch_size=test_batch_size, shuffle=False)
        return train, test


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.RandomState(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def _reshape(x: np.ndarray, form: str, shapes: dict[str, tuple[int, ...]], name: str) -> np.ndarray:
    if form not in shapes:
        raise ValueError(f"dataset {name!r} has no form {form!r}; accepted: {', '.join(shapes)}.")
    return x.reshape((len(x),) + shapes[form])


def _bundle(name, xtr, ytr, xte, yte, dtype, num_outputs, task, info=None) -> DatasetBundle:
    def t(x):
        return torch.as_tensor(np.ascontiguousarray(x)).to(dtype)

    def lab(y):
        return torch.as_tensor(np.ascontiguousarray(y)).long() if task == "classification" else t(y)

    loss = {"classification": "cross_entropy", "regression": "mse"}[task]
    if name == "gaussian":
        loss = "dot"
    return DatasetBundle(
        name, TensorDataset(t(xtr), lab(ytr)), TensorDataset(t(xte), lab(yte)), tuple(xtr.shape[1:]), num_outputs,
        task, loss, info or {},
    )


@functools.lru_cache(maxsize=4)
def _digits_arrays():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float64), d.target.astype(np.int64)


def _digits(form: str, seed: int, dtype) -> DatasetBundle:
    x, y = _digits_arrays()
    x = _reshape(x, form, {"flat": (64,), "image": (1, 8, 8), "sequence": (8, 8)}, "digits")
    tr, te = _split(len(x), 0.2, 0)  # fixed split: the same for every seed
    return _bundle("digits", x[tr], y[tr], x[te], y[te], dtype, 10, "classification")


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, seed: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; leave the user's RNG untouched
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def _mnist1d(form: str, seed: int, dtype, num_samples: int = 5000) -> DatasetBundle:
    xtr, ytr, xte, yte = _mnist1d_arrays(num_samples, seed)
    shapes = {"flat": (40,), "sequence": (40, 1)}
    xtr, xte = _reshape(xtr, form, shapes, "mnist1d"), _reshape(xte, form, shapes, "mnist1d")
    return _bundle("mnist1d", xtr, ytr, xte, yte, dtype, 10, "classification")


def gaussian_arrays(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seed 003 §I.2: inputs and labels with i.i.d. N(0, 1/dim) entries, inputs rescaled to length 10.

    The source states "length 10" for dim = 100, i.e. quadratic-mean 1 per entry. Decision: for other
    ``dim`` we keep qm-norm 1 and rescale to length ``sqrt(dim)`` (exactly 10 at the paper's dim = 100).
    """
    rng = np.random.RandomState(seed)
    x = rng.normal(0.0, 1.0 / math.sqrt(dim), size=(n, dim))
    x *= math.sqrt(dim) / np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.normal(0.0, 1.0 / math.sqrt(dim), size=(n, dim))
    return x, y


def _gaussian(form: str, seed: int, dtype, n: int = 10000, dim: int = 100, n_test: int | None = None):
    if form != "flat":
        raise ValueError(f"dataset 'gaussian' has no form {form!r}; accepted: flat.")
    if n < 1 or dim < 1:
        raise ValueError(f"gaussian needs n >= 1 and dim >= 1, got n={n}, dim={dim}.")
    n_test = max(1, n // 10) if n_test is None else n_test
    x, y = gaussian_arrays(n + n_test, dim, seed)
    return _bundle("gaussian", x[:n], y[:n], x[n:], y[n:], dtype, dim, "regression")


def _spirals(form: str, seed: int, dtype, n: int = 2000, noise: float = 0.05):
    if form != "flat":
        raise ValueError(f"dataset 'spirals' has no form {form!r}; accepted: flat.")
    rng = np.random.RandomState(seed)
    t = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi  # radius grows with the angle; sqrt spreads points evenly
    label = rng.randint(0, 2, n)
    sign = np.where(label == 0, 1.0, -1.0)
    x = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], 1) / (3 * np.pi) + rng.normal(0, noise, (n, 2))
    tr, te = _split(n, 0.2, seed)
    return _bundle("spirals", x[tr], label[tr], x[te], label[te], dtype, 2, "classification")


def _checkerboard(form: str, seed: int, dtype, n: int = 5000, board: int = 8):
    """``board`` x ``board`` checkerboard on [-0.5, 0.5]^2, noise-free labels."""
    if form != "flat":
        raise ValueError(f"dataset 'checkerboard' has no form {form!r}; accepted: flat.")
    rng = np.random.RandomState(seed)
    x = rng.uniform(-0.5, 0.5, (n, 2))
    cells = np.clip(np.floor((x + 0.5) * board), 0, board - 1).astype(np.int64)
    y = (cells[:, 0] + cells[:, 1]) % 2
    tr, te = _split(n, 0.2, seed)
    return _bundle("checkerboard", x[tr], y[tr], x[te], y[te], dtype, 2, "classification")


def _sine(form: str, seed: int, dtype, n: int = 5000):
    """y = sin(x) for x uniform over two periods [0, 4 pi], noise-free (regression)."""
    if form != "flat":
        raise ValueError(f"dataset 'sine' has no form {form!r}; accepted: flat.")
    rng = np.random.RandomState(seed)
    x = rng.uniform(0, 4 * np.pi, (n, 1))
    y = np.sin(x)
    tr, te = _split(n, 0.2, seed)
    return _bundle("sine", x[tr], y[tr], x[te], y[te], dtype, 1, "regression")


def _idx_dataset(name: str):
    def load(form: str, seed: int, dtype, root: str | Path | None = None):
        if root is None:
            raise ValueError(f"dataset {name!r} reads local IDX files: pass root=DIR (no download is attempted).")
        xtr, ytr, xte, yte = load_idx_dir(root)
        h, w = xtr.shape[1:]
        shapes = {"flat": (h * w,), "image": (1, h, w), "sequence": (h, w)}
        xtr = _reshape(xtr.astype(np.float64) / 255.0, form, shapes, name)
        xte = _reshape(xte.astype(np.float64) / 255.0, form, shapes, name)
        return _bundle(name, xtr, ytr.astype(np.int64), xte, yte.astype(np.int64), dtype, int(max(ytr.max(), yte.max())) + 1, "classification")

    return load


def _cifar_dataset(num_classes: int):
    name = f"cifar{num_classes}"

    def load(form: str, seed: int, dtype, root: str | Path | None = None):
        if root is None:
            raise ValueError(f"dataset {name!r} reads local pickle batches: pass root=DIR (no download is attempted).")
        xtr, ytr, xte, yte = load_cifar_dir(root, num_classes)
        shapes = {"flat": (3072,), "image": (3, 32, 32), "sequence": (32, 96)}
        if form == "sequence":  # rows of pixels with the 3 channels side by side
            xtr, xte = xtr.transpose(0, 2, 1, 3), xte.transpose(0, 2, 1, 3)
        xtr = _reshape(xtr.astype(np.float64) / 255.0, form, shapes, name)
        xte = _reshape(xte.astype(np.float64) / 255.0, form, shapes, name)
        return _bundle(name, xtr, ytr, xte, yte, dtype, num_classes, "classification")

    return load


_LOADERS = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "gaussian": _gaussian,
    "spirals": _spirals,
    "checkerboard": _checkerboard,
    "sine": _sine,
    "mnist": _idx_dataset("mnist"),
    "fashion_mnist": _idx_dataset("fashion_mnist"),
    "kmnist": _idx_dataset("kmnist"),
    "cifar10": _cifar_dataset(10),
    "cifar100": _cifar_dataset(100),
}


def names() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_LOADERS)


def load_dataset(name: str, form: str = "flat", seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> DatasetBundle:
    """Load dataset ``name`` as a :class:`DatasetBundle`; deterministic given ``seed``.

    ``form`` is ``flat`` (vectors), ``image`` (C x H x W) or ``sequence`` (T x features) where the data has it.
    Extra keywords go to the generator (e.g. ``n``, ``dim`` for ``gaussian``; ``root`` for file datasets).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; accepted: {', '.join(names())}.")
    if form not in FORMS:
        raise ValueError(f"unknown data form {form!r}; accepted: {', '.join(FORMS)}.")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
    try:
        return _LOADERS[name](form, seed, dtype, **kwargs)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise ValueError(f"dataset {name!r} got an unknown option ({exc}).") from None
        raise


__all__ = ["load_dataset", "names", "DatasetBundle", "DataFileError", "UnsafePickleError", "read_idx", "write_idx", "load_idx_dir",
           "load_cifar_dir", "gaussian_arrays", "FORMS"]
