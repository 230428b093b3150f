"""Run directories: ``metrics.csv`` (long format), ``timings.csv``, ``events.jsonl``, ``checkpoints/``, ``config.toml``.

A run is written into a hidden ``.<name>.partial`` directory and renamed to ``<name>`` only when complete, so a
finished run directory is never half-written; an interrupted run stays resumable in its ``.partial`` directory.
Resume truncates ``metrics.csv``, ``timings.csv`` and ``events.jsonl`` to the row counts stored in the checkpoint,
so rows written after the last checkpoint are recomputed once, never lost or duplicated.

Timing values (wall-clock seconds, the monitor's share of the time) differ from one execution to the next, so they
are kept out of ``metrics.csv``: rows logged with :meth:`RunLogger.timing_rows` (``state.log_timings``) or whose
``name`` is one of :data:`TIMING_NAMES` go to ``timings.csv`` (same columns). ``metrics.csv`` then depends only on
the config and the seed: an interrupted-and-resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

METRIC_FIELDS = ("step", "epoch", "probe", "layer", "name", "value")
# metric names that are timings wherever they are logged from: routed to timings.csv, never to metrics.csv
TIMING_NAMES = frozenset({"seconds", "time_s", "time_fraction", "wall_seconds"})


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


class RunLogger:
    """Appends metric rows, timing rows and events to a run directory (or keeps them in memory with ``path=None``).

    ``metrics`` / ``timings`` / ``events`` hold what this process logged; ``n_*`` count the rows in the files.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.metrics: list[dict] = []
        self.timings: list[dict] = []
        self.events: list[dict] = []
        self.n_metrics = 0
        self.n_timings = 0
        self.n_events = 0
        if self.path is not None:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            for fname in ("metrics.csv", "timings.csv"):
                if not (self.path / fname).exists():
                    (self.path / fname).write_text(",".join(METRIC_FIELDS) + "\n")
            (self.path / "events.jsonl").touch()
            self.n_metrics = max(0, len((self.path / "metrics.csv").read_text().splitlines()) - 1)
            self.n_timings = max(0, len((self.path / "timings.csv").read_text().splitlines()) - 1)
            self.n_events = len((self.path / "events.jsonl").read_text().splitlines())

    # -- writing ---------------------------------------------------------------------------------------
    def metric_rows(self, rows: list[dict]) -> None:
        """Append long-format rows to ``metrics.csv``; rows named in :data:`TIMING_NAMES` go to ``timings.csv``."""
        if not rows:
            return
        timing = [r for r in rows if r.get("name") in TIMING_NAMES]
        if timing:
            self.timing_rows(timing)
            rows = [r for r in rows if r.get("name") not in TIMING_NAMES]
            if not rows:
                return
        rows = [{k: r.get(k, "") for k in METRIC_FIELDS} for r in rows]
        self.metrics.extend(rows)
        self.n_metrics += len(rows)
        self._append_csv("metrics.csv", rows)

    def timing_rows(self, rows: list[dict]) -> None:
        """Append long-format rows of timing values (seconds, time shares) to ``timings.csv``."""
        if not rows:
            return
        rows = [{k: r.get(k, "") for k in METRIC_FIELDS} for r in rows]
        self.timings.extend(rows)
        self.n_timings += len(rows)
        self._append_csv("timings.csv", rows)

    def _append_csv(self, fname: str, rows: list[dict]) -> None:
        if self.path is None:
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for r in rows:
            w.writerow([_fmt(r[k]) for k in METRIC_FIELDS])
        with open(self.path / fname, "a") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())

    def event(self, record: dict) -> None:
        self.events.append(record)
        self.n_events += 1
        if self.path is not None:
            with open(self.path / "events.jsonl", "a") as fh:
                fh.write(json.dumps(record, default=_json_default) + "\n")

    # -- resume ----------------------------------------------------------------------------------------
    def truncate(self, n_metrics: int, n_events: int, n_timings: int | None = None) -> None:
        """Drop metric rows, events and timing rows written after a checkpoint that recorded these counts.

        ``n_timings=None`` (a checkpoint written before timings had their own file) leaves ``timings.csv`` as is.
        Each file is rewritten through a temporary file and a rename, so a crash here loses nothing.
        """
        from ..utils import atomic_write_text

        if self.path is None:
            self.metrics, self.events = self.metrics[:n_metrics], self.events[:n_events]
            if n_timings is not None:
                self.timings = self.timings[:n_timings]
        else:
            lines = (self.path / "metrics.csv").read_text().splitlines(keepends=True)
            atomic_write_text(self.path / "metrics.csv", "".join(lines[: n_metrics + 1]))
            ev = (self.path / "events.jsonl").read_text().splitlines(keepends=True)
            atomic_write_text(self.path / "events.jsonl", "".join(ev[:n_events]))
            if n_timings is not None:
                tl = (self.path / "timings.csv").read_text().splitlines(keepends=True)
                atomic_write_text(self.path / "timings.csv", "".join(tl[: n_timings + 1]))
        self.n_metrics, self.n_events = n_metrics, n_events
        if n_timings is not None:
            self.n_timings = n_timings


def _json_default(o):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a run's ``metrics.csv`` with ``step``/``epoch`` as int and ``value`` as float."""
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["step"], r["epoch"], r["value"] = int(r["step"]), int(r["epoch"]), float(r["value"])
    return rows


def read_events(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
