"""Reproduction registry: each experiment declares a claim, its source and its protocol, computes ours, and reports
rows ``claim | source | paper | ours | criterion | tolerance | preconditions | verdict`` as JSON and markdown.

Verdicts are data. A :class:`Row` carries its **preconditions** (:class:`~gradcond.experiments.judging.
Precondition`: a measured value against a threshold fixed before the run) and one of four verdicts
(:attr:`Row.verdict`):

* ``yes`` / ``no``: judged, every precondition met;
* ``untestable``: a precondition is not met (the treatment did not happen, the baseline never learned, too few
  seeds, the setting is not the claim's), so the claim could not have held or failed here: neither a pass nor a
  fail, and the row names the precondition and its measured value;
* ``reported``: ``holds`` None and no precondition: the row only reports a number (never a pass).

An entry **holds** only when it has a judged row, no failing row and no untestable row (:func:`entry_holds`); its
status (:func:`entry_status`) is HOLDS, FAILS (a row says no, or nothing was judged) or UNTESTABLE (no row says no
but one could not be tested). :func:`run_all` runs every entry and writes ``REPRODUCTION.md`` with the counts.

Add an experiment by decorating ``run(quick: bool, out_dir: Path) -> list[Row]`` with :func:`register` in any module
of ``gradcond.experiments``; :func:`load_all` imports every module of the package. ``protocol=`` states the setting
(with the source sentence each choice follows, or why it differs), shown first in the entry's ``result.md``. An
experiment that can compute on a GPU also takes ``device: torch.device`` (``gradcond repro run --device``); the
others run on the CPU. The statistical rules and precondition constructors every entry uses are in
:mod:`gradcond.experiments.judging`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..utils import UserError, atomic_write_text, resolve_device
from .judging import Precondition, _strict_bool


@dataclass
class Row:
    """One claim checked against our numbers: the verdict as data.

    ``claim``: what the source says; ``source``: where (seed and its own figure/table/equation number);
    ``paper``: the source's value (text, "" when the claim is qualitative); ``ours``: our computed value(s);
    ``criterion``: the test in words (what is compared with what); ``tolerance``: the tolerance and how it was
    chosen; ``holds``: True/False when judged, None when the row only reports a number (never counted as a pass) or
    could not be computed because a precondition failed; ``preconditions``: what the setting must meet for the row
    to test the claim (:mod:`~gradcond.experiments.judging`), each with its measured value; ``data``: the raw
    numbers behind ``ours``.

    ``holds`` is stored as a Python bool: numpy and torch scalar booleans are converted (a numpy False fails), and
    anything else (a string, a multi-element tensor) raises ValueError.
    """

    claim: str
    source: str
    ours: str
    holds: bool | None = None
    data: dict = field(default_factory=dict)
    paper: str = ""
    criterion: str = ""
    tolerance: str = ""
    preconditions: list[Precondition] = field(default_factory=list)

    def __post_init__(self):
        if self.holds is not None:
            self.holds = _strict_bool(self.holds, f"Row.holds of {self.claim!r}")
        self.preconditions = [p if isinstance(p, Precondition) else Precondition(**p) for p in self.preconditions]

    @property
    def unmet(self) -> list[Precondition]:
        """The preconditions this run did not meet."""
        return [p for p in self.preconditions if not p.met]

    @property
    def verdict(self) -> str:
        """``"yes"``, ``"no"``, ``"untestable"`` (a precondition is not met) or ``"reported"`` (only a number)."""
        if self.unmet:
            return "untestable"
        if self.holds is None:
            return "reported"
        return "yes" if self.holds else "no"

    @property
    def judged(self) -> bool:
        """Whether this row is a test of its claim: judged yes/no, or meant to be judged but untestable."""
        return self.verdict != "reported"

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("claim", "source", "ours", "holds", "data", "paper", "criterion",
                                             "tolerance")}
        d["preconditions"] = [p.to_dict() for p in self.preconditions]
        d["judged"] = self.judged
        d["verdict"] = self.verdict
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        """The row of :meth:`to_dict` (derived keys ``judged`` and ``verdict`` are recomputed, not read)."""
        keys = ("claim", "source", "ours", "holds", "data", "paper", "criterion", "tolerance", "preconditions")
        return cls(**{k: d[k] for k in keys if k in d})


@dataclass
class Experiment:
    name: str
    claim: str
    source: str
    fn: Callable
    module: str = ""
    protocol: str = ""


_REGISTRY: dict[str, Experiment] = {}


def register(name: str, claim: str, source: str, protocol: str = ""):
    """Decorator registering ``fn(quick, out_dir) -> list[Row]`` as reproduction ``name``.

    ``protocol``: the setting in words (model, data, budget, seeds; for each choice the source sentence it follows
    or why it differs, and which choices were fixed before the run); shown first in ``result.md``."""

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"reproduction {name!r} is registered twice.")
        _REGISTRY[name] = Experiment(name, claim, source, fn, fn.__module__, " ".join(protocol.split()))
        return fn

    return deco


def load_all() -> dict[str, Experiment]:
    """Import every module of ``gradcond.experiments`` (so their ``@register`` calls run) and return the registry."""
    import gradcond.experiments as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("registry", "judging") and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> Experiment:
    exps = load_all()
    if name not in exps:
        raise ValueError(f"unknown reproduction {name!r}; accepted: {', '.join(exps)}.")
    return exps[name]


def _md_cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


VERDICTS = {"yes": "yes", "no": "no", "untestable": "untestable", "reported": "reported, not judged"}
NO_JUDGED_ROW = "no judged row: every row only reports a number, so nothing was checked"


def verdict_text(row: "Row | bool | None") -> str:
    """The verdict cell of a row: ``yes``, ``no``, ``untestable: <the unmet preconditions with their measured
    values>`` or ``reported, not judged`` (never a pass). Also accepts a bare ``holds`` value (True/False/None)."""
    if not isinstance(row, Row):
        return VERDICTS["reported" if row is None else ("yes" if _strict_bool(row, "holds") else "no")]
    if row.verdict == "untestable":
        return "untestable: " + "; ".join(p.describe() for p in row.unmet)
    return VERDICTS[row.verdict]


def verdict_counts(rows: list[Row]) -> dict[str, int]:
    """How many rows say yes, no, untestable and reported."""
    out = {"yes": 0, "no": 0, "untestable": 0, "reported": 0}
    for r in rows:
        out[r.verdict] += 1
    return out


def counts(rows: list[Row]) -> tuple[int, int]:
    """``(judged, reported)``: how many rows test their claim (yes, no or untestable) and how many only report."""
    k = sum(r.judged for r in rows)
    return k, len(rows) - k


def entry_status(rows: list[Row]) -> str:
    """``"HOLDS"`` (a row says yes, none says no, none is untestable), ``"FAILS"`` (a row says no, or no row is
    judged) or ``"UNTESTABLE"`` (no row says no, but a precondition of a judged row is not met)."""
    c = verdict_counts(rows)
    if c["no"] or not (c["yes"] or c["untestable"]):
        return "FAILS"
    if c["untestable"]:
        return "UNTESTABLE"
    return "HOLDS"


def entry_holds(rows: list[Row]) -> bool:
    """An entry holds only when it has a judged row, no failing row and no untestable row (an entry of only
    reported rows checked nothing, so it fails). Verdicts are compared as strings, so a numpy or torch False fails
    (the Row stores it as ``False``)."""
    return entry_status(rows) == "HOLDS"


def entry_reason(rows: list[Row]) -> str:
    """One sentence: why the entry holds, fails or is untestable."""
    c = verdict_counts(rows)
    k = c["yes"] + c["no"] + c["untestable"]
    if k == 0:
        return NO_JUDGED_ROW
    parts = []
    if c["no"]:
        parts.append(f"{c['no']} of {k} judged rows do not hold")
    if c["untestable"]:
        parts.append(f"{c['untestable']} of {k} judged rows are untestable (a precondition is not met)")
    if parts:
        return "; ".join(parts)
    return f"all {k} judged rows hold"


def summary_line(rows: list[Row]) -> str:
    """``"y yes, n no, u untestable, m reported; <STATUS>: <reason>"`` for an entry's rows."""
    c = verdict_counts(rows)
    return (f"{c['yes']} yes, {c['no']} no, {c['untestable']} untestable, {c['reported']} reported; "
            f"{entry_status(rows)}: {entry_reason(rows)}")


def preconditions_text(row: Row) -> str:
    """The row's preconditions in one cell: ``name: measured (needs requirement) [met|NOT MET]`` each."""
    return "; ".join(f"{p.describe()} [{'met' if p.met else 'NOT MET'}]" for p in row.preconditions)


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table: claim | source | paper | ours | criterion | tolerance | preconditions |
    verdict."""
    lines = ["| claim | source | paper | ours | criterion | tolerance | preconditions | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = (r.claim, r.source, r.paper, r.ours, r.criterion, r.tolerance, preconditions_text(r),
                 verdict_text(r))
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def entry_markdown(exp: "Experiment", rows: list[Row], quick: bool, seconds: float) -> str:
    """An entry's ``result.md``, in reading order: claim and source, the protocol, the preconditions (each with its
    measured value), then the judged rows and the reported ones."""
    md = [f"# {exp.name}", "", exp.claim, "", f"Source: {exp.source}. Mode: {'quick' if quick else 'full'}; "
          f"{seconds:.1f} s.", "", summary_line(rows), ""]
    if exp.protocol:
        md += ["## Protocol", "", exp.protocol, ""]
    pre = [(r, p) for r in rows for p in r.preconditions]
    if pre:
        md += ["## Preconditions", "", "| row | precondition | requirement | measured | met |", "|---|---|---|---|---|"]
        md += [f"| {_md_cell(r.claim)} | {_md_cell(p.name)} | {_md_cell(p.requirement)} | {_md_cell(p.measured)} | "
               f"{'yes' if p.met else 'NO'} |" for r, p in pre]
        md.append("")
    judged = [r for r in rows if r.judged]
    reported = [r for r in rows if not r.judged]
    if judged:
        md += ["## Judged rows", "", markdown_table(judged)]
    if reported:
        md += ["## Reported rows", "", markdown_table(reported)]
    return "\n".join(md)


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


def _mode(quick: bool) -> str:
    return "quick" if quick else "full"


def _write_result(exp: Experiment, rows: list[Row], out: Path, quick: bool, dev, seconds: float) -> None:
    k, m = counts(rows)
    result = {
        "name": exp.name,
        "claim": exp.claim,
        "source": exp.source,
        "protocol": exp.protocol,
        "quick": quick,
        "device": str(dev),
        "seconds": seconds,
        "rows": [r.to_dict() for r in rows],
        "judged": k,
        "reported": m,
        "verdicts": verdict_counts(rows),
        "status": entry_status(rows),
        "holds": entry_holds(rows),
        "reason": entry_reason(rows),
    }
    text = json.dumps(result, indent=2, default=str)
    # result.json is the latest run; result-<mode>.json keeps each mode's last run, so REPRODUCTION.md can show the
    # full runs beside the quick ones
    atomic_write_text(out / f"result-{_mode(quick)}.json", text)
    atomic_write_text(out / "result.json", text)
    atomic_write_text(out / "result.md", entry_markdown(exp, rows, quick, seconds))


def run_experiment(name: str, out_dir: str | Path, quick: bool = False, device=None) -> tuple[list[Row], Path]:
    """Run reproduction ``name`` into ``out_dir/name/``: figures, ``result.json`` (also kept as
    ``result-quick.json`` or ``result-full.json``) and ``result.md``.

    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; default the CPU) is checked first (CUDA without
    CUDA: :class:`UserError`) and passed to experiments that take one; one that does not runs on the CPU, with a
    warning when another device was asked for. ``result.json`` records the device used, the verdict counts,
    ``status`` (:func:`entry_status`), ``holds`` (:func:`entry_holds`: False when no row is judged) and its
    ``reason``.
    """
    exp, dev, kwargs, out = _prepare(name, out_dir, device)
    t0 = time.perf_counter()
    rows = exp.fn(quick=quick, out_dir=out, **kwargs)
    if not isinstance(rows, list) or not all(isinstance(r, Row) for r in rows):
        raise TypeError(f"reproduction {name!r} must return a list of Row, got {type(rows).__name__}.")
    _write_result(exp, rows, out, quick, dev, time.perf_counter() - t0)
    return rows, out


def load_result(name: str, out_dir: str | Path, mode: str | None = None) -> dict | None:
    """The stored result of ``name``'s last run in ``out_dir/name/`` (``mode`` "quick"/"full": that mode's last
    run; None: the latest of either), with ``rows`` as :class:`Row` objects; None when there is none or it cannot
    be read. Reads a small JSON file; runs nothing."""
    path = Path(out_dir) / name / ("result.json" if mode is None else f"result-{mode}.json")
    try:
        res = json.loads(path.read_text())
        res["rows"] = [Row.from_dict(r) for r in res["rows"]]
        return res
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def last_counts(name: str, out_dir: str | Path) -> dict | None:
    """``{"judged", "reported", "verdicts", "status", "holds", "quick"}`` of the last run of ``name`` found in
    ``out_dir/name/result.json``, or None when there is none (or it cannot be read). Runs nothing."""
    res = load_result(name, out_dir)
    if res is None:
        return None
    rows = res["rows"]
    k, m = counts(rows)
    return {"judged": k, "reported": m, "verdicts": verdict_counts(rows), "status": entry_status(rows),
            "holds": entry_holds(rows), "quick": res.get("quick")}


@dataclass
class EntryOutcome:
    """What ``repro all`` found for one entry: its rows (empty when it raised), whether it holds, and the error."""

    name: str
    rows: list[Row]
    holds: bool
    seconds: float
    error: str = ""

    @property
    def status(self) -> str:
        """HOLDS, FAILS or UNTESTABLE (:func:`entry_status`); an entry that raised FAILS."""
        return "FAILS" if self.error else entry_status(self.rows)

    @property
    def summary(self) -> str:
        return f"FAILS: raised {self.error}" if self.error else summary_line(self.rows)


def status_counts(outcomes: list[EntryOutcome]) -> dict[str, int]:
    """How many entries hold, fail and are untestable."""
    out = {"HOLDS": 0, "FAILS": 0, "UNTESTABLE": 0}
    for o in outcomes:
        out[o.status] += 1
    return out


def _headline(outcomes: list[EntryOutcome]) -> str:
    c = status_counts(outcomes)
    v = verdict_counts([r for o in outcomes for r in o.rows])
    return (f"{len(outcomes)} entries: **{c['HOLDS']} hold, {c['FAILS']} fail, {c['UNTESTABLE']} untestable**. "
            f"Rows: {v['yes']} yes, {v['no']} no, {v['untestable']} untestable, {v['reported']} reported only.")


def _claims_table(outcomes: list[EntryOutcome], exps: dict[str, Experiment]) -> list[str]:
    lines = ["| entry | claim | source | paper value | ours | criterion | preconditions | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        if o.error:
            exp = exps.get(o.name)
            lines.append(f"| {o.name} | {_md_cell(exp.claim if exp else '')} | {_md_cell(exp.source if exp else '')} "
                         f"|  | raised {_md_cell(o.error)} |  |  | no |")
        for r in o.rows:
            crit = r.criterion + (f" (tolerance: {r.tolerance})" if r.tolerance else "")
            cells = (o.name, r.claim, r.source, r.paper, r.ours, crit, preconditions_text(r), verdict_text(r))
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return lines


def reproduction_markdown(outcomes: list[EntryOutcome], quick: bool, exps: dict[str, Experiment] | None = None,
                          other: list[EntryOutcome] | None = None) -> str:
    """``REPRODUCTION.md``: the hold / fail / untestable counts, a summary line per entry, then one table of every
    row (entry | claim | source | paper value | ours | criterion | preconditions | verdict). ``other``: outcomes
    of the other mode (e.g. the full runs found beside a quick run), shown in their own section when given."""
    exps = load_all() if exps is None else exps
    mode = _mode(quick)
    lines = ["# Reproduction report", "",
             f"Generated by `gradcond repro all{' --quick' if quick else ''}` ({mode} mode). {_headline(outcomes)}", "",
             "An entry **holds** when it has a judged row, no row that says no and no untestable row. A row is "
             "**untestable** when one of its preconditions (the treatment happened, the baseline learns, enough "
             "seeds for the statistic, the setting is the claim's; each threshold fixed before the run) is not met: "
             "the claim could neither hold nor fail there, and the row names the precondition and its measured "
             "value. \"reported, not judged\" rows only report a number and never count as a pass.", "",
             f"## Entries ({mode} mode)", ""]
    for o in outcomes:
        lines.append(f"- **{o.name}** ({o.seconds:.0f} s): {_md_cell(o.summary)}")
    if other:
        om = _mode(not quick)
        lines += ["", f"## Entries ({om} mode)", "",
                  f"The last {om}-mode run of each entry that has one (same criteria; {om} mode follows the "
                  f"source's {'larger ' if om == 'full' else 'smaller '}setting). {_headline(other)}", ""]
        for o in other:
            lines.append(f"- **{o.name}** ({o.seconds:.0f} s): {_md_cell(o.summary)}")
    lines += ["", f"## Claims ({mode} mode)", ""] + _claims_table(outcomes, exps)
    if other:
        lines += ["", f"## Claims ({_mode(not quick)} mode)", ""] + _claims_table(other, exps)
    return "\n".join(lines) + "\n"


def stored_outcomes(out_dir: str | Path, quick: bool, names: list[str]) -> list[EntryOutcome]:
    """The outcomes of the last ``quick`` (or full) runs of ``names`` stored under ``out_dir`` (entries without
    one are left out). Runs nothing."""
    out = []
    for name in names:
        res = load_result(name, out_dir, _mode(quick))
        if res is not None:
            rows = res["rows"]
            out.append(EntryOutcome(name, rows, entry_holds(rows), float(res.get("seconds", 0.0))))
    return out


def run_all(out_dir: str | Path = "runs/repro", quick: bool = False, device=None, names: list[str] | None = None,
            ) -> tuple[list[EntryOutcome], Path]:
    """Run every registered reproduction (or ``names``) into ``out_dir/NAME/`` and write ``out_dir/REPRODUCTION.md``.

    An entry that raises is recorded as failing (with the exception in one line) and the run goes on; bad input
    (an unknown name, an unusable device or ``out_dir``) raises :class:`UserError` before any entry runs. The last
    runs of the other mode found in ``out_dir`` (e.g. full runs beside a quick ``repro all``) are listed in their
    own section. Cost: the sum of the entries' costs (``quick``: minutes each). Returns the outcomes and the path
    of ``REPRODUCTION.md``.
    """
    from ..utils import progress

    exps = load_all()
    names = list(exps) if names is None else list(names)
    for name in names:
        if name not in exps:
            raise UserError(f"unknown reproduction {name!r}; accepted: {', '.join(exps)}.")
    resolve_device("cpu" if device is None else device)
    root = _writable_dir(Path(out_dir))
    other = stored_outcomes(root, not quick, names)
    outcomes = []
    report = root / "REPRODUCTION.md"
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
        atomic_write_text(report, reproduction_markdown(outcomes, quick, exps, other))
    if not outcomes:
        atomic_write_text(report, reproduction_markdown(outcomes, quick, exps, other))
    return outcomes, report
