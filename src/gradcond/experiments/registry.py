"""Reproduction registry: each experiment declares a claim and a source value, computes ours, and reports
``claim | source | ours | holds?`` rows as JSON and markdown.

Add an experiment by decorating ``run(quick: bool, out_dir: Path) -> list[Row]`` with :func:`register` in any module
of ``gradcond.experiments``; :func:`load_all` imports every module of the package. An experiment that can compute on
a GPU also takes ``device: torch.device`` (``gradcond repro run --device``); the others run on the CPU.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..utils import UserError, atomic_write_text, resolve_device


@dataclass
class Row:
    claim: str
    source: str
    ours: str
    holds: bool | None = None
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Experiment:
    name: str
    claim: str
    source: str
    fn: Callable
    module: str = ""


_REGISTRY: dict[str, Experiment] = {}


def register(name: str, claim: str, source: str):
    """Decorator registering ``fn(quick, out_dir) -> list[Row]`` as reproduction ``name``."""

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"reproduction {name!r} is registered twice.")
        _REGISTRY[name] = Experiment(name, claim, source, fn, fn.__module__)
        return fn

    return deco


def load_all() -> dict[str, Experiment]:
    """Import every module of ``gradcond.experiments`` (so their ``@register`` calls run) and return the registry."""
    import gradcond.experiments as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("registry",) and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> Experiment:
    exps = load_all()
    if name not in exps:
        raise ValueError(f"unknown reproduction {name!r}; accepted: {', '.join(exps)}.")
    return exps[name]


def _md_cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| claim | source | ours | holds? |", "|---|---|---|---|"]
    for r in rows:
        holds = {True: "yes", False: "no", None: "n/a"}[r.holds]
        lines.append(f"| {_md_cell(r.claim)} | {_md_cell(r.source)} | {_md_cell(r.ours)} | {holds} |")
    return "\n".join(lines) + "\n"


def takes_device(fn) -> bool:
    """Whether an experiment function accepts a ``device`` keyword (it can compute on a GPU)."""
    try:
        return "device" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def run_experiment(name: str, out_dir: str | Path, quick: bool = False, device=None) -> tuple[list[Row], Path]:
    """Run reproduction ``name`` into ``out_dir/name/``: figures, ``result.json`` and ``result.md``.

    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; default the CPU) is checked first (CUDA without
    CUDA: :class:`UserError`) and passed to experiments that take one; one that does not runs on the CPU, with a
    warning when another device was asked for. ``result.json`` records the device used.
    """
    exp = get(name)
    dev = resolve_device("cpu" if device is None else device)
    kwargs = {}
    if takes_device(exp.fn):
        kwargs["device"] = dev
    elif dev.type != "cpu":
        warnings.warn(f"reproduction {name!r} computes on the CPU only; --device {device} is not used for it.",
                      stacklevel=2)
        dev = resolve_device("cpu")
    out = Path(out_dir) / name
    try:  # before any computation: an unusable --out is bad input (exit 2), not a claim that fails (exit 1)
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {out} cannot be created or written ({exc.strerror or exc}); "
                        "pass a writable --out.") from None
    t0 = time.perf_counter()
    rows = exp.fn(quick=quick, out_dir=out, **kwargs)
    seconds = time.perf_counter() - t0
    result = {
        "name": name,
        "claim": exp.claim,
        "source": exp.source,
        "quick": quick,
        "device": str(dev),
        "seconds": seconds,
        "rows": [r.to_dict() for r in rows],
        "holds": all(r.holds is not False for r in rows),
    }
    atomic_write_text(out / "result.json", json.dumps(result, indent=2, default=str))
    md = f"# {name}\n\n{exp.claim}\n\nSource: {exp.source}. Mode: {'quick' if quick else 'full'}; {seconds:.1f} s.\n\n"
    atomic_write_text(out / "result.md", md + markdown_table(rows))
    return rows, out
