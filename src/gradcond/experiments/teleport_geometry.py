"""Seed-000 (Neural Teleportation, Armenta et al.) reproductions of Sec. 4, what a teleport does to the
landscape and the gradients, at CPU scale: ``teleport-level-curve``, ``teleport-grad-scaling``,
``micro-teleport-angle``, ``teleport-flatness``.

The source used CIFAR-10/100 with MLP/VGG/ResNet/DenseNet and 100 epochs; here: sklearn digits (8x8, 1438 train
samples), small zoo models, few steps, one thread -- each row says what was scaled.  Training runs through
:func:`gradcond.train.fit` (:func:`._training.train_steps`).  ``quick`` < 3 min each on one thread.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ._teleport_common import _data, _full_loss, _model, _plt
from ._training import train_steps
from .registry import Row, register

F = torch.nn.functional


def _flat(model) -> torch.Tensor:
    """All parameters as one detached vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _flat_grad(model, x, y) -> torch.Tensor:
    """Gradient of the mean cross-entropy on ``(x, y)`` w.r.t. all parameters, as one vector."""
    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    return torch.cat([t.reshape(-1) for t in g])


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two vectors in degrees."""
    c = float(torch.dot(a, b) / (a.norm() * b.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


# ------------------------------------------------------------------------------------------------------------
@register(
    "teleport-level-curve",
    claim="Teleportation moves the weights far along a loss level curve: 100 inter-landscape teleports (sigma 0.9) of "
          "a trained MLP leave the loss unchanged up to float error while the weights move by a distance comparable "
          "to their size.",
    source="seed 000, Sec. 4.2 (text; the level-curve picture is Fig. 3) (MLP; loss change ~1e-10, mean |W - V| "
           "0.08 vs weight scale 0.18)",
)
def level_curve(quick: bool, out_dir: Path) -> list[Row]:
    from ..graph import analyze
    from ..teleport import random_cob, teleport

    X, y, _, _ = _data(dtype=torch.float64)
    model = _model("mlp", dtype=torch.float64, depth=4, width=64)
    train_steps(model, X, y, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 200 if quick else 600, 64,
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
    src = "seed 000, Sec. 4.2 (text, no figure of its own; Fig. 3 illustrates level curves)"
    return [
        Row("loss change of 100 inter teleports (sigma 0.9), float64", src,
            f"max {max(dl):.2e}, mean {np.mean(dl):.2e} (loss {L0:.4f}; digits MLP 64-64-64-10)",
            max(dl) < 1e-10, {"loss_changes": dl, "loss": L0},
            paper="average loss difference 'in the order of 1e-10, no more than a floating point error'",
            criterion="the largest |L(V) - L(W)| over the 100 teleports (full training set, float64) is below 1e-10",
            tolerance="1e-10: the source's own float-error figure (applied to the worst teleport, not the mean)"),
        Row("distance travelled vs weight scale", src,
            f"mean |W - V| {np.mean(mad):.4f} vs mean |W| {wscale:.4f} (ratio {np.mean(mad) / wscale:.2f}); "
            f"||V - W|| / ||W|| = {np.mean(dist):.2f}", bool(np.mean(mad) / wscale > 0.2),
            {"mean_abs_diff": mad, "rel_dist": dist, "weight_scale": wscale},
            paper="mean |W - V| 0.08 vs weight magnitude 0.18 (ratio 0.44)",
            criterion="mean over teleports of mean |W - V|, divided by mean |W|, exceeds 0.2",
            tolerance="0.2 = about half the source's ratio 0.44: 'a distance comparable to the weights' size' on a "
                      "different (smaller, digits) MLP; chosen before the run, not tuned"),
    ]


# ------------------------------------------------------------------------------------------------------------
@register(
    "teleport-grad-scaling",
    claim="E[tau_a^2 / tau_b^2] = (sigma^2 + 3) / (3 (1 - sigma^2)) for independent intra CoBs, and the gap "
          "| ||dW||/||W|| - ||dV||/||V|| | grows with the CoB-range sigma.",
    source="seed 000, Sec. 5.1 (expectation formula after Theorem 5.1) and Fig. 6 (appendix Fig. 18; 20 teleports "
           "per sigma, 4 models)",
)
def grad_scaling(quick: bool, out_dir: Path) -> list[Row]:
    from ..graph import analyze
    from ..teleport import random_cob, teleport

    sigmas = [0.1, 0.3, 0.5, 0.7, 0.9, 0.99]
    X, y, _, _ = _data(dtype=torch.float64)
    # the Monte Carlo samples the library's own CoBs (random_cob, intra as in the formula's derivation) on the MLP's
    # structure: tau_a and tau_b are two different free neurons of one CoB (independent by construction)
    cob_structure = analyze(_model("mlp", dtype=torch.float64), X[:2])
    g = torch.Generator().manual_seed(0)
    n = 200_000 if quick else 2_000_000
    mc = [_mc_tau_ratio(cob_structure, s, n, g) for s in sigmas]
    rows = [Row(f"E[tau_a^2/tau_b^2] over pairs of free neurons of random_cob(sigma, 'intra') CoBs ({n} pairs per "
                "sigma, digits MLP structure)", "seed 000, Sec. 5.1 (equation after Theorem 5.1)",
                ", ".join(f"sigma {s}: {m:.4g} +- {se:.2g}" for s, m, se, _ in mc), _judge_mc(mc), {"mc": mc},
                paper="(sigma^2+3)/(3(1-sigma^2)): " + ", ".join(f"{t:.4g}" for _, _, _, t in mc),
                criterion="for every sigma, |Monte-Carlo mean - formula| <= 4 Monte-Carlo standard errors",
                tolerance="4 standard errors of the sample mean (6 sigmas: a false alarm has probability ~4e-4 "
                          "under the formula); heavy tail at sigma -> 1, E[1/tau^4] ~ (1 - sigma)^-3")]

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
        rows.append(Row(f"gap grows with sigma ({name}, digits, {reps} teleports per sigma)",
                        "seed 000, Sec. 5.1 / Fig. 6 (appendix Fig. 18)",
                        ", ".join(f"{s}: {d:.3g}" for s, d in zip(sigmas, v)), _judge_monotone(v),
                        {"sigmas": sigmas, "gap": v},
                        paper="'a larger CoB-range leads to a larger difference' (4 models, CIFAR-10/100, 20 "
                              "teleports per sigma; plotted, no numbers)",
                        criterion="the mean gap | ||dW||/||W|| - ||dV||/||V|| | over the teleports does not decrease "
                                  "from one sigma to the next (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)",
                        tolerance="none: exact ordering of the means (the source's plot shows the same ordering)"))
    return rows


def _mc_tau_ratio(structure, sigma: float, n: int, gen: torch.Generator) -> tuple[float, float, float, float]:
    """``(sigma, mean, standard error, formula)`` of ``tau_a^2 / tau_b^2`` over ``n`` pairs of distinct free neurons
    of CoBs drawn by :func:`gradcond.teleport.random_cob` (intra) on ``structure``; each CoB gives
    ``num_free // 2`` disjoint pairs.  Cost: ``n / (num_free // 2)`` CoB draws."""
    from ..teleport import random_cob

    half = structure.num_free // 2
    if half < 1:
        raise ValueError("the Monte Carlo needs a structure with at least 2 free neurons.")
    chunks, got = [], 0
    while got < n:
        tau = random_cob(structure, sigma, "intra", gen).tau.detach().to(torch.float64)
        a, b = tau[:half], tau[half:2 * half]
        chunks.append(a * a / (b * b))
        got += half
    r = torch.cat(chunks)[:n]
    th = (sigma * sigma + 3) / (3 * (1 - sigma * sigma))
    return sigma, float(r.mean()), float(r.std() / math.sqrt(n)), th


def _judge_mc(mc, k: float = 4.0) -> bool:
    """Whether every ``(sigma, mean, se, formula)`` has ``|mean - formula| <= k * se`` (``k`` standard errors)."""
    return all(abs(m - th) <= k * se for _, m, se, th in mc)


def _judge_monotone(values) -> bool:
    """Whether ``values`` never decrease (the gap-vs-sigma ordering); NaN anywhere fails."""
    v = [float(x) for x in values]
    return all(math.isfinite(x) for x in v) and all(b >= a for a, b in zip(v, v[1:]))


# ------------------------------------------------------------------------------------------------------------
@register(
    "micro-teleport-angle",
    claim="Micro-teleportation vectors (intra CoB, sigma 1e-3) are perpendicular to back-propagated gradients for "
          "any batch size (a Dirac at 90 degrees), while random vectors are only quasi-orthogonal to them.",
    source="seed 000, Sec. 4.3 / Fig. 4 and appendix Figs. 14-16 (MLP, VGG, ResNet, DenseNet; CIFAR; batch 8 and "
           "64; 100 micro-teleports)",
)
def micro_angle(quick: bool, out_dir: Path) -> list[Row]:
    from ..graph import analyze
    from ..teleport import micro_teleport

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
                            "seed 000, Sec. 4.3 / Fig. 4 (appendix Figs. 14-16)",
                            ", ".join(f"{k} {d:.3g}" for k, d in dev.items()),
                            bool(dev["micro-grad"] < 0.1 and dev["grad-random"] > 3 * dev["micro-grad"]),
                            {"angles": a, "mean_abs_dev": dev, "num_params": int(_flat(model).numel())},
                            paper="micro-teleport vs gradient: a Dirac at 90 degrees; gradient vs random vectors: a "
                                  "spread around 90 (histograms, no numbers)",
                            criterion="mean |angle(micro-teleport vector, gradient) - 90| < 0.1 degree, and the "
                                      "gradient-vs-random mean deviation is more than 3x larger",
                            tolerance="0.1 degree: above the O(sigma) curvature term of a finite sigma = 1e-3 "
                                      "micro-teleport, far below the several-degree spread of random angles at "
                                      "these sizes; 3x separates a Dirac from a spread"))
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
    source="seed 000, Sec. 4.4 / Fig. 5 (MLP; VGG in appendix Fig. 17) (5-hidden-layer MLP on CIFAR-10, batch 8 "
           "vs 1024)",
)
def flatness(quick: bool, out_dir: Path) -> list[Row]:
    from ..graph import analyze
    from ..teleport import random_cob, teleport

    X, y, _, _ = _data()
    steps_small, steps_large = (500, 250) if quick else (2000, 1000)
    nets = {}
    for bs, steps, lr in ((8, steps_small, 0.01), (1024, steps_large, 0.05)):
        m = _model("mlp", seed=0, depth=6, width=64, init="gaussian")  # 5 hidden layers, same (He) init for both
        train_steps(m, X, y, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), steps, bs,
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
                "seed 000, Sec. 4.4 / Fig. 5",
                ", ".join(f"sigma {s}: {v:.3g}" for s, v in zip(sigmas, vals)),
                all(b > a for a, b in zip(vals, vals[1:])),
                {"alphas": alphas.tolist(), "curves": {str(k): v.tolist() for k, v in curves.items()},
                 "sharpness": dict(zip(map(str, sigmas), vals))},
                paper="'the landscape becomes sharper as the CoB-range increases' (curves for sigma 0, 0.6, 0.9, "
                      "0.99; no numbers)",
                criterion="the local sharpness strictly increases along sigma 0 < 0.6 < 0.9 < 0.99",
                tolerance=f"none: strict ordering of means over {reps} CoB pairs per sigma"),
            Row("loss barrier between the two solutions vs sigma", "seed 000, Sec. 4.4 / Fig. 5 (curves only)",
                ", ".join(f"sigma {s}: {barrier[s]:.3g}" for s in sigmas), None,
                {"barrier": {str(k): v for k, v in barrier.items()}},
                paper="(shown in the source's curves, not quantified)",
                criterion="reported only: max interior loss minus the mean of the two end losses",
                tolerance="-")]
