"""Seed 002 (Øland), ch. 5 -- representation diagnostics and k-filtering, reproduced at laptop scale.

* ``checkerboard-conundrum`` (§5.4.2, Figs. 5.15-5.16): backprop + SGD on 5,000 noise-free points of an 8x8 board
  is stuck near 51-53 %; after k-filtering an MLP "can be fitted to arbitrary precision".
* ``lsd-depth`` (§5.3.2, Fig. 5.6): the least-squares distance LSD(Z_i, Y) falls with depth in a trained MLP.
* ``selection-entropy-depth`` (§5.5.4, Fig. 5.21 and the table of §5.5): H(Y | Z_i) falls with depth after training.

Every row states the source's value, ours, and the criterion it is judged by; a claim that does not hold at our
scale says "no".  Training goes through :func:`gradcond.train.fit`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from .registry import Row, register


def _fit(model, X, y, *, epochs, lr, seed, optimizer="momentum", batch_size=32, loss="cross_entropy"):
    from ..train import fit

    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True, generator=g)
    with torch.random.fork_rng(devices=[]):
        return fit(model, loader, loss=loss, optimizer=optimizer, lr=lr, epochs=epochs, seed=seed)


def _mlp(*args, seed: int, **kw):
    """``zoo.mlp`` with its default (PyTorch) initialisation drawn from ``seed``; the caller's global RNG is left as
    it was (the default init reads the global generator, so without this the result would depend on what ran
    before in the process)."""
    from .. import zoo

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return zoo.mlp(*args, seed=seed, **kw)


@torch.no_grad()
def _accuracy(model, X, y) -> float:
    was = model.training
    model.eval()
    try:
        return float((model(X).argmax(1) == y).double().mean())
    finally:
        model.train(was)


def _input_gradients(model, X, y) -> torch.Tensor:
    """Per-sample dL/dx of the cross-entropy (the source's Fig. 5.16 "error gradients in input space")."""
    x = X.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return g


@register(
    "checkerboard-conundrum",
    claim="On 5,000 noise-free points of an 8x8 checkerboard, backprop + SGD gets stuck near 51-53 % accuracy; "
          "after k-filtering the data an MLP can be fitted to arbitrary precision.",
    source="seed 002, §5.4.2, Figs. 5.15-5.16",
)
def checkerboard(quick: bool, out_dir: Path) -> list[Row]:
    from .. import data
    from ..report.figures import object_pyplot as _plt
    from ..train import k_filter

    epochs = 30 if quick else 200
    k = 10
    b = data.load_dataset("checkerboard", seed=0, dtype=torch.float32)
    X = torch.cat([b.train.tensors[0], b.test.tensors[0]])  # all 5,000 points: a memorisation task
    y = torch.cat([b.train.tensors[1], b.test.tensors[1]])
    keep = k_filter(X, y, k)
    # The source: stuck "no matter what we tried" (settings, optimizers), fitted after k-filtering.  We try the same
    # small grid on both data sets: the full board must be stuck under every setting, the filtered one fitted
    # under at least one.
    settings = [("momentum", 0.1), ("momentum", 0.01), ("adam", 1e-3)]
    proto = f"MLP 2-128-128-2 ReLU, batch 32, {epochs} epochs; SGD momentum 0.9 lr 0.1 / 0.01, Adam lr 1e-3"
    accs: dict[str, list[tuple[float, float]]] = {"full": [], "k-filtered": []}
    models = {}
    for name, (Xt, yt) in {"full": (X, y), "k-filtered": (X[keep], y[keep])}.items():
        best = -1.0
        for opt, lr in settings:
            model = _mlp(2, 2, depth=3, width=128, seed=0)
            hist = _fit(model, Xt, yt, epochs=epochs, lr=lr, seed=0, optimizer=opt)
            accs[name].append((_accuracy(model, X, y), hist.rows[-1]["train_acc"]))
            if accs[name][-1][0] > best:
                best, models[name] = accs[name][-1][0], model

    def listing(name):
        return "; ".join(f"{o} lr {lr:g}: {100 * a:.1f} %" for (o, lr), (a, _) in zip(settings, accs[name]))

    full = [a for a, _ in accs["full"]]
    filt = [a for a, _ in accs["k-filtered"]]
    rows = [
        Row(claim=f"backprop on the full board is stuck under every setting tried ({proto})",
            source="seed 002 §5.4.2, Fig. 5.16",
            paper="51-53 % accuracy",
            criterion="accuracy on all 5,000 points in [45 %, 60 %] for every setting tried",
            tolerance="about 7 pp either side of the source's 51-53 %: chance is 50 %, a fit would be > 90 %",
            ours=listing("full") + " (on all points)",
            holds=all(0.45 <= a <= 0.60 for a in full), data={"accuracy": full}),
        Row(claim=f"after k-filtering (k = {k}, input space: {int(keep.sum())} of {len(y)} points kept) the same "
                  "MLP fits the board under some setting tried",
            source="seed 002 §5.4.2 (text after Fig. 5.16)",
            paper="fits 'to arbitrary precision'",
            criterion="accuracy on all 5,000 points >= 99 % for at least one setting tried",
            tolerance="1 pp below 100 %, fixed before the run",
            ours=listing("k-filtered") + " (on all points)",
            holds=max(filt) >= 0.99, data={"accuracy": filt, "kept": int(keep.sum()), "k": k}),
    ]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, (name, model) in zip(axes, models.items()):
        Xs, ys = (X, y) if name == "full" else (X[keep], y[keep])
        g = _input_gradients(model, Xs, ys)
        ax.scatter(Xs[:, 0], Xs[:, 1], c=ys, s=2, cmap="coolwarm", alpha=0.4)
        gmax = float(g.norm(dim=1).max())
        if gmax > 0:  # a dead network has no gradient field to draw
            ax.quiver(Xs[:, 0], Xs[:, 1], -g[:, 0], -g[:, 1], angles="xy", width=0.002, scale=40 * gmax)
        ax.set_title(f"{name} (best setting): -dL/dx in input space ({100 * max(a for a, _ in accs[name]):.1f} %)",
                     fontsize=9)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(out_dir / "checkerboard_gradient_field.png", dpi=110)
    plt.close(fig)
    return rows


def _digits_mlp(quick: bool, widths, epochs_full: int, seed: int = 0):
    from .. import data

    b = data.load_dataset("digits", seed=seed, dtype=torch.float64)
    X, y = b.train.tensors
    model = _mlp(64, 10, depth=len(widths) + 1, width=list(widths), seed=seed).double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    epochs = 15 if quick else epochs_full
    _fit(model, X, y, epochs=epochs, lr=0.05, seed=seed)
    return b, model, init, epochs


@torch.no_grad()
def _layer_outputs(model, X) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(pre-activations, post-activations) of every Linear layer of a ``zoo.mlp`` (the last has no activation)."""
    pre, post, h = [], [], X
    for m in model:
        h = m(h)
        if isinstance(m, torch.nn.Linear):
            pre.append(h)
            post.append(h)
        else:
            post[-1] = h
    return pre, post


@register(
    "lsd-depth",
    claim="In a trained MLP the least-squares distance LSD_i = (1/m)||Y - Z_i Z_i^+ Y||_F^2 from each layer's "
          "representation to the targets falls monotonically with depth (gradual linearization).",
    source="seed 002, §5.3.2, eq. 5.3, Fig. 5.6 (784-392-196-50-10 MLP on MNIST)",
)
def lsd_depth(quick: bool, out_dir: Path) -> list[Row]:
    from ..probes.representation import least_squares_distance
    from ..report.figures import object_pyplot as _plt

    widths = (128, 64, 32)
    seeds = (0,) if quick else (0, 1, 2)
    rows, curves = [], {}
    for seed in seeds:
        b, model, init, epochs = _digits_mlp(quick, widths, 60, seed)
        X, y = b.train.tensors
        for when, state in (("init", init), ("trained", {k: v.clone() for k, v in model.state_dict().items()})):
            model.load_state_dict(state)
            _, post = _layer_outputs(model, X)
            reps = [X] + post[:-1]  # input and the hidden layers (post-activation)
            curves[(seed, when)] = [least_squares_distance(Z, y, bias=True) for Z in reps]
        lsd = curves[(seed, "trained")]
        mono = all(a > b_ for a, b_ in zip(lsd, lsd[1:]))
        rows.append(Row(
            claim=f"digits MLP 64-{'-'.join(map(str, widths))}-10 ReLU, seed {seed}, {epochs} epochs: LSD falls "
                  "with depth (input, hidden 1..3)",
            source="seed 002 §5.3.2, eq. 5.3, Fig. 5.6",
            paper="monotone decrease with depth (no numbers given)",
            criterion="LSD strictly decreasing from the input through hidden layers 1..3",
            tolerance="strict monotonicity (ordering claim)",
            ours="LSD = " + ", ".join(f"{v:.4f}" for v in lsd) + f" (at init: "
                 + ", ".join(f"{v:.4f}" for v in curves[(seed, 'init')]) + ")",
            holds=mono, data={"trained": lsd, "init": curves[(seed, "init")]}))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (seed, when), v in curves.items():
        ax.plot(range(len(v)), v, "o-" if when == "trained" else "x--", label=f"seed {seed}, {when}")
    ax.set_xticks(range(len(widths) + 1), ["X"] + [f"Z{i + 1}" for i in range(len(widths))])
    ax.set_ylabel("LSD (bias column included)")
    ax.set_title("Least-squares distance to the targets vs depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "lsd_depth.png", dpi=110)
    plt.close(fig)
    return rows


@register(
    "selection-entropy-depth",
    claim="After training, the layer-wise conditional entropy H(Y | Z_i) (mean over a layer's features of the "
          "entropy of the class histogram of the samples a ReLU feature selects) falls with depth.",
    source="seed 002, §5.5.4, Figs. 5.18-5.20 (784-300-50-10 MLP on MNIST, first feature per layer, 5 epochs: "
           "3.26->3.12, 3.26->2.55, 3.03->0.09 bits) and Fig. 5.21",
)
def selection_entropy_depth(quick: bool, out_dir: Path) -> list[Row]:
    from ..probes.representation import selection_entropy
    from ..report.figures import object_pyplot as _plt

    widths = (300, 50)
    b, model, init, epochs = _digits_mlp(quick, widths, 30)
    X, y = b.train.tensors
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    res = {}
    for when, state in (("init", init), ("trained", trained)):
        model.load_state_dict(state)
        pre, _ = _layer_outputs(model, X)
        res[when] = [selection_entropy(a, y, "relu") for a in pre]
    src_start, src_end = (3.26, 3.26, 3.03), (3.12, 2.55, 0.09)
    rows = []
    means = [r.mean for r in res["trained"]]
    first = [float(r.per_feature[0]) for r in res["trained"]]
    first0 = [float(r.per_feature[0]) for r in res["init"]]
    rows.append(Row(
        claim=f"digits MLP 64-300-50-10 ReLU, {epochs} epochs: layer-mean H(Y|Z_i) after training falls with depth "
              "(layers 1, 2, 3 = output pre-activations)",
        source="seed 002 §5.5.4, Figs. 5.18-5.20 (text) and Fig. 5.21",
        paper=f"first feature per layer after 5 epochs: {', '.join(map(str, src_end))} bits (max log2 10 = "
              f"{math.log2(10):.2f})",
        criterion="layer-mean H(Y|Z_i) after training strictly decreasing with depth",
        tolerance="strict monotonicity (ordering claim)",
        ours="layer means " + ", ".join(f"{v:.2f}" for v in means) + " bits (at init: "
             + ", ".join(f"{r.mean:.2f}" for r in res["init"]) + ")",
        holds=all(a > b_ for a, b_ in zip(means, means[1:])),
        data={"trained_mean": means, "init_mean": [r.mean for r in res["init"]]}))
    drops = [a.mean - t.mean for a, t in zip(res["init"], res["trained"])]
    src_drops = [round(a - t, 2) for a, t in zip(src_start, src_end)]
    rows.append(Row(
        claim="training lowers H(Y|Z_i) most in the top layer (the drop grows with depth)",
        source="seed 002 §5.5.4, Figs. 5.18-5.20 (text)",
        paper=f"drops {', '.join(map(str, src_drops))} bits for layers 1-3 (first feature)",
        criterion="layer-mean drop of H(Y|Z_i) from init to trained strictly increasing with depth",
        tolerance="strict monotonicity (ordering claim)",
        ours="drops " + ", ".join(f"{d:.2f}" for d in drops) + " bits (first feature: "
             + ", ".join(f"{a:.2f}->{t:.2f}" for a, t in zip(first0, first)) + ")",
        holds=all(a < b_ for a, b_ in zip(drops, drops[1:])),
        data={"drops": drops, "first_feature_init": first0, "first_feature_trained": first}))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for when, rs in res.items():
        ax.plot([1, 2, 3], [r.mean for r in rs], "o-", label=when)
    ax.set_xticks([1, 2, 3])
    ax.set_xlabel("layer")
    ax.set_ylabel("H(Y|Z) (bits)")
    ax.set_title("Selection entropy vs depth")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "selection_entropy_depth.png", dpi=110)
    plt.close(fig)
    return rows


# source Table 5.1, vanilla CNN-4 on MNIST: test accuracy % (fraction of the data kept)
_TABLE_5_1_MNIST = {"baseline": "99.54 (100 %)", "k*": "k = 24: 99.55 (57 %)", 5: "97.17 (18 %)",
                    10: "99.43 (34 %)", 20: "99.50 (53 %)"}


@register(
    "kfilter-tradeoff",
    claim="MNIST-family data are so redundant that 30-60 % of the training samples can be k-filtered away before "
          "training without significantly lowering the test accuracy.",
    source="seed 002, §5.4.1, Table 5.1 (CNN-4 and VGG-13 on MNIST, FashionMNIST, KMNIST)",
)
def kfilter_tradeoff(quick: bool, out_dir: Path) -> list[Row]:
    import statistics

    from .. import data
    from ..report.figures import object_pyplot as _plt
    from ..train import k_filter

    ks = (5, 10, 20) if quick else (3, 5, 10, 20, 30, 50)
    seeds = (0,) if quick else (0, 1, 2)
    epochs = 15 if quick else 40
    rows: list[Row] = []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for dataset in ("digits", "mnist1d"):
        b = data.load_dataset(dataset, seed=0)
        X, y = b.train.tensors
        Xte, yte = b.test.tensors
        dim = X.shape[1]
        keeps = {None: torch.ones(len(y), dtype=torch.bool)}
        for k in ks:
            try:
                keeps[k] = k_filter(X, y, k)
            except ValueError:  # a class with fewer than k + 1 samples: this k is not applicable
                continue
        acc = {}
        for k, keep in keeps.items():
            vals = []
            for seed in seeds:
                model = _mlp(dim, 10, depth=3, width=[128, 64], seed=seed)
                _fit(model, X[keep], y[keep], epochs=epochs, lr=0.05, seed=seed)
                vals.append(_accuracy(model, Xte, yte))
            acc[k] = statistics.median(vals)
        base = acc[None]
        best = max((k for k in keeps if k is not None), key=lambda k: (acc[k], -k))
        setup = f"{dataset} MLP {dim}-128-64-10, {epochs} epochs, median of {len(seeds)} seed(s), input-space k-filter"
        for k in [k for k in ks if k in keeps] + ["best"]:
            kk = best if k == "best" else k
            src = _TABLE_5_1_MNIST.get("k*" if k == "best" else k, f"k = {kk} not in the table")
            rows.append(Row(
                claim=f"{setup}: test accuracy with k = {kk}{' (best k)' if k == 'best' else ''}",
                source="seed 002 §5.4.1, Table 5.1 (MNIST CNN-4)",
                paper=f"{src} vs baseline {_TABLE_5_1_MNIST['baseline']}",
                criterion="reported, not judged (different architecture and data set)",
                ours=f"{100 * acc[kk]:.2f} % ({100 * float(keeps[kk].double().mean()):.0f} % kept) vs baseline "
                     f"{100 * base:.2f} %",
                holds=None, data={"k": kk, "accuracy": acc[kk], "kept": float(keeps[kk].double().mean())}))
        ok = [k for k in keeps if k is not None and float(keeps[k].double().mean()) <= 0.7 and acc[k] >= base - 0.005]
        rows.append(Row(
            claim=f"{setup}: at least 30 % of the training data can be removed at no loss",
            source="seed 002 §5.4, §5.4.1, Table 5.1",
            paper="30-60 % removable 'without significantly impacting' accuracy",
            criterion="some k keeps <= 70 % of the training set and loses <= 0.5 pp of test accuracy vs the baseline",
            tolerance="0.5 pp: the size of the source's own Table 5.1 differences it calls insignificant; fixed before "
                      "the run",
            ours=("k = " + ", ".join(map(str, ok)) + " qualif" + ("ies" if len(ok) == 1 else "y")) if ok else
                 "no k qualifies: " + "; ".join(f"k = {k}: {100 * acc[k]:.2f} % with "
                                                 f"{100 * float(keeps[k].double().mean()):.0f} % kept"
                                                 for k in keeps if k is not None) + f" (baseline {100 * base:.2f} %)",
            holds=bool(ok), data={"baseline": base, "accuracy": {str(k): v for k, v in acc.items()}}))
        pts = sorted((float(keeps[k].double().mean()), acc[k]) for k in keeps if k is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{dataset} (k-filtered)")
        ax.axhline(base, ls="--", color=ax.lines[-1].get_color(), lw=0.8)
    ax.set_xlabel("fraction of the training set kept")
    ax.set_ylabel("test accuracy")
    ax.set_title("k-filtering: accuracy vs data kept (dashed: baseline)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "kfilter_tradeoff.png", dpi=110)
    plt.close(fig)
    return rows
