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
    curve = []
    train_steps(model, X, y, opt, epochs * steps_per_epoch, bs, torch.Generator().manual_seed(seed),
                record=lambda s: curve.append(_full_loss(model, X, y)), every=steps_per_epoch)
    diverged = len(curve) < epochs or not all(math.isfinite(c) for c in curve)
    curve = [c if math.isfinite(c) else math.inf for c in curve] + [math.inf] * (epochs - len(curve))
    return curve, (_accuracy(model, Xt, yt) if not diverged else float("nan"))


@register(
    "teleport-sgd",
    claim="One inter-landscape teleport (sigma 0.9) right after initialisation accelerates SGD and SGD+momentum; a "
          "pseudo-teleport (same distance, random direction) does not.",
    source="seed 000, Sec. 5.1 / Figs. 5-6 (MLP 5x500, VGG, ResNet, DenseNet; CIFAR-10/100; lr 0.01/0.001/0.0001; "
           "5 runs; 100 epochs)",
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
                    cs = [_sgd_setting(kind, data, opt_name, lr, s, v, epochs) for s in seeds]
                    results[(kind, data, opt_name, lr, v)] = (np.mean([c for c, _ in cs], axis=0),
                                                             float(np.mean([a for _, a in cs])))  # inf/nan: diverged
    plt = _plt()
    keys = sorted({k[:4] for k in results})
    ncol = len(lrs)
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 2.6 * nrow), squeeze=False)
    wins_t, wins_p, total = 0, 0, 0
    for i, k in enumerate(keys):
        ax = axes[i // ncol, i % ncol]
        auc = {}
        for v in variants:
            c, acc = results[k + (v,)]
            ax.semilogy(range(1, len(c) + 1), c, label=v)
            auc[v] = float(np.mean(c))
        ax.set(title=f"{k[0]}/{k[1]} {k[2]} lr {k[3]}", xlabel="epoch", ylabel="train loss")
        ax.legend(fontsize=6)
        total += 1
        wins_t += auc["teleport"] < auc["none"]
        wins_p += auc["pseudo"] < auc["none"]
        rows.append(Row(f"{k[0]} / {k[1]} / {k[2]} / lr {k[3]}: mean train loss over {epochs} epochs "
                        f"({len(seeds)} seeds)", "teleport < none, pseudo ~ none",
                        f"none {auc['none']:.4f}, teleport {auc['teleport']:.4f}, pseudo {auc['pseudo']:.4f}; "
                        f"test acc {results[k + ('none',)][1]:.3f} / {results[k + ('teleport',)][1]:.3f} / "
                        f"{results[k + ('pseudo',)][1]:.3f}", None, {"auc": auc}))
    fig.tight_layout()
    fig.savefig(out_dir / "teleport_sgd.png", dpi=100)
    plt.close(fig)
    rows.insert(0, Row("teleport at init speeds up (S)GD in most settings (scaled: digits/mnist1d, MLP 5x128, "
                       "simple CNN, few epochs)", "speed-up in all settings of Figs. 5-6",
                       f"teleport lower mean train loss than none in {wins_t}/{total} settings; pseudo in "
                       f"{wins_p}/{total}", wins_t > total / 2 and wins_t > wins_p,
                       {"wins_teleport": wins_t, "wins_pseudo": wins_p, "settings": total}))
    return rows


# ------------------------------------------------------------------------------------------------------------
@register(
    "teleport-midtraining",
    claim="One teleport later in training gives a jump in validation accuracy, larger for larger sigma (0.7, 0.8, "
          "0.9); and (gradcond) how the optimizer state is handled at a mid-training teleport matters: transport "
          "vs reset vs keep over the next 200 steps.",
    source="seed 000, Sec. 5.2 / Fig. 7 (teleport at epoch 30 of 100, lr 1e-4, CIFAR-10); optimizer-state "
           "comparison: issue 9 (Theorem 5.1)",
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
                    f"digits MLP 3x128 He init, {len(seeds)} seeds)", "jump, larger for larger sigma (0.7 < 0.8 < 0.9)",
                    ", ".join(f"sigma {s}: {v:+.3f}" for s, v in mj.items()),
                    mj[0.9] > mj[0.0] and mj[0.9] >= mj[0.7], {"jumps": {str(k): v for k, v in jumps.items()}}))

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
                        "(not in the source) transport keeps the state consistent; keep uses old-coordinate state",
                        "; ".join(f"{k}: " + "/".join(f"{v[i]:.3f}" for i in (0, 5, 10, 20)) for k, v in cs.items()),
                        None, {k: v.tolist() for k, v in cs.items()}))
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
