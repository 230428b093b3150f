"""Trainer callback of the change-of-basis teleport: teleport the model in place once, at given steps/epochs, or
on a schedule (seed 000 Sec. 5).

``TeleportCallback(at_epoch=1, kind="optimized")`` is what the demo uses (registered as ``teleport`` for TOML).
The null-space and symmetry teleports have their own callback, :class:`gradcond.teleport.level_set_callback.
LevelSetTeleportCallback`.  The callback protocol comes from :mod:`gradcond.callbacks`, so this module never
loads the trainer.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from gradcond.graph import analyze
from gradcond.callbacks import Callback
from gradcond.distributed import active as _dist_active, is_main, refuse_sharded, run_on_main, sync_after_teleport, unwrap, world_size

from .errors import TeleportError
from .apply import teleport
from .cob import random_cob, weight_scale_factors
from .optim_state import MODES, _check_factors, _transport_pairs, check_optimizer_supported
from .optimize import OBJECTIVES, _objective_fn, gradient_at, optimize_cob

__all__ = ["TeleportCallback"]


class TeleportCallback(Callback):
    """Teleport the trained model **in place** (same module and optimizer objects) and log it.

    When
    ----
    ``at_epoch`` (int or list of 0-based epochs: at the *start* of that epoch, before its first step),
    ``at_step`` (int or list: before the optimizer step number ``s + 1``, i.e. when ``state.step == s``),
    ``every`` (every ``every`` optimizer steps, first at step ``every``).  They combine.  *Decision*: with none of
    them, teleport once at the start of training (the source's "teleport right after initialisation", Sec. 5.1).

    How
    ---
    ``kind="random"``: ``random_cob(structure, sigma, mode)``.  ``kind="optimized"``: ``optimize_cob`` on
    ``objective`` (``grad_norm`` | ``normalized_grad_norm``) with ``|tau|`` in ``[1 - sigma, 1 + sigma]``,
    ``steps`` Adam steps of size ``lr`` on log|tau|, signs +1 (``intra``) or random (``inter``).
    The objective batches: ``batches`` batches of ``batch_size`` samples (default: the loader's batch size, else
    64) drawn from ``state.train_loader.dataset`` with a private generator (the loader's data order is not
    consumed, so a run with the callback sees the same batches as one without).

    Activation rewrites and in-place teleports
    ------------------------------------------
    The model object must stay the same.  ``teleport(model, cob, inplace=True)`` multiplies the parameters in
    place and, where an activation must be rewritten (ReLU with tau < 0, tanh with tau != 1, ...), swaps that
    submodule for a :class:`~gradcond.graph.TeleportedActivation` in its parent -- possible for activation modules
    called once, impossible for function-call activations (``F.relu`` in a ``forward``).  *Decision*: ``rewrite``
    defaults to ``mode == "inter"``.  With ``rewrite=False`` the structure is analysed with ``analyze(...,
    rewrite=False)``: taus at non-homogeneous activations are pinned and the others constrained to tau > 0, so the
    teleported model is a plain instance of the user's class (its ``state_dict`` keys are unchanged and checkpoints
    resume).  With rewriting, the ``state_dict`` gains ``<path>.tau`` buffers: resuming such a run from a checkpoint
    into a fresh model fails in ``load_state_dict`` (not supported); a model whose rewrite would need a graph
    rewrite is refused with ``ValueError`` before anything changes.

    Optimizer state: ``optimizer_state="transport"`` (default; exact, see :mod:`.optim_state`), ``"reset"`` or
    ``"keep"``.  The optimizer is checked before the model is touched: an unsupported optimizer raises and leaves
    model and optimizer unchanged.

    Logged per teleport: ``state.log_event("teleport", index, method (= kind), mode, sigma, num_free, objective,
    objective_before, objective_after, loss_before, loss_after, max_output_change, optimizer_state, transport_exact,
    seconds)`` -- before/after values measured by autograd on the model itself (buffers untouched) on the
    objective batches -- and metrics (probe ``teleport``) ``objective_before``, ``objective_after``,
    ``loss_before``, ``loss_after``, ``seconds``.  ``self.events`` keeps the event dicts.

    DDP (``torch.distributed`` with more than one rank): the teleport is computed on rank 0 only, on
    ``model.module``; parameters, buffers and optimizer state are then broadcast from rank 0 and every replica is
    checked bit-identical (a ``replicas_identical`` event on rank 0; a mismatch raises ``ReplicaMismatchError``).
    ``rewrite=True`` is refused there (it would change rank 0's module structure only).

    Safety: every teleport is self-checked (:func:`~gradcond.teleport.teleport`: original vs teleported
    outputs on the analysis example and on the first objective batch, one forward pass each).  When the check
    fails (``TeleportError``) the model is restored exactly, the optimizer state is not touched, a
    ``teleport_failed`` event (with ``reason``) is logged, a ``RuntimeWarning`` is issued once, and training
    continues.  A model with no free tau (``num_free == 0``, e.g. tanh with ``rewrite=False``) is not teleported:
    a ``teleport_skipped`` event is logged and a warning issued once.
    """

    def __init__(self, at_epoch=None, at_step=None, every: int | None = None, *, kind: str = "random",
                 sigma: float = 0.9, mode: str = "intra", optimizer_state: str = "transport",
                 objective: str = "grad_norm", steps: int = 50, lr: float = 0.05, batches: int = 4,
                 batch_size: int | None = None, rewrite: bool | None = None, seed: int = 0):
        self.at_epoch = self._epochs_or_steps(at_epoch, "at_epoch")
        self.at_step = self._epochs_or_steps(at_step, "at_step")
        if every is not None and not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive int (optimizer steps) or None, got {every!r}.")
        self.every = every
        if kind not in ("random", "optimized"):
            raise ValueError(f"kind must be 'random' or 'optimized', got {kind!r}.")
        if not (isinstance(sigma, (int, float)) and 0 < sigma < 1):
            raise ValueError(f"sigma must be in (0, 1) (the source's CoB-range), got {sigma!r}.")
        if mode not in ("intra", "inter"):
            raise ValueError(f"mode must be 'intra' or 'inter', got {mode!r}.")
        if optimizer_state not in MODES:
            raise ValueError(f"optimizer_state must be one of {', '.join(MODES)}, got {optimizer_state!r}.")
        if not callable(objective) and objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} or a callable, got {objective!r}.")
        if not (isinstance(batches, int) and batches >= 1):
            raise ValueError(f"batches must be a positive int, got {batches!r}.")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
        self.kind, self.sigma, self.mode, self.optimizer_state = kind, float(sigma), mode, optimizer_state
        self.objective, self.steps, self.lr = objective, int(steps), float(lr)
        self.batches, self.batch_size = batches, batch_size
        self.rewrite = (mode == "inter") if rewrite is None else bool(rewrite)
        if mode == "inter" and not self.rewrite:
            raise ValueError("mode='inter' needs rewrite=True (negative taus rewrite ReLU-like activations).")
        self.seed = int(seed)
        self.events: list[dict] = []
        self._count = 0
        self._done: set = set()
        self._structure = None
        self._warned: set = set()

    @staticmethod
    def _epochs_or_steps(v, name):
        if v is None:
            return set()
        vals = [v] if isinstance(v, int) else list(v)
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in vals):
            raise ValueError(f"{name} must be a non-negative int or a list of them, got {v!r}.")
        return set(vals)

    # ------------------------------------------------------------------------------------------------------
    def _default_once(self) -> bool:
        return not self.at_epoch and not self.at_step and self.every is None

    def on_epoch_start(self, state) -> None:
        e = state.epoch
        if (e in self.at_epoch or (self._default_once() and e == 0)) and ("e", e) not in self._done:
            self._done.add(("e", e))
            self._teleport_synced(state)

    def on_step_start(self, state) -> None:
        s = state.step
        due = s in self.at_step or (self.every is not None and s > 0 and s % self.every == 0)
        if due and ("s", s) not in self._done:
            self._done.add(("s", s))
            self._teleport_synced(state)

    def _teleport_synced(self, state):
        """:meth:`teleport_now`, made DDP-safe: under ``torch.distributed`` (more than one rank) the teleport is
        computed on rank 0 only (on ``model.module``), then parameters, buffers and optimizer state are broadcast
        from rank 0 and every replica is checked bit-identical (:func:`gradcond.distributed.sync_after_teleport`,
        which raises ``ReplicaMismatchError`` naming the first differing tensor); rank 0 logs a
        ``replicas_identical`` event (``tensors`` checked, ``world_size``). Single process: just ``teleport_now``."""
        if not _dist_active():
            return self.teleport_now(state)
        refuse_sharded(state.model, "TeleportCallback")
        if self.rewrite:  # a rewrite swaps submodules on rank 0 only: replicas would differ in structure
            raise ValueError("TeleportCallback under torch.distributed needs rewrite=False (mode='intra'): an "
                             "activation rewrite changes the module structure on rank 0 only.")
        record = run_on_main(self.teleport_now, state)
        n = sync_after_teleport(state.model, state.optimizer)
        if is_main():
            state.log_event("replicas_identical", after="teleport", tensors=n, world_size=world_size())
        return record

    # ------------------------------------------------------------------------------------------------------
    def _objective_batches(self, state, dtype):
        ds = state.train_loader.dataset
        bs = self.batch_size or getattr(state.train_loader, "batch_size", None) or 64
        n = len(ds)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._count)
        perm = torch.randperm(n, generator=gen)
        out = []
        for i in range(self.batches):
            idx = perm[(i * bs) % n:(i * bs) % n + bs]
            if len(idx) == 0:
                break
            items = [ds[int(j)] for j in idx]
            x = torch.stack([it[0] for it in items])
            y = torch.stack([torch.as_tensor(it[1]) for it in items])
            dev = next(unwrap(state.model).parameters()).device  # the dataset may sit on the CPU, the model elsewhere
            out.append((x.to(dev, dtype) if x.is_floating_point() else x.to(dev),
                        y.to(dev, dtype) if y.is_floating_point() else y.to(dev)))
        return out

    def teleport_now(self, state) -> dict:
        """Teleport ``state.model`` in place now and transport/reset/keep ``state.optimizer``; returns the event."""
        t0 = time.perf_counter()
        model, opt = unwrap(state.model), state.optimizer  # the inner module of a DDP wrapper: no collectives
        check_optimizer_supported(opt, self.optimizer_state)  # before touching anything
        dtype = next(model.parameters()).dtype
        batches = self._objective_batches(state, dtype)
        if self._structure is None:
            self._structure = analyze(model, batches[0][0][:2], rewrite=self.rewrite)
        structure = self._structure
        if structure.num_free == 0:
            # nothing to teleport (e.g. tanh with rewrite=False pins every tau): say so instead of logging a no-op
            notes = (structure.frozen + structure.pins)[:3]
            why = "; ".join(f"{n.node}: {n.reason}" for n in notes) or "no layer with free factors"
            return self._not_done(state, "teleport_skipped", t0,
                                  f"the model has no free change-of-basis factor (num_free=0 with rewrite="
                                  f"{self.rewrite}; e.g. {why}); the teleport was skipped")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 + self._count)
        if self.kind == "random":
            cob = random_cob(structure, self.sigma, self.mode, gen)
        else:
            cob, _ = optimize_cob(model, state.loss_fn, batches, structure, objective=self.objective,
                                  steps=self.steps, lr=self.lr, sigma_max=self.sigma, mode=self.mode, generator=gen)
        params = dict(model.named_parameters())
        fac = weight_scale_factors(structure, cob)
        pairs = _check_factors([(n, params[n], f) for n, f in fac.items()])
        obj = _objective_fn(self.objective)
        loss_b, g_b = gradient_at(model, state.loss_fn, batches)
        with torch.no_grad():
            obj_b = float(obj({n: g.double() for n, g in g_b.items()}, {n: p.double() for n, p in params.items()}))
            out_b = self._outputs(model, batches[0][0])
        try:
            # self-checked on the analysis example and on this batch; raises with the model unchanged
            teleport(model, cob, inplace=True, check_inputs=(batches[0][0],))
        except TeleportError as exc:
            return self._not_done(state, "teleport_failed", t0, f"{exc} The optimizer state is unchanged too.")
        except ValueError as exc:
            raise ValueError(f"TeleportCallback teleports the trained model in place and could not: {exc} "
                             "For this model use mode='intra' with rewrite=False.") from exc
        rep = _transport_pairs(opt, pairs, self.optimizer_state)
        loss_a, g_a = gradient_at(model, state.loss_fn, batches)
        params = dict(model.named_parameters())
        with torch.no_grad():
            obj_a = float(obj({n: g.double() for n, g in g_a.items()}, {n: p.double() for n, p in params.items()}))
            out_a = self._outputs(model, batches[0][0])
            scale = float(out_b.abs().max()) or 1.0
            change = float((out_a - out_b).abs().max()) / scale
        name = self.objective if isinstance(self.objective, str) else getattr(self.objective, "__name__", "callable")
        ev = dict(index=self._count, method=self.kind, mode=self.mode, sigma=self.sigma, num_free=structure.num_free,
                  objective=name, objective_before=obj_b, objective_after=obj_a, loss_before=loss_b,
                  loss_after=loss_a, max_output_change=change, optimizer_state=self.optimizer_state,
                  transport_exact=rep.exact, seconds=time.perf_counter() - t0)
        self._count += 1
        record = state.log_event("teleport", **ev)
        self.events.append(record)
        state.log_metrics([("teleport", "", k, ev[k]) for k in
                           ("objective_before", "objective_after", "loss_before", "loss_after", "seconds")
                           if isinstance(ev[k], (int, float)) and math.isfinite(ev[k])])
        return record

    def _not_done(self, state, kind: str, t0: float, reason: str) -> dict:
        """Log a teleport that did not happen (``teleport_skipped`` / ``teleport_failed``), warn once per kind."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"TeleportCallback: {reason}", RuntimeWarning, stacklevel=3)
        record = state.log_event(kind, index=self._count, method=self.kind, mode=self.mode, sigma=self.sigma,
                                 num_free=self._structure.num_free, reason=reason,
                                 seconds=time.perf_counter() - t0)
        self._count += 1
        self.events.append(record)
        return record

    @staticmethod
    def _outputs(model, x):
        bufs = {n: b.clone() for n, b in model.named_buffers()}
        params = dict(model.named_parameters())
        return torch.func.functional_call(model, {**params, **bufs}, (x,)).detach()

    # resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"done": sorted(self._done), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self._done = {tuple(d) for d in state.get("done", [])}
        self._count = int(state.get("count", 0))
