"""Seed-000 (Neural Teleportation, Armenta et al.) reproductions of Sec. 5, teleportation during training, at
CPU scale: ``teleport-sgd`` (a teleport at initialisation) and ``teleport-midtraining`` (a teleport later in
training, and what to do with the optimizer state).

The source used CIFAR-10/100 with MLP/VGG/ResNet/DenseNet and 100 epochs; here: sklearn digits (8x8, 1438 train
samples) and mnist1d, small zoo models, few epochs, one thread -- each row says what was scaled.  Training runs
through :func:`gradcond.train.fit` (:func:`._training.train_steps`).  ``quick`` < 3 min each on one thread.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ._teleport_common import _accuracy, _data, _full_loss, _model, _plt
from ._training import train_steps
from .registry import Row, register


# ------------------------------------------------------------------------------------------------------------
def _sgd_setting(kind, data, opt_name, lr, seed, variant, epochs, bs=32):
    from ..graph import analyze
    from ..teleport import pseudo_teleport, random_cob, teleport

    form = "image" if kind == "cnn" else "flat"
    X, y, Xt, yt = _data(data, form)
    # He (Kaiming normal) init as in the source; PyTorch's default init leaves this 6-layer MLP stuck at chance
    model = _model(kind, in_features=X.shape[1] if form == "flat" else 1, seed=seed, depth=6, width=128,
                   init="gaussian")
    if variant != "none":
        structure = analyze(model, X[:2])
        gen = torch.Generator().manual_seed(1000 + seed)
        model = (teleport(model, random_cob(structure, 0.9, "inter", gen)) if variant == "teleport"
                 else pseudo_teleport(model, structure, 0.9, "inter", gen))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9 if opt_name == "momentum" else 0.0)
    steps_per_epoch = len(X) // bs
    curve, accs = [], []

    def record(_s):
        curve.append(_full_loss(model, X, y))
        accs.append(_accuracy(model, Xt, yt))

    train_steps(model, X, y, opt, epochs * steps_per_epoch, bs, torch.Generator().manual_seed(seed),
                record=record, every=steps_per_epoch)
    diverged = len(curve) < epochs or not all(math.isfinite(c) for c in curve)
    curve = [c if math.isfinite(c) else math.inf for c in curve] + [math.inf] * (epochs - len(curve))
    # a diverged run counts as chance accuracy (1/10) for its remaining epochs: it has stopped learning
    accs = [a if math.isfinite(c) else 0.1 for a, c in zip(accs, curve)] + [0.1] * (epochs - len(accs))
    return curve, accs, (_accuracy(model, Xt, yt) if not diverged else float("nan"))


def _paired_gain(a, b) -> tuple[float, float]:
    """Mean and standard error (ddof 1; 0 for one pair) of the paired differences ``a[i] - b[i]``."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    return float(d.mean()), se


def _judge_speedup(gains, k: float = 2.0) -> tuple[bool, bool]:
    """From ``{setting: ((mean_t, se_t), (mean_p, se_p))}`` -- the paired gain in LR-averaged validation accuracy of
    teleport resp. pseudo-teleport over no teleport -- return ``(teleport speeds up in every setting,
    pseudo-teleport speeds up in none)``: a speed-up is a gain above ``k`` standard errors (and above 0).  An empty
    ``gains`` judges nothing and returns ``(False, False)``."""
    if not gains:
        return False, False
    up = lambda m, se: m > 0 and m > k * se  # noqa: E731
    return (all(up(*t) for t, _ in gains.values()), not any(up(*p) for _, p in gains.values()))


@register(
    "teleport-sgd",
    claim="One inter-landscape teleport (sigma 0.9) right after initialisation accelerates SGD and SGD+momentum; a "
          "pseudo-teleport (same distance, random direction) does not.",
    source="seed 000, Sec. 5.2 / Figs. 7-10 (appendix Figs. 19-24) (MLP 5x500, VGG, ResNet, DenseNet; CIFAR-10/100; "
           "lr 0.01/0.001/0.0001; 5 runs; 100 epochs)",
)
def teleport_sgd(quick: bool, out_dir: Path) -> list[Row]:
    if quick:
        settings = [("mlp", "digits")]
        lrs, seeds, epochs = (0.01, 0.001), (0, 1), 3
    else:
        settings = [("mlp", "digits"), ("cnn", "digits"), ("mlp", "mnist1d")]
        lrs, seeds, epochs = (0.01, 0.001, 0.0001), (0, 1, 2, 3, 4), 8
    variants = ("none", "teleport", "pseudo")
    results, rows = {}, []
    for kind, data in settings:
        for opt_name in ("sgd", "momentum"):
            for lr in lrs:
                for v in variants:
                    # per seed: (train-loss curve, validation-accuracy curve, final accuracy)
                    results[(kind, data, opt_name, lr, v)] = [_sgd_setting(kind, data, opt_name, lr, s, v, epochs)
                                                             for s in seeds]
    plt = _plt()
    keys = sorted({k[:4] for k in results})
    ncol = len(lrs)
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 2.6 * nrow), squeeze=False)
    for i, k in enumerate(keys):
        ax = axes[i // ncol, i % ncol]
        auc, vacc = {}, {}
        for v in variants:
            runs = results[k + (v,)]
            c = np.mean([r[0] for r in runs], axis=0)
            ax.semilogy(range(1, len(c) + 1), c, label=v)
            auc[v] = float(np.mean(c))
            vacc[v] = float(np.mean([r[1] for r in runs]))
        ax.set(title=f"{k[0]}/{k[1]} {k[2]} lr {k[3]}", xlabel="epoch", ylabel="train loss")
        ax.legend(fontsize=6)
        rows.append(Row(f"{k[0]} / {k[1]} / {k[2]} / lr {k[3]}: mean train loss and mean validation accuracy over "
                        f"{epochs} epochs ({len(seeds)} seeds)", "seed 000, Sec. 5.2 / Figs. 7-10",
                        f"train loss none {auc['none']:.4f}, teleport {auc['teleport']:.4f}, pseudo "
                        f"{auc['pseudo']:.4f}; validation accuracy {vacc['none']:.3f} / {vacc['teleport']:.3f} / "
                        f"{vacc['pseudo']:.3f}", None, {"auc": auc, "val_acc": vacc},
                        paper="(per learning rate: not shown; the source averages over learning rates)",
                        criterion="reported only; judged per setting after averaging over learning rates",
                        tolerance="-"))
    fig.tight_layout()
    fig.savefig(out_dir / "teleport_sgd.png", dpi=100)
    plt.close(fig)

    # the source's quantity: validation-accuracy curves averaged over the learning rates (Figs. 7-10); one number per
    # seed = the mean over epochs and learning rates (area under the LR-averaged curve), compared paired by seed
    gains, judged_rows = {}, []
    for kind, data in settings:
        for opt_name in ("sgd", "momentum"):
            area = {v: [float(np.mean([results[(kind, data, opt_name, lr, v)][j][1] for lr in lrs]))
                        for j in range(len(seeds))] for v in variants}
            gt, gp = _paired_gain(area["teleport"], area["none"]), _paired_gain(area["pseudo"], area["none"])
            gains[(kind, data, opt_name)] = (gt, gp)
            t_up, _ = _judge_speedup({0: (gt, gp)})
            judged_rows.append(Row(
                f"{kind} / {data} / {opt_name}: teleport at init raises the LR-averaged validation accuracy "
                f"({len(lrs)} lrs, {len(seeds)} seeds, {epochs} epochs)", "seed 000, Sec. 5.2 / Fig. 7 (Fig. 10 for "
                "pseudo-teleport)",
                f"mean over epochs and lrs: none {np.mean(area['none']):.4f}, teleport {np.mean(area['teleport']):.4f},"
                f" pseudo {np.mean(area['pseudo']):.4f}; teleport - none {gt[0]:+.4f} +- {gt[1]:.4f}, pseudo - none "
                f"{gp[0]:+.4f} +- {gp[1]:.4f} (standard errors over seeds)", t_up,
                {"area": area, "gain_teleport": gt, "gain_pseudo": gp},
                paper="teleport curve above the no-teleport curve (CIFAR-10/100, 100 epochs; plotted, no numbers)",
                criterion="paired gain (teleport - none) of the mean validation accuracy over epochs and learning "
                          "rates is positive and above 2 standard errors over seeds",
                tolerance=f"2 standard errors of the paired difference over {len(seeds)} seeds"))
    t_all, p_none = _judge_speedup(gains)
    n_t = sum(1 for t, _ in gains.values() if t[0] > 0 and t[0] > 2 * t[1])
    n_p = sum(1 for _, p in gains.values() if p[0] > 0 and p[0] > 2 * p[1])
    scale = (f"scaled: {', '.join(f'{k}/{d}' for k, d in settings)}, MLP 5x128 He init, {epochs} epochs, lrs "
             f"{lrs}, {len(seeds)} seeds; validation = the held-out test split")
    rows[:0] = [
        Row(f"teleport at init speeds up SGD and SGD+momentum in every setting ({scale})",
            "seed 000, Sec. 5.2 / Figs. 7-9 (appendix Figs. 19-22)",
            f"significant speed-up (LR-averaged validation accuracy) in {n_t}/{len(gains)} settings", t_all,
            {"gains": {"/".join(k): v for k, v in gains.items()}},
            paper="'neural teleportation accelerates gradient descent (with and without momentum) for every model on "
                  "every dataset' (72 configurations)",
            criterion="in every (model, data, optimizer) setting the paired gain of the LR-averaged validation "
                      "accuracy (teleport - none) exceeds 2 standard errors over seeds",
            tolerance=f"2 standard errors over {len(seeds)} seeds, per setting"),
        Row(f"a pseudo-teleport (same distance, random direction) does not speed up training ({scale})",
            "seed 000, Sec. 5.2 / Fig. 10 (appendix Figs. 23-24)",
            f"significant speed-up by pseudo-teleport in {n_p}/{len(gains)} settings", p_none,
            {"gains": {"/".join(k): v for k, v in gains.items()}},
            paper="'pseudo-teleportation does not improve gradient descent training'",
            criterion="in no setting does the paired gain (pseudo - none) of the LR-averaged validation accuracy "
                      "exceed 2 standard errors over seeds",
            tolerance=f"2 standard errors over {len(seeds)} seeds, per setting"),
    ] + judged_rows
    return rows


def _judge_jump_order(gains) -> bool:
    """Whether the accuracy gains (no teleport first, then increasing sigma) strictly increase; NaN fails."""
    g = [float(x) for x in gains]
    return all(math.isfinite(x) for x in g) and all(b > a for a, b in zip(g, g[1:]))


# ------------------------------------------------------------------------------------------------------------
@register(
    "teleport-midtraining",
    claim="One teleport later in training gives a jump in validation accuracy, larger for larger sigma (0.7, 0.8, "
          "0.9); and (gradcond) how the optimizer state is handled at a mid-training teleport matters: transport "
          "vs reset vs keep over the next 200 steps.",
    source="seed 000, Sec. 5.2 / Figs. 12-13 (teleport at epoch 30 of 100, lr 1e-4, CIFAR-10); the optimizer-state "
           "comparison is gradcond's own addition, motivated by Theorem 5.1 (Sec. 5.1)",
)
def midtraining(quick: bool, out_dir: Path) -> list[Row]:
    import copy

    from ..graph import analyze
    from ..teleport import random_cob, teleport, weight_scale_factors
    from ..teleport.optim_state import transport_optimizer_state

    X, y, Xt, yt = _data()
    bs, spe = 32, len(X) // 32
    pre_epochs, post_epochs = (3, 3) if quick else (10, 10)
    seeds = (0, 1) if quick else (0, 1, 2)
    sigmas = (0.0, 0.7, 0.8, 0.9)
    lr = 5e-3  # small lr (the source: 1e-4 on CIFAR); plain SGD
    rows = []
    jumps = {s: [] for s in sigmas}
    curves = {s: [] for s in sigmas}
    for seed in seeds:
        base = _model("mlp", seed=seed, depth=4, width=128, init="gaussian")
        opt = torch.optim.SGD(base.parameters(), lr=lr)
        train_steps(base, X, y, opt, pre_epochs * spe, bs, torch.Generator().manual_seed(seed))
        structure = analyze(base, X[:2])
        acc0 = _accuracy(base, Xt, yt)
        for s in sigmas:
            m = teleport(base, random_cob(structure, s, "inter", torch.Generator().manual_seed(seed))) if s else \
                copy.deepcopy(base)
            o = torch.optim.SGD(m.parameters(), lr=lr)
            accs = [acc0]
            train_steps(m, X, y, o, post_epochs * spe, bs, torch.Generator().manual_seed(50 + seed),
                        record=lambda _s: accs.append(_accuracy(m, Xt, yt)), every=spe)
            curves[s].append(accs)
            jumps[s].append(accs[1] - acc0)
    mj = {s: float(np.mean(v)) for s, v in jumps.items()}
    rows.append(Row(f"validation accuracy gain one epoch after a teleport at epoch {pre_epochs} (SGD lr {lr}, "
                    f"digits MLP 3x128 He init, {len(seeds)} seeds)", "seed 000, Sec. 5.2 / Figs. 12-13",
                    ", ".join(f"sigma {s}: {v:+.3f}" for s, v in mj.items()),
                    _judge_jump_order([mj[s] for s in sigmas]), {"jumps": {str(k): v for k, v in jumps.items()}},
                    paper="a jump in validation accuracy right after the teleport (Fig. 12); 'the bigger the CoB-range "
                          "the higher the impact' for 0.7, 0.8, 0.9 (Fig. 13); plotted, no numbers",
                    criterion="the mean one-epoch accuracy gain strictly increases along sigma 0 (no teleport) < "
                              "0.7 < 0.8 < 0.9",
                    tolerance=f"none: strict ordering of the means over {len(seeds)} seeds"))

    # optimizer-state handling at a mid-training teleport: 200 steps after, transport vs reset vs keep
    n_after = 200
    state_curves = {}
    for opt_name, make in (("momentum", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
                           ("adam", lambda p: torch.optim.Adam(p, lr=1e-3))):
        for mode in ("none", "transport", "reset", "keep"):
            runs = []
            for seed in seeds:
                m = _model("mlp", seed=seed, depth=4, width=64, init="gaussian")
                o = make(m.parameters())
                train_steps(m, X, y, o, 150, bs, torch.Generator().manual_seed(seed))
                if mode != "none":
                    structure = analyze(m, X[:2])
                    cob = random_cob(structure, 0.9, "inter", torch.Generator().manual_seed(7 + seed))
                    fac = weight_scale_factors(structure, cob)
                    teleport(m, cob, inplace=True)
                    transport_optimizer_state(o, m, fac, mode)
                c = [_full_loss(m, X, y)]
                train_steps(m, X, y, o, n_after, bs, torch.Generator().manual_seed(99 + seed),
                            record=lambda _s: c.append(_full_loss(m, X, y)), every=10)
                runs.append(c)
            state_curves[(opt_name, mode)] = np.mean(runs, axis=0)
        cs = {mode: state_curves[(opt_name, mode)] for mode in ("none", "transport", "reset", "keep")}
        rows.append(Row(f"{opt_name}: train loss after a mid-training teleport (step 150, sigma 0.9 inter), "
                        f"at +0/+50/+100/+200 steps ({len(seeds)} seeds)",
                        "gradcond addition (not in seed 000; motivated by Theorem 5.1, Sec. 5.1)",
                        "; ".join(f"{k}: " + "/".join(f"{v[i]:.3f}" for i in (0, 5, 10, 20)) for k, v in cs.items()),
                        None, {k: v.tolist() for k, v in cs.items()},
                        paper="(not in the source)",
                        criterion="reported only: transport keeps the state consistent; keep uses old-coordinate "
                                  "state; no claim to judge",
                        tolerance="-"))
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.3))
    for s, v in curves.items():
        ax[0].plot(range(pre_epochs, pre_epochs + post_epochs + 1), np.mean(v, axis=0), "o-",
                   label=f"sigma {s}" if s else "no teleport")
    ax[0].set(xlabel="epoch", ylabel="test accuracy", title=f"teleport at epoch {pre_epochs} (SGD lr {lr})")
    ax[0].legend(fontsize=7)
    for j, opt_name in enumerate(("momentum", "adam")):
        for mode in ("none", "transport", "reset", "keep"):
            c = state_curves[(opt_name, mode)]
            ax[1 + j].semilogy(np.arange(len(c)) * 10, c, label=mode)
        ax[1 + j].set(xlabel="steps after teleport", ylabel="train loss", title=f"{opt_name}: optimizer state")
        ax[1 + j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "teleport_midtraining.png", dpi=100)
    plt.close(fig)
    return rows
