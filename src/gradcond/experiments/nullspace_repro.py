"""Reproductions of seed 001 (teleportation with null-space gradient projection) at CPU scale.

* ``nullspace-mlp``: MLP [1024, 1024] ReLU (quick: [256, 256]) on digits and mnist1d (seed 001 Fig. 2).
* ``nullspace-cnn``: ``simple_cnn`` (16, 32, 64) on digits as 1x8x8 images, 40 warm-up steps (Fig. 3).
* ``nullspace-transformer``: small pre-LN Transformer on digits as 8 tokens of 8 features (Fig. 4).
* ``nullspace-error-control``: gradient norm and loss during teleport steps for tau in
  {1, 0.999, 0.99, 0.9} (Fig. 6b), plus the loss change per teleport of the null-space move, the
  exact symmetry action and the published first-order symmetry action side by side.

Every training entry runs each optimizer (SGD, momentum, Adagrad, Adam) with and without teleport
over 3 seeds (same seed = same init and data order for both arms) and reports: epochs for the
teleported run to reach the baseline's final training loss, final train/test loss both ways
(mean +- std over seeds), and the largest relative change of the teleport-batch loss over all
teleports with the gradient-norm gain and held-out loss change. CPU-scale settings (ours, the
source's Table 1 is illegible): teleport in the first 5 epochs (quick: 3), b = 32 (quick: 4)
batches of n samples, t = 8 steps, tau = 1, primary batch size 32.

The teleport arms run with EVERY guard off (``max_loss_change=None``, ``batch_loss_tol``,
``held_out_tol`` and ``max_weight_growth`` None): a guard rolls back any step that breaks the loss
bound, so a guarded run would make the exactness row pass by construction. The held-out batch
(256 training samples set aside per teleport) is still measured, only not enforced. The
eta/CAP/teleport-batch-size sweep on a validation split asked for by the source's illegible Table 1
is done for the MLP entry in full mode only (8 settings, one SGD run each on a 20 % validation split
of the training set; the lowest final validation loss among the settings whose teleports keep the batch
and held-out loss). Quick mode and the CNN and Transformer entries (about a minute or more in quick
mode already) do NOT sweep; every entry reports the setting used in a row.
"""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path

import torch

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.experiments.registry import Row, register
from gradcond.teleport.nullspace import NullSpaceTeleport, NullSpaceTeleportCallback
from gradcond.teleport.symmetry import SymmetryTeleport
from gradcond.train import fit

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam")
SEEDS = (0, 1, 2)
SOURCE_CURVES = "seed 001 Figs. 2-4: teleport converges faster (train and test loss), sometimes to a lower loss"


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
FASTER_MARGIN_WHY = ("teleport must save at least 10 % of the epoch budget (mean minus one std over the seeds): the "
                     "source's Figs. 2-4 show teleport curves separated from the baselines by a visible fraction of "
                     "the run, not a fraction of an epoch")
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

    Holds iff no guard was on in ``settings`` (a guard rolls back steps that break the bound, so a
    guarded run is no evidence), at least one teleport ran, none failed (non-finite), every teleport's
    largest relative batch-loss change is < ``tol`` and every batch's gradient-norm gain is > 1.
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
        return False, f"smallest gradient-norm gain {gmin:.3f} <= 1"
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


def judge_faster(reach: list[float | None], epochs: int, margin: float = FASTER_MARGIN) -> tuple[bool, dict]:
    """Verdict of "teleport speeds up training": holds iff every seed reached the baseline's final
    train loss and mean(saved) - std(saved) >= ``margin * epochs`` (population std over seeds).
    Returns (holds, numbers)."""
    saved = epochs_saved(reach, epochs)
    mean = statistics.mean(saved) if saved else 0.0
    sd = statistics.pstdev(saved) if len(saved) > 1 else 0.0
    need = margin * epochs
    ok = bool(saved) and all(r is not None for r in reach) and mean - sd >= need
    return ok, {"saved": saved, "mean": mean, "std": sd, "needed": need}


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


def _arm(build, data, opt, lr, epochs, seed, callback=None):
    torch.manual_seed(seed)
    model = build()
    tr, te = data.loaders(32, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty null spaces (input layers) are reported in the events
        h = fit(model, tr, te, optimizer=opt, lr=lr, epochs=epochs, seed=seed,
                callbacks=[callback] if callback is not None else [])
    return h


def _compare(name, build, datasets, lrs, epochs, tele_kw, cb_kw, out_dir: Path, quick: bool,
             sweep: list | None = None, sweep_note: str = "") -> list[Row]:
    rows: list[Row] = []
    curves = {}
    all_rel, gains, held = [], [], []
    refused: dict[str, int] = {}
    settings = None
    for dname, data in datasets.items():
        for opt in OPTIMIZERS:
            base, tele, reach, base_final = [], [], [], []
            for seed in SEEDS:
                hb = _arm(build, data, opt, lrs[opt], epochs, seed)
                tp = NullSpaceTeleport(**tele_kw)
                settings = teleporter_guards(tp)
                cb = NullSpaceTeleportCallback(tp, seed=seed, **cb_kw)
                ht = _arm(build, data, opt, lrs[opt], epochs, seed, cb)
                base.append(hb.rows)
                tele.append(ht.rows)
                target = hb.rows[-1]["train_loss"]
                base_final.append(target)
                reach.append(_reach(ht.rows, target))
                for res in cb.results:
                    all_rel.append(res.max_rel_loss_change)
                    gains += [b.grad_norm_after / b.grad_norm_before for b in res.batches]
                    if res.held_out_rel_change is not None:
                        held.append(res.held_out_rel_change)
                for e in ht.events:
                    if e["kind"] == "teleport_failed":
                        refused[e.get("reason", "non_finite")] = refused.get(e.get("reason", "non_finite"), 0) + 1
            curves[(dname, opt)] = (base, tele)
            fb = [r[-1]["train_loss"] for r in base]
            ft = [r[-1]["train_loss"] for r in tele]
            tb = [r[-1].get("test_loss") for r in base]
            tt = [r[-1].get("test_loss") for r in tele]
            faster, num = judge_faster(reach, epochs)
            ep = ", ".join("never" if e is None else f"{e:.2f}" for e in reach)
            rows.append(Row(
                claim=f"{name} on {dname}, {opt}: teleport speeds up training",
                source=SOURCE_CURVES,
                paper="teleport curves below the baselines in every panel (3 runs each, no epochs-saved figure given)",
                ours=(f"epochs saved {num['mean']:.2f}+-{num['std']:.2f} of {epochs} (per seed "
                      f"{', '.join(f'{x:.2f}' for x in num['saved'])}; baseline's final train loss reached at epoch "
                      f"{ep}); final train {_ms(ft)} (teleport) vs {_ms(fb)} (baseline); "
                      f"final test {_ms(tt)} vs {_ms(tb)}"),
                holds=faster,
                criterion=("every seed's teleported run reaches the baseline's final train loss, and the epochs saved "
                           "(budget minus the interpolated epoch of reaching it), mean minus std over seeds, are "
                           f">= {FASTER_MARGIN:.0%} of the budget ({num['needed']:.1f} epochs)"),
                tolerance=FASTER_MARGIN_WHY + f"; {len(SEEDS)} seeds (same init and data order per arm)",
                data={"epochs_to_reach": reach, "epochs_saved": num["saved"], "final_train_teleport": ft,
                      "final_train_baseline": fb, "final_test_teleport": tt, "final_test_baseline": tb,
                      "lr": lrs[opt], "epochs": epochs, "seeds": list(SEEDS)},
            ))
    settings = settings or dict(tele_kw)
    n_fail = sum(refused.values())
    finite_rel = [r for r in all_rel if math.isfinite(r)]
    mx = max(finite_rel) if finite_rel else float("nan")
    gmin = min(gains) if gains else float("nan")
    ok, why = judge_exactness(all_rel, gains, n_fail, settings)
    rows.insert(0, Row(
        claim=f"{name}: with tau = 1 each teleport keeps the teleport-batch loss while the gradient norm increases",
        source="seed 001 Sec. 3 (Eq. 3 with tau = 1: exact input null space) and Sec. 4.5, Fig. 6b",
        paper="loss constant during teleportation at tau = 1 (Fig. 6b, no number given)",
        ours=(f"all guards off; max relative batch-loss change over {len(finite_rel)} teleports: {mx:.2e}; "
              f"gradient-norm gain per batch min {gmin:.3f}, median "
              f"{statistics.median(gains) if gains else float('nan'):.3f}; failed teleports: {n_fail} {refused or ''}"
              f"; {why}"),
        holds=ok,
        criterion=("with every guard off (max_loss_change, batch_loss_tol, held_out_tol, max_weight_growth None), "
                   "each teleport's largest relative teleport-batch loss change < tolerance, every batch's "
                   "gradient-norm gain > 1 and no teleport failed"),
        tolerance=EXACT_TOL_WHY,
        data={"max_rel_loss_change": mx, "grad_gain_min": gmin, "failed": refused, "batches": len(gains),
              "guards": settings},
    ))
    hok, hwhy = judge_held_out(held, settings)
    rows.insert(1, Row(
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
        data={"held_out_rel_change": held, "guards": settings},
    ))
    rows.insert(2, Row(
        claim=f"{name}: teleport setting used (the source's Table 1 hyper-parameters are illegible)",
        source="seed 001 Table 1 (hyper-parameters; illegible in the seed text)",
        ours=(f"teleporter {tele_kw}; callback {cb_kw}; learning rates {lrs}; {epochs} epochs. " + (
            "Chosen on a validation split (20 % of the training set, SGD, seed 0, guards off): lowest final "
            "validation loss among the settings whose teleports kept the batch and held-out loss; " + "; ".join(
                f"eta {t['eta']:g} CAP {t['cap_ratio']:g} n {t['batch_size']}: val {t['val_loss']:.4f}"
                + ("" if t["admissible"] else f" (not admissible: {t['why']})") for t in sweep)
            + ("" if any(t["admissible"] for t in sweep) else "; none admissible: the default setting is kept")
            if sweep else sweep_note)),
        holds=None, criterion="reported, not judged",
        data={"teleporter": {k: v for k, v in tele_kw.items()}, "callback": dict(cb_kw), "lrs": dict(lrs),
              "sweep": list(sweep or [])},
    ))
    _plot(name, curves, out_dir)
    return rows


SWEEP_GRID = {"eta": (0.05, 0.2), "cap_ratio": (3.0, 10.0), "batch_size": (32, 128)}


def validation_split(data, fraction: float = 0.2, seed: int = 0):
    """A copy of ``data`` whose ``train`` is ``1 - fraction`` of the training set and whose ``test`` is the
    rest (the validation split); the test set is never used. Deterministic in ``seed``."""
    import dataclasses  # noqa: PLC0415

    from torch.utils.data import TensorDataset  # noqa: PLC0415

    X, Y = data.train.tensors
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(X) * fraction))
    va, tr = perm[:n_val], perm[n_val:]
    return dataclasses.replace(data, train=TensorDataset(X[tr], Y[tr]), test=TensorDataset(X[va], Y[va]))


def sweep_setting(build, data, lr: float, epochs: int, tele_kw: dict, cb_kw: dict, grid: dict = SWEEP_GRID):
    """Choose eta, CAP ratio and teleport batch size on a validation split (20 % of the training set).

    For every grid point: one SGD run (seed 0) with null-space teleport (guards off) trained on the other
    80 %. A setting is admissible only if its teleports stay teleports on that run: no failure, every
    teleport's relative batch-loss change < ``EXACT_TOL`` and held-out change within ``HELD_OUT_TOL``
    (a large eta speeds training up by changing the loss, which is not what the source claims). Among the
    admissible settings the lowest final validation loss wins; with none admissible the given setting is
    kept. Cost: ``prod(len(v) for v in grid.values())`` training runs of ``epochs`` epochs.
    Returns (teleporter kwargs, callback kwargs, table of dicts: setting, val_loss, admissible, why)."""
    import itertools  # noqa: PLC0415

    val = validation_split(data)
    table = []
    for eta, cap, bs in itertools.product(grid["eta"], grid["cap_ratio"], grid["batch_size"]):
        tk = {**tele_kw, "eta": eta, "cap_ratio": cap}
        ck = {**cb_kw, "batch_size": bs}
        tp = NullSpaceTeleport(**tk)
        cb = NullSpaceTeleportCallback(tp, seed=0, **ck)
        h = _arm(build, val, "sgd", lr, epochs, 0, cb)
        failed = sum(e["kind"] == "teleport_failed" for e in h.events)
        gains = [b.grad_norm_after / b.grad_norm_before for r in cb.results for b in r.batches]
        ex, why = judge_exactness([r.max_rel_loss_change for r in cb.results], gains, failed, teleporter_guards(tp))
        ho, hwhy = judge_held_out([r.held_out_rel_change for r in cb.results if r.held_out_rel_change is not None],
                                  teleporter_guards(tp))
        table.append({"eta": eta, "cap_ratio": cap, "batch_size": bs,
                      "val_loss": h.rows[-1].get("test_loss", float("nan")), "admissible": ex and ho,
                      "why": why if not ex else hwhy})
    ok = [t for t in table if t["admissible"] and math.isfinite(t["val_loss"])]
    if not ok:
        return dict(tele_kw), dict(cb_kw), table
    best = min(ok, key=lambda t: t["val_loss"])
    return ({**tele_kw, "eta": best["eta"], "cap_ratio": best["cap_ratio"]},
            {**cb_kw, "batch_size": best["batch_size"]}, table)


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


SWEEP_NOTE = ("The eta/CAP/batch-size sweep on a validation split is NOT done for this entry: its quick mode already "
              "takes about a minute or more on 2 cores, and a sweep multiplies the cost by the number of settings")
QUICK_SWEEP_NOTE = ("Quick mode: the eta/CAP/batch-size sweep on a validation split is NOT done (it runs in full mode "
                    "only, 8 more training runs); the default setting is used")

# every guard off: a guard would roll back the steps the exactness row is meant to catch
GUARDS_OFF = dict(max_loss_change=None, batch_loss_tol=None, held_out_tol=None, max_weight_growth=None)

LRS = {"sgd": 0.05, "momentum": 0.01, "adagrad": 0.01, "adam": 1e-3}


@register("nullspace-mlp", claim="Null-space teleport accelerates MLP training with SGD, momentum, Adagrad and Adam",
          source="seed 001 Sec. 4.1, Fig. 2 (MLP [1024, 1024] ReLU, MNIST/FashionMNIST)")
def run_mlp(quick: bool, out_dir: Path) -> list[Row]:
    width = 256 if quick else 1024
    datasets = {"digits": load_dataset("digits", form="flat")}
    if not quick:
        datasets["mnist1d"] = load_dataset("mnist1d")
    epochs = 8 if quick else 20

    def build_for(d):
        return lambda: zoo.mlp(in_features=d.input_shape[0], out_features=d.num_outputs, depth=3, width=width)

    rows = []
    for dname, d in datasets.items():
        tk = dict(eta=0.05, steps=8, tau=1.0, cap_ratio=3.0, **GUARDS_OFF)
        ck = dict(schedule=3 if quick else 5, num_batches=4 if quick else 32, batch_size=32)
        table = None
        if not quick:
            # eta, CAP and the teleport batch size chosen on a validation split (the source's Table 1 is
            # illegible); quick mode skips it to stay fast (8 more training runs)
            tk, ck, table = sweep_setting(build_for(d), d, LRS["sgd"], epochs, tk, ck)
        rows += _compare(f"nullspace-mlp[{width}x{width}]", build_for(d), {dname: d}, LRS, epochs, tk, ck,
                         out_dir / dname, quick, sweep=table, sweep_note=QUICK_SWEEP_NOTE if quick else SWEEP_NOTE)
    return rows


@register("nullspace-cnn", claim="Null-space teleport accelerates CNN training",
          source="seed 001 Sec. 4.2, Fig. 3 (CNN [3,16,32,64] + max-pool, CIFAR-10/100; 40 warm-up steps)")
def run_cnn(quick: bool, out_dir: Path) -> list[Row]:
    d = load_dataset("digits", form="image")
    lrs = {"sgd": 0.1, "momentum": 0.02, "adagrad": 0.02, "adam": 2e-3}
    return _compare("nullspace-cnn", lambda: zoo.simple_cnn(in_channels=1, num_classes=10, image_size=8),
                    {"digits-image": d}, lrs, 8 if quick else 20,
                    dict(eta=0.02, steps=8, tau=1.0, cap_ratio=1.5, **GUARDS_OFF),
                    dict(schedule=3 if quick else 5, num_batches=4 if quick else 32, batch_size=32, warmup_steps=40),
                    out_dir, quick, sweep_note=SWEEP_NOTE)


@register("nullspace-transformer", claim="Null-space teleport accelerates Transformer training",
          source="seed 001 Sec. 4.3, Fig. 4 (2-layer Transformer on sequential MNIST)")
def run_transformer(quick: bool, out_dir: Path) -> list[Row]:
    d = load_dataset("digits", form="sequence")
    lrs = {"sgd": 0.05, "momentum": 0.01, "adagrad": 0.01, "adam": 1e-3}
    return _compare("nullspace-transformer",
                    lambda: zoo.transformer(in_features=8, seq_len=8, d_model=64, nhead=2, num_layers=2, dim_ff=128),
                    {"digits-seq": d}, lrs, 6 if quick else 20,
                    dict(eta=0.02, steps=8, tau=1.0, cap_ratio=2.0, **GUARDS_OFF),
                    dict(schedule=3 if quick else 5, num_batches=2 if quick else 32, batch_size=4),
                    out_dir, quick, sweep_note=SWEEP_NOTE)


@register("nullspace-error-control",
          claim="With tau = 1 the loss stays constant during teleport steps while the gradient norm rises; smaller tau raises it faster at a growing loss error",
          source="seed 001 Sec. 4.5, Fig. 6b (Transformer on sMNIST, tau in {1, 0.999, 0.99, 0.9})")
def run_error_control(quick: bool, out_dir: Path) -> list[Row]:
    d = load_dataset("digits", form="sequence")
    X, Y = d.train.tensors
    steps = 16 if quick else 40
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
                rec = NullSpaceTeleport("cross_entropy", eta=0.01, steps=steps, tau=tau, cap_ratio=50.0,
                                        batch_loss_tol=None, held_out_tol=None, max_weight_growth=None).teleport(
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
                f"{rec.loss_after:.5f} (rel {rec.rel_loss_change:.1e}) in {rec.steps} steps, guards off")
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
            criterion=(f"guards off, up to {steps} steps per tau, compared after the same number of steps (the smaller "
                       "step count: a teleport stops at its CAP): gradient-norm gain(tau 0.99) > gain(tau 1) and the "
                       "relative teleport-batch loss change at tau 0.99 <= tolerance"),
            tolerance=ERROR_CONTROL_TOL_WHY,
            data={"gain_tau1": traces[1.0].grad_norm_after / traces[1.0].grad_norm_before,
                  "gain_tau099": traces[0.99].grad_norm_after / traces[0.99].grad_norm_before,
                  "rel_loss_change_tau099": traces[0.99].rel_loss_change,
                  "steps": [traces[1.0].steps, traces[0.99].steps],
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
