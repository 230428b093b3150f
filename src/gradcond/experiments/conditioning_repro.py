"""Reproductions of seed 004 (Nelson, "Gradient Conditioning in Deep Neural Networks"), scaled to CPU and the
``digits`` data set (8×8 images; the thesis used CIFAR10-sized networks on a GPU, with batch 64).

* ``conditioning-sampler-comparison`` — Figs 2.4 / 3.2: targeted vs random directions in weight and input space, all
  directions scaled to the same Euclidean length η (an unnormalized random direction is ≈ 20× longer than a
  targeted one, which changes what a finite difference measures).
* ``conditioning-depth-sweep`` — Figs 2.6, 3.4, 3.8, 3.10, 3.13, 3.17, 3.20, 4.5-4.9: five families (orthogonal
  ReLU / CReLU, looks-linear, conv without and with residuals) swept over depth; every metric read (as the source
  does) at the point of steepest descent and at the point of lowest loss of each run, and the correlations each
  figure states judged by Spearman's rho against its 5% critical value (judging.spearman / spearman_critical).
* ``looks-linear-depth`` — Fig 3.11: a 40-layer looks-linear CReLU MLP trains with BN; mirrored pairs persist.
* ``conditioning-mask-accuracy`` — §1.6 / mask figures: 5% layer-wise masks vs unmasked metrics on the zoo ResNet,
  judged on the worst (checkpoint, mask) pair, the mean reported beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..probes import conditioning as C
from ..probes.mask import LayerwiseMask
from ._training import train_steps
from .judging import (at_least, enough_samples, loss_decreases, rho_power, setting_matches, spearman, spearman_critical,
                      treatment_happened)
from .registry import Row, register

LOSS = F.cross_entropy


def _plt():
    # figures on their own Agg canvas: never switch the process-wide matplotlib backend (a user's notebook)
    from ..report.figures import object_pyplot

    return object_pyplot()


def _digits(form: str):
    from ..data import load_dataset

    d = load_dataset("digits", form=form)
    return d.train.tensors


def _batches(X, Y, b, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X.shape[0], generator=g)
    return [(X[perm[i * b:(i + 1) * b]], Y[perm[i * b:(i + 1) * b]]) for i in range(k)]


def _train(model, X, Y, steps, lr, b=64, seed=0):
    """``steps`` steps of SGD+momentum 0.9 (a fresh optimizer) on batches of ``b`` rows drawn with replacement,
    through :func:`gradcond.train.fit`; returns the per-step training losses (ending with NaN if it diverged)."""
    return train_steps(model, X, Y, "momentum", steps, b, torch.Generator().manual_seed(seed), sampling="replacement",
                       lr=lr, momentum=0.9)


def _bootstrap_max(values: torch.Tensor, size: int, reps: int = 1000, seed: int = 0) -> float:
    """Expected max over ``size`` of the last-dim entries (drawn with replacement); for a (m, n) matrix the
    per-sample max is averaged over rows (eq. 3.16)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.shape[-1], (reps, size), generator=g)
    if values.ndim == 1:
        return float(values[idx].max(dim=1).values.mean())
    return float(values[:, idx].max(dim=2).values.mean(0).mean())


# ---------------------------------------------------------------------------------------------------- samplers
@register(
    "conditioning-sampler-comparison",
    claim="Targeted (gradient) directions give larger κ≈ estimates than random ones in weight space, but all "
          "direction samplers perform the same in input space.  (κ≈ is a directional estimate of κ; in smooth "
          "networks it tends to a lower bound of κ as η -> 0, but in ReLU/BN networks the finite difference can "
          "exceed the exact κ -- activation switches make it no lower bound -- so 'larger' is not 'tighter'.)",
    source="seed 004, Figs 2.4 and 3.2 (11-layer CNN with normalization, no skips; 64 directions, bootstrapped "
           "expected max over 16)",
    protocol="An 11-layer VGG-style CNN with BN and no skips (10 conv3x3 + a linear head, scaled to 8x8 digits), "
             "trained with SGD + momentum (lr 0.02, batch 64) and measured at checkpoints 0 and 60 (quick) / 0, "
             "100, 300 (full) on one batch of 64: 32 / 64 directions per sampler, bootstrapped expected max over "
             "8 / 16 (the source: 64 and 16), kappa_X over 16 / 32 samples. Every direction is scaled to the same "
             "Euclidean length eta = 1e-3 (norm '2'; the source's targeted directions are L-inf-normalised, which "
             "makes them ~20x shorter than random ones in L2 -- a different finite difference). Thresholds fixed "
             "before the run: targeted/random > 1 at every checkpoint; input-space samplers within a factor 1.25. "
             "Precondition of the weight row: the measured direction lengths equal eta.",
)
def sampler_comparison(quick: bool, out_dir: Path) -> list[Row]:
    from ..zoo import vgg

    X, Y = _digits("image")
    torch.manual_seed(0)
    # 10 conv3x3+BN+ReLU layers and a linear head = 11 layers, no skips (scaled to 8×8 inputs)
    cfg = (16, 16, "M", 32, 32, 32, "M", 32, 32, 32, "M", 32, 32)
    model = vgg(1, 10, cfg=cfg, batch_norm=True)
    n_dir, sub, m = (32, 8, 16) if quick else (64, 16, 32)
    checkpoints = (0, 60) if quick else (0, 100, 300)
    batch = _batches(X, Y, 64, 1, seed=1)[0]
    res = {k: [] for k in ("W targeted", "W random", "W limited (±ḡ)", "X targeted", "X random", "X interpolation")}
    done, lens, len_dev = 0, {}, 0.0
    for cp in checkpoints:
        _train(model, X, Y, cp - done, lr=0.02, seed=cp)
        done = cp
        # every direction scaled to Euclidean length eta (norm="2"): targeted, random and ±ḡ steps are equally long
        kw = dict(eta=1e-3, seed=cp, norm="2")
        rt = C.step_consistency(model, LOSS, batch, sampler="targeted", n=n_dir, **kw)
        rr = C.step_consistency(model, LOSS, batch, sampler="random", n=n_dir, **kw)
        rl = C.step_consistency(model, LOSS, batch, **kw)
        for nm, r in (("targeted", rt), ("random", rr), ("±ḡ", rl)):
            on = [float(v) for v in r.details["omega_norms"]]
            lens[nm] = max(lens.get(nm, 0.0), max(on) if on else float("nan"))
            dev = max((abs(v / 1e-3 - 1) for v in on), default=float("nan"))
            len_dev = max(len_dev, dev) if math.isfinite(dev) else float("nan")
        res["W targeted"].append(_bootstrap_max(torch.tensor(rt.details["ratios"]), sub))
        res["W random"].append(_bootstrap_max(torch.tensor(rr.details["ratios"]), sub))
        res["W limited (±ḡ)"].append(rl.value)
        for s in ("targeted", "random", "interpolation"):
            r = C.batch_dissonance(model, LOSS, batch, sampler=s, n=n_dir, m=m, **kw)
            res[f"X {s}"].append(_bootstrap_max(torch.tensor(r.details["ratios"]), sub))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for k, v in res.items():
        ax = axes[0] if k.startswith("W") else axes[1]
        ax.plot(checkpoints, v, "o-", label=k)
    for ax, t in zip(axes, ("weight space κ≈_W", "input space κ̄≈_X")):
        ax.set_xlabel("training step")
        ax.set_ylabel(f"bootstrapped E[max over {sub}]")
        ax.set_yscale("log")
        ax.set_title(t)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "conditioning_sampler_comparison.png", dpi=100)
    plt.close(fig)
    w_ratio = [a / b for a, b in zip(res["W targeted"], res["W random"])]
    lengths = ", ".join(f"{k} {v:.3g}" for k, v in lens.items())
    xs = [[res[f"X {s}"][i] for s in ("targeted", "random", "interpolation")] for i in range(len(checkpoints))]
    x_spread = [max(v) / min(v) for v in xs]
    scale = (f"CPU scale: 11-layer VGG-style BN CNN on digits 8×8, batch 64, {n_dir} directions, bootstrap over "
             f"{sub}, κ_X over m={m} samples, checkpoints {checkpoints}")
    scale += f"; every direction of Euclidean length η = 1e-3 (measured: {lengths})"
    return [
        Row(claim="weight space: targeted directions give larger κ≈_W than random ones, at equal step length",
            source="seed 004, §2.3 / Fig 2.4",
            ours=f"targeted/random = {', '.join(f'{r:.3g}' for r in w_ratio)} at steps {checkpoints}; ±ḡ sampler "
                 f"{', '.join(f'{v:.3g}' for v in res['W limited (±ḡ)'])}. {scale}",
            holds=all(r > 1 for r in w_ratio), data={"checkpoints": list(checkpoints), **res, "lengths": dict(lens)},
            preconditions=[setting_matches(math.isfinite(len_dev) and len_dev <= 1e-3, "every weight direction of "
                                           "Euclidean length eta = 1e-3 (within 0.1 %)", f"largest relative deviation "
                                           f"of a direction's length from eta: {len_dev:.1e}", len_dev)],
            paper="targeted directions give larger κ≈_W than random ones (plotted, no numbers)",
            criterion="bootstrapped E[max over the sample] of κ≈_W, targeted / random > 1 at every checkpoint, "
                      "all directions of equal Euclidean length",
            tolerance="none: strict ordering at each checkpoint"),
        Row(claim="input space: targeted, random and interpolation directions give the same κ̄≈_X, at equal step "
                  "length",
            source="seed 004, §3.3 / Fig 3.2",
            ours=f"max/min across samplers = {', '.join(f'{r:.3g}' for r in x_spread)} at steps {checkpoints}",
            holds=all(r < 1.25 for r in x_spread), data={"spread": x_spread},
            paper="the samplers 'performed identically' (plotted, no numbers)",
            criterion="max/min of the three samplers' bootstrapped κ̄≈_X < 1.25 at every checkpoint",
            tolerance="1.25: our reading of 'identically' (the source gives no number), fixed before the run"),
    ]


# ---------------------------------------------------------------------------------------------------- depth sweep
_METRIC_NAMES = ("kappa_W", "kappa_X", "rank_input", "rank_weight", "confusion", "diversity", "coherence",
                 "min_cosine", "weight_diversity", "weight_coherence")


def all_metrics(model, batch, loader, n_dir: int = 4, m: int = 16, mask=None) -> dict[str, float]:
    """Every seed-004 metric of ``model`` on ``batch`` (and the ``loader`` batches for confusion / diversity)."""
    out = {}
    step = C.step_metrics(model, LOSS, batch, mask=mask)
    out["kappa_W"] = step["step_consistency"].value
    out["min_cosine"] = step["min_cosine"].value
    out["weight_diversity"] = step["weight_diversity"].value
    out["weight_coherence"] = step["weight_coherence"].value
    out["kappa_X"] = C.batch_dissonance(model, LOSS, batch, n=n_dir, m=m, mask=mask).value
    out["rank_input"] = C.relative_gradient_rank(model, LOSS, batch).value
    out["rank_weight"] = C.relative_gradient_rank(model, LOSS, batch, wrt="weight", mask=mask).value
    out["confusion"] = C.gradient_confusion(model, LOSS, loader, n_batches=len(loader), n_pairs=None, mask=mask).value
    out["diversity"] = C.gradient_diversity(model, LOSS, loader, n_batches=len(loader), mask=mask).value
    out["coherence"] = C.gradient_coherence(model, LOSS, batch, mask=mask).value
    return out


def _descent(losses, window=20):
    """(steepest-descent rate, best loss) from a moving average over ``window`` steps (seed 004 §3 scatter plots)."""
    t = torch.tensor([v if math.isfinite(v) else float("nan") for v in losses], dtype=torch.float64)
    if t.isnan().any():
        t = t[: int(t.isnan().nonzero()[0, 0])]
    if t.numel() <= window:
        return float("nan"), float(t.min()) if t.numel() else float("nan")
    ma = t.unfold(0, window, 1).mean(1)
    rate = float((ma[:-window] - ma[window:]).max() / window) if ma.numel() > window else float(ma[0] - ma[-1])
    return rate, float(ma.min())


def _descent_points(losses, window=20) -> tuple[float, float, int, int]:
    """``(rate, best loss, step of steepest descent, step of lowest loss)`` from a moving average over ``window``
    steps (seed 004 §3: "a moving average over 20 samples").  The steepest-descent step is the middle of the two
    windows whose averages differ most; the lowest-loss step is the middle of the window with the lowest average.
    Non-finite losses truncate the curve (divergence).  Steps count from 0 (the loss of the first step)."""
    t = torch.tensor([v if math.isfinite(v) else float("nan") for v in losses], dtype=torch.float64)
    if t.isnan().any():
        t = t[: int(t.isnan().nonzero()[0, 0])]
    rate, best = _descent(t.tolist(), window)
    if t.numel() <= window:
        return rate, best, 0, int(t.argmin()) if t.numel() else 0
    ma = t.unfold(0, window, 1).mean(1)
    if ma.numel() > window:
        j = int((ma[:-window] - ma[window:]).argmax())
        steep = j + window
    else:
        steep = t.numel() // 2
    low = int(ma.argmin()) + window // 2
    return rate, best, steep, low


def judge_corr(rho: float, n: int, expect: str) -> bool | None:
    """Judge a stated correlation from Spearman ``rho`` over ``n`` networks against the two-sided 5 % critical value
    (:func:`~gradcond.experiments.judging.spearman_critical`). ``expect``: ``"positive"`` / ``"negative"`` (that
    sign and |rho| >= critical), ``"any"`` (|rho| >= critical, either sign), ``"none"`` (|rho| < critical: no
    detectable correlation). ``None`` when rho is undefined (NaN: fewer than 3 finite pairs or a constant side) --
    not judged, never a pass. The entry makes the critical value's reachability a precondition
    (:func:`~gradcond.experiments.judging.rho_power`)."""
    if expect not in ("positive", "negative", "any", "none"):
        raise ValueError(f"expect must be 'positive', 'negative', 'any' or 'none', got {expect!r}.")
    if not math.isfinite(rho):
        return None
    crit = spearman_critical(n)
    if expect == "positive":
        return rho >= crit
    if expect == "negative":
        return rho <= -crit
    if expect == "any":
        return abs(rho) >= crit
    return abs(rho) < crit


# the source's stated correlations (notes 004 §3.2, paraphrasing the figure captions): metric, where it is read
# ("steep": at the point of steepest descent, vs the steepest-descent rate; "low": at the point of lowest loss, vs
# the best loss), the expected sign (rate: higher = faster; best loss: lower = better), and the source's place
_STATED = [
    ("kappa_W", "low", "positive", "Fig 2.6: 'excessively high' κ≈_W networks fail to converge (high -> worse loss)"),
    ("kappa_X", "steep", "any", "Fig 3.4: excluding ConvNet26, 'a strong correlation' with the fastest descent rate"),
    ("rank_weight", "steep", "any", "Fig 3.8: excluding ConvNet26, 'a strong correlation' with the fastest descent "
                                    "rate"),
    ("rank_weight", "low", "none", "Fig 3.8: no correlation at the lowest loss"),
    ("rank_input", "steep", "any", "Fig 3.10: excluding ConvNet26, 'a strong correlation' with the fastest descent "
                                   "rate"),
    ("confusion", "steep", "any", "Fig 3.13: 'a clear correlation' with the fastest descent rate"),
    ("confusion", "low", "positive", "Fig 3.13: 'a strong correlation between lower Gradient Confusion and improved "
                                     "final performance'"),
    ("diversity", "steep", "any", "Fig 3.17: 'a clear correlation' with the fastest descent rate"),
    ("diversity", "low", "positive", "Fig 3.17: 'a strong correlation between lower Gradient Diversity and improved "
                                     "final performance'"),
    ("weight_diversity", "steep", "any", "Fig 4.7: 'a trend apparent in the point of steepest descent graph'"),
    ("weight_diversity", "low", "any", "Fig 4.7: little difference at convergence except for the networks that "
                                      "converged to zero loss"),
    ("weight_coherence", "low", "negative", "Fig 4.9: 'very low values ... are correlated with decreased final "
                                            "performance'"),
]


def _conv_net(depth: int) -> nn.Sequential:
    """Family "ConvNet" (convolutions without skips or normalisation, ReLU): ``depth`` conv3x3 layers in three
    stages of widths 16/32/32, each stage ended by a 2x2 max-pool (8x8 -> 1x1), then a linear head."""
    from ..zoo import vgg

    per = [depth // 3 + (1 if i < depth % 3 else 0) for i in range(3)]
    cfg: list = []
    for stage, (k, c) in enumerate(zip(per, (16, 32, 32))):
        cfg += [c] * k + ["M"]
    return vgg(1, 10, cfg=tuple(cfg), batch_norm=False)


def _res_net(blocks: int, width: int = 16) -> nn.Sequential:
    """Family "ResNet" (residual convolutions with BatchNorm): a conv3x3+BN+ReLU stem, ``blocks`` basic blocks of
    two conv3x3+BN layers with identity skips (stride 1, width ``width``), global average pool, linear head
    (2 * blocks + 2 layers)."""
    from ..zoo.layers import BasicBlock

    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [BasicBlock(width, width) for _ in range(blocks)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def sweep_networks(quick: bool) -> list[tuple[str, str, str, object]]:
    """The depth sweep of seed 004 §3 at CPU scale: ``(name, family, kind, builder)`` for each network. Five
    families swept over depth, as the thesis's (its plot labels are family + layer count, e.g. Ortho11,
    ConvNet26): "Ortho" (fully connected ReLU, orthogonal init), "CReLU" (fully connected CReLU, orthogonal init),
    "LL" (looks-linear CReLU, Def 3.9), "ConvNet" (convolutions without skips) and "ResNet" (residual
    convolutions). Quick: 3 depths per family (15 networks, Spearman critical value 0.521); full: 5 (25, 0.398)."""
    from ..zoo import looks_linear_crelu_mlp, mlp

    fc = (3, 8, 16) if quick else (3, 6, 10, 16, 24)
    conv = (3, 6, 12) if quick else (3, 5, 8, 12, 16)
    res = (1, 3, 6) if quick else (1, 2, 4, 6, 8)
    nets = []
    for d in fc:
        nets.append((f"Ortho{d}", "Ortho", "fc", lambda d=d: mlp(64, 10, depth=d, width=64, init="orthogonal",
                                                                 seed=0)))
    for d in fc:
        nets.append((f"CReLU{d}", "CReLU", "fc", lambda d=d: mlp(64, 10, depth=d, width=32, act="crelu",
                                                                 init="orthogonal", seed=0)))
    for d in fc:
        nets.append((f"LL{d}", "LL", "fc", lambda d=d: looks_linear_crelu_mlp(64, 10, depth=d, width=32, seed=0)))
    for d in conv:
        nets.append((f"ConvNet{d + 1}", "ConvNet", "conv", lambda d=d: _conv_net(d)))
    for k in res:
        nets.append((f"ResNet{2 * k + 2}", "ResNet", "conv", lambda k=k: _res_net(k)))
    return nets


def correlation_row(met: str, point: str, expect: str, where: str, names: list[str], xs, ys, families: dict,
                    scale: str = "") -> Row:
    """One stated correlation of the depth sweep: Spearman's rho (judging.spearman) between the metric ``xs`` (read
    at ``point``) and the outcome ``ys`` over the networks, judged against the two-sided 5 % critical value by
    :func:`judge_corr`; precondition: the critical value is reachable with this many networks (judging.rho_power).
    The within-family rhos are reported beside it (3-5 depths per family cannot be judged alone)."""
    rho, n_ok = spearman(xs, ys)
    crit = spearman_critical(n_ok)
    within = []
    for fam in dict.fromkeys(families.values()):
        idx = [i for i, n in enumerate(names) if families[n] == fam]
        r_f, n_f = spearman([xs[i] for i in idx], [ys[i] for i in idx])
        within.append(f"{fam} {r_f:+.2f}" if math.isfinite(r_f) else f"{fam} n/a")
    return Row(
        claim=f"{met} at the point of {'steepest descent' if point == 'steep' else 'lowest loss'} vs "
              f"{'steepest-descent rate' if point == 'steep' else 'best loss'}: "
              + ("no correlation" if expect == "none" else f"{expect} correlation"),
        source="seed 004, " + where.split(":")[0], paper=where.split(": ", 1)[1],
        ours=f"Spearman rho = {rho:.2f} over {n_ok} networks (5% critical value {crit:.3g}); within families: "
             + ", ".join(within) + "; " + ", ".join(f"{n}: {x:.3g}" for n, x in zip(names, xs))
             + (f". {scale}" if scale else ""),
        holds=judge_corr(rho, n_ok, expect), preconditions=[rho_power(n_ok)],
        data={"rho": rho, "n": n_ok, "critical": crit, "values": dict(zip(names, map(float, xs))),
              "outcome": dict(zip(names, map(float, ys))), "within_family": within},
        criterion={"positive": "rho >= the two-sided 5% critical value", "negative": "rho <= -(the two-sided 5% "
                   "critical value)", "any": "|rho| >= the two-sided 5% critical value (the source gives no "
                   "sign)", "none": "|rho| < the two-sided 5% critical value (no detectable correlation)"}[expect]
                  + "; not judged when rho is undefined (fewer than 3 finite pairs)",
        tolerance=f"Spearman 5% critical value for {n_ok} pairs (judging.spearman_critical, Zar 1972): the smallest "
                  "|rho| that chance alone exceeds 5% of the time")


@register(
    "conditioning-depth-sweep",
    claim="Gradient-conditioning metrics, read at the point of steepest descent and at the point of lowest loss, "
          "correlate with how fast and how far networks train (as each figure states); input-gradient rank > .15 at "
          "init mostly predicts failure; fully connected nets have lower coherence than convolutional ones.",
    source="seed 004, Figs 2.6, 3.4, 3.8, 3.10, 3.13, 3.17, 3.19-3.20, 4.5, 4.7, 4.9 and §4.2.1 (qualitative; no "
           "numeric tables)",
    protocol="The thesis sweeps depth within families (plot labels family + layer count: Ortho11, ConvNet26, ...) "
             "and scatters every network in one plot per metric. At CPU scale on digits: five families -- fully "
             "connected ReLU with orthogonal init (Ortho), fully connected CReLU with orthogonal init (CReLU), "
             "looks-linear CReLU (LL, Def 3.9), convolutions without skips (ConvNet) and residual convolutions with "
             "BN (ResNet) -- at 3 depths each in quick mode (15 networks) and 5 in full mode (25). Every network: "
             "SGD + momentum 0.9, lr 0.02, batch 64 (the thesis's), 300 / 1500 steps; the metrics are read at the "
             "snapshot (every 10 steps) nearest the point of steepest descent and of lowest loss (moving average "
             "over 20 steps, §3), not smoothed over a few hundred iterations. Each stated correlation is judged by "
             "Spearman's rho over all networks against the two-sided 5 % critical value (fixed before the run); "
             "precondition: the critical value is reachable (>= 6 networks). Within-family rhos are reported.",
)
def depth_sweep(quick: bool, out_dir: Path) -> list[Row]:
    import copy

    Xf, Yf = _digits("flat")
    Xi, Yi = _digits("image")
    specs = sweep_networks(quick)
    steps = 300 if quick else 1500
    every = 10  # snapshot spacing: the metrics are read at the snapshot nearest each point
    rows_data = {}

    def metrics_or_nan(model, batch, loader):
        try:
            return all_metrics(model, batch, loader)
        except ValueError as exc:  # diverged or dead network: metric undefined
            return {**{k: float("nan") for k in _METRIC_NAMES}, "error": str(exc)}

    from ..utils import progress

    for name, family, kind, make in progress(specs, desc="conditioning-depth-sweep"):
        torch.manual_seed(0)
        model = make()
        X, Y = (Xf, Yf) if kind == "fc" else (Xi, Yi)
        batch = _batches(X, Y, 64, 1, seed=7)[0]
        loader = _batches(X, Y, 64, 4, seed=8)
        init = metrics_or_nan(model, batch, loader)
        snaps = {0: copy.deepcopy(model.state_dict())}

        def snap(step, model=model, snaps=snaps):
            snaps[step] = copy.deepcopy(model.state_dict())

        losses = train_steps(model, X, Y, "momentum", steps, 64, torch.Generator().manual_seed(0),
                             sampling="replacement", lr=0.02, momentum=0.9, record=snap, every=every)
        rate, best, i_steep, i_low = _descent_points(losses)
        at = {}
        for point, i in (("steep", i_steep), ("low", i_low)):
            # snapshot keys count completed steps; the loss of step i is taken before step i + 1 completes
            key = min(snaps, key=lambda k: abs(k - i))
            probe = copy.deepcopy(model)
            probe.load_state_dict(snaps[key])
            at[point] = metrics_or_nan(probe, batch, loader)
            at[point + "_step"] = key
        rows_data[name] = {"family": family, "kind": kind, "init": init, "steep": at["steep"], "low": at["low"],
                           "steep_step": at["steep_step"], "low_step": at["low_step"], "rate": rate,
                           "best_loss": best, "losses": losses[:: max(1, len(losses) // 100)]}
    names = list(rows_data)
    families = {n: rows_data[n]["family"] for n in names}
    plt = _plt()
    fig, axes = plt.subplots(2, len(_METRIC_NAMES), figsize=(2.6 * len(_METRIC_NAMES), 5.2))
    colors = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(families.values()))}
    for j, met in enumerate(_METRIC_NAMES):
        for i, (point, key, lab) in enumerate((("steep", "rate", "steepest-descent rate"),
                                               ("low", "best_loss", "best loss"))):
            ax = axes[i, j]
            for fam, col in colors.items():
                fn = [n for n in names if families[n] == fam]
                ax.scatter([rows_data[n][point][met] for n in fn], [rows_data[n][key] for n in fn], s=14, c=col,
                           label=fam)
            for n in names:
                ax.annotate(n, (rows_data[n][point][met], rows_data[n][key]), fontsize=4)
            ax.set_xlabel(f"{met} at {'steepest descent' if point == 'steep' else 'lowest loss'}", fontsize=7)
            if j == 0:
                ax.set_ylabel(lab, fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out_dir / "conditioning_depth_sweep.png", dpi=100)
    plt.close(fig)
    scale = (f"CPU scale: {len(names)} networks of 5 families on digits, batch 64, SGD+momentum lr 0.02, {steps} "
             f"steps; metrics read at the snapshot (every {every} steps) nearest the steepest-descent / lowest-loss "
             "point")
    best0 = math.log(10)
    rows = []
    for i, (met, point, expect, where) in enumerate(_STATED):
        key = "rate" if point == "steep" else "best_loss"
        rows.append(correlation_row(met, point, expect, where, names, [rows_data[n][point][met] for n in names],
                                    [rows_data[n][key] for n in names], families, scale if i == 0 else ""))
    # the metrics the source calls inconclusive or gives no correlation for: reported only
    for met in ("min_cosine", "coherence"):
        rho_r, _ = spearman([rows_data[n]["steep"][met] for n in names], [rows_data[n]["rate"] for n in names])
        rho_b, _ = spearman([rows_data[n]["low"][met] for n in names], [rows_data[n]["best_loss"] for n in names])
        rows.append(Row(claim=f"{met} vs training outcome (reported only)",
                        source="seed 004, " + ("Figs 4.3-4.5" if met == "min_cosine" else "Fig 3.20"),
                        paper=("'inconclusive', likely an Opacus artefact" if met == "min_cosine" else
                               "not predictive within convolutional networks; extremes suggest poor performance"),
                        ours=f"rho(at steepest descent, rate) = {rho_r:.2f}, rho(at lowest loss, best loss) = "
                             f"{rho_b:.2f} over {len(names)} networks",
                        holds=None, data={"rho_rate": rho_r, "rho_best": rho_b},
                        criterion="reported only: the source states no correlation to test", tolerance="-"))
    rows.append(rank_failure_row({n: rows_data[n]["init"]["rank_input"] for n in names},
                                 {n: rows_data[n]["best_loss"] for n in names}, best0))
    fc = [rows_data[n]["init"]["coherence"] for n in names if rows_data[n]["kind"] == "fc"]
    cv = [rows_data[n]["init"]["coherence"] for n in names if rows_data[n]["kind"] == "conv"]
    rows.append(Row(claim="fully connected networks have lower gradient coherence than convolutional ones",
                    source="seed 004, Fig 3.19", paper="fully connected networks 'uniformly lower'",
                    ours=f"coherence at init: FC max {max(fc):.3g} vs conv min {min(cv):.3g} "
                         f"(means {sum(fc) / len(fc):.3g} vs {sum(cv) / len(cv):.3g}; {len(fc)} FC, {len(cv)} conv)",
                    holds=max(fc) < min(cv), data={"fc": fc, "conv": cv},
                    criterion="every FC network's coherence at init is below every conv network's",
                    tolerance="none: strict separation ('uniformly')"))
    rows.append(Row(claim="training outcome per network", source="seed 004, §3 (protocol)",
                    ours="; ".join(f"{n}: rate {rows_data[n]['rate']:.3g}, best loss {rows_data[n]['best_loss']:.3g}, "
                                   f"steepest at step {rows_data[n]['steep_step']}, lowest at "
                                   f"{rows_data[n]['low_step']}" for n in names), holds=None,
                    data={n: {k: v for k, v in d.items() if k != "losses"} for n, d in rows_data.items()},
                    paper="-", criterion="reported only", tolerance="-"))
    return rows


def rank_failure_row(rank_init: dict, best_loss: dict, start_loss: float = math.log(10)) -> Row:
    """§4.2.1: networks with input-gradient rank > .15 at initialisation mostly fail to converge (best loss not below
    half the initial ln 10). "Mostly" = more than half; power: at least 5 such networks (with 1 or 2 the share is a
    coin flip)."""
    high = [n for n, v in rank_init.items() if v > 0.15]
    failed = [n for n in high if not best_loss[n] < 0.5 * start_loss]
    return Row(claim="input-gradient rank > .15 at initialisation mostly predicts failure to converge",
               source="seed 004, §4.2.1",
               paper="networks above .15 at initialisation 'mostly failed to converge'",
               ours=f"networks above .15: {high or 'none'}; of those failing (best loss >= ½ ln 10): {failed}",
               holds=(len(failed) > len(high) / 2) if high else None,
               preconditions=[enough_samples(len(high), 5, "networks with input-gradient rank > .15 at init")],
               data={"rank_init": dict(rank_init), "failed": failed},
               criterion="more than half of the networks with rank_input > .15 at init have best loss >= ½ ln 10",
               tolerance=".15: the source's threshold; 'failed' = best loss not below half the initial ln 10")


# ---------------------------------------------------------------------------------------------------- looks-linear
def _mirror_pairs(model):
    """The layers fed by CReLU: (W_a, W_b) halves of each Linear weight [W_a, W_b] after the first."""
    for mod in model:
        if isinstance(mod, torch.nn.Linear) and mod.in_features % 2 == 0 and mod is not model[0]:
            h = mod.in_features // 2
            yield mod.weight.detach()[:, :h], mod.weight.detach()[:, h:]


def mirrored_distance(model) -> float:
    """max over layers fed by CReLU of ‖W_a + W_b‖_F / ‖W_a‖_F, where the layer weight is [W_a, W_b] (0 at init)."""
    return max((float((a + b).norm() / a.norm()) for a, b in _mirror_pairs(model)), default=0.0)


def mirrored_distance_bound(model, init_model) -> float:
    """The largest mirrored distance the weights' movement allows: max over layers of (‖ΔW_a‖ + ‖ΔW_b‖) / ‖W_a‖
    (triangle inequality, since W_a + W_b = ΔW_a + ΔW_b when the init has W_b = −W_a). Below a threshold, the
    mirrored-pair row cannot fail whatever the training did to the pairing."""
    out = 0.0
    for (a, b), (a0, b0) in zip(_mirror_pairs(model), _mirror_pairs(init_model)):
        out = max(out, float(((a - a0).norm() + (b - b0).norm()) / a.norm()))
    return out


def _linearity_error(model, X) -> float:
    with torch.no_grad():
        A = model(torch.eye(X.shape[1])).T
        fx = model(X)
        return float(((fx - X @ A.T).norm(dim=1) / fx.norm(dim=1)).max())


MIRROR_MAX = 0.5  # 'mirrored pairs persist': ||W_a + W_b|| / ||W_a|| < 0.5, fixed before the run


def looks_linear_rows(runs: dict, lin_err: float, ctrl_err: float, scale: str = "") -> list[Row]:
    """The judged rows of ``looks-linear-depth`` from the three runs (``first`` / ``last`` mean losses, ``mirror_*``
    distances, ``mirror_bound``). Preconditions: the linearity check can fail (a default-init CReLU net of the same
    depth is > 0.1 off); the BN network learns (its loss halves) for the rows saying the others do not train
    smoothly; for the mirrored-pair row, also that the weights moved enough for a distance >= 0.5 to be possible."""
    bn, nn_, cr = runs["LL-40 + BN"], runs["LL-40 no norm"], runs["CReLU-40 + BN, default init"]
    ok = lambda r: math.isfinite(r["last"]) and r["last"] < 0.5 * r["first"]  # noqa: E731
    bn_learns = loss_decreases(bn["first"], bn["last"], 0.5, what="LL-40 + BN's training loss (mean of the first 10 "
                               "vs the last 20 steps)")
    power = at_least("power", ctrl_err, 0.1, "linearity error of a default-init CReLU MLP of depth 40", fmt=".2f")
    moved = treatment_happened(bn["mirror_bound"], MIRROR_MAX, "largest mirrored distance the weights' movement "
                               "allows, max_l (||dW_a|| + ||dW_b||) / ||W_a||", fmt=".3f")
    return [
        Row(claim="LL-40 without norm computes an exactly linear map at init",
            source="seed 004, Def 3.9", ours=f"max rel. error {lin_err:.1e} (default-init CReLU-40: {ctrl_err:.2f})",
            holds=lin_err < 1e-4, preconditions=[power],
            data={"error": lin_err, "control_error": ctrl_err},
            paper="'behave perfectly linearly' at initialisation (exact: W_L…W_1 x)",
            criterion="max over 128 inputs of ||f(x) - A x|| / ||f(x)|| < 1e-4, A read off the identity inputs",
            tolerance="1e-4: float32 rounding accumulated over 40 layers (~40 × 1e-7 per layer, with margin)"),
        Row(claim="LL-40 with BN trains (loss falls below half its start)",
            source="seed 004, §3.5 text beside Fig 3.11",
            ours=f"loss {bn['first']:.3f} -> {bn['last']:.3f}. {scale}", holds=ok(bn),
            data={k: v for k, v in bn.items() if k != "losses"},
            paper="'converged smoothly as long as batch normalization was used'",
            criterion="mean loss of the last 20 steps < half the mean of the first 10 (finite)",
            tolerance="factor 2: a clear fall within the short CPU run, fixed before the run"),
        Row(claim="LL-40 without normalization does not train smoothly",
            source="seed 004, §3.5 text beside Fig 3.11",
            ours=f"loss {nn_['first']:.3f} -> {nn_['last']:.3f}", holds=not ok(nn_), preconditions=[bn_learns],
            data={k: v for k, v in nn_.items() if k != "losses"},
            paper="smooth convergence 'as long as batch normalization was used'",
            criterion="NOT (mean loss of the last 20 steps < half the mean of the first 10)",
            tolerance="factor 2, the same as the BN row"),
        Row(claim="CReLU-40 with BN but without the symmetric init fails",
            source="seed 004, §3.5 text beside Fig 3.11",
            paper="'We were unable to train a comparable network without symmetric initialization. Every attempt "
                  "diverged or failed to converge'",
            criterion="NOT (mean loss of the last 20 steps < half the mean of the first 10)",
            tolerance="factor 2, the same as the BN row",
            ours=f"loss {cr['first']:.3f} -> {cr['last']:.3f}", holds=not ok(cr), preconditions=[bn_learns],
            data={k: v for k, v in cr.items() if k != "losses"}),
        Row(claim=f"mirrored pairs persist: max_layer ‖W_a + W_b‖/‖W_a‖ stays small (< {MIRROR_MAX}) in LL-40 + BN",
            source="seed 004, Fig 3.11",
            paper="'some mirrored pairs persist during training' (plotted, no numbers)",
            criterion=f"max over layers of ||W_a + W_b||_F / ||W_a||_F < {MIRROR_MAX} after training (0 at init)",
            tolerance=f"{MIRROR_MAX}: half the size of an unpaired layer, our reading of 'persist'; fixed before the run",
            ours=f"{bn['mirror_init']:.1e} at init -> {bn['mirror_final']:.3f} after training, at most "
                 f"{bn['mirror_bound']:.3f} possible given the weights' movement (no norm: {nn_['mirror_final']:.3f})",
            holds=bn["mirror_final"] < MIRROR_MAX, preconditions=[bn_learns, moved],
            data={"bn": bn["mirror_final"], "none": nn_["mirror_final"], "bound": bn["mirror_bound"]}),
    ]


@register(
    "looks-linear-depth",
    claim="A 40-layer looks-linear CReLU MLP trains smoothly only with batch norm, and mirrored weight pairs "
          "|w_a + w_b| stay small during training.",
    source="seed 004, Def 3.9, §3.5 and Fig 3.11",
    protocol="Looks-linear CReLU MLPs (Def 3.9: orthogonal W, next layer [W, −W]) of 40 linear layers, with and "
             "without BN, and a CReLU-40 + BN with default init, on digits; width 32 / 150 steps (quick), 64 / 800 "
             "(full); SGD + momentum 0.9, lr 0.01, batch 64 (the thesis's batch; its widths, optimiser and steps "
             "are not stated). 'Trains' = mean loss of the last 20 steps below half the first 10 (fixed before the "
             "run). Preconditions: the LL-40 + BN network learns, for the rows that say the others do not; the "
             "weights moved enough that the mirrored distance could exceed 0.5; the linearity check detects a "
             "default-init CReLU net.",
)
def looks_linear(quick: bool, out_dir: Path) -> list[Row]:
    import copy

    from ..zoo import looks_linear_crelu_mlp, mlp

    X, Y = _digits("flat")
    width, steps = (32, 150) if quick else (64, 800)
    runs = {}
    nets = {
        "LL-40 + BN": lambda: looks_linear_crelu_mlp(64, 10, depth=40, width=width, norm="batch", seed=0),
        "LL-40 no norm": lambda: looks_linear_crelu_mlp(64, 10, depth=40, width=width, norm="none", seed=0),
        "CReLU-40 + BN, default init": lambda: mlp(64, 10, depth=40, width=width, act="crelu", norm="batch", seed=0),
    }
    lin_err = None
    for name, make in nets.items():
        torch.manual_seed(0)
        model = make()
        if name == "LL-40 no norm":
            lin_err = _linearity_error(model, X[:128])
        init = copy.deepcopy(model)
        d0 = mirrored_distance(model) if name.startswith("LL") else None
        losses = _train(model, X, Y, steps, lr=0.01)
        runs[name] = {"losses": losses, "first": sum(losses[:10]) / 10, "last": sum(losses[-20:]) / len(losses[-20:]),
                      "mirror_init": d0, "mirror_final": mirrored_distance(model) if name.startswith("LL") else None,
                      "mirror_bound": mirrored_distance_bound(model, init) if name.startswith("LL") else None}
    torch.manual_seed(0)
    ctrl_err = _linearity_error(mlp(64, 10, depth=40, width=width, act="crelu", bias=False, seed=0), X[:128])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in runs.items():
        ax.plot(r["losses"], label=name, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "looks_linear_depth.png", dpi=100)
    plt.close(fig)
    scale = f"CPU scale: width {width}, digits, batch 64, SGD+momentum lr 0.01, {steps} steps"
    return looks_linear_rows(runs, lin_err, ctrl_err, scale)


# ---------------------------------------------------------------------------------------------------- masks
_KX_VARIANTS = ("kappa_X (finite difference, m=8)", "kappa_X (jvp, m=64)")


def _kappa_x_variants(model, batch, mask=None) -> dict[str, float]:
    """The two comparison estimators of κ≈_X reported next to the main one (m = 64, finite differences)."""
    return {
        _KX_VARIANTS[0]: C.batch_dissonance(model, LOSS, batch, n=2, m=8, mask=mask).value,
        _KX_VARIANTS[1]: C.batch_dissonance(model, LOSS, batch, n=2, m=64, mode="jvp", mask=mask).value,
    }


_MASK_FIGS = {
    "kappa_W": "seed 004, §1.6 / Fig 2.3", "kappa_X": "seed 004, §1.6 / Fig 3.1",
    "rank_weight": "seed 004, §1.6 / Fig 3.6", "confusion": "seed 004, §1.6 / Fig 3.14",
    "diversity": "seed 004, §1.6 / Fig 3.15", "coherence": "seed 004, §1.6 / Fig 3.18",
    "weight_diversity": "seed 004, §1.6 / Fig 4.1", "weight_coherence": "seed 004, §1.6 / Fig 4.2",
    "min_cosine": "seed 004, §1.6 (no mask figure for C*: Def 4.1 changed after the mask test)",
}


def _judge_mask(errors, abs_errors=None, bound: float = 0.10) -> tuple[bool, str]:
    """Judge a mask's relative errors (one per (checkpoint, mask) pair): ``(holds, text)`` where ``holds`` is
    ``max(errors) <= bound`` (the worst pair; NaN fails) and ``text`` reports the worst, the mean and, if given, the
    largest absolute error -- computed from the numbers, never fixed prose.  Empty ``errors`` raises ValueError."""
    e = [float(x) for x in errors]
    if not e:
        raise ValueError("no mask errors to judge: give at least one (checkpoint, mask) pair.")
    worst, mean = max(e), sum(e) / len(e)
    holds = all(math.isfinite(x) for x in e) and worst <= bound
    n_over = sum(1 for x in e if not x <= bound)
    text = (f"worst {worst:.3f}, mean {mean:.3f} over {len(e)} (checkpoint, mask) pairs; {n_over} above "
            f"{bound:.0%}")
    if abs_errors:
        text += f"; max abs. error {max(float(x) for x in abs_errors):.3g}"
    return holds, text


@register(
    "conditioning-mask-accuracy",
    claim="A fixed 5% layer-wise random mask keeps each masked metric within 10% of its unmasked value, for every "
          "(checkpoint, mask) pair (the source reports the average absolute error without a threshold; the 10% "
          "worst-case bound is gradcond's pre-registered criterion, the mean is reported beside it).",
    source="seed 004, §1.6 and the mask figures 2.3, 3.1, 3.6, 3.14, 3.15, 3.18, 4.1, 4.2 (ResNet26, ≈7.5M "
           "parameters, CIFAR10, 5 runs × 3 masks)",
    protocol="The zoo's ResNet-10 (width 16, BN) on digits 8x8 instead of ResNet26 on CIFAR10; 3 layer-wise masks "
             "of 5 % (each layer sampled in proportion, rounded up, fixed at init: §1.6), checkpoints at steps 0 "
             "and 30 (quick) / 0, 50, 200 (full) of SGD + momentum (lr 0.02, batch 64); every metric with and "
             "without each mask on the same batch (kappa_X over m = 64 samples, 2 directions; confusion and "
             "diversity over 4 batches). The 10 % bound on the worst (checkpoint, mask) pair was fixed before the "
             "first run (the source reports the average error without a threshold; the mean is reported). Two "
             "comparison estimators of kappa_X and the masked-shape rank baseline are reported, not judged.",
)
def mask_accuracy(quick: bool, out_dir: Path) -> list[Row]:
    from ..zoo import resnet

    X, Y = _digits("image")
    n_masks = 3
    checkpoints = (0, 30) if quick else (0, 50, 200)
    torch.manual_seed(0)
    model = resnet(1, 10, depth=10, width=16)
    batch = _batches(X, Y, 64, 1, seed=3)[0]
    loader = _batches(X, Y, 64, 4, seed=4)
    masks = [LayerwiseMask(model, 0.05, seed=s) for s in range(n_masks)]
    errs: dict[str, list[float]] = {}
    abs_errs: dict[str, list[float]] = {}
    done = 0
    for cp in checkpoints:
        _train(model, X, Y, cp - done, lr=0.02, seed=cp)
        done = cp
        # κ≈_X over the whole batch (m = b = 64): eq. 3.16's algorithm sets b = max(m, n) and averages over the batch;
        # n = 2 directions to keep the CPU cost down. Two comparison estimators of the same mask error:
        full = all_metrics(model, batch, loader, n_dir=2, m=64)
        full.update(_kappa_x_variants(model, batch))
        for mk in masks:
            part = all_metrics(model, batch, loader, n_dir=2, m=64, mask=mk)
            part.update(_kappa_x_variants(model, batch, mask=mk))
            # the same masked rank renormalized by a Gaussian of the *masked* shape (the previous convention)
            part["rank_weight (masked-shape baseline)"] = C.relative_gradient_rank(
                model, LOSS, batch, wrt="weight", mask=mk).details["relative_to_masked_shape"]
            for k in list(_METRIC_NAMES) + ["rank_weight (masked-shape baseline)"] + list(_KX_VARIANTS):
                if k == "rank_input":
                    continue  # input gradients are not masked
                ref = full["rank_weight" if k.startswith("rank_weight") else k]
                denom = abs(ref) if ref != 0 else 1.0  # an exactly-zero metric (confusion): absolute error
                errs.setdefault(k, []).append(abs(part[k] - ref) / denom)
                abs_errs.setdefault(k, []).append(abs(part[k] - ref))
    rows = []
    params = sum(p.numel() for p in model.parameters())
    notes = {
        "rank_weight": "masked stable rank over the unmasked-shape Gaussian baseline (relative_gradient_rank decision)",
        "rank_weight (masked-shape baseline)": "for comparison only: the ~10% gap is the Gaussian baseline's own "
                                               "shape dependence (R(Y) at b×0.05m vs b×m), not the gradients",
        "kappa_X": "finite differences (the source's estimator), mean over all m=64 samples x max over 2 directions",
        "kappa_X (finite difference, m=8)": "comparison only (the previous protocol): a mean over 8 samples of "
                                            "finite-difference ratios dominated by ReLU switches (sparse gradient "
                                            "changes; 2-70x the exact derivative on this model) is a high-variance target "
                                            "for a 5% coordinate subsample",
        "kappa_X (jvp, m=64)": "comparison only: exact mixed derivative (mode='jvp') instead of the finite difference; "
                               "no switch noise, so the 5% subsample of a dense change vector is accurate",
        "confusion": "-min cosine over 6 batch pairs; a cosine near 0 makes the relative error large, see abs_errors",
    }
    for k, v in errs.items():
        judged = not (k in _KX_VARIANTS or "masked-shape" in k)
        holds, ours = _judge_mask(v, abs_errs[k])
        ours += (f"; zoo ResNet-10 width 16 ({params} parameters), digits, batch 64"
                 + (f"; {notes[k]}" if k in notes else ""))
        rows.append(Row(claim=f"5% mask, {k}: |masked − unmasked| / |unmasked| <= 10% for every (checkpoint, mask) "
                              "pair", source=_MASK_FIGS.get(k.split(" (")[0], "seed 004, §1.6"), ours=ours,
                        holds=holds if judged else None, data={"errors": v, "abs_errors": abs_errs[k]},
                        paper="average absolute error of the masked metric, plotted per mask size (no threshold, no "
                              "table)",
                        criterion=("worst relative error over the (checkpoint, mask) pairs <= 10% (mean reported, "
                                   "not judged)") if judged else "reported only: a comparison estimator",
                        tolerance="10%: gradcond's pre-registered bound on the worst pair; it was once changed to the "
                                  "mean after the worst case failed -- reverted, the worst case is judged"
                                  if judged else "-"))
    return rows
