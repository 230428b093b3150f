"""Seed-003 reproductions of "Gradients explode - Deep networks are shallow - ResNet explained" beyond Table 1
(issue 17 §3), at CPU scale:

* ``shallow-theory`` — Props. 1, 3, 5, 6 and Thm. 2 as numerical checks (Gaussian noise / random points).
* ``shallow-table3`` — Table 3 (App. B.1.2): dynamical-systems ResNet initialisations, raw and dilution-corrected
  log10 GSC(L,0) at initialisation.
* ``shallow-bn-noise`` — §4.5: minibatch training fails when the GSC between the error and the first batch-norm
  layer exceeds sqrt(b); full-batch training of the same network works.
* ``shallow-training`` — Table 2 / Figs. 2, 4, 5, 6 analogues on ``digits``: the layer-wise step-size protocol
  (App. I.3, simplified), final training error next to a single step size, GSC, update size vs 1/GSC (Thm. 1,
  Fig. 2A), effective depth (App. D.2, Fig. 2D) and the Taylor-truncated error (App. G, Fig. 2F).

The existing probes are used throughout: ``gsc_profile`` (scale), ``dilution_profile``, ``taylor_truncate``, the
``EffectiveDepth`` / ``ResidualTracker`` callbacks and the zoo's seed-003 architectures.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .judging import (MIN_SEEDS, Precondition, TTest, at_most, baseline_learns, enough_samples, mean_se, one_sided_t,
                      setting_matches, spearman, spearman_critical, rho_power, treatment_happened)
from .registry import Row, register

SRC = "seed 003"


def _plt():
    from ..report.figures import object_pyplot

    return object_pyplot()


class _Scale(nn.Module):
    """Multiplication by a constant (no parameters): the R-rescaling of Prop. 1."""

    def __init__(self, c: float):
        super().__init__()
        self.c = float(c)

    def forward(self, x):
        return x * self.c


# ================================================================================================ shallow-theory
def _prop1(rows: list[Row], quick: bool) -> None:
    """Prop. 1: a network with exponentially growing Jacobians that trains exactly like the original."""
    from ..probes.scale import gsc_profile
    from ..zoo import mlp
    from ._training import train_steps

    R, depth = 2.0, 10
    torch.manual_seed(0)
    f = mlp(64, 10, depth=depth, width=32, act="relu", init="gaussian", bias=False, seed=3).double()
    # f': every linear layer followed by x R (ReLU is positively homogeneous, so each activation of f' is R^j times
    # that of f), and R^-depth on top: the same function of the same parameters, hence the same gradients and the
    # same SGD trajectory, but the Jacobian between layers k and l is R^(k-l) times f's (App. E.1 construction,
    # specialised to a bias-free ReLU network where no parameter rescaling is needed).
    layers = []
    for m in copy.deepcopy(f):
        layers.append(m)
        if isinstance(m, nn.Linear):
            layers.append(_Scale(R))
    fp = nn.Sequential(*layers, _Scale(R ** -depth))
    from ..data import load_dataset

    X, Y = load_dataset("digits", dtype=torch.float64).train.tensors
    pf = gsc_profile(f, "cross_entropy", (X[:256], Y[:256]), per_sample=False)
    pp = gsc_profile(fp, "cross_entropy", (X[:256], Y[:256]), per_sample=False)
    lin_f = [i for i, k in enumerate(pf.kinds) if k == "linear"]
    lin_p = [i for i, k in enumerate(pp.kinds) if k == "linear"]
    qf = np.array([pf.q_grad[i] for i in lin_f])
    qp = np.array([pp.q_grad[i] for i in lin_p])
    gsc_f = np.array([pf.gsc[i] for i in lin_f])
    gsc_p = np.array([pp.gsc[i] for i in lin_p])
    # Q||df0/df_l|| at the output of linear layer j (0 = lowest) is R^-(j+1) times f's, so the Jacobian from layer j
    # to the top hidden layer (the paper's J_k^l, 1 <= l) is R^(top - j) times f's: growth R per layer of distance
    ratio = np.log(qp / qf)
    slope = -float(np.polyfit(np.arange(len(ratio)), ratio, 1)[0])  # growth per layer counted down from the top
    steps = 30 if quick else 100
    lf = train_steps(f, X, Y, "sgd", steps, 64, torch.Generator().manual_seed(1), lr=0.05)
    lp = train_steps(fp, X, Y, "sgd", steps, 64, torch.Generator().manual_seed(1), lr=0.05)
    traj = float(np.max(np.abs(np.array(lf) - np.array(lp)) / np.abs(np.array(lf))))
    gsc_rel = float(np.max(np.abs(gsc_p / gsc_f - 1)))
    rows.append(Row(
        claim=f"Prop. 1 (check of the construction, reported): f' (depth {depth}, x R = {R:g} after every linear "
              f"layer, R^-{depth} on top) trains to the same error in the same steps with the same predictions",
        source=f"{SRC}, Prop. 1 (App. E.1)", paper="identical training trajectory",
        ours=f"max relative difference of the {steps} SGD batch losses: {traj:.1e} (f' computes f's function by "
             "construction, so this checks the construction, not the network)",
        criterion="reported: identical by construction (issue 27: not a judged row)",
        data={"max_rel_loss_diff": traj}))
    rows.append(Row(
        claim=f"Prop. 1 / Prop. 4: the GSC is not fooled by f' (Jacobians growing at rate R = {R:g} per linear layer, "
              "same function): its GSC profile equals f's",
        source=f"{SRC}, Prop. 1, Def. 2 / Prop. 4", paper="||J_k^l|| ≥ r'^(k-l) for any r'; GSC invariant",
        ours=f"growth of log(||J_k^l||_f' / ||J_k^l||_f) per linear layer between k and l = {slope:.6f} (log R = "
             f"{math.log(R):.6f}); max |GSC_f'/GSC_f − 1| = {gsc_rel:.1e}",
        criterion="max over linear layers |GSC_f' / GSC_f − 1| < 1e-9 (gsc_profile on both networks)",
        tolerance="1e-9: float64 rounding",
        holds=bool(gsc_rel < 1e-9),
        preconditions=[treatment_happened(slope, 0.5 * math.log(R), "measured growth of the Jacobian-norm ratio per "
                                          "linear layer (half of log R)", fmt=".4f")],
        data={"slope": slope, "gsc_rel": gsc_rel}))


def _prop3(rows: list[Row], quick: bool) -> None:
    """Prop. 3: GSC x ||θ_k|| ||f_{k+1}|| / (||f_k|| sqrt(d_{k+1})) is the sensitivity to random relative weight
    changes, and Q^-1 of the extra factor is 1 for Gaussian and orthogonal matrices."""
    from ..probes.scale import gsc_profile
    from ..zoo import mlp

    gen = torch.Generator().manual_seed(5)
    n = 2000 if quick else 20000
    d_in, d_out = 100, 64
    u = torch.randn(d_in, generator=gen, dtype=torch.float64)
    W = torch.randn(n, d_out, d_in, generator=gen, dtype=torch.float64)
    fac = W.flatten(1).norm(dim=1) * u.norm() / ((W @ u).norm(dim=1) * math.sqrt(d_in))
    inv2 = fac ** -2
    m, se = float(inv2.mean()), float(inv2.std() / math.sqrt(n))
    q_inv = m ** -0.5
    Q, _ = torch.linalg.qr(torch.randn(200, d_in, d_in, generator=gen, dtype=torch.float64))
    fo = Q.flatten(1).norm(dim=1) * u.norm() / ((Q @ u).norm(dim=1) * math.sqrt(d_in))
    orth_err = float((fo - 1).abs().max())
    rows.append(Row(
        claim="Prop. 3: Q^-1 over random weights of ||θ_k|| ||f_{k+1}|| / (||f_k|| sqrt(d_{k+1})) is exactly 1 for "
              "Gaussian and orthogonal matrices",
        source=f"{SRC}, Prop. 3 (App. E.3)", paper="= 1",
        ours=f"Gaussian {d_out}x{d_in}: E[factor^-2] = {m:.4f} ± {se:.4f} (Q^-1 = {q_inv:.4f}, {n} draws); "
             f"orthogonal {d_in}x{d_in}: max |factor − 1| = {orth_err:.1e}",
        criterion="|E[factor^-2] − 1| ≤ 3 standard errors (Monte Carlo) and the orthogonal factor is 1 to 1e-12",
        tolerance="3 SE of the Monte-Carlo mean (≈ 0.3 % level); float64 rounding for orthogonal",
        holds=bool(abs(m - 1) <= 3 * se and orth_err < 1e-12), data={"mean_inv2": m, "se": se, "orth_err": orth_err}))
    # sensitivity to a random relative change of θ_k (first part of Prop. 3), one sample, dot-product error
    model = mlp(50, 50, depth=8, width=50, act="tanh", norm="lo", init="gaussian", bias=False, affine=False,
                final_norm=True, seed=2).double()
    x = torch.randn(1, 50, generator=gen, dtype=torch.float64)
    x = 10 * x / x.norm()
    y = torch.randn(1, 50, generator=gen, dtype=torch.float64) / math.sqrt(50)
    lins = [(nm, mm) for nm, mm in model.named_modules() if isinstance(mm, nn.Linear)]
    name, lin = lins[3]
    prof = gsc_profile(model, "dot", (x, y), layers=[name], per_sample=False)
    acts = {}
    h = lin.register_forward_hook(lambda mod, inp, out: acts.update(inp=inp[0].detach(), out=out.detach()))
    with torch.no_grad():
        f0 = float((model(x) * y).sum())
    h.remove()
    theta = lin.weight.detach()
    pred = prof.gsc[0] * float(theta.norm() * acts["inp"].norm() / (acts["out"].norm() * math.sqrt(theta.shape[1])))
    n_dir = 1000 if quick else 8000
    U = torch.randn(n_dir, *theta.shape, generator=gen, dtype=torch.float64)
    U = U / U.flatten(1).norm(dim=1)[:, None, None]
    eps = 1e-6
    vals = []
    m2 = copy.deepcopy(model)
    w2 = dict(m2.named_modules())[name].weight
    with torch.no_grad():
        for i in range(n_dir):
            w2.copy_(theta + eps * float(theta.norm()) * U[i])
            vals.append(abs(float((m2(x) * y).sum()) - f0) / abs(f0) / eps)
    v2 = np.array(vals) ** 2
    q_mc = float(np.sqrt(v2.mean()))
    se_rel = float(v2.std() / math.sqrt(n_dir) / v2.mean() / 2)  # SE of sqrt(mean) relative, delta method
    rel = q_mc / pred - 1
    rows.append(Row(
        claim="Prop. 3: GSC(k,0) ||θ_k|| ||f_{k+1}|| / (||f_k|| sqrt(d_{k+1})) is the quadratic expectation of the "
              "relative change of the error per relative random change of θ_k",
        source=f"{SRC}, Prop. 3 (App. E.3)", paper="equality (ε → 0)",
        ours=f"LO-tanh MLP, 4th linear layer: predicted {pred:.4f} (gsc_profile), Monte Carlo over {n_dir} uniform "
             f"directions {q_mc:.4f} (rel. diff {rel:+.3f}, SE {se_rel:.3f})",
        criterion="|Q_MC / predicted − 1| ≤ 3 SE + 1e-4 (ε = 1e-6 relative finite difference)",
        tolerance="3 Monte-Carlo standard errors; 1e-4 for the finite-difference truncation",
        holds=bool(abs(rel) <= 3 * se_rel + 1e-4), data={"pred": pred, "mc": q_mc, "se_rel": se_rel}))


def _chain_jacobians(model: nn.Sequential, x: torch.Tensor):
    """Per layer of a Sequential: input activation and the Jacobian of the layer at it (single sample, dense)."""
    from torch.func import jacrev

    acts, jacs = [x], []
    h = x
    for m in model:  # noqa: B007 - m is bound per iteration in the lambda
        J = jacrev(lambda v, m=m: m(v.unsqueeze(0)).squeeze(0))(h)
        h = m(h.unsqueeze(0)).squeeze(0)
        acts.append(h.detach())
        jacs.append(J.detach())
    return acts, jacs


def _prop5(rows: list[Row], quick: bool) -> None:
    """Prop. 5: GSC(k,l) ≈ the product of the layer-wise GSCs."""
    from ..zoo import mlp

    gen = torch.Generator().manual_seed(9)
    n = 8 if quick else 32
    out = {}
    for label, kw in (("layer-tanh", dict(act="tanh", norm="layer")), ("SeLU", dict(act="selu", norm="none")),
                      ("LO-tanh", dict(act="tanh", norm="lo"))):
        ratios, logs = [], []
        for s in range(n):
            model = mlp(40, 40, depth=12, width=40, init="gaussian", bias=False, affine=False, final_norm=True,
                        seed=100 + s, **kw).double()
            x = torch.randn(40, generator=gen, dtype=torch.float64)
            x = 10 * x / x.norm()
            y = torch.randn(40, generator=gen, dtype=torch.float64) / math.sqrt(40)
            acts, jacs = _chain_jacobians(model, x)
            f0 = float(acts[-1] @ y)
            # GSC(L, 0) directly: ||J_L^0||_qm ||f_L|| / |f_0| with J_L^0 = y^T J_top ... J_bottom
            g = y.clone()
            layer_gsc = []
            for j in range(len(jacs) - 1, -1, -1):
                J = jacs[j]
                layer_gsc.append(float(torch.linalg.matrix_norm(J) / math.sqrt(J.shape[1]) * acts[j].norm()
                                       / acts[j + 1].norm()))
                g = g @ J
            direct = float(g.norm() / math.sqrt(len(g)) * acts[0].norm() / abs(f0))
            top = float(y.norm() / math.sqrt(len(y)) * acts[-1].norm() / abs(f0))  # GSC(1, 0): the error layer
            prod = top * float(np.prod(layer_gsc))
            ratios.append(prod / direct)
            logs.append(math.log(direct))
        lr_ = np.log(np.array(ratios))
        rel = float(np.median(np.abs(lr_) / np.abs(np.array(logs))))
        out[label] = (float(np.exp(np.median(lr_))), rel, float(np.exp(np.mean(logs))))
    worst = max(v[1] for v in out.values())
    rows.append(Row(
        claim="Prop. 5: GSC(k, l) ≈ GSC(k, k−1) ... GSC(l+1, l) (approximate decomposability of the qm norm)",
        source=f"{SRC}, Prop. 5 (App. E.5)", paper="≈ (no value printed)",
        ours="; ".join(f"{k}: median product/direct = {v[0]:.3f}, |log ratio|/|log GSC| = {v[1]:.3f} (GSC ≈ {v[2]:.3g})"
                       for k, v in out.items()) + f" (depth 12, width 40, {n} networks, exact per-layer Jacobians)",
        criterion="median over networks of |log(product / direct)| / |log GSC(L,0)| ≤ 0.25 for every architecture",
        tolerance="0.25: 'approximately' read as the product getting at least 3/4 of the exponent right, fixed "
                  "before the run",
        holds=bool(worst <= 0.25), data={k: list(v) for k, v in out.items()}))


def _lo_tanh_macro(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Macro-layer [tanh, linear, LOlayer] of Thm. 2 / Prop. 6: an endomorphism of the sphere of radius sqrt(d)."""
    h = W @ torch.tanh(v)
    return h * math.sqrt(h.numel()) / h.norm()


def _invert_macro(W: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The unique preimage of ``z`` under :func:`_lo_tanh_macro` (Prop. 6 constructive proof): tanh(v) = c W^-1 z with
    the c > 0 that puts v on the sphere (||atanh(c a)|| increases strictly in c; bisection)."""
    a = torch.linalg.solve(W, z)
    d = z.numel()
    hi = (1 - 1e-15) / float(a.abs().max())
    lo = 0.0
    for _ in range(200):
        c = (lo + hi) / 2
        if float(torch.atanh(c * a).norm()) < math.sqrt(d):
            lo = c
        else:
            hi = c
    return torch.atanh(((lo + hi) / 2) * a)


def tangent_jacobians(Ws: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """Batched tangent-space Jacobians of the LO-tanh macro-layer (Thm. 2 / Prop. 6): for each weight ``Ws[i]``
    (d x d) and point ``vs[i]`` on the sphere of radius sqrt(d), ``P_out J P_in`` with ``J`` the Jacobian of
    :func:`_lo_tanh_macro` at ``vs[i]`` and ``P`` the projections onto the tangent spaces at the input and the output
    (``torch.func.vmap`` of ``jacrev``). Its d - 1 largest singular values are the tangent singular values."""
    from torch.func import jacrev, vmap

    def one(W, v):
        return jacrev(lambda t: _lo_tanh_macro(W, t))(v), _lo_tanh_macro(W, v)

    J, fv = vmap(one)(Ws, vs)
    d = vs.shape[-1]
    eye = torch.eye(d, dtype=vs.dtype)
    p_in = eye - vs[:, :, None] * vs[:, None, :] / d
    p_out = eye - fv[:, :, None] * fv[:, None, :] / d
    return p_out @ J @ p_in


def _sphere_draws(d: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random macro-layers (Gaussian W, variance 1/d) and uniform points on the sphere of radius sqrt(d)."""
    Ws = torch.randn(n, d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    vs = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return Ws, vs * math.sqrt(d) / vs.norm(dim=1, keepdim=True)


#: Thm. 2's E|det J| >= 1 is judged at the dimension the first draft fixed before its run (d = 8; the paper's
#: networks have width 100); d = 3, where the check was moved after it failed at d = 8, is reported only
THM2_DET_D = 8
THM2_DET_D_REPORTED = 3


def judge_det_at_least_one(dets) -> tuple[bool, TTest]:
    """Thm. 2, step 1: E|det J| >= 1. The claim fails when the one-sided t test at 5 % (:func:`~gradcond.
    experiments.judging.one_sided_t` on ``1 - |det J|``) finds the mean significantly below 1. Returns
    ``(holds, test)``."""
    tt = one_sided_t([1.0 - float(x) for x in dets], margin=0.0)
    return (not tt.significant), tt


def _thm2(rows: list[Row], quick: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    d = THM2_DET_D
    n = 4000  # vectorised draws (about a second): both modes use the full run's 4000
    # Prop. 6: bijective, checked constructively (every point has a preimage, found by the monotone construction)
    inv_err, rt_err = 0.0, 0.0
    for _ in range(50 if quick else 200):
        W = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        z = torch.randn(d, generator=gen, dtype=torch.float64)
        z = z * math.sqrt(d) / z.norm()
        v = _invert_macro(W, z)
        inv_err = max(inv_err, float((_lo_tanh_macro(W, v) - z).norm() / math.sqrt(d)),
                      abs(float(v.norm()) / math.sqrt(d) - 1))
        v0 = torch.randn(d, generator=gen, dtype=torch.float64)
        v0 = v0 * math.sqrt(d) / v0.norm()
        rt_err = max(rt_err, float((_invert_macro(W, _lo_tanh_macro(W, v0)) - v0).norm() / math.sqrt(d)))
    rows.append(Row(
        claim="Prop. 6: the macro-layer [tanh, full-rank linear, LOlayer] is a bijection of the sphere",
        source=f"{SRC}, Prop. 6 (App. E.6)", paper="bijective",
        ours=f"d = {d}: max error of f(f^-1(z)) = z and of f^-1(f(v)) = v over random points: {inv_err:.1e}, "
             f"{rt_err:.1e} (f^-1 by the monotone construction of the proof)",
        criterion="both round-trip errors < 1e-8 (relative to the radius)",
        tolerance="1e-8: bisection to float64 resolution; a non-injective map fails the second round trip",
        holds=bool(inv_err < 1e-8 and rt_err < 1e-8), data={"inv_err": inv_err, "rt_err": rt_err}))
    # Thm. 2: tangent-space singular values of the macro-layer's Jacobian
    S_t = torch.linalg.svdvals(tangent_jacobians(*_sphere_draws(d, n, gen)))[:, : d - 1]
    dets = S_t.prod(dim=1).numpy()
    S = S_t.flatten().numpy()
    qms = (S_t ** 2).mean(dim=1).numpy()
    holds_det, tt = judge_det_at_least_one(dets)
    first_rule = bool(float(np.mean(dets)) + 3 * tt.se >= 1)
    rows.append(Row(
        claim=f"Thm. 2 (proof, step 1): a surjective endomorphism of the sphere has E|det J| ≥ 1 on the tangent "
              f"space (LO-tanh macro-layer, d = {d})",
        source=f"{SRC}, Thm. 2 (App. F.2)", paper="E|det J| ≥ 1",
        ours=f"d = {d}, {n} draws of (W, v): mean |det J| = {float(np.mean(dets)):.3f} ± {tt.se:.3f} (SE), median "
             f"{float(np.median(dets)):.3g}, max {float(np.max(dets)):.3g}; one-sided t test of E|det J| < 1: "
             f"t = {tt.t:.2f} vs t_0.95,{tt.n - 1} = {tt.critical:.2f} ({'significant' if tt.significant else 'not significant'}); "
             f"the first draft's rule (mean + 3 SE ≥ 1) says {'yes' if first_rule else 'no'}. For a bijection of the "
             "sphere (Prop. 6) E_v|det J| = 1 exactly (change of variables), so a mean below 1 is the heavy tail "
             "of |det J| that 4000 draws do not sample",
        criterion="the claim fails when a one-sided t test at 5 % finds mean |det J| significantly below 1 "
                  "(judging.one_sided_t on 1 − |det J|)",
        tolerance="5 % one-sided, the project's rule. History: the first draft judged d = 8 with mean + 3 SE ≥ 1, "
                  "failed (0.32 ± 0.06 in full mode), and was moved to d = 3; issue 27 restores the setting fixed "
                  "before that run (d = 8); d = 3 is reported below",
        holds=holds_det, preconditions=[enough_samples(tt.n, MIN_SEEDS, "draws")],
        data={"d": d, "det_mean": float(np.mean(dets)), "det_se": tt.se, "det_median": float(np.median(dets)),
              "det_max": float(np.max(dets)), "t": tt.t, "critical": tt.critical, "first_rule": first_rule}))
    d3 = THM2_DET_D_REPORTED
    S3 = torch.linalg.svdvals(tangent_jacobians(*_sphere_draws(d3, n, gen)))[:, : d3 - 1]
    dets3 = S3.prod(dim=1).numpy()
    m3, se3, _ = mean_se(dets3)
    rows.append(Row(
        claim=f"Thm. 2, step 1 at d = {d3} (reported: the dimension the check was moved to after it failed at d = 8)",
        source=f"{SRC}, Thm. 2 (App. F.2)", paper="E|det J| ≥ 1",
        ours=f"d = {d3}, {n} draws: mean |det J| = {m3:.3f} ± {se3:.3f} (SE), median {float(np.median(dets3)):.3g}; "
             f"|mean − 1| = {abs(m3 - 1) / se3:.1f} SE (a bijection has E|det J| = 1 exactly)",
        criterion="reported only (issue 27: judge the setting fixed before the run, report the other)",
        data={"d": d3, "det_mean": m3, "det_se": se3}))
    q_qm = float(math.sqrt(np.mean(qms)))
    dev = np.sort(np.abs(np.abs(S) - np.abs(S).mean()))
    # the theorem's r(δ, ε) = sqrt(1 + δε²) with δ = P(| |s| − E|s| | > ε): the best rate over ε (δε² ≤ Var|s|)
    delta_eps2 = float(np.max(dev ** 2 * (1 - np.arange(1, len(dev) + 1) / len(dev))))
    var_s = delta_eps2
    rows.append(Row(
        claim="Thm. 2: Q ||J||_qm ≥ r(δ, ε) = sqrt(1 + δε²) > 1: the tangent singular values' spread makes the GSC grow",
        source=f"{SRC}, Thm. 2 (App. F.2)", paper="Q||J||_qm ≥ sqrt(1 + δε²)",
        ours=f"Q||J||_qm = {q_qm:.4f}; r = sqrt(1 + max_ε ε² P(||s| − E|s|| > ε)) = {math.sqrt(1 + var_s):.4f} "
             f"(Var|s| = {float(np.abs(S).var()):.4f}); mean |s| = {float(np.abs(S).mean()):.4f} (the proof derives "
             "E|s| ≥ 1 from independent singular values, assumption 2)",
        criterion="Q||J||_qm ≥ r(δ, ε) with the best (δ, ε) of the measured singular values, and > 1",
        tolerance="none beyond float64 (Monte-Carlo values compared as measured). Correction made while writing "
                  "the entry: a first draft used sqrt(1 + Var|s|), an upper bound of the theorem's r, not r itself",
        holds=bool(q_qm >= math.sqrt(1 + var_s) and q_qm > 1), data={"q_qm": q_qm, "var_s": var_s}))
    # chained: Q GSC(K, 0) over K macro-layers vs sqrt((d-1)/d) r^K with r = sqrt(1 + Var|s|)
    K = 10
    n_chain = 100 if quick else 1000
    Ws, v = _sphere_draws(d, n_chain * K, gen)
    Ws = Ws.reshape(K, n_chain, d, d)
    v = v[:n_chain]
    Jt = torch.eye(d, dtype=torch.float64).expand(n_chain, d, d)
    for k in range(K):  # J of the chain on the tangent spaces: a product of the layers' tangent Jacobians
        Jt = tangent_jacobians(Ws[k], v) @ Jt
        v = torch.func.vmap(_lo_tanh_macro)(Ws[k], v)
    g_all = (torch.linalg.matrix_norm(Jt) / math.sqrt(d)).numpy()  # ||f_k|| = ||f_l|| on the sphere
    q_gsc = float(math.sqrt(np.mean(np.square(g_all))))
    bound = math.sqrt((d - 1) / d) * (1 + var_s) ** (K / 2)
    rows.append(Row(
        claim=f"Thm. 2: Q GSC(k, l) ≥ sqrt((d−1)/d) r^(k−l) for a chain of {K} random macro-layers",
        source=f"{SRC}, Thm. 2 (App. F.2)", paper="lower bound, exponential in k − l",
        ours=f"Q GSC({K}, 0) = {q_gsc:.3f} vs bound {bound:.3f} (r = sqrt(1 + δε²) = {math.sqrt(1 + var_s):.4f})",
        criterion="Q GSC(K, 0) ≥ bound",
        tolerance="none (the theorem's independence assumptions hold only approximately; measured as is)",
        holds=bool(q_gsc >= bound), data={"q_gsc": q_gsc, "bound": bound}))


@register(
    "shallow-theory",
    claim="Props. 1, 3, 5, 6 and Thm. 2 hold numerically: Jacobian norms can grow at any rate without changing "
          "training (Prop. 1), GSC measures sensitivity to random weight changes (Prop. 3), GSC(k,l) ≈ the product "
          "of layer-wise GSCs (Prop. 5), the [tanh, linear, LOlayer] macro-layer is a bijection of the sphere "
          "(Prop. 6), and surjective sphere endomorphisms explode (Thm. 2).",
    source="seed 003, Props. 1, 3, 5, 6 (App. E.1, E.3, E.5, E.6) and Thm. 2 (App. F.2)",
    protocol="Numerical checks in float64. Prop. 1: a bias-free ReLU MLP (depth 10, width 32, digits) and the E.1 "
             "construction f' (x R = 2 after every linear layer, R^-10 on top); the identical training trajectory "
             "holds by construction and is reported, the judged row is that gsc_profile gives f' f's GSC while its "
             "Jacobian norms grow at rate R (precondition: the measured growth). Prop. 3: Monte Carlo over Gaussian "
             "and orthogonal matrices, and over random relative weight changes of one layer of an LO-tanh MLP "
             "(3 standard errors). Prop. 5: depth-12 width-40 MLPs, exact per-layer Jacobians (median over 8 / 32 "
             "networks, 0.25 of the exponent). Prop. 6 and Thm. 2: the [tanh, linear, LOlayer] macro-layer with "
             "Gaussian W (variance 1/d) at uniform points of the sphere, d = 8 (the dimension the first draft "
             "fixed before its run); E|det J| >= 1 is judged by a one-sided t test at 5 % over 4000 draws, d = 3 "
             "(where the check was moved after it failed) is reported; the qm-norm and chained-GSC bounds use the "
             "measured singular values.",
)
def run_theory(quick: bool, out_dir: Path) -> list[Row]:
    rows: list[Row] = []
    _prop1(rows, quick)
    _prop3(rows, quick)
    _prop5(rows, quick)
    _thm2(rows, quick)
    return rows


# ================================================================================================ shallow-table3
TABLE3 = {  # seed 003 Table 3: (raw log10 GSC(L,0), dilution-corrected log10 GSC(L,0))
    ("batch", "relu"): {"i": (0.337, 4.23), "ii": (0.329, 4.06), "iii": (6.164, 68.37), "iv": (0.313, 7.22)},
    ("layer", "tanh"): {"i": (0.136, 2.17), "ii": (0.114, 1.91), "iii": (3.325, 5.46), "iv": (0.143, 2.31)},
}
INIT_NAMES = {"i": "Gaussian", "ii": "skew-symmetric", "iii": "-C^T C", "iv": "correlated 0.5"}


def dynamical_resnet(norm: str, act: str, init: str, blocks: int = 50, width: int = 100, seed: int = 0) -> nn.Sequential:
    """Table 3 / App. B.1.2 ResNet: a first Gaussian linear layer, ``blocks`` identity-skip blocks of a single
    [norm, nonlinearity, linear] and a final norm (bias-free, affine-free). The block matrices are initialised as
    (i) Gaussian, (ii) skew-symmetric G − Gᵀ, (iii) −CᵀC with C Gaussian, or (iv) Gaussian with correlation 0.5
    between successive blocks (W_b = 0.5 W_{b−1} + sqrt(0.75) G_b), and each is then normalised to unit qm norm
    ||W||_F / sqrt(n) = 1 (B.1.2). The number of blocks is not stated; 50 (51 linear layers, as the other
    architectures) is our decision."""
    from ..zoo.init import gaussian_
    from ..zoo.layers import ResidualBlock
    from ..zoo.models import make_activation, make_norm

    if init not in INIT_NAMES:
        raise ValueError(f"init must be one of {', '.join(INIT_NAMES)}, got {init!r}.")
    gen = torch.Generator().manual_seed(seed)
    first = nn.Linear(width, width, bias=False)
    gaussian_(first.weight, False, gen)
    layers: list[nn.Module] = [first]
    prev = None
    for _ in range(blocks):
        G = torch.randn(width, width, generator=gen)
        if init == "ii":
            W = G - G.T
        elif init == "iii":
            W = -(G.T @ G)
        elif init == "iv":
            W = G if prev is None else 0.5 * prev + math.sqrt(0.75) * G
            prev = W
        else:
            W = G
        lin = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            lin.weight.copy_(W * math.sqrt(width) / W.norm())
        layers.append(ResidualBlock(nn.Sequential(make_norm(norm, width, False), make_activation(act), lin)))
    layers.append(make_norm(norm, width, False))
    return nn.Sequential(*layers)


def corrected_log10(corrected_growth, growth, raw_lowest: float) -> float:
    """Dilution-corrected log10 GSC(L,0) of one network (Fig. 3C / Table 3): its raw GSC at the lowest block times,
    for every block, corrected growth / observed growth, with corrected growth ``1 + (k^2 + 1)(g - 1)``
    (:func:`gradcond.probes.dilution.dilution_profile`): ``log10(raw) + sum_b log10(corrected_b / g_b)``. NaN when
    any block's corrected growth is not positive.

    Decision (issue 27; the source is silent): a corrected growth <= 0 means the block's observed growth g is below
    k^2 / (k^2 + 1), which no block can show under Theorem 3's assumption (an uncorrelated branch gives
    g = sqrt((k^2 + r^2) / (k^2 + 1)) >= k / sqrt(k^2 + 1) > k^2 / (k^2 + 1)). There Theorem 3's model does not
    hold and the correction is undefined, so the network has no corrected GSC -- whatever the sign of the product of
    its factors (two negative factors must not make it "defined")."""
    cg = np.asarray(corrected_growth, dtype=float)
    g = np.asarray(growth, dtype=float)
    if not (np.all(np.isfinite(cg)) and np.all(cg > 0) and np.all(g > 0)) or not (
            raw_lowest > 0 and math.isfinite(raw_lowest)):
        return float("nan")
    return float(np.log10(raw_lowest) + np.sum(np.log10(cg / g)))


def _table3_network(norm, act, init, i, n_samples) -> tuple[float, float, int, float]:
    """``(raw log10 GSC, corrected log10 GSC (NaN: undefined), blocks with a non-positive corrected growth, mean
    skip-branch correlation)`` of network ``i`` of a Table 3 row."""
    from ..data import load_dataset
    from ..probes.dilution import dilution_profile

    data = load_dataset("gaussian", n=n_samples, dim=100, seed=300 + i)
    x, y = data.train.tensors
    model = dynamical_resnet(norm, act, init, seed=1000 * i + 7)
    model.train()
    prof = dilution_profile(model, (x, y), "dot")
    cg = np.asarray(prof.corrected_growth, dtype=float)
    cor = corrected_log10(cg, prof.growth, prof.raw_lowest)
    return math.log10(prof.raw_lowest), cor, int(np.sum(~(cg > 0))), float(np.mean(prof.corr_forward))


def correction_defined(values: list[float], label: str):
    """Precondition of a row that needs the dilution-corrected GSC of every network: Theorem 3's correction is
    defined (:func:`corrected_log10`) in each."""
    n_bad = sum(not math.isfinite(v) for v in values)
    return setting_matches(n_bad == 0, f"Theorem 3's dilution correction is defined in every network of {label} "
                           "(every block's corrected growth > 0, i.e. observed growth >= k^2/(k^2+1))",
                           f"{n_bad} of {len(values)} networks of {label} with a block of non-positive corrected "
                           "growth" + (" (a skip-branch correlation Theorem 3 excludes)" if n_bad else ""),
                           float(n_bad))


@register(
    "shallow-table3",
    claim="Dynamical-systems ResNet initialisations at initialisation (Gaussian noise): −CᵀC makes gradients grow "
          "much faster than Gaussian; skew-symmetric improves slightly on Gaussian; correlated blocks need more "
          "dilution (higher corrected GSC); in every case dilution hides orders of magnitude of explosion.",
    source="seed 003, Table 3 and App. B.1.2 (strategies (a), (b), (d); Thm. 3)",
    protocol="Table 3 / B.1.2 ResNets: a first Gaussian linear layer, 50 identity-skip blocks of one [norm, act, "
             "linear] (the block count is not stated: 50, as the paper's 51-linear-layer networks), width 100, "
             "bias- and affine-free, each block matrix normalised to unit qm norm; inits (i) Gaussian, (ii) G − Gᵀ, "
             "(iii) −CᵀC, (iv) W_b = 0.5 W_{b−1} + sqrt(0.75) G_b. Gaussian noise with the dot-product error, "
             "5 networks of 1000 points (quick) / 10 of 10,000 (full; the paper's batch); network i of every "
             "init shares data and seed index, so comparisons are paired. Raw and dilution-corrected log10 "
             "GSC(L,0) from dilution_profile (corrected growth 1 + (k^2+1)(g − 1), Sec. 7). Rules fixed before the "
             "run: (iii) − (i) >= 1 decade; (ii) < (i) and (iv) > (i) by a one-sided paired t test at 5 % over "
             ">= 5 networks; corrected − raw >= 1 decade. Decision on a non-positive corrected growth (the source "
             "is silent): such a block breaks Theorem 3's model, the network has no corrected GSC, and a row that "
             "needs it is untestable (the networks with a defined value are reported beside it).",
)
def run_table3(quick: bool, out_dir: Path) -> list[Row]:
    n_net = 5 if quick else 10
    n_samples = 1000 if quick else 10000
    res: dict = {}
    for (norm, act), paper in TABLE3.items():
        for init in INIT_NAMES:
            nets = [_table3_network(norm, act, init, i, n_samples) for i in range(n_net)]
            raw = [t[0] for t in nets]
            cor = [t[1] for t in nets]
            ok = [c for c in cor if math.isfinite(c)]
            res[(norm, act, init)] = {"raw_mean": float(np.mean(raw)), "cor_mean": float(np.mean(ok)) if ok else
                                      float("nan"), "raw": raw, "cor": cor, "bad_blocks": [t[2] for t in nets],
                                      "corr_forward": float(np.mean([t[3] for t in nets]))}
    rows: list[Row] = []
    for (norm, act), paper in TABLE3.items():
        arch = f"{norm}-{'ReLU' if act == 'relu' else act}"
        v = {k: res[(norm, act, k)] for k in INIT_NAMES}

        def n_def(k, v=v):  # networks whose dilution-corrected GSC is defined
            return sum(math.isfinite(c) for c in v[k]["cor"])

        table = "; ".join(f"({k}) {INIT_NAMES[k]}: raw {v[k]['raw_mean']:.3f} / corrected {v[k]['cor_mean']:.2f} "
                          f"over {n_def(k)} (paper {paper[k][0]} / {paper[k][1]}); skip-branch corr. "
                          f"{v[k]['corr_forward']:+.2f}" for k in INIT_NAMES)
        rows.append(Row(claim=f"{arch}: log10 GSC(L,0) raw / dilution-corrected per initialisation",
                        source=f"{SRC}, Table 3", paper="; ".join(f"({k}) {p[0]} / {p[1]}" for k, p in paper.items()),
                        ours=table + f" ({n_net} networks x {n_samples} points, 50 blocks; corrected means over the "
                             "networks with a defined value)",
                        data={k: {"raw": v[k]["raw"], "corrected": v[k]["cor"], "bad_blocks": v[k]["bad_blocks"],
                                  "corr_forward": v[k]["corr_forward"]} for k in INIT_NAMES}))
        rows.append(Row(
            claim=f"{arch}: −CᵀC (iii) has gradients that grow much faster than Gaussian (i)",
            source=f"{SRC}, Table 3, App. B.1.2", paper=f"raw {paper['iii'][0]} vs {paper['i'][0]}",
            ours=f"raw log10 GSC: (iii) {v['iii']['raw_mean']:.3f} vs (i) {v['i']['raw_mean']:.3f} (means of {n_net})",
            criterion="mean raw log10 GSC(L,0) of (iii) exceeds that of (i) by at least 1 (a factor 10)",
            tolerance="1 decade, fixed before the run (the paper's gaps: 5.8 and 3.2 decades)",
            holds=bool(v["iii"]["raw_mean"] - v["i"]["raw_mean"] >= 1), data={}))
        tt = one_sided_t([a - b for a, b in zip(v["i"]["raw"], v["ii"]["raw"])])
        rows.append(Row(
            claim=f"{arch}: skew-symmetric (ii) improves slightly over Gaussian (i)",
            source=f"{SRC}, Table 3, App. B.1.2", paper=f"raw {paper['ii'][0]} < {paper['i'][0]}",
            ours=f"raw log10 GSC: (ii) {v['ii']['raw_mean']:.3f} vs (i) {v['i']['raw_mean']:.3f}; paired (i) − (ii): "
                 + tt.describe(fmt=".3g"),
            criterion="raw log10 GSC(L,0) of (ii) below (i): one-sided paired t test at 5 % (judging.one_sided_t on "
                      "the per-network differences (i) − (ii))",
            tolerance="5 % one-sided. Changed for issue 27 from 'the ordering of the means' (a coin flip when there is "
                      "no effect) to the project's significance rule: stricter",
            holds=tt.significant, preconditions=[enough_samples(tt.n, MIN_SEEDS, "paired networks")],
            data={"t": tt.t, "mean_diff": tt.mean, "se": tt.se}))
        tt4 = one_sided_t([a - b for a, b in zip(v["iv"]["cor"], v["i"]["cor"])])
        rows.append(Row(
            claim=f"{arch}: correlated blocks (iv) need more dilution than Gaussian (i) (higher corrected GSC)",
            source=f"{SRC}, Table 3, App. B.1.2", paper=f"corrected {paper['iv'][1]} > {paper['i'][1]}",
            ours=f"corrected log10 GSC: (iv) {v['iv']['cor_mean']:.2f} over {n_def('iv')} of {n_net} networks with a "
                 f"defined value vs (i) {v['i']['cor_mean']:.2f} over {n_def('i')} (the other reading: means over the "
                 f"defined networks only); blocks with a non-positive corrected growth per (iv) network: "
                 f"{v['iv']['bad_blocks']}; mean skip-branch correlation (iv) {v['iv']['corr_forward']:+.2f} vs (i) "
                 f"{v['i']['corr_forward']:+.2f}"
                 + (f"; paired (iv) − (i): {tt4.describe(fmt='.3g')}" if n_def("iv") == n_net == n_def("i") else ""),
            criterion="corrected log10 GSC(L,0) of (iv) above (i): one-sided paired t test at 5 % over the networks",
            tolerance="5 % one-sided (changed for issue 27 from the ordering of the means: stricter); a network with "
                      "an undefined correction makes the row untestable (decision above; the first draft's "
                      "'every network defined, else no' read an undefined statistic as a failure)",
            holds=tt4.significant if n_def("iv") == n_net == n_def("i") else None,
            preconditions=[correction_defined(v["i"]["cor"], "(i)"), correction_defined(v["iv"]["cor"], "(iv)"),
                           enough_samples(n_net, MIN_SEEDS, "paired networks")],
            data={"bad_blocks_iv": v["iv"]["bad_blocks"], "t": tt4.t if n_def("iv") == n_net else None}))
        for k in ("i", "ii", "iv"):
            gap = v[k]["cor_mean"] - v[k]["raw_mean"]
            rows.append(Row(
                claim=f"{arch}: dilution hides the explosion (corrected ≫ raw) for ({k}) {INIT_NAMES[k]}",
                source=f"{SRC}, Table 3 (corrected 1.9-7.2 decades above raw)",
                paper=f"corrected − raw = {paper[k][1] - paper[k][0]:.2f} decades",
                ours=f"corrected − raw = {gap:.2f} decades (means over {n_def(k)} of {n_net} networks)",
                criterion="mean corrected − mean raw log10 GSC(L,0) ≥ 1 decade",
                tolerance="1 decade, fixed before the run",
                holds=bool(gap >= 1) if n_def(k) == n_net else None,
                preconditions=[correction_defined(v[k]["cor"], f"({k})")], data={"gap": gap}))
    return rows


# ================================================================================================ shallow-bn-noise
def _error_train_mode(model: nn.Module, X, Y, b: int) -> float:
    """Classification error with BatchNorm in train mode on consecutive batches of ``b`` rows (the statistics
    training sees); computed on a copy, so the model's running statistics are not touched."""
    m = copy.deepcopy(model).train()
    wrong = 0
    with torch.no_grad():
        for s in range(0, len(X) - b + 1, b):
            wrong += int((m(X[s:s + b]).argmax(1) != Y[s:s + b]).sum())
    n = (len(X) // b) * b
    return wrong / n


def _train_best_lr(build, X, Y, b: int, steps: int, lrs) -> tuple[float, float, list]:
    """Train a fresh network per step size (SGD + momentum 0.9, batches of ``b`` drawn without replacement); return
    the lowest final train-mode error, its step size and every (lr, error)."""
    from ._training import train_steps

    out = []
    for lr in lrs:
        model = build()
        losses = train_steps(model, X, Y, "momentum", steps, b, torch.Generator().manual_seed(3), lr=lr, momentum=0.9)
        err = 1.0 if (losses and not math.isfinite(losses[-1])) else _error_train_mode(model, X, Y, b)
        out.append((lr, err))
    best = min(out, key=lambda t: t[1])
    return best[1], best[0], out


@register(
    "shallow-bn-noise",
    claim="Batch-norm noise: when the GSC between the error and the first batch-norm layer exceeds sqrt(b), "
          "minibatch training (batch size b) fails (error near chance), while full-batch training of the same "
          "network works; a shallower network with GSC < sqrt(b) trains with the same minibatches.",
    source="seed 003, §4.5 (and App. I.3: batch-ReLU trained full-batch; error stayed above 89 % with minibatches)",
)
def run_bn_noise(quick: bool, out_dir: Path) -> list[Row]:
    from ..data import load_dataset
    from ..probes.scale import gsc_profile
    from ..zoo import mlp

    X, Y = load_dataset("digits").train.tensors
    b = 16
    steps = 150 if quick else 600
    lrs = (0.01, 0.03, 0.1) if quick else (0.003, 0.01, 0.03, 0.1, 0.3)
    rows: list[Row] = []
    res = {}
    for depth in (24, 4):
        def build(depth=depth):
            return mlp(64, 10, depth=depth, width=64, act="relu", norm="batch", init="gaussian", bias=False,
                       affine=False, final_norm=True, seed=0)

        m0 = build().train()
        prof = gsc_profile(m0, "cross_entropy", (X, Y), per_sample=False)
        g_bn = next(g for g, k in zip(prof.gsc, prof.kinds) if k == "norm")
        mini = _train_best_lr(build, X, Y, b, steps, lrs)
        full = _train_best_lr(build, X, Y, len(X), steps, lrs) if depth == 24 else None
        res[depth] = (g_bn, mini, full)
    # open point (notes/003 §4 item 11): batch-tanh has GSC 93.6 > sqrt(1000) at initialisation and still trained
    def build_bt():
        return mlp(64, 10, depth=24, width=64, act="tanh", norm="batch", init="gaussian", bias=False, affine=False,
                   final_norm=True, seed=0)

    prof_bt = gsc_profile(build_bt().train(), "cross_entropy", (X, Y), per_sample=False)
    g_bt = next(g for g, k in zip(prof_bt.gsc, prof_bt.kinds) if k == "norm")
    mini_bt = _train_best_lr(build_bt, X, Y, b, steps, lrs)
    g_deep, mini_deep, full_deep = res[24]
    g_ctrl, mini_ctrl, _ = res[4]
    sb = math.sqrt(b)
    # preconditions fixed before the run: the deep network's GSC at the first BN exceeds sqrt(b) (the claim's
    # setting), and the minibatch budget trains a network at all (the shallow control leaves chance by 40 points:
    # error <= 0.5, the control row's own threshold)
    deep_setting = setting_matches(g_deep > sb, f"GSC(first BN, 0) > sqrt(b) = {sb:.1f}", f"GSC(first BN, 0) "
                                   f"{g_deep:.1f}", g_deep)
    budget_learns = at_most("the baseline learns", mini_ctrl[0], 0.5,
                            f"best minibatch error of the shallow control (same b, steps and step sizes)", fmt=".3f")
    rows.append(Row(
        claim=f"batch-ReLU MLP (24 linear layers, width 64): GSC at the first BN = {g_deep:.1f} > sqrt(b) = {sb:.1f}; "
              f"minibatch (b = {b}) training does not learn",
        source=f"{SRC}, §4.5", paper="error > 89 % (chance 90 %) with b = 1000, GSC 5728 > 31.6",
        ours=f"best train-mode error after {steps} steps over step sizes {list(lrs)}: {mini_deep[0]:.3f} "
             f"(lr {mini_deep[1]:g})",
        criterion="the best minibatch error ≥ 0.8 (chance 0.9)",
        tolerance="0.8: 'no learning' read as at most 10 points better than chance, fixed before the run",
        holds=bool(mini_deep[0] >= 0.8), preconditions=[deep_setting, budget_learns],
        data={"gsc_bn": g_deep, "runs": mini_deep[2]}))
    rows.append(Row(
        claim="the same network trains full-batch",
        source=f"{SRC}, §4.5 / App. I.3 (batch-ReLU trained with batch 50,000)", paper="34.8 % (CIFAR10, custom steps)",
        ours=f"best full-batch error after {steps} steps: {full_deep[0]:.3f} (lr {full_deep[1]:g})",
        criterion="best full-batch train error ≤ 0.5", tolerance="0.5: clearly learning (chance 0.9), fixed before the run",
        holds=bool(full_deep[0] <= 0.5), preconditions=[deep_setting], data={"runs": full_deep[2]}))
    rows.append(Row(
        claim=f"control: batch-ReLU MLP with 4 linear layers, GSC at the first BN = {g_ctrl:.2f} < sqrt(b): minibatch "
              "training works",
        source=f"{SRC}, §4.5 (the condition GSC > sqrt(b))", paper="",
        ours=f"best minibatch error after {steps} steps: {mini_ctrl[0]:.3f} (lr {mini_ctrl[1]:g})",
        criterion="the best minibatch error ≤ 0.5",
        tolerance="0.5, fixed before the run", holds=bool(mini_ctrl[0] <= 0.5),
        preconditions=[setting_matches(g_ctrl < sb, f"GSC(first BN, 0) < sqrt(b) = {sb:.1f}",
                                       f"GSC(first BN, 0) {g_ctrl:.2f}", g_ctrl)],
        data={"gsc_bn": g_ctrl, "runs": mini_ctrl[2]}))
    rows.append(Row(
        claim=f"open point: batch-tanh MLP (24 linear layers), GSC at the first BN = {g_bt:.1f} vs sqrt(b) = {sb:.1f}, "
              "minibatch training",
        source=f"{SRC}, §4.5 and Table 2 (batch-tanh trained with b = 1000 although GSC 93.6 > 31.6)",
        paper="batch-tanh: 12.31 % (custom) / 23.8 % (single), CIFAR10",
        ours=f"best minibatch error after {steps} steps: {mini_bt[0]:.3f} (lr {mini_bt[1]:g})",
        data={"gsc_bn": g_bt, "runs": mini_bt[2]}))
    return rows


# ================================================================================================ shallow-training
ARCHS = {  # name -> (builder kwargs, kind); Table 2 rows at CPU scale (32 linear layers in full mode, width 64, digits)
    "layer-tanh": (dict(act="tanh", norm="layer", init="gaussian"), "exploding"),
    "ReLU": (dict(act="relu", norm="none", init="gaussian"), "collapsing"),
    "ResNet layer-tanh": (dict(act="tanh", norm="layer"), "resnet"),
    "LLI ReLU": (dict(act="relu", norm="none", init="looks_linear"), "lli"),
    "SeLU": (dict(act="selu", norm="none", init="gaussian"), "exploding"),
    "batch-tanh": (dict(act="tanh", norm="batch", init="gaussian"), "exploding"),
    "tanh": (dict(act="tanh", norm="none", init="gaussian"), "collapsing"),
    "ResNet layer-ReLU": (dict(act="relu", norm="layer"), "resnet"),
}
QUICK_ARCHS = ("layer-tanh", "ReLU", "ResNet layer-tanh", "LLI ReLU")
N_LINEAR = 32  # full mode: >= 30 layers, where effective depth can separate architectures (issue 27); the paper: 51
QUICK_DEPTH = 12
#: effective depth is judged only on networks at least this deep: at 12 layers the D.2 estimator saturates at 11
#: for every architecture, so it cannot separate them (issue 27)
MIN_DEPTH_FOR_ED = 30
WIDTH = 64
CAP = 0.1  # App. I.3: no single-layer relative update above 0.1; scaling stops when one layer reaches it
LR_GRID = tuple(1e-3 * 3.0 ** k for k in range(9))  # x3 grid (the paper's selection grid is x1.5)
# Table 2 (CIFAR10 training error, custom per-layer step / single step)
TABLE2 = {"layer-tanh": (1.92, 17.5), "ReLU": (31.48, 19.24), "ResNet layer-tanh": (0.35, 0.27),
          "LLI ReLU": (0.002, 0.008), "SeLU": (0.24, 1.78), "batch-tanh": (12.31, 23.8), "tanh": (23.42, 16.22),
          "ResNet layer-ReLU": (2.09, 1.49)}


def build_table2_model(name: str, seed: int = 0, depth: int = N_LINEAR) -> nn.Sequential:
    """A Table 2 architecture at CPU scale: ``depth`` linear layers (even), width 64, 64 inputs (digits), 10 outputs;
    bias-free, affine-free norms after every linear layer (vanilla) or pre-activation blocks (ResNet,
    (depth − 2) / 2 blocks of two linear layers, a first linear layer and a head)."""
    from ..zoo import mlp, resnet_mlp

    kw, kind = ARCHS[name]
    if kind == "resnet":
        return resnet_mlp(64, 10, width=WIDTH, blocks=(depth - 2) // 2, skip="identity", bias=False, affine=False,
                          final_norm=True, seed=seed, **kw)
    return mlp(64, 10, depth=depth, width=WIDTH, bias=False, affine=False, final_norm=True, seed=seed, **kw)


def _weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def _has_bn(model) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _error(model, X, Y, b) -> float:
    if _has_bn(model):
        return _error_train_mode(model, X, Y, b)
    was = model.training
    model.eval()
    with torch.no_grad():
        err = float((model(X).argmax(1) != Y).double().mean())
    model.train(was)
    return err


def _sgd(model, lrs: list[float], X, Y, b: int, epochs: int, gen: torch.Generator):
    """Plain SGD (the paper's optimizer) with one step size per linear layer (0 = frozen), batches of ``b`` from a
    permutation per epoch. Returns (end-of-epoch errors, max relative update per layer, diverged)."""
    import torch.nn.functional as F

    W = _weights(model)
    live = [(w, lr) for w, lr in zip(W, lrs) if lr > 0]
    max_rel = [0.0] * len(W)
    idx_of = {id(w): i for i, w in enumerate(W)}
    errs = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=gen)
        for s in range(0, len(X) - b + 1, b):
            i = perm[s:s + b]
            loss = F.cross_entropy(model(X[i]), Y[i])
            if not torch.isfinite(loss):
                return errs, max_rel, True
            grads = torch.autograd.grad(loss, [w for w, _ in live])
            with torch.no_grad():
                for (w, lr), g in zip(live, grads):
                    j = idx_of[id(w)]
                    max_rel[j] = max(max_rel[j], float(lr * g.norm() / w.norm()))
                    w.sub_(lr * g)
        errs.append(_error(model, X, Y, b))
    return errs, max_rel, False


def layerwise_steps(name: str, X, Y, b: int, seed: int = 0, depth: int = N_LINEAR, grid=LR_GRID) -> dict:
    """The per-layer step-size protocol of App. I.3, simplified (decision; documented in the rows): (2) selection —
    for each linear layer alone, 1 epoch from the initial network per step size of :data:`LR_GRID`, rewound
    afterwards; only sizes whose relative updates stay < 0.1 are allowed; the lowest training error wins;
    (4) smoothing — a least-squares line through log(max relative update) against the layer index, each step
    multiplied by fitted / observed; (5) scaling — one global factor grown x1.5 with 1-epoch trials from the initial
    network until some layer's relative update would reach 0.1. Stage (1) (pre-training a subset) and (3)
    (clipping) are skipped. Cost: N x |grid| + ~10 single epochs."""
    base = build_table2_model(name, seed, depth)
    n = len(_weights(base))
    chosen, upd = [], []
    for l in range(n):
        best = None
        for lr in grid:
            m = copy.deepcopy(base)
            lrs = [0.0] * n
            lrs[l] = lr
            errs, rel, div = _sgd(m, lrs, X, Y, b, 1, torch.Generator().manual_seed(seed + 1))
            if div or rel[l] >= CAP:
                continue
            key = (errs[-1], rel[l])
            if best is None or key < best[0]:
                best = (key, lr, rel[l])
        if best is None:  # even the smallest step breaks the cap: keep it, scaled to the cap
            best = ((1.0, CAP), grid[0] * 0.5, CAP / 2)
        chosen.append(best[1])
        upd.append(best[2])
    logu = np.log(np.maximum(np.array(upd), 1e-12))
    fit = np.polyval(np.polyfit(np.arange(n), logu, 1), np.arange(n))
    smooth = [lr * math.exp(f - u) for lr, f, u in zip(chosen, fit, logu)]
    def joint_ok(f: float) -> bool:
        m = copy.deepcopy(base)
        _, rel, div = _sgd(m, [f * s for s in smooth], X, Y, b, 1, torch.Generator().manual_seed(seed + 2))
        return not div and max(rel) < CAP

    # the joint update is larger than the single-layer ones (≈ sqrt(N), I.3): shrink until one joint epoch keeps
    # every relative update below the cap, then grow x1.5 while it still does
    factor = 1.0
    for _ in range(12):
        if joint_ok(factor):
            break
        factor /= 1.5
    for _ in range(12):
        if not joint_ok(factor * 1.5):
            break
        factor *= 1.5
    return {"selected_lr": chosen, "selected_update": upd, "smoothed_lr": smooth, "factor": factor,
            "lrs": [factor * s for s in smooth]}


def _train_plateau(model, lrs, X, Y, b, epochs, seed, callbacks=(), use_fit=False):
    """Train ``epochs`` epochs of plain SGD with per-layer step sizes, dividing every step size by 3 when the
    end-of-epoch training error has not improved for 2 epochs (the paper: 5 epochs, CIFAR). With ``use_fit`` the
    epochs go through :func:`gradcond.train.fit` (so the callbacks run); returns the end-of-epoch errors."""
    from ..train import fit
    from ..utils import TrainingDiverged
    from ._training import BatchStream

    W = _weights(model)
    opt = torch.optim.SGD([{"params": [w], "lr": lr} for w, lr in zip(W, lrs)], lr=max(lrs), momentum=0.0)
    gen = torch.Generator().manual_seed(seed)
    stream = BatchStream(X, Y, b, len(X) // b, gen)
    errs, best, since = [], float("inf"), 0
    for _ in range(epochs):
        if use_fit:
            try:
                with torch.random.fork_rng(devices=[]):
                    fit(model, stream, optimizer=opt, epochs=1, callbacks=list(callbacks), seed=seed,
                        progress_bar=False)
            except (TrainingDiverged, ValueError):
                # a diverged run: fit refuses a non-finite step, and a callback measuring before the step may
                # already have met the non-finite loss; anything else is a real error and propagates
                with torch.no_grad():
                    finite = bool(torch.isfinite(torch.nn.functional.cross_entropy(model(X[:b]), Y[:b])))
                if finite and all(torch.isfinite(w).all() for w in W):
                    raise
                errs.append(1.0)
                break
        else:
            _, _, div = _sgd(model, [g["lr"] for g in opt.param_groups], X, Y, b, 1, gen)
            if div:
                errs.append(1.0)
                break
        if not all(torch.isfinite(w).all() for w in W):
            errs.append(1.0)
            break
        e = _error(model, X, Y, b)
        errs.append(e)
        if e < best - 1e-9:
            best, since = e, 0
        else:
            since += 1
            if since >= 2:
                for g in opt.param_groups:
                    g["lr"] /= 3
                since = 0
    return errs


def update_size_rows(name: str, selected_update, gsc0, gsc_start: float, cap: float = CAP) -> list[Row]:
    """Thm. 1 / Cor. 1 and Fig. 2A on one exploding network: (a) among the layers where 1/GSC(l,0) is below the
    protocol's cap (elsewhere the bound cannot bind), the fraction with a selected relative update u_l <= 1/GSC(l,0)
    is >= 0.8 ('a few outliers'; power: >= 5 such layers); (b) u_l grows away from the input: Spearman's rho(layer
    index, u_l) >= the two-sided 5 % critical value (judging.spearman / spearman_critical; power: the critical value
    is reachable)."""
    u = np.asarray(selected_update, dtype=float)
    inv = 1 / np.asarray(gsc0, dtype=float)
    informative = inv < cap
    n_inf = int(informative.sum())
    frac = float((u[informative] <= inv[informative]).mean()) if n_inf else float("nan")
    rows = [Row(
        claim=f"{name}: the best single-layer relative update size stays below 1/GSC(l,0)",
        source=f"{SRC}, Thm. 1 / Cor. 1, Fig. 2A", paper="below 1/GSC apart from a few outliers",
        ours=(f"{n_inf} of {len(u)} layers have 1/GSC(l,0) < the {cap} cap; of those {frac:.2f} satisfy u_l ≤ 1/GSC"
              if n_inf else f"1/GSC(l,0) ≥ the {cap} cap at every layer (GSC(L,0) = {gsc_start:.2f}): the bound "
                            "cannot bind at this depth"),
        criterion=f"among layers where 1/GSC(l,0) < {cap} (the protocol's cap; elsewhere the bound cannot bind), "
                  "the fraction with u_l ≤ 1/GSC(l,0) ≥ 0.8",
        tolerance="0.8: 'a few outliers', fixed before the run",
        holds=bool(frac >= 0.8) if n_inf else None,
        preconditions=[enough_samples(n_inf, MIN_SEEDS, f"layers where 1/GSC(l,0) < {cap}")],
        data={"u": u.tolist(), "inv_gsc": inv.tolist()})]
    rho, n = spearman(np.arange(len(u)), u)
    crit = spearman_critical(n)
    rows.append(Row(
        claim=f"{name}: the best relative update size decreases towards the input",
        source=f"{SRC}, Fig. 2A", paper="decreasing towards the input (exploding architectures)",
        ours=f"Spearman rho(layer index from the input, selected u_l) = {rho:.2f} over {n} layers (5 % critical "
             f"value {crit:.3f})",
        criterion="rho ≥ the two-sided 5 % critical value (larger updates further from the input)",
        tolerance="Spearman 5 % critical value (judging.spearman_critical). Changed for issue 27 from 'rho > 0' "
                  "(the sign alone, a coin flip without a trend): stricter",
        holds=bool(rho >= crit) if math.isfinite(rho) else None, preconditions=[rho_power(n)],
        data={"rho": rho, "n": n, "critical": crit}))
    return rows


def effective_depth_rows(eds: dict, depth: int) -> list[Row]:
    """Fig. 2D / 5D: no network reaches the full effective depth; ResNets reach more than their vanilla
    counterparts. Judged only on networks of >= :data:`MIN_DEPTH_FOR_ED` linear layers (the setting of the claim:
    shallower, the D.2 estimator saturates for every architecture)."""
    top = depth - 1  # the D.2 estimator counts residual Jacobians of the layers above a layer: at most depth − 1
    deep = setting_matches(depth >= MIN_DEPTH_FOR_ED, f">= {MIN_DEPTH_FOR_ED} linear layers (at 12 the estimator "
                           "saturates for every architecture)", f"{depth} linear layers", float(depth))
    rows = [Row(
        claim="no architecture reaches the full effective depth",
        source=f"{SRC}, Fig. 2D / 4D / 5D / 6D, App. D.2", paper="none reaches 51 (SeLU, batch-tanh come close)",
        ours="; ".join(f"{n}: {v}" for n, v in eds.items()) + f" (maximum the estimator can return: {top}; D.2 "
             "estimator, h = 1e-6)",
        criterion=f"effective depth < {top} (= linear layers − 1, the largest λ the D.2 estimator can return) for "
                  "every architecture",
        tolerance="none. Correction made while writing the entry: a first draft compared with the number of linear "
                  f"layers ({depth}), which the estimator cannot reach, so that row could not fail",
        holds=bool(all(v < top for v in eds.values())), preconditions=[deep], data=dict(eds))]
    pairs = [p for p in (("ResNet layer-tanh", "layer-tanh"), ("ResNet layer-ReLU", "ReLU")) if p[0] in eds
             and p[1] in eds]
    rows.append(Row(
        claim="ResNets reach a higher effective depth than the vanilla network with the same nonlinearity",
        source=f"{SRC}, Fig. 5D vs Fig. 2D / 4D", paper="higher effective depth",
        ours="; ".join(f"{a}: {eds[a]} vs {v}: {eds[v]}" for a, v in pairs),
        criterion="effective depth of each ResNet > that of its vanilla counterpart", tolerance="none",
        holds=bool(all(eds[a] > eds[v] for a, v in pairs)) if pairs else None, preconditions=[deep], data={}))
    return rows


def _learned(name: str, err: float) -> Precondition:
    return baseline_learns(1 - err, 0.1, 0.2, what=f"{name}'s training accuracy after training")


def taylor_rows(res: dict, depth: int) -> list[Row]:
    """Fig. 2F / 5F: layer-tanh tolerates Taylor truncation of its bottom half; the ResNet less so. Precondition:
    the truncated networks learned (an untrained network loses nothing to truncation, so the row could not fail)."""
    half = depth // 2
    lt, rn = res["layer-tanh"], res["ResNet layer-tanh"]
    inc_lt = lt["taylor"][half] - lt["err"]
    inc_rn = rn["taylor"][half] - rn["err"]
    return [Row(
        claim=f"layer-tanh tolerates Taylor truncation of its bottom {half} linear layers",
        source=f"{SRC}, Fig. 2F, App. G", paper="layer-tanh reduced to depth 15 beats batch-tanh and batch-ReLU",
        ours=f"error {100 * lt['err']:.2f} % → {100 * lt['taylor'][half]:.2f} % truncated",
        criterion="truncated error − trained error ≤ 0.05", tolerance="5 points, fixed before the run",
        holds=bool(inc_lt <= 0.05), preconditions=[_learned("layer-tanh", lt["err"])], data={"increase": inc_lt}),
        Row(
        claim="the ResNet is less robust to Taylor truncation than the vanilla layer-tanh network",
        source=f"{SRC}, Fig. 5F vs 2F", paper="ResNets less robust to truncation",
        ours=f"error increase at k = {half}: ResNet layer-tanh {100 * inc_rn:+.2f} points vs layer-tanh "
             f"{100 * inc_lt:+.2f} points",
        criterion="increase(ResNet) > increase(layer-tanh)", tolerance="none",
        holds=bool(inc_rn > inc_lt), preconditions=[_learned("layer-tanh", lt["err"]),
                                                    _learned("ResNet layer-tanh", rn["err"])],
        data={"resnet": inc_rn, "vanilla": inc_lt})]


def best_error_row(custom: dict, single: dict) -> Row:
    """Table 2: LLI and ResNets reach lower training error than the vanilla exploding and collapsing networks,
    each architecture judged by the better of its custom-step and single-step errors (Table 2 prints both and bolds
    the lower; our per-layer protocol skips stages 1 and 3, so its custom run alone can land far from the paper's).
    Precondition: the budget trains some network (the best error leaves chance by 20 points)."""
    best = {n: min(custom[n], single[n]) for n in custom}
    good = [n for n in best if ARCHS[n][1] in ("resnet", "lli")]
    bad = [n for n in best if ARCHS[n][1] in ("exploding", "collapsing")]
    worst_good = max(best[n] for n in good)
    best_bad = min(best[n] for n in bad)
    return Row(
        claim="LLI and ResNets reach lower training error than the vanilla exploding and collapsing networks",
        source=f"{SRC}, Table 2", paper="LLI 0.002-0.77 %, ResNets 0.06-2.09 % vs vanilla 0.24-42 % (custom); "
                                        "LLI 0.008-1.2 %, ResNets 0.096-1.55 % vs vanilla 1.78-76.65 % (single)",
        ours=f"better of custom / single: worst of {', '.join(good)}: {100 * worst_good:.2f} %; best of "
             f"{', '.join(bad)}: {100 * best_bad:.2f} % (" + ", ".join(
                 f"{n}: {100 * custom[n]:.1f} / {100 * single[n]:.1f} %" for n in best) + ")",
        criterion="max over LLI/ResNets of min(custom, single) error < min over vanilla Gaussian networks of the same",
        tolerance="none. Changed for issue 27 from the custom-step error alone: our per-layer protocol skips the "
                  "paper's pre-training and clipping stages, so each architecture is judged by the better of its "
                  "two Table 2 errors",
        holds=bool(worst_good < best_bad),
        preconditions=[baseline_learns(1 - min(best.values()), 0.1, 0.2, what="the best network's training accuracy")],
        data={"best": best})


@register(
    "shallow-training",
    claim="Trained with per-layer step sizes, exploding vanilla networks keep their best relative update sizes below "
          "1/GSC(l,0) (Thm. 1) and decreasing towards the input; no network reaches its full compositional depth in "
          "effective depth, ResNets reach more of it than vanilla networks; a layer-tanh network survives Taylor "
          "truncation of half its layers, ResNets less so; LLI and ResNets reach lower training error than vanilla "
          "exploding and collapsing networks.",
    source="seed 003, Table 2, Figs. 2 (A: update size vs 1/GSC, C: GSC, D: effective depth, F: Taylor), 4, 5, 6; "
           "Thm. 1 / Cor. 1; App. D.2, G, I.3",
    protocol="Table 2 architectures at CPU scale on digits (standardised 8x8, training error is the metric as in "
             "I.3): bias-free, affine-free, width 64; 32 linear layers and all 8 architectures in full mode (the "
             "paper: 51 on CIFAR10), 12 layers, 4 architectures and 640 rows in quick mode. Plain SGD, batch 64, "
             "30 epochs (quick 8), step sizes divided by 3 after 2 epochs without improvement (the paper: 5). "
             "Per-layer steps: I.3's selection (each layer alone for 1 epoch, relative updates < 0.1), smoothing "
             "and scaling stages; pre-training (stage 1) and clipping (stage 3) are skipped, so each architecture "
             "is also trained with the best single step size of the grid (Table 2's other column) and the error "
             "comparison judges the better of the two. Effective depth by the D.2 estimator (h = 1e-6) during the "
             "custom-step run; Taylor truncation (App. G) after it. Preconditions: effective depth is judged only "
             "at >= 30 linear layers (quick mode: untestable), the update-size bound only over >= 5 layers where "
             "it can bind, the trend by a reachable Spearman critical value, the Taylor rows on networks that "
             "learned (accuracy >= chance + 20 points).",
)
def run_training(quick: bool, out_dir: Path) -> list[Row]:
    from ..data import load_dataset
    from ..probes.scale import gsc_profile
    from ..probes.taylor import taylor_truncate
    from ..probes.tracking import EffectiveDepth

    X, Y = load_dataset("digits").train.tensors
    b = 64
    if quick:  # 12 linear layers, 640 training rows (10 steps per epoch), a 6-point grid: about a minute on 2 cores
        X, Y = X[:640], Y[:640]
        depth, epochs, grid, names = QUICK_DEPTH, 8, LR_GRID[1:7], QUICK_ARCHS
    else:
        depth, epochs, grid, names = N_LINEAR, 30, LR_GRID, tuple(ARCHS)
    res = {}
    for name in names:
        steps = layerwise_steps(name, X, Y, b, depth=depth, grid=grid)
        model = build_table2_model(name, depth=depth)
        theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
        prof0 = gsc_profile(model.train(), "cross_entropy", (X, Y), per_sample=False)
        gsc0 = [g for g, k in zip(prof0.gsc, prof0.kinds) if k == "linear"]
        ed = EffectiveDepth(threshold=1e-6)
        errs = _train_plateau(model, steps["lrs"], X, Y, b, epochs, seed=5, callbacks=[ed], use_fit=True)
        prof1 = gsc_profile(model.train(), "cross_entropy", (X, Y), per_sample=False)
        taylor = {}
        for k in (depth // 4, depth // 2, 3 * depth // 4):
            tm = taylor_truncate(model, theta0, k)
            taylor[k] = _error(tm, X, Y, b) if not _has_bn(model) else _error_train_mode(tm, X, Y, b)
        single = []
        for lr in grid:
            m = build_table2_model(name, depth=depth)
            e = _train_plateau(m, [lr] * len(_weights(m)), X, Y, b, epochs, seed=5)
            single.append((lr, e[-1] if e else 1.0))
        best_single = min(single, key=lambda t: t[1])
        per_epoch = len(X) // b
        ed_curve = [h["effective_depth"] for h in ed.history][per_epoch - 1::per_epoch]
        res[name] = {"steps": steps, "err": errs[-1], "errs": errs, "gsc0": gsc0, "gsc_end": prof1.lowest,
                     "gsc_start": prof0.lowest, "ed": ed.value, "ed_curve": ed_curve, "taylor": taylor,
                     "single": best_single, "single_all": single}
    rows: list[Row] = []
    for name in names:
        r = res[name]
        rows.append(Row(
            claim=f"{name}: final training error, custom per-layer steps vs one step size",
            source=f"{SRC}, Table 2", paper=f"CIFAR10: {TABLE2[name][0]} % custom / {TABLE2[name][1]} % single",
            ours=f"digits: {100 * r['err']:.2f} % custom / {100 * r['single'][1]:.2f} % single (lr {r['single'][0]:.3g}), "
                 f"{epochs} epochs; GSC(L,0) {r['gsc_start']:.3g} at init, {r['gsc_end']:.3g} after training; "
                 f"effective depth {r['ed']} of {depth} (per epoch: {r['ed_curve']}); Taylor-truncated error "
                 "(bottom k linear layers): "
                 + ", ".join(f"k={k}: {100 * v:.1f} %" for k, v in r["taylor"].items()),
            data={k: v for k, v in r.items() if k != "steps"} | {"steps": r["steps"]}))
    # Thm. 1 / Fig. 2A on the exploding vanilla networks
    for name in [n for n in names if ARCHS[n][1] == "exploding"]:
        rows += update_size_rows(name, res[name]["steps"]["selected_update"], res[name]["gsc0"],
                                 res[name]["gsc_start"])
    rows += effective_depth_rows({n: res[n]["ed"] for n in names}, depth)
    rows += taylor_rows(res, depth)
    rows.append(best_error_row({n: res[n]["err"] for n in names}, {n: res[n]["single"][1] for n in names}))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in names:
        r = res[name]
        axes[0].semilogy(r["steps"]["selected_update"], "o-", ms=3, label=name)
        axes[1].plot(range(1, len(r["errs"]) + 1), r["errs"], label=name)
    for name in [n for n in names if ARCHS[n][1] == "exploding"]:
        axes[0].semilogy(1 / np.array(res[name]["gsc0"]), "k--", lw=1)
    axes[0].set_xlabel("linear layer (0 = input)")
    axes[0].set_ylabel("selected relative update (dashed: 1/GSC)")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("training error")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "shallow_training.png", dpi=110)
    plt.close(fig)
    return rows
