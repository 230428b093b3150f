"""The report of a ``gradcond run``: training curves, plus every monitored probe found in the run's metrics."""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..config import dumps
from ..train.run import read_events, read_metrics
from . import figures
from .html import Figure, Section, write_report


def _summary_rows(runs_rows: dict[str, list[dict]]) -> list[dict]:
    out = []
    for label, rows in runs_rows.items():
        final = {}
        for r in rows:
            if r["probe"] in ("train", "test") and r["name"] in ("loss", "acc"):
                final[f"{r['probe']}_{r['name']}"] = r["value"]
                final["epoch"] = r["epoch"] + 1
        out.append({"run": label, **final})
    return out


def write_run_report(run_dir: Path, cfg: dict, runs: dict[str, Path], seconds: float | None = None) -> Path:
    """Write ``run_dir/report.html`` (and ``report.json``) for one run or a comparison of several runs.

    ``runs`` maps a label to a run directory holding ``metrics.csv`` and ``events.jsonl``.
    """
    rows = {k: read_metrics(Path(p) / "metrics.csv") for k, p in runs.items()}
    events = {k: read_events(Path(p) / "events.jsonl") for k, p in runs.items()}
    sections = []
    summary = _summary_rows(rows)
    text = f"<p>Model <b>{html.escape(cfg['model']['name'])}</b> on <b>{html.escape(cfg['data']['name'])}</b>, " \
           f"optimizer {html.escape(cfg['optim']['name'])} (lr {cfg['optim']['lr']}), {cfg['train']['epochs']} epochs, " \
           f"seed {cfg['seed']}, {cfg['dtype']}." + (f" Wall time {seconds:.1f} s." if seconds else "") + "</p>"
    tp = [e for evs in events.values() for e in evs if e.get("kind") == "teleport"]
    if tp:
        text += "<p>Teleport events (dashed red lines on every time axis): " + ", ".join(
            f"step {e['step']} (epoch {e['epoch']})" for e in tp) + ".</p>"
    curves = Section("Training curves", text, tables=[("final values", summary)])
    curves.figures.append(Figure("loss", figures.curves(rows, [("train", "loss", "train"), ("test", "loss", "test")],
                                                        "Loss per epoch", "loss (mean over samples)", events=events),
                                 "Training and test loss after each epoch."))
    if any(r["name"] == "acc" for rr in rows.values() for r in rr):
        curves.figures.append(Figure("accuracy", figures.curves(rows, [("train", "acc", "train"), ("test", "acc", "test")],
                                                                "Accuracy per epoch", "accuracy (fraction correct)",
                                                                events=events), "Training and test accuracy."))
    sections.append(curves)
    try:  # probe sections are added by the monitor package when present
        from ..monitor.report import monitor_sections
    except ImportError:
        monitor_sections = None
    if monitor_sections is not None:
        sections += monitor_sections(rows, events)
    if tp:
        sections.append(Section("Teleport events", tables=[("events", [
            {k: v for k, v in e.items() if not isinstance(v, (dict, list))} for e in tp])]))
    links = {"metrics.csv": "metrics.csv", "events.jsonl": "events.jsonl", "config.toml": "config.toml"}
    path = write_report(Path(run_dir) / "report.html", f"gradcond run: {cfg['name']}", sections, dumps(cfg), links)
    (Path(run_dir) / "report.json").write_text(json.dumps({"summary": summary, "teleports": tp}, indent=2, default=str))
    return path
