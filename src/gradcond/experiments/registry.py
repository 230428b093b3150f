"""Reproduction registry: each experiment declares a claim and its source, computes ours, and reports rows
``claim | source | paper | ours | criterion | tolerance | verdict`` as JSON and markdown.

Verdicts are data: a :class:`Row` with ``holds`` None only reports a number ("reported, not judged") and is never a
pass; an entry holds when at least one row is judged and no judged row fails (:func:`entry_holds`), so an entry of
only reported rows FAILS ("no judged row"). :func:`run_all` runs every entry and writes ``REPRODUCTION.md``.

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
    """One claim checked against our numbers: the verdict as data.

    ``claim``: what the source says; ``source``: where (seed and its own figure/table/equation number);
    ``paper``: the source's value (text, "" when the claim is qualitative); ``ours``: our computed value(s);
    ``criterion``: the test in words (what is compared with what); ``tolerance``: the tolerance and how it was
    chosen; ``holds``: True/False when judged, None when the row only reports a number (never counted as a pass);
    ``data``: the raw numbers behind ``ours``.
    """

    claim: str
    source: str
    ours: str
    holds: bool | None = None
    data: dict = field(default_factory=dict)
    paper: str = ""
    criterion: str = ""
    tolerance: str = ""

    @property
    def judged(self) -> bool:
        """Whether this row carries a verdict (``holds`` is True or False)."""
        return self.holds is not None

    def to_dict(self) -> dict:
        return {**asdict(self), "judged": self.judged}


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


VERDICTS = {True: "yes", False: "no", None: "reported, not judged"}
NO_JUDGED_ROW = "no judged row: every row only reports a number, so nothing was checked"


def verdict_text(holds: bool | None) -> str:
    """The verdict cell of a row: ``yes``, ``no`` or ``reported, not judged`` (``holds`` None is never a pass)."""
    return VERDICTS[holds]


def counts(rows: list[Row]) -> tuple[int, int]:
    """``(judged, reported)``: how many rows carry a verdict and how many only report a number."""
    k = sum(r.judged for r in rows)
    return k, len(rows) - k


def entry_holds(rows: list[Row]) -> bool:
    """An entry holds when it has at least one judged row and no judged row fails (an entry of only reported rows
    checked nothing, so it fails)."""
    return any(r.judged for r in rows) and all(r.holds is not False for r in rows)


def entry_reason(rows: list[Row]) -> str:
    """One sentence: why the entry holds or fails (independent of any single row when no row is judged)."""
    k, m = counts(rows)
    if k == 0:
        return NO_JUDGED_ROW
    failed = sum(r.holds is False for r in rows)
    if failed:
        return f"{failed} of {k} judged rows do not hold"
    return f"all {k} judged rows hold"


def summary_line(rows: list[Row]) -> str:
    """``"k judged, m reported; <verdict>: <reason>"`` for an entry's rows."""
    k, m = counts(rows)
    return f"{k} judged, {m} reported; {'HOLDS' if entry_holds(rows) else 'FAILS'}: {entry_reason(rows)}"


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table: claim | source | paper | ours | criterion | tolerance | verdict."""
    lines = ["| claim | source | paper | ours | criterion | tolerance | verdict |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = (r.claim, r.source, r.paper, r.ours, r.criterion, r.tolerance, verdict_text(r.holds))
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _writable_dir(path: Path) -> Path:
    """Create ``path`` and check it can be written, before any computation: an unusable ``--out`` is bad input
    (:class:`UserError`, exit 2), not a claim that fails (exit 1)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {path} cannot be created or written ({exc.strerror or exc}); "
                        "pass a writable --out.") from None
    return path


def takes_device(fn) -> bool:
    """Whether an experiment function accepts a ``device`` keyword (it can compute on a GPU)."""
    try:
        return "device" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _prepare(name: str, out_dir: str | Path, device) -> tuple[Experiment, object, dict, Path]:
    """Check ``name``, ``device`` and the output directory before any computation (all bad input: UserError)."""
    exps = load_all()
    if name not in exps:
        raise UserError(f"unknown reproduction {name!r}; accepted: {', '.join(exps)}.")
    exp = exps[name]
    dev = resolve_device("cpu" if device is None else device)
    kwargs = {}
    if takes_device(exp.fn):
        kwargs["device"] = dev
    elif dev.type != "cpu":
        warnings.warn(f"reproduction {name!r} computes on the CPU only; --device {device} is not used for it.",
                      stacklevel=3)
        dev = resolve_device("cpu")
    out = _writable_dir(Path(out_dir) / name)
    return exp, dev, kwargs, out


def _write_result(exp: Experiment, rows: list[Row], out: Path, quick: bool, dev, seconds: float) -> None:
    k, m = counts(rows)
    result = {
        "name": exp.name,
        "claim": exp.claim,
        "source": exp.source,
        "quick": quick,
        "device": str(dev),
        "seconds": seconds,
        "rows": [r.to_dict() for r in rows],
        "judged": k,
        "reported": m,
        "holds": entry_holds(rows),
        "reason": entry_reason(rows),
    }
    atomic_write_text(out / "result.json", json.dumps(result, indent=2, default=str))
    md = (f"# {exp.name}\n\n{exp.claim}\n\nSource: {exp.source}. Mode: {'quick' if quick else 'full'}; "
          f"{seconds:.1f} s.\n\n{summary_line(rows)}\n\n")
    atomic_write_text(out / "result.md", md + markdown_table(rows))


def run_experiment(name: str, out_dir: str | Path, quick: bool = False, device=None) -> tuple[list[Row], Path]:
    """Run reproduction ``name`` into ``out_dir/name/``: figures, ``result.json`` and ``result.md``.

    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; default the CPU) is checked first (CUDA without
    CUDA: :class:`UserError`) and passed to experiments that take one; one that does not runs on the CPU, with a
    warning when another device was asked for. ``result.json`` records the device used, the counts of judged and
    reported rows, ``holds`` (:func:`entry_holds`: False when no row is judged) and its ``reason``.
    """
    exp, dev, kwargs, out = _prepare(name, out_dir, device)
    t0 = time.perf_counter()
    rows = exp.fn(quick=quick, out_dir=out, **kwargs)
    _write_result(exp, rows, out, quick, dev, time.perf_counter() - t0)
    return rows, out


def last_counts(name: str, out_dir: str | Path) -> dict | None:
    """``{"judged", "reported", "holds", "quick"}`` of the last run of ``name`` found in ``out_dir/name/result.json``,
    or None when there is none (or it cannot be read). Reads a small JSON file; runs nothing."""
    path = Path(out_dir) / name / "result.json"
    try:
        res = json.loads(path.read_text())
        rows = res["rows"]
        k = sum(r.get("holds") is not None for r in rows)
        return {"judged": k, "reported": len(rows) - k, "holds": bool(res.get("holds")), "quick": res.get("quick")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass
class EntryOutcome:
    """What ``repro all`` found for one entry: its rows (empty when it raised), whether it holds, and the error."""

    name: str
    rows: list[Row]
    holds: bool
    seconds: float
    error: str = ""


def reproduction_markdown(outcomes: list[EntryOutcome], quick: bool, exps: dict[str, Experiment] | None = None) -> str:
    """``REPRODUCTION.md``: a summary line per entry, then one table of every row:
    entry | claim | source | paper value | ours | criterion | verdict."""
    exps = load_all() if exps is None else exps
    n_fail = sum(not o.holds for o in outcomes)
    lines = ["# Reproduction report", "",
             f"Generated by `gradcond repro all{' --quick' if quick else ''}` "
             f"({'quick' if quick else 'full'} mode). {len(outcomes) - n_fail} of {len(outcomes)} entries hold; "
             "an entry holds when it has at least one judged row and none of its judged rows fails. "
             "\"reported, not judged\" rows only report a number and never count as a pass.", "",
             "## Entries", ""]
    for o in outcomes:
        if o.error:
            line = f"FAILS: raised {o.error}"
        else:
            line = summary_line(o.rows)
        lines.append(f"- **{o.name}** ({o.seconds:.0f} s): {_md_cell(line)}")
    lines += ["", "## Claims", "", "| entry | claim | source | paper value | ours | criterion | verdict |",
              "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        if o.error:
            exp = exps.get(o.name)
            lines.append(f"| {o.name} | {_md_cell(exp.claim if exp else '')} | {_md_cell(exp.source if exp else '')} "
                         f"|  | raised {_md_cell(o.error)} |  | no |")
        for r in o.rows:
            crit = r.criterion + (f" (tolerance: {r.tolerance})" if r.tolerance else "")
            cells = (o.name, r.claim, r.source, r.paper, r.ours, crit, verdict_text(r.holds))
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_all(out_dir: str | Path = "runs/repro", quick: bool = False, device=None, names: list[str] | None = None,
            ) -> tuple[list[EntryOutcome], Path]:
    """Run every registered reproduction (or ``names``) into ``out_dir/NAME/`` and write ``out_dir/REPRODUCTION.md``.

    An entry that raises is recorded as failing (with the exception in one line) and the run goes on; bad input
    (an unknown name, an unusable device or ``out_dir``) raises :class:`UserError` before any entry runs. Cost: the
    sum of the entries' costs (``quick``: minutes each). Returns the outcomes and the path of ``REPRODUCTION.md``.
    """
    from ..utils import progress

    exps = load_all()
    names = list(exps) if names is None else list(names)
    for name in names:
        if name not in exps:
            raise UserError(f"unknown reproduction {name!r}; accepted: {', '.join(exps)}.")
    resolve_device("cpu" if device is None else device)
    root = _writable_dir(Path(out_dir))
    outcomes = []
    bar = progress(names, desc="repro all", delay=0)
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            rows, _ = run_experiment(name, root, quick=quick, device=device)
            outcomes.append(EntryOutcome(name, rows, entry_holds(rows), time.perf_counter() - t0))
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as exc:  # noqa: BLE001 - one broken entry must not stop the others; it is reported as failing
            err = " ".join(f"{type(exc).__name__}: {exc}".split())
            warnings.warn(f"reproduction {name!r} raised {err}; it is recorded as failing.", stacklevel=2)
            outcomes.append(EntryOutcome(name, [], False, time.perf_counter() - t0, error=err))
        # rewritten after every entry, so an interrupted run leaves the report of the entries done so far
        report = root / "REPRODUCTION.md"
        atomic_write_text(report, reproduction_markdown(outcomes, quick, exps))
    report = root / "REPRODUCTION.md"
    if not outcomes:
        atomic_write_text(report, reproduction_markdown(outcomes, quick, exps))
    return outcomes, report
