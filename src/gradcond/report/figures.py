"""Figures from long-format metric rows (step, epoch, probe, layer, name, value). Each returns a matplotlib Figure."""

from __future__ import annotations

from collections import defaultdict


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(rows: list[dict], probe: str, name: str, layer: str | None = None, x: str = "epoch"):
    """(xs, ys) of the rows with this probe/name (and layer, when given), in row order."""
    xs, ys = [], []
    for r in rows:
        if r["probe"] == probe and r["name"] == name and (layer is None or r["layer"] == layer):
            xs.append(r[x])
            ys.append(r["value"])
    return xs, ys


def finish_axes(ax, title: str, xlabel: str, ylabel: str, logy: bool = False, legend: bool = True, fontsize: int = 8):
    """Title, axis labels, optional log scale, grid and legend: the common finish of every time-series plot."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, ncol=2 if fontsize < 8 else 1)
    ax.figure.tight_layout()
    return ax.figure


def curves(runs: dict[str, list[dict]], specs: list[tuple[str, str, str]], title: str, ylabel: str, x: str = "epoch",
           logy: bool = False, events: dict[str, list[dict]] | None = None):
    """One axis with a line per (run, spec); ``specs`` are (probe, name, label). Teleport events are marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for run_label, rows in runs.items():
        for probe, name, label in specs:
            xs, ys = series(rows, probe, name, x=x)
            if xs:
                ax.plot([v + (1 if x == "epoch" else 0) for v in xs], ys, marker="o" if len(xs) < 30 else None,
                        ms=3, label=f"{label} ({run_label})" if len(runs) > 1 else label)
    mark_events(ax, events, x)
    return finish_axes(ax, title, "epoch" if x == "epoch" else "optimizer step", ylabel, logy)


def mark_events(ax, events: dict[str, list[dict]] | None, x: str = "epoch", kind: str = "teleport") -> None:
    """Vertical dashed lines at each event of ``kind`` (x in epochs: the event's fractional position is its epoch)."""
    if not events:
        return
    first = True
    for run_label, evs in events.items():
        for e in evs:
            if e.get("kind") != kind:
                continue
            pos = e["epoch"] + (0 if x == "epoch" else 0)
            if x == "step":
                pos = e["step"]
            ax.axvline(pos, color="crimson", ls="--", lw=1, label=f"{kind} ({run_label})" if first else None)
            first = False


def per_layer(rows: list[dict], probe: str, name: str, title: str, ylabel: str, x: str = "step", logy: bool = True,
              events: dict[str, list[dict]] | None = None, max_layers: int = 12):
    """One line per layer of probe/name over time."""
    plt = _plt()
    by_layer = defaultdict(lambda: ([], []))
    for r in rows:
        if r["probe"] == probe and r["name"] == name:
            by_layer[r["layer"]][0].append(r[x])
            by_layer[r["layer"]][1].append(r["value"])
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    layers = list(by_layer)
    if len(layers) > max_layers:  # keep the plot readable: evenly spaced layers, first and last included
        idx = sorted({round(i * (len(layers) - 1) / (max_layers - 1)) for i in range(max_layers)})
        layers = [layers[i] for i in idx]
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        xs, ys = by_layer[layer]
        ax.plot(xs, ys, color=cmap(i / max(1, len(layers) - 1)), label=layer, lw=1.2)
    mark_events(ax, events, x)
    return finish_axes(ax, title, "optimizer step" if x == "step" else "epoch", ylabel, logy, fontsize=6)
