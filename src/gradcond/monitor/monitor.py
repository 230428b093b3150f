"""``Monitor``: probes scheduled during training under a compute budget, writing long-format rows.

Use as a trainer callback (``fit(..., callbacks=[Monitor()])``, or ``[monitor]`` in a run config) or from a plain
loop with :meth:`Monitor.step`. Each probe has a schedule (``every:N`` steps, ``epoch``, ``log``). The monitor keeps
its own time (probes and bookkeeping) under ``budget``, a fraction of the training time so far (excluding the
monitor's own time, so the slowdown stays near ``1 + budget``): a due measurement that would
exceed it is skipped, and the number of skips per probe is logged (``probe=monitor, name=skipped``). A probe that
raises is disabled, the failure is logged as a ``probe_failed`` event (and shown in the report), and training goes on.
Probes run on a fixed probe batch (the first ``probe_batch_size`` training samples) so curves are comparable over time.
``budget=1`` switches the budget off (every due measurement runs).
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from ..train.run import RunLogger
from ..train.trainer import Callback, TrainState
from .probes import PRESETS, PROBES, Schedule

# a-priori cost of each probe in training steps (forward+backward+update), used until it has been measured once
PRIOR_COST_IN_STEPS = {"grad_norm": 0.05, "weight_norm": 0.05, "gsc": 2.0, "domain": 1.0, "conditioning": 40.0}


class Monitor(Callback):
    def __init__(self, probes: str | dict = "default", budget: float = 0.05, probe_batch_size: int = 64,
                 tensorboard_dir: str | None = None):
        if isinstance(probes, str):
            if probes not in PRESETS:
                raise ValueError(f"unknown monitor preset {probes!r}; accepted: {', '.join(PRESETS)}.")
            probes = PRESETS[probes]
        unknown = sorted(set(probes) - set(PROBES))
        if unknown:
            raise ValueError(f"unknown probe(s) {', '.join(unknown)}; accepted: {', '.join(PROBES)}.")
        if not (0 < budget <= 1):
            raise ValueError(f"monitor budget must be a fraction in (0, 1], got {budget}.")
        self.schedules = {name: Schedule.parse(s) for name, s in probes.items()}
        self.budget = budget
        self.probe_batch_size = probe_batch_size
        self.spent = 0.0
        self.cost: dict[str, float] = {}
        self.skipped: Counter = Counter()
        self.failed: dict[str, str] = {}
        self.batch = None
        self._t0 = None
        self._tb = None
        self._tb_dir = tensorboard_dir
        self._plain_state: TrainState | None = None

    # ---- callback hooks -----------------------------------------------------------------------------------
    def on_train_start(self, state: TrainState) -> None:
        self._t0 = time.perf_counter()
        if self._tb_dir is not None and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard_dir needs the optional 'tensorboard' package (pip install gradcond[tensorboard]).") from None
            self._tb = SummaryWriter(self._tb_dir)

    def _probe_batch(self, state: TrainState):
        if self.batch is None:
            ds = getattr(state.train_loader, "dataset", None)
            if ds is not None and hasattr(ds, "tensors"):
                x, y = ds.tensors[0][: self.probe_batch_size], ds.tensors[1][: self.probe_batch_size]
            else:
                x, y = state.batch
            dtype = next(state.model.parameters()).dtype
            self.batch = (x.to(dtype) if x.is_floating_point() else x, y.to(dtype) if y.is_floating_point() else y)
        return self.batch

    def _run(self, name: str, state: TrainState) -> None:
        if name in self.failed:
            return
        if self._t0 is None:
            self._t0 = time.perf_counter()
        elapsed = time.perf_counter() - self._t0
        # skip when this measurement would push the monitor's share of the time over the budget; before a probe
        # has run once, its cost is guessed from the mean training-step time and PRIOR_COST_IN_STEPS
        step_time = max(elapsed - self.spent, 0.0) / max(state.step, 1)
        est = self.cost.get(name, PRIOR_COST_IN_STEPS.get(name, 1.0) * step_time)
        # the budget is relative to the training time proper (elapsed minus the monitor's own time)
        if self.budget < 1 and self.spent + est > self.budget * max(elapsed - self.spent, 1e-9):
            self.skipped[name] += 1
            return
        t = time.perf_counter()
        try:
            rows = PROBES[name](state.model, state.loss_fn, self._probe_batch(state), state)
        except Exception as exc:  # a failing probe must not stop training
            self.failed[name] = f"{type(exc).__name__}: {exc}"
            state.log_event("probe_failed", probe=name, error=self.failed[name])
            return
        dt = time.perf_counter() - t
        self.cost[name] = dt if name not in self.cost else 0.5 * (self.cost[name] + dt)
        state.log_metrics([(name, layer, metric, value) for layer, metric, value in rows])
        if self._tb is not None:
            for layer, metric, value in rows:
                self._tb.add_scalar(f"{name}/{metric}/{layer}" if layer else f"{name}/{metric}", value, state.step)

    def on_step_end(self, state: TrainState) -> None:
        t = time.perf_counter()  # everything the monitor does counts against its budget, bookkeeping included
        for name, sch in self.schedules.items():
            if sch.due_at_step(state.step):
                self._run(name, state)
        self.spent += time.perf_counter() - t

    def on_epoch_end(self, state: TrainState) -> None:
        t = time.perf_counter()
        for name, sch in self.schedules.items():
            if sch.kind == "epoch":
                self._run(name, state)
        rows = [("monitor", probe, "skipped", n) for probe, n in sorted(self.skipped.items())]
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        rows.append(("monitor", "", "time_fraction", self.spent / max(elapsed, 1e-9)))
        state.log_metrics(rows)
        self.skipped.clear()
        self.spent += time.perf_counter() - t

    def on_train_end(self, state: TrainState) -> None:
        if self._tb is not None:
            self._tb.flush()

    def state_dict(self) -> dict:
        elapsed = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        return {"spent": self.spent, "elapsed": elapsed, "cost": dict(self.cost), "failed": dict(self.failed)}

    def load_state_dict(self, state: dict) -> None:
        # the budget is a share of training time: carry both the time spent measuring and the time elapsed
        self.spent = state.get("spent", 0.0)
        self._t0 = time.perf_counter() - state.get("elapsed", 0.0)
        self.cost = dict(state.get("cost", {}))
        self.failed = dict(state.get("failed", {}))

    # ---- plain loops --------------------------------------------------------------------------------------
    def step(self, model: torch.nn.Module, loss_fn, batch, optimizer=None, run: RunLogger | None = None) -> list[dict]:
        """Call after ``optimizer.step()`` in your own loop; returns the rows logged at this step.

        Rows accumulate in ``monitor.rows`` (and in ``run``'s directory when given). ``epoch`` probes run every
        ``len(loader)`` steps only under the trainer; here they run when :meth:`end_epoch` is called.
        """
        from ..train import get_loss

        if self._plain_state is None:
            self._plain_state = TrainState(model, optimizer, get_loss(loss_fn), None, run=run or RunLogger(None))
            self.on_train_start(self._plain_state)
        st = self._plain_state
        st.model, st.optimizer, st.batch = model, optimizer, batch
        if self.batch is None:
            x, y = batch
            self.batch = (x[: self.probe_batch_size], y[: self.probe_batch_size])
        n0 = len(st.run.metrics)
        st.step += 1
        self.on_step_end(st)
        return st.run.metrics[n0:]

    def end_epoch(self) -> list[dict]:
        st = self._plain_state
        if st is None:
            return []
        n0 = len(st.run.metrics)
        self.on_epoch_end(st)
        st.epoch += 1
        return st.run.metrics[n0:]

    @property
    def rows(self) -> list[dict]:
        return [] if self._plain_state is None else self._plain_state.run.metrics

    @property
    def events(self) -> list[dict]:
        return [] if self._plain_state is None else self._plain_state.run.events
