"""Reproductions of seed 001 (teleportation with null-space gradient projection) at CPU scale.

* ``nullspace-mlp``: MLP [1024, 1024] ReLU (quick: [256, 256]) on digits and mnist1d (seed 001 Fig. 2).
* ``nullspace-cnn``: ``simple_cnn`` (16, 32, 64) on digits as 1x8x8 images, 40 warm-up steps (Fig. 3).
* ``nullspace-transformer``: small pre-LN Transformer on digits as 8 tokens of 8 features (Fig. 4).
* ``nullspace-error-control``: gradient norm and loss during teleport steps for tau in
  {1, 0.999, 0.99, 0.9} (Fig. 6b), plus the loss change per teleport of the null-space move, the
  exact symmetry action and the published first-order symmetry action side by side.

Every training entry runs each optimizer (SGD, momentum, Adagrad, Adam) with and without teleport
over 3 seeds (same seed = same init and data order for both arms) and reports: epochs for the
teleported run to reach the baseline's final training loss, final train/test loss both ways
(mean +- std over seeds), and the largest relative change of the teleport-batch loss over all
teleports with the gradient-norm gain and held-out loss change. CPU-scale settings (ours, the
source's Table 1 is illegible): teleport in the first 5 epochs (quick: 3), b = 32 (quick: 4)
batches of n samples, t = 8 steps, tau = 1, primary batch size 32.
"""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path

import torch

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.experiments.registry import Row, register
from gradcond.teleport.nullspace import NullSpaceTeleport, NullSpaceTeleportCallback
from gradcond.teleport.symmetry import SymmetryTeleport
from gradcond.train import fit

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam")
SEEDS = (0, 1, 2)
SOURCE_CURVES = "seed 001 Figs. 2-4: teleport converges faster (train and test loss), sometimes to a lower loss"


def _ms(xs) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f}+-{statistics.pstdev(xs):.3f}"


def _reach(rows_t, target) -> float | None:
    """Fractional epoch at which the train loss first reaches ``target`` (linear interpolation
    between epoch-end values, epoch 0 = before training is not known so the first epoch counts
    as reached at 1.0)."""
    prev = None
    for r in rows_t:
        cur = r["train_loss"]
        if cur <= target:
            if prev is None or prev == cur:
                return float(r["epoch"] + 1)
            return r["epoch"] + (prev - target) / (prev - cur)
        prev = cur
    return None


def _arm(build, data, opt, lr, epochs, seed, callback=None):
    torch.manual_seed(seed)
    model = build()
    tr, te = data.loaders(32, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty null spaces (input layers) are reported in the events
        h = fit(model, tr, te, optimizer=opt, lr=lr, epochs=epochs, seed=seed,
                callbacks=[callback] if callback is not None else [])
    return h


def _compare(name, build, datasets, lrs, epochs, tele_kw, cb_kw, out_dir: Path, quick: bool) -> list[Row]:
    rows: list[Row] = []
    curves = {}
    all_rel, gains, held = [], [], []
    reverted = stopped = 0
    refused: dict[str, int] = {}
    for dname, data in datasets.items():
        for opt in OPTIMIZERS:
            base, tele, reach, base_final = [], [], [], []
            for seed in SEEDS:
                hb = _arm(build, data, opt, lrs[opt], epochs, seed)
                cb = NullSpaceTeleportCallback(NullSpaceTeleport(**tele_kw), seed=seed, **cb_kw)
                ht = _arm(build, data, opt, lrs[opt], epochs, seed, cb)
                base.append(hb.rows)
                tele.append(ht.rows)
                target = hb.rows[-1]["train_loss"]
                base_final.append(target)
                reach.append(_reach(ht.rows, target))
                for res in cb.results:
                    stopped += res.stopped_by is not None
                    all_rel.append(res.max_rel_loss_change)
                    gains += [b.grad_norm_after / b.grad_norm_before for b in res.batches]
                    reverted += sum(b.reverted for b in res.batches)
                    if res.held_out_rel_change is not None:
                        held.append(res.held_out_rel_change)
                for e in ht.events:
                    if e["kind"] == "teleport_failed":
                        # non-finite values count as failures; a refusal by a default guard (issue 20:
                        # batch loss, held-out loss, weight growth) is reported next to them
                        refused[e.get("reason", "non_finite")] = refused.get(e.get("reason", "non_finite"), 0) + 1
            curves[(dname, opt)] = (base, tele)
            fb = [r[-1]["train_loss"] for r in base]
            ft = [r[-1]["train_loss"] for r in tele]
            tb = [r[-1].get("test_loss") for r in base]
            tt = [r[-1].get("test_loss") for r in tele]
            reached = [r for r in reach if r is not None]
            faster = len(reached) == len(SEEDS) and max(reached) < epochs - 0.05
            ep = ", ".join(f"{e:.2f}" for e in reached)
            if faster:
                verdict = f"faster: reached the baseline's final train loss at epoch {ep} of {epochs}"
            elif reached:
                verdict = f"reached it in {len(reached)}/{len(SEEDS)} seeds (epochs {ep} of {epochs})"
            else:
                verdict = f"never reached the baseline's final train loss in {epochs} epochs"
            rows.append(Row(
                claim=f"{name} on {dname}, {opt}: teleport speeds up training",
                source=SOURCE_CURVES,
                ours=(f"{verdict}; final train {_ms(ft)} (teleport) vs {_ms(fb)} (baseline); "
                      f"final test {_ms(tt)} vs {_ms(tb)}"),
                holds=faster,
                data={"epochs_to_reach": reach, "final_train_teleport": ft, "final_train_baseline": fb,
                      "final_test_teleport": tt, "final_test_baseline": tb, "lr": lrs[opt],
                      "epochs": epochs, "seeds": list(SEEDS)},
            ))
    finite_rel = [r for r in all_rel if math.isfinite(r)]
    n_fail = len(all_rel) - len(finite_rel) + refused.get("non_finite", 0)
    guard_refusals = {k: v for k, v in refused.items() if k != "non_finite"}
    mx = max(finite_rel) if finite_rel else float("nan")
    gmin = min(gains) if gains else float("nan")
    rows.insert(0, Row(
        claim=f"{name}: with tau = 1 each teleport keeps the teleport-batch loss (< 1e-4 relative) while the gradient norm increases",
        source="seed 001 Sec. 3 / Fig. 6b: exact null space keeps the loss constant; issue 4 Must show",
        ours=(f"max relative loss change over {len(finite_rel)} teleports: {mx:.2e}; gradient-norm gain per batch "
              f"min {gmin:.3f}, median {statistics.median(gains) if gains else float('nan'):.3f}; held-out loss change "
              f"median {statistics.median(held) if held else float('nan'):+.2e}, max |.| "
              f"{max((abs(h) for h in held), default=float('nan')):.2e}; failed (non-finite) teleports: {n_fail}; "
              f"batches whose last step was undone by the 1e-4 loss guard: {reverted} of {len(gains)}; teleports "
              f"ended early by a default guard (issue 20): {stopped} of {len(all_rel)}; teleports refused by a default "
              f"guard: {sum(guard_refusals.values())} {guard_refusals or ''}"),
        holds=bool(finite_rel) and mx < 1e-4 and gmin > 1.0 and n_fail == 0,
        data={"max_rel_loss_change": mx, "grad_gain_min": gmin, "held_out_rel_change": held, "failed": n_fail,
              "reverted_batches": reverted, "batches": len(gains), "stopped_early": stopped,
              "refused_by_guard": guard_refusals},
    ))
    _plot(name, curves, out_dir)
    return rows


def _plot(name, curves, out_dir: Path) -> None:
    try:
        import matplotlib  # noqa: F401  (optional dependency check)

        from ..report.figures import object_pyplot as _plt  # Agg-canvas figures: the process-wide backend is left alone

        plt = _plt()
    except ImportError:  # pragma: no cover
        return
    keys = list(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        base, tele = curves[key]
        for runs, lab, c in ((base, "baseline", "C0"), (tele, "teleport", "C3")):
            n = min(len(r) for r in runs)
            mean = [statistics.mean(r[i]["train_loss"] for r in runs) for i in range(n)]
            ax.plot(range(1, n + 1), mean, color=c, label=lab)
        ax.set_title(f"{key[0]} {key[1]}", fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_yscale("log")
    axes[0][0].set_ylabel("train loss")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"{name}.png", dpi=100)
    plt.close(fig)


LRS = {"sgd": 0.05, "momentum": 0.01, "adagrad": 0.01, "adam": 1e-3}


@register("nullspace-mlp", claim="Null-space teleport accelerates MLP training with SGD, momentum, Adagrad and Adam",
          source="seed 001 Sec. 4.1, Fig. 2 (MLP [1024, 1024] ReLU, MNIST/FashionMNIST)")
def run_mlp(quick: bool, out_dir: Path) -> list[Row]:
    width = 256 if quick else 1024
    datasets = {"digits": load_dataset("digits", form="flat")}
    if not quick:
        datasets["mnist1d"] = load_dataset("mnist1d")
    epochs = 8 if quick else 20

    def build_for(d):
        return lambda: zoo.mlp(in_features=d.input_shape[0], out_features=d.num_outputs, depth=3, width=width)

    rows = []
    for dname, d in datasets.items():
        rows += _compare(f"nullspace-mlp[{width}x{width}]", build_for(d), {dname: d}, LRS, epochs,
                         dict(eta=0.05, steps=8, tau=1.0, cap_ratio=3.0, max_loss_change=1e-4),
                         dict(schedule=3 if quick else 5, num_batches=4 if quick else 32, batch_size=32),
                         out_dir / dname, quick)
    return rows


@register("nullspace-cnn", claim="Null-space teleport accelerates CNN training",
          source="seed 001 Sec. 4.2, Fig. 3 (CNN [3,16,32,64] + max-pool, CIFAR-10/100; 40 warm-up steps)")
def run_cnn(quick: bool, out_dir: Path) -> list[Row]:
    d = load_dataset("digits", form="image")
    lrs = {"sgd": 0.1, "momentum": 0.02, "adagrad": 0.02, "adam": 2e-3}
    return _compare("nullspace-cnn", lambda: zoo.simple_cnn(in_channels=1, num_classes=10, image_size=8),
                    {"digits-image": d}, lrs, 8 if quick else 20,
                    dict(eta=0.02, steps=8, tau=1.0, cap_ratio=1.5, max_loss_change=1e-4),
                    dict(schedule=3 if quick else 5, num_batches=4 if quick else 32, batch_size=32, warmup_steps=40),
                    out_dir, quick)


@register("nullspace-transformer", claim="Null-space teleport accelerates Transformer training",
          source="seed 001 Sec. 4.3, Fig. 4 (2-layer Transformer on sequential MNIST)")
def run_transformer(quick: bool, out_dir: Path) -> list[Row]:
    d = load_dataset("digits", form="sequence")
    lrs = {"sgd": 0.05, "momentum": 0.01, "adagrad": 0.01, "adam": 1e-3}
    return _compare("nullspace-transformer",
                    lambda: zoo.transformer(in_features=8, seq_len=8, d_model=64, nhead=2, num_layers=2, dim_ff=128),
                    {"digits-seq": d}, lrs, 6 if quick else 20,
                    dict(eta=0.02, steps=8, tau=1.0, cap_ratio=2.0, max_loss_change=1e-4),
                    dict(schedule=3 if quick else 5, num_batches=2 if quick else 32, batch_size=4),
                    out_dir, quick)


@register("nullspace-error-control",
          claim="With tau = 1 the loss stays constant during teleport steps while the gradient norm rises; smaller tau raises it faster at a growing loss error",
          source="seed 001 Sec. 4.5, Fig. 6b (Transformer on sMNIST, tau in {1, 0.999, 0.99, 0.9})")
def run_error_control(quick: bool, out_dir: Path) -> list[Row]:
    d = load_dataset("digits", form="sequence")
    X, Y = d.train.tensors
    steps = 16 if quick else 40
    traces = {}
    rows = []
    for tau in (1.0, 0.999, 0.99, 0.9):
        torch.manual_seed(0)
        model = zoo.transformer(in_features=8, seq_len=8, d_model=64, nhead=2, num_layers=2, dim_ff=128)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # the source's Fig. 6b lets tau < 1 change the loss: this measures that error, so the
                # default guards (issue 20) are off here
                rec = NullSpaceTeleport("cross_entropy", eta=0.01, steps=steps, tau=tau, cap_ratio=50.0,
                                        batch_loss_tol=None, held_out_tol=None, max_weight_growth=None).teleport(
                    model, (X[:8], Y[:8])).batches[0]
            except FloatingPointError as e:
                rows.append(Row(claim=f"tau={tau}", source="Fig. 6b", ours=f"teleport failed: {e}", holds=None))
                continue
        traces[tau] = rec
        kept = sum(rec.ranks.values())
        total = sum(rec.dims.values())
        rows.append(Row(
            claim=f"tau = {tau}: loss and gradient norm during {rec.steps} teleport steps",
            source="Fig. 6b: tau = 1 loss constant, gradient norm rises; tau = 0.99 rises much faster with the loss still constant",
            ours=(f"rank kept {kept}/{total} input dims; grad norm {rec.grad_norm_before:.3f} -> {rec.grad_norm_after:.3f} "
                  f"(x{rec.grad_norm_after / rec.grad_norm_before:.2f}); batch loss {rec.loss_before:.5f} -> "
                  f"{rec.loss_after:.5f} (rel {rec.rel_loss_change:.1e})"),
            holds=(rec.rel_loss_change < 1e-4 and rec.grad_norm_after > rec.grad_norm_before) if tau == 1.0 else None,
            data={"loss_trace": rec.loss_trace, "grad_norm_trace": rec.grad_norm_trace, "ranks": rec.ranks},
        ))
    if 1.0 in traces and 0.99 in traces:
        g1 = traces[1.0].grad_norm_after / traces[1.0].grad_norm_before
        g99 = traces[0.99].grad_norm_after / traces[0.99].grad_norm_before
        rows.append(Row(claim="smaller tau (0.99) ascends the gradient norm faster than tau = 1",
                        source="Fig. 6b", ours=f"gain x{g99:.2f} (tau 0.99, loss rel change "
                        f"{traces[0.99].rel_loss_change:.1e}) vs x{g1:.2f} (tau 1)", holds=g99 > g1))
    # loss change per teleport: null space vs symmetry (exact and published first-order), same MLP
    Xf, Yf = load_dataset("digits", form="flat").train.tensors
    side = {}
    for dtype in (torch.float32, torch.float64):
        for tp in (NullSpaceTeleport("cross_entropy", eta=0.05), SymmetryTeleport("cross_entropy", eta=0.05),
                   # the published first-order action changes the batch loss by design: guard off to measure it
                   SymmetryTeleport("cross_entropy", eta=0.05, action="first_order", batch_loss_tol=None)):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LeakyReLU(0.1), torch.nn.Linear(128, 128),
                                    torch.nn.LeakyReLU(0.1), torch.nn.Linear(128, 10)).to(dtype)
            res = tp.teleport(m, [(Xf[i:i + 32].to(dtype), Yf[i:i + 32]) for i in range(0, 128, 32)],
                              held_out=(Xf[-256:].to(dtype), Yf[-256:]))
            side[(str(dtype).split(".")[-1], tp.method)] = res
    txt = "; ".join(f"{k[1]} {k[0]}: max rel {v.max_rel_loss_change:.1e}, grad x"
                    f"{statistics.mean(b.grad_norm_after / b.grad_norm_before for b in v.batches):.2f}, held-out "
                    f"{v.held_out_rel_change:+.1e}" for k, v in side.items())
    exact_ok = all(v.max_rel_loss_change < 1e-4 for k, v in side.items() if k[1] in ("nullspace", "symmetry"))
    fo = side[("float64", "symmetry-first_order")].max_rel_loss_change
    ex = side[("float64", "symmetry")].max_rel_loss_change
    rows.append(Row(
        claim="loss change per teleport: null space and exact symmetry action keep the batch loss; the published first-order action does not",
        source="issue 4 (authors' W(I-T) keeps the loss only to first order); seed 001 Fig. 1",
        ours=txt, holds=exact_ok and fo > 10 * max(ex, 1e-15),
        data={f"{k[0]}/{k[1]}": v.summary() for k, v in side.items()},
    ))
    _plot_error(traces, out_dir)
    return rows


def _plot_error(traces, out_dir: Path) -> None:
    try:
        import matplotlib  # noqa: F401  (optional dependency check)

        from ..report.figures import object_pyplot as _plt  # Agg-canvas figures: the process-wide backend is left alone

        plt = _plt()
    except ImportError:  # pragma: no cover
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    for tau, rec in traces.items():
        a.plot(rec.grad_norm_trace, label=f"tau={tau}")
        b.plot(rec.loss_trace, label=f"tau={tau}")
    a.set_xlabel("teleport step")
    a.set_ylabel("gradient norm")
    a.set_yscale("log")
    b.set_xlabel("teleport step")
    b.set_ylabel("teleport-batch loss")
    a.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "nullspace-error-control.png", dpi=100)
    plt.close(fig)
