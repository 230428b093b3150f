"""Run directories: ``metrics.csv`` (long format), ``events.jsonl``, ``checkpoints/``, ``config.toml``.

A run is written into a hidden ``.<name>.partial`` directory and renamed to ``<name>`` only when complete, so a
finished run directory is never half-written; an interrupted run stays resumable in its ``.partial`` directory.
Resume truncates ``metrics.csv`` and ``events.jsonl`` to the row counts stored in the checkpoint, so rows written
after the last checkpoint are recomputed once, never lost or duplicated.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

METRIC_FIELDS = ("step", "epoch", "probe", "layer", "name", "value")


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


class RunLogger:
    """Appends metric rows and events to a run directory (or keeps them in memory with ``path=None``)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.metrics: list[dict] = []
        self.events: list[dict] = []
        self.n_metrics = 0
        self.n_events = 0
        if self.path is not None:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            mpath = self.path / "metrics.csv"
            if not mpath.exists():
                mpath.write_text(",".join(METRIC_FIELDS) + "\n")
            (self.path / "events.jsonl").touch()
            self.n_metrics = max(0, len(mpath.read_text().splitlines()) - 1)
            self.n_events = len((self.path / "events.jsonl").read_text().splitlines())

    # -- writing ---------------------------------------------------------------------------------------
    def metric_rows(self, rows: list[dict]) -> None:
        if not rows:
            return
        rows = [{k: r.get(k, "") for k in METRIC_FIELDS} for r in rows]
        self.metrics.extend(rows)
        self.n_metrics += len(rows)
        if self.path is not None:
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            for r in rows:
                w.writerow([_fmt(r[k]) for k in METRIC_FIELDS])
            with open(self.path / "metrics.csv", "a") as fh:
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
    def truncate(self, n_metrics: int, n_events: int) -> None:
        """Drop metric rows and events written after a checkpoint that recorded these counts."""
        if self.path is None:
            self.metrics, self.events = self.metrics[:n_metrics], self.events[:n_events]
        else:
            lines = (self.path / "metrics.csv").read_text().splitlines(keepends=True)
            (self.path / "metrics.csv").write_text("".join(lines[: n_metrics + 1]))
            ev = (self.path / "events.jsonl").read_text().splitlines(keepends=True)
            (self.path / "events.jsonl").write_text("".join(ev[:n_events]))
        self.n_metrics, self.n_events = n_metrics, n_events


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
