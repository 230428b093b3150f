"""The trainer callback of the loss-level-set teleports (issue 4): :class:`LevelSetTeleportCallback`.

It runs a teleporter (a :class:`~gradcond.teleport.nullspace.NullSpaceTeleport` or a
:class:`~gradcond.teleport.symmetry.SymmetryTeleport`) on a schedule; ``NullSpaceTeleportCallback`` and
``SymmetryTeleportCallback`` are its subclasses that build the teleporter from their keywords.  Not to be confused
with :class:`gradcond.teleport.cob_callback.TeleportCallback`, the callback of the change-of-basis teleport.
The callback protocol comes from :mod:`gradcond.callbacks`, so this module does not import the trainer.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch

from gradcond.callbacks import Callback
from gradcond.distributed import active as _dist_active, is_main, refuse_sharded, run_on_main, sync_after_teleport, unwrap, world_size

from .errors import TeleportError
from .level_set import OPTIMIZER_STATE_POLICIES, sample_batches, split_held_out


class LevelSetTeleportCallback(Callback):
    """Run ``teleporter.teleport`` before the scheduled epochs (the source's schedule K).

    Options
    -------
    schedule : epochs (0-based) before which to teleport, or an int ``K`` meaning the first K
        epochs (default 5, the source's "first 5 epochs").
    num_batches, batch_size : b teleport batches of n samples, drawn at random (without
        replacement inside a batch) from ``state.train_loader.dataset`` minus the held-out samples,
        with a generator seeded by ``seed`` and the teleport's index (default b = 32, n = 32: the
        source's settings). ``batch_size=None`` asks the teleporter (``default_batch_size(model)``;
        the symmetry teleport needs n below the width of its layers).
    warmup_steps : optimizer steps before the first teleport (the source: 40 for CNNs). If a
        scheduled epoch starts before the warm-up is over, its teleport happens at the first step
        of that epoch once ``state.step >= warmup_steps``; a scheduled epoch that ends before that
        is skipped.
    optimizer_state : "keep" (default) or "reset" for the moved parameters; see
        ``apply_optimizer_state``. Tested with SGD, momentum, Adagrad and Adam.
    held_out_size : this many training samples (at most half the training set), drawn at random
        for each teleport and set aside so that no teleport batch contains them, form the held-out
        batch: its loss is reported before/after and checked by the teleporter's ``held_out_tol``
        guard after every teleport batch (see ``TeleportGuards``). Decision: training samples, not
        the test set, because the guard decides what training does (no test-set leakage). None or
        0: no held-out batch, that guard is off.
    on_nonfinite : what to do when the teleporter refuses a teleport (non-finite values or a guard
        trip on its first batch; model and optimizer are already restored bit-identically):
        "warn" (default: a ``teleport_failed`` event with ``reason`` and ``error``, a
        ``RuntimeWarning`` the first time only, training goes on) or "raise". (The name predates
        the guards; it covers every refusal.)

    Under ``torch.distributed`` (more than one rank): the teleport is computed on rank 0 only, then parameters,
    buffers and optimizer state are broadcast from rank 0 and all replicas are checked bit-identical
    (:func:`gradcond.distributed.sync_after_teleport`); rank 0 logs a ``replicas_identical`` event.

    Guards: the teleporter's ``batch_loss_tol``, ``held_out_tol`` and ``max_weight_growth`` (on by
    default; pass them to this callback or to the teleporter, ``None`` disables one). A guard that
    trips on a later batch undoes that batch and ends the teleport early: the ``teleport`` event then
    has ``stopped_by`` (the reason) and ``stop_message`` (the values), and the first such stop also
    warns once.

    Events: ``state.log_event("teleport", **TeleportResult.summary(), index=i)`` with losses and
    gradient norms before/after per teleport batch, the held-out loss before/after, rank kept per
    layer, skipped layers, wall time and ``stopped_by``/``stop_message``; a refused teleport logs
    ``teleport_failed`` with ``method``, ``reason`` (one of ``GUARD_REASONS``), ``error`` and ``index``. Metrics (probe "teleport"): ``max_rel_loss_change``,
    ``grad_norm_before``/``grad_norm_after`` (first/last batch) and ``held_out_before``/``_after``.
    ``self.results`` keeps the ``TeleportResult`` objects.
    """

    OPTIONS = ("schedule", "num_batches", "batch_size", "warmup_steps", "optimizer_state",
               "held_out_size", "on_nonfinite", "seed", "loss")

    def __init__(self, teleporter, *, schedule: int | Iterable[int] = 5, num_batches: int = 32,
                 batch_size: int | None = 32, warmup_steps: int = 0, optimizer_state: str = "keep",
                 held_out_size: int | None = 256, on_nonfinite: str = "warn", seed: int = 0,
                 loss=None):
        if isinstance(schedule, int):
            if schedule < 0:
                raise ValueError(f"schedule must be a non-negative int or a set of epochs, got {schedule}")
            schedule = range(schedule)
        self.schedule = sorted({int(e) for e in schedule})
        if any(e < 0 for e in self.schedule):
            raise ValueError("schedule epochs must be >= 0")
        if num_batches < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"num_batches and batch_size must be >= 1, got {num_batches}, {batch_size}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if optimizer_state not in OPTIMIZER_STATE_POLICIES:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_POLICIES}, got {optimizer_state!r}")
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        self.teleporter = teleporter
        self.num_batches, self.warmup_steps = int(num_batches), int(warmup_steps)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.optimizer_state, self.held_out_size, self.on_nonfinite = optimizer_state, held_out_size, on_nonfinite
        self.seed, self.loss = int(seed), loss
        self.results: list = []
        self._done: set[int] = set()
        self._count = 0
        self._warned = False

    # hooks ------------------------------------------------------------------------------------
    def on_epoch_start(self, state) -> None:
        self._maybe(state)

    def on_step_start(self, state) -> None:
        self._maybe(state)

    def _maybe(self, state) -> None:
        e = state.epoch
        if e in self.schedule and e not in self._done and state.step >= self.warmup_steps:
            self._done.add(e)
            if not _dist_active():
                self._fire(state)
                return
            # DDP: computed on rank 0 only (inner module), then broadcast from rank 0 and checked bit-identical
            refuse_sharded(state.model, type(self).__name__)
            run_on_main(self._fire, state)
            n = sync_after_teleport(state.model, state.optimizer)
            if is_main():
                state.log_event("replicas_identical", after="teleport", tensors=n, world_size=world_size())

    def _fire(self, state) -> None:
        model = unwrap(state.model)  # the inner module of a DDP wrapper: its gradients trigger no collective
        dtype = next(model.parameters()).dtype
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._count)
        self._count += 1

        def cast(b):
            if b is None:
                return None
            return tuple(t.to(dtype) if t.is_floating_point() else t for t in b)

        dataset = state.train_loader.dataset
        held, pool = None, None
        if self.held_out_size:
            held, pool = split_held_out(dataset, self.held_out_size, gen)
            held = cast(held)
        size = self.batch_size if self.batch_size is not None else getattr(
            self.teleporter, "default_batch_size", lambda m: 32)(model)
        batches = [cast(b) for b in sample_batches(dataset, self.num_batches, size, gen, pool)]
        loss = self.loss if self.loss is not None else (self.teleporter.loss or state.loss_fn)
        try:
            res = self.teleporter.teleport(model, batches, loss=loss, optimizer=state.optimizer,
                                           optimizer_state=self.optimizer_state, held_out=held)
        except TeleportError as exc:
            if self.on_nonfinite == "raise":
                raise
            self._warn(f"teleport skipped at epoch {state.epoch}, step {state.step}: {exc}")
            state.log_event("teleport_failed", method=self.teleporter.method, reason=exc.reason, error=str(exc),
                            index=self._count - 1)
            return
        if res.stopped_by is not None:
            self._warn(f"teleport at epoch {state.epoch}, step {state.step} stopped after {len(res.batches)} of "
                       f"{len(batches)} batches: {res.stop_message} (that batch was undone)")
        self.results.append(res)
        summary = res.summary()
        state.log_event("teleport", index=self._count - 1, **summary)
        rows = [("teleport", "", "max_rel_loss_change", res.max_rel_loss_change),
                ("teleport", "", "grad_norm_before", res.grad_norm_before),
                ("teleport", "", "grad_norm_after", res.grad_norm_after),
                ("teleport", "", "time_s", res.time_s)]
        if res.held_out_before is not None:
            rows += [("teleport", "", "held_out_before", res.held_out_before),
                     ("teleport", "", "held_out_after", res.held_out_after)]
        state.log_metrics(rows)

    def _warn(self, msg: str) -> None:
        """Warn the first time only; every refusal and early stop is in the events anyway."""
        if self._warned:
            return
        self._warned = True
        warnings.warn(msg + " (further teleport refusals and early stops of this callback are logged as "
                      "events only)", RuntimeWarning, stacklevel=3)

    # resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"done": sorted(self._done), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self._done = set(state.get("done", []))
        self._count = int(state.get("count", 0))
