"""Report sections for monitored probes (instruments over the rows the probes wrote; cf. Cockpit's split).

Lives in ``report`` (it used to be ``monitor/report.py``): the monitor writes rows and never imports the report;
the run report (:mod:`gradcond.report.run_report`) calls :func:`monitor_sections`.

``labels`` (optional, logged module name -> display label, see :func:`gradcond.report.figures.layer_labels`)
only changes what the figures and tables show; the rows keep the names they were logged with.
"""

from __future__ import annotations

import html

from . import figures
from .html import Figure, Section

# rows: label -> long-format metric rows; events: label -> event dicts


def _has(rows: dict, probe: str, name: str | None = None) -> bool:
    return any(r["probe"] == probe and (name is None or r["name"] == name) for rr in rows.values() for r in rr)


def _lowest_layer_series(rr: list[dict], probe: str, name: str):
    """Per step, the value at the first layer listed at that step (GSC(L, 0): the lowest measured layer)."""
    first = {}
    for r in rr:
        if r["probe"] == probe and r["name"] == name and r["step"] not in first:
            first[r["step"]] = r["value"]
    steps = sorted(first)
    return steps, [first[s] for s in steps]


def _line_fig(rows, probe, name, title, ylabel, events, logy=False, reducer=None):
    fig, ax = figures.new_figure()
    for label, rr in rows.items():
        if reducer is None:
            xs, ys = figures.series(rr, probe, name, layer="", x="step")
        else:
            xs, ys = reducer(rr, probe, name)
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=f"{label} run")
    figures.mark_events(ax, events, x="step")
    figures.integer_ticks(ax)
    return figures.finish_axes(ax, title, "optimizer step", ylabel, logy)


def _last_profile_fig(rows, probe, name, title, ylabel, logy=True, labels=None):
    fig, ax = figures.new_figure()
    ticks = []
    for label, rr in rows.items():
        sel = [r for r in rr if r["probe"] == probe and r["name"] == name]
        if not sel:
            continue
        last_step = sel[-1]["step"]
        prof = [r for r in sel if r["step"] == last_step]
        ax.plot(range(len(prof)), [r["value"] for r in prof], marker=".", label=f"{label} run (step {last_step})")
        if len(prof) > len(ticks):
            ticks = [figures.relabel(r["layer"], labels) for r in prof]
    if 0 < len(ticks) <= 16:  # name the layers when they fit under the axis
        ax.set_xticks(range(len(ticks)), ticks, rotation=45, ha="right", fontsize=7)
    return figures.finish_axes(ax, title, "measured layer (forward order: input side first)", ylabel, logy)


def _table(rows, probe, labels=None):
    out = []
    for label, rr in rows.items():
        for r in rr:
            if r["probe"] == probe:
                out.append({"run": label, "step": r["step"], "epoch": r["epoch"],
                            "layer": figures.relabel(r["layer"], labels), "module": r["layer"], "name": r["name"],
                            "value": r["value"]})
    return out


def _per_run_layer_figures(rows, events, probe, name, stem, title, ylabel, caption, logy=True,
                           labels=None) -> list[Figure]:
    """One per-layer time-series figure per run that has rows of ``probe``/``name``, side by side comparable: the
    panels share their y-range, and each marks every run's teleport (a run's own teleport dashed, another run's
    dotted, "teleport in the <run> run")."""
    runs = [label for label, rr in rows.items() if any(r["probe"] == probe and r["name"] == name for r in rr)]
    figs = []
    for label in runs:
        fig = figures.per_layer(rows[label], probe, name, f"{title} ({label} run)", ylabel, logy=logy,
                                events={label: events.get(label, [])}, labels=labels)
        for other in runs:
            if other != label:
                figures.mark_events(fig.axes[0], {other: events.get(other, [])}, x="step",
                                    label=f"teleport in the {other} run", style=":")
        figs.append(fig)
    if len(figs) > 1:  # one y-range for all panels: the same height means the same value
        lows, highs = zip(*(f.axes[0].get_ylim() for f in figs))
        for f in figs:
            f.axes[0].set_ylim(min(lows), max(highs))
            if f.axes[0].get_legend_handles_labels()[0]:
                f.axes[0].legend(fontsize=6, ncol=2)
    return [Figure(f"{stem}_{label}", fig, f"{caption} ({label} run; the panels share their y-axis)")
            for label, fig in zip(runs, figs)]


# Which direction of each conditioning metric went with better training in seed 004 (notes §3.2, the thesis's
# figure captions), shown on its plot; coherence has none.
CONDITIONING_DIRECTION = {
    "coherence": "neither direction is better: seed 004 (Figs 3.19-3.20) saw extreme values either way with poor "
                 "training",
    "step_consistency": "lower is better: in seed 004 (Figs 2.5-2.6) networks with excessively high values failed to "
                        "converge",
    "relative_rank_weight": "lower is better: in seed 004 (Figs 3.7-3.8) networks measuring high never learned "
                            "appreciably",
    "relative_rank_input": "lower is better: in seed 004 (§4.2.1) networks above 0.15 at initialisation mostly failed "
                           "to converge",
}


def _noise_fig(rows, events):
    """B_simple over training (finite points), with the global batch size in use as a dashed line: above the line
    the batch is smaller than the critical batch (noise-dominated steps); far below it, larger than useful."""
    fig, ax = figures.new_figure()
    for label, rr in rows.items():
        pts = [(r["step"], r["value"]) for r in rr if r["probe"] == "noise_scale" and r["name"] == "b_simple"
               and r["value"] == r["value"] and r["value"] > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=f"B_simple, {label} run")
        bs = [(r["step"], r["value"]) for r in rr if r["probe"] == "noise_scale" and r["name"] == "batch_size"]
        if bs:
            ax.plot(*zip(*bs), ls="--", color="grey", label=f"batch size in use, {label} run")
    figures.mark_events(ax, events, x="step")
    return figures.finish_axes(ax, "Gradient noise scale over training", "optimizer step", "samples", logy=True)


def noise_finding(rows: list[dict]) -> str | None:
    """One sentence comparing the last B_simple estimates with the batch size in use, or None when fewer than 3
    measurements gave a positive |G|² estimate (the evidence is too thin for a statement)."""
    b = [r["value"] for r in rows if r["probe"] == "noise_scale" and r["name"] == "b_simple"]
    ok = [v for v in b if v == v and v > 0]
    bs = [r["value"] for r in rows if r["probe"] == "noise_scale" and r["name"] == "batch_size"]
    if len(ok) < 3 or not bs:
        return None
    last = sorted(ok[-3:])[1]  # the median of the last three estimates
    batch = bs[-1]
    rel = "smaller than" if batch < 0.5 * last else "larger than" if batch > 2 * last else "close to"
    return (f"The gradient noise scale B_simple is about {last:.3g} samples (median of the last 3 of {len(b)} "
            f"measurements, {len(b) - len(ok)} without a positive |G|² estimate); the batch of {batch:g} is {rel} it"
            + ("; larger batches would still speed up training almost linearly." if rel == "smaller than" else
               "; larger batches would mostly spend more samples per step." if rel == "larger than" else "."))


def monitor_sections(rows: dict, events: dict, labels: dict | None = None) -> list[Section]:
    sections = []
    if _has(rows, "grad_norm"):
        sec = Section("Gradient norms per layer", "<p>Frobenius norm of each layer's weight gradient at the "
                      "training step (no extra computation). Layers are listed input side first.</p>")
        sec.figures += _per_run_layer_figures(rows, events, "grad_norm", "grad_norm", "grad_norm",
                                              "Per-layer gradient norm", "||dL/dW||_F",
                                              "Per-layer gradient norm over training.", labels=labels)
        sec.tables.append(("gradient norms (all rows)", _table(rows, "grad_norm", labels)))
        sections.append(sec)
    if _has(rows, "weight_norm"):
        sec = Section("Weight norms and relative gradient size")
        sec.figures += _per_run_layer_figures(rows, events, "weight_norm", "grad_to_weight", "grad_to_weight",
                                              "||dW|| / ||W|| per layer", "relative gradient size",
                                              "Relative gradient size per layer (teleportation changes it layer by "
                                              "layer while keeping the function).", labels=labels)
        sec.tables.append(("weight norms", _table(rows, "weight_norm", labels)))
        sections.append(sec)
    if _has(rows, "gsc"):
        sec = Section("Gradient scale coefficient (GSC)", "<p>GSC(l, 0) = ||J_l||_qm ||f_l|| / ||f_0|| (seed 003, "
                      "Def. 2): how much a relative change of layer l's output changes the loss. A GSC that grows "
                      "exponentially towards the input side means exploding gradients.</p>")
        sec.figures.append(Figure("gsc_over_time", _line_fig(rows, "gsc", "gsc", "GSC at the lowest layer over training",
                                                             "GSC(L, 0)", events, logy=True, reducer=_lowest_layer_series),
                                  "GSC of the lowest measured layer, over training."))
        sec.figures.append(Figure("gsc_profile", _last_profile_fig(rows, "gsc", "gsc", "GSC profile (last measurement)",
                                                                   "GSC(l, 0)", labels=labels),
                                  "GSC at every measured layer."))
        if _has(rows, "gsc", "explosion_rate"):
            sec.figures.append(Figure("explosion_rate", _line_fig(rows, "gsc", "explosion_rate",
                                                                  "Fitted explosion rate per linear layer",
                                                                  "rate r (GSC growth per layer)", events),
                                      "Rate r of log GSC(l, 0) vs linear-layer index; r > 1 means explosion. The summary "
                                      "gives a verdict only from a fit through at least 3 layers."))
        sec.tables.append(("GSC rows", _table(rows, "gsc", labels)))
        sections.append(sec)
    if _has(rows, "domain"):
        sec = Section("Domain statistics", "<p>Pre-activation standard deviation and sign diversity per nonlinearity "
                      "(seed 003 §I.2): a collapsing domain shows as a falling sign diversity.</p>")
        sec.figures += _per_run_layer_figures(rows, events, "domain", "sign_diversity", "sign_diversity",
                                              "Sign diversity per nonlinearity", "sign diversity",
                                              "0.5 = balanced signs; 0 = collapsed domain.", logy=False,
                                              labels=labels)
        sec.tables.append(("domain rows", _table(rows, "domain", labels)))
        sections.append(sec)
    if _has(rows, "update_size"):
        sec = Section("Relative update size", "<p>||W_after - W_before||_F / ||W_before||_F of the optimizer step, per "
                      "layer: how far each step moves a layer relative to its size.</p>")
        sec.figures += _per_run_layer_figures(rows, events, "update_size", "update_to_weight", "update_to_weight",
                                              "Relative update size per layer", "||dW|| / ||W|| of the step",
                                              "Relative update size per layer over training.", labels=labels)
        sec.tables.append(("update size rows", _table(rows, "update_size", labels)))
        sections.append(sec)
    if _has(rows, "noise_scale"):
        text = ("<p>The simple gradient noise scale B_simple = tr(&Sigma;)/|G|&sup2; (McCandlish et al. 2018), an "
                "estimate of the critical batch size, beside the batch size in use. Points where the |G|&sup2; "
                "estimate was not positive (the gradient lost in the noise) are left out of the figure.</p>")
        found = [f for f in (noise_finding(rr) for rr in rows.values()) if f]
        if found:
            text += "<div class='finding'>" + " ".join(html.escape(f) for f in found) + "</div>"
        sec = Section("Gradient noise scale", text)
        sec.figures.append(Figure("noise_scale", _noise_fig(rows, events),
                                  "B_simple over training (log scale) and the batch size in use (dashed)."))
        sec.tables.append(("noise scale rows", _table(rows, "noise_scale")))
        sections.append(sec)
    if _has(rows, "conditioning"):
        names = sorted({r["name"] for rr in rows.values() for r in rr if r["probe"] == "conditioning"})
        sec = Section("Gradient conditioning", "<p>Seed 004's metrics on a fixed probe batch: gradient coherence "
                      "(eq. 3.26), step-consistency (eq. 2.24), relative weight-gradient rank (Def. 3.7).</p>")
        for n in names:
            direction = CONDITIONING_DIRECTION.get(n)
            short = direction.split(":")[0] if direction else None
            title = n.replace("_", " ") + (f"\n({short})" if short else "")
            sec.figures.append(Figure(f"conditioning_{n}", _line_fig(rows, "conditioning", n, title,
                                                                     n.replace("_", " "), events),
                                      f"{n.replace('_', ' ')} over training" + (f"; {direction}." if direction
                                                                                  else ".")))
        sec.tables.append(("conditioning rows", _table(rows, "conditioning")))
        sections.append(sec)
    failures = [e for evs in events.values() for e in evs if e.get("kind") == "probe_failed"]
    unavailable = [e for evs in events.values() for e in evs if e.get("kind") == "probe_unavailable"]
    if unavailable:
        sections.append(Section("Probes not run under the distributed strategy", "<ul>" + "".join(
            f"<li>{html.escape(e['probe'])} ({html.escape(str(e.get('strategy', '')))}): not run because "
            f"{html.escape(e['reason'])}.</li>" for e in unavailable) + "</ul>"))
    if _has(rows, "monitor") or failures:  # timing rows may live in timings.csv: failures alone still get a section
        text = "<p>Measurements skipped to stay within the time budget, and probes that failed (the summary at the " \
               "top says what was measured and the share of training time it took).</p>"
        if failures:
            text += "<div class='finding'><b>Probe failures</b> (training continued):<ul>" + "".join(
                f"<li>{html.escape(e['probe'])} at step {e['step']}: {html.escape(e['error'])}</li>" for e in failures) + "</ul></div>"
        sec = Section("Monitor overhead", text)
        sec.tables.append(("monitor rows", _table(rows, "monitor")))
        sections.append(sec)
    return sections


