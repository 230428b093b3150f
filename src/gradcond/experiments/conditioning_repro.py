"""Reproductions of seed 004 (Nelson, "Gradient Conditioning in Deep Neural Networks"), scaled to CPU and the
``digits`` data set (8×8 images; the thesis used CIFAR10-sized networks on a GPU, with batch 64).

* ``conditioning-sampler-comparison`` — Figs 2.4 / 3.2: targeted vs random directions in weight and input space, all
  directions scaled to the same Euclidean length η (an unnormalized random direction is ≈ 20× longer than a
  targeted one, which changes what a finite difference measures).
* ``conditioning-depth-sweep`` — Figs 2.6, 3.4, 3.8, 3.10, 3.13, 3.17, 3.20, 4.5-4.9: every metric read (as the
  source does) at the point of steepest descent and at the point of lowest loss of each MLP / CNN / ResNet run, and
  the correlations each figure states judged by Spearman's rho against its 5% critical value.
* ``looks-linear-depth`` — Fig 3.11: a 40-layer looks-linear CReLU MLP trains with BN; mirrored pairs persist.
* ``conditioning-mask-accuracy`` — §1.6 / mask figures: 5% layer-wise masks vs unmasked metrics on the zoo ResNet,
  judged on the worst (checkpoint, mask) pair, the mean reported beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..probes import conditioning as C
from ..probes.mask import LayerwiseMask
from ._training import train_steps
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
    done, lens = 0, {}
    for cp in checkpoints:
        _train(model, X, Y, cp - done, lr=0.02, seed=cp)
        done = cp
        # every direction scaled to Euclidean length eta (norm="2"): targeted, random and ±ḡ steps are equally long
        kw = dict(eta=1e-3, seed=cp, norm="2")
        rt = C.step_consistency(model, LOSS, batch, sampler="targeted", n=n_dir, **kw)
        rr = C.step_consistency(model, LOSS, batch, sampler="random", n=n_dir, **kw)
        rl = C.step_consistency(model, LOSS, batch, **kw)
        for nm, r in (("targeted", rt), ("random", rr), ("±ḡ", rl)):
            on = r.details["omega_norms"]
            lens[nm] = max(lens.get(nm, 0.0), float(max(on)) if len(on) else float("nan"))
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


def _spearman(a, b) -> float:
    """Spearman rank correlation of the pairs where both values are finite (``scipy.stats.spearmanr``: tied values
    share their average rank); NaN with fewer than 3 such pairs or when one side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:  # constant input: spearmanr would warn and return NaN
        return float("nan")
    from scipy.stats import spearmanr  # here, not at import: `gradcond repro list` imports every experiment module

    return float(spearmanr(a, b).statistic)


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


# two-sided 5% critical values of Spearman's rho (Zar 1972, Table B.20), by number of pairs
_RHO_CRIT = {5: 1.0, 6: 0.886, 7: 0.786, 8: 0.738, 9: 0.700, 10: 0.648, 11: 0.618, 12: 0.587, 13: 0.560, 14: 0.538,
             15: 0.521, 16: 0.503, 17: 0.488, 18: 0.472, 19: 0.460, 20: 0.447}


def _rho_critical(n: int) -> float:
    """Two-sided 5% critical value of Spearman's rho for ``n`` pairs (table up to 20, then 1.96/sqrt(n-1));
    ``inf`` below 5 pairs (no correlation can be significant)."""
    if n < 5:
        return math.inf
    return _RHO_CRIT.get(n, 1.96 / math.sqrt(n - 1))


def _judge_corr(rho: float, n: int, expect: str) -> bool | None:
    """Judge a stated correlation from Spearman ``rho`` over ``n`` networks.  ``expect``: ``"positive"`` /
    ``"negative"`` (that sign and |rho| >= the 5% critical value), ``"any"`` (|rho| >= critical, either sign),
    ``"none"`` (|rho| < critical: no detectable correlation).  ``None`` when rho is undefined (NaN: fewer than 3
    finite pairs or a constant side) -- not judged, never a pass."""
    if not math.isfinite(rho):
        return None
    crit = _rho_critical(n)
    if expect == "positive":
        return rho >= crit
    if expect == "negative":
        return rho <= -crit
    if expect == "any":
        return abs(rho) >= crit
    if expect == "none":
        return abs(rho) < crit
    raise ValueError(f"expect must be 'positive', 'negative', 'any' or 'none', got {expect!r}.")


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


@register(
    "conditioning-depth-sweep",
    claim="Gradient-conditioning metrics, read at the point of steepest descent and at the point of lowest loss, "
          "correlate with how fast and how far networks train (as each figure states); input-gradient rank > .15 at "
          "init mostly predicts failure; fully connected nets have lower coherence than convolutional ones.",
    source="seed 004, Figs 2.6, 3.4, 3.8, 3.10, 3.13, 3.17, 3.19-3.20, 4.5, 4.7, 4.9 and §4.2.1 (qualitative; no "
           "numeric tables)",
)
def depth_sweep(quick: bool, out_dir: Path) -> list[Row]:
    import copy

    from ..zoo import mlp, resnet, simple_cnn, vgg

    Xf, Yf = _digits("flat")
    Xi, Yi = _digits("image")
    specs = [
        ("MLP3", "fc", lambda: mlp(64, 10, depth=3, width=64, seed=0)),
        ("MLP12", "fc", lambda: mlp(64, 10, depth=12, width=64, seed=0)),
        ("MLP12-BN", "fc", lambda: mlp(64, 10, depth=12, width=64, norm="batch", seed=0)),
        ("CNN3", "conv", lambda: simple_cnn(1, 10, channels=(16, 32, 64), image_size=8)),
        ("VGG8-BN", "conv", lambda: vgg(1, 10, cfg=(16, 16, "M", 32, 32, "M", 32, 32, "M", 32), batch_norm=True)),
        ("ResNet10", "conv", lambda: resnet(1, 10, depth=10, width=8)),
    ]
    if not quick:
        specs += [
            ("MLP24", "fc", lambda: mlp(64, 10, depth=24, width=64, seed=0)),
            ("MLP24-BN", "fc", lambda: mlp(64, 10, depth=24, width=64, norm="batch", seed=0)),
            ("MLP24-ortho", "fc", lambda: mlp(64, 10, depth=24, width=64, init="orthogonal", seed=0)),
            ("VGG12", "conv", lambda: vgg(1, 10, cfg=(16,) * 4 + ("M",) + (32,) * 4 + ("M",) + (32,) * 3,
                                          batch_norm=False)),
            ("ResNet18", "conv", lambda: resnet(1, 10, depth=18, width=8)),
        ]
    steps = 300 if quick else 1500
    every = 10  # snapshot spacing: the metrics are read at the snapshot nearest each point
    rows_data = {}

    def metrics_or_nan(model, batch, loader):
        try:
            return all_metrics(model, batch, loader)
        except ValueError as exc:  # diverged or dead network: metric undefined
            return {**{k: float("nan") for k in _METRIC_NAMES}, "error": str(exc)}

    for name, kind, make in specs:
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
        rows_data[name] = {"kind": kind, "init": init, "steep": at["steep"], "low": at["low"],
                           "steep_step": at["steep_step"], "low_step": at["low_step"], "rate": rate,
                           "best_loss": best, "losses": losses[:: max(1, len(losses) // 100)]}
    names = list(rows_data)
    plt = _plt()
    fig, axes = plt.subplots(2, len(_METRIC_NAMES), figsize=(2.6 * len(_METRIC_NAMES), 5.2))
    for j, met in enumerate(_METRIC_NAMES):
        for i, (point, key, lab) in enumerate((("steep", "rate", "steepest-descent rate"),
                                               ("low", "best_loss", "best loss"))):
            ax = axes[i, j]
            xs = [rows_data[n][point][met] for n in names]
            ys = [rows_data[n][key] for n in names]
            ax.scatter(xs, ys, s=14)
            for n, xv, yv in zip(names, xs, ys):
                ax.annotate(n, (xv, yv), fontsize=5)
            ax.set_xlabel(f"{met} at {'steepest descent' if point == 'steep' else 'lowest loss'}", fontsize=7)
            if j == 0:
                ax.set_ylabel(lab, fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "conditioning_depth_sweep.png", dpi=100)
    plt.close(fig)
    scale = (f"CPU scale: {len(names)} networks on digits, batch 64, SGD+momentum lr 0.02, {steps} steps; metrics "
             f"read at the snapshot (every {every} steps) nearest the steepest-descent / lowest-loss point "
             "(moving average over 20 steps), not smoothed over a few hundred iterations as in the source")
    best0 = math.log(10)
    rows = []
    for met, point, expect, where in _STATED:
        key = "rate" if point == "steep" else "best_loss"
        pool = names
        xs = [rows_data[n][point][met] for n in pool]
        ys = [rows_data[n][key] for n in pool]
        n_ok = int(sum(1 for a, b in zip(xs, ys) if math.isfinite(a) and math.isfinite(b)))
        rho = _spearman(xs, ys)
        holds = _judge_corr(rho, n_ok, expect)
        crit = _rho_critical(n_ok)
        rows.append(Row(
            claim=f"{met} at the point of {'steepest descent' if point == 'steep' else 'lowest loss'} vs "
                  f"{'steepest-descent rate' if point == 'steep' else 'best loss'}: "
                  + ("no correlation" if expect == "none" else f"{expect} correlation"),
            source="seed 004, " + where.split(":")[0], paper=where.split(": ", 1)[1],
            ours=f"Spearman rho = {rho:.2f} over {n_ok} networks (5% critical value {crit:.3g}); "
                 + ", ".join(f"{n}: {rows_data[n][point][met]:.3g}" for n in pool) + f". {scale}",
            holds=holds, data={"rho": rho, "n": n_ok, "values": {n: rows_data[n][point][met] for n in pool},
                               "outcome": {n: rows_data[n][key] for n in pool}},
            criterion={"positive": "rho >= the two-sided 5% critical value", "negative": "rho <= -(the two-sided 5% "
                       "critical value)", "any": "|rho| >= the two-sided 5% critical value (the source gives no "
                       "sign)", "none": "|rho| < the two-sided 5% critical value (no detectable correlation)"}[expect]
                      + "; not judged when rho is undefined (fewer than 3 finite pairs)",
            tolerance=f"Spearman 5% critical value for {n_ok} pairs (Zar 1972): the smallest |rho| that chance alone "
                      "exceeds 5% of the time; with few networks a true correlation can fail it"))
    # the metrics the source calls inconclusive or gives no correlation for: reported only
    for met in ("min_cosine", "coherence"):
        rho_r = _spearman([rows_data[n]["steep"][met] for n in names], [rows_data[n]["rate"] for n in names])
        rho_b = _spearman([rows_data[n]["low"][met] for n in names], [rows_data[n]["best_loss"] for n in names])
        rows.append(Row(claim=f"{met} vs training outcome (reported only)",
                        source="seed 004, " + ("Figs 4.3-4.5" if met == "min_cosine" else "Fig 3.20"),
                        paper=("'inconclusive', likely an Opacus artefact" if met == "min_cosine" else
                               "not predictive within convolutional networks; extremes suggest poor performance"),
                        ours=f"rho(at steepest descent, rate) = {rho_r:.2f}, rho(at lowest loss, best loss) = "
                             f"{rho_b:.2f} over {len(names)} networks",
                        holds=None, data={"rho_rate": rho_r, "rho_best": rho_b},
                        criterion="reported only: the source states no correlation to test", tolerance="-"))
    # §4.2.1: networks with input-gradient rank > .15 at init mostly failed to converge
    high = [n for n in names if rows_data[n]["init"]["rank_input"] > 0.15]
    failed = [n for n in high if not rows_data[n]["best_loss"] < 0.5 * best0]
    rows.append(Row(claim="input-gradient rank > .15 at initialisation mostly predicts failure to converge",
                    source="seed 004, §4.2.1",
                    paper="networks above .15 at initialisation 'mostly failed to converge'",
                    ours=f"networks above .15: {high or 'none'}; of those failing (best loss >= ½ ln 10): {failed}",
                    holds=(len(failed) > len(high) / 2) if high else None,
                    data={n: rows_data[n]["init"]["rank_input"] for n in names},
                    criterion="more than half of the networks with rank_input > .15 at init have best loss "
                              ">= ½ ln 10; not judged when no network is above .15",
                    tolerance=".15: the source's threshold; 'failed' = best loss not below half the initial ln 10"))
    fc = [rows_data[n]["init"]["coherence"] for n in names if rows_data[n]["kind"] == "fc"]
    cv = [rows_data[n]["init"]["coherence"] for n in names if rows_data[n]["kind"] == "conv"]
    rows.append(Row(claim="fully connected networks have lower gradient coherence than convolutional ones",
                    source="seed 004, Fig 3.19", paper="fully connected networks 'uniformly lower'",
                    ours=f"coherence at init: FC max {max(fc):.3g} vs conv min {min(cv):.3g} "
                         f"(means {sum(fc) / len(fc):.3g} vs {sum(cv) / len(cv):.3g}). {scale}",
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


# ---------------------------------------------------------------------------------------------------- looks-linear
def mirrored_distance(model) -> float:
    """max over layers fed by CReLU of ‖W_a + W_b‖_F / ‖W_a‖_F, where the layer weight is [W_a, W_b] (0 at init)."""
    worst = 0.0
    for mod in model:
        if isinstance(mod, torch.nn.Linear) and mod.in_features % 2 == 0 and mod is not model[0]:
            h = mod.in_features // 2
            a, b = mod.weight.detach()[:, :h], mod.weight.detach()[:, h:]
            worst = max(worst, float((a + b).norm() / a.norm()))
    return worst


@register(
    "looks-linear-depth",
    claim="A 40-layer looks-linear CReLU MLP trains smoothly only with batch norm, and mirrored weight pairs "
          "|w_a + w_b| stay small during training.",
    source="seed 004, Def 3.9, §3.5 and Fig 3.11",
)
def looks_linear(quick: bool, out_dir: Path) -> list[Row]:
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
            with torch.no_grad():
                A = model(torch.eye(64)).T
                xs = X[:128]
                lin_err = float(((model(xs) - xs @ A.T).norm(dim=1) / model(xs).norm(dim=1)).max())
        d0 = mirrored_distance(model) if name.startswith("LL") else None
        losses = _train(model, X, Y, steps, lr=0.01)
        runs[name] = {"losses": losses, "first": sum(losses[:10]) / 10, "last": sum(losses[-20:]) / len(losses[-20:]),
                      "mirror_init": d0, "mirror_final": mirrored_distance(model) if name.startswith("LL") else None}
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
    bn, nn_ = runs["LL-40 + BN"], runs["LL-40 no norm"]
    ok = lambda r: math.isfinite(r["last"]) and r["last"] < 0.5 * r["first"]  # noqa: E731
    scale = f"CPU scale: width {width}, digits, batch 64, SGD+momentum lr 0.01, {steps} steps"
    return [
        Row(claim="LL-40 without norm computes an exactly linear map at init",
            source="seed 004, Def 3.9", ours=f"max rel. error {lin_err:.1e}", holds=lin_err < 1e-4,
            data={"error": lin_err}, paper="'behave perfectly linearly' at initialisation (exact: W_L…W_1 x)",
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
            ours=f"loss {nn_['first']:.3f} -> {nn_['last']:.3f}", holds=not ok(nn_),
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
            ours=f"loss {runs['CReLU-40 + BN, default init']['first']:.3f} -> "
                 f"{runs['CReLU-40 + BN, default init']['last']:.3f}",
            holds=not ok(runs["CReLU-40 + BN, default init"]),
            data={k: v for k, v in runs["CReLU-40 + BN, default init"].items() if k != "losses"}),
        Row(claim="mirrored pairs persist: max_layer ‖W_a + W_b‖/‖W_a‖ stays small (< 0.5) in LL-40 + BN",
            source="seed 004, Fig 3.11",
            paper="'some mirrored pairs persist during training' (plotted, no numbers)",
            criterion="max over layers of ||W_a + W_b||_F / ||W_a||_F < 0.5 after training (0 at init)",
            tolerance="0.5: half the size of an unpaired layer, our reading of 'persist'; fixed before the run",
            ours=f"{bn['mirror_init']:.1e} at init -> {bn['mirror_final']:.3f} after training "
                 f"(no norm: {nn_['mirror_final']:.3f})",
            holds=bn["mirror_final"] < 0.5, data={"bn": bn["mirror_final"], "none": nn_["mirror_final"]}),
    ]


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
