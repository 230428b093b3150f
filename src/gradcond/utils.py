"""Small shared helpers: progress bars that respect a global quiet switch, atomic file writes, errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_QUIET = False


class UserError(ValueError):
    """Bad input from the user: the CLI prints the message on one line and exits with code 2."""


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    return _QUIET


def progress(iterable=None, desc: str = "", total: int | None = None, leave: bool = False, **kw):
    """A tqdm progress bar on stderr, silent when :func:`set_quiet` is on or stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=_QUIET or None, dynamic_ncols=True, **kw)


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
