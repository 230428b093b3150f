"""Figures from long-format metric rows (step, epoch, probe, layer, name, value). Each returns a matplotlib Figure.

Every figure is built with the object-oriented API (``matplotlib.figure.Figure`` drawn by ``FigureCanvasAgg``):
nothing here calls ``matplotlib.use`` or ``pyplot``, so building a report never switches the backend of the
user's process (a notebook's inline backend stays as it was) and no figure is registered with pyplot.
"""

from __future__ import annotations

from collections import defaultdict


def new_figure(figsize=(5.2, 3.6), nrows: int = 1, ncols: int = 1, layout: str = "constrained", **subplot_kw):
    """``(Figure, axes)`` like ``pyplot.subplots`` but on an Agg canvas owned by the figure (no global state).

    The figure lays itself out when drawn (``constrained`` by default) so titles and axis labels are never clipped.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)  # the canvas attaches itself to fig: savefig renders with Agg whatever the backend is
    axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes


class _ObjectPyplot:
    """The few ``pyplot`` calls the plotting code of gradcond uses, on figures that never touch pyplot's state.

    ``subplots`` returns an Agg-backed :class:`~matplotlib.figure.Figure`; ``close`` has nothing to release (the
    figure is not registered with pyplot and is freed with its last reference); ``get_cmap`` reads the registry.
    """

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, figsize=None, **kw):
        import matplotlib

        # tight layout: the callers' figures were designed for (and call) tight_layout
        return new_figure(figsize or matplotlib.rcParams["figure.figsize"], nrows, ncols, layout="tight", **kw)

    @staticmethod
    def close(fig=None) -> None:
        return None

    @staticmethod
    def get_cmap(name: str):
        import matplotlib

        return matplotlib.colormaps[name]


def object_pyplot() -> _ObjectPyplot:
    """A ``pyplot`` stand-in without global side effects, for plotting code written against pyplot (the
    reproductions): ``object_pyplot().subplots(...)`` returns an Agg-backed figure; the process-wide backend and
    pyplot's figure registry are never touched."""
    return _ObjectPyplot()


def module_label(name: str, cls: str, ordinal: int) -> str:
    """Readable label of a module: ``Linear 2`` for a bare Sequential index (``"2"``, ``"3.0"``), where the
    number counts modules of that class in forward order; ``features.3 (Conv2d)`` when only the last part is an
    index; the class name for the model itself; the name itself otherwise (``encoder.fc1``)."""
    if name in ("", "<root>"):  # the model itself (a bare nn.Linear model logs its weight under "<root>")
        return cls
    parts = name.split(".")
    if all(p.isdigit() for p in parts):
        return f"{cls} {ordinal}"
    if parts[-1].isdigit():
        return f"{name} ({cls})"
    return name


def layer_labels(model) -> dict[str, str]:
    """Map every module name of ``model`` (``named_modules()``; ``"<root>"`` for the model itself) to its
    :func:`module_label`. ``model`` may also be a list of ``(module name, class name)`` pairs in
    ``named_modules()`` order. Presentation only: metrics keep the module names they were logged with."""
    pairs = ([(n, type(m).__name__) for n, m in model.named_modules()] if hasattr(model, "named_modules")
             else list(model))
    counts: dict[str, int] = defaultdict(int)
    out = {}
    for name, cls in pairs:
        name = "" if name == "<root>" else name
        counts[cls] += 1
        out[name or "<root>"] = module_label(name, cls, counts[cls])
    return out


def relabel(layer: str, labels: dict[str, str] | None) -> str:
    """The display label of a logged layer name (unchanged when it is not in ``labels``)."""
    if not labels:
        return layer
    return labels.get(layer, layer)


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
    return ax.figure


def curves(runs: dict[str, list[dict]], specs: list[tuple[str, str, str]], title: str, ylabel: str, x: str = "epoch",
           logy: bool = False, events: dict[str, list[dict]] | None = None):
    """One axis with a line per (run, spec); ``specs`` are (probe, name, label). Teleport events are marked."""
    fig, ax = new_figure()
    for run_label, rows in runs.items():
        for probe, name, label in specs:
            xs, ys = series(rows, probe, name, x=x)
            if xs:
                ax.plot([v + (1 if x == "epoch" else 0) for v in xs], ys, marker="o" if len(xs) < 30 else None,
                        ms=3, label=f"{label} ({run_label} run)" if len(runs) > 1 else label)
    mark_events(ax, events, x)
    if x == "epoch":
        integer_ticks(ax)
    return finish_axes(ax, title, "epochs completed" if x == "epoch" else "optimizer step", ylabel, logy)


def integer_ticks(ax) -> None:
    """Whole numbers only on the x axis (epochs and steps are counts: no "2.5 epochs completed")."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def mark_events(ax, events: dict[str, list[dict]] | None, x: str = "epoch", kind: str = "teleport",
                label: str | None = None, style: str = "--") -> None:
    """Vertical dashed lines at each event of ``kind``, labelled once in the legend.

    On an epoch axis (x = epochs completed) an event logged with 0-based ``epoch`` e fired at the start of that
    epoch, i.e. after e completed epochs: its line is at x = e. On a step axis it is at the event's step.
    """
    if not events:
        return
    first = True
    for evs in events.values():
        for e in evs:
            if e.get("kind") != kind:
                continue
            pos = e["step"] if x == "step" else e["epoch"]
            ax.axvline(pos, color="crimson", ls=style, lw=1, label=(label or kind) if first else None)
            first = False


def per_layer(rows: list[dict], probe: str, name: str, title: str, ylabel: str, x: str = "step", logy: bool = True,
              events: dict[str, list[dict]] | None = None, max_layers: int = 12, labels: dict[str, str] | None = None):
    """One line per layer of probe/name over time; ``labels`` maps logged layer names to display labels."""
    import matplotlib

    by_layer = defaultdict(lambda: ([], []))
    for r in rows:
        if r["probe"] == probe and r["name"] == name:
            by_layer[r["layer"]][0].append(r[x])
            by_layer[r["layer"]][1].append(r["value"])
    fig, ax = new_figure()
    layers = list(by_layer)
    if len(layers) > max_layers:  # keep the plot readable: evenly spaced layers, first and last included
        idx = sorted({round(i * (len(layers) - 1) / (max_layers - 1)) for i in range(max_layers)})
        layers = [layers[i] for i in idx]
    cmap = matplotlib.colormaps["viridis"]
    for i, layer in enumerate(layers):
        xs, ys = by_layer[layer]
        ax.plot(xs, ys, color=cmap(i / max(1, len(layers) - 1)), label=relabel(layer, labels), lw=1.2)
    mark_events(ax, events, x)
    integer_ticks(ax)
    return finish_axes(ax, title, "optimizer step" if x == "step" else "epoch", ylabel, logy, fontsize=6)
