"""Reproductions of seed 004 (Nelson, "Gradient Conditioning in Deep Neural Networks"), scaled to CPU and the
``digits`` data set (8×8 images; the thesis used CIFAR10-sized networks on a GPU, with batch 64).

* ``conditioning-sampler-comparison`` — Figs 2.4 / 3.2: targeted vs random directions in weight and input space.
* ``conditioning-depth-sweep`` — Figs 2.6, 3.4, 3.8, 3.10, 3.13, 3.17, 3.20, 4.5-4.9: all metrics at initialisation
  and after training for MLP / CNN / ResNet of several depths, against steepest-descent rate and best loss.
* ``looks-linear-depth`` — Fig 3.11: a 40-layer looks-linear CReLU MLP trains with BN; mirrored pairs persist.
* ``conditioning-mask-accuracy`` — §1.6 / mask figures: 5% layer-wise masks vs unmasked metrics on the zoo ResNet.
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
    claim="Targeted (gradient) directions give tighter (larger) κ≈ lower bounds than random ones in weight space, "
          "but all direction samplers perform the same in input space.",
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
    done = 0
    for cp in checkpoints:
        _train(model, X, Y, cp - done, lr=0.02, seed=cp)
        done = cp
        kw = dict(eta=1e-3, seed=cp)
        rt = C.step_consistency(model, LOSS, batch, sampler="targeted", n=n_dir, **kw)
        rr = C.step_consistency(model, LOSS, batch, sampler="random", n=n_dir, **kw)
        rl = C.step_consistency(model, LOSS, batch, **kw)
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
    xs = [[res[f"X {s}"][i] for s in ("targeted", "random", "interpolation")] for i in range(len(checkpoints))]
    x_spread = [max(v) / min(v) for v in xs]
    scale = (f"CPU scale: 11-layer VGG-style BN CNN on digits 8×8, batch 64, {n_dir} directions, bootstrap over "
             f"{sub}, κ_X over m={m} samples, checkpoints {checkpoints}")
    return [
        Row(claim="weight space: targeted directions give larger κ≈_W than random ones",
            source="Fig 2.4: targeted tighter than random",
            ours=f"targeted/random = {', '.join(f'{r:.3g}' for r in w_ratio)} at steps {checkpoints}; ±ḡ sampler "
                 f"{', '.join(f'{v:.3g}' for v in res['W limited (±ḡ)'])}. {scale}",
            holds=all(r > 1 for r in w_ratio), data={"checkpoints": list(checkpoints), **res}),
        Row(claim="input space: targeted, random and interpolation directions give the same κ̄≈_X",
            source="Fig 3.2: 'performed identically' (we require max/min across samplers < 1.25)",
            ours=f"max/min across samplers = {', '.join(f'{r:.3g}' for r in x_spread)} at steps {checkpoints}",
            holds=all(r < 1.25 for r in x_spread), data={"spread": x_spread}),
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


@register(
    "conditioning-depth-sweep",
    claim="Gradient-conditioning metrics measured at initialisation relate to how fast and how far networks train; "
          "input-gradient rank > .15 at init mostly predicts failure; fully connected nets have lower coherence "
          "than convolutional ones.",
    source="seed 004, Figs 2.6, 3.4, 3.8, 3.10, 3.13, 3.17, 3.20, 4.5-4.9 and §4.2.1 (qualitative; no numeric tables)",
)
def depth_sweep(quick: bool, out_dir: Path) -> list[Row]:
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
    rows_data = {}
    for name, kind, make in specs:
        torch.manual_seed(0)
        model = make()
        X, Y = (Xf, Yf) if kind == "fc" else (Xi, Yi)
        batch = _batches(X, Y, 64, 1, seed=7)[0]
        loader = _batches(X, Y, 64, 4, seed=8)
        init = all_metrics(model, batch, loader)
        losses = _train(model, X, Y, steps, lr=0.02)
        rate, best = _descent(losses)
        try:
            final = all_metrics(model, batch, loader)
        except ValueError as exc:  # diverged or dead network: metric undefined
            final = {k: float("nan") for k in _METRIC_NAMES}
            final["error"] = str(exc)
        rows_data[name] = {"kind": kind, "init": init, "final": final, "rate": rate, "best_loss": best,
                           "losses": losses[:: max(1, len(losses) // 100)]}
    names = list(rows_data)
    plt = _plt()
    fig, axes = plt.subplots(2, len(_METRIC_NAMES), figsize=(2.6 * len(_METRIC_NAMES), 5.2))
    for j, met in enumerate(_METRIC_NAMES):
        xs = [rows_data[n]["init"][met] for n in names]
        for i, (key, lab) in enumerate((("rate", "steepest-descent rate"), ("best_loss", "best loss"))):
            ax = axes[i, j]
            ys = [rows_data[n][key] for n in names]
            ax.scatter(xs, ys, s=14)
            for n, xv, yv in zip(names, xs, ys):
                ax.annotate(n, (xv, yv), fontsize=5)
            ax.set_xlabel(f"{met} at init", fontsize=7)
            if j == 0:
                ax.set_ylabel(lab, fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "conditioning_depth_sweep.png", dpi=100)
    plt.close(fig)
    scale = (f"CPU scale: {len(names)} networks on digits, batch 64, SGD+momentum lr 0.02, {steps} steps; metrics at "
             "init and after training")
    rows = []
    for met in _METRIC_NAMES:
        xs = [rows_data[n]["init"][met] for n in names]
        rho_r = _spearman(xs, [rows_data[n]["rate"] for n in names])
        rho_b = _spearman(xs, [rows_data[n]["best_loss"] for n in names])
        rows.append(Row(claim=f"{met} at init vs training outcome (Spearman over {len(names)} networks)",
                        source="qualitative correlation figures, no numbers",
                        ours=f"rho(metric, steepest-descent rate) = {rho_r:.2f}, rho(metric, best loss) = {rho_b:.2f}; "
                             + ", ".join(f"{n}: {rows_data[n]['init'][met]:.3g}" for n in names),
                        holds=None, data={"values": {n: rows_data[n]["init"][met] for n in names}}))
    # §4.2.1: networks with input-gradient rank > .15 at init mostly failed to converge
    best0 = math.log(10)
    high = [n for n in names if rows_data[n]["init"]["rank_input"] > 0.15]
    failed = [n for n in high if not rows_data[n]["best_loss"] < 0.5 * best0]
    rows.append(Row(claim="input-gradient rank > .15 at initialisation mostly predicts failure to converge",
                    source="seed 004 §4.2.1 (.15 threshold, 'mostly failed')",
                    ours=f"networks above .15: {high or 'none'}; of those failing (best loss >= ½ ln 10): {failed}",
                    holds=(len(failed) > len(high) / 2) if high else None,
                    data={n: rows_data[n]["init"]["rank_input"] for n in names}))
    fc = [rows_data[n]["init"]["coherence"] for n in names if rows_data[n]["kind"] == "fc"]
    cv = [rows_data[n]["init"]["coherence"] for n in names if rows_data[n]["kind"] == "conv"]
    rows.append(Row(claim="fully connected networks have lower gradient coherence than convolutional ones",
                    source="seed 004 Fig 3.19 ('uniformly lower')",
                    ours=f"coherence at init: FC max {max(fc):.3g} vs conv min {min(cv):.3g} "
                         f"(means {sum(fc) / len(fc):.3g} vs {sum(cv) / len(cv):.3g}). {scale}",
                    holds=max(fc) < min(cv), data={"fc": fc, "conv": cv}))
    rows.append(Row(claim="training outcome per network", source="-",
                    ours="; ".join(f"{n}: rate {rows_data[n]['rate']:.3g}, best loss {rows_data[n]['best_loss']:.3g}"
                                   for n in names), holds=None,
                    data={n: {k: v for k, v in d.items() if k != "losses"} for n, d in rows_data.items()}))
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
    source="seed 004, Def 3.9 and Fig 3.11",
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
            source="Def 3.9 (exact: W_L…W_1 x)", ours=f"max rel. error {lin_err:.1e}", holds=lin_err < 1e-4,
            data={"error": lin_err}),
        Row(claim="LL-40 with BN trains (loss falls below half its start)",
            source="Fig 3.11: converged smoothly with BN",
            ours=f"loss {bn['first']:.3f} -> {bn['last']:.3f}. {scale}", holds=ok(bn),
            data={k: v for k, v in bn.items() if k != "losses"}),
        Row(claim="LL-40 without normalization does not train smoothly",
            source="Fig 3.11: 'only with batch norm'",
            ours=f"loss {nn_['first']:.3f} -> {nn_['last']:.3f}", holds=not ok(nn_),
            data={k: v for k, v in nn_.items() if k != "losses"}),
        Row(claim="CReLU-40 with BN but without the symmetric init fails",
            source="§3.3: 'every attempt without symmetric initialization diverged or failed'",
            ours=f"loss {runs['CReLU-40 + BN, default init']['first']:.3f} -> "
                 f"{runs['CReLU-40 + BN, default init']['last']:.3f}",
            holds=not ok(runs["CReLU-40 + BN, default init"]),
            data={k: v for k, v in runs["CReLU-40 + BN, default init"].items() if k != "losses"}),
        Row(claim="mirrored pairs persist: max_layer ‖W_a + W_b‖/‖W_a‖ stays small (< 0.5) in LL-40 + BN",
            source="Fig 3.11 discussion ('mirrored pairs persist')",
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


@register(
    "conditioning-mask-accuracy",
    claim="A fixed 5% layer-wise random mask keeps each masked metric within 10% of its unmasked value "
          "(mean relative error over checkpoints and masks, as the source reports averages; worst pair shown).",
    source="seed 004 §1.6 and the mask figures (ResNet26, ≈7.5M parameters, CIFAR10, 5 runs × 3 masks)",
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
        mean, worst = sum(v) / len(v), max(v)
        # Decision: the source's mask figures report the *average* error over runs and masks (notes 004 §1.10), so
        # the claim is judged on the mean over (checkpoint, mask) pairs; the worst pair is reported beside it.
        rows.append(Row(claim=f"5% mask, {k}: mean |masked − unmasked| / |unmasked| <= 10% (worst pair reported)",
                        source="mask figures (average absolute error; no numeric threshold given)",
                        ours=f"mean {mean:.3f}, max {worst:.3f} (max abs. {max(abs_errs[k]):.3g}) over {len(v)} "
                             f"(checkpoint, mask) pairs; zoo ResNet-10 width 16 ({params} parameters), digits, batch 64"
                             + (f"; {notes[k]}" if k in notes else ""),
                        holds=None if (k in _KX_VARIANTS or "masked-shape" in k) else mean <= 0.10,
                        data={"errors": v, "abs_errors": abs_errs[k]}))
    return rows
