"""Seed 002 (Øland), ch. 4 -- gradient-amplifying output losses vs softmax + cross-entropy, at laptop scale.

``ga-vs-softmax``: digits and mnist1d MLPs (and a digits CNN in the full run), softmax+CE, exp-GA
(:class:`~gradcond.train.losses.SparseCrossEntropy`), pow3-GA (:class:`~gradcond.train.losses.NegCorrelationLoss`)
and linear+MSE (:class:`~gradcond.train.losses.LinearMSE`), each with its default parameters, over several seeds:
epochs to converge (the epoch of the lowest test error, the source's definition in Table 4.1), the lowest test
error, and the per-layer RMS of back-propagated error gradients (Fig. 4.3).  The source tuned the learning rate
per loss "very carefully"; the full run picks each loss's rate from a small grid on seed 0 (by test error), the
quick run uses fixed rates.  Training goes through :func:`gradcond.train.fit`.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..callbacks import Callback
from .registry import Row, register

LOSS_NAMES = {"cross_entropy": "softmax+CE", "exp_ga": "exp-GA", "pow3_ga": "pow3-GA", "linear_mse": "linear+MSE"}
QUICK_LR = {"cross_entropy": 0.05, "exp_ga": 0.05, "pow3_ga": 0.005, "linear_mse": 0.02}
LR_GRID = (0.1, 0.03, 0.01, 0.003)


class _GradRMS(Callback):
    """At every epoch end: per-layer RMS of the error gradients dL/d(layer output) on a fixed probe batch."""

    def __init__(self, X, y):
        self.X, self.y, self.per_epoch = X, y, []

    def on_epoch_end(self, state) -> None:
        from ..probes.representation import error_gradient_rms

        self.per_epoch.append(error_gradient_rms(state.model, self.X, self.y, state.loss_fn))


def _model(kind: str, dataset: str, seed: int):
    from .. import zoo

    with torch.random.fork_rng(devices=[]):  # default inits read the global RNG: seed it, then restore it
        torch.manual_seed(seed)
        if kind == "cnn":
            return zoo.simple_cnn(1, 10, channels=(16, 32), image_size=8)
        return zoo.mlp(64 if dataset == "digits" else 40, 10, depth=3, width=[128, 64], seed=seed)


def _train(kind, dataset, loss, lr, seed, epochs):
    from .. import data
    from ..train import fit

    b = data.load_dataset(dataset, form="image" if kind == "cnn" else "flat", seed=0)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(b.train, batch_size=32, shuffle=True, generator=g)
    test = DataLoader(b.test, batch_size=512)
    X, y = b.train.tensors
    rec = _GradRMS(X[:256], y[:256])
    model = _model(kind, dataset, seed)
    with torch.random.fork_rng(devices=[]):
        try:
            hist = fit(model, train, test, loss=loss, optimizer="momentum", lr=lr, epochs=epochs, seed=seed,
                       callbacks=[rec], task="classification")
        except FloatingPointError:  # diverged (or exp-GA overflow): this run counts as failed
            return None
    errs = [1 - r["test_acc"] for r in hist.rows]
    best = min(range(len(errs)), key=lambda i: (errs[i], i))
    layers = list(rec.per_epoch[-1])
    hidden = layers[:-1]
    return {"test_error": errs[best], "epochs_to_converge": best + 1, "errors": errs,
            "rms": rec.per_epoch, "hidden_rms": statistics.fmean(rec.per_epoch[-1][n] for n in hidden),
            "output_rms": rec.per_epoch[-1][layers[-1]]}


def _pick_lr(kind, dataset, loss, epochs) -> float:
    best = None
    for lr in LR_GRID:
        r = _train(kind, dataset, loss, lr, 0, epochs)
        if r is not None and (best is None or r["test_error"] < best[0]):
            best = (r["test_error"], lr)
    return best[1] if best else min(LR_GRID)


def _median(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else float("nan")


@register(
    "ga-vs-softmax",
    claim="Gradient-amplifying outputs (exp-GA, pow3-GA, linear+MSE) converge faster (25-33 % fewer epochs) and "
          "reach lower test error than softmax+CE; hidden-layer error-gradient RMS is ~10x softmax's with exp-GA and "
          ">100x with pow3-GA.",
    source="seed 002, ch. 4: Table 4.1 (MNIST MLP: linear 73.5 vs ~95-98 epochs), Table 4.2 (VGG, CIFAR-10), "
           "§4.13/§4.15 (25-33 % faster), Fig. 4.3 (10-layer CNN, CIFAR-10)",
)
def ga_vs_softmax(quick: bool, out_dir: Path) -> list[Row]:
    from ..report.figures import object_pyplot

    setups = [("mlp", "digits"), ("mlp", "mnist1d")] + ([] if quick else [("cnn", "digits")])
    seeds = (0,) if quick else (0, 1, 2, 3, 4)  # quick: one seed, a smoke test of the protocol (well under a minute)
    epochs = 10 if quick else 40
    rows: list[Row] = []
    plt = object_pyplot()
    fig, axes = plt.subplots(1, len(setups), figsize=(5 * len(setups), 3.6))
    for ax, (kind, dataset) in zip(axes if len(setups) > 1 else [axes], setups):
        res, lrs = {}, {}
        for loss in LOSS_NAMES:
            lrs[loss] = QUICK_LR[loss] if quick else _pick_lr(kind, dataset, loss, epochs)
            res[loss] = [_train(kind, dataset, loss, lrs[loss], s, epochs) for s in seeds]
        setup = (f"{dataset} {kind.upper()}, SGD momentum 0.9, batch 32, {epochs} epochs, {len(seeds)} seed"
                 + ("s" if len(seeds) > 1 else ""))
        ok = {loss: [r for r in rs if r is not None] for loss, rs in res.items()}
        med = {loss: {key: _median([r[key] for r in rs]) for key in ("test_error", "epochs_to_converge",
                                                                      "hidden_rms")} for loss, rs in ok.items()}
        sm = med["cross_entropy"]
        for loss in ("exp_ga", "pow3_ga", "linear_mse"):
            m, name = med[loss], LOSS_NAMES[loss]
            failed = len(seeds) - len(ok[loss])
            note = f" ({failed} of {len(seeds)} runs diverged)" if failed else ""
            lr_note = f"lr {lrs[loss]:g} vs softmax {lrs['cross_entropy']:g}"
            rows.append(Row(
                claim=f"{setup}: {name} converges in fewer epochs than softmax+CE",
                source="seed 002 §4.13 (Table 4.5: 33 % faster) and §4.15 (25-33 % faster)",
                paper="25-33 % fewer epochs than softmax+CE",
                criterion="median epochs-to-converge <= 0.75 x softmax+CE's (same seeds, same epoch budget)",
                tolerance="0.75: the lower end (25 %) of the source's range, fixed before the run",
                ours=f"{m['epochs_to_converge']:g} vs {sm['epochs_to_converge']:g} epochs (median; {lr_note}){note}",
                holds=bool(m["epochs_to_converge"] <= 0.75 * sm["epochs_to_converge"]),
                data={"loss": loss, "setup": setup, "lr": lrs, "median": med}))
            rows.append(Row(
                claim=f"{setup}: {name} reaches a lower test error than softmax+CE",
                source="seed 002 §4.11, Table 4.2 (VGG-13/19 on CIFAR-10) and §4.15",
                paper="consistently lower (e.g. VGG-13: 5.61/5.55/5.47 vs 5.68 %)",
                criterion="median (over seeds) lowest test error < softmax+CE's",
                tolerance="strict inequality: the source's own margins are 0.07-0.21 pp, no spread given",
                ours=f"{100 * m['test_error']:.2f} % vs {100 * sm['test_error']:.2f} %{note}",
                holds=bool(m["test_error"] < sm["test_error"]),
                data={"loss": loss, "setup": setup}))
        for loss, lo, hi, src, crit, tol in (("exp_ga", 10 / math.sqrt(10), 10 * math.sqrt(10),
                                   "~10x (10-layer CNN, CIFAR-10, exp-GA targets {0, 6}; ours the class default "
                                   "(0, 1))", "ratio within half a decade of 10, [3.2, 31.6]",
                                   "half a decade each side: the source reads the ratio off a log-scale plot"),
                                  ("pow3_ga", 100.0, math.inf, ">100x (10-layer CNN, CIFAR-10, targets {-2, 10}; ours "
                                   "the class default (0, 10))", "ratio > 100",
                                   "the source's own bound (one-sided)")):
            ratio = med[loss]["hidden_rms"] / sm["hidden_rms"]
            rows.append(Row(
                claim=f"{setup}: hidden-layer error-gradient RMS of {LOSS_NAMES[loss]} relative to softmax+CE "
                      "(last epoch, mean over hidden layers, median over seeds)",
                source="seed 002 §4.10, Fig. 4.3 (10-layer CNN, CIFAR-10)", paper=src, criterion=crit,
                tolerance=tol, ours=f"{ratio:.2f}x", holds=bool(lo <= ratio <= hi),
                data={"loss": loss, "setup": setup, "ratio": ratio}))
        for loss, rs in ok.items():
            if rs:
                hidden = list(rs[0]["rms"][0])[:-1]
                curve = [statistics.fmean(e[n] for n in hidden) for e in rs[0]["rms"]]
                ax.semilogy(range(1, len(curve) + 1), curve, "o-", ms=3, label=LOSS_NAMES[loss])
        ax.set_title(f"{dataset} {kind}: hidden error-gradient RMS")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "ga_gradient_rms.png", dpi=110)
    plt.close(fig)
    return rows
