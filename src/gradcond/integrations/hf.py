"""Gradient health inside a Hugging Face ``transformers.Trainer`` (optional extra ``gradcond[hf]``).

``GradcondCallback(...)`` is a ``transformers.TrainerCallback`` that runs the one
:class:`~gradcond.monitor.Monitor` (same probes, schedules, budget and plan as ``gradcond run``) inside
``Trainer.train()``::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GradcondCallback()])
    trainer.train()   # -> <output_dir>/gradcond/{metrics.csv, events.jsonl, report.html, ...}

Where it measures
-----------------
In ``on_optimizer_step``: right after ``optimizer.step()`` and before ``model.zero_grad()``, so ``.grad`` holds the
gradient the step used -- accumulated over the ``gradient_accumulation_steps`` micro-batches (the Trainer calls the
hook once per optimizer step), **unscaled** (with fp16 the Trainer unscales before clipping) and **after clipping**
(``max_grad_norm > 0`` clips before ``on_pre_optimizer_step``; the Trainer's own ``grad_norm`` log is the norm
before clipping). The weights are the updated ones, as in ``gradcond.train.fit`` and the Lightning adapter;
``update_size`` compares them with the weights kept in ``on_pre_optimizer_step``. Probes that run forward passes
(GSC, domain, conditioning, noise scale) use a fixed probe batch -- the first ``probe_batch_size`` examples of the
training set, collated by the Trainer's data collator -- in the parameters' dtype, outside autocast (the float32
reference of a mixed-precision run). A step the gradient scaler skipped (inf/NaN gradients) is not measured: it
is logged as an ``optimizer_step_skipped`` event and a ``monitor/skipped_step`` row.

Distributed (``torchrun`` + the Trainer's DDP or FSDP2 through accelerate): every rank runs the callback, the
measurement is the whole model's on the global probe batch (each rank takes its slice; see
:mod:`gradcond.monitor.monitor`), and rank 0 writes the run directory.

Outputs
-------
The usual run directory, ``<output_dir>/gradcond`` (``run_dir=`` to choose): written into ``.gradcond.partial``
and renamed when training ends, with ``metrics.csv``, ``timings.csv``, ``events.jsonl``,
``monitor_schedule.json``, ``report.html``. At every Trainer log (``on_log``) the model-level scalars measured since
the previous log (``gradcond/<probe>/<name>``; per-layer values too with ``log_layers=True``) are added to the
Trainer's logs, so its loggers (TensorBoard, W&B, ``trainer.state.log_history``) record them; the callback moves
itself ahead of the reporting callbacks so that they see the values.

Refused, with one sentence, at ``on_train_begin``: a probe schedule ``every:N`` with N larger than ``max_steps`` (it
would never fire), a loss that cannot be inferred, a training set that cannot be indexed for a probe batch (pass
``probe_batch=``). Teleports are not run through the callback (``teleport=`` is refused): the Trainer's optimizer
and scheduler state (``AcceleratedOptimizer``, possibly sharded) cannot be transported exactly by gradcond;
teleport the model before ``trainer.train()``.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..monitor import PRESETS, Monitor
from ..train.run import RunLogger
from ..train.trainer import TrainState

try:
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - the extra is optional
    _Base = object

__all__ = ["GradcondCallback", "causal_lm_loss", "DEFAULT_PROBES"]

# the default preset plus the gradient noise scale, measured at epoch ends (and at least min_measurements times)
DEFAULT_PROBES = {**PRESETS["default"], "noise_scale": "epoch"}


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM: ``logits[:, :-1]`` against ``labels[:, 1:]``, mean over the tokens
    whose label is not -100 (the Hugging Face convention, e.g. padding). The loss the probes use by default for a
    ``*ForCausalLM`` / ``*LMHeadModel``; equal to the model's own ``outputs.loss`` for the same labels."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


class _Steps:
    """What the monitor needs of a "train loader": its length in optimizer steps per epoch."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


class GradcondCallback(_Base):
    """Attach the :class:`~gradcond.monitor.Monitor` to a ``transformers.Trainer`` (see the module docstring).

    ``probes``: a preset name (``"default"``, ``"full"``) or ``{probe: schedule}`` (default :data:`DEFAULT_PROBES`);
    ``budget``: share of the training time the monitor may spend (1 = measure as configured); ``loss_fn``: the loss
    the probes use, ``(logits, labels) -> scalar`` (default: :func:`causal_lm_loss` for a causal LM, cross-entropy for
    one label per example); ``probe_batch_size``: examples in the fixed probe batch; ``probe_batch``: an explicit
    ``(inputs, labels)`` instead; ``run_dir``: where the run directory goes (default ``<output_dir>/gradcond``);
    ``log_layers``: also forward per-layer values to the Trainer's loggers; ``report``: write ``report.html`` at the
    end; ``min_measurements``: see :class:`~gradcond.monitor.Monitor`.
    """

    def __init__(self, probes: str | dict | None = None, *, budget: float = 0.05, loss_fn=None,
                 probe_batch_size: int = 16, probe_batch=None, run_dir=None, log_layers: bool = False,
                 report: bool = True, min_measurements: int = 3, teleport=None, output=None):
        if _Base is object:
            raise ImportError("GradcondCallback needs the optional 'transformers' package: pip install 'gradcond[hf]'.")
        if teleport is not None:
            raise ValueError("GradcondCallback does not teleport: the Trainer's optimizer and scheduler state "
                             "(AcceleratedOptimizer, possibly sharded) cannot be transported exactly by gradcond, so "
                             "teleport the model with gradcond.teleport before trainer.train() instead.")
        if isinstance(probe_batch_size, bool) or not isinstance(probe_batch_size, int) or probe_batch_size < 2:
            raise ValueError(f"probe_batch_size must be an integer >= 2, got {probe_batch_size!r}.")
        super().__init__()
        self.monitor = Monitor(DEFAULT_PROBES if probes is None else probes, budget=budget,
                               probe_batch_size=probe_batch_size, min_measurements=min_measurements, output=output)
        self.loss_fn = loss_fn
        self.probe_batch = probe_batch
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.log_layers = bool(log_layers)
        self.report = bool(report)
        self.run: RunLogger | None = None
        self._state: TrainState | None = None
        self._pending: dict[str, float] = {}
        self._epoch = 0
        self._t0 = None
        self._final: Path | None = None
        self.report_cpu_s = 0.0

    # ---- set-up ------------------------------------------------------------------------------------------------
    def _refuse(self, msg: str):
        raise ValueError(msg)

    def _check_options(self, args, hf_state) -> None:
        max_steps = int(hf_state.max_steps or 0)
        for name, sch in self.monitor.schedules.items():
            if sch.kind == "every" and max_steps and sch.n > max_steps:
                self._refuse(f"GradcondCallback probe {name} is scheduled every {sch.n} steps but the Trainer makes "
                             f"{max_steps} optimizer steps (max_steps), so it would never be measured; use every:N "
                             f"with N <= {max_steps}, or \"epoch\".")

    def _loss(self, model, labels):
        if self.loss_fn is not None:
            from ..losses import get_loss

            return get_loss(self.loss_fn)
        name = type(model).__name__
        if name.endswith("ForCausalLM") or "LMHead" in name:
            return causal_lm_loss
        if labels is not None and labels.dim() == 1 and not labels.is_floating_point():
            return F.cross_entropy
        self._refuse(f"GradcondCallback cannot infer the loss of a {name} (not a causal LM, and its labels are not one "
                     "class per example); pass loss_fn=(logits, labels) -> scalar.")

    def _make_probe_batch(self, train_dataloader, model):
        if self.probe_batch is not None:
            x, y = self.probe_batch
        else:
            ds = getattr(train_dataloader, "dataset", None)
            if ds is None or not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
                self._refuse("GradcondCallback needs a training set it can index (a map-style dataset) to build its "
                             "probe batch; pass probe_batch=(inputs, labels) for an iterable dataset.")
            n = min(self.monitor.probe_batch_size, len(ds))
            if n < max(2, D.world_size()):
                self._refuse(f"GradcondCallback needs a probe batch of at least {max(2, D.world_size())} examples but "
                             f"the training set has {len(ds)}.")
            collate = getattr(train_dataloader, "collate_fn", None)
            items = [ds[i] for i in range(n)]
            batch = collate(items) if collate is not None else torch.utils.data.default_collate(items)
            if isinstance(batch, dict):
                x = batch.get("input_ids", batch.get("pixel_values"))
                y = batch.get("labels", batch.get("label", x))
            else:
                x, y = batch[0], batch[1]
        sl = D.rank_slice(len(x))
        dev = D.local_tensor(next(model.parameters())).device
        x, y = x[sl].to(dev), y[sl].to(dev)
        if x.is_floating_point():
            x = x.to(next(model.parameters()).dtype)
        return x, y

    def _find_handler(self):
        """The Trainer's CallbackHandler calling this hook (the caller's frame), to move this callback ahead of the
        reporting callbacks; None when the caller is not one."""
        try:
            from transformers.trainer_callback import CallbackHandler
        except ImportError:  # pragma: no cover
            return None
        f = sys._getframe(2)
        for _ in range(3):
            if f is None:
                return None
            h = f.f_locals.get("self")
            if isinstance(h, CallbackHandler):
                return h
            f = f.f_back
        return None

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kw):
        self._check_options(args, state)
        handler = self._find_handler()
        if handler is not None and self in handler.callbacks:  # before the loggers, so that on_log reaches them
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
        x, y = self._make_probe_batch(train_dataloader, model)
        loss = self._loss(model, y)
        accum = max(1, int(args.gradient_accumulation_steps))
        try:
            spe = max(1, math.ceil(len(train_dataloader) / accum))
        except TypeError:
            spe = None
        epochs = math.ceil(state.max_steps / spe) if spe and state.max_steps else None
        if spe and epochs == 1:
            spe = min(spe, int(state.max_steps))  # one epoch cut short by max_steps: that many steps are planned
        self.monitor.batch = (x, y)
        self.monitor.samples_per_step = int(args.per_device_train_batch_size) * accum
        self.monitor.global_batch_size = self.monitor.samples_per_step * D.world_size()
        base = self.run_dir if self.run_dir is not None else Path(args.output_dir) / "gradcond"
        self._final = base
        partial = base.with_name(f".{base.name}.partial")
        if D.is_main():
            shutil.rmtree(partial, ignore_errors=True)
        self.run = RunLogger(partial if D.is_main() else None)
        cfg = self._config(args, state, model, epochs)
        self._cfg = cfg
        if D.is_main():
            from ..config import dumps
            from ..utils import atomic_write_text

            atomic_write_text(partial / "config.toml", dumps(cfg))
        self._state = TrainState(model, optimizer, loss, _Steps(spe) if spe else None, run=self.run, config=cfg,
                                 epochs=epochs)
        self._state.step = int(state.global_step)
        if D.is_main():
            self._state.log_event("monitor_attached", integration="transformers.Trainer",
                                  measured_at="on_optimizer_step (after optimizer.step, before zero_grad): "
                                              "accumulated, unscaled, clipped gradients", strategy=D.strategy(model),
                                  world_size=D.world_size(), gradient_accumulation_steps=accum,
                                  mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else "no",
                                  max_grad_norm=float(args.max_grad_norm or 0.0))
        self._t0 = time.perf_counter()
        self.monitor.on_train_start(self._state)

    def _config(self, args, state, model, epochs) -> dict:
        p = next(model.parameters())
        return {"name": self._final.name, "seed": int(args.seed), "compare_teleport": False,
                "dtype": "float64" if p.dtype == torch.float64 else "float32",
                "model": {"name": type(model).__name__}, "data": {"name": "Trainer.train_dataset", "batch_size":
                                                                   int(args.per_device_train_batch_size)},
                "optim": {"name": str(args.optim), "lr": float(args.learning_rate)},
                "train": {"epochs": int(epochs or 1), "max_steps": int(state.max_steps or 0),
                          "gradient_accumulation_steps": int(args.gradient_accumulation_steps)},
                "monitor": {"budget": self.monitor.budget, "probe_batch_size": self.monitor.probe_batch_size},
                "integration": {"name": "transformers.Trainer", "strategy": D.strategy(model),
                                "world_size": D.world_size(), "bf16": bool(args.bf16), "fp16": bool(args.fp16)}}

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self._state is not None:
            self._state.step = int(state.global_step)
            self.monitor.before_update(self._state, step=int(state.global_step) + 1)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        st = self._state
        if st is None:
            return
        st.step = int(state.global_step) + 1  # the Trainer increments global_step after this hook
        st.epoch = self._epoch
        if bool(getattr(optimizer, "step_was_skipped", False)):
            if D.is_main():
                st.log_event("optimizer_step_skipped", reason="the gradient scaler found inf/NaN gradients and "
                                                              "skipped this step; it was not measured")
                st.log_metrics([("monitor", "", "skipped_step", 1.0)])
            return
        n0 = len(self.run.metrics)
        self.monitor.on_step_end(st)
        self._collect(n0)

    def on_epoch_end(self, args, state, control, **kw):
        st = self._state
        if st is None:
            return
        st.step, st.epoch = int(state.global_step), self._epoch
        n0 = len(self.run.metrics)
        self.monitor.on_epoch_end(st)
        self._collect(n0)
        self._epoch += 1

    def _collect(self, n0: int) -> None:
        for r in self.run.metrics[n0:]:
            if r["probe"] == "monitor" or (r["layer"] and not self.log_layers):
                continue
            key = "/".join(p for p in ("gradcond", r["probe"], r["name"], r["layer"]) if p)
            self._pending[key] = r["value"]

    def on_log(self, args, state, control, logs=None, **kw):
        if self._state is None or logs is None:
            return
        if "loss" in logs and D.is_main():  # the Trainer's training loss, for the report's curves
            st = self._state
            st.step = int(state.global_step)
            st.log_metrics([("train", "", "loss", float(logs["loss"]))])
        if self._pending:
            new = {k: v for k, v in self._pending.items() if k not in logs}
            logs.update(new)
            if state.log_history and isinstance(state.log_history[-1], dict):
                state.log_history[-1].update(new)
            self._pending.clear()

    def on_train_end(self, args, state, control, model=None, **kw):
        st = self._state
        if st is None:
            return
        self.monitor.on_train_end(st)
        if D.is_main() and self.run.path is not None:
            partial = self.run.path
            if self.report:
                from ..report.run_report import write_run_report

                t = time.process_time()
                write_run_report(partial, self._cfg, {"plain": partial}, seconds=time.perf_counter() - self._t0,
                                 model=model)
                self.report_cpu_s = time.process_time() - t  # the one-off cost of the report (benchmarks read it)
            old = self._final.with_name(f".{self._final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if self._final.exists():
                self._final.rename(old)
            partial.rename(self._final)
            shutil.rmtree(old, ignore_errors=True)
            self.run.path = self._final
        self._state = None

    # ---- results -------------------------------------------------------------------------------------------------
    @property
    def run_path(self) -> Path | None:
        """The published run directory (after training; None on ranks other than 0)."""
        return self._final if D.is_main() else None

    @property
    def rows(self) -> list[dict]:
        return [] if self.run is None else self.run.metrics

    @property
    def events(self) -> list[dict]:
        return [] if self.run is None else self.run.events
