"""Reproductions of seed 001 (teleportation with null-space gradient projection) at CPU scale.

* ``nullspace-mlp``: MLP [1024, 1024] ReLU (quick: [256, 256]) on digits (full mode also mnist1d) (Fig. 2).
* ``nullspace-cnn``: ``simple_cnn`` (16, 32, 64) on digits as 1x8x8 images, 40 warm-up steps (Fig. 3).
* ``nullspace-transformer``: small pre-LN Transformer on digits as 8 tokens of 8 features (Fig. 4).
* ``nullspace-error-control``: gradient norm and loss during teleport steps for tau in
  {1, 0.999, 0.99, 0.9} (Fig. 6b), plus the loss change per teleport of the null-space move, the
  exact symmetry action and the published first-order symmetry action side by side.

The training protocol every training entry shares (:func:`run_training_entry`; ``nullspace-resnet`` and
``nullspace-lm`` in :mod:`.nullspace_extra_repro` use it too), with the source sentence each choice follows:

* b = 32 teleport batches, t = 8 steps per batch, primary batch size 32: "The batch size for the primary task is
  set to 32, the number of teleport batches set to 32, and the number of teleportation steps per batch set to 8
  throughout all experiments" (App. A.2).
* Schedule: teleport before each of the first 5 epochs: "we schedule teleportation for the first 5 epochs of the
  primary training phase" (Sec. 4.1); 40 warm-up steps before the first teleport for CNNs (App. A.2).
* tau = 1: "The SVD threshold is set to 1" (Sec. 4.1).
* CAP: Algorithm 1's "threshold maximum gradient norm value CAP" is an absolute gradient norm at which a batch's
  ascent stops (``NullSpaceTeleport(cap=...)``); its values (Table 1) are illegible. Ours, fixed before any
  teleport run: CAP = :data:`CAP_MULTIPLE` x g0, g0 = the median gradient norm of the freshly initialised model
  (seed 0) over 8 random training batches of the teleport batch size n (:func:`initial_grad_norm`); 6.5 = 3 / 0.46 puts the
  quick MLP at the CAP 3 of an independent digits check (``notes/independent_checks.md``: CAP 3, b = 32 saved 2.35
  of 8 epochs with SGD). The per-batch ``cap_ratio`` the entries used before compounds over the 32 batches
  (training diverged at step 47 with ``cap_ratio`` 3).
* eta (eq. 5; Table 1 illegible): the MLP uses 0.05 (the independent check's value); the other models take the
  smallest eta of :data:`ETA_GRID` whose single teleport of the freshly initialised seed-0 model (the entry's b,
  n and CAP) raises the gradient norm by >= 1.5 (:func:`calibrate_eta`): a rule on the teleport alone, fixed
  before the run, that never looks at a training curve.
* Learning rates: chosen on baseline runs only (no teleport arm consulted) so that every optimizer's baseline leaves
  chance within the budget; the row "the baseline learns" checks it on every seed.
* 5 seeds per optimizer and arm (same seed = same init and data order for both arms).
* Every guard off (``max_loss_change``, ``batch_loss_tol``, ``held_out_tol``, ``max_weight_growth`` None): a guard
  rolls back any step that breaks the loss bound, so a guarded run would make the exactness row pass by
  construction. The CAP is not a guard: it stops the ascent at a gradient norm whatever the loss does, so a move
  that leaks out of the null space still changes the loss below the CAP (``tests/test_nullspace_repro.py`` runs
  that control). The held-out batch (256 training samples set aside per teleport) is measured, not enforced.

Preconditions (:mod:`.judging`), thresholds fixed before the run: **the treatment happened** (median gradient-norm
gain per teleport >= 1.5; a teleport's gain = the gradient norm at the end of its last batch over that at the start
of its first, the numbers the callback logs as ``grad_norm_before``/``_after``), **the baseline learns** (every
seed's best test accuracy >= chance + 20 pp), **power** (>= 5 seeds). The speed-up row is a one-sided t test at 5 %
over the seeds of "epochs saved > 10 % of the budget".
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.experiments import judging
from gradcond.experiments.registry import Row, register
from gradcond.teleport.errors import TeleportError
from gradcond.teleport.level_set import sample_batches
from gradcond.teleport.nullspace import NullSpaceTeleport, NullSpaceTeleportCallback
from gradcond.teleport.symmetry import SymmetryTeleport
from gradcond.train import fit

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam")
SEEDS = (0, 1, 2, 3, 4)
SOURCE_CURVES = "seed 001 Figs. 2-4: teleport converges faster (train and test loss), sometimes to a lower loss"

# ---- the protocol's constants (see the module docstring for the source sentence each follows) ---------------------
TELEPORT_BATCHES = 32
TELEPORT_STEPS = 8
SCHEDULE = 5
PRIMARY_BATCH = 32
CAP_MULTIPLE = 6.5
CAP_WHY = ("CAP = 6.5 x g0 (g0: median gradient norm of the freshly initialised seed-0 model over 8 random training "
           "batches of the teleport batch size n); 6.5 = 3 / 0.46 puts the quick MLP at the CAP 3 of an independent digits check; the source's "
           "Table 1 values are illegible")
ETA_GRID = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

# every guard off: a guard would roll back the steps the exactness row is meant to catch
GUARDS_OFF = dict(max_loss_change=None, batch_loss_tol=None, held_out_tol=None, max_weight_growth=None)


# ---- judging functions (pure: the tests feed them counter-examples) --------------------------------

EXACT_TOL = 1e-4
EXACT_TOL_WHY = ("1e-4 relative: float32 rounding of a loss over 32 samples after 8 steps is ~1e-6, two orders "
                 "below; the source (Sec. 3, Fig. 6b) claims the loss is unchanged, so any larger change is a real "
                 "error")
HELD_OUT_TOL = 0.05
HELD_OUT_TOL_WHY = ("5 % relative on a held-out batch of 256 training samples the teleport does not move on: the "
                    "library's default held-out guard, i.e. the largest change we would still call 'the function is "
                    "kept off the teleport batch'; chosen before the run, measured with that guard off")
FASTER_MARGIN = 0.10
FASTER_MARGIN_WHY = ("teleport must save more than 10 % of the epoch budget, significant at 5 % (one-sided t over the "
                     "seeds): the source's Figs. 2-4 show teleport curves separated from the baselines by a visible "
                     "fraction of the run, not a fraction of an epoch")
BASELINE_MARGIN = 0.20
SETTING_NAMES = ("max_loss_change", "batch_loss_tol", "held_out_tol", "max_weight_growth")


def guards_on(settings: dict) -> list[str]:
    """Names of the guards that are switched on in ``settings`` (a teleporter's keyword arguments or
    :func:`teleporter_guards`); a missing guard counts as on, because the library turns it on by default."""
    return [k for k in SETTING_NAMES if settings.get(k, "default") is not None]


def teleporter_guards(tp: NullSpaceTeleport) -> dict:
    """The guard settings of a built teleporter, as the keyword names of its constructor."""
    return {"max_loss_change": tp.max_loss_change, "batch_loss_tol": tp.guards.batch_loss_tol,
            "held_out_tol": tp.guards.held_out_tol, "max_weight_growth": tp.guards.max_weight_growth}


def judge_exactness(max_rel_changes: list[float], grad_gains: list[float], n_failed: int, settings: dict,
                    tol: float = EXACT_TOL) -> tuple[bool, str]:
    """Verdict of "tau = 1 keeps the teleport-batch loss while the gradient norm rises".

    ``grad_gains``: the gradient-norm gain of every batch that took at least one step (a batch that starts at or
    above the CAP takes none, by Algorithm 1). Holds iff no guard was on in ``settings`` (a guard rolls back steps
    that break the bound, so a guarded run is no evidence), at least one teleport ran, none failed (non-finite),
    every teleport's largest relative batch-loss change is < ``tol`` and every stepping batch's gain is > 1.
    Returns (holds, reason in words). Cost: O(number of teleports)."""
    on = guards_on(settings)
    if on:
        return False, f"not evidence: guards {on} were on and roll back any step that breaks the bound"
    fin = [r for r in max_rel_changes if math.isfinite(r)]
    if not fin or n_failed or len(fin) < len(max_rel_changes):
        return False, f"{n_failed + len(max_rel_changes) - len(fin)} failed teleports, {len(fin)} finite"
    mx = max(fin)
    gmin = min(grad_gains) if grad_gains else float("nan")
    if not mx < tol:
        return False, f"largest relative batch-loss change {mx:.2e} >= {tol:g}"
    if not gmin > 1.0:
        return False, f"smallest gradient-norm gain of a batch that stepped {gmin:.3f} <= 1"
    return True, f"largest relative batch-loss change {mx:.2e} < {tol:g}; gradient gain >= {gmin:.3f}"


def judge_held_out(changes: list[float], settings: dict, tol: float = HELD_OUT_TOL) -> tuple[bool, str]:
    """Verdict of "a teleport keeps the held-out loss": holds iff no guard was on, at least one
    held-out change was measured and every relative held-out loss change ``|after/before - 1|`` is
    <= ``tol``. Returns (holds, reason)."""
    on = guards_on(settings)
    if on:
        return False, f"not evidence: guards {on} were on"
    if not changes:
        return False, "no held-out loss was measured"
    worst = max(abs(c) if math.isfinite(c) else math.inf for c in changes)
    if worst <= tol:
        return True, f"largest |relative held-out change| {worst:.2e} <= {tol:g}"
    return False, f"largest |relative held-out change| {worst:.2e} > {tol:g}"


def epochs_saved(reach: list[float | None], epochs: int) -> list[float]:
    """Epochs saved per seed: the baseline reaches its own final train loss at ``epochs``; a teleported
    run that reached it at fractional epoch r saved ``epochs - r``; one that never did saved 0."""
    return [0.0 if r is None else max(0.0, epochs - r) for r in reach]


def judge_faster(reach: list[float | None], epochs: int, margin: float = FASTER_MARGIN) -> judging.TTest:
    """Verdict of "teleport speeds up training": a one-sided t test (:func:`judging.one_sided_t`, 5 %) over the
    seeds that the epochs saved (:func:`epochs_saved`) exceed ``margin * epochs``. ``.significant`` is the verdict;
    the power precondition (>= 5 seeds) is the caller's."""
    return judging.one_sided_t(epochs_saved(reach, epochs), margin * epochs)


def teleport_gain(res) -> float:
    """A teleport's gradient-norm gain: the norm at the end of its last batch over the norm at the start of its
    first (``TeleportResult.grad_norm_after / grad_norm_before``, what the callback logs); NaN with no batch."""
    if not res.batches or not res.grad_norm_before > 0:
        return float("nan")
    return res.grad_norm_after / res.grad_norm_before


def judge_error_control(recs: dict, tol: float) -> tuple[bool, str]:
    """Verdict of Fig. 6b's two-part claim for ``recs = {1.0: rec, 0.99: rec}`` (``BatchRecord``s with
    ``steps`` and ``loss_trace``/``grad_norm_trace``: entry i is the point after i steps).

    Both taus are compared after the SAME number of steps k = the smaller of their step counts (a
    teleport stops early at its CAP, so end-of-teleport numbers would compare unequal step counts):
    holds iff k >= 1, tau = 0.99's gradient-norm gain at step k exceeds tau = 1's AND tau = 0.99's
    relative batch-loss change at step k is <= ``tol``. Returns (holds, reason)."""
    r1, r99 = recs[1.0], recs[0.99]
    # trace[i] is the point after i steps for i <= steps (a capped teleport appends its last point twice)
    k = min(r1.steps, r99.steps, len(r1.grad_norm_trace) - 1, len(r99.grad_norm_trace) - 1, len(r99.loss_trace) - 1)
    if k < 1:
        return False, f"no common teleport step to compare ({r1.steps} and {r99.steps} steps)"
    g1 = r1.grad_norm_trace[k] / r1.grad_norm_trace[0]
    g99 = r99.grad_norm_trace[k] / r99.grad_norm_trace[0]
    l0, lk = r99.loss_trace[0], r99.loss_trace[k]
    rel = abs(lk - l0) / max(abs(l0), 1e-30)
    faster = g99 > g1
    flat = math.isfinite(rel) and rel <= tol
    return faster and flat, (f"after {k} steps each: ascends faster: {'yes' if faster else 'no'} (gradient norm "
                             f"x{g99:.2f} at tau 0.99 vs x{g1:.2f} at tau 1); loss kept within {tol:g}: "
                             f"{'yes' if flat else 'no'} (tau 0.99 batch loss {l0:.4f} -> {lk:.4f}, rel {rel:.2e})")


def _ms(xs) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f}+-{statistics.pstdev(xs):.3f}"


def _reach(rows_t, target) -> float | None:
    """Fractional epoch at which the train loss first reaches ``target`` (linear interpolation
    between epoch-end values, epoch 0 = before training is not known so the first epoch counts
    as reached at 1.0)."""
    prev = None
    for r in rows_t:
        cur = r["train_loss"]
        if cur <= target:
            if prev is None or prev == cur:
                return float(r["epoch"] + 1)
            return r["epoch"] + (prev - target) / (prev - cur)
        prev = cur
    return None


# ---- setting rules: CAP and eta, fixed before any training run ------------------------------------------------------


def initial_grad_norm(build: Callable, data, loss: str = "cross_entropy", n: int = PRIMARY_BATCH, batches: int = 8,
                      seed: int = 0) -> float:
    """g0: the median, over ``batches`` random ``n``-sample training batches, of the gradient norm (all trainable
    parameters) of the freshly initialised model ``build()`` under ``torch.manual_seed(seed)``. Cost: ``batches``
    forward and backward passes."""
    from gradcond.losses import get_loss

    torch.manual_seed(seed)
    model = build()
    loss_fn = get_loss(loss)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    norms = []
    for x, y in sample_batches(data.train, batches, n, gen):
        g = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
        norms.append(math.sqrt(sum(float((gi * gi).sum()) for gi in g if gi is not None)))
    return statistics.median(norms)


def calibrate_eta(build: Callable, data, cap: float, n: int, num_batches: int = TELEPORT_BATCHES,
                  loss: str = "cross_entropy", grid=ETA_GRID, threshold: float = judging.MIN_TREATMENT_GAIN,
                  seed: int = 0) -> tuple[float, list[dict]]:
    """The teleport learning rate by a rule on the teleport alone: for each eta of ``grid`` (ascending), one
    teleport (guards off, t = 8, tau = 1, ``cap``) of the freshly initialised seed-``seed`` model on
    ``num_batches`` random ``n``-sample training batches; the first eta whose gain (:func:`teleport_gain`) reaches
    ``threshold`` wins. None does: the eta with the largest finite gain (the treatment precondition will then say
    whether the runs teleported). A teleport that fails (non-finite values) ends the search. Returns (eta, table of
    {eta, gain, steps, failed}). Cost: up to ``len(grid)`` teleports."""
    gen = torch.Generator().manual_seed(seed)
    batches = sample_batches(data.train, num_batches, n, gen)
    table = []
    for eta in grid:
        torch.manual_seed(seed)
        model = build()
        tp = NullSpaceTeleport(loss, eta=eta, steps=TELEPORT_STEPS, tau=1.0, cap=cap, **GUARDS_OFF)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # empty null spaces (input layers): listed in the records
                res = tp.teleport(model, batches)
        except TeleportError:
            table.append({"eta": eta, "gain": float("nan"), "steps": 0, "failed": True})
            break
        gain = teleport_gain(res)
        table.append({"eta": eta, "gain": gain, "steps": sum(b.steps for b in res.batches), "failed": False})
        if gain >= threshold:
            return eta, table
    fin = [t for t in table if math.isfinite(t["gain"])]
    return (max(fin, key=lambda t: t["gain"])["eta"] if fin else grid[0]), table


# ---- the training protocol ----------------------------------------------------------------------------------------


@dataclass
class TrainingSetup:
    """One training entry's setting. ``eta=None``: :func:`calibrate_eta`; ``cap=None``: CAP_MULTIPLE x g0.
    ``chance``: the chance accuracy of the baseline-learns precondition, or None with ``lm_vocab`` set (a language
    model: its test loss must fall 20 % below ln V, the loss of a uniform predictor)."""

    name: str
    build: Callable
    data: object
    dname: str
    lrs: dict
    epochs: int
    n: int = PRIMARY_BATCH
    warmup: int = 0
    optimizers: tuple = OPTIMIZERS
    schedule: int = SCHEDULE
    seeds: tuple = SEEDS
    eta: float | None = None
    cap: float | None = None
    chance: float | None = 0.1
    lm_vocab: int | None = None
    reduced: str = ""  # what quick mode reduces, in words
    extra: dict = field(default_factory=dict)


def _arm(build, data, opt, lr, epochs, seed, callback=None):
    torch.manual_seed(seed)
    model = build()
    tr, te = data.loaders(PRIMARY_BATCH, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty null spaces (input layers) are reported in the events
        h = fit(model, tr, te, optimizer=opt, lr=lr, epochs=epochs, seed=seed, progress=False,
                callbacks=[callback] if callback is not None else [])
    return h


def _baseline_precondition(setup: TrainingSetup, base_rows: list[list[dict]]) -> judging.Precondition:
    if setup.lm_vocab is not None:
        worst = max(min(r["test_loss"] for r in rows) for rows in base_rows)
        return judging.loss_decreases(math.log(setup.lm_vocab), worst, BASELINE_MARGIN,
                                      what=f"the untreated arm's best test loss (worst seed; from ln {setup.lm_vocab}, "
                                           "a uniform predictor)")
    worst = min(max(r["test_acc"] for r in rows) for rows in base_rows)
    return judging.baseline_learns(worst, setup.chance, BASELINE_MARGIN,
                                   what="the untreated arm's best test accuracy (worst seed)")


def run_training_entry(setup: TrainingSetup, out_dir: Path) -> list[Row]:
    """Run ``setup`` through the module's protocol and return its rows, in reading order: the setting (reported),
    the exactness and held-out rows (judged over every teleport of every optimizer), then one speed-up row per
    optimizer. Cost: 2 x len(optimizers) x len(seeds) training runs, plus the calibration teleports."""
    name = setup.name
    g0 = initial_grad_norm(setup.build, setup.data, n=setup.n)
    cap = setup.cap if setup.cap is not None else CAP_MULTIPLE * g0
    calib = None
    eta = setup.eta
    if eta is None:
        eta, calib = calibrate_eta(setup.build, setup.data, cap, setup.n)
    tele_kw = dict(eta=eta, steps=TELEPORT_STEPS, tau=1.0, cap=cap, **GUARDS_OFF)
    cb_kw = dict(schedule=setup.schedule, num_batches=TELEPORT_BATCHES, batch_size=setup.n,
                 warmup_steps=setup.warmup)
    rows: list[Row] = []
    curves = {}
    all_rel, step_gains, held, all_tgains = [], [], [], []
    refused: dict[str, int] = {}
    settings = None
    for opt in setup.optimizers:
        base, tele, reach, tgains = [], [], [], []
        for seed in setup.seeds:
            hb = _arm(setup.build, setup.data, opt, setup.lrs[opt], setup.epochs, seed)
            tp = NullSpaceTeleport(**tele_kw)
            settings = teleporter_guards(tp)
            cb = NullSpaceTeleportCallback(tp, seed=seed, **cb_kw)
            ht = _arm(setup.build, setup.data, opt, setup.lrs[opt], setup.epochs, seed, cb)
            base.append(hb.rows)
            tele.append(ht.rows)
            reach.append(_reach(ht.rows, hb.rows[-1]["train_loss"]))
            for res in cb.results:
                all_rel.append(res.max_rel_loss_change)
                step_gains += [b.grad_norm_after / b.grad_norm_before for b in res.batches if b.steps > 0]
                tgains.append(teleport_gain(res))
                if res.held_out_rel_change is not None:
                    held.append(res.held_out_rel_change)
            for e in ht.events:
                if e["kind"] == "teleport_failed":
                    why = e.get("reason") or "non_finite"
                    refused[why] = refused.get(why, 0) + 1
                    tgains.append(float("nan"))
        all_tgains += tgains
        curves[(setup.dname, opt)] = (base, tele)
        rows.append(_speedup_row(setup, opt, base, tele, reach, tgains))
    settings = settings or dict(tele_kw)
    n_fail = sum(refused.values())
    treated = judging.treatment_gain(all_tgains)
    finite_rel = [r for r in all_rel if math.isfinite(r)]
    mx = max(finite_rel) if finite_rel else float("nan")
    ok, why = judge_exactness(all_rel, step_gains, n_fail, settings)
    exact = Row(
        claim=f"{name}: with tau = 1 each teleport keeps the teleport-batch loss while the gradient norm increases",
        source="seed 001 Sec. 3 (Eq. 3 with tau = 1: exact input null space) and Sec. 4.5, Fig. 6b",
        paper="loss constant during teleportation at tau = 1 (Fig. 6b, no number given)",
        ours=(f"all guards off, CAP {cap:.3g}; max relative batch-loss change over {len(finite_rel)} teleports: "
              f"{mx:.2e}; gain per teleport median {_median(all_tgains):.2f} (min {_min(all_tgains):.2f}); "
              f"{len(step_gains)} batches stepped, smallest gain {_min(step_gains):.3f}; failed teleports: "
              f"{n_fail} {refused or ''}; {why}"),
        holds=ok,
        criterion=("with every guard off (max_loss_change, batch_loss_tol, held_out_tol, max_weight_growth None; the "
                   "CAP is the source's and only stops the ascent), each teleport's largest relative teleport-batch "
                   "loss change < tolerance, every batch that took a step raised its gradient norm, and no teleport "
                   "failed"),
        tolerance=EXACT_TOL_WHY,
        preconditions=[treated],
        data={"max_rel_loss_change": mx, "teleport_gains": all_tgains, "stepped_batch_gain_min": _min(step_gains),
              "failed": refused, "guards": settings, "cap": cap},
    )
    hok, hwhy = judge_held_out(held, settings)
    held_row = Row(
        claim=f"{name}: a tau = 1 teleport keeps the loss on data it did not teleport on (held-out batch)",
        source=("seed 001 Sec. 3 (teleport moves on the level set of the teleport-batch loss; Figs. 2-4 report "
                "test loss)"),
        paper="not stated: the source claims loss invariance on the teleport batch only",
        ours=(f"held-out relative loss change over {len(held)} teleports: median "
              f"{statistics.median(held) if held else float('nan'):+.2e}, max |.| "
              f"{max((abs(h) for h in held), default=float('nan')):.2e} (guard off); {hwhy}"),
        holds=hok,
        criterion="with every guard off, every teleport's |held-out loss after / before - 1| <= tolerance",
        tolerance=HELD_OUT_TOL_WHY,
        preconditions=[treated],
        data={"held_out_rel_change": held, "guards": settings},
    )
    setting = Row(
        claim=f"{name}: teleport setting used (the source's Table 1 hyper-parameters are illegible)",
        source="seed 001 Sec. 4.1 and App. A.2 (b = 32 batches, t = 8 steps, 5-epoch schedule, tau = 1); Table 1 "
               "(eta, CAP, n: illegible)",
        ours=(f"{setup.epochs} epochs, seeds {list(setup.seeds)}, optimizers {list(setup.optimizers)} at learning "
              f"rates {dict((o, setup.lrs[o]) for o in setup.optimizers)}; teleport before epochs "
              f"0-{setup.schedule - 1}, b = {TELEPORT_BATCHES} batches of n = {setup.n}, t = {TELEPORT_STEPS}, "
              f"tau = 1, warm-up {setup.warmup} steps; g0 = {g0:.3f}, CAP = {cap:.3g} "
              f"({'given' if setup.cap is not None else f'{CAP_MULTIPLE:g} x g0'}); eta = {eta:g} "
              + (f"(calibrated: {'; '.join(_calib_text(t) for t in calib)})" if calib else "(given)")
              + (f". {setup.reduced}" if setup.reduced else "")),
        holds=None, criterion="reported, not judged",
        data={"teleporter": dict(tele_kw), "callback": dict(cb_kw), "lrs": dict(setup.lrs), "g0": g0,
              "calibration": calib or [], "epochs": setup.epochs, "seeds": list(setup.seeds)},
    )
    _plot(name, curves, out_dir)
    return [setting, exact, held_row] + rows


def _calib_text(t: dict) -> str:
    return f"eta {t['eta']:g}: " + ("failed" if t["failed"] else f"gain x{t['gain']:.2f} in {t['steps']} steps")


def _median(xs) -> float:
    fin = [x for x in xs if math.isfinite(x)]
    return statistics.median(fin) if fin else float("nan")


def _min(xs) -> float:
    fin = [x for x in xs if math.isfinite(x)]
    return min(fin) if fin else float("nan")


def _speedup_row(setup: TrainingSetup, opt: str, base, tele, reach, tgains) -> Row:
    epochs = setup.epochs
    test = judge_faster(reach, epochs)
    saved = epochs_saved(reach, epochs)
    fb = [r[-1]["train_loss"] for r in base]
    ft = [r[-1]["train_loss"] for r in tele]
    tb = [r[-1].get("test_loss") for r in base]
    tt = [r[-1].get("test_loss") for r in tele]
    ep = ", ".join("never" if e is None else f"{e:.2f}" for e in reach)
    pre = [judging.treatment_gain(tgains), _baseline_precondition(setup, base),
           judging.enough_samples(len(setup.seeds))]
    return Row(
        claim=f"{setup.name} on {setup.dname}, {opt}: teleport speeds up training",
        source=SOURCE_CURVES,
        paper="teleport curves below the baselines in every panel (3 runs each, no epochs-saved figure given)",
        ours=(f"epochs saved of {epochs}: {test.describe(fmt='.2f')} (per seed {', '.join(f'{x:.2f}' for x in saved)}; "
              f"baseline's final train loss reached at epoch {ep}); gain per teleport median {_median(tgains):.2f}; "
              f"final train {_ms(ft)} (teleport) vs {_ms(fb)} (baseline); final test {_ms(tt)} vs {_ms(tb)}"),
        holds=test.significant,
        criterion=("epochs saved per seed (budget minus the interpolated epoch at which the teleported run reaches "
                   "the baseline's final train loss; 0 if never): one-sided t test at 5 % that their mean exceeds "
                   f"{FASTER_MARGIN:.0%} of the budget ({FASTER_MARGIN * epochs:.1f} epochs)"),
        tolerance=FASTER_MARGIN_WHY + f"; {len(setup.seeds)} seeds (same init and data order per arm)",
        preconditions=pre,
        data={"epochs_to_reach": reach, "epochs_saved": saved, "t": test.t, "critical": test.critical,
              "teleport_gains": tgains, "final_train_teleport": ft, "final_train_baseline": fb,
              "final_test_teleport": tt, "final_test_baseline": tb, "lr": setup.lrs[opt], "epochs": epochs,
              "seeds": list(setup.seeds)},
    )


def _plot(name, curves, out_dir: Path) -> None:
    try:
        import matplotlib  # noqa: F401  (optional dependency check)

        from ..report.figures import object_pyplot as _plt  # Agg-canvas figures: the process-wide backend is left alone

        plt = _plt()
    except ImportError:  # pragma: no cover
        return
    keys = list(curves)
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        base, tele = curves[key]
        for runs, lab, c in ((base, "baseline", "C0"), (tele, "teleport", "C3")):
            n = min(len(r) for r in runs)
            mean = [statistics.mean(r[i]["train_loss"] for r in runs) for i in range(n)]
            ax.plot(range(1, n + 1), mean, color=c, label=lab)
        ax.set_title(f"{key[0]} {key[1]}", fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.set_yscale("log")
    axes[0][0].set_ylabel("train loss")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"{name}.png", dpi=100)
    plt.close(fig)


PROTOCOL = ("b = 32 teleport batches of n samples, t = 8 steps each, tau = 1, teleport before each of the first 5 "
            "epochs, primary batch 32 (App. A.2: 'the number of teleport batches set to 32, and the number of "
            "teleportation steps per batch set to 8 throughout all experiments'; Sec. 4.1: 'we schedule teleportation "
            "for the first 5 epochs'). CAP (Algorithm 1's absolute 'threshold maximum gradient norm value'; Table 1 "
            "illegible): 6.5 x the freshly initialised model's median gradient norm g0 on teleport-size batches, fixed "
            "before the run (6.5 = 3 / 0.46 gives the quick MLP the CAP 3 of an independent digits check). eta: "
            "given, or the smallest of 0.02 .. 2 whose one teleport of the seed-0 initial model raises the gradient "
            "norm 1.5x (a rule on the teleport alone). Learning rates chosen on baseline runs only. 5 seeds per "
            "optimizer and arm (same init and data order). Every teleport guard off, so no guard can make the "
            "exactness row pass; the CAP only stops the ascent. Preconditions: median gradient-norm gain per "
            "teleport >= 1.5 (the treatment happened), every seed's baseline leaves chance by 20 pp, >= 5 seeds. "
            "Speed-up: one-sided t test at 5 % that the epochs saved exceed 10 % of the budget.")


MLP_LRS = {"sgd": 0.05, "momentum": 0.01, "adagrad": 0.01, "adam": 1e-3}
LRS = MLP_LRS  # (former name)


@register("nullspace-mlp", claim="Null-space teleport accelerates MLP training with SGD, momentum, Adagrad and Adam",
          source="seed 001 Sec. 4.1, Fig. 2 (MLP [1024, 1024] ReLU, MNIST/FashionMNIST)",
          protocol=PROTOCOL + " MLP: [1024, 1024] ReLU as the source (quick: [256, 256]) on digits (full mode also "
                              "mnist1d; MNIST/FashionMNIST are not bundled), eta 0.05 (the independent check's), 20 "
                              "epochs (quick: 8), the four optimizers of Fig. 2.")
def run_mlp(quick: bool, out_dir: Path) -> list[Row]:
    width = 256 if quick else 1024
    datasets = {"digits": load_dataset("digits", form="flat")}
    if not quick:
        datasets["mnist1d"] = load_dataset("mnist1d")
    rows = []
    for dname, d in datasets.items():
        build = (lambda d=d: zoo.mlp(in_features=d.input_shape[0], out_features=d.num_outputs, depth=3,
                                     width=width))
        rows += run_training_entry(TrainingSetup(
            f"nullspace-mlp[{width}x{width}]", build, d, dname, MLP_LRS, 8 if quick else 20, eta=0.05,
            reduced="Quick mode: width 256 (source 1024), 8 epochs" if quick else ""), out_dir / dname)
    return rows


CNN_LRS = {"sgd": 0.1, "momentum": 0.02, "adagrad": 0.02, "adam": 2e-3}
QUICK_OPTIMIZERS = ("sgd",)  # quick mode of the non-MLP entries: SGD only (the MLP runs all four)


@register("nullspace-cnn", claim="Null-space teleport accelerates CNN training",
          source="seed 001 Sec. 4.2, Fig. 3 (CNN [3,16,32,64] + max-pool, CIFAR-10/100; 40 warm-up steps)",
          protocol=PROTOCOL + " CNN (16, 32, 64) + max-pool on digits as 1x8x8 images (CIFAR is not bundled), 40 "
                              "warm-up steps (App. A.2), n = 32, 20 epochs; quick: SGD only, 8 epochs.")
def run_cnn(quick: bool, out_dir: Path) -> list[Row]:
    d = load_dataset("digits", form="image")
    return run_training_entry(TrainingSetup(
        "nullspace-cnn", lambda: zoo.simple_cnn(in_channels=1, num_classes=10, image_size=8), d, "digits-image",
        CNN_LRS, 8 if quick else 20, warmup=40, optimizers=QUICK_OPTIMIZERS if quick else OPTIMIZERS,
        reduced="Quick mode: SGD only, 8 epochs" if quick else ""), out_dir)


TRANSFORMER_LRS = {"sgd": 0.05, "momentum": 0.01, "adagrad": 0.01, "adam": 1e-3}


@register("nullspace-transformer", claim="Null-space teleport accelerates Transformer training",
          source="seed 001 Sec. 4.3, Fig. 4 (2-layer Transformer on sequential MNIST)",
          protocol=PROTOCOL + " Transformer 2 layers x 2 heads, d_model 64, on digits as 8 tokens of 8 features "
                              "(sMNIST is not bundled); n = 4 samples (32 tokens) per teleport batch, because with "
                              "n x 8 tokens >= 65 input dims the attention layers have no null space at tau = 1; "
                              "20 epochs; quick: SGD only, 6 epochs.")
def run_transformer(quick: bool, out_dir: Path) -> list[Row]:
    d = load_dataset("digits", form="sequence")
    return run_training_entry(TrainingSetup(
        "nullspace-transformer",
        lambda: zoo.transformer(in_features=8, seq_len=8, d_model=64, nhead=2, num_layers=2, dim_ff=128),
        d, "digits-seq", TRANSFORMER_LRS, 6 if quick else 20, n=4,
        optimizers=QUICK_OPTIMIZERS if quick else OPTIMIZERS,
        reduced="Quick mode: SGD only, 6 epochs" if quick else ""), out_dir)


def transformer_cap() -> tuple[float, float]:
    """``(CAP, g0)`` of the ``nullspace-transformer`` entry's model on digits (the module's CAP rule), used by
    ``nullspace-error-control`` so that Fig. 6b is judged at the training entries' CAP."""
    d = load_dataset("digits", form="sequence")
    g0 = initial_grad_norm(
        lambda: zoo.transformer(in_features=8, seq_len=8, d_model=64, nhead=2, num_layers=2, dim_ff=128), d, n=4)
    return CAP_MULTIPLE * g0, g0


@register("nullspace-error-control",
          claim="With tau = 1 the loss stays constant during teleport steps while the gradient norm rises; smaller tau raises it faster at a growing loss error",
          source="seed 001 Sec. 4.5, Fig. 6b (Transformer on sMNIST, tau in {1, 0.999, 0.99, 0.9})",
          protocol="The nullspace-transformer entry's model (2 layers x 2 heads, d_model 64, digits as 8 tokens of 8 "
                   "features), freshly initialised (seed 0), one teleport on the first 8 training samples, eta 0.01, "
                   "up to 16 steps (full: 40) per tau in {1, 0.999, 0.99, 0.9}, every guard off. The ascent stops at "
                   "the source's CAP (Algorithm 1: an absolute gradient-norm threshold), the training entries' rule "
                   "6.5 x g0 for this model (g0: its median initial gradient norm on 4-sample batches); before, a CAP "
                   "of 50x the starting norm let tau = 0.99 run 13 steps past any CAP (gradient x257, loss x9). Both "
                   "taus are compared after the same number of steps (the smaller count: a teleport stops at the "
                   "CAP). Plus: the loss change per teleport of the null space, the exact symmetry action and the "
                   "published first-order action on one MLP, float32 and float64.")
def run_error_control(quick: bool, out_dir: Path) -> list[Row]:
    d = load_dataset("digits", form="sequence")
    X, Y = d.train.tensors
    steps = 16 if quick else 40
    cap, g0 = transformer_cap()
    traces = {}
    rows = []
    for tau in (1.0, 0.999, 0.99, 0.9):
        torch.manual_seed(0)
        model = zoo.transformer(in_features=8, seq_len=8, d_model=64, nhead=2, num_layers=2, dim_ff=128)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                # the source's Fig. 6b lets tau < 1 change the loss: this measures that error, so the
                # default guards are off here
                rec = NullSpaceTeleport("cross_entropy", eta=0.01, steps=steps, tau=tau, cap=cap,
                                        **GUARDS_OFF).teleport(
                    model, (X[:8], Y[:8])).batches[0]
            except FloatingPointError as e:
                rows.append(Row(claim=f"tau = {tau}: teleport steps", source="seed 001 Sec. 4.5, Fig. 6b",
                                ours=f"teleport failed: {e}", holds=False if tau in (1.0, 0.99) else None,
                                criterion="the teleport must run (non-finite values are a failure)",
                                tolerance="none: a failed teleport fails the row"))
                continue
        traces[tau] = rec
        kept = sum(rec.ranks.values())
        total = sum(rec.dims.values())
        ours = (f"rank kept {kept}/{total} input dims; grad norm {rec.grad_norm_before:.3f} -> "
                f"{rec.grad_norm_after:.3f} "
                f"(x{rec.grad_norm_after / rec.grad_norm_before:.2f}); batch loss {rec.loss_before:.5f} -> "
                f"{rec.loss_after:.5f} (rel {rec.rel_loss_change:.1e}) in {rec.steps} steps"
                f"{' (stopped at the CAP)' if rec.capped else ''}, guards off, CAP {cap:.3g}")
        if tau == 1.0:
            ok, why = judge_exactness([rec.rel_loss_change], [rec.grad_norm_after / rec.grad_norm_before], 0,
                                      {**GUARDS_OFF})
            rows.append(Row(
                claim=f"tau = 1: the loss stays constant during {rec.steps} teleport steps while the gradient "
                      "norm rises",
                source="seed 001 Sec. 4.5, Fig. 6b", paper="loss constant, gradient norm rises steadily (no numbers)",
                ours=f"{ours}; {why}", holds=ok,
                criterion=("guards off: relative batch-loss change after all steps < tolerance and gradient-norm "
                           "gain > 1"),
                tolerance=EXACT_TOL_WHY,
                preconditions=[judging.treatment_gain([rec.grad_norm_after / rec.grad_norm_before],
                                                      what="gradient-norm gain of the teleport")],
                data={"loss_trace": rec.loss_trace, "grad_norm_trace": rec.grad_norm_trace, "ranks": rec.ranks}))
        else:
            rows.append(Row(
                claim=f"tau = {tau}: loss and gradient norm during {rec.steps} teleport steps",
                source="seed 001 Sec. 4.5, Fig. 6b", paper="loss constant for tau >= 0.99 (no numbers)",
                ours=ours, holds=None, criterion="reported, not judged (tau = 0.99 is judged in the next row)",
                data={"loss_trace": rec.loss_trace, "grad_norm_trace": rec.grad_norm_trace, "ranks": rec.ranks}))
    if 1.0 in traces and 0.99 in traces:
        ok, why = judge_error_control(traces, ERROR_CONTROL_TOL)
        rows.append(Row(
            claim=("smaller tau (0.99) ascends the gradient norm faster than tau = 1 AND keeps the loss roughly "
                   "constant"),
            source="seed 001 Sec. 4.5, Fig. 6b",
            paper="'a remarkable increase in the gradient norm ascending speed ... at 0.99, with the loss still "
                  "remaining constant'",
            ours=why, holds=ok,
            criterion=(f"guards off, up to {steps} steps per tau stopped at the CAP {cap:.3g} (6.5 x g0 = "
                       f"{g0:.3f}), compared after the same number of steps (the smaller step count): gradient-norm "
                       "gain(tau 0.99) > gain(tau 1) and the relative teleport-batch loss change at tau 0.99 <= "
                       "tolerance"),
            tolerance=ERROR_CONTROL_TOL_WHY,
            data={"gain_tau1": traces[1.0].grad_norm_after / traces[1.0].grad_norm_before,
                  "gain_tau099": traces[0.99].grad_norm_after / traces[0.99].grad_norm_before,
                  "rel_loss_change_tau099": traces[0.99].rel_loss_change,
                  "steps": [traces[1.0].steps, traces[0.99].steps], "cap": cap,
                  "loss_trace_tau099": traces[0.99].loss_trace}))
    else:
        rows.append(Row(claim="smaller tau (0.99) ascends faster and keeps the loss roughly constant",
                        source="seed 001 Sec. 4.5, Fig. 6b", ours="a teleport failed (see the rows above)",
                        holds=False, criterion="both teleports must run to be compared",
                        tolerance=ERROR_CONTROL_TOL_WHY))
    # loss change per teleport: null space vs symmetry (exact and published first-order), same MLP
    Xf, Yf = load_dataset("digits", form="flat").train.tensors
    side = {}
    sym_off = dict(batch_loss_tol=None, held_out_tol=None, max_weight_growth=None)
    for dtype in (torch.float32, torch.float64):
        # guards off for all three: a guard would undo exactly the loss changes this row measures
        for tp in (NullSpaceTeleport("cross_entropy", eta=0.05, **GUARDS_OFF),
                   SymmetryTeleport("cross_entropy", eta=0.05, **sym_off),
                   SymmetryTeleport("cross_entropy", eta=0.05, action="first_order", **sym_off)):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LeakyReLU(0.1), torch.nn.Linear(128, 128),
                                    torch.nn.LeakyReLU(0.1), torch.nn.Linear(128, 10)).to(dtype)
            res = tp.teleport(m, [(Xf[i:i + 32].to(dtype), Yf[i:i + 32]) for i in range(0, 128, 32)],
                              held_out=(Xf[-256:].to(dtype), Yf[-256:]))
            side[(str(dtype).split(".")[-1], tp.method)] = res
    txt = "; ".join(f"{k[1]} {k[0]}: max rel {v.max_rel_loss_change:.1e}, grad x"
                    f"{statistics.mean(b.grad_norm_after / b.grad_norm_before for b in v.batches):.2f}, held-out "
                    f"{v.held_out_rel_change:+.1e}" for k, v in side.items())
    exact_ok = all(v.max_rel_loss_change < 1e-4 for k, v in side.items() if k[1] in ("nullspace", "symmetry"))
    fo = side[("float64", "symmetry-first_order")].max_rel_loss_change
    ex = side[("float64", "symmetry")].max_rel_loss_change
    rows.append(Row(
        claim="loss change per teleport: null space and exact symmetry action keep the batch loss; the published first-order action does not",
        source="seed 001 Fig. 1 and Sec. 1 (linear approximation of the level set is prone to error; null-space "
               "projection is accurate)",
        paper="qualitative (Fig. 1)",
        ours=txt, holds=exact_ok and fo > 10 * max(ex, 1e-15),
        criterion=("guards off, float32 and float64: null space and exact symmetry action keep every batch's relative "
                   "loss change < 1e-4, and the first-order action's float64 change is > 10x the exact action's"),
        tolerance=EXACT_TOL_WHY + "; 10x: an order of magnitude separates a first-order error from rounding",
        data={f"{k[0]}/{k[1]}": v.summary() for k, v in side.items()},
    ))
    _plot_error(traces, out_dir)
    return rows


ERROR_CONTROL_TOL = 1e-2
ERROR_CONTROL_TOL_WHY = ("1 % relative: Fig. 6b's loss curves for tau >= 0.99 are flat at plot resolution, so 1 % is "
                         "a generous reading of 'remaining constant'; fixed before the run")


def _plot_error(traces, out_dir: Path) -> None:
    try:
        import matplotlib  # noqa: F401  (optional dependency check)

        from ..report.figures import object_pyplot as _plt  # Agg-canvas figures: the process-wide backend is left alone

        plt = _plt()
    except ImportError:  # pragma: no cover
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    for tau, rec in traces.items():
        a.plot(rec.grad_norm_trace, label=f"tau={tau}")
        b.plot(rec.loss_trace, label=f"tau={tau}")
    a.set_xlabel("teleport step")
    a.set_ylabel("gradient norm")
    a.set_yscale("log")
    b.set_xlabel("teleport step")
    b.set_ylabel("teleport-batch loss")
    a.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "nullspace-error-control.png", dpi=100)
    plt.close(fig)
