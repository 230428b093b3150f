"""The seed-000 "one teleport at initialisation speeds up training" experiments (Sec. 5.2, Figs. 7-10 and appendix
Figs. 19-24: ``teleport-sgd``, ``teleport-activations``, ``teleport-inits``): training one arm, and the one rule
their verdicts share.

Protocol shared by the three entries (each entry's ``protocol=`` repeats what it changes):

* **arms**: the same initial network and the same data order with and without one inter-landscape teleport (sigma
  0.9) right after initialisation (Sec. 5.2: "The teleported and non-teleported networks were initialized with the
  same randomized operator"); controls: a pseudo-teleport (Sec. 5.2, Fig. 10) in two readings (``pseudo_l1``: the
  authors' reference implementation, per parameter tensor the L1 length of the teleport's step; ``pseudo_l2``: the
  text's sphere of radius ``||W - tau W||`` over all parameters), drawn from the same CoB as the teleport arm;
* **optimiser**: SGD with momentum 0 or 0.9, learning rates from {0.01, 0.001, 0.0001} (Sec. 5.2), weight decay
  0.01 and ``ReduceLROnPlateau(mode="max")`` on the validation accuracy, each epoch -- the authors' configuration
  (reference implementation, ``SGD_vs_teleport.yml``, ``OtherActivations.yml``, ``Teleportation_vs_Initializers.yml``,
  ``SGD_vs_PseudoTeleport.yml``; the paper does not state them) -- ``teleport-inits`` drops the weight decay, which
  keeps its normal-init baselines at chance (its protocol says why); batch 32 instead of 256 (digits has 1438
  training samples: 5 steps per epoch at 256);
* **the source's quantity**: validation-accuracy curves averaged over the learning rates (Figs. 7-10: "Validation
  plots produced over 5 runs over three learning rates"); one number per seed = the mean over epochs and learning
  rates (the area under the LR-averaged curve); validation = the held-out test split (as the authors' code does);
* **the rule** (fixed before the runs): a one-sided paired t test over >= 5 seeds
  (:func:`~gradcond.experiments.judging.one_sided_t`, level 0.05, margin 0: any significant gain) of the per-seed
  gain treated - untreated;
* **preconditions** (fixed before the runs): power (>= 5 seeds, :func:`~gradcond.experiments.judging.enough_samples`);
  the baseline learns (the untreated arm's validation accuracy, mean over seeds, at its best learning rate and
  epoch, >= chance 10 % + 20 pp); the treatment happened (the teleport's median gradient-norm gain on the training
  set at initialisation >= 1.5, :func:`~gradcond.experiments.judging.treatment_gain`).

A diverged run counts as chance accuracy (10 %) from the epoch it diverged on: it has stopped learning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from . import judging as J
from ._teleport_common import _accuracy, _data
from ._training import train_steps
from .registry import Row

F = torch.nn.functional

SIGMA = 0.9
LRS_SOURCE = (0.01, 0.001, 0.0001)
WEIGHT_DECAY = 0.01
BATCH = 32
CHANCE = 0.1
BASELINE_MARGIN = 0.2
SPEEDUP_MARGIN = 0.0
VARIANTS = ("none", "teleport", "pseudo_l1", "pseudo_l2")
VARIANT_LABELS = {"none": "no teleport", "teleport": "teleport", "pseudo_l1": "pseudo-teleport (per-tensor L1)",
                  "pseudo_l2": "pseudo-teleport (global L2)"}

RULE = (f"one-sided paired t test over seeds (same initial network and data order in both arms) of the per-seed "
        f"gain in validation accuracy averaged over epochs and learning rates: mean gain > {SPEEDUP_MARGIN:g} at "
        f"level {J.ALPHA:g}")
TOLERANCE = (f"margin {SPEEDUP_MARGIN:g} (any significant gain), alpha {J.ALPHA:g} one-sided, >= {J.MIN_SEEDS} seeds; "
             "fixed before the run (the former 'gain > 2 SE over 2-3 seeds' rule had a false-positive rate near 15 %)")


@dataclass
class ArmRun:
    """One training run: validation accuracy after each epoch and the mean batch loss of each epoch (inf from a
    divergence on), the arm's gradient-norm
    gain at initialisation ``||grad L(V)|| / ||grad L(W)||`` on the training set (1 without a teleport), its relative
    distance ``||V - W|| / ||W||`` from the untreated initial network, and whether it diverged."""

    val_acc: list[float]
    train_loss: list[float]
    grad_gain: float = 1.0
    rel_dist: float = 0.0
    diverged: bool = False


def _grad_norm(model, X, y) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(F.cross_entropy(model(X), y), params)
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in g)))


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def treat(model, X, variant: str, seed: int, sigma: float = SIGMA):
    """``model`` after ``variant`` ("none": the model itself; "teleport": one inter CoB of range ``sigma``;
    "pseudo_l1" / "pseudo_l2": a pseudo-teleport of the same CoB's length in a random direction). The CoB comes from
    a generator seeded ``1000 + seed``, so the teleport and both pseudo-teleports of one seed share their CoB."""
    if variant == "none":
        return model
    from ..graph import analyze
    from ..teleport import pseudo_teleport, random_cob, teleport

    structure = analyze(model, X[:2])
    gen = torch.Generator().manual_seed(1000 + seed)
    if variant == "teleport":
        return teleport(model, random_cob(structure, sigma, "inter", gen))
    if variant in ("pseudo_l1", "pseudo_l2"):
        return pseudo_teleport(model, structure, sigma, "inter", gen,
                               norm="l1_per_tensor" if variant == "pseudo_l1" else "l2")
    raise ValueError(f"unknown variant {variant!r}; accepted: {', '.join(VARIANTS)}.")


def train_arm(make_model: Callable[[int], torch.nn.Module], seed: int, data: str, variant: str, opt_name: str,
              lr: float, epochs: int, *, form: str = "flat", bs: int = BATCH,
              weight_decay: float = WEIGHT_DECAY) -> ArmRun:
    """Train ``make_model(seed)`` after ``variant`` (:func:`treat`) for ``epochs`` epochs of ``bs``-sample SGD steps
    (``opt_name`` "sgd" or "momentum" (0.9), ``lr``, ``weight_decay``, ``ReduceLROnPlateau(mode="max")`` on the
    validation accuracy) on data set ``data``; the data order depends on ``seed`` only, so all arms of one seed see
    the same batches. Cost: ``epochs * len(X) / bs`` steps plus one evaluation per epoch."""
    X, y, Xt, yt = _data(data, form)
    w0 = make_model(seed)
    model = treat(w0, X, variant, seed)
    gain = _grad_norm(model, X, y) / _grad_norm(w0, X, y) if variant != "none" else 1.0
    fw = _flat(w0)
    dist = float((_flat(model) - fw).norm() / fw.norm()) if variant != "none" else 0.0
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9 if opt_name == "momentum" else 0.0,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")
    spe = len(X) // bs
    accs = []

    def record(_s):
        accs.append(_accuracy(model, Xt, yt))
        sched.step(accs[-1])

    steps = train_steps(model, X, y, opt, epochs * spe, bs, torch.Generator().manual_seed(seed), record=record,
                        every=spe)
    # train_steps stops at a non-finite batch loss (the weights keep their last finite values) and ends the list with
    # NaN: the epochs from the one it diverged in count at chance
    diverged = bool(steps) and not math.isfinite(steps[-1])
    if diverged:
        accs = accs[:(len(steps) - 1) // spe]
    accs = accs + [CHANCE] * (epochs - len(accs))
    losses = [float(np.mean(steps[i * spe:(i + 1) * spe])) if (i + 1) * spe <= len(steps) else math.inf
              for i in range(epochs)]
    losses = [c if math.isfinite(c) else math.inf for c in losses]
    return ArmRun(accs, losses, gain, dist, diverged)


def run_grid(make_model, data: str, variants: Sequence[str], opts: Sequence[str], lrs: Sequence[float],
             seeds: Sequence[int], epochs: int, form: str = "flat", weight_decay: float = WEIGHT_DECAY) -> dict:
    """``{(opt, lr, variant): [ArmRun per seed]}`` over the whole grid."""
    return {(o, lr, v): [train_arm(make_model, s, data, v, o, lr, epochs, form=form, weight_decay=weight_decay)
                         for s in seeds]
            for o in opts for lr in lrs for v in variants}


def lr_area(grid: dict, opt: str, variant: str, lrs: Sequence[float]) -> list[float]:
    """Per seed: the validation accuracy averaged over epochs and learning rates (the area under the LR-averaged
    curve of Figs. 7-10)."""
    n = len(grid[(opt, lrs[0], variant)])
    return [float(np.mean([np.mean(grid[(opt, lr, variant)][j].val_acc) for lr in lrs])) for j in range(n)]


def lr_curve(grid: dict, opt: str, variant: str, lrs: Sequence[float]) -> np.ndarray:
    """The LR-averaged validation-accuracy curve, mean over seeds (what Figs. 7-10 plot)."""
    return np.mean([np.mean([r.val_acc for r in grid[(opt, lr, variant)]], axis=0) for lr in lrs], axis=0)


def best_accuracy(grid: dict, opt: str, variant: str, lrs: Sequence[float]) -> tuple[float, float]:
    """``(best accuracy, its learning rate)``: the highest point over epochs of the seed-mean validation curve, at the
    best of ``lrs`` -- what "the baseline learns" is measured on."""
    best = {lr: float(np.max(np.mean([r.val_acc for r in grid[(opt, lr, variant)]], axis=0))) for lr in lrs}
    lr = max(best, key=best.get)
    return best[lr], lr


def baseline_precondition(grid: dict, opt: str, lrs: Sequence[float], variant: str = "none",
                          label: str = "the untreated arm") -> J.Precondition:
    """**The baseline learns**: :func:`best_accuracy` of ``variant`` (best epoch and learning rate, mean over seeds)
    >= chance 10 % + 20 pp."""
    best, lr = best_accuracy(grid, opt, variant, lrs)
    p = J.baseline_learns(best, CHANCE, BASELINE_MARGIN, what=f"{label}'s best validation accuracy")
    return replace(p, measured=f"{p.measured} (mean over seeds, at lr {lr:g})")


def paired_verdict(treated: Sequence[float], control: Sequence[float], preconditions: Sequence[J.Precondition],
                   expect_greater: bool = True, margin: float = SPEEDUP_MARGIN) -> tuple[bool, J.TTest,
                                                                                          list[J.Precondition]]:
    """The shared rule: one-sided t test of the paired differences ``treated[i] - control[i]`` > ``margin``.
    Returns ``(holds, test, preconditions + [power])``: ``holds`` is the test's significance when
    ``expect_greater`` (a speed-up is claimed), its negation otherwise (the claim is "no speed-up"). Power
    (>= 5 pairs) is added to ``preconditions``; a row built from it is untestable when any is unmet."""
    if len(treated) != len(control):
        raise ValueError(f"paired samples must have the same length, got {len(treated)} and {len(control)}.")
    d = [float(a) - float(b) for a, b in zip(treated, control)]
    t = J.one_sided_t(d, margin)
    pre = list(preconditions) + [J.enough_samples(t.n)]
    return (t.significant if expect_greater else not t.significant), t, pre


def speedup_row(claim: str, source: str, paper: str, grid: dict, opt: str, lrs: Sequence[float], treated: str,
                control: str = "none", expect_speedup: bool = True, note: str = "") -> Row:
    """The row "``treated`` speeds up training over ``control``" (or, ``expect_speedup=False``, "does not") for
    optimiser ``opt``: :func:`paired_verdict` on :func:`lr_area`, with the baseline's precondition and, for a
    teleport arm, the treatment's (median gradient-norm gain at initialisation >= 1.5)."""
    a_t, a_c = lr_area(grid, opt, treated, lrs), lr_area(grid, opt, control, lrs)
    pre = [baseline_precondition(grid, opt, lrs, control)]
    gains = [r.grad_gain for r in grid[(opt, lrs[0], treated)]]
    dists = [r.rel_dist for r in grid[(opt, lrs[0], treated)]]
    if treated == "teleport":
        pre.append(J.treatment_gain(gains, what="median gradient-norm gain of the teleport at initialisation"))
    holds, t, pre = paired_verdict(a_t, a_c, pre, expect_greater=expect_speedup)
    n_div = sum(r.diverged for lr in lrs for r in grid[(opt, lr, treated)])
    ours = (f"validation accuracy averaged over epochs and lrs: {VARIANT_LABELS[control]} {np.mean(a_c):.4f}, "
            f"{VARIANT_LABELS[treated]} {np.mean(a_t):.4f}; paired gain {t.describe(fmt='.4f')}; "
            f"{'significant' if t.significant else 'not significant'}; gradient-norm gain at init median "
            f"{float(np.median(gains)):.2f}, ||V - W|| / ||W|| median {float(np.median(dists)):.2f}"
            + (f"; {n_div} diverged runs (counted at chance)" if n_div else "") + (f"; {note}" if note else ""))
    crit = RULE if expect_speedup else (RULE.replace("mean gain >", "the mean gain is NOT significantly >")
                                        + " (the claim is the absence of a speed-up)")
    return Row(claim, source, ours, holds,
               {"area_treated": a_t, "area_control": a_c, "ttest": asdict(t), "grad_gains": gains,
                "rel_dist": dists, "lrs": list(lrs), "diverged": n_div},
               paper=paper, criterion=crit, tolerance=TOLERANCE, preconditions=pre)


def plot_grid(ax, grid: dict, opt: str, lrs: Sequence[float], variants: Sequence[str], title: str):
    """LR-averaged validation-accuracy curves (mean over seeds) of ``variants`` on ``ax``."""
    for v in variants:
        c = lr_curve(grid, opt, v, lrs)
        ax.plot(range(1, len(c) + 1), c, label=VARIANT_LABELS[v])
    ax.axhline(CHANCE, color="grey", lw=0.5, ls=":")
    ax.set(title=title, xlabel="epoch", ylabel="val. acc. (LR-averaged)")
    ax.legend(fontsize=6)


@dataclass
class Budget:
    """Learning rates, seeds and epochs of one mode."""

    lrs: tuple
    seeds: tuple
    epochs: int
    weight_decay: float = WEIGHT_DECAY

    def describe(self) -> str:
        return (f"lr{'s' if len(self.lrs) > 1 else ''} {', '.join(f'{x:g}' for x in self.lrs)}, {len(self.seeds)} "
                f"seeds, {self.epochs} epochs, weight decay {self.weight_decay:g}")
