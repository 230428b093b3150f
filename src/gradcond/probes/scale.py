"""Gradient Scale Coefficient (GSC) of seed 003 (Philipp, Song & Carbonell, "Gradients explode").

Definitions (notes/003 §1.2-1.4, with the errata applied):

* qm norm (Def. 1): ``||A||_qm = ||A||_F / sqrt(n)`` for an m x n matrix (n = input dimension).
* GSC (Def. 2, **unsquared** form, which Props. 2/4/5 and protocol I.2 use):
  ``GSC(k, l) = ||J_k^l||_qm * ||f_k||_2 / ||f_l||_2`` with ``J_k^l = df_l / df_k``; f_0 is the error.
* Dataset aggregate (I.2): a ratio of quadratic expectations ``Q_D||J_l^0||_qm * Q_D||f_l|| / Q_D|f_0|`` with
  ``Q[X] = E[X^2]^(1/2)``, **not** the mean of per-sample ratios (which are heavy-tailed when f_0 ~ 0).

Decisions (source ambiguous):

* f_0 is the per-sample error value ``loss_fn`` returns on a batch of one (vmap); only |f_0| enters the GSC, so
  the sign convention (error vs. loss) does not matter.
* The backward pass differentiates the *sum* of per-sample errors. Without batch coupling this gives every
  sample's own gradient exactly. With BatchNorm in train mode the samples of a batch are coupled; the gradient
  row of sample i then includes the cross-sample BN terms (d sum_j f_0,j / d f_l,i) -- the "summed error"
  implementation of seed 003's noise experiments (all 10,000 points in one BN batch). Pass the data as one
  batch to reproduce that protocol; with several batches each is normalised on its own and the Q's aggregate
  over all samples.
* Layers are indexed for the explosion fit by ``linear_index`` = the number of linear layers (Linear/Conv/...)
  that are applied *after* the layer's output, i.e. between f_l and the error (0 for the prediction layer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from ..losses import get_loss
from ..utils import accepts_model_output, as_batches
from . import _hooks as H

__all__ = ["GSCProfile", "ExplosionFit", "GSCEstimate", "gsc_profile", "gsc", "gsc_verdict"]


@dataclass
class ExplosionFit:
    """Least-squares fit ``log GSC(l, 0) = log c + linear_index * log r`` (seed 003 Def. 3)."""

    rate: float  # r: per-linear-layer growth factor
    intercept: float  # c
    r2: float  # coefficient of determination of the log-linear fit
    n_points: int
    kinds: tuple = ("linear",)
    # 95% confidence interval of r (from the slope's standard error, Student t with n - 2 degrees of freedom);
    # NaN with fewer than 3 points (a line through 2 points has no error estimate)
    rate_low: float = float("nan")
    rate_high: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)

    def verdict(self) -> tuple[str | None, str]:
        """:func:`gsc_verdict` of this fit."""
        return gsc_verdict(self.rate, self.n_points, self.rate_low, self.rate_high, self.r2)


# Evidence thresholds of a GSC verdict (gradcond diagnose and the run report): a rate per linear layer above
# EXPLODE_RATE explodes, below VANISH_RATE vanishes; a verdict needs a fit through at least MIN_FIT_LAYERS layers
# and a 95% interval of the rate that lies entirely on one side (or, for "stable", entirely inside the band).
EXPLODE_RATE, VANISH_RATE, MIN_FIT_LAYERS = 1.05, 0.95, 3


def gsc_verdict(rate, n_points, rate_low=float("nan"), rate_high=float("nan"), r2=None) -> tuple[str | None, str]:
    """(verdict or None, sentence stating its evidence) for a fitted GSC explosion rate per linear layer.

    ``exploding`` when the whole 95% interval of the rate is above :data:`EXPLODE_RATE`, ``vanishing`` when it is
    below :data:`VANISH_RATE`, ``stable`` when it lies inside the band; otherwise -- fewer than
    :data:`MIN_FIT_LAYERS` points, no interval, or an interval that straddles a threshold -- no verdict and a
    sentence starting "not enough evidence". The goodness of fit (r²) is stated, not used: a flat profile (rate 1)
    has r² near 0 by construction, so r² cannot tell a stable profile from a noisy one; the interval can."""
    def ok(v):
        return isinstance(v, (int, float)) and math.isfinite(v)

    if not ok(rate):
        return None, "no explosion rate could be fitted (fewer than 2 measured linear layers, or non-finite GSC)"
    if n_points is None:
        return None, (f"not enough evidence: a rate of {rate:.2f} per linear layer was fitted, but the number of "
                      "layers the fit used is not recorded")
    n = int(n_points)
    basis = f"fit through {n} layers" + (f", r² = {r2:.2f}" if ok(r2) else "")
    if n < MIN_FIT_LAYERS:
        return None, (f"not enough evidence: the explosion-rate fit goes through only {n} layers ({rate:.2f} per "
                      f"linear layer; at least {MIN_FIT_LAYERS} are needed)")
    if not (ok(rate_low) and ok(rate_high)):
        return None, (f"not enough evidence: a rate of {rate:.2f} per linear layer ({basis}) without a recorded "
                      "confidence interval")
    ci = f"95% interval [{rate_low:.2f}, {rate_high:.2f}]"
    if rate_low > EXPLODE_RATE:
        return "exploding", (f"gradients explode: the GSC grows by a factor {rate:.2f} per linear layer towards the "
                             f"input ({ci}; {basis})")
    if rate_high < VANISH_RATE:
        return "vanishing", (f"gradients vanish: the GSC shrinks by a factor {rate:.2f} per linear layer towards the "
                             f"input ({ci}; {basis})")
    if rate_low >= VANISH_RATE and rate_high <= EXPLODE_RATE:
        return "stable", f"the gradient scale is stable across depth: {rate:.2f} per linear layer ({ci}; {basis})"
    return None, (f"not enough evidence for a verdict on exploding or vanishing gradients: {rate:.2f} per linear "
                  f"layer, {ci} ({basis}) reaches beyond the band [{VANISH_RATE}, {EXPLODE_RATE}] of a stable scale "
                  "on one side and into it on the other")


@dataclass
class GSCProfile:
    """GSC(l, 0) at every measured layer, in forward order (the first entry is the lowest layer, f_L).

    Fields: ``layers`` (names), ``kinds`` (linear/norm/act/other), ``linear_index`` (linear layers above the
    layer), ``dims`` (d_l), ``gsc`` (dataset aggregate), ``q_grad`` (Q_D||df0/df_l||_2), ``q_act`` (Q_D||f_l||_2),
    ``q_loss`` (Q_D|f_0|), ``n_samples``, ``training`` (mode of the model), and per-sample arrays ``grad_norms``,
    ``act_norms`` (N x layers) and ``loss_values`` (N) when ``per_sample=True``.
    """

    layers: list
    kinds: list
    linear_index: list
    dims: list
    gsc: list
    q_grad: list
    q_act: list
    q_loss: float
    n_samples: int
    training: bool
    grad_norms: np.ndarray | None = field(default=None, repr=False)
    act_norms: np.ndarray | None = field(default=None, repr=False)
    loss_values: np.ndarray | None = field(default=None, repr=False)

    @property
    def lowest(self) -> float:
        """GSC(L, 0): the value at the first measured layer (the lowest, e.g. the first linear layer)."""
        return self.gsc[0]

    def __getitem__(self, name: str) -> float:
        try:
            return self.gsc[self.layers.index(name)]
        except ValueError:
            raise KeyError(f"no measured layer {name!r}; layers: {', '.join(self.layers[:8])}...") from None

    def per_sample(self) -> np.ndarray:
        """Per-sample GSC(l, 0) = ||g_l||/sqrt(d_l) * ||f_l|| / |f_0| (N x layers); inf/NaN where f_0 = 0."""
        if self.grad_norms is None:
            raise ValueError("per-sample values were not kept; call gsc_profile(..., per_sample=True).")
        d = np.sqrt(np.asarray(self.dims, dtype=np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.grad_norms / d * self.act_norms / np.abs(self.loss_values)[:, None]

    def fit_explosion(self, kinds=("linear",)) -> ExplosionFit:
        """Fit log GSC(l, 0) against ``linear_index`` over the layers of the given kinds (``"all"`` for every
        measured layer). Returns rate r = exp(slope) and intercept c = exp(offset); layers with a non-finite or
        non-positive GSC are skipped. Needs >= 2 distinct linear indices."""
        sel = [i for i, k in enumerate(self.kinds) if kinds == "all" or k in tuple(kinds)]
        xs = np.array([self.linear_index[i] for i in sel], dtype=np.float64)
        ys = np.array([self.gsc[i] for i in sel], dtype=np.float64)
        ok = np.isfinite(ys) & (ys > 0)
        xs, ys = xs[ok], np.log(ys[ok])
        if len(np.unique(xs)) < 2:
            raise ValueError(f"need >= 2 layers of kinds {kinds} at distinct linear indices to fit an explosion rate, "
                             f"got {len(np.unique(xs))}.")
        # least-squares line in closed form (what np.polyfit(xs, ys, 1) computes, without its SVD machinery)
        xm, ym = xs.mean(), ys.mean()
        slope = float(((xs - xm) * (ys - ym)).sum() / ((xs - xm) ** 2).sum())
        off = float(ym - slope * xm)
        pred = off + slope * xs
        ss = float(((ys - ys.mean()) ** 2).sum())
        sse = float(((ys - pred) ** 2).sum())
        r2 = 1.0 - sse / ss if ss > 0 else 1.0
        n = len(xs)
        low = high = float("nan")
        if n >= 3:  # the slope's standard error and a Student-t 95% interval (n - 2 degrees of freedom)
            from scipy.stats import t as student_t

            se = math.sqrt(sse / (n - 2) / float(((xs - xs.mean()) ** 2).sum()))
            half = float(student_t.ppf(0.975, n - 2)) * se
            low, high = math.exp(slope - half), math.exp(slope + half)
        return ExplosionFit(float(math.exp(slope)), float(math.exp(off)), r2, int(n),
                            tuple(kinds) if kinds != "all" else ("all",), low, high)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("grad_norms", "act_norms", "loss_values")}
        d["lowest"] = self.lowest
        return d

    def to_frame(self) -> list[dict]:
        """One dict per layer (pandas is not a dependency; ``pandas.DataFrame(profile.to_frame())`` works)."""
        return [
            {"layer": n, "kind": k, "linear_index": li, "dim": d, "gsc": g, "q_grad": qg, "q_act": qa}
            for n, k, li, d, g, qg, qa in zip(self.layers, self.kinds, self.linear_index, self.dims, self.gsc,
                                               self.q_grad, self.q_act)
        ]

    def plot(self, ax=None, label: str | None = None):
        """log-scale GSC(l, 0) against the measured layer position (forward order); returns the Figure."""
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(6, 3.5))
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        ax.semilogy(range(len(self.gsc)), self.gsc, "-", lw=1, label=label)
        ax.set_xlabel("measured layer (forward order)")
        ax.set_ylabel("GSC(l, 0)")
        if label:
            ax.legend()
        return fig


def _accumulate(calls, acc, keep, per):
    for c in calls:
        if c.grad_norm is None:
            raise ValueError(f"layer {c.name!r} is not on the gradient path from the input to the loss "
                             f"(its output received no gradient).")
        a = acc.setdefault(c.name, {"kind": c.kind, "dim": c.dim, "li": c.linear_after, "g2": 0.0, "a2": 0.0})
        a["g2"] += float((c.grad_norm ** 2).sum())
        a["a2"] += float((c.act_norm ** 2).sum())
        if keep:
            per.setdefault(c.name, ([], []))
            per[c.name][0].append(c.grad_norm.cpu().numpy())
            per[c.name][1].append(c.act_norm.cpu().numpy())


@accepts_model_output
def gsc_profile(model: nn.Module, loss_fn, data, layers=None, *, per_sample: bool = True, reduce=None) -> GSCProfile:
    """GSC(l, 0) at every measured layer (seed 003 Def. 2, unsquared; dataset aggregate of protocol I.2).

    ``loss_fn``: a loss name (``"dot"`` for the noise protocol, ``"cross_entropy"``, ``"mse"``) or a callable
    ``(output, target) -> scalar``. ``data``: ``(x, y)``, a TensorDataset or an iterable of batches.
    ``layers``: None (every Linear/Conv, normalisation and activation, forward order) or module names.

    Cost: per batch one forward and one backward pass (only activation gradients; no weight gradients), plus one
    vmapped loss evaluation; memory is that of a training step. The model's mode is used as it is (BatchNorm in
    train mode normalises with batch statistics: pass the data as one batch); no buffer, parameter or ``.grad``
    is changed. A layer whose activations are all zero, or a dataset whose errors are all zero, has an undefined
    GSC: its value is NaN and a RuntimeWarning names it.

    ``reduce`` (distributed measurement, issue 24): a function that sums a float64 tensor over the ranks, e.g.
    :func:`gradcond.distributed.all_reduce_sum`. Each rank passes its own slice of the data; the partial sums
    (Σ||df0/df_l||², Σ||f_l||², Σ f_0², sample count) are reduced once and every rank returns the profile of the
    union of the slices, equal to the single-process profile of the whole data up to float rounding. The per-sample
    arrays (``per_sample=True``) then hold this rank's samples only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    loss = get_loss(loss_fn)
    mods, wanted = H.select_layers(model, layers)
    acc: dict = {}
    per: dict = {}
    losses, order = [], None
    n = 0
    with H.measurement(model), H.Recorder(model, mods, wanted) as rec:
        for batch in as_batches(data, targets=False):
            if len(batch) < 2:
                raise ValueError("gsc_profile needs targets: pass data as (x, y).")
            x, y = batch[0], batch[1]
            rec.reset()
            rec.batch_size = int(x.shape[0])
            xi = H.prepare_input(x)
            out = model(xi)
            if not torch.is_tensor(out):
                raise TypeError(f"the model must return a tensor, got {type(out).__name__}.")
            ell, _ = H.per_sample_losses(loss, out, y)
            calls = rec.finish()
            H.check_names(calls, wanted)
            if not calls:
                raise ValueError("no measured layer was called in the forward pass.")
            names = [c.name for c in calls]
            if order is None:
                order = names
            elif names != order:
                raise ValueError("the measured layers differ between batches; GSC aggregates need a fixed graph.")
            targets = [xi] if xi.requires_grad else [c.value for c in calls if c.value is not None]
            if not ell.requires_grad:
                raise ValueError("the loss does not depend on the model output through autograd.")
            if xi.requires_grad:
                torch.autograd.grad(ell.sum(), [xi], allow_unused=True)
            else:  # integer inputs: drive the backward through every parameter instead
                params = [p for p in model.parameters() if p.requires_grad]
                torch.autograd.grad(ell.sum(), params, allow_unused=True)
            del targets
            _accumulate(calls, acc, per_sample, per)
            losses.append(ell.detach().double().cpu().numpy())
            n += int(ell.shape[0])
    loss_vals = np.concatenate(losses)
    l2 = float(np.sum(loss_vals ** 2))
    if reduce is not None:  # one all-reduce of the partial sums, in the (identical) forward order of the layers
        packed = torch.tensor([v for k in order for v in (acc[k]["g2"], acc[k]["a2"])] + [l2, float(n)],
                              dtype=torch.float64)
        packed = reduce(packed).tolist()
        for i, k in enumerate(order):
            acc[k]["g2"], acc[k]["a2"] = packed[2 * i], packed[2 * i + 1]
        l2, n = packed[-2], int(round(packed[-1]))
    q_loss = float(np.sqrt(l2 / n))
    gsc_vals, q_grad, q_act = [], [], []
    for name in order:
        a = acc[name]
        qg, qa = math.sqrt(a["g2"] / n), math.sqrt(a["a2"] / n)
        q_grad.append(qg)
        q_act.append(qa)
        if qa == 0.0 or q_loss == 0.0:
            H.nan_warning(f"GSC undefined at layer {name!r}: " + ("all its activations are zero." if qa == 0.0
                                                                    else "the error f_0 is zero on every sample."))
            gsc_vals.append(float("nan"))
        else:
            gsc_vals.append(qg / math.sqrt(a["dim"]) * qa / q_loss)
    prof = GSCProfile(
        layers=list(order), kinds=[acc[k]["kind"] for k in order], linear_index=[acc[k]["li"] for k in order],
        dims=[acc[k]["dim"] for k in order], gsc=gsc_vals, q_grad=q_grad, q_act=q_act, q_loss=q_loss, n_samples=n,
        training=bool(model.training),
    )
    if per_sample:
        prof.grad_norms = np.stack([np.concatenate(per[k][0]) for k in order], 1)
        prof.act_norms = np.stack([np.concatenate(per[k][1]) for k in order], 1)
        prof.loss_values = loss_vals
    return prof


# ----------------------------------------------------------------------------------------------- GSC(k, l)


@dataclass
class GSCEstimate:
    """GSC(k, l) between two measured layers (k below l) with its standard error.

    ``value`` = Q_D||J_k^l||_qm * Q_D||f_k|| / Q_D||f_l||; ``q_jac_qm`` = Q_D||J_k^l||_qm; ``stderr`` is the
    standard error of ``value`` over probe vectors (delta method; 0 for ``mode="exact"`` and for l = the loss).
    """

    k: str
    l: str
    value: float
    stderr: float
    q_jac_qm: float
    q_act_k: float
    q_act_l: float
    dim_k: int
    dim_l: int
    probes: int
    mode: str
    n_samples: int

    def to_dict(self) -> dict:
        return asdict(self)

    def to_frame(self) -> list[dict]:
        return [self.to_dict()]

    def plot(self, ax=None):
        """Bar with a 2-standard-error whisker; returns the Figure."""
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(3, 3))
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        ax.bar([0], [self.value], yerr=[2 * self.stderr], capsize=4)
        ax.set_xticks([0], [f"GSC({self.k}, {self.l})"])
        return fig


def gsc(model: nn.Module, loss_fn, data, k: str, l: str | None = None, probes: int = 32, mode: str = "vjp",
        seed: int = 0) -> GSCEstimate:
    """GSC(k, l) between measured layers ``k`` (lower, nearer the input) and ``l`` (higher; None or ``"loss"``
    for the error f_0), with a Hutchinson estimate of ``||J_k^l||_F^2`` (notes/003 §1.4 "Cost"):

    * ``mode="vjp"``: ``E_v ||v^T J||^2 = ||J||_F^2`` with ``v ~ N(0, I_{d_l})``; one backward from f_l to f_k per
      probe (one forward in all).
    * ``mode="jvp"``: ``E_u ||J u||^2 = ||J||_F^2`` with ``u ~ N(0, I_{d_k})``; one ``torch.func.jvp`` forward per
      probe through the map f_k -> f_l (f_k replaced by a hook).
    * ``mode="exact"``: d_l VJPs with the basis vectors (exact Frobenius norm; for checks and small layers).

    Per sample, ``J`` is the Jacobian of sample i's f_l w.r.t. sample i's f_k. With batch coupling (BatchNorm in
    train mode) the VJP of a batch of probe rows returns for sample i the sum over j of v_j^T J_ji, so the
    estimate is ``sum_j ||J_ji||_F^2`` (every output's sensitivity to sample i), consistent with gsc_profile's
    summed-error backward. The dataset aggregate is the ratio of Q's of gsc_profile. ``loss_fn`` is only used
    when l is the loss (exact, one backward). Standard error: over probes, propagated through the square root.
    """
    if mode not in ("vjp", "jvp", "exact"):
        raise ValueError(f"unknown mode {mode!r}; accepted: vjp, jvp, exact.")
    if not isinstance(probes, int) or probes < 2:
        raise ValueError(f"probes must be an integer >= 2, got {probes!r}.")
    to_loss = l is None or l == "loss"
    names = [k] if to_loss else [k, l]
    mods, wanted = H.select_layers(model, names)
    gen = torch.Generator().manual_seed(seed)
    stats = {"m": np.zeros(probes), "ak": 0.0, "al": 0.0, "n": 0}
    dk = dl = 0
    with H.measurement(model), H.Recorder(model, mods, wanted, norms=True, keep=True) as rec:
        for batch in as_batches(data, targets=False):
            x = batch[0]
            rec.reset()
            rec.batch_size = int(x.shape[0])
            xi = H.prepare_input(x)
            out = model(xi)
            calls = {c.name: c for c in rec.finish()}
            H.check_names(list(calls.values()), wanted)
            ck = calls[k]
            fk = ck.value
            dk = ck.dim
            stats["ak"] += float((ck.act_norm ** 2).sum())
            b = fk.shape[0]
            stats["n"] += b
            if to_loss:
                if len(batch) < 2:
                    raise ValueError("GSC to the loss needs targets: pass data as (x, y).")
                ell, _ = H.per_sample_losses(get_loss(loss_fn), out, batch[1])
                (g,) = torch.autograd.grad(ell.sum(), [fk])
                sq = g.reshape(b, -1).pow(2).sum(1).double()
                stats["m"] += float(sq.sum())
                stats["al"] += float((ell.detach().double() ** 2).sum())
                dl = 1
                continue
            cl = calls[l]
            if cl.linear_seq < ck.linear_seq or list(calls).index(l) < list(calls).index(k):
                raise ValueError(f"layer k={k!r} must come before l={l!r} in forward order (k is the lower layer).")
            fl = cl.value
            dl = cl.dim
            stats["al"] += float((cl.act_norm ** 2).sum())
            if not fl.requires_grad or not fk.requires_grad:
                raise ValueError(f"layer {l!r} does not depend on layer {k!r} through autograd.")
            if mode == "exact":
                tot = 0.0
                flat = fl.reshape(b, -1)
                for j in range(dl):
                    v = torch.zeros_like(flat)
                    v[:, j] = 1.0
                    (gk,) = torch.autograd.grad(flat, [fk], v, retain_graph=True, allow_unused=True)
                    if gk is not None:
                        tot += float(gk.double().pow(2).sum())
                stats["m"] += tot
            elif mode == "vjp":
                for p in range(probes):
                    v = torch.randn(fl.shape, generator=gen, dtype=fl.dtype).to(fl.device)  # CPU draw: same on any device
                    (gk,) = torch.autograd.grad(fl, [fk], v, retain_graph=True, allow_unused=True)
                    stats["m"][p] += 0.0 if gk is None else float(gk.double().pow(2).sum())
            else:
                z0 = fk.detach()

                def f(z, xi=xi):
                    rec_inner.replace[k] = z
                    rec_inner.reset()
                    model(xi.detach())
                    got = {c.name: c for c in rec_inner.calls}
                    return got[l].value

                rec.__exit__(None, None, None)  # the outer hooks must not fire inside the JVP forwards
                try:
                    with H.Recorder(model, mods, wanted, norms=False, keep=True) as rec_inner:
                        rec_inner.batch_size = int(x.shape[0])
                        for p in range(probes):
                            u = torch.randn(z0.shape, generator=gen, dtype=z0.dtype).to(z0.device)
                            _, ju = torch.func.jvp(f, (z0,), (u,))
                            stats["m"][p] += float(ju.detach().double().pow(2).sum())
                finally:
                    rec.__enter__()
            del fk, fl
    n = stats["n"]
    if to_loss or mode == "exact":
        m_mean, m_se, used = float(stats["m"][0] / n), 0.0, 0  # exact: every entry holds the same total
    else:
        m = stats["m"] / n
        m_mean, m_se, used = float(m.mean()), float(m.std(ddof=1) / math.sqrt(probes)), probes
    q_jac = math.sqrt(m_mean / dk)
    qa_k, qa_l = math.sqrt(stats["ak"] / n), math.sqrt(stats["al"] / n)
    if qa_k == 0.0 or qa_l == 0.0:
        H.nan_warning(f"GSC({k}, {l or 'loss'}) undefined: " + (f"layer {k!r} has all-zero activations."
                                                                if qa_k == 0 else f"{l or 'the loss'} is zero."))
        value = se = float("nan")
    else:
        value = q_jac * qa_k / qa_l
        se = value * m_se / (2 * m_mean) if m_mean > 0 else 0.0
    return GSCEstimate(k, "loss" if to_loss else l, value, se, q_jac, qa_k, qa_l, dk, dl, used,
                       "exact" if to_loss else mode, n)
