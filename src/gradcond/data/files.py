"""Readers for standard dataset files in a local directory (no download, ever).

- IDX (MNIST, Fashion-MNIST, KMNIST), optionally gzipped: ``train-images-idx3-ubyte[.gz]`` etc.
- CIFAR-10 / CIFAR-100 python pickles: ``data_batch_1..5`` + ``test_batch`` / ``train`` + ``test``, read with a
  restricted unpickler (numpy array reconstruction only: a pickle that would run code is refused).
A missing or malformed file raises :class:`DataFileError` naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np


class DataFileError(ValueError):
    """A dataset file is missing, truncated or not in the expected format."""


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataFileError(f"missing data file {root / stem} (or {stem}.gz); expected the standard IDX file there.")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (magic 0x0000 type ndim, big-endian int32 dims, then the data); ``.gz`` is decompressed."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"missing data file {path}; expected an IDX file.")
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f"{path} is not an IDX file (bad magic number); expected 0x00 0x00 <type> <ndim>.")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"{path} is truncated: header needs {header} bytes, file has {len(raw)}.")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataFileError(f"{path} is truncated or padded: dims {dims} need {expected} bytes, file has {len(raw)}.")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8 or int32 data) as an IDX file; gzip when the name ends in ``.gz`` (used by tests)."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int32): 0x0C}
    array = np.ascontiguousarray(array)
    if array.dtype not in codes:
        raise ValueError(f"write_idx supports uint8, int8, int32 arrays, got {array.dtype}.")
    body = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    body += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")).write(body)


def load_idx_dir(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images and labels of an MNIST-format directory: (x_train, y_train, x_test, y_test), images uint8 (N, H, W)."""
    root = Path(root)
    if not root.is_dir():
        raise DataFileError(f"data directory {root} does not exist; expected a directory with the four IDX files.")
    out = []
    for split in ("train", "t10k"):
        x = read_idx(_find(root, f"{split}-images-idx3-ubyte"))
        y = read_idx(_find(root, f"{split}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataFileError(
                f"{root}: {split} images {x.shape} and labels {y.shape} do not match; expected (N, H, W) and (N,)."
            )
        out += [x, y]
    return out[0], out[1], out[2], out[3]


# The only globals a CIFAR batch (a dict of bytes, lists and numpy arrays, pickled by Python 2 or 3 / numpy 1 or 2)
# refers to: numpy's array and scalar reconstruction. None of them runs code chosen by the file.
_CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes under protocol 2; admitted for latin-1 only (see below)
})


class UnsafePickleError(DataFileError):
    """A pickle refers to a global outside the allowed set (it could run code on load); nothing was executed."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler admitting only :data:`_CIFAR_GLOBALS`; anything else (``os.system``, ``builtins.eval``, a class
    with a ``__reduce__``) raises :class:`UnsafePickleError` before it is looked up, so it can never be called."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refers to {module}.{name}")


def _latin1_encode(text, encoding="utf-8"):
    """``_codecs.encode`` restricted to the latin-1 text -> bytes step of protocol-2 pickles written by Python 3."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"calls _codecs.encode with {encoding!r}")
    return text.encode("latin-1")


def _unpickle(path: Path) -> dict:
    """Read a CIFAR python-pickle batch with :class:`_CifarUnpickler` (never a bare ``pickle.load``)."""
    if not path.is_file():
        raise DataFileError(f"missing data file {path}; expected a CIFAR python-pickle batch.")
    try:
        with open(path, "rb") as fh:
            return _CifarUnpickler(fh, encoding="bytes").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(
            f"{path} is not a plain CIFAR batch: it {exc}, which could run code on load; refused (only numpy arrays, "
            "lists, dicts, bytes and numbers are accepted)."
        ) from None
    except Exception as exc:  # truncated pickles raise EOFError / UnpicklingError
        raise DataFileError(f"{path} is truncated or not a CIFAR pickle batch ({type(exc).__name__}).") from None


def load_cifar_dir(root: str | Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``) from python pickles.

    Returns (x_train, y_train, x_test, y_test) with images uint8 (N, 3, 32, 32).
    """
    root = Path(root)
    if num_classes not in (10, 100):
        raise ValueError(f"CIFAR num_classes must be 10 or 100, got {num_classes}.")
    if not root.is_dir():
        raise DataFileError(f"data directory {root} does not exist; expected CIFAR-{num_classes} pickle batches.")
    if num_classes == 10:
        train_files, test_files, key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
    else:
        train_files, test_files, key = ["train"], ["test"], b"fine_labels"

    def read(files):
        xs, ys = [], []
        for name in files:
            d = _unpickle(root / name)
            if b"data" not in d or key not in d:
                raise DataFileError(f"{root / name} lacks b'data' or {key!r}; expected a CIFAR-{num_classes} batch.")
            x = np.asarray(d[b"data"], dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(d[key]):
                raise DataFileError(f"{root / name}: data {x.shape} does not match (N, 3072) with N labels.")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    xtr, ytr = read(train_files)
    xte, yte = read(test_files)
    return xtr, ytr, xte, yte
