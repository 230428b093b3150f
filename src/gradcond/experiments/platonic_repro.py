"""Reproductions of seed 002 ch. 7 (closed-form fitting with Platonic projections; notes 002 §5).

``platonic-spirals``, ``platonic-sine``, ``platonic-checkerboard``, ``platonic-digits``. Every row states its
criterion in ``source``; the fits run on ``device`` (``gradcond repro run --device``), the backprop baseline on the
CPU; the criteria were fixed before the runs and are not relaxed where a row does not hold.
Data decisions: the two spirals are our ``spirals`` loader without label noise (``noise=0``: the classic problem is
noise-free; the default noise of 0.05 makes the arms overlap near the centre), 5,000 training points as in the
source; the sine is ``y = sin(x)`` over two periods rescaled to ``x`` in (-1, 1), 5,000 points; the checkerboard is
our 8 x 8 board; MNIST is replaced by the 8 x 8 ``digits`` (1,437 training images) with widths scaled by 64/784,
standardised per pixel (see ``platonic-digits``). Preconditions and statistics come from
:mod:`gradcond.experiments.judging`.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..closedform import FitDiverged, SingularSystemError, fit_platonic
from ..data import load_dataset
from . import judging as J
from .registry import Row, register


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def spirals_data(dtype=torch.float64, n_train: int = 5000):
    """(X, Y (+-1 column), labels) of the noise-free two spirals with ``n_train`` training points."""
    X, y = load_dataset("spirals", n=int(round(n_train / 0.8)), noise=0.0, dtype=dtype).train.tensors
    return X, (2 * y - 1).to(dtype).unsqueeze(1), y


def sign_accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return float(((out[:, 0] > 0).long() == y).double().mean())


def spirals_fit(X, Y, y, *, seed: int, dtype=torch.float64, **kw) -> tuple[float | None, float]:
    """(train accuracy or None when the system was singular, seconds) of one 2-32-32-32-32-1 tanh fit."""
    t0 = time.perf_counter()
    try:
        model = fit_platonic(X.to(dtype), Y.to(dtype), [32] * 4, act="tanh", dtype=dtype,
                             generator=torch.Generator().manual_seed(seed), **kw)
    except SingularSystemError:
        return None, time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        return sign_accuracy(model(X.to(dtype)), y), seconds


def backprop_spirals(X, y, *, epochs: int = 75, seed: int = 0, target_acc: float | None = None):
    """The source's baseline: 2-32-32-32-32-1 tanh, SGD lr 0.01, momentum 0.9, batch 32, lr / 10 after 56 of 75
    epochs (the drop is placed at the same fraction for fewer epochs), binary cross-entropy, float32.

    Returns (final train accuracy, seconds, seconds until ``target_acc`` was first reached after an epoch or None).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    X, t = X.float(), y.float().unsqueeze(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    drop = max(1, round(epochs * 56 / 75))
    loss_fn = nn.BCEWithLogitsLoss()
    t0, reached = time.perf_counter(), None
    for epoch in range(epochs):
        if epoch == drop:
            for group in opt.param_groups:
                group["lr"] = 0.001
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            loss_fn(model(X[idx]), t[idx]).backward()
            opt.step()
        if target_acc is not None and reached is None:
            with torch.no_grad():
                if sign_accuracy(model(X), y) >= target_acc:
                    reached = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        return sign_accuracy(model(X), y), seconds, reached


# Table 7.1, CPU columns: (alpha, beta) -> solver -> (fp32 default tol, fp32 tol 1e-5, fp64) as (mean, std) or None
TABLE_7_1 = {
    (0.1, 10.0): {"pinv": ((80.25, 8.11), (87.16, 2.51), (99.17, 1.63)),
                  "lstsq": ((61.92, 8.75), (87.75, 11.33), (98.50, 2.57)),
                  "solve": (None, None, (94.87, 2.43))},
    (1.0, 2.0): {"pinv": ((97.46, 1.80), (99.83, 0.36), (99.93, 0.19)),
                 "lstsq": ((95.95, 3.04), (95.70, 10.28), (99.93, 0.17)),
                 "solve": (None, None, (99.95, 0.15))},
}


def _cell(accs: list[float | None]) -> str:
    ok = [a for a in accs if a is not None]
    failed = len(accs) - len(ok)
    if not ok:
        return f"singular system in {failed}/{len(accs)} runs (Failed)"
    mean = statistics.mean(ok) * 100
    std = statistics.pstdev(ok) * 100
    return f"{mean:.2f} ± {std:.2f}" + (f" ({failed}/{len(accs)} singular)" if failed else "")


def _src(cell) -> str:
    return "Failed" if cell is None else f"{cell[0]:.2f} ± {cell[1]:.2f}"


#: The L2 penalty of Table 7.1's ``solve`` rows. The source: "In 32 bits, the CPU implementation of solve fails ...
#: we could fix the problem by increasing the amount of L2 regularization ... We used a low number for the L2
#: penalty in order to illustrate the issue of stability" (§7.6.2); it does not give the number. 1e-6 (fixed
#: before the run) is judged; 1e-8 and 1e-4, the ends of the range an independent check found giving the same
#: pattern, are reported beside it.
SOLVE_RIDGE = 1e-6
SOLVE_RIDGE_OTHER = (1e-8, 1e-4)

SPIRALS_PROTOCOL = (
    "Data: 5,000 noise-free two-spiral points (±1 targets). Model: 2-32-32-32-32-1 tanh fitted in closed form, "
    "N_tries = 1, as §7.6.2. Row 1: float64 pinv, alpha 0.1, beta 10, 5 seeded fits. Table 7.1: 5 runs per cell "
    "(full: 50; the source: 1,000) for pinv, lstsq (each fp32 default tol, fp32 tol 1e-5, fp64) and solve (ridge "
    "normal equations with the 'low L2 penalty' of §7.6.2: 1e-6 judged, 1e-8 and 1e-4 reported); criteria from the "
    "source's mean - 2 std. Backprop baseline: the source's SGD schedule (75 epochs, full mode only; quick trains 8 "
    "epochs and is reported). Timings are reported, never judged.")


@register(
    "platonic-spirals",
    claim="A 2-32-32-32-32-1 tanh MLP fitted in closed form (Platonic projections, no gradients) classifies the "
          "two spirals: 99.99% in float64 with one try; float32 is fragile (Table 7.1); backprop needs 75 epochs.",
    source="seed 002 §7.6, Table 7.1, Fig. 7.9",
    protocol=SPIRALS_PROTOCOL,
)
def run_spirals(quick: bool, out_dir: Path, device: torch.device | None = None) -> list[Row]:
    X, Y, y = (t.to(device or "cpu") for t in spirals_data())
    rows = []
    accs, times = [], []
    for seed in range(5):
        acc, sec = spirals_fit(X, Y, y, seed=seed, alpha=0.1, beta=10.0)
        accs.append(acc)
        times.append(sec)
    med = statistics.median(accs)
    rows.append(Row(
        claim="two spirals, 5,000 points, float64, N_tries = 1, alpha 0.1, beta 10, pinv: train accuracy",
        source="seed 002 §7.6.2 (text: switching to double precision gives 99.99 %, N_tries = 1)",
        paper="99.99 % in 0.1 s (one run)",
        ours=f"median {_pct(med)} (min {_pct(min(accs))}), median fit time {statistics.median(times):.3f} s",
        criterion="median train accuracy of 5 seeded fits >= 99 %",
        tolerance="1 pp below 100 %: one run in the source gives no spread; 99 % separates a fit from a near-miss "
                  "(backprop stuck at chance is ~50 %); fixed before the run",
        holds=med >= 0.99, data={"accuracies": accs, "seconds": times}))
    runs = 5 if quick else 50
    for (alpha, beta), solvers in TABLE_7_1.items():
        for solver, src in solvers.items():
            name = "ridge" if solver == "solve" else solver
            cols = []
            for dtype, atol in ((torch.float32, None), (torch.float32, 1e-5), (torch.float64, None)):
                if solver == "solve" and atol is not None:  # no tolerance for a linear solve: same as default
                    cols.append(cols[-1])
                    continue
                kw = dict(alpha=alpha, beta=beta, solver=name, dtype=dtype)
                if atol is not None:
                    kw["atol"] = atol
                if solver == "solve":
                    kw["ridge"] = SOLVE_RIDGE
                cols.append([spirals_fit(X, Y, y, seed=1000 + r, **kw)[0] for r in range(runs)])
            f64 = [a for a in cols[2] if a is not None]
            f64_ok = len(f64) == runs and statistics.mean(f64) * 100 >= src[2][0] - 2 * src[2][1]
            if solver == "solve":
                holds = all(a is None for a in cols[0]) and f64_ok
                crit = ("float32 is a singular-system outcome in every run; float64 has no singular run and mean >= "
                        "source mean - 2 std")
            elif solver == "pinv":
                m32 = [statistics.mean([a for a in c if a is not None] or [0.0]) for c in cols[:2]]
                holds = f64_ok and m32[1] >= m32[0]
                crit = ("float64 has no singular run and mean >= source mean - 2 std, and tol 1e-5 does not lower "
                        "the float32 mean")
            else:
                holds = f64_ok
                crit = "float64 has no singular run and mean >= source mean - 2 std"
            if solver == "solve":
                other = {r: [[spirals_fit(X, Y, y, seed=1000 + i, alpha=alpha, beta=beta, solver="ridge", ridge=r,
                                          dtype=dt)[0] for i in range(runs)] for dt in (torch.float32, torch.float64)]
                         for r in SOLVE_RIDGE_OTHER}
                extra = Row(
                    claim=f"Table 7.1 CPU, alpha {alpha:g}, beta {beta:g}, solve at the other low L2 penalties: "
                          f"accuracy % over {runs} runs [fp32 | fp64]",
                    source="seed 002 §7.6.2 ('a low number for the L2 penalty', value not given)",
                    paper=f"{_src(src[0])} | {_src(src[2])}",
                    criterion=f"reported, not judged: the judged reading is ridge {SOLVE_RIDGE:g} (fixed before the "
                              "run); these are the other plausible readings",
                    ours="; ".join(f"ridge {r:g}: {_cell(c[0])} | {_cell(c[1])}" for r, c in other.items()),
                    holds=None, data={"ridge": {str(r): {"fp32": c[0], "fp64": c[1]} for r, c in other.items()}})
            rows.append(Row(
                claim=f"Table 7.1 CPU, alpha {alpha:g}, beta {beta:g}, {solver}"
                      + (f" (ridge {SOLVE_RIDGE:g})" if solver == "solve" else "")
                      + f": accuracy % over {runs} runs [fp32 default tol | fp32 tol 1e-5 | fp64]",
                source="seed 002 §7.6.2, Table 7.1 (CPU columns)",
                paper=f"{_src(src[0])} | {_src(src[1])} | {_src(src[2])} over 1,000 runs",
                criterion=crit,
                tolerance="2 standard deviations of the source's 1,000-run spread (our run count is smaller, so the "
                          "source's spread is the reference); 'no singular run' is exact",
                ours=" | ".join(_cell(c) for c in cols), holds=holds,
                data={"runs": runs, "accuracies": {"fp32": cols[0], "fp32_tol1e-5": cols[1], "fp64": cols[2]}}))
            if solver == "solve":
                rows.append(extra)
    # backprop baseline in the same run
    epochs = 8 if quick else 75
    bp_acc, bp_sec, bp_reach = backprop_spirals(X.cpu(), y.cpu(), epochs=epochs, target_acc=0.99)  # CPU, float32
    rows.append(Row(
        claim=f"backprop baseline 2-32-32-32-32-1 tanh, SGD, {epochs} epochs: train accuracy",
        source="seed 002 §7.6.1, Fig. 7.9",
        paper="99.17 % after 75 epochs (52 s on an RTX 4080)",
        criterion="train accuracy >= 98 % after the source's 75 epochs (quick mode's 8 epochs cannot test it)",
        tolerance="~1.2 pp below the source's single run: SGD run-to-run spread on this task, no spread given",
        ours=f"{_pct(bp_acc)} in {bp_sec:.1f} s",
        holds=bp_acc >= 0.98, data={"accuracy": bp_acc, "seconds": bp_sec},
        preconditions=[J.setting_matches(epochs >= 75, "the source's 75 epochs of SGD", f"{epochs} epochs", epochs)]))
    fit_med = statistics.median(times)
    reach = f"{bp_reach:.1f} s to first reach 99%" if bp_reach is not None else "99% not reached"
    rows.append(Row(
        claim="time: closed-form fit vs backprop on the same data, same run",
        source="seed 002 §7.6.1, Fig. 7.9 (backprop) and §7.6.2 (fit)",
        paper="0.1 s (fp64 fit) vs 52 s (backprop)",
        criterion="reported, not judged (timings depend on the hardware)",
        ours=f"fit {fit_med:.3f} s vs backprop {bp_sec:.1f} s ({reach}); ratio {fit_med / bp_sec:.4f}x",
        holds=None, data={"fit_seconds": fit_med, "backprop_seconds": bp_sec, "backprop_to_99": bp_reach}))
    return rows


def sine_data(dtype=torch.float64, n_train: int = 5000):
    """y = sin(x) over two periods with x rescaled to (-1, 1) (sec. 7.5), ``n_train`` points."""
    X, Y = load_dataset("sine", n=int(round(n_train / 0.8)), dtype=dtype).train.tensors
    return X / (2 * math.pi) - 1, Y


#: Depth of the deep narrow sine fits: the source's 10,000 layers (Figs. 7.5-7.6) in full mode; quick mode 100
#: layers (the depth of the source's own alpha/beta study, §7.5.2).
SINE_DEPTH = {"quick": 100, "full": 10_000}
SEEDS_DEEP = (0, 1, 2, 3, 4)

SINE_PROTOCOL = (
    "Data: y = sin(x) over two periods, x rescaled to (-1, 1), 5,000 points (§7.5). MSE rows: 1-16-16-1 CELU, "
    "alpha = beta = 1 (Fig. 7.3), float64, 5 seeds (full: 20), N_tries 1 and 5. Deep rows: width 8, CELU, alpha "
    "0.1, beta 10 (the source does not give its deep-run values), 10,000 hidden layers as Figs. 7.5-7.6 (quick: "
    "100), 5 seeds; per seed the lowest LSD over the layers with 1 and with 5 tries, judged by a one-sided t test "
    "over the seeds of log(LSD_1 / LSD_5) > 0 at 5 %. Criteria fixed before the run.")


def deep_tries_row(low1: list[float], low5: list[float], depth: int, quick: bool = False,
                   notes: list[str] = ()) -> Row:
    """Five tries per layer reach a lower error than one: one-sided t test over seeds of
    log(lowest LSD with 1 try / with 5 tries) > 0 at 5 %, with >= 5 seeds."""
    x = [math.log(a / b) if a > 0 and b > 0 else float("nan") for a, b in zip(low1, low5)]
    t = J.one_sided_t(x, 0.0)
    return Row(
        claim=f"sine, {depth} hidden layers of width 8, CELU, alpha 0.1, beta 10: lowest LSD over the layers, "
              "1 vs 5 tries",
        source="seed 002 §7.5.1, Figs. 7.5-7.6 (10,000 layers)",
        paper="5 tries reach a lower error than 1 (Fig. 7.6)",
        criterion="one-sided t test over seeds: log(lowest LSD with 1 try / with 5 tries) > 0 at 5 %",
        tolerance="no margin (an ordering claim); significance over >= 5 seeds, fixed before the run",
        ours=f"median lowest LSD: 1 try {statistics.median(low1):.2e}, 5 tries {statistics.median(low5):.2e}; "
             f"log ratio {t.describe()}" + (f" (quick mode: {depth} layers)" if quick else "")
             + (f" ({'; '.join(notes)})" if notes else ""),
        holds=t.significant, preconditions=[J.enough_samples(t.n)],
        data={"lowest_lsd": {"1": list(low1), "5": list(low5)}, "depth": depth, "log_ratio": x})


@register(
    "platonic-sine",
    claim="A 1-16-16-1 CELU MLP fitted in closed form matches a sinusoid (MSE 2e-5); in very deep narrow fits, "
          "five tries per layer reach a lower error than one.",
    source="seed 002, sec. 7.5, Figs. 7.3-7.6",
    protocol=SINE_PROTOCOL,
)
def run_sine(quick: bool, out_dir: Path, device: torch.device | None = None) -> list[Row]:
    X, Y = (t.to(device or "cpu") for t in sine_data())
    rows = []
    seeds = 5 if quick else 20
    for tries in (1, 5):
        mses = []
        for s in range(seeds):
            _, rep = fit_platonic(X, Y, [16, 16], act="celu", alpha=1.0, beta=1.0, n_tries=tries,
                                  generator=torch.Generator().manual_seed(s), return_report=True)
            mses.append(rep.mse)
        med = statistics.median(mses)
        rows.append(Row(
            claim=f"sine, 1-16-16-1 CELU, alpha = beta = 1 (Fig. 7.3), float64, N_tries = {tries}: train MSE",
            source="seed 002 §7.5, Fig. 7.3",
            paper="MSE 2e-5 (one fit)",
            criterion="median train MSE over the seeds <= 1e-4",
            tolerance="5x the source's single fit: one fit gives no spread, a sinusoid fitted with MSE 1e-4 is still "
                      "visually exact; fixed before the run",
            ours=f"median {med:.2e} over {seeds} seeds (best {min(mses):.2e})", holds=med <= 1e-4,
            data={"mse": mses, "n_tries": tries}))
    depth = SINE_DEPTH["quick" if quick else "full"]
    curves, notes, lows = {}, [], {1: [], 5: []}
    for seed in SEEDS_DEEP:
        for tries in (1, 5):
            try:
                # alpha 0.1, beta 10 (our defaults; the source does not give its deep-run values): with alpha = beta =
                # 1 the representation collapses to LSD ~0.5 (no information about y) within ~50 layers
                _, rep = fit_platonic(X, Y, [8] * depth, act="celu", alpha=0.1, beta=10.0, n_tries=tries,
                                      generator=torch.Generator().manual_seed(seed), return_report=True)
            except FitDiverged as exc:  # the activations overflowed: the layers fitted before still count
                rep = exc.report
                notes.append(f"seed {seed}, {tries} tr{'y' if tries == 1 else 'ies'}: non-finite after "
                             f"{len(rep.lsd)} layers")
            lows[tries].append(min(rep.lsd) if rep.lsd else float("nan"))
            if seed == SEEDS_DEEP[0]:
                curves[tries] = rep.lsd
    rows.append(deep_tries_row(lows[1], lows[5], depth, quick, notes))
    from ..report.figures import object_pyplot as _plt  # Agg canvases: the process-wide backend is left alone

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for tries, c in curves.items():
        ax.semilogy(range(1, len(c) + 1), c, label=f"N_tries = {tries} (seed {SEEDS_DEEP[0]})")
    ax.set_xlabel("hidden layer")
    ax.set_ylabel("LSD (train MSE of the layer's read-out)")
    ax.set_title(f"Sine, width 8, {depth} layers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "sine_deep_lsd.png", dpi=110)
    plt.close(fig)
    return rows


@register(
    "platonic-checkerboard",
    claim="A 4-hidden-layer ReLU MLP of width 2,500 fitted in closed form classifies the checkerboard "
          "(99.88-100%).",
    source="seed 002, sec. 7.7, Fig. 7.10",
    protocol="Data: our 8 x 8 checkerboard, 5,000 points (quick: 2,000). Model: 4 hidden ReLU layers of width 2,500 "
             "(quick: 1,250, the source's width/points ratio), fitted in closed form, float64, pinv, N_tries = 1, "
             "at the source's two (alpha, beta) settings, (0.06, 25) and (0.08, 200) (§7.7); one seeded fit each, as "
             "the source. Criterion fixed before the run: train accuracy >= 99.8 % (0.08 pp below the source's "
             "lower value).",
)
def run_checkerboard(quick: bool, out_dir: Path, device: torch.device | None = None) -> list[Row]:
    # quick: the source's width/points ratio (1/2) on 2,000 points. Noted for the record: a smaller 1,500-point,
    # 750-wide variant reached 99.67% with alpha 0.08, beta 200 (below the criterion); the full run is the claim.
    n_train, width = (2000, 1250) if quick else (5000, 2500)
    X, y = load_dataset("checkerboard", n=int(round(n_train / 0.8)), dtype=torch.float64).train.tensors
    X, y = X.to(device or "cpu"), y.to(device or "cpu")
    Y = (2 * y - 1).double().unsqueeze(1)
    rows = []
    for alpha, beta in ((0.06, 25.0), (0.08, 200.0)):
        t0 = time.perf_counter()
        model, rep = fit_platonic(X, Y, [width] * 4, act="relu", alpha=alpha, beta=beta,
                                  generator=torch.Generator().manual_seed(0), return_report=True)
        sec = time.perf_counter() - t0
        acc = sign_accuracy(rep.predictions, y)
        rows.append(Row(
            claim=f"checkerboard, {n_train} points, 4 x {width} ReLU, float64, N_tries = 1, alpha {alpha:g}, "
                  f"beta {beta:g}: train accuracy" + (" (quick: width/points ratio of the source, fewer points)"
                                                      if quick else ""),
            source="seed 002 §7.7, Fig. 7.10",
            paper="99.88-100 % (4 x 2500, 5,000 points)",
            criterion="train accuracy >= 99.8 %",
            tolerance="0.08 pp below the source's lower value (about 4 of 5,000 points), fixed before the run",
            ours=f"{_pct(acc)}, MSE {rep.mse:.2e}, {sec:.1f} s", holds=acc >= 0.998,
            data={"accuracy": acc, "mse": rep.mse, "lsd": rep.lsd, "seconds": sec}))
    return rows


DIGITS_WIDTHS = (8, 16, 32, 64, 128)  # the source's 98 ... 1568 for 784 inputs, scaled by 64/784
DIGITS_DEEP = ([32, 10], [32, 20], [48, 29], [64, 32], [64, 48, 48], [128, 98, 82], [160, 128], [256, 163, 122],
               [530, 367, 245])
# Table 7.3's nine architectures scaled by 64/784, with no layer narrower than the 10 classes (392-50 would become
# 32-4, a bottleneck the source never tested); Platonic PCA layers need width <= previous width + 10.


def _digits_acc(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


def standardise(X: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-feature standardisation with ``X``'s mean and standard deviation (a constant feature keeps scale 1),
    applied to ``X`` and each of ``others`` (e.g. the test split)."""
    mu, sd = X.mean(0, keepdim=True), X.std(0, keepdim=True)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return tuple((t - mu) / sd for t in (X, *others))


#: A unit of a ReLU layer is *switching* when it is positive on between 1 % and 99 % of the samples: a unit
#: positive on (nearly) every sample acts as the identity, one (nearly) never positive is dead.
SWITCH_BAND = (0.01, 0.99)
#: The ReLU layer is neither dead nor always on: at least half of its units switch (fixed before the run).
MIN_SWITCHING = 0.5


@torch.no_grad()
def relu_switching(model: nn.Sequential, X: torch.Tensor) -> list[float]:
    """Per ``nn.ReLU`` of ``model`` (an ``nn.Sequential``): the share of its units that are switching
    (:data:`SWITCH_BAND`) on the samples ``X``. Cost: one forward pass."""
    out, h = [], X
    for m in model:
        if isinstance(m, nn.ReLU):
            on = (h > 0).double().mean(0)
            out.append(float(((on >= SWITCH_BAND[0]) & (on <= SWITCH_BAND[1])).double().mean()))
        h = m(h)
    return out


def relu_precondition(shares: dict[str, list[float]]) -> J.Precondition:
    """**The ReLU layer is neither dead nor always on**: in every fitted network named in ``shares`` (name -> per
    ReLU layer share of switching units, :func:`relu_switching`) at least :data:`MIN_SWITCHING` of each ReLU
    layer's units switch. With inputs in [0, 1], a Sorted-PCA layer (data samples as weights, bias 0) has only
    non-negative pre-activations: every unit is always on and the network is linear -- not the setting of the
    claim."""
    worst = min(((v, k) for k, vs in shares.items() for v in vs), default=(float("nan"), "no ReLU layer"))
    return J.Precondition(
        "the ReLU layer is neither dead nor always on",
        f"every ReLU layer of every fitted network has >= {MIN_SWITCHING:.0%} of its units positive on "
        f"{SWITCH_BAND[0]:.0%}-{SWITCH_BAND[1]:.0%} of the training images",
        f"lowest share of switching units {_pct(worst[0]) if math.isfinite(worst[0]) else worst[0]} ({worst[1]})",
        bool(math.isfinite(worst[0]) and worst[0] >= MIN_SWITCHING), worst[0])


DIGITS_PROTOCOL = (
    "Data: sklearn digits (1,437 train / 360 test 8x8 images) instead of MNIST, each pixel standardised with the "
    "training split's mean and standard deviation: with inputs in [0, 1] every Sorted-PCA pre-activation (a data "
    "sample as weight vector, bias 0) is >= 0 and the ReLU is the identity, while the thesis's numbers (Sorted PCA "
    "at 95.9 %, well above a linear read-out) need an active ReLU. Table 7.2: one hidden ReLU layer of width 8-128 "
    "(the source's 98-1568 scaled by 64/784); ridge 50,000 scaled by the sample count; alpha 1; beta 1e4 for the "
    "deterministic methods and 10 for the random ones (§7.9.2); random methods averaged over 3 trials (full: 20; "
    "the source: 100). Table 7.3: Sorted PCA + weighted Platonic PCA (lambda_EMA 0.2, the text's value), beta 1e6, "
    "ridge 0.1, nine architectures scaled by 64/784 (quick: every second). Precondition of every row: each fitted "
    "network's ReLU layers have >= 50 % switching units (positive on 1-99 % of the training images). Criteria as "
    "the source states its orderings (strict), fixed before the run.")


@register(
    "platonic-digits",
    claim="On handwritten digits, Platonic projections beat random first-layer weights (extreme learning machine) "
          "and Sorted PCA is the best single-hidden-layer method for all but the narrowest width (Table 7.2); "
          "deeper deterministic nets improve with size (Table 7.3).",
    source="seed 002, sec. 7.9, Tables 7.2-7.3 (MNIST; here 8 x 8 digits)",
    protocol=DIGITS_PROTOCOL,
)
def run_digits(quick: bool, out_dir: Path, device: torch.device | None = None, standardised: bool = True
               ) -> list[Row]:
    """``standardised=False`` runs on the raw [0, 1] pixels (the control of the ReLU precondition)."""
    b = load_dataset("digits", dtype=torch.float64)
    X, y, Xt, yt = (t.to(device or "cpu") for t in (*b.train.tensors, *b.test.tensors))
    if standardised:
        X, Xt = standardise(X, Xt)
    # Table 7.2 uses ridge 50,000 for 60,000 MNIST images; the penalty is scaled with the number of samples
    ridge = 50_000 * len(X) / 60_000
    trials = 3 if quick else 20
    methods = {"random W (ELM)": dict(first_layer="random_w", beta=10.0),
               "random P": dict(beta=10.0),
               "Platonic PCA": dict(projection="platonic_pca", beta=1e4),
               "Sorted PCA": dict(projection="sorted_pca", beta=1e4)}
    rows = []
    for wi, width in enumerate(DIGITS_WIDTHS):
        acc, switching = {}, {}
        for name, kw in methods.items():
            n = trials if name.startswith("random") else 1
            vals = []
            for s in range(n):
                try:
                    model = fit_platonic(X, y, [width], act="relu", alpha=1.0, solver="ridge", ridge=ridge,
                                         generator=torch.Generator().manual_seed(s), **kw)
                except ValueError:  # Platonic PCA has at most 64 + 10 directions (the source's N/A)
                    vals = []
                    break
                vals.append(_digits_acc(model, Xt, yt))
                switching[f"{name}, trial {s}"] = relu_switching(model, X)
            acc[name] = statistics.mean(vals) if vals else None
        relu = relu_precondition(switching)
        text = ", ".join(f"{k} {'N/A' if v is None else _pct(v)}" for k, v in acc.items())
        elm = acc["random W (ELM)"]
        beat = all(v > elm for k, v in acc.items() if k != "random W (ELM)" and v is not None)
        rows.append(Row(
            claim=f"digits, one hidden layer of width {width} (ReLU, ridge {ridge:.0f}): test accuracy, platonic "
                  "methods vs random W",
            source="seed 002 §7.9.2, Table 7.2",
            paper="all three platonic methods beat random W at every width",
            criterion="each available platonic method's mean test accuracy > random W's (mean over the random trials)",
            tolerance="strict inequality (ordering claim as the source states it)",
            ours=text, holds=beat, preconditions=[relu],
            data={"test_accuracy": acc, "trials_random": trials, "relu_switching": switching}))
        if wi > 0:
            best = max((v, k) for k, v in acc.items() if v is not None)[1]
            rows.append(Row(
                claim=f"digits, width {width}: Sorted PCA has the highest test accuracy",
                source="seed 002 §7.9.2, Table 7.2",
                paper="Sorted PCA is best for all widths but the narrowest",
                criterion="Sorted PCA's test accuracy is the highest of the four methods",
                tolerance="strict ordering (as the source states it)",
                ours=f"best: {best} ({_pct(acc[best])}); Sorted PCA {_pct(acc['Sorted PCA'])}",
                holds=best == "Sorted PCA", preconditions=[relu], data={"test_accuracy": acc}))
    archs = DIGITS_DEEP[::2] if quick else DIGITS_DEEP
    results, switching = [], {}
    for arch in archs:
        t0 = time.perf_counter()
        try:
            model = fit_platonic(X, y, list(arch), act="relu", alpha=1.0, beta=1e6, projection="sorted_pca",
                                 reweight=0.2, solver="ridge", ridge=0.1)
        except SingularSystemError as exc:
            results.append((arch, None, None, None, str(exc)))
            continue
        sec = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters())
        switching["-".join(map(str, arch))] = relu_switching(model, X)
        results.append((arch, params, _digits_acc(model, X, y), _digits_acc(model, Xt, yt), f"{sec:.2f} s"))
    relu = relu_precondition(switching)
    ok = [r for r in results if r[1] is not None]
    text = "; ".join(f"{'-'.join(map(str, a))}: {p} params, train {_pct(tr)}, test {_pct(te)}"
                     for a, p, tr, te, _ in ok)
    if len(ok) < len(results):
        text += f"; {len(results) - len(ok)} singular"
    for split, idx in (("train", 2), ("test", 3)):
        vals = [r[idx] for r in sorted(ok, key=lambda r: r[1])]
        inc = len(ok) == len(results) and all(b > a for a, b in zip(vals, vals[1:]))
        rows.append(Row(
            claim=f"digits, deterministic deeper nets (Sorted PCA + weighted Platonic PCA, lambda_EMA 0.2, beta 1e6, "
                  f"ridge 0.1), {len(archs)} architectures: {split} accuracy vs #params",
            source="seed 002 §7.9.3, Table 7.3",
            paper=f"{split} accuracy increases with #params",
            criterion=f"{split} accuracy strictly increasing in #params over the architectures, none singular",
            tolerance="strict monotonicity (ordering claim)",
            ours=text if split == "train" else ", ".join(_pct(v) for v in vals), holds=inc, preconditions=[relu],
            data={"results": [list(map(str, r)) for r in results], "relu_switching": switching}))
    return rows
