"""Private helpers shared by the null-space and the symmetry teleport (issue 4).

Result records, the pre-teleport snapshot/restore, the "teleport mode" context (dropout off,
buffers protected) and the optimizer-state policy live here so that both algorithms behave the
same way around the actual update rule.
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

__all__ = [
    "TeleportError",
    "BatchRecord",
    "TeleportResult",
    "resolve_loss",
    "teleport_mode",
    "Snapshot",
    "apply_optimizer_state",
    "OPTIMIZER_STATE_POLICIES",
]

OPTIMIZER_STATE_POLICIES = ("keep", "reset")


class TeleportError(FloatingPointError):
    """A teleport produced a non-finite loss, gradient or parameter.

    Raised only after the model (and the optimizer, where one was given) has been restored to
    its exact pre-teleport state.
    """


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
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.summary()
        d["records"] = [b.to_dict() for b in self.batches]
        return d


def resolve_loss(loss: str | Callable) -> Callable:
    """A loss name ("cross_entropy", "mse", "dot") or a callable ``(output, target) -> scalar``."""
    if callable(loss):
        return loss
    try:  # the foundation's registry, when present
        from gradcond.train import get_loss  # type: ignore

        return get_loss(loss)
    except ImportError:  # pragma: no cover - foundation always present in the package
        pass
    table = {
        "cross_entropy": nn.functional.cross_entropy,
        "mse": nn.functional.mse_loss,
        "dot": lambda f, y: -(f * y).sum(1).mean(),
    }
    if loss not in table:
        raise ValueError(f"unknown loss {loss!r}; accepted: a callable or one of {sorted(table)}")
    return table[loss]


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


def as_batches(batches: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Accept one ``(x, y)`` pair or a sequence of them."""
    if isinstance(batches, (tuple, list)) and len(batches) == 2 and torch.is_tensor(batches[0]):
        return [tuple(batches)]  # type: ignore[list-item]
    out = list(batches)
    for b in out:
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise TypeError("batches must be an (x, y) pair or a sequence of (x, y) pairs")
    return [tuple(b) for b in out]  # type: ignore[misc]


def sample_batches(dataset, num: int, size: int, generator: torch.Generator) -> list[tuple]:
    """``num`` random batches of ``size`` samples from a TensorDataset-like dataset."""
    n = len(dataset)
    size = min(size, n)
    out = []
    tensors = getattr(dataset, "tensors", None)
    for _ in range(num):
        idx = torch.randperm(n, generator=generator)[:size]
        if tensors is not None:
            out.append(tuple(t[idx] for t in tensors[:2]))
        else:
            items = [dataset[int(i)] for i in idx]
            out.append((torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items])))
    return out


def first_samples(dataset, size: int) -> tuple | None:
    if dataset is None:
        return None
    n = min(size, len(dataset))
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return tuple(t[:n] for t in tensors[:2])
    items = [dataset[i] for i in range(n)]
    return (torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items]))


def eval_loss(model: nn.Module, loss_fn: Callable, batch: Sequence[torch.Tensor] | None) -> float | None:
    if batch is None:
        return None
    with torch.no_grad():
        return float(loss_fn(model(batch[0]), batch[1]))


def run_teleport(method: str, model: nn.Module, loss_fn: Callable, batches, held_out, optimizer, optimizer_state: str,
                 moved, one_batch: Callable) -> "TeleportResult":
    """The frame both teleport algorithms share: snapshot, per-batch ``one_batch(x, y) -> BatchRecord`` in teleport
    mode, held-out loss before/after, exact restore of model and optimizer on any exception, then the optimizer-state
    policy for the moved parameters."""
    snap = Snapshot(model, optimizer)
    t0 = time.perf_counter()
    records: list[BatchRecord] = []
    try:
        with teleport_mode(model):
            held_before = eval_loss(model, loss_fn, held_out)
            for x, y in batches:
                records.append(one_batch(x, y))
            held_after = eval_loss(model, loss_fn, held_out)
            if held_before is not None and not finite(held_after):
                raise TeleportError("the held-out loss became non-finite during the teleport")
    except BaseException:
        snap.restore()
        raise
    apply_optimizer_state(optimizer, moved, optimizer_state)
    return TeleportResult(method, records, held_before, held_after, time.perf_counter() - t0, optimizer_state)


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
