"""What the monitor measures and when: the registry :data:`PROBES` of schedulable measurements, the preset
schedules :data:`PRESETS`, and :class:`Schedule` (``"every:N"``, ``"epoch"``, ``"log"``).

Each entry of ``PROBES`` maps (model, loss_fn, batch, state) to rows ``(layer, name, value)`` by calling a pure
function of :mod:`gradcond.probes` (the quantities themselves live there; this module only adapts and schedules
them -- it was ``monitor/probes.py``, a name that hid that difference).

Probes never change parameters, gradients or BatchNorm buffers (the underlying ``gradcond.probes`` functions are
pure; ``grad_norm`` only reads the ``.grad`` left by the last optimizer step). Under DDP/FSDP2 the norm, update,
GSC, domain and distributed noise-scale probes reduce rank-local partial sums (see :mod:`gradcond.monitor.monitor`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import nn

Rows = list[tuple[str, str, float]]


def _param_layers(model: nn.Module):
    """(module name, weight) for every module owning a ``weight`` parameter of dim >= 2 (Linear, Conv, Embedding...)."""
    from ..probes.norms import weight_layers

    return weight_layers(model)


def _reduce():
    """The partial-sum reduction of a distributed measurement (identity in one process)."""
    from ..distributed import active, all_reduce_sum

    return all_reduce_sum if active() else None


def grad_norm(model, loss_fn, batch, state=None) -> Rows:
    """Per-layer ||dL/dW||_F from the gradients of the last training step (free: no extra pass). Under FSDP2 from the
    gradient shards, their sums of squares all-reduced (:func:`gradcond.probes.layer_norms`)."""
    from ..probes.norms import layer_norms

    return [(name, "grad_norm", v["grad_norm"]) for name, v in layer_norms(model).items() if "grad_norm" in v]


def weight_norm(model, loss_fn, batch, state=None) -> Rows:
    """Per-layer ||W||_F and the relative gradient size ||dW|| / ||W|| (shard-local sums under FSDP2)."""
    from ..probes.norms import layer_norms

    rows = []
    for name, v in layer_norms(model).items():
        rows.append((name, "weight_norm", v["weight_norm"]))
        if "grad_norm" in v and v["weight_norm"] > 0:
            rows.append((name, "grad_to_weight", v["grad_norm"] / v["weight_norm"]))
    return rows


def update_size(model, loss_fn, batch, state=None, before=None) -> Rows:
    """Per-layer relative update size ||W_after - W_before||_F / ||W_before||_F of the optimizer step just taken
    (shard-local sums under FSDP2). ``before``: the weights kept before the step
    (:func:`gradcond.probes.snapshot_weights`; the Monitor keeps them when the probe is due)."""
    from ..probes.norms import update_norms

    if before is None:
        raise ValueError("update_size needs the layer weights from before the optimizer step; the trainer's "
                         "on_step_start (or Monitor.before_update) keeps them.")
    return [(name, "update_to_weight", v) for name, v in update_norms(model, before).items()]


def noise_scale(model, loss_fn, batch, state=None, recorder=None, samples=0, batch_size=None) -> Rows:
    """The simple gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) with its two estimates and the
    training batch in use: from the per-sample gradient norms of the probe batch
    (:func:`gradcond.probes.gradient_noise_scale`), or, under DDP/FSDP2 with a ``recorder``
    (:class:`gradcond.probes.NoiseScaleRecorder`), from every rank's and the reduced gradient norms of the
    training steps since the last measurement (``samples``: this rank's samples in those steps)."""
    if recorder is not None:
        ns = recorder.read(samples)
    else:
        from ..probes.noise import gradient_noise_scale

        ns = gradient_noise_scale(model, loss_fn, batch)
    rows = [("", "b_simple", ns.b_simple), ("", "trace_sigma", ns.trace_sigma), ("", "grad_sq", ns.grad_sq),
            ("", "b_small", ns.b_small), ("", "b_big", ns.b_big)]
    if batch_size:
        rows.append(("", "batch_size", float(batch_size)))
    return rows


def gsc(model, loss_fn, batch, state=None) -> Rows:
    """GSC(l, 0) per measured layer (seed 003 Def. 2) and the fitted explosion rate per linear layer."""
    from ..probes.scale import gsc_profile

    prof = gsc_profile(model, loss_fn, batch, per_sample=False, reduce=_reduce())
    rows = [(layer, "gsc", float(v)) for layer, v in zip(prof.layers, prof.gsc)]
    try:
        fit = prof.fit_explosion()
        rows.append(("", "explosion_rate", fit.rate))
        rows.append(("", "explosion_fit_layers", float(fit.n_points)))  # the report's verdict states its evidence:
        rows.append(("", "explosion_r2", fit.r2))                        # points, r² and the rate's 95% interval
        if math.isfinite(fit.rate_low):
            rows += [("", "explosion_rate_low", fit.rate_low), ("", "explosion_rate_high", fit.rate_high)]
    except ValueError:
        pass  # fewer than two linear layers: no rate to fit
    return rows


def domain(model, loss_fn, batch, state=None) -> Rows:
    """Pre-activation std and sign diversity per nonlinearity (seed 003 §I.2)."""
    from ..probes.domain import domain_stats

    st = domain_stats(model, batch, reduce=_reduce())
    rows = []
    for layer, s, sd in zip(st.layers, st.std, st.sign_diversity):
        rows += [(layer, "preact_std", float(s)), (layer, "sign_diversity", float(sd))]
    return rows


def conditioning(model, loss_fn, batch, state=None) -> Rows:
    """Gradient coherence (eq. 3.26), step-consistency (eq. 2.24) and relative weight-gradient rank (Def. 3.7), from
    one shared per-sample engine (:func:`gradcond.probes.conditioning.conditioning_summary`: three forward+backward
    passes instead of seven; BatchNorm at its running statistics, ``bn="eval"``).

    Each metric is computed on its own: one that cannot be computed (e.g. a zero gradient) is left out with a
    warning instead of losing the others; only when all three fail does the probe fail.
    """
    import warnings

    from ..probes.conditioning import conditioning_summary

    res = conditioning_summary(model, loss_fn, batch, bn="eval")
    rows, errors = [], []
    for name in ("coherence", "step_consistency", "relative_rank_weight"):
        r = res[name]
        if isinstance(r, str):
            errors.append(f"{name}: {r}")
        else:
            rows.append(("", name, float(r.value)))
    if not rows:
        raise ValueError("no conditioning metric could be computed (" + "; ".join(errors) + ")")
    for e in errors:
        warnings.warn(f"conditioning probe skipped {e}", RuntimeWarning, stacklevel=2)
    return rows


def representation(model, loss_fn, batch, state=None) -> Rows:
    """Per layer (every module with a weight matrix): the stable rank ||W||_F^2 / ||W||_2^2 of its weight and the
    least-squares distance LSD = (1/m)||Y - Z Z^+ Y||^2 (bias column included, float64) from its output on the probe
    batch to the targets (seed 002, eq. 5.3; hard labels are one-hot encoded).  The forward pass runs in eval mode
    under ``no_grad`` (BatchNorm buffers untouched; the model's mode is restored).  Cost: one forward pass, one SVD
    per weight and one least-squares solve per layer."""
    import torch

    from ..probes.representation import least_squares_distance, stable_rank

    layers = list(_param_layers(model))
    mods = dict(model.named_modules())
    outs: dict[str, torch.Tensor] = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o.detach()))
             for n, _ in layers if n in mods]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch[0])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    rows = []
    for name, w in layers:
        rows.append((name, "stable_rank", stable_rank(w)))
        if name in outs and isinstance(outs[name], torch.Tensor) and outs[name].shape[0] == len(batch[1]):
            rows.append((name, "lsd", least_squares_distance(outs[name].double(), batch[1], bias=True)))
    return rows


PROBES: dict[str, Callable] = {
    "grad_norm": grad_norm,
    "weight_norm": weight_norm,
    "gsc": gsc,
    "domain": domain,
    "conditioning": conditioning,
    "representation": representation,
    "update_size": update_size,
    "noise_scale": noise_scale,
}


@dataclass
class Schedule:
    """When a probe runs: ``every`` N optimizer steps, at ``epoch`` ends, or at log-spaced steps (1, 2, 4, ...)."""

    kind: str  # "every" | "epoch" | "log"
    n: int = 1

    @classmethod
    def parse(cls, text) -> "Schedule":
        if isinstance(text, Schedule):
            return text
        s = str(text).strip()
        if s == "epoch":
            return cls("epoch")
        if s in ("log", "logspaced"):
            return cls("log")
        if s.startswith("every:") or s.isdigit():
            n = int(s.split(":")[-1])
            if n < 1:
                raise ValueError(f"probe schedule every:N needs N >= 1, got {s!r}.")
            return cls("every", n)
        raise ValueError(f"unknown probe schedule {text!r}; accepted: every:N, epoch, log.")

    def due_at_step(self, step: int) -> bool:
        if self.kind == "every":
            return step % self.n == 0
        if self.kind == "log":
            return step > 0 and (step & (step - 1)) == 0
        return False


# the monitor presets (probe -> schedule); "default" keeps the overhead small, "full" measures everything often
PRESETS = {
    "default": {"grad_norm": "every:5", "weight_norm": "epoch", "gsc": "epoch", "domain": "epoch", "conditioning": "epoch"},
    "full": {"grad_norm": "every:1", "weight_norm": "every:5", "gsc": "every:5", "domain": "every:5",
             "conditioning": "every:10", "update_size": "every:5", "noise_scale": "every:10"},
    "off": {},
}


def is_finite_rows(rows: Rows) -> bool:
    return all(math.isfinite(v) or math.isnan(v) for _, _, v in rows)


