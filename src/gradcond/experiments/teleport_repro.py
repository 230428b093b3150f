"""Seed-000 (Neural Teleportation, Armenta et al.) reproductions at CPU scale.

``teleport-level-curve``, ``teleport-grad-scaling``, ``micro-teleport-angle``, ``teleport-flatness``,
``teleport-sgd``, ``teleport-midtraining``.  The source used CIFAR-10/100 with MLP/VGG/ResNet/DenseNet and 100
epochs; here: sklearn digits (8x8, 1438 train samples) and mnist1d, small zoo models, few epochs, one thread --
each row says what was scaled.  ``quick`` < 3 min each on one thread.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .registry import Row, register

F = torch.nn.functional


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_DATA: dict = {}


def _data(name: str = "digits", form: str = "flat", dtype=torch.float32):
    key = (name, form, dtype)
    if key not in _DATA:
        from ..data import load_dataset

        d = load_dataset(name, form=form, dtype=dtype)
        X, y = d.train.tensors
        Xt, yt = d.test.tensors
        _DATA[key] = (X.to(dtype), y, Xt.to(dtype), yt)
    return _DATA[key]


def _model(kind: str, in_features: int = 64, seed: int = 0, dtype=torch.float32, **kw):
    from ..zoo import mlp, resnet, simple_cnn

    torch.manual_seed(seed)
    if kind == "mlp":
        m = mlp(in_features, 10, depth=kw.get("depth", 4), width=kw.get("width", 64), act=kw.get("act", "relu"),
                init=kw.get("init", "default"))
    elif kind == "cnn":
        m = simple_cnn(1, 10, channels=kw.get("channels", (16, 32)), image_size=8)
    elif kind == "resnet":
        m = resnet(1, 10, depth=10, width=kw.get("width", 8))
    else:
        raise ValueError(kind)
    return m.to(dtype)


def _full_loss(model, X, y, bs: int = 2048) -> float:
    with torch.no_grad():
        was = model.training
        model.eval()
        tot = sum(float(F.cross_entropy(model(X[i:i + bs]), y[i:i + bs], reduction="sum"))
                  for i in range(0, len(X), bs))
        model.train(was)
    return tot / len(X)


def _accuracy(model, X, y) -> float:
    with torch.no_grad():
        was = model.training
        model.eval()
        acc = float((model(X).argmax(1) == y).float().mean())
        model.train(was)
    return acc


def _train(model, X, y, opt, steps: int, bs: int, gen: torch.Generator, record=None, every: int = 0):
    """Plain minibatch loop (no DataLoader: cheaper); returns per-step batch losses."""
    losses = []
    n = len(X)
    perm, pos = torch.randperm(n, generator=gen), 0
    for s in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + bs]
        pos += bs
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if record is not None and every and (s + 1) % every == 0:
            record(s + 1)
        if not math.isfinite(losses[-1]):
            break
    return losses


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _flat_grad(model, x, y) -> torch.Tensor:
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    return torch.cat([t.reshape(-1) for t in g])


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    c = float(torch.dot(a, b) / (a.norm() * b.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


# ------------------------------------------------------------------------------------------------------------
@register(
    "teleport-level-curve",
    claim="Teleportation moves the weights far along a loss level curve: 100 inter-landscape teleports (sigma 0.9) of "
          "a trained MLP leave the loss unchanged up to float error while the weights move by a distance comparable "
          "to their size.",
    source="seed 000, Sec. 4.2 / Fig. 2 (MLP; loss change ~1e-10, mean |W - V| 0.08 vs weight scale 0.18)",
)
def level_curve(quick: bool, out_dir: Path) -> list[Row]:
    from ..graph import analyze
    from ..teleport.core import random_cob, teleport

    X, y, _, _ = _data(dtype=torch.float64)
    model = _model("mlp", dtype=torch.float64, depth=4, width=64)
    _train(model, X, y, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 200 if quick else 600, 64,
           torch.Generator().manual_seed(0))
    structure = analyze(model, X[:2])
    L0 = _full_loss(model, X, y)
    W = _flat(model)
    gen = torch.Generator().manual_seed(1)
    dl, dist, mad = [], [], []
    for _ in range(100):
        tp = teleport(model, random_cob(structure, 0.9, "inter", gen))
        dl.append(abs(_full_loss(tp, X, y) - L0))
        V = _flat(tp)
        dist.append(float((V - W).norm() / W.norm()))
        mad.append(float((V - W).abs().mean()))
    wscale = float(W.abs().mean())
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].semilogy(np.maximum(dl, 1e-18), "o", ms=3)
    ax[0].set(xlabel="teleport #", ylabel="|L(V) - L(W)|", title=f"loss change (L(W) = {L0:.3f}), float64")
    ax[1].plot(dist, "o", ms=3)
    ax[1].set(xlabel="teleport #", ylabel="||V - W|| / ||W||", title="distance travelled")
    fig.tight_layout()
    fig.savefig(out_dir / "teleport_level_curve.png", dpi=100)
    plt.close(fig)
    return [
        Row("loss change of 100 inter teleports (sigma 0.9), float64", "~1e-10 (float error)",
            f"max {max(dl):.2e}, mean {np.mean(dl):.2e} (loss {L0:.4f}; digits MLP 64-64-64-10)",
            max(dl) < 1e-10, {"loss_changes": dl, "loss": L0}),
        Row("distance travelled vs weight scale", "mean |W - V| 0.08 vs weight scale 0.18 (ratio 0.44)",
            f"mean |W - V| {np.mean(mad):.4f} vs mean |W| {wscale:.4f} (ratio {np.mean(mad) / wscale:.2f}); "
            f"||V - W|| / ||W|| = {np.mean(dist):.2f}", np.mean(mad) / wscale > 0.2,
            {"mean_abs_diff": mad, "rel_dist": dist, "weight_scale": wscale}),
    ]


# ------------------------------------------------------------------------------------------------------------
@register(
    "teleport-grad-scaling",
    claim="E[tau_a^2 / tau_b^2] = (sigma^2 + 3) / (3 (1 - sigma^2)) for independent intra CoBs, and the gap "
          "| ||dW||/||W|| - ||dV||/||V|| | grows with the CoB-range sigma.",
    source="seed 000, Sec. 4.1 (expectation formula) and Sec. 5 / Fig. (20 teleports per sigma, 4 models)",
)
def grad_scaling(quick: bool, out_dir: Path) -> list[Row]:
    from ..graph import analyze
    from ..teleport.core import random_cob, teleport

    sigmas = [0.1, 0.3, 0.5, 0.7, 0.9, 0.99]
    g = torch.Generator().manual_seed(0)
    n = 200_000 if quick else 2_000_000
    mc, rows = [], []
    ok = True
    for s in sigmas:
        a = 1 + s * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
        b = 1 + s * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
        r = a * a / (b * b)
        m, se = float(r.mean()), float(r.std() / math.sqrt(n))
        th = (s * s + 3) / (3 * (1 - s * s))
        mc.append((s, m, se, th))
        # heavy tail at sigma -> 1 (E[1/tau^4] ~ (1 - sigma)^-3): judge within 4 standard errors
        ok &= abs(m - th) <= 4 * se + 1e-12
    rows.append(Row("E[tau_a^2/tau_b^2] (Monte Carlo, %d pairs per sigma)" % n,
                    "(sigma^2+3)/(3(1-sigma^2)): " + ", ".join(f"{t:.3g}" for _, _, _, t in mc),
                    ", ".join(f"sigma {s}: {m:.4g} +- {se:.2g}" for s, m, se, _ in mc), ok,
                    {"mc": mc}))

    X, y, _, _ = _data(dtype=torch.float64)
    Xi, _, _, _ = _data(form="image", dtype=torch.float64)
    models = {"mlp": (_model("mlp", dtype=torch.float64), X), "cnn": (_model("cnn", dtype=torch.float64), Xi)}
    if not quick:
        models["mlp-tanh"] = (_model("mlp", dtype=torch.float64, act="tanh"), X)
        models["resnet"] = (_model("resnet", dtype=torch.float64), Xi)
    reps = 20
    gen = torch.Generator().manual_seed(1)
    res = {}
    for name, (model, XX) in models.items():
        structure = analyze(model, XX[:2])
        x, yy = XX[:256], y[:256]
        gW = _flat_grad(model, x, yy)
        base = float(gW.norm() / _flat(model).norm())
        res[name] = []
        for s in sigmas:
            diffs = []
            for _ in range(reps):
                tp = teleport(model, random_cob(structure, s, "inter", gen))
                diffs.append(abs(base - float(_flat_grad(tp, x, yy).norm() / _flat(tp).norm())))
            res[name].append(float(np.mean(diffs)))
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].semilogy([s for s, *_ in mc], [m for _, m, _, _ in mc], "o", label="Monte Carlo")
    ss = np.linspace(0.05, 0.99, 100)
    ax[0].semilogy(ss, (ss ** 2 + 3) / (3 * (1 - ss ** 2)), "-", label="(s^2+3)/(3(1-s^2))")
    ax[0].set(xlabel="sigma", ylabel="E[tau_a^2/tau_b^2]")
    ax[0].legend()
    for name, v in res.items():
        ax[1].semilogy(sigmas, v, "o-", label=name)
    ax[1].set(xlabel="sigma (inter)", ylabel="| ||dW||/||W|| - ||dV||/||V|| |")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "teleport_grad_scaling.png", dpi=100)
    plt.close(fig)
    for name, v in res.items():
        mono = all(b >= a for a, b in zip(v, v[1:]))
        rows.append(Row(f"gap grows with sigma ({name}, digits, {reps} teleports per sigma)",
                        "grows with sigma (4 models, CIFAR)",
                        ", ".join(f"{s}: {d:.3g}" for s, d in zip(sigmas, v)), mono, {"sigmas": sigmas, "gap": v}))
    return rows


# ------------------------------------------------------------------------------------------------------------
@register(
    "micro-teleport-angle",
    claim="Micro-teleportation vectors (intra CoB, sigma 1e-3) are perpendicular to back-propagated gradients for "
          "any batch size (a Dirac at 90 degrees), while random vectors are only quasi-orthogonal to them.",
    source="seed 000, Sec. 4.3 / Fig. 3 (MLP, VGG, ResNet, DenseNet; CIFAR; batch 8 and 64; 100 micro-teleports)",
)
def micro_angle(quick: bool, out_dir: Path) -> list[Row]:
    from ..graph import analyze
    from ..teleport.core import micro_teleport

    X, y, _, _ = _data(dtype=torch.float64)
    Xi, _, _, _ = _data(form="image", dtype=torch.float64)
    models = {"mlp": (_model("mlp", dtype=torch.float64), X), "cnn": (_model("cnn", dtype=torch.float64), Xi),
              "resnet": (_model("resnet", dtype=torch.float64), Xi)}
    reps = 30 if quick else 100
    gen = torch.Generator().manual_seed(0)
    out, rows = {}, []
    for name, (model, XX) in models.items():
        structure = analyze(model, XX[:2])
        for bs in (8, 64):
            a = {"micro-grad": [], "micro-random": [], "grad-random": [], "random-random": []}
            for _ in range(reps):
                idx = torch.randperm(len(XX), generator=gen)[:bs]
                g = _flat_grad(model, XX[idx], y[idx])
                _, v = micro_teleport(model, structure, 1e-3, gen)
                r1 = torch.randn(g.numel(), generator=gen, dtype=torch.float64)
                r2 = torch.randn(g.numel(), generator=gen, dtype=torch.float64)
                a["micro-grad"].append(_angle(v, g))
                a["micro-random"].append(_angle(v, r1))
                a["grad-random"].append(_angle(g, r1))
                a["random-random"].append(_angle(r1, r2))
            out[(name, bs)] = a
            dev = {k: float(np.mean(np.abs(np.array(v) - 90))) for k, v in a.items()}
            rows.append(Row(f"{name}, batch {bs}: mean |angle - 90| (deg), {reps} micro-teleports",
                            "micro vs gradient: Dirac at 90; gradient vs random: spread",
                            ", ".join(f"{k} {d:.3g}" for k, d in dev.items()),
                            dev["micro-grad"] < 0.1 and dev["grad-random"] > 3 * dev["micro-grad"],
                            {"angles": a, "mean_abs_dev": dev, "num_params": int(_flat(model).numel())}))
    plt = _plt()
    fig, axes = plt.subplots(len(models), 2, figsize=(9, 2.6 * len(models)))
    for i, name in enumerate(models):
        for j, bs in enumerate((8, 64)):
            ax = axes[i, j]
            for k, v in out[(name, bs)].items():
                ax.hist(v, bins=30, alpha=0.5, label=k)
            ax.set(title=f"{name}, batch {bs}", xlabel="angle (deg)")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "micro_teleport_angle.png", dpi=100)
    plt.close(fig)
    return rows


# ------------------------------------------------------------------------------------------------------------
@register(
    "teleport-flatness",
    claim="Teleportation sharpens the landscape: the 1-D loss interpolation between two trained MLPs (small vs large "
          "batch) gets sharper as the CoB-range sigma grows (0.6, 0.9, 0.99).",
    source="seed 000, Sec. 4.4 / Fig. 4 (5-hidden-layer MLP and VGG on CIFAR-10, batch 8 vs 1024)",
)
def flatness(quick: bool, out_dir: Path) -> list[Row]:
    from ..graph import analyze
    from ..teleport.core import random_cob, teleport

    X, y, _, _ = _data()
    steps_small, steps_large = (500, 250) if quick else (2000, 1000)
    nets = {}
    for bs, steps, lr in ((8, steps_small, 0.01), (1024, steps_large, 0.05)):
        m = _model("mlp", seed=0, depth=6, width=64, init="gaussian")  # 5 hidden layers, same (He) init for both
        _train(m, X, y, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), steps, bs,
               torch.Generator().manual_seed(bs))
        nets[bs] = m
    structure = analyze(nets[8], X[:2])
    alphas = np.round(np.linspace(-0.5, 1.5, 21), 6)
    sigmas = [0.0, 0.6, 0.9, 0.99]
    reps = 2 if quick else 5
    curves, sharp, barrier = {}, {}, {}
    for s in sigmas:
        cs = []
        for r in range(reps if s > 0 else 1):
            gen = torch.Generator().manual_seed(100 * r + int(100 * s))
            # intra CoBs (decision): the teleported nets stay plain ReLU MLPs, so the line between them is a line
            # in one parameter space; independent CoBs for the two nets (with one shared CoB the line would be
            # the teleported line and nothing would change)
            a = teleport(nets[8], random_cob(structure, s, "intra", gen)) if s > 0 else nets[8]
            b = teleport(nets[1024], random_cob(structure, s, "intra", gen)) if s > 0 else nets[1024]
            pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
            probe = _model("mlp", seed=0, depth=6, width=64)
            c = []
            for al in alphas:
                with torch.no_grad():
                    for n, p in probe.named_parameters():
                        p.copy_((1 - al) * pa[n] + al * pb[n])
                c.append(_full_loss(probe, X, y))
            cs.append(c)
        c = np.mean(cs, axis=0)
        curves[s] = c
        i0, i1 = int(np.argmin(np.abs(alphas))), int(np.argmin(np.abs(alphas - 1)))
        # local 1-D sharpness: mean loss rise one grid step (0.1 in alpha) on each side of each solution
        rise = [c[i + d] - c[i] for i in (i0, i1) for d in (-1, 1)]
        sharp[s] = float(np.mean(rise))
        inner = (alphas > 0) & (alphas < 1)
        barrier[s] = float(np.max(c[inner]) - 0.5 * (c[i0] + c[i1]))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for s, c in curves.items():
        ax.semilogy(alphas, c, label=f"sigma {s}" if s else "no teleport")
    ax.set(xlabel="alpha (0: batch 8, 1: batch 1024)", ylabel="train loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "teleport_flatness.png", dpi=100)
    plt.close(fig)
    vals = [sharp[s] for s in sigmas]
    ends = (float(curves[0.0][int(np.argmin(np.abs(alphas)))]), float(curves[0.0][int(np.argmin(np.abs(alphas - 1)))]))
    return [Row("local sharpness (mean loss rise at alpha +-0.1 around both solutions) vs sigma (digits, MLP 5x64, "
                f"intra CoBs, {reps} CoB pairs per sigma; end losses {ends[0]:.3g} / {ends[1]:.3g})",
                "sharper as sigma grows (0.6 < 0.9 < 0.99)",
                ", ".join(f"sigma {s}: {v:.3g}" for s, v in zip(sigmas, vals)),
                all(b > a for a, b in zip(vals, vals[1:])),
                {"alphas": alphas.tolist(), "curves": {str(k): v.tolist() for k, v in curves.items()},
                 "sharpness": dict(zip(map(str, sigmas), vals))}),
            Row("loss barrier between the two solutions vs sigma", "(shown in the source's curves, not quantified)",
                ", ".join(f"sigma {s}: {barrier[s]:.3g}" for s in sigmas), None,
                {"barrier": {str(k): v for k, v in barrier.items()}})]


# ------------------------------------------------------------------------------------------------------------
def _sgd_setting(kind, data, opt_name, lr, seed, variant, epochs, bs=32):
    from ..graph import analyze
    from ..teleport.core import pseudo_teleport, random_cob, teleport

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
    _train(model, X, y, opt, epochs * steps_per_epoch, bs, torch.Generator().manual_seed(seed),
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
    from ..teleport.core import random_cob, teleport, weight_scale_factors
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
        _train(base, X, y, opt, pre_epochs * spe, bs, torch.Generator().manual_seed(seed))
        structure = analyze(base, X[:2])
        acc0 = _accuracy(base, Xt, yt)
        for s in sigmas:
            m = teleport(base, random_cob(structure, s, "inter", torch.Generator().manual_seed(seed))) if s else \
                copy.deepcopy(base)
            o = torch.optim.SGD(m.parameters(), lr=lr)
            accs = [acc0]
            _train(m, X, y, o, post_epochs * spe, bs, torch.Generator().manual_seed(50 + seed),
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
                _train(m, X, y, o, 150, bs, torch.Generator().manual_seed(seed))
                if mode != "none":
                    structure = analyze(m, X[:2])
                    cob = random_cob(structure, 0.9, "inter", torch.Generator().manual_seed(7 + seed))
                    fac = weight_scale_factors(structure, cob)
                    teleport(m, cob, inplace=True)
                    transport_optimizer_state(o, m, fac, mode)
                c = [_full_loss(m, X, y)]
                _train(m, X, y, o, n_after, bs, torch.Generator().manual_seed(99 + seed),
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
