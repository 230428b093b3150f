"""Shared machinery of the loss-level-set teleports: the null-space teleport and the symmetry teleport (issue 4).

Both move the weights along the level set of the loss on their teleport batches (to first order, or exactly for a
symmetry action), so they share everything around their update rule: the safety guards (:class:`TeleportGuards`),
the result records (:class:`BatchRecord`, :class:`TeleportResult`), the pre-teleport :class:`Snapshot` and its
bit-identical restore, the "teleport mode" context (dropout off, buffers protected, math attention kernel), the
optimizer-state policy (:func:`apply_optimizer_state`), the batch-sampling helpers of the callback and the driver
loop :func:`run_teleport`.  Everything here is public API of the two teleports (it used to be the private module
``_ns_common``).

The exceptions are in :mod:`gradcond.teleport.errors` (re-exported here); loss names are resolved by
:func:`gradcond.losses.get_loss` and batches normalised by :func:`gradcond.utils.as_batches`, like everywhere else.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
import time
from typing import Any, Callable, Iterable, Sequence


import torch
from torch import nn

from .errors import GUARD_REASONS, TeleportError, TeleportRejected

__all__ = [
    "TeleportError",
    "TeleportRejected",
    "TeleportGuards",
    "GUARD_REASONS",
    "BatchRecord",
    "TeleportResult",
    "teleport_mode",
    "Snapshot",
    "apply_optimizer_state",
    "OPTIMIZER_STATE_POLICIES",
    "finite",
    "sample_batches",
    "split_held_out",
    "eval_loss",
    "run_teleport",
    "check_ascent_options",
]

OPTIMIZER_STATE_POLICIES = ("keep", "reset")


@dataclass(frozen=True)
class TeleportGuards:
    """Safety limits checked after every teleport batch (all on by default; ``None`` disables one,
    and so does ``False``, for TOML configs: ``[[callbacks]] ... held_out_tol = false``).

    * ``batch_loss_tol`` (default 1e-3): largest allowed relative change
      ``|L_after - L_before| / |L_before|`` of the loss *on the teleport batch itself*. With
      ``tau = 1`` (null space) or an exact symmetry action the change is rounding only
      (< 1e-4 in float32), so 1e-3 trips only on a runaway ascent; ``tau < 1`` or the
      ``first_order`` symmetry action change the loss by design and may need a larger value.
    * ``held_out_tol`` (default 0.05): largest allowed relative *rise* of the loss on the held-out
      batch (``held_out=``, a batch the teleport does not move on) since the start of the
      teleport. Both teleports keep the function only on their teleport batches; this catches a
      move that changes it elsewhere. Only checked when a held-out batch is given.
    * ``max_weight_growth`` (default 4.0): largest allowed ratio ``||theta_l|| / ||theta_l^0||``
      of each moved layer's parameters (weight and bias together) to their norm at the start of
      the teleport (a layer whose start norm is 0 trips on any growth). A runaway ascent grows
      weights by orders of magnitude (~1e16 in issue 20); sane teleports in the tests grow a layer
      by up to ~2.2x (8 steps, gradient norm x4, on a small Transformer head), hence 4.
    * non-finite loss, gradient, parameter or held-out loss: always a trip (cannot be disabled).

    What a trip does (``run_teleport``): the parameters are copied back to their values before
    the batch that tripped and the teleport stops there, keeping the earlier batches (each of
    which passed every guard). If the *first* batch trips, nothing is kept: model and optimizer
    are restored bit-identically and ``TeleportRejected`` (``TeleportError`` for non-finite
    values) is raised with the reason.

    Cost: one copy of the moved parameters and one norm per moved layer per batch, one
    forward pass over the held-out batch per teleport batch plus one before the first (no
    backward); the teleport-batch losses are computed by the algorithms anyway.
    """

    batch_loss_tol: float | None = 1e-3
    held_out_tol: float | None = 0.05
    max_weight_growth: float | None = 4.0

    def __post_init__(self):
        for name in ("batch_loss_tol", "held_out_tol", "max_weight_growth"):
            if getattr(self, name) is False:  # TOML configs have no null: ``false`` switches a guard off
                object.__setattr__(self, name, None)
        for name in ("batch_loss_tol", "held_out_tol"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and float(v) > 0 and math.isfinite(float(v))):
                raise ValueError(f"{name} must be a positive finite number or None (guard off), got {v!r}")
        v = self.max_weight_growth
        if v is not None and not (isinstance(v, (int, float)) and float(v) > 1 and math.isfinite(float(v))):
            raise ValueError(f"max_weight_growth must be a finite number > 1 or None (guard off), got {v!r}")


@dataclass
class BatchRecord:
    """What one teleport batch did (all losses measured on that batch, in teleport mode)."""

    loss_before: float
    loss_after: float
    grad_norm_before: float
    grad_norm_after: float
    steps: int
    capped: bool
    ranks: dict[str, int] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    loss_trace: list[float] = field(default_factory=list)  # batch loss before each step, then after the last
    grad_norm_trace: list[float] = field(default_factory=list)  # same points, primary gradient norm
    reverted: bool = False  # the last step was undone by the max_loss_change guard
    backtracks: int = 0  # step halvings of the symmetry teleport's step-size control (max_step_change)

    @property
    def rel_loss_change(self) -> float:
        return abs(self.loss_after - self.loss_before) / max(abs(self.loss_before), 1e-30)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rel_loss_change"] = self.rel_loss_change
        return d


@dataclass
class TeleportResult:
    """One teleport (a schedule point): the records of its ``b`` batches plus held-out numbers."""

    method: str
    batches: list[BatchRecord]
    held_out_before: float | None = None
    held_out_after: float | None = None
    time_s: float = 0.0
    optimizer_state: str = "keep"
    stopped_by: str | None = None  # guard reason that undid a batch and ended the teleport early
    stop_message: str | None = None  # the guard's sentence with the measured values

    @property
    def max_rel_loss_change(self) -> float:
        return max((b.rel_loss_change for b in self.batches), default=0.0)

    @property
    def grad_norm_before(self) -> float:
        return self.batches[0].grad_norm_before if self.batches else float("nan")

    @property
    def grad_norm_after(self) -> float:
        return self.batches[-1].grad_norm_after if self.batches else float("nan")

    @property
    def held_out_rel_change(self) -> float | None:
        if self.held_out_before is None or self.held_out_after is None:
            return None
        return (self.held_out_after - self.held_out_before) / max(abs(self.held_out_before), 1e-30)

    def summary(self) -> dict[str, Any]:
        """Flat fields for a trainer event (JSON-serialisable)."""
        ranks: dict[str, list[int]] = {}
        for b in self.batches:
            for k, v in b.ranks.items():
                ranks.setdefault(k, []).append(v)
        skipped = sorted({s for b in self.batches for s in b.skipped})
        return {
            "method": self.method,
            "batches": len(self.batches),
            "steps": sum(b.steps for b in self.batches),
            "loss_before": [b.loss_before for b in self.batches],
            "loss_after": [b.loss_after for b in self.batches],
            "max_rel_loss_change": self.max_rel_loss_change,
            "grad_norm_before": [b.grad_norm_before for b in self.batches],
            "grad_norm_after": [b.grad_norm_after for b in self.batches],
            "held_out_loss_before": self.held_out_before,
            "held_out_loss_after": self.held_out_after,
            "rank_kept": {k: min(v) for k, v in ranks.items()},
            "rank_kept_max": {k: max(v) for k, v in ranks.items()},
            "input_dim": dict(self.batches[0].dims) if self.batches else {},
            "skipped_layers": skipped,
            "reverted_batches": sum(b.reverted for b in self.batches),
            "time_s": self.time_s,
            "optimizer_state": self.optimizer_state,
            "stopped_by": self.stopped_by,
            "stop_message": self.stop_message,
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d["records"] = [b.to_dict() for b in self.batches]
        return d


@contextmanager
def teleport_mode(model: nn.Module):
    """Deterministic forward passes that leave the model's buffers untouched.

    Dropout modules are put in eval mode and MultiheadAttention's internal dropout is set to 0;
    every buffer (BatchNorm running statistics, counters) is restored bit-identically on exit;
    scaled-dot-product attention is restricted to the math kernel (double-differentiable).
    BatchNorm layers otherwise keep their mode (train mode normalises with batch statistics,
    which a null-space move preserves on the teleport batch).
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flips = []
    mha_drop = []
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training:
            flips.append(m)
            m.eval()
        if isinstance(m, nn.MultiheadAttention):
            mha_drop.append((m, m.dropout))
            m.dropout = 0.0
    try:
        # double backward through attention needs the math SDPA kernel (the fused CPU/GPU
        # kernels have no second derivative)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for m in flips:
            m.train()
        for m, p in mha_drop:
            m.dropout = p
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)


class Snapshot:
    """Bit-exact copy of a model's and optimizer's state, restorable in place."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model = model
        self.optimizer = optimizer
        self.params = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
        self.opt_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None

    def restore(self) -> None:
        with torch.no_grad():
            sd = self.model.state_dict(keep_vars=True)
            for k, v in self.params.items():
                sd[k].copy_(v)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self.opt_state))


def apply_optimizer_state(
    optimizer: torch.optim.Optimizer | None, params: Iterable[torch.Tensor], policy: str
) -> None:
    """Apply the optimizer-state policy to the parameters a teleport moved.

    ``"keep"``: leave every buffer (momentum, Adagrad sums, Adam moments, step counts) as it is;
    the optimizer continues as if the parameters had been moved by an outside hand.
    ``"reset"``: make the moved parameters' state equal to that of a freshly built optimizer
    (SGD momentum buffer dropped, Adam/AdamW moments and step dropped, Adagrad sum refilled
    with ``initial_accumulator_value`` and step set to 0). Other parameters keep their state.
    No exact transport exists for either teleport (the null-space move is not a group action;
    the symmetry action is non-linear in the lower layer), so none is offered.
    """
    if policy not in OPTIMIZER_STATE_POLICIES:
        raise ValueError(
            f"optimizer_state must be one of {OPTIMIZER_STATE_POLICIES}, got {policy!r}"
        )
    if optimizer is None or policy == "keep":
        return
    moved = {id(p) for p in params}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in moved or p not in optimizer.state:
                continue
            if isinstance(optimizer, torch.optim.Adagrad):
                st = optimizer.state[p]
                st["sum"] = torch.full_like(p, group["initial_accumulator_value"])
                st["step"] = torch.zeros_like(st["step"]) if torch.is_tensor(st.get("step")) else 0.0
            else:
                del optimizer.state[p]


def finite(*xs: torch.Tensor | float) -> bool:
    """True when every value is finite. For tensors the *sum* is tested: NaN/inf entries make
    the sum non-finite, and an overflowing sum is reported as non-finite too (conservative);
    this costs one reduction instead of an elementwise mask."""
    for x in xs:
        if torch.is_tensor(x):
            if not math.isfinite(float(x.detach().sum())):
                return False
        elif not math.isfinite(float(x)):
            return False
    return True


def _take(dataset, idx: torch.Tensor) -> tuple:
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return tuple(t[idx] for t in tensors[:2])
    items = [dataset[int(i)] for i in idx]
    return (torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items]))


def sample_batches(dataset, num: int, size: int, generator: torch.Generator,
                   pool: torch.Tensor | None = None) -> list[tuple]:
    """``num`` random batches of ``size`` samples (no repeats inside a batch) from a
    TensorDataset-like dataset, drawn from the indices ``pool`` (default: all samples)."""
    pool = torch.arange(len(dataset)) if pool is None else pool
    n = len(pool)
    size = min(size, n)
    return [_take(dataset, pool[torch.randperm(n, generator=generator)[:size]]) for _ in range(num)]


def split_held_out(dataset, size: int, generator: torch.Generator) -> tuple[tuple | None, torch.Tensor]:
    """Set ``size`` random samples aside (at most half the dataset): ``(held-out batch, pool of
    the remaining indices)``. The held-out batch is disjoint from every batch drawn from the pool."""
    n = len(dataset)
    perm = torch.randperm(n, generator=generator)
    k = min(int(size), n // 2)
    if k < 1:
        return None, perm
    return _take(dataset, perm[:k].sort().values), perm[k:].sort().values


def eval_loss(model: nn.Module, loss_fn: Callable, batch: Sequence[torch.Tensor] | None) -> float | None:
    if batch is None:
        return None
    with torch.no_grad():
        return float(loss_fn(model(batch[0]), batch[1]))


def _group_norm(params: Sequence[torch.Tensor]) -> float:
    """Frobenius norm of a group of parameters, accumulated in float64 (one pass per tensor, no float64 copy)."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)) ** 2 for p in params))


def run_teleport(method: str, model: nn.Module, loss_fn: Callable, batches, held_out, optimizer, optimizer_state: str,
                 moved, one_batch: Callable, guards: TeleportGuards | None = None,
                 groups: dict[str, list[torch.Tensor]] | None = None) -> "TeleportResult":
    """The frame both teleport algorithms share.

    Snapshot of model and optimizer; in teleport mode, the held-out loss before, then per batch
    ``one_batch(x, y) -> BatchRecord`` followed by the ``guards`` (see ``TeleportGuards``; the
    weight growth is measured per entry of ``groups``, name -> the parameters of one moved
    layer). A batch that trips a guard or raises ``TeleportError`` is undone (the ``moved``
    parameters are copied back) and ends the teleport; the kept batches are returned with
    ``stopped_by``/``stop_message`` set. When the first batch trips, or on any other exception,
    model and optimizer are restored exactly and the error is raised (``TeleportRejected`` for a
    guard, ``TeleportError`` for non-finite values). Finally the optimizer-state policy is
    applied to the moved parameters.
    """
    guards = guards if guards is not None else TeleportGuards()
    groups = groups if groups is not None else {str(i): [p] for i, p in enumerate(moved)}
    snap = Snapshot(model, optimizer)
    t0 = time.perf_counter()
    records: list[BatchRecord] = []
    norms0 = {k: _group_norm(v) for k, v in groups.items()}
    stop: tuple[str, str] | None = None
    try:
        with teleport_mode(model):
            held_before = eval_loss(model, loss_fn, held_out)
            check_held = held_before is not None and finite(held_before) and guards.held_out_tol is not None
            held_after = held_before
            for i, (x, y) in enumerate(batches):
                saved = [p.detach().clone() for p in moved]
                held_now = held_after
                try:
                    rec = one_batch(x, y)
                    problem = _check_batch(i, rec, guards, groups, norms0)
                    if problem is None and check_held:  # (guard off: measured once, at the end)
                        held_now = eval_loss(model, loss_fn, held_out)
                        if not finite(held_now):
                            problem = ("non_finite", f"teleport batch {i}: the held-out loss became non-finite")
                        elif (held_now - held_before) / max(abs(held_before), 1e-12) > guards.held_out_tol:
                            rise = (held_now - held_before) / max(abs(held_before), 1e-12)
                            problem = ("held_out_loss",
                                       f"teleport batch {i}: the held-out loss rose from {held_before:.6g} to "
                                       f"{held_now:.6g} ({rise:+.2%}), above held_out_tol = {guards.held_out_tol:g}")
                except TeleportError as exc:
                    if exc.reason is None:  # the algorithms raise TeleportError for non-finite values only
                        exc.reason = "non_finite"
                    if not records:
                        raise
                    problem = (exc.reason, f"teleport batch {i}: {exc}")
                if problem is not None:
                    with torch.no_grad():
                        for p, v in zip(moved, saved):
                            p.copy_(v)
                    if not records:
                        reason, msg = problem
                        partial = TeleportResult(method, [], held_before, held_before, time.perf_counter() - t0,
                                                 optimizer_state, reason, msg)
                        cls = TeleportError if reason == "non_finite" else TeleportRejected
                        raise cls(f"teleport rolled back: {msg}; model and optimizer were restored to their "
                                  "pre-teleport state", reason, partial)
                    stop = problem
                    break
                records.append(rec)
                held_after = held_now
            if held_before is not None and not check_held:
                held_after = eval_loss(model, loss_fn, held_out)
                if finite(held_before) and not finite(held_after):
                    raise TeleportError("the held-out loss became non-finite during the teleport; model and "
                                        "optimizer were restored to their pre-teleport state", "non_finite")
    except BaseException:
        snap.restore()
        raise
    apply_optimizer_state(optimizer, moved, optimizer_state)
    return TeleportResult(method, records, held_before, held_after, time.perf_counter() - t0, optimizer_state,
                          stop[0] if stop else None, stop[1] if stop else None)


def _check_batch(i: int, rec: BatchRecord, guards: TeleportGuards, groups, norms0) -> tuple[str, str] | None:
    """The per-batch guards that need no extra forward pass: batch-loss change and weight growth."""
    if not (math.isfinite(rec.loss_after) and math.isfinite(rec.grad_norm_after)):
        return ("non_finite", f"teleport batch {i}: the batch loss or gradient norm became non-finite")
    if guards.batch_loss_tol is not None and rec.rel_loss_change > guards.batch_loss_tol:
        return ("batch_loss_change",
                f"teleport batch {i}: the teleport-batch loss changed from {rec.loss_before:.6g} to "
                f"{rec.loss_after:.6g} (relative {rec.rel_loss_change:.2e}), above batch_loss_tol = "
                f"{guards.batch_loss_tol:g}")
    for name, params in groups.items():
        n1 = _group_norm(params)
        if not math.isfinite(n1):
            return ("non_finite", f"teleport batch {i}: the parameters of layer {name!r} became non-finite")
        if guards.max_weight_growth is None:
            continue
        n0 = norms0[name]
        ratio = n1 / n0 if n0 > 0 else (math.inf if n1 > 0 else 1.0)
        if ratio > guards.max_weight_growth:
            return ("weight_growth",
                    f"teleport batch {i}: the parameter norm of layer {name!r} grew by a factor {ratio:.3g} "
                    f"(from {n0:.4g} to {n1:.4g}), above max_weight_growth = {guards.max_weight_growth:g}")
    return None


def check_ascent_options(steps, eta, cap, cap_ratio) -> None:
    """Validation shared by the teleport algorithms' constructors (one sentence per bad value)."""
    if int(steps) < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not float(eta) > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    if cap is not None and not float(cap) > 0:
        raise ValueError(f"cap must be > 0 or None, got {cap}")
    if cap_ratio is not None and not float(cap_ratio) > 1:
        raise ValueError(f"cap_ratio must be > 1 or None, got {cap_ratio}")
