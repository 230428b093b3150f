"""Seed-004 reproductions that need the exact condition numbers or simulate the thesis's lemma (issue 17 §3):

* ``conditioning-exact-kx`` — Def 3.3 / eqs. 3.15-3.16 / Thm 1.6: the exact κ_X = ‖∂h_W/∂x‖₂‖x‖/‖h_W‖ (power
  iteration, checked against the dense mixed Jacobian) next to the directional estimates κ≈_X of every input sampler.
* ``conditioning-lemma22`` — Lemma 2.2, Figs 2.1 and 2.2: the simulation of the condition inequality (2.2) against
  the result inequality (2.3) over 1000 pairs of distributions (the second run with length bias).
* ``conditioning-bn-train`` — eq. 2.24 / Def 2.4 on BatchNorm networks: κ_W of the train-mode function SGD follows
  (``bn="train"``) next to the frozen-statistics (``"batch"``) and running-statistics (``"eval"``) values.

All on the CPU, float64 where an exact value is compared; digits data (8×8 images, 64 features).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .judging import at_least
from .registry import Row, register

LOSS = F.cross_entropy
SRC = "seed 004"


def _plt():
    from ..report.figures import object_pyplot

    return object_pyplot()


def _digits(form: str = "flat"):
    from ..data import load_dataset

    d = load_dataset("digits", form=form, dtype=torch.float64)
    return d.train.tensors


def _pretrain(model, X, Y, steps: int, lr: float, seed: int = 0):
    from ._training import train_steps

    return train_steps(model, X, Y, "momentum", steps, 64, torch.Generator().manual_seed(seed),
                       sampling="replacement", lr=lr, momentum=0.9)


# ---------------------------------------------------------------------------------------------------- exact κ_X
EXACT_TOL = 1e-5     # power iteration (stopping rule 1e-9 relative change) vs dense SVD
BOUND_TOL = 1e-9     # a directional derivative can exceed the operator norm only by rounding
FD_SMOOTH_TOL = 1e-2  # Thm 1.6: κ + o(ε) ≥ the finite-difference ratio; 1 % leaves room for the o(η) term at η=1e-3


@register(
    "conditioning-exact-kx",
    claim="The sampled batch-dissonance κ≈_X is a lower bound of the exact input-space gradient condition number "
          "κ_X = ||∂h_W/∂x||₂ ||x|| / ||h_W|| (exactly for directional derivatives; up to o(η) for finite "
          "differences in smooth networks); the exact value is computable and is reported next to the estimate.",
    source="seed 004, Def 3.3 (κ_{h_W,X}), eqs. 3.15-3.16 (κ≈_X), Thm 1.6 / Def 1.7 (sampled lower bound), Def 3.5 "
           "and Fig 3.2 (input samplers)",
    protocol="tanh and ReLU MLPs (4 linear layers, width 32) in float64 on digits after 60 (quick) / 200 (full) "
             "SGD + momentum steps; 16 / 64 samples. Exact kappa_X per sample by power iteration on the mixed "
             "Jacobian, checked against a dense SVD on 4 / 16 samples; the directional estimates (jvp and finite "
             "differences, eta = 1e-3, 8 directions of each input sampler at equal Euclidean length) are compared "
             "with it. Tolerances fixed before the run: 1e-5 (power vs dense), 1e-9 (jvp bound: rounding only), "
             "1e-2 (finite differences in the smooth tanh net: the o(eta) term); the ReLU net's finite differences "
             "are reported (kinks make them no bound).",
)
def run_exact_kx(quick: bool, out_dir: Path) -> list[Row]:
    from ..probes import conditioning as C
    from ..zoo import mlp

    X, Y = _digits()
    m = 16 if quick else 64
    n_dense = 4 if quick else 16
    n_dirs = 8
    rows: list[Row] = []
    summary = {}
    for act in ("tanh", "relu"):
        model = mlp(64, 10, depth=4, width=32, act=act, seed=0).double()
        _pretrain(model, X, Y, steps=60 if quick else 200, lr=0.05)
        batch = (X[:m], Y[:m])
        exact = C.input_condition_exact(model, LOSS, batch, method="power")
        dense = C.input_condition_exact(model, LOSS, (X[:n_dense], Y[:n_dense]), method="dense")
        kp = np.array(exact.details["per_sample"])
        kd = np.array(dense.details["per_sample"])
        rel = float(np.max(np.abs(kp[:n_dense] / kd - 1)))
        rows.append(Row(
            claim=f"{act} MLP (4 linear layers, width 32, trained): exact κ_X by power iteration",
            source=f"{SRC}, Def 3.3", paper="κ_X = ||J||₂ ||x|| / ||h_W|| (no value printed)",
            ours=f"mean κ_X = {exact.value:.4g} over {m} samples (range {kp.min():.3g}-{kp.max():.3g}); power vs "
                 f"dense SVD on {n_dense} samples: max rel. diff {rel:.1e}; all converged: {all(exact.details['converged'])}",
            criterion="max over samples |κ_power / κ_dense − 1| < tol (dense: the full m×k mixed Jacobian and its "
                      "largest singular value)",
            tolerance=f"{EXACT_TOL:g}: power iteration stops at 1e-9 relative change; near-equal top singular values "
                      "converge slowly; a wrong Jacobian is off by O(1)",
            holds=bool(rel < EXACT_TOL and all(exact.details["converged"])),
            data={"act": act, "per_sample": kp.tolist(), "dense": kd.tolist(), "max_rel_diff": rel}))
        ratios = {}
        for sampler in ("targeted", "random", "interpolation"):
            for mode in ("jvp", "finite_difference"):
                est = C.batch_dissonance(model, LOSS, batch, sampler=sampler, n=n_dirs, norm="2", eta=1e-3,
                                         mode=mode, seed=1)
                ratios[(sampler, mode)] = np.array(est.details["per_sample"]) / kp
        worst_jvp = max(float(ratios[(s, "jvp")].max()) for s in ("targeted", "random", "interpolation"))
        rows.append(Row(
            claim=f"{act} MLP: the directional κ≈_X (exact derivative along each of {n_dirs} directions, every "
                  "sampler) never exceeds κ_X",
            source=f"{SRC}, Thm 1.6 / Def 1.7 (lower bound), eqs. 3.15-3.16",
            paper="κ≈ is a lower bound of κ",
            ours=f"max over samples and samplers of κ≈_X(jvp) / κ_X = {worst_jvp:.4f}",
            criterion="max_i κ≈_X(x_i) / κ_X(x_i) ≤ 1 + tol for the targeted, random and interpolation samplers",
            tolerance=f"{BOUND_TOL:g}: float64 rounding only (||Jδ|| ≤ ||J|| ||δ|| exactly)",
            holds=bool(worst_jvp <= 1 + BOUND_TOL), data={"act": act, "max_ratio": worst_jvp}))
        worst_fd = max(float(ratios[(s, "finite_difference")].max()) for s in ("targeted", "random", "interpolation"))
        n_over = int(sum((ratios[(s, "finite_difference")] > 1).sum() for s in ("targeted", "random", "interpolation")))
        if act == "tanh":
            rows.append(Row(
                claim="tanh MLP (smooth): the finite-difference κ≈_X (η = 1e-3, eq. 3.15) is a lower bound of κ_X up "
                      "to o(η)",
                source=f"{SRC}, Thm 1.6, eq. 3.15", paper="κ + o(ε) ≥ sampled ratio",
                ours=f"max κ≈_X(FD) / κ_X = {worst_fd:.5f}",
                criterion="max over samples and samplers of κ≈_X(FD) / κ_X ≤ 1 + tol",
                tolerance=f"{FD_SMOOTH_TOL:g}: the o(η) term at η = 1e-3 of ||x|| in a smooth network",
                holds=bool(worst_fd <= 1 + FD_SMOOTH_TOL), data={"max_ratio": worst_fd}))
        else:
            rows.append(Row(
                claim="ReLU MLP: finite-difference κ≈_X relative to κ_X (kinks crossed inside the step can make it "
                      "exceed κ_X: an estimate, not a bound)",
                source=f"{SRC}, Thm 1.6 (assumes differentiability in the ball)", paper="",
                ours=f"max κ≈_X(FD) / κ_X = {worst_fd:.4f}; {n_over} of {3 * m} (sample, sampler) values exceed κ_X",
                data={"max_ratio": worst_fd, "n_over": n_over}))
        tight = {s: float(ratios[(s, "jvp")].mean()) for s in ("targeted", "random", "interpolation")}
        rows.append(Row(
            claim=f"{act} MLP: share of the exact κ_X each input sampler's κ≈_X captures (equal step length)",
            source=f"{SRC}, Fig 3.2 (samplers performed identically)", paper="identical across samplers",
            ours="; ".join(f"{s} {v:.3f}" for s, v in tight.items()) + " (mean of κ≈_X / κ_X, jvp)",
            data={"act": act, "tightness": tight}))
        summary[act] = (kp, {s: ratios[(s, "jvp")] for s in ("targeted", "random", "interpolation")})
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (act, (kp, rs)) in zip(axes, summary.items()):
        for s, r in rs.items():
            ax.scatter(kp, r * kp, s=10, label=s)
        lim = [0, float(kp.max()) * 1.05]
        ax.plot(lim, lim, "k--", lw=1, label="κ≈ = κ")
        ax.set_xlabel("exact κ_X")
        ax.set_ylabel("directional κ≈_X (jvp)")
        ax.set_title(f"{act} MLP")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "exact_kx.png", dpi=110)
    plt.close(fig)
    return rows


# ---------------------------------------------------------------------------------------------------- Lemma 2.2
def lemma22_simulation(n_dist: int, n_samples: int, dim: int = 100, *, stretch: str | None = None,
                       equal_length: bool = True, seed: int = 0, chunk: int = 50) -> dict:
    """The Lemma 2.2 simulation of seed 004 (Figs 2.1, 2.2), vectorised over chunks of distributions.

    For each of ``n_dist`` pairs of distributions (A for (u, v), B for (x, y)): entries of u ~ N(μ, σ²) with
    μ ~ U(−1, 1), σ ~ U(0.1, 2) drawn per distribution; v = u + p with p's entries ~ N(0, (s·rms)²), s ~ U(0, 1/5)
    per distribution and rms = sqrt(μ² + σ²) (so ||u − v|| / ||u|| ≈ s: "perturbation scale between zero and
    one-fifth of the scale of u"). ``equal_length``: v is rescaled to ||u|| (the δ → 0 regime the lemma's
    discussion assumes, ||v|| → ||u||; decision, the text does not say). ``stretch`` (Fig 2.2): each of the four
    vectors gets a factor 1 + a·s with a ~ U(0.5, 1.5) (the "re-scaling factor between .5 and 1.5 multiplied by the
    perturbation scale"), so ||v||/||u|| and ||y||/||x|| differ by up to ≈ 0.3; ``"distribution"``: one factor per
    vector role and distribution ("for each distribution a set of stretch factors", applied to every sample),
    ``"sample"``: a fresh factor per vector and sample (the other reading of the text); None: no stretch.

    Condition inequality (2.2): ε = ||u − v|| / ||u||; result inequality (2.3) without error terms:
    r = (||u||² − <u, v>) / ||u||². Per distribution pair: the direction of E[ε_B] − E[ε_A] (over ``n_samples``
    draws) and whether E[r_B] − E[r_A] has the same sign, plus the per-sample agreement rates of both inequalities
    with the expectation direction. Returns arrays ``agree`` (bool), ``cond_rate``, ``res_rate``, ``cond_gap``,
    ``res_gap`` (signed in the condition's direction), and per pair of distributions the mean of ε²/2 (``half_eps2``)
    and of |1 − c²|/2 with c = ||v|| / ||u|| (``half_len``), and ``identity_err``, the largest
    |r − (ε² + 1 − c²)/2| over the samples: r = (ε² + 1 − c²)/2 holds for any u, v, so with ||v|| = ||u|| (c = 1)
    r = ε²/2 is a monotone function of ε and the two inequalities agree by construction; a length bias adds
    (1 − c²)/2. Cost: O(n_dist · n_samples · dim).
    """
    if stretch not in (None, "distribution", "sample"):
        raise ValueError(f"stretch must be None, 'distribution' or 'sample', got {stretch!r}.")
    gen = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("agree", "cond_rate", "res_rate", "cond_gap", "res_gap", "half_eps2", "half_len",
                           "identity_err")}

    def draw(c):
        mu = torch.rand(c, 1, 1, generator=gen, dtype=torch.float64) * 2 - 1
        sd = 0.1 + 1.9 * torch.rand(c, 1, 1, generator=gen, dtype=torch.float64)
        s = 0.2 * torch.rand(c, 1, 1, generator=gen, dtype=torch.float64)
        u = mu + sd * torch.randn(c, n_samples, dim, generator=gen, dtype=torch.float64)
        p = s * torch.sqrt(mu ** 2 + sd ** 2) * torch.randn(c, n_samples, dim, generator=gen, dtype=torch.float64)
        v = u + p
        if equal_length:
            v = v * (u.norm(dim=2, keepdim=True) / v.norm(dim=2, keepdim=True))
        if stretch is not None:
            shape = (c, 1, 1) if stretch == "distribution" else (c, n_samples, 1)
            a_u = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
            a_v = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
            u = u * (1 + a_u * s)
            v = v * (1 + a_v * s)
        eps = (u - v).norm(dim=2) / u.norm(dim=2)
        res = 1 - (u * v).sum(2) / (u * u).sum(2)
        c2 = (v * v).sum(2) / (u * u).sum(2)
        return eps, res, c2

    for start in range(0, n_dist, chunk):
        c = min(chunk, n_dist - start)
        eA, rA, cA = draw(c)
        eB, rB, cB = draw(c)
        out["half_eps2"].append(torch.cat([eA, eB], 1).pow(2).mean(1) / 2)
        out["half_len"].append((1 - torch.cat([cA, cB], 1)).abs().mean(1) / 2)
        ident = torch.cat([(rA - (eA ** 2 + 1 - cA) / 2).abs(), (rB - (eB ** 2 + 1 - cB) / 2).abs()], 1)
        out["identity_err"].append(ident.max(1).values)
        direction = torch.sign(eB.mean(1) - eA.mean(1))
        cond_gap = direction * (eB.mean(1) - eA.mean(1))
        res_gap = direction * (rB.mean(1) - rA.mean(1))
        out["agree"].append(res_gap > 0)
        out["cond_gap"].append(cond_gap)
        out["res_gap"].append(res_gap)
        out["cond_rate"].append((torch.sign(eB - eA) == direction[:, None]).double().mean(1))
        out["res_rate"].append((torch.sign(rB - rA) == direction[:, None]).double().mean(1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


LEMMA_R_MIN = 0.9  # "extremely strong correlation" (Fig 2.1), fixed before the run


def _identity_text(res: dict) -> str:
    return (f"identity r = (ε² + 1 − c²)/2 with c = ||v||/||u|| (max residual {float(res['identity_err'].max()):.1e}): "
            f"mean ε²/2 = {float(res['half_eps2'].mean()):.4f}, mean |1 − c²|/2 = {float(res['half_len'].mean()):.4f}")


@register(
    "conditioning-lemma22",
    claim="Lemma 2.2 in simulation: over 1000 pairs of normal distributions the condition inequality (2.2) and the "
          "result inequality (2.3, error terms dropped) point the same way in expectation for every pair, with "
          "strongly correlated per-sample agreement rates, even with a length bias (the second run, Fig 2.2). The "
          "first run (||v|| = ||u||) is a check of the identity r = (ε² + 1 − c²)/2, not a test of the claim.",
    source="seed 004, Lemma 2.2 (eqs. 2.2-2.5), Fig 2.1 (simulation) and Fig 2.2 (magnitude-bias simulation)",
    protocol="Per distribution pair (A for (u, v), B for (x, y)): entries of u ~ N(mu, sigma^2), mu ~ U(-1, 1), sigma "
             "~ U(0.1, 2); v = u + p with a perturbation scale s ~ U(0, 1/5) of u's scale (the source's text); "
             "dimension 100 (not stated); 300 pairs x 300 samples (quick) / 1000 x 1000 (full, the source's). "
             "First run: v rescaled to ||u|| (the regime the lemma's discussion assumes). Because r = (eps^2 + 1 - "
             "c^2)/2 for any u, v (c = ||v||/||u||), at c = 1 the result inequality is eps^2/2, a monotone function "
             "of the condition's eps: both agree by construction, so the first run is reported as a check of that "
             "identity, not judged. Second run (judged): each vector stretched by 1 + a*s, a ~ U(0.5, 1.5), one "
             "factor per vector role and distribution (the reading fixed before the run; per sample is reported). "
             "Criteria fixed before the run: every pair agrees in expectation; Pearson r of the per-sample "
             "agreement rates >= 0.9.",
)
def run_lemma22(quick: bool, out_dir: Path) -> list[Row]:
    n_dist, n_samp = (300, 300) if quick else (1000, 1000)
    rows: list[Row] = []
    runs = {}
    for label, fig, kw in (("run 1 (||v|| = ||u||)", "Fig 2.1", dict(stretch=None, equal_length=True)),
                           ("run 2 (length bias per distribution)", "Fig 2.2", dict(stretch="distribution",
                                                                                    equal_length=True)),
                           ("run 2, other reading (length bias per sample)", "Fig 2.2", dict(stretch="sample",
                                                                                             equal_length=True)),
                           ("literal reading (v = u + p, lengths free)", "Fig 2.1", dict(stretch=None,
                                                                                          equal_length=False))):
        res = lemma22_simulation(n_dist, n_samp, stretch=kw["stretch"], equal_length=kw["equal_length"],
                                 seed=17 if kw["stretch"] else 4)
        runs[label] = res
        n_agree = int(res["agree"].sum())
        r = float(np.corrcoef(res["cond_rate"], res["res_rate"])[0, 1]) if res["res_rate"].std() > 0 else float("nan")
        data = {"n_dist": n_dist, "n_samples": n_samp, "n_agree": n_agree, "pearson_r": r,
                "mean_cond_rate": float(res["cond_rate"].mean()), "mean_res_rate": float(res["res_rate"].mean()),
                "identity_err": float(res["identity_err"].max()), "half_eps2": float(res["half_eps2"].mean()),
                "half_len": float(res["half_len"].mean())}
        if label.startswith("run 1"):
            rows.append(Row(
                claim=f"{label}: check of the identity r = (ε² + 1 − c²)/2 at c = 1 (reported, not the claim)",
                source=f"{SRC}, Lemma 2.2, {fig}", paper="1000 of 1000 agree; 'extremely strong correlation'",
                ours=f"{n_agree} of {n_dist} pairs agree in expectation, per-sample rates equal (Pearson r = {r:.3f}, "
                     f"mean rates {data['mean_cond_rate']:.3f} / {data['mean_res_rate']:.3f}); "
                     + _identity_text(res) + ": with ||v|| = ||u|| the result inequality is ε²/2, a monotone "
                     "function of the condition's ε, so the two agree by construction",
                criterion="reported: identical by construction (issue 27), so it cannot test the lemma",
                data=data))
            continue
        if label.startswith("literal"):
            rows.append(Row(
                claim="literal reading: v = u + a zero-mean perturbation, lengths not equalised",
                source=f"{SRC}, Fig 2.1 (protocol text)", paper="1000 of 1000 agree",
                ours=f"{n_agree} of {n_dist} agree in expectation (per-sample result agreement "
                     f"{data['mean_res_rate']:.2f}): E[||u||² − <u,v>] = −E[<u,p>] = 0, so the result side has no "
                     "direction in expectation under this reading; " + _identity_text(res),
                data=data))
            continue
        if label.startswith("run 2, other"):
            rows.append(Row(
                claim=f"{label}: agreement in expectation and correlation of the per-sample rates",
                source=f"{SRC}, Fig 2.2 (protocol text)", paper="1000 of 1000; strong correlation",
                ours=f"{n_agree} of {n_dist} agree; Pearson r = {r:.3f}; " + _identity_text(res)
                     + " (the judged reading fixes one factor per distribution; this one is reported so that the "
                       "verdict does not rest on the reading)",
                data=data))
            continue
        rows.append(Row(
            claim=f"{label}: condition and result inequalities agree in expectation for every distribution pair",
            source=f"{SRC}, Lemma 2.2, {fig}", paper="1000 of 1000",
            ours=f"{n_agree} of {n_dist} (min result gap {res['res_gap'].min():.2e}, mean condition gap "
                 f"{res['cond_gap'].mean():.3f}); why: " + _identity_text(res) + f", so the length term "
                 f"(1 − c²)/2 is {data['half_len'] / data['half_eps2']:.1f}x the ε²/2 term the result inequality "
                 "would have to follow",
            criterion="number of pairs whose expected result inequality points the condition's way = n_dist",
            tolerance="none: the source reports every pair",
            holds=n_agree == n_dist, data=data))
        rows.append(Row(
            claim=f"{label}: per-sample agreement rates of the two inequalities are strongly correlated",
            source=f"{SRC}, {fig}", paper="\"extremely strong correlation\" (no value printed)",
            ours=f"Pearson r = {r:.3f} over {n_dist} pairs (mean rates: condition {data['mean_cond_rate']:.3f}, "
                 f"result {data['mean_res_rate']:.3f})",
            criterion="Pearson r between the per-pair sample agreement rates of (2.2) and (2.3) ≥ r_min",
            tolerance=f"r_min = {LEMMA_R_MIN}: 'extremely strong', fixed before the run",
            holds=bool(r >= LEMMA_R_MIN), data=data))
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.5))
    for ax, (label, res) in zip(axes, runs.items()):
        ax.scatter(res["cond_rate"], res["res_rate"], s=4)
        ax.set_xlabel("condition (2.2) sample agreement")
        ax.set_ylabel("result (2.3) sample agreement")
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "lemma22.png", dpi=110)
    plt.close(fig)
    return rows


# ---------------------------------------------------------------------------------------------------- bn="train"
GRAD_TOL = 1e-10


def _train_mode_grad(model, x, y):
    """Independent reference: the gradient a train-mode SGD step uses (autograd on a deep copy in train mode)."""
    m = copy.deepcopy(model).train()
    params = [p for p in m.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(LOSS(m(x), y), params)])


@register(
    "conditioning-bn-train",
    claim="Step-consistency κ_W of a BatchNorm network is a property of the train-mode batch gradient SGD follows "
          "(statistics that depend on the weights); the directional κ≈_W lower-bounds the exact κ_W there. "
          "Frozen-batch and running statistics measure other functions (reported ratios).",
    source="seed 004, eq. 2.24 (κ≈_W of the batch gradient h̄_W), Def 2.4 (exact κ_W = ||H|| ||w|| / ||h̄_W||), "
           "Thm 1.6",
    protocol="A BN MLP (6 linear layers, width 32) and the zoo's ResNet-10 (width 4) in float64 on digits, after 40 "
             "(quick) / 150 (full) SGD + momentum steps (full: also at init); one batch of 64. The train-mode batch "
             "gradient is compared with autograd on a train-mode copy (1e-10), the model's buffers must be "
             "untouched; the directional kappa_W (jvp along the batch gradient) must not exceed the exact kappa_W "
             "(power iteration on Hessian-vector products, 100 / 300 iterations). Precondition: the frozen-"
             "statistics gradient differs from the train-mode one by >= 1e-7, so the first check can tell them "
             "apart.",
)
def run_bn_train(quick: bool, out_dir: Path) -> list[Row]:
    from ..probes import conditioning as C
    from ..probes.reference import hessian_condition
    from ..zoo import mlp, resnet

    Xf, Yf = _digits("flat")
    Xi, _ = _digits("image")
    b = 64
    iters = 100 if quick else 300
    rows: list[Row] = []
    models = {"BN MLP (6 linear, width 32, ReLU)": (lambda: mlp(64, 10, depth=6, width=32, act="relu", norm="batch",
                                                                  seed=0).double(), Xf),
              "zoo ResNet-10 (width 4, BN)": (lambda: resnet(1, 10, depth=10, width=4).double(), Xi)}
    points = ("init", "trained") if not quick else ("trained",)
    table = []
    for name, (build, X) in models.items():
        torch.manual_seed(0)
        model = build()
        for point in points:
            if point == "trained":
                _pretrain(model, X, Yf, steps=40 if quick else 150, lr=0.05)
            model.train()
            x, y = X[:b], Yf[:b]
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with C.train_mode.TrainModeBatch(model, LOSS, x, y) as e:
                g_train = e.batch_grad()
            g_ref = _train_mode_grad(model, x, y)
            from ..probes.per_sample import Engine

            with Engine(model, LOSS, x, y, bn="batch") as e:
                g_frozen = e.batch_grad()
            rel = float((g_train - g_ref).norm() / g_ref.norm())
            rel_frozen = float((g_frozen - g_ref).norm() / g_ref.norm())
            vals = {}
            for bn in ("train", "batch", "eval"):
                fd = C.step_consistency(model, LOSS, (x, y), bn=bn).value
                jv = C.step_consistency(model, LOSS, (x, y), bn=bn, mode="jvp", norm="2").value
                ex = hessian_condition(model, LOSS, (x, y), bn=bn, iters=iters, tol=1e-9)
                vals[bn] = {"fd": fd, "jvp": jv, "exact": ex}
            pure = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            rows.append(Row(
                claim=f"{name}, {point}: bn='train' gives the gradient a train-mode SGD step uses",
                source=f"{SRC}, eq. 2.24 (h̄_W is the training batch gradient)",
                paper="the batch gradient of training",
                ours=f"||g_train − g_SGD|| / ||g_SGD|| = {rel:.1e} (frozen statistics: {rel_frozen:.2e}); buffers "
                     f"unchanged: {pure}",
                criterion="relative difference to autograd on a train-mode copy < tol, and the model's buffers "
                          "bit-identical afterwards",
                tolerance=f"{GRAD_TOL:g}: float64 rounding (the frozen-statistics gradient is off by "
                          f"{rel_frozen:.1e})",
                holds=bool(rel < GRAD_TOL and pure), data={"rel": rel, "rel_frozen": rel_frozen},
                preconditions=[at_least("power", rel_frozen, 1e3 * GRAD_TOL, "relative difference of the "
                                        "frozen-statistics gradient (the check must tell train mode from it)",
                                        fmt=".1e")]))
            t = vals["train"]
            rows.append(Row(
                claim=f"{name}, {point}: the directional κ≈_W (exact derivative along ḡ) ≤ exact κ_W, train mode",
                source=f"{SRC}, Def 2.4, Thm 1.6", paper="κ≈ ≤ κ",
                ours=f"κ≈_W(jvp) = {t['jvp']:.4g}, exact κ_W = {t['exact']:.4g} (power iteration, {iters} HVPs max)",
                criterion="κ≈_W(jvp, direction ±ḡ) ≤ κ_W (1 + tol)",
                tolerance="1e-6: the power iteration's stopping rule (1e-9) and float64 rounding",
                holds=bool(t["jvp"] <= t["exact"] * (1 + 1e-6)), data=vals))
            ratio = {k: vals[k]["fd"] / t["fd"] for k in ("batch", "eval")}
            ratio_ex = {k: vals[k]["exact"] / t["exact"] for k in ("batch", "eval")}
            rows.append(Row(
                claim=f"{name}, {point}: κ_W under frozen-batch and running statistics relative to train mode",
                source=f"{SRC}, eq. 2.24 / Def 2.4", paper="",
                ours=f"κ≈_W (Def 2.7, η=1e-3): train {t['fd']:.4g}, batch ×{ratio['batch']:.2f}, eval "
                     f"×{ratio['eval']:.2f}; exact κ_W: train {t['exact']:.4g}, batch ×{ratio_ex['batch']:.2f}, eval "
                     f"×{ratio_ex['eval']:.2f}",
                data={"values": vals, "ratio_fd": ratio, "ratio_exact": ratio_ex}))
            table.append((f"{name.split(' (')[0]} {point}", vals))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = np.arange(len(table))
    for j, bn in enumerate(("train", "batch", "eval")):
        ax.bar(xs + (j - 1) * 0.27, [v[bn]["exact"] for _, v in table], width=0.27, label=f"bn={bn}")
    ax.set_xticks(xs, [n for n, _ in table], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("exact κ_W")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "bn_modes.png", dpi=110)
    plt.close(fig)
    return rows
