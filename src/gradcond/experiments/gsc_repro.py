"""Seed-003 gradient-scale reproductions: ``gsc-table1``, ``gsc-invariance`` (Prop. 4), ``dilution-theorem3``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .judging import at_least, enough_samples, setting_matches, t_quantile, treatment_happened
from .registry import Row, register

# (group, label, builder kwargs, paper GSC(L,0), paper std, paper sign div, kind of check)
# Paper values: seed 003 Table 1 (notes/003 §3.1). Every row is judged: "lli" rows against the exact values
# 1 / 1 / 0.5; the others (the last field is True for exploding and ResNet rows, False for the non-exploding rows,
# which vary a lot between networks: single networks between 0.31 and 3.32) by the standard-error test of
# :func:`judge_table1_gsc`. The flag only labels the row; it does not change the test.
_V = dict(kind="mlp")
TABLE1 = [
    ("vanilla", "ReLU / none / Gauss", dict(_V, act="relu", norm="none", init="gaussian"), 1.52, 0.22, 0.030, False),
    ("vanilla", "ReLU / layer / Gauss", dict(_V, act="relu", norm="layer", init="gaussian"), 1.16, 0.096, 0.029, False),
    ("vanilla", "ReLU / LOlayer / Gauss", dict(_V, act="relu", norm="lo", init="gaussian"), 1.30, 0.10, 0.030, False),
    ("vanilla", "ReLU / batch / Gauss", dict(_V, act="relu", norm="batch", init="gaussian"), 5728, 1.00, 0.41, True),
    ("vanilla", "tanh / none / Gauss", dict(_V, act="tanh", norm="none", init="gaussian"), 1.26, 0.096, 0.50, False),
    ("vanilla", "tanh / layer / Gauss", dict(_V, act="tanh", norm="layer", init="gaussian"), 72.2, 1.00, 0.50, True),
    ("vanilla", "tanh / LOlayer / Gauss", dict(_V, act="tanh", norm="lo", init="gaussian"), 71.9, 1.00, 0.50, True),
    ("vanilla", "tanh / batch / Gauss", dict(_V, act="tanh", norm="batch", init="gaussian"), 93.6, 1.00, 0.50, True),
    ("vanilla", "SeLU / none / Gauss", dict(_V, act="selu", norm="none", init="gaussian"), 6.36, 0.97, 0.42, True),
    ("vanilla", "SeLU / LOlayer / Gauss", dict(_V, act="selu", norm="lo", init="gaussian"), 7.00, 0.98, 0.42, True),
    ("width", "ReLU / batch / Gauss, width 200", dict(_V, act="relu", norm="batch", init="gaussian", width=200), 5556, 1.00, 0.42, True),
    ("width", "ReLU / batch / Gauss, width 100/200", dict(_V, act="relu", norm="batch", init="gaussian", width="alt"), 5527, 1.00, 0.41, True),
    ("width", "SeLU / none / Gauss, width 200", dict(_V, act="selu", norm="none", init="gaussian", width=200), 5.86, 0.99, 0.45, True),
    ("width", "SeLU / none / Gauss, width 100/200", dict(_V, act="selu", norm="none", init="gaussian", width="alt"), 6.09, 0.98, 0.43, True),
    ("orthogonal", "ReLU / none / orth", dict(_V, act="relu", norm="none", init="orthogonal"), 1.29, 0.20, 0.03, False),
    ("orthogonal", "ReLU / layer / orth", dict(_V, act="relu", norm="layer", init="orthogonal"), 1.00, 0.10, 0.03, False),
    ("orthogonal", "ReLU / batch / orth", dict(_V, act="relu", norm="batch", init="orthogonal"), 5014, 1.00, 0.42, True),
    ("orthogonal", "tanh / none / orth", dict(_V, act="tanh", norm="none", init="orthogonal"), 1.18, 0.10, 0.50, False),
    ("orthogonal", "tanh / layer / orth", dict(_V, act="tanh", norm="layer", init="orthogonal"), 56.3, 1.00, 0.50, True),
    ("orthogonal", "tanh / batch / orth", dict(_V, act="tanh", norm="batch", init="orthogonal"), 54.6, 1.00, 0.50, True),
    ("orthogonal", "SeLU / none / orth", dict(_V, act="selu", norm="none", init="orthogonal"), 5.47, 1.00, 0.49, True),
    ("looks-linear", "ReLU / none / LLI", dict(_V, act="relu", norm="none", init="looks_linear"), 1.00, 1.00, 0.50, "lli"),
    ("looks-linear", "ReLU / layer / LLI", dict(_V, act="relu", norm="layer", init="looks_linear"), 1.00, 1.00, 0.50, "lli"),
    ("looks-linear", "ReLU / batch / LLI", dict(_V, act="relu", norm="batch", init="looks_linear"), 1.00, 1.00, 0.50, "lli"),
    ("resnet-id", "ResNet id: ReLU / layer", dict(kind="resnet", act="relu", norm="layer", skip="identity"), 1.08, 0.56, 0.19, True),
    ("resnet-id", "ResNet id: ReLU / batch", dict(kind="resnet", act="relu", norm="batch", skip="identity"), 4.00, 1.00, 0.48, True),
    ("resnet-id", "ResNet id: tanh / layer", dict(kind="resnet", act="tanh", norm="layer", skip="identity"), 1.63, 1.00, 0.50, True),
    ("resnet-id", "ResNet id: tanh / batch", dict(kind="resnet", act="tanh", norm="batch", skip="identity"), 1.57, 1.00, 0.50, True),
    ("resnet-id", "ResNet id: SeLU / layer", dict(kind="resnet", act="selu", norm="layer", skip="identity"), 1.31, 0.99, 0.48, True),
    ("resnet-gauss", "ResNet Gauss skip: ReLU / layer", dict(kind="resnet", act="relu", norm="layer", skip="gaussian"), 1.17, 0.56, 0.18, True),
    ("resnet-gauss", "ResNet Gauss skip: ReLU / batch", dict(kind="resnet", act="relu", norm="batch", skip="gaussian"), 4.50, 1.00, 0.48, True),
    ("resnet-gauss", "ResNet Gauss skip: tanh / layer", dict(kind="resnet", act="tanh", norm="layer", skip="gaussian"), 1.97, 1.00, 0.50, True),
    ("resnet-gauss", "ResNet Gauss skip: tanh / batch", dict(kind="resnet", act="tanh", norm="batch", skip="gaussian"), 1.71, 1.00, 0.50, True),
    # Table 1 prints std 9.97 here, almost certainly a typo for 0.97/0.99 (notes/003 §6)
    ("resnet-gauss", "ResNet Gauss skip: SeLU / layer", dict(kind="resnet", act="selu", norm="layer", skip="gaussian"), 1.53, 0.97, 0.48, True),
]


def build_table1_model(spec: dict, seed: int, depth: int = 50, width: int = 100, dim: int = 100):
    """The seed-003 noise-protocol network of a Table 1 row (App. I.1): bias-free, affine-free norms, a norm after
    every linear layer (the last included), compositional depth ``depth``; ResNets with 25 blocks and a final
    norm (no head), as I.1 specifies."""
    from ..zoo import mlp, resnet_mlp

    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "resnet":
        # I.1: a first linear layer and 25 blocks of [norm, act, linear, norm, act, linear] (51 linear layers)
        return resnet_mlp(dim, None, width, 25, bias=False, affine=False, final_norm=True, seed=seed, **spec)
    w = spec.pop("width", width)
    if w == "alt":  # linear layers alternate between widths 200 and 100 (I.1)
        w = [200 if i % 2 == 0 else 100 for i in range(depth - 1)]
    model = mlp(dim, dim, depth=depth, width=w, bias=False, affine=False, final_norm=True, seed=seed, **spec)
    if spec.get("init") == "orthogonal" and spec.get("act") == "relu":
        # Decision: Table 1 reports pre-activation std 0.20 for ReLU/none/orth, which needs the He gain sqrt(2) on
        # matrices that follow a ReLU (gain 1 shrinks activations by 2^-24 over 49 ReLUs). The zoo's orthogonal
        # init uses gain 1; by Prop. 4 this rescaling changes no GSC, only the raw std.
        with torch.no_grad():
            for lin in [m for m in model.modules() if isinstance(m, torch.nn.Linear)][1:]:
                lin.weight.mul_(math.sqrt(2.0))
    return model


def measure_table1_row(spec: dict, n_networks: int, n_samples: int, seed0: int = 0) -> dict:
    """GSC(L,0), top-nonlinearity pre-activation std and sign diversity for ``n_networks`` fresh (network,
    dataset) draws of one Table 1 architecture; all samples form one batch (BatchNorm in train mode)."""
    from ..data import load_dataset
    from ..probes.domain import domain_stats
    from ..probes.scale import gsc_profile

    g, s, d, rates = [], [], [], []
    for i in range(n_networks):
        seed = seed0 + 1000 * i + 1
        data = load_dataset("gaussian", n=n_samples, dim=100, seed=seed)
        x, y = data.train.tensors
        model = build_table1_model(spec, seed=seed)
        prof = gsc_profile(model, "dot", (x, y), per_sample=False)
        dom = domain_stats(model, x)
        g.append(prof.lowest)
        rates.append(prof.fit_explosion().rate)
        s.append(dom.top["std"])
        d.append(dom.top["sign_diversity"])
    return {"gsc": g, "std": s, "sign_div": d, "rate": rates}


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 100 else f"{v:.0f}"


PAPER_NETWORKS = 100  # App. I.2: Table 1 averages over 100 (network, dataset) draws
LLI_TOL = 0.01
#: networks per row needed before the standard-error test is trusted (issue 27: with 3 networks the sample SD of the
#: high-variance rows is 4-7x off the true spread, which gave false verdicts both ways)
MIN_NETWORKS = 10


def judge_table1_gsc(gsc: list[float], paper: float, paper_networks: int = PAPER_NETWORKS) -> dict:
    """Two-sided test of "our mean GSC(L,0) equals the paper's" on the relative scale ``g_i / paper - 1``.

    The standard error of the difference of the two means is ``s * sqrt(1/n + 1/paper_networks)``, with ``s`` the
    sample standard deviation (ddof 1) of our ``n`` per-network relative values, used for the paper's draws too
    (it prints no spread); the tolerance is ``t_{0.975, n-1}`` (:func:`~gradcond.experiments.judging.t_quantile`,
    95 % two-sided) times that standard error, so it is wide for high-variance rows or few networks and tight for
    low-variance rows. Needs ``n >= 2`` (with one network there is no spread: ``holds`` None); the entry requires
    :data:`MIN_NETWORKS` (a precondition), because with 3 networks the sample SD of the high-variance rows is off
    by 4-7x and the verdict goes wrong both ways. Returns ``holds``, the mean relative error ``rel``, ``tol``,
    ``se``, ``t`` and ``n``.

    The level is per row: over Table 1's 34 rows about 1.5 of the 31 t-tested rows are expected to fail by chance
    alone when every mean matches, so a single marginal failure is weak evidence; a failure far outside the bound
    (e.g. the Gaussian-skip BN ResNet rows, +5...+9 % with a spread of ~1 %) is a systematic difference.
    """
    rel = np.asarray(gsc, dtype=float) / paper - 1
    n = len(rel)
    if n < 2:
        return {"holds": None, "rel": float(rel.mean()) if n else float("nan"), "tol": float("nan"),
                "se": float("nan"), "t": float("nan"), "n": n}
    se = float(rel.std(ddof=1) * math.sqrt(1 / n + 1 / paper_networks))
    tq = t_quantile(0.975, n - 1)
    m = float(rel.mean())
    return {"holds": bool(abs(m) <= tq * se), "rel": m, "tol": tq * se, "se": se, "t": tq, "n": n}


def judge_table1_lli(gsc: list[float], std: list[float], sign_div: list[float], tol: float = LLI_TOL) -> bool:
    """Table 1's looks-linear rows: mean GSC, pre-activation std and sign diversity equal 1, 1 and 0.5 within
    ``tol`` (absolute) each. A Gaussian-init network of the same shape fails it (``tests/test_gsc_repro.py``)."""
    return bool(abs(float(np.mean(gsc)) - 1) <= tol and abs(float(np.mean(std)) - 1) <= tol
                and abs(float(np.mean(sign_div)) - 0.5) <= tol)


@register(
    "gsc-table1",
    claim="Gaussian-noise protocol at initialisation: GSC(L,0), pre-activation std and sign diversity per Table-1 "
          "architecture; every row's mean GSC equals the paper's within 95 % Student-t bounds of the standard error, "
          "looks-linear rows exactly 1 / 1 / 0.5.",
    source="seed 003, Table 1, Sec. 3 and App. I.1-I.2 (width 100, compositional depth 50, 10,000 points in one "
           "BN batch, 100 networks)",
    protocol="Each of Table 1's 34 architectures is built as App. I.1 specifies (bias-free, affine-free norms after "
             "every linear layer, compositional depth 50, width 100; ResNets: a first linear layer and 25 blocks of "
             "two [norm, act, linear] sub-blocks), fed 10,000 Gaussian points as one batch with a Gaussian label "
             "and the dot-product error (I.1-I.2: 'Both data input and labels are Gaussian noise'), and measured "
             "with gsc_profile (ratio of quadratic expectations) and domain_stats (top nonlinearity). Networks: "
             "10 per row in quick mode, 20 in full mode (the paper averages 100; our spread between networks "
             "enters the standard error). Fixed before the run: the t bound (two-sided 95 %), the LLI tolerance "
             "0.01, and the power rule (>= 10 networks per row; with 3 the sample SD was 4-7x off). Deviation: "
             "ReLU/orthogonal matrices after a ReLU get the He gain sqrt(2) (Table 1's std 0.20 needs it; by "
             "Prop. 4 it changes no GSC).",
)
def run_table1(quick: bool, out_dir: Path) -> list[Row]:
    from matplotlib.figure import Figure

    from ..utils import progress

    torch.set_num_threads(max(1, torch.get_num_threads()))
    # >= MIN_NETWORKS per row in both modes (about 1 s of CPU per network); full: 20 per row, t ~ 2.1
    n_net = 10 if quick else 20
    n_samples = 10000
    rows, md = [], ["| architecture | paper GSC | ours GSC (mean ± std, min-max) | paper std | ours std | paper sign div | "
                    "ours sign div | networks | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    results = []
    for group, label, spec, p_gsc, p_std, p_sd, checked in progress(TABLE1, desc="gsc-table1"):
        r = measure_table1_row(spec, n_net, n_samples)
        gm, gs = float(np.mean(r["gsc"])), float(np.std(r["gsc"]))
        sm, dm = float(np.mean(r["std"])), float(np.mean(r["sign_div"]))
        rel = gm / p_gsc - 1
        judge = judge_table1_gsc(r["gsc"], p_gsc)
        pre = []
        if checked == "lli":
            holds = judge_table1_lli(r["gsc"], r["std"], r["sign_div"])
            crit = (f"mean GSC, pre-activation std and sign diversity over {n_net} networks equal 1, 1 and 0.5 "
                    "(the paper's values: LLI makes the network exactly linear at init)")
            tol = f"{LLI_TOL} absolute on each (sampling error of 10,000 points; float rounding is far smaller)"
        else:
            holds = judge["holds"]
            pre = [enough_samples(n_net, MIN_NETWORKS, "networks")]
            kind = "exploding/ResNet row" if checked else "non-exploding row (high variance between networks)"
            crit = (f"|mean(GSC_i / paper - 1)| <= t * SE over {n_net} networks ({kind}); std and sign diversity "
                    "reported")
            tol = (f"{judge['tol']:.1%} = t_0.975,{n_net - 1} ({judge['t']:.2f}) x SE {judge['se']:.2%}, "
                   f"SE = sample std of our per-network values x sqrt(1/{n_net} + 1/{PAPER_NETWORKS}) (our draws "
                   f"and the paper's {PAPER_NETWORKS})")
        row = Row(
            claim=f"Table 1 {label}: GSC(L,0) at initialisation",
            source="seed 003, Table 1",
            paper=f"GSC {p_gsc}, std {p_std}, sign div {p_sd} (mean of {PAPER_NETWORKS} networks)",
            ours=f"GSC {_fmt(gm)} ± {_fmt(gs)} over {n_net} networks ({rel:+.1%}); std {sm:.3f}; sign div {dm:.3f}",
            criterion=crit, tolerance=tol, holds=holds, preconditions=pre)
        md.append(f"| {label} | {_fmt(p_gsc)} | {_fmt(gm)} ± {_fmt(gs)} ({_fmt(min(r['gsc']))}-{_fmt(max(r['gsc']))}) | "
                  f"{p_std} | {sm:.3f} | {p_sd} | {dm:.3f} | {n_net} | {row.verdict} |")
        data = {"group": group, "architecture": label, "paper_gsc": p_gsc, "gsc_mean": gm, "gsc_std": gs,
                "gsc_min": float(min(r["gsc"])), "gsc_max": float(max(r["gsc"])), "gsc_per_network": r["gsc"],
                "rel_error": rel, "rate_mean": float(np.mean(r["rate"])), "paper_std": p_std, "std_mean": sm,
                "paper_sign_div": p_sd, "sign_div_mean": dm, "n_networks": n_net, "n_samples": n_samples,
                "judge": judge}
        row.data = data
        results.append(data)
        rows.append(row)
    table = "\n".join(md) + "\n"
    (out_dir / "table1.md").write_text(table)
    print(table)
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot()
    xs = np.arange(len(results))
    ax.bar(xs - 0.2, [math.log10(d["paper_gsc"]) for d in results], 0.4, label="paper")
    ax.bar(xs + 0.2, [math.log10(d["gsc_mean"]) for d in results], 0.4, label="ours")
    ax.set_xticks(xs, [d["architecture"] for d in results], rotation=90, fontsize=6)
    ax.set_ylabel("log10 GSC(L, 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "table1.png", dpi=120)
    return rows


# ------------------------------------------------------------------------------------------------ Prop. 4


def rescale_linear_(model, gammas) -> None:
    """Multiply the weight (and bias) of the i-th Linear layer by ``gammas[i]`` in place."""
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if len(gammas) != len(lins):
        raise ValueError(f"need one factor per Linear layer ({len(lins)}), got {len(gammas)}.")
    with torch.no_grad():
        for lin, g in zip(lins, gammas):
            lin.weight.mul_(g)
            if lin.bias is not None:
                lin.bias.mul_(g)


INVARIANCE_TOL = 1e-6  # float64: exact invariance up to rounding through 2 x depth layers (observed ~1e-13)
INVARIANCE_MIN_SPAN = 2.0  # log10 span of the raw gradient-norm ratios: the rescaling is not a no-op
CONTROL_MIN_CHANGE = 1e-2  # the tanh control must change by 10^4 x the invariance tolerance


def invariance_case(act: str, norm: str, gammas: list[float], depth: int, x, y) -> dict:
    """GSC profile, raw gradient norms and output of a bias-free Table-1-style MLP before and after
    :func:`rescale_linear_` by ``gammas`` (float64; the norms' eps set to 1e-30, App. I.1 has none). Returns the max
    relative GSC change ``rel``, the log10 ``span`` of the raw gradient-norm ratios after/before, the relative output
    change ``out_diff`` and the profiles."""
    from ..probes.scale import gsc_profile
    from ..zoo import mlp

    model = mlp(100, 100, depth=depth, width=100, init="gaussian", bias=False, affine=False,
                final_norm=norm != "none", seed=3, act=act, norm=norm).double()
    for m in model.modules():  # the paper's norm has no eps (App. I.1); torch needs eps > 0
        if isinstance(m, torch.nn.BatchNorm1d):
            m.eps = 1e-30
    p0 = gsc_profile(model, "dot", (x, y), per_sample=False)
    with torch.no_grad():
        out0 = model(x)
    rescale_linear_(model, gammas)
    p1 = gsc_profile(model, "dot", (x, y), per_sample=False)
    with torch.no_grad():
        out_diff = float((model(x) - out0).abs().max() / out0.abs().max())
    g0, g1 = np.array(p0.gsc), np.array(p1.gsc)
    gr = np.array(p1.q_grad) / np.array(p0.q_grad)
    return {"rel": float(np.max(np.abs(g1 / g0 - 1))), "span": float(np.log10(gr.max() / gr.min())),
            "out_diff": out_diff, "g0": g0, "g1": g1, "gr": gr}


def invariance_row(label: str, case: dict, control_change: float, gammas) -> Row:
    """The judged Prop. 4 row of one rescaled network: GSC unchanged within :data:`INVARIANCE_TOL`. Preconditions:
    the rescaling changed the raw gradient norms (span >= 10^2: the treatment happened), it preserved the function
    (the setting of Prop. 4), and the same measurement on the tanh control (not covered by Prop. 4) detects a change
    (power: the check can fail)."""
    pre = [treatment_happened(case["span"], INVARIANCE_MIN_SPAN, "log10 span of the raw gradient-norm ratios",
                              fmt=".2f"),
           setting_matches(case["out_diff"] < 1e-10, "a function-preserving rescaling (output change < 1e-10 "
                           "relative)", f"output change {case['out_diff']:.1e}", case["out_diff"]),
           at_least("power", control_change, CONTROL_MIN_CHANGE,
                    "the tanh control's max rel. GSC change (Prop. 4 does not apply there)", fmt=".2g")]
    return Row(claim=label, source="seed 003, Proposition 4 (proof in App. E.4)",
               paper="GSC unchanged; raw gradient norms change",
               criterion="max over layers of |GSC_after / GSC_before - 1| < tol",
               tolerance=f"{INVARIANCE_TOL:g} relative in float64: exact invariance up to rounding through 2 x depth "
                         "layers (observed errors are ~1e-13)",
               ours=f"max rel. GSC change {case['rel']:.1e}; raw grad-norm ratios span 10^{case['span']:.1f}; "
                    f"output change {case['out_diff']:.1e}",
               holds=bool(case["rel"] < INVARIANCE_TOL), preconditions=pre,
               data={"max_rel_gsc_change": case["rel"], "grad_ratio_log10_span": case["span"],
                     "grad_ratio_min": float(case["gr"].min()), "grad_ratio_max": float(case["gr"].max()),
                     "output_rel_change": case["out_diff"], "gammas": list(gammas)})


@register(
    "gsc-invariance",
    claim="Prop. 4: the GSC profile is unchanged by function-preserving per-layer scalar rescalings (bias-free ReLU "
          "nets; weights before normalisation layers) while raw gradient norms change by orders of magnitude.",
    source="seed 003, Proposition 4 (proof in App. E.4)",
    protocol="Bias-free Gaussian-init MLPs of width 100 (depth 10 quick, 20 full), float64, 2000 Gaussian points, "
             "dot-product error (the Table 1 setting). Each Linear weight is multiplied by gamma_l: a ReLU net with "
             "factors 10 (lower half) / 0.1 (upper half), whose product 1 keeps the function (E.4's bias-free ReLU "
             "case), and a batch-ReLU net with a norm after every linear layer and gamma_l = 10^(l mod 5 - 2) (E.4's "
             "'weight scaling before normalization'). Preconditions fixed before the run: the rescaling changes raw "
             "gradient norms by > 10^2 (else it is a no-op), the output is unchanged, and the same measurement "
             "finds a change > 1e-2 on a tanh net (not covered by Prop. 4), so the check can fail.",
)
def run_invariance(quick: bool, out_dir: Path) -> list[Row]:
    from matplotlib.figure import Figure

    from ..data import load_dataset

    depth = 10 if quick else 20
    data = load_dataset("gaussian", n=2000, dim=100, seed=7, dtype=torch.float64)
    x, y = data.train.tensors
    half = depth // 2
    halves = [10.0] * half + [0.1] * (depth - half)
    ctrl_label = "control (not covered by Prop. 4): tanh MLP, gamma = 10 / 0.1"
    ctrl = invariance_case("tanh", "none", halves, depth, x, y)
    cases = [
        # product of the factors is 1, so the bias-free ReLU net computes the same function
        ("bias-free ReLU MLP, gamma = 10 (lower half) / 0.1 (upper half)", ("relu", "none"), halves),
        ("bias-free batch-ReLU MLP (norm after every linear), gamma_l = 10^(l mod 5 - 2)", ("relu", "batch"),
         [10.0 ** (i % 5 - 2) for i in range(depth)]),
    ]
    rows, plotted = [], []
    for label, (act, norm), gammas in cases:
        case = invariance_case(act, norm, gammas, depth, x, y)
        rows.append(invariance_row(label, case, ctrl["rel"], gammas))
        plotted.append((label, case))
    rows.append(Row(claim=ctrl_label, source="seed 003, Proposition 4 (proof in App. E.4)",
                    paper="not covered by Prop. 4 (tanh is not positively homogeneous)",
                    ours=f"max rel. GSC change {ctrl['rel']:.2g}; raw grad-norm ratios span 10^{ctrl['span']:.1f} "
                         "(used as the power precondition of the rows above)",
                    criterion="reported: the control of the rows above, not a claim of the source",
                    data={"max_rel_gsc_change": ctrl["rel"], "gammas": halves}))
    plotted.append((ctrl_label, ctrl))
    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, len(plotted))
    for ax, (label, case) in zip(axes, plotted):
        ax.semilogy(case["g0"], label="GSC before")
        ax.semilogy(case["g1"], "--", label="GSC after")
        ax.semilogy(case["gr"], ":", label="||g|| after/before")
        ax.set_title(label[:40], fontsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "invariance.png", dpi=120)
    return rows


# ------------------------------------------------------------------------------------------------ Theorem 3


# Table 3 row (i) of seed 003 (standard initialisation of the residual weights) prints log10 GSC(L,0) corrected for
# dilution; the vanilla values are Table 1's. The paper's corrected/vanilla gap: 4.23 vs 3.76 (+12 %), 2.17 vs 1.86
# (+17 %).
PAPER_CORRECTED_LOG10 = {"layer-tanh": 2.17, "batch-ReLU": 4.23}
CORRECTED_REL_TOL = 0.30


def judge_corrected_vs_vanilla(corrected_log10: float, vanilla_log10: float, tol: float = CORRECTED_REL_TOL) -> dict:
    """Theorem 3 / Fig. 3C: the dilution-corrected log10 GSC(L,0) of the ResNet tracks the vanilla network's.

    ``holds`` when ``|corrected / vanilla - 1| <= tol`` on the log10 scale. The vanilla network must explode
    (``vanilla_log10 > 0``): otherwise there is no explosion to recover and ``holds`` is None (the entry makes it a
    precondition, so the row is untestable rather than "no"). ``tol`` = 0.30: twice the paper's own gap (+12 %, +17 %), while a corrected network that
    does not explode (rate 1.0, log10 0) is 100 % off, so the test separates "recovers the explosion" from "no
    explosion" (a per-layer-rate test does not: rate 1.0 vs 1.089 for layer-tanh is within 10 %).
    """
    if not vanilla_log10 > 0:
        return {"holds": None, "ratio": float("nan"), "reason": "the vanilla network does not explode"}
    ratio = corrected_log10 / vanilla_log10
    return {"holds": bool(abs(ratio - 1) <= tol), "ratio": ratio, "reason": ""}


@register(
    "dilution-theorem3",
    claim="Theorem 3: per residual block the GSC growth is sqrt((k^2+r^2)/(k^2+1)); the dilution-corrected ResNet "
          "GSC recovers (slightly exceeds) the vanilla explosion; Prop. 7 composed dilution.",
    source="seed 003, Theorem 3 (App. F.3), Fig. 3C, Table 3 row (i), Proposition 7 (App. E.7)",
    protocol="Identity-skip ResNets of Table 1 (App. I.1: a first linear layer, 25 blocks of two [norm, act, "
             "linear] sub-blocks, width 100, bias-free) for layer-tanh and batch-ReLU, on Gaussian noise with the "
             "dot-product error (4000 points, 1 network quick; 10,000 points, 3 networks full; the paper plots "
             "one network per architecture in Fig. 3). Per block: dilution k, branch growth r, observed growth "
             "and the Theorem-3 prediction (dilution_profile); the dilution correction replaces each observed "
             "growth by 1 + (k^2 + 1)(growth - 1) (Sec. 7: 'replaced the growth rate with ...'); the vanilla "
             "network of the same architecture and seed gives the explosion to recover. Tolerances fixed before "
             "the run (0.03 per block, 30 % on the log scale, 10 % for Prop. 7); the corrected-vs-vanilla row "
             "needs an exploding vanilla network (precondition).",
)
def run_theorem3(quick: bool, out_dir: Path) -> list[Row]:
    from ..data import load_dataset
    from ..probes.dilution import dilution_profile
    from ..probes.scale import gsc_profile

    n_net = 1 if quick else 3
    n_samples = 4000 if quick else 10000
    rows = []
    archs = [("layer-tanh", dict(act="tanh", norm="layer"), 72.2), ("batch-ReLU", dict(act="relu", norm="batch"), 5728)]
    for label, kw, paper_vanilla in archs:
        errs, corr, raw, van, kp, km = [], [], [], [], [], []
        last = None
        for i in range(n_net):
            seed = 11 + 100 * i
            data = load_dataset("gaussian", n=n_samples, dim=100, seed=seed)
            x, y = data.train.tensors
            res = build_table1_model(dict(kind="resnet", skip="identity", **kw), seed=seed)
            dp = dilution_profile(res, (x, y))
            errs.append(max(dp.abs_error))
            corr.append(math.log10(dp.corrected_lowest))
            raw.append(math.log10(dp.raw_lowest))
            kp.append(dp.composed_k_predicted[-1])
            km.append(dp.composed_k_measured[-1])
            vanilla = build_table1_model(dict(kind="mlp", init="gaussian", **kw), seed=seed)
            van.append(math.log10(gsc_profile(vanilla, "dot", (x, y), per_sample=False).lowest))
            last = dp
        err = max(errs)
        rows.append(Row(
            claim=f"identity-skip ResNet {label}: Theorem-3 predicted vs measured per-block GSC growth",
            source="seed 003, Theorem 3 (App. F.3), Fig. 3",
            paper="growth per block sqrt((k^2 + r^2)/(k^2 + 1)) (Theorem 3, up to O((r-1)^2))",
            ours=f"max |error| over {len(last.blocks)} blocks x {n_net} nets = {err:.4f}; block 1: k={last.k[0]:.2f}, "
                 f"r={last.r[0]:.3f}, measured {last.growth[0]:.4f}, predicted {last.predicted[0]:.4f}",
            criterion="max over blocks and networks of |measured growth - predicted growth| <= tol",
            tolerance="0.03: the size of the theorem's O((r-1)^2) remainder for these blocks (the notes' independent "
                      "recomputation found errors 0.001-0.023)",
            holds=err <= 0.03, data={"max_abs_error": err, "per_network": errs, "blocks": last.to_frame()}))
        c, v = float(np.mean(corr)), float(np.mean(van))
        judge = judge_corrected_vs_vanilla(c, v)
        pc, pv = PAPER_CORRECTED_LOG10[label], math.log10(paper_vanilla)
        rows.append(Row(
            claim=f"{label}: dilution-corrected log10 GSC(L,0) of the ResNet recovers the vanilla network's "
                  "(slightly higher)",
            source="seed 003, Fig. 3C (vs Fig. 1A), Table 3 row (i), Table 1",
            paper=f"corrected {pc:.2f} vs vanilla {pv:.2f} (ratio {pc / pv:.2f})",
            ours=f"raw {np.mean(raw):.3f}, corrected {c:.2f}, vanilla {v:.2f} (ratio {judge['ratio']:.2f}) over "
                 f"{n_net} network(s) of {n_samples} points",
            criterion="|log10 GSC corrected / log10 GSC vanilla - 1| <= tol",
            tolerance=f"{CORRECTED_REL_TOL:.2f}: twice the paper's own gap (+12 %, +17 %); a non-exploding corrected "
                      "network (rate 1.0) is 100 % off",
            holds=judge["holds"],
            preconditions=[setting_matches(v > 0, "the vanilla network explodes (mean log10 GSC(L,0) > 0)",
                                           f"vanilla mean log10 GSC(L,0) {v:.2f}", v)],
            data={"raw_log10": raw, "corrected_log10": corr, "vanilla_log10": van, "ratio": judge["ratio"],
                  "rate_corrected": 10 ** (c / 50), "rate_vanilla": 10 ** (v / 50), "paper_corrected_log10": pc,
                  "paper_vanilla_log10": pv}))
        kpm, kmm = float(np.mean(kp)), float(np.mean(km))
        rows.append(Row(
            claim=f"{label}: Prop. 7 composed dilution of all 25 blocks, predicted vs measured end-to-end",
            source="seed 003, Proposition 7 (App. E.7)",
            paper="((prod_b (1 + 1/k_b^2)) - 1)^(-1/2)",
            ours=f"predicted {kpm:.4f}, measured {kmm:.4f} ({kpm / kmm - 1:+.1%})",
            criterion="|predicted / measured - 1| <= tol",
            tolerance="0.10: the proposition holds in expectation ('under certain conditions'); 10 % allows for the "
                      "finite batch and the correlation between skip and residual at init",
            holds=abs(kpm / kmm - 1) <= 0.10, data={"predicted": kp, "measured": km}))
        fig = last.plot()
        fig.savefig(out_dir / f"dilution_{label}.png", dpi=120)
    return rows
