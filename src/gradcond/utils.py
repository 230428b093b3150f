"""Small shared helpers: progress bars that respect a global quiet switch, devices, atomic file writes, errors."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_QUIET = False


# exit codes of the command line (documented in README "Command line" and `gradcond run --help`)
EXIT_OK, EXIT_CLAIM_FAILS, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 1, 2, 3


class UserError(ValueError):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite: the CLI prints the message on one line and exits with code 3."""


def set_quiet(quiet: bool) -> None:
    """Switch every progress bar of this process off (``--quiet``) or back on (where stderr is a terminal)."""
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    return _QUIET


# a bar appears only once its task has run this long: quick calls (a tiny fit, a short teleport) stay silent
PROGRESS_DELAY_S = 1.0


def progress_enabled(stream=None) -> bool:
    """Whether :func:`progress` would draw on ``stream`` (default: the current ``sys.stderr``): not quiet, and the
    stream is a terminal. Logs, pipes, CI output and pytest's capture are not terminals, so they get no bar."""
    if _QUIET:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable=None, desc: str = "", total: int | None = None, leave: bool = False, file=None,
             delay: float | None = None, **kw):
    """A tqdm progress bar on ``file`` (default: the current ``sys.stderr``), used like ``tqdm`` (wrap an iterable,
    or call ``update``/``set_postfix``/``close``).

    Drawn only when :func:`progress_enabled` holds (a terminal, not ``--quiet``) and only after ``delay`` seconds
    (default :data:`PROGRESS_DELAY_S`), so that steps under a second print nothing. Disabled, it costs a counter
    increment per update and writes nothing.
    """
    from tqdm.std import tqdm  # the plain terminal bar: tqdm.auto would pick notebook widgets

    stream = sys.stderr if file is None else file
    return tqdm(iterable, desc=desc, total=total, leave=leave, file=stream, disable=not progress_enabled(stream),
                delay=PROGRESS_DELAY_S if delay is None else delay, dynamic_ncols=True, **kw)


DEVICES_ACCEPTED = "cpu, cuda, cuda:N (a CUDA device index) or auto (cuda when available, else cpu)"


def resolve_device(device="auto", flag: str = "--device"):
    """The :class:`torch.device` named by ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` (CUDA when
    ``torch.cuda.is_available()``, else the CPU) or a ``torch.device``.

    Raises :class:`UserError` (one sentence naming ``flag``, the option the user set) for any other name, for
    CUDA when this machine has none, and for a CUDA index beyond the devices present. Cheap: no CUDA context is
    created beyond what ``torch.cuda.is_available`` / ``device_count`` do.
    """
    import torch

    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise UserError(f"{flag} must be a device name, got {device!r}; accepted: {DEVICES_ACCEPTED}.")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"unknown {flag} {device!r}; accepted: {DEVICES_ACCEPTED}.")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {spec} was requested but CUDA is not available here (torch.cuda.is_available() is "
                        f"False); use {flag} cpu or auto.")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise UserError(f"{flag} {spec} was requested but this machine has {n} CUDA device(s) (cuda:0 to "
                        f"cuda:{n - 1}); use one of those, cpu or auto.")
    return dev


def module_device(model):
    """The device of ``model``'s first parameter (else first buffer; the CPU for a module without tensors): where
    its inputs must be. For a model split over several devices this is the device of its first layer."""
    import torch

    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """Module-level ``__getattr__``/``__dir__``/``__all__`` that import ``name`` from ``package.module`` on first use.

    ``exports`` maps a submodule to the names it provides; keeps ``import gradcond.x`` cheap (no torch.fx etc.).
    """
    import importlib

    where = {name: mod for mod, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name in where:
            value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
            setattr(importlib.import_module(package), name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(where))

    return __getattr__, __dir__, sorted(where)


# ----------------------------------------------------------------------------------------------- batches
# The one place that turns what a user passes as "data" into (x, y) batches; the probes, the teleports and the CoB
# optimiser all call these, so every entry point accepts the same inputs and words its refusal the same way.


def _is_tensor(t) -> bool:
    import torch

    return isinstance(t, torch.Tensor)


def _is_one_batch(obj) -> bool:
    """True for one batch: a tuple/list whose first element (and second, if any) is a tensor."""
    return (isinstance(obj, (tuple, list)) and len(obj) >= 1 and _is_tensor(obj[0])
            and (len(obj) == 1 or _is_tensor(obj[1])))


def _checked_batch(batch, targets: bool) -> tuple:
    """``(x, y)`` (or ``(x,)`` when targets are optional and absent) from one batch, after the shape checks."""
    if _is_tensor(batch):
        batch = (batch,)
    if not _is_one_batch(batch):
        raise ValueError(f"every batch must be a tuple (x, y) of tensors, got {type(batch).__name__}.")
    if len(batch) < 2:
        if targets:
            raise ValueError("a batch needs targets: pass (x, y) tensors, not the inputs x alone.")
        x = batch[0]
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"the batch is empty; pass at least one sample (x has shape {tuple(x.shape)}).")
        return (x,)
    x, y = batch[0], batch[1]
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"batch tensors must share a leading batch dimension; got x {tuple(x.shape)} and y {tuple(y.shape)}."
        )
    if x.shape[0] == 0:
        raise ValueError("the batch is empty; pass at least one sample.")
    return (x, y)


def _unwrap(data):
    """A dataset bundle (``.train``/``.test``, see :mod:`gradcond.data`) stands for its training split; a
    ``TensorDataset`` is one batch of all its rows."""
    import torch

    if hasattr(data, "train") and hasattr(data, "test") and not isinstance(data, (tuple, list)):
        data = data.train
    if isinstance(data, torch.utils.data.TensorDataset):
        return tuple(data.tensors)
    return data


_ACCEPTED = ("a batch (x, y) of tensors, a TensorDataset, a dataset bundle, or a non-empty loader/iterable of "
             "(x, y) batches")


def as_batches(data, *, targets: bool = True) -> list[tuple]:
    """Normalise ``data`` to a list of batches ``(x, y)``.

    Accepted: one batch -- a tuple/list ``(x, y, ...)`` of tensors; a ``TensorDataset`` (one batch of all its rows);
    a dataset bundle with ``.train``/``.test`` (its training split); or any iterable of such batches (a list of
    ``(x, y)`` pairs, a ``DataLoader``).  With ``targets=False`` the inputs alone are accepted too (a tensor ``x``,
    or batches ``(x,)``), and such batches come back as ``(x,)``.  Tensors after the second (sample weights,
    indices) are dropped: everything here reads ``(x, y)``.

    Assumes dimension 0 of ``x`` and ``y`` is the batch dimension (checked: they must agree, and be non-empty).
    Cost: one pass over an iterable (a whole ``DataLoader`` epoch); tensors are not copied.  Bad input is a
    ValueError in one sentence naming what is accepted.
    """
    data = _unwrap(data)
    if _is_tensor(data) or _is_one_batch(data):
        return [_checked_batch(data, targets)]
    try:
        items = list(data)
    except TypeError:
        raise ValueError(f"expected {_ACCEPTED}, got {type(data).__name__}.") from None
    if not items:
        raise ValueError("the data holds no batches; pass at least one (x, y) batch.")
    return [_checked_batch(b, targets) for b in items]


def as_batch(data, *, targets: bool = True) -> tuple:
    """One batch ``(x, y)``: ``data`` itself when it is one batch, else the FIRST batch of a loader / iterable.

    Accepts what :func:`as_batches` accepts, with the same checks and errors; an iterable is read up to its first
    batch only (cost: one batch of a ``DataLoader``).
    """
    data = _unwrap(data)
    if _is_tensor(data) or _is_one_batch(data):
        return _checked_batch(data, targets)
    try:
        first = next(iter(data))
    except (TypeError, StopIteration):
        raise ValueError(f"expected {_ACCEPTED}, got {type(data).__name__}.") from None
    return _checked_batch(first, targets)
