"""The report of a ``gradcond run``: a summary in words, training curves, plus every monitored probe found in the
run's metrics.

The summary (:func:`run_summary`) reads only what the run wrote: ``metrics.csv`` (and ``timings.csv`` for timing
values), ``events.jsonl`` and, when the monitor wrote it, ``monitor_schedule.json``. It computes no gradients.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from ..config import dumps
from ..probes.scale import EXPLODE_RATE, MIN_FIT_LAYERS, VANISH_RATE, gsc_verdict  # noqa: F401  (re-exported)
from ..train.run import read_events, read_metrics
from . import figures
from .html import Figure, Section, write_report
from .monitor_sections import monitor_sections

# words for the probes the monitor can schedule (used in the coverage sentences)
PROBE_WORDS = {"grad_norm": "the per-layer gradient norm", "weight_norm": "the weight norm", "gsc": "GSC",
               "domain": "the domain (sign diversity)", "conditioning": "gradient conditioning"}
METRIC_WORDS = {"coherence": "gradient coherence", "step_consistency": "step-consistency",
                "relative_rank_weight": "relative weight-gradient rank", "relative_rank_input": "relative input-gradient rank"}
# probes written by the trainer itself, not by the monitor
_TRAINER_PROBES = {"train", "test", "optim", "monitor"}
# the GSC verdict and its evidence thresholds are shared with `gradcond diagnose` (gradcond.probes.scale)
COLLAPSE_SIGN_DIVERSITY = 0.1


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


def _g(v: float) -> str:
    return f"{v:.3g}"


def _steps_text(steps: list[int], show: int = 6) -> str:
    """``steps 23, 46, 69`` or, for a long list, the first few, an ellipsis and the last."""
    if len(steps) <= show:
        return "step " + str(steps[0]) if len(steps) == 1 else "steps " + ", ".join(map(str, steps))
    return "steps " + ", ".join(map(str, steps[: show - 1])) + f", …, {steps[-1]}"


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


def _by_step(rows: list[dict], probe: str, name: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        if r["probe"] == probe and r["name"] == name:
            out.setdefault(r["step"], []).append(r)
    return out


def _epoch_values(rows: list[dict], probe: str, name: str) -> dict[int, float]:
    """{epochs completed (1-based): value} of an epoch-level metric such as train/loss."""
    return {r["epoch"] + 1: r["value"] for r in rows if r["probe"] == probe and r["name"] == name}


def event_when(e: dict, epochs: int | None = None) -> str:
    """Readable time of an event: ``step 23, at the start of epoch 2 of 8`` (events log 0-based epochs)."""
    of = f" of {epochs}" if epochs else ""
    return f"step {e['step']}, at the start of epoch {e['epoch'] + 1}{of}"


def _clock(t) -> str:
    try:
        return datetime.fromtimestamp(float(t), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(t)


# ---- the parts of the summary ---------------------------------------------------------------------------------
def _outcome(rows: dict[str, list[dict]]) -> list[str]:
    out = []
    for label, rr in rows.items():
        tl, ta = _epoch_values(rr, "train", "loss"), _epoch_values(rr, "test", "acc")
        vl = _epoch_values(rr, "test", "loss")
        if not tl:
            out.append(f"The {label} run logged no training loss.")
            continue
        last = max(tl)
        s = f"The {label} run finished {last} epoch{'s' if last != 1 else ''} with training loss {_g(tl[last])}"
        if last in vl:
            s += f", test loss {_g(vl[last])}"
        if last in ta:
            s += f" and test accuracy {100 * ta[last]:.1f}%"
        first = min(tl)
        if len(tl) > 1:
            s += f" (training loss {_g(tl[first])} after epoch {first})"
        if not all(math.isfinite(v) for v in tl.values()):
            s += "; the loss became non-finite: training diverged"
        out.append(s + ".")
    return out


def _fit_layers(rr: list[dict], step: int, model_kinds: dict[str, str] | None) -> int | None:
    """How many layers the explosion-rate fit at ``step`` used: the probe's own record when present, else the
    number of measured linear layers of the model (``model_kinds``), else unknown (None)."""
    for r in rr:
        if r["probe"] == "gsc" and r["name"] == "explosion_fit_layers" and r["step"] == step:
            return int(r["value"])
    if model_kinds:
        return sum(1 for r in rr if r["probe"] == "gsc" and r["name"] == "gsc" and r["step"] == step
                   and model_kinds.get(r["layer"]) == "linear")
    return None


def _fit_value(rr: list[dict], step: int, name: str):
    for r in rr:
        if r["probe"] == "gsc" and r["name"] == name and r["step"] == step:
            return r["value"]
    return None


def _gsc_part(rows: dict[str, list[dict]], labels, model_kinds) -> list[str]:
    out = []
    for label, rr in rows.items():
        rates = _by_step(rr, "gsc", "explosion_rate")
        gsc = _by_step(rr, "gsc", "gsc")
        if not gsc:
            continue
        last = max(gsc)
        rate = rates[last][0]["value"] if last in rates else None
        low, high = _fit_value(rr, last, "explosion_rate_low"), _fit_value(rr, last, "explosion_rate_high")
        _, sentence = gsc_verdict(rate, _fit_layers(rr, last, model_kinds), math.nan if low is None else low,
                                  math.nan if high is None else high, _fit_value(rr, last, "explosion_r2"))
        lowest = gsc[last][0]
        s = f"{label} run, GSC at step {last}: {sentence}"
        s += f"; GSC(L, 0) at the lowest layer ({figures.relabel(lowest['layer'], labels)}) is {_g(lowest['value'])}"
        first = min(gsc)
        if first != last:
            s += f" (was {_g(gsc[first][0]['value'])} at step {first})"
        out.append(s[0].upper() + s[1:] + ".")
    return out


def _domain_part(rows: dict[str, list[dict]], labels, probe_batch: int | None = None) -> list[str]:
    out = []
    for label, rr in rows.items():
        sd = _by_step(rr, "domain", "sign_diversity")
        if not sd:
            continue
        last = max(sd)
        worst = min(sd[last], key=lambda r: r["value"])
        where = figures.relabel(worst["layer"], labels)
        basis = f"lowest of {len(sd[last])} nonlinearities" + (f", on the monitor's probe batch of up to "
                                                             f"{probe_batch} samples" if probe_batch else "")
        if worst["value"] < COLLAPSE_SIGN_DIVERSITY:
            s = (f"In the {label} run the domain collapses at {where}: sign diversity {worst['value']:.3f} at step "
                 f"{last} ({basis}; below {COLLAPSE_SIGN_DIVERSITY}: most pre-activations share one sign, the layer "
                 "acts almost linearly)")
        else:
            s = (f"In the {label} run no domain collapses: the lowest sign diversity at step {last} is "
                 f"{worst['value']:.3f} ({where}; {basis}; 0.5 = balanced signs, collapse below "
                 f"{COLLAPSE_SIGN_DIVERSITY})")
        first = min(sd)
        if first != last:
            before = [r for r in sd[first] if r["layer"] == worst["layer"]]
            if before:
                s += f"; it was {before[0]['value']:.3f} at step {first}"
        dip = min((r for rs in sd.values() for r in rs), key=lambda r: r["value"])
        if dip["value"] < COLLAPSE_SIGN_DIVERSITY <= worst["value"]:
            s += (f"; during training it dipped to {dip['value']:.3f} ({figures.relabel(dip['layer'], labels)}, "
                  f"step {dip['step']})")
        out.append(s + ".")
    return out


def _trend(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)):
        return "became non-finite"
    if abs(b - a) <= 0.05 * max(abs(a), abs(b), 1e-12):
        return "stayed near"
    return "rose" if b > a else "fell"


def _conditioning_part(rows: dict[str, list[dict]]) -> list[str]:
    out = []
    for label, rr in rows.items():
        names = list(dict.fromkeys(r["name"] for r in rr if r["probe"] == "conditioning"))
        parts = []
        for n in names:
            by = _by_step(rr, "conditioning", n)
            first, last = min(by), max(by)
            a, b = by[first][0]["value"], by[last][0]["value"]
            word = METRIC_WORDS.get(n, n.replace("_", " "))
            if first == last:
                parts.append(f"{word} {_g(a)} (step {first}, measured once)")
            elif _trend(a, b) == "stayed near":
                parts.append(f"{word} stayed near {_g(a)} (step {first}) to {_g(b)} (step {last})")
            else:
                parts.append(f"{word} {_trend(a, b)} from {_g(a)} (step {first}) to {_g(b)} (step {last})")
        if parts:
            out.append(f"Conditioning in the {label} run: " + "; ".join(parts) + ".")
    return out


def epochs_saved(plain: list[dict], teleported: list[dict]) -> dict | None:
    """Epochs saved by the teleport, measured on this run by training loss.

    Target = the plain run's final training loss. ``plain_epoch`` / ``teleport_epoch`` = the first epoch (1-based,
    epochs completed) at which each run's training loss is <= the target (None if never); ``saved`` =
    ``plain_epoch - teleport_epoch`` (negative: the teleported run was slower), None when the teleported run never
    reached the target. None when either run logged no training loss.
    """
    pl, tl = _epoch_values(plain, "train", "loss"), _epoch_values(teleported, "train", "loss")
    if not pl or not tl:
        return None
    target = pl[max(pl)]
    first = lambda d: next((e for e in sorted(d) if d[e] <= target), None)  # noqa: E731
    pe, te = first(pl), first(tl)
    return {"target_loss": target, "epochs": max(pl), "plain_epoch": pe, "teleport_epoch": te,
            "saved": None if te is None or pe is None else pe - te}


def _teleport_part(rows: dict[str, list[dict]], events: dict[str, list[dict]]) -> list[str]:
    out = []
    plain_label = next((k for k, evs in events.items() if not any(e.get("kind") == "teleport" for e in evs)), None)
    for label, evs in events.items():
        tps = [e for e in evs if e.get("kind") == "teleport"]
        epochs = max(_epoch_values(rows[label], "train", "loss") or {0: 0})
        for e in tps:
            what = "gradient norm" if e.get("objective") == "grad_norm" else str(e.get("objective", "objective"))
            s = f"The teleport in the {label} run ({event_when(e, epochs)}"
            if e.get("method"):
                s += f", {e['method']}"
            s += ")"
            b, a = e.get("objective_before"), e.get("objective_after")
            if isinstance(b, (int, float)) and isinstance(a, (int, float)):
                ratio = f" ({a / b:.2f}x)" if b else ""
                s += f" {'raised' if a > b else 'lowered' if a < b else 'kept'} the {what} from {_g(b)} to {_g(a)}{ratio}"
            lb, la = e.get("loss_before"), e.get("loss_after")
            if isinstance(lb, (int, float)) and isinstance(la, (int, float)):
                s += f"; the loss went from {lb:.4g} to {la:.4g}"
                s += " (unchanged: same function)" if abs(la - lb) <= 1e-6 * max(abs(lb), 1.0) else ""
            if isinstance(e.get("max_output_change"), (int, float)):
                s += f", outputs changed by at most {e['max_output_change']:.1e}"
            out.append(s + ".")
            nxt = e["epoch"] + 1  # the epoch the teleport started, in epochs completed
            if plain_label is not None and plain_label != label:
                p = _epoch_values(rows[plain_label], "train", "loss").get(nxt)
                t = _epoch_values(rows[label], "train", "loss").get(nxt)
                if p is not None and t is not None:
                    out.append(f"Training loss at the end of that epoch (epoch {nxt}): {_g(t)} in the {label} run "
                               f"against {_g(p)} in the {plain_label} run.")
        if tps and plain_label is not None and plain_label != label:
            es = epochs_saved(rows[plain_label], rows[label])
            if es is None or es["plain_epoch"] is None:
                continue
            head = (f"Epochs saved (measured on this run, by training loss): the {plain_label} run's final training "
                    f"loss {_g(es['target_loss'])} was first reached at epoch {es['plain_epoch']} by the "
                    f"{plain_label} run and ")
            if es["saved"] is None:
                out.append(head + f"never by the {label} run within {es['epochs']} epochs: no epochs saved.")
            elif es["saved"] > 0:
                out.append(head + f"at epoch {es['teleport_epoch']} by the {label} run: {es['saved']} epoch"
                           f"{'s' if es['saved'] != 1 else ''} saved.")
            elif es["saved"] == 0:
                out.append(head + f"also at epoch {es['teleport_epoch']} by the {label} run: no epochs saved.")
            else:
                out.append(head + f"at epoch {es['teleport_epoch']} by the {label} run: {-es['saved']} epoch"
                           f"{'s' if es['saved'] != -1 else ''} lost.")
    if not out:
        out.append("No teleport in this run.")
    return out


def _planned_sentences(schedule: dict) -> list[str]:
    """The monitor's own coverage sentences when ``gradcond.monitor.coverage_sentences`` exists, else ours."""
    try:
        from ..monitor import coverage_sentences
    except ImportError:
        coverage_sentences = None
    if coverage_sentences is not None:
        try:
            return [str(s) for s in coverage_sentences(schedule)]
        except Exception:  # a schedule file we cannot describe must not cost the whole report
            pass
    out = []
    for p in schedule.get("probes", []):
        name = PROBE_WORDS.get(p.get("name"), p.get("name"))
        if p.get("skipped") or not p.get("enabled", True):
            out.append(f"{name} was not planned: {p.get('reason') or 'disabled'}")
        elif p.get("every_steps"):
            n = p.get("planned_measurements")
            out.append(f"{name} planned every {p['every_steps']} steps" + (f" ({n} measurements)" if n else ""))
        else:
            out.append(f"{name} planned" + (f": {p['reason']}" if p.get("reason") else ""))
    return out


def coverage(rr: list[dict], evs: list[dict], schedule: dict | None, timings: list[dict] | None = None,
             budget: float | None = None) -> list[str]:
    """Sentences on what the monitor measured in one run: per probe, how often and at which steps (counted in
    ``metrics.csv``), what was not measured and why (schedule file, ``probe_failed`` events, budget skips), and the
    share of the training time the monitor took (``timings.csv`` or, in older runs, ``metrics.csv``)."""
    planned = {p.get("name"): p for p in (schedule or {}).get("probes", [])}
    try:
        from ..monitor.schedule import PROBES as monitor_probes
    except ImportError:
        monitor_probes = PROBE_WORDS
    steps: dict[str, set] = {}
    for r in rr:  # rows of monitor probes only (a teleport callback also writes rows, it is not a measurement)
        if r["probe"] not in _TRAINER_PROBES and (r["probe"] in monitor_probes or r["probe"] in planned):
            steps.setdefault(r["probe"], set()).add(r["step"])
    failed = {e.get("probe"): e for e in evs if e.get("kind") == "probe_failed"}
    unavailable = {e.get("probe"): e for e in evs if e.get("kind") == "probe_unavailable"}
    skipped: dict[str, float] = {}
    for r in rr:
        if r["probe"] == "monitor" and r["name"] == "skipped":
            skipped[r["layer"]] = skipped.get(r["layer"], 0) + r["value"]
    out = []
    for probe in list(dict.fromkeys([*planned, *steps, *(k for k in failed if k), *(k for k in unavailable if k)])):
        word = PROBE_WORDS.get(probe, probe)
        st = sorted(steps.get(probe, ()))
        if st:
            s = f"{word} was measured {_times(len(st))} ({_steps_text(st)})"
        else:
            p = planned.get(probe) or {}
            reason = p.get("reason") or ("disabled" if p.get("skipped") or not p.get("enabled", True) else "")
            if probe in failed:
                reason = f"it failed at step {failed[probe]['step']} ({failed[probe].get('error', '')})"
            if probe in unavailable:
                reason = (f"not run under {unavailable[probe].get('strategy', 'this strategy')}: "
                          f"{unavailable[probe].get('reason', '')}")
            s = f"{word} was not measured: {reason or 'no rows in metrics.csv'}"
        if st and probe in failed:
            s += f"; it failed at step {failed[probe]['step']} and was switched off ({failed[probe].get('error', '')})"
        if skipped.get(probe):
            n = int(skipped[probe])
            s += f"; {n} due measurement{'s' if n != 1 else ''} skipped to stay within the time budget"
        out.append(s[0].upper() + s[1:] + ".")
    fractions = [r for r in [*(timings or []), *rr] if r["probe"] == "monitor" and r["name"] == "time_fraction"]
    if fractions:
        last = max(fractions, key=lambda r: r["step"])
        s = f"Measuring took {100 * last['value']:.0f}% of the training time"
        if budget is not None:
            s += " (budget: no limit)" if budget >= 1 else f" (budget {100 * budget:.0f}%)"
        out.append(s + "; this share varies from one execution to the next.")
    return out


def _lower_first(s: str) -> str:
    """Lower-case the first letter of a sentence that goes after a comma, but not of an acronym (GSC)."""
    return s[0].lower() + s[1:] if s[:2] != s[:2].upper() else s


def _read_schedule(run_dir: Path) -> dict | None:
    p = Path(run_dir) / "monitor_schedule.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_timings(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "timings.csv"
    try:
        return read_metrics(p) if p.is_file() else []
    except (OSError, ValueError, KeyError):
        return []


def _coverage_part(rows, events, run_dirs, cfg) -> list[str]:
    budget = (cfg.get("monitor") or {}).get("budget")
    per_run = {}
    planned = []
    for label, rr in rows.items():
        schedule = _read_schedule(run_dirs[label])
        if schedule is not None:
            budget = schedule.get("budget", budget)
            if not planned:
                planned = _planned_sentences(schedule)
        per_run[label] = coverage(rr, events.get(label, []), schedule, _read_timings(run_dirs[label]), budget)
    if not any(per_run.values()):
        return ["The monitor was off: no gradient probe was measured."]
    out = []
    # the plan's per-probe sentences ("<probe>: <reason>.") repeat what the measured counts below say for every
    # probe that has rows; keep the overall sentence and the plan's word on the probes without rows
    measured = {r["probe"] for rr in rows.values() for r in rr}
    planned = [s for s in planned if not any(s.startswith(f"{p}:") for p in measured)]
    if planned:
        out.append("Planned (monitor_schedule.json): " + "; ".join(s.rstrip(".") for s in planned) + ".")
    # the measurement sentences without the timing one (which always differs between runs)
    bodies = {k: [s for s in v if not s.startswith("Measuring took")] for k, v in per_run.items()}
    if len(per_run) > 1 and len({tuple(v) for v in bodies.values()}) == 1:
        body = next(iter(bodies.values()))
        out.append("In each run, " + " ".join([_lower_first(body[0]), *body[1:]]))
        for k, v in per_run.items():
            out += [f"{k.capitalize()} run: {_lower_first(s)}" for s in v if s.startswith("Measuring took")]
    else:
        for k, v in per_run.items():
            out.append(f"{k.capitalize()} run: " + " ".join(v))
    return out


def run_summary(cfg: dict, rows: dict[str, list[dict]], events: dict[str, list[dict]], run_dirs: dict[str, Path],
                labels: dict[str, str] | None = None, model_kinds: dict[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """The run's story in words: ``[(topic, [sentences])]`` for the training outcome, the GSC verdict, the
    domain, conditioning trends, the teleport's effect and the monitor's coverage. Reads rows and files only."""
    parts = [("Training outcome", _outcome(rows)),
             ("Exploding or vanishing gradients", _gsc_part(rows, labels, model_kinds) or ["GSC was not measured."]),
             ("Collapsing domain", _domain_part(rows, labels, (cfg.get("monitor") or {}).get("probe_batch_size"))
              or ["The domain statistics were not measured."]),
             ("Conditioning trends", _conditioning_part(rows) or ["Gradient conditioning was not measured."]),
             ("Teleport", _teleport_part(rows, events)),
             ("Monitor coverage", _coverage_part(rows, events, run_dirs, cfg))]
    return parts


def _model_structure(cfg: dict, model=None) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """(display labels, {module name: "linear" | other}) of the run's model.

    ``model`` when given; else the zoo model of the config is rebuilt (module names and classes do not depend on
    the data-derived sizes; the global RNG is left untouched). (None, None) when neither works: the report then
    shows the logged module names.
    """
    import torch
    from torch import nn

    if model is None:
        mcfg = dict(cfg.get("model") or {})
        name = mcfg.pop("name", None)
        try:
            from .. import zoo

            with torch.random.fork_rng(devices=[]):
                model = zoo.build(name, **mcfg)
        except Exception:
            return None, None
    kinds = {(n or "<root>"): "linear" if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) else type(m).__name__
             for n, m in model.named_modules()}
    return figures.layer_labels(model), kinds


def _summary_html(parts: list[tuple[str, list[str]]]) -> str:
    items = "".join(f"<li><b>{html.escape(topic)}.</b> " + " ".join(html.escape(s) for s in sentences) + "</li>"
                    for topic, sentences in parts)
    return f'<div id="summary" class="finding"><ul>{items}</ul></div>'


def _event_row(e: dict, epochs: int | None) -> dict:
    row = {"when": event_when(e, epochs)}
    for k, v in e.items():
        if isinstance(v, (dict, list)) or k in ("kind", "step", "epoch"):
            continue
        if k == "time":
            row["time"] = _clock(v)
        elif k == "seconds" and isinstance(v, (int, float)):
            row["seconds"] = f"{v:.3f} s"
        else:
            row[k] = v
    return row


def write_run_report(run_dir: Path, cfg: dict, runs: dict[str, Path], seconds: float | None = None,
                     model=None) -> Path:
    """Write ``run_dir/report.html`` (and ``report.json``) for one run or a comparison of several runs.

    ``runs`` maps a label to a run directory holding ``metrics.csv`` and ``events.jsonl`` (and, when written,
    ``timings.csv`` and ``monitor_schedule.json``). ``model`` (optional) is only used to label layers by module.
    """
    run_dir = Path(run_dir)
    run_dirs = {k: Path(p) for k, p in runs.items()}
    rows = {k: read_metrics(p / "metrics.csv") for k, p in run_dirs.items()}
    events = {k: read_events(p / "events.jsonl") for k, p in run_dirs.items()}
    labels, kinds = _model_structure(cfg, model)
    epochs = cfg["train"]["epochs"]
    sections = []
    story = run_summary(cfg, rows, events, run_dirs, labels, kinds)
    sections.append(Section("Summary", _summary_html(story)))
    summary = _summary_rows(rows)
    text = f"<p>Model <b>{html.escape(cfg['model']['name'])}</b> on <b>{html.escape(cfg['data']['name'])}</b>, " \
           f"optimizer {html.escape(cfg['optim']['name'])} (lr {cfg['optim']['lr']}), {epochs} epochs, " \
           f"seed {cfg['seed']}, {cfg['dtype']}." + (f" Wall time {seconds:.1f} s." if seconds else "") + "</p>"
    tp = [(k, e) for k, evs in events.items() for e in evs if e.get("kind") == "teleport"]
    if tp:
        text += "<p>Teleport (dashed red line on every time axis): " + "; ".join(
            html.escape(f"{event_when(e, epochs)}, {k} run") for k, e in tp) + ".</p>"
    curves = Section("Training curves", text, tables=[("final values", summary)])
    # a run that logs its training loss several times per epoch (a Trainer's logging_steps) is drawn against steps
    per_step = any(len([r for r in rr if r["probe"] == "train" and r["name"] == "loss"]) >
                   len({r["epoch"] for r in rr if r["probe"] == "train" and r["name"] == "loss"}) for rr in rows.values())
    curves.figures.append(Figure("loss", figures.curves(rows, [("train", "loss", "train"), ("test", "loss", "test")],
                                                        "Loss per logged step" if per_step else "Loss per epoch",
                                                        "loss (mean over samples)", x="step" if per_step else "epoch",
                                                        events=events),
                                 "Training loss at each logged step." if per_step else
                                 "Training and test loss after each epoch."))
    if any(r["name"] == "acc" for rr in rows.values() for r in rr):
        curves.figures.append(Figure("accuracy", figures.curves(rows, [("train", "acc", "train"), ("test", "acc", "test")],
                                                                "Accuracy per epoch", "accuracy (fraction correct)",
                                                                events=events), "Training and test accuracy."))
    if any(r["probe"] == "data_filter" for rr in rows.values() for r in rr):  # KFilter / LossFilter (seed 002)
        curves.figures.append(Figure("kept_fraction", figures.curves(
            rows, [("data_filter", "kept_fraction", "kept")], "Training data kept by the data filter",
            "fraction of the training set", events=events),
            "Fraction of the training set each epoch trained on (k-filter or loss filter; 1 while it is off)."))
    sections.append(curves)
    sections += monitor_sections(rows, events, labels=labels)  # sections of the monitored probes (none without rows)
    if tp:
        sections.append(Section("Teleport events", tables=[("events", [
            {"run": k, **_event_row(e, epochs)} for k, e in tp])]))
    links = {}
    for k, p in run_dirs.items():
        rel = _relative(p, run_dir)
        suffix = f" ({k} run)" if len(run_dirs) > 1 else ""
        links[f"metrics.csv{suffix}"] = f"{rel}metrics.csv"
    with_events = [k for k in run_dirs if events[k]] or list(run_dirs)[:1]
    for k in with_events:  # link the events file(s) that hold events, not an empty one
        suffix = f" ({k} run)" if len(run_dirs) > 1 else ""
        links[f"events.jsonl{suffix}"] = f"{_relative(run_dirs[k], run_dir)}events.jsonl"
    links["config.toml"] = "config.toml"
    path = write_report(run_dir / "report.html", f"gradcond run: {cfg['name']}", sections, dumps(cfg), links)
    (run_dir / "report.json").write_text(json.dumps({
        "summary": summary, "story": {topic: sentences for topic, sentences in story},
        "teleports": [e for _, e in tp]}, indent=2, default=str))
    return path


def _relative(p: Path, base: Path) -> str:
    """``p`` relative to ``base`` as a link prefix ("" for base itself, "teleport/" for a sub-run)."""
    try:
        rel = Path(p).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return Path(p).resolve().as_uri() + "/"
    return "" if rel == "." else rel + "/"
