"""A plain PyTorch training loop with callbacks, evaluation each epoch, checkpoints and exact resume."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..utils import progress as progress_bar_factory
from .losses import get_loss
from .run import RunLogger

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "adamw")
SCHEDULES = ("constant", "step", "plateau")


class Callback:
    """Base class of trainer callbacks: override any hook; each receives the :class:`TrainState`.

    Callbacks may change the model's parameters or the optimizer's state in place (e.g. a teleport); the
    trainer keeps using the same objects. For exact resume, define ``state_dict()`` / ``load_state_dict()``.
    """

    def on_train_start(self, state: "TrainState") -> None: ...
    def on_epoch_start(self, state: "TrainState") -> None: ...
    def on_step_start(self, state: "TrainState") -> None: ...
    def on_step_end(self, state: "TrainState") -> None: ...
    def on_epoch_end(self, state: "TrainState") -> None: ...
    def on_train_end(self, state: "TrainState") -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class TrainState:
    """What the callbacks see. ``step`` counts optimizer steps done; ``epoch`` is 0-based."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: object
    train_loader: object
    test_loader: object = None
    run: RunLogger | None = None
    config: dict = field(default_factory=dict)
    batch: tuple | None = None
    step: int = 0
    epoch: int = 0
    loss: float = float("nan")
    task: str = "classification"
    stop_training: bool = False

    @property
    def events(self) -> list[dict]:
        return self.run.events

    @property
    def metrics(self) -> list[dict]:
        return self.run.metrics

    def log_event(self, kind: str, **fields) -> dict:
        """Append an event ``{kind, step, epoch, time, **fields}`` to ``events.jsonl`` (or memory)."""
        record = {"kind": kind, "step": self.step, "epoch": self.epoch, "time": time.time(), **fields}
        self.run.event(record)
        return record

    def log_metric(self, probe: str, name: str, value, layer: str = "") -> None:
        """Append one long-format row (step, epoch, probe, layer, name, value) to ``metrics.csv`` (or memory)."""
        self.log_metrics([(probe, layer, name, value)])

    def log_metrics(self, rows) -> None:
        """Append many ``(probe, layer, name, value)`` tuples at once."""
        self.run.metric_rows(
            [{"step": self.step, "epoch": self.epoch, "probe": p, "layer": l, "name": n, "value": float(v)} for p, l, n, v in rows]
        )


@dataclass
class History:
    rows: list[dict]
    events: list[dict]
    metrics: list[dict]
    seconds: float = 0.0

    def column(self, key: str) -> list[float]:
        return [r[key] for r in self.rows]


def make_optimizer(name, params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0):
    """Build an optimizer by name: sgd, momentum (SGD with ``momentum``), adagrad, adam, adamw."""
    if isinstance(name, torch.optim.Optimizer):
        return name
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}.")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"learning rate must be a positive finite number, got {lr}.")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay or 0.01)


def make_schedule(name: str, optimizer, step_size: int = 10, gamma: float = 0.1, patience: int = 2, factor: float = 0.5):
    """Learning-rate schedule stepped once per epoch: constant, step (StepLR), plateau (on the train loss)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; accepted: {', '.join(SCHEDULES)}.")
    if name == "constant":
        return None
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=factor, patience=patience)


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn, task: str) -> tuple[float, float]:
    """Mean loss and accuracy (NaN for regression) over ``loader`` in eval mode; restores the model's mode."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for x, y in loader:
            x = x.to(dtype) if x.is_floating_point() else x
            y = y.to(dtype) if y.is_floating_point() else y
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * len(x)
            if task == "classification":
                correct += int((out.argmax(1) == y).sum())
            total += len(x)
    finally:
        model.train(was_training)
    return loss_sum / max(total, 1), (correct / max(total, 1) if task == "classification" else float("nan"))


def _checkpoint_path(run: RunLogger) -> Path:
    return run.path / "checkpoints" / "last.pt"


def fit(
    model: nn.Module,
    train_loader,
    test_loader=None,
    *,
    loss="cross_entropy",
    optimizer="sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    epochs: int = 1,
    schedule: str = "constant",
    schedule_kwargs: dict | None = None,
    callbacks=(),
    seed: int = 0,
    progress_bar: bool = False,
    run: RunLogger | None = None,
    resume: bool = False,
    task: str | None = None,
    config: dict | None = None,
    progress: bool | None = None,
) -> History:
    """Train ``model`` for ``epochs`` epochs and evaluate after each one.

    Per epoch it logs long-format rows ``train/loss``, ``train/acc``, ``test/loss``, ``test/acc`` and ``lr`` (probe
    ``train``/``test``/``optim``); with a run directory it saves ``checkpoints/last.pt`` after every epoch (model,
    optimizer, schedule, RNG and data-order state, callback states, row counts) so that ``resume=True``
    continues bit-exactly. Assumes the model's parameters share one floating dtype (float32 or float64); floating
    inputs are cast to it. Returns a :class:`History`.
    """
    if progress is not None:
        progress_bar = progress
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}.")
    loss_fn = get_loss(loss)
    if task is None:
        task = "classification" if loss in ("cross_entropy",) or loss_fn is get_loss("cross_entropy") else "regression"
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = make_schedule(schedule, opt, **(schedule_kwargs or {}))
    run = run if run is not None else RunLogger(None)
    callbacks = list(callbacks)
    state = TrainState(model, opt, loss_fn, train_loader, test_loader, run, dict(config or {}), task=task)
    dtype = next(model.parameters()).dtype
    rows: list[dict] = []
    start_epoch = 0
    torch.manual_seed(seed)
    gen = getattr(train_loader, "generator", None)

    if resume and run.path is not None and _checkpoint_path(run).exists():
        ck = torch.load(_checkpoint_path(run), weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("schedule") is not None:
            sched.load_state_dict(ck["schedule"])
        torch.set_rng_state(ck["rng"])
        if gen is not None and ck.get("data_rng") is not None:
            gen.set_state(ck["data_rng"])
        for cb, cs in zip(callbacks, ck.get("callbacks", [])):
            cb.load_state_dict(cs)
        run.truncate(ck["n_metrics"], ck["n_events"])
        rows = ck["rows"]
        start_epoch, state.step = ck["epoch"] + 1, ck["step"]
    elif run.path is not None and run.n_metrics:
        run.truncate(0, 0)  # a fresh (non-resumed) run starts from empty files

    t0 = time.perf_counter()
    model.train()
    if start_epoch == 0:
        for cb in callbacks:
            cb.on_train_start(state)
    n_batches = len(train_loader) if hasattr(train_loader, "__len__") else None
    total = None if n_batches is None else n_batches * (epochs - start_epoch)
    bar = progress_bar_factory(total=total, desc="train", unit="step") if progress_bar else None
    try:
        for epoch in range(start_epoch, epochs):
            state.epoch = epoch
            for cb in callbacks:
                cb.on_epoch_start(state)
            loss_sum, correct, seen = 0.0, 0, 0
            for x, y in train_loader:
                x = x.to(dtype) if x.is_floating_point() else x
                y = y.to(dtype) if y.is_floating_point() else y
                state.batch = (x, y)
                for cb in callbacks:
                    cb.on_step_start(state)
                opt.zero_grad(set_to_none=True)
                out = model(x)
                batch_loss = loss_fn(out, y)
                if not torch.isfinite(batch_loss):
                    raise FloatingPointError(
                        f"training loss became {float(batch_loss.detach())} at step {state.step} (epoch {epoch}); "
                        "lower the learning rate or check the data."
                    )
                batch_loss.backward()
                opt.step()
                state.step += 1
                state.loss = float(batch_loss.detach())
                loss_sum += state.loss * len(x)
                if task == "classification":
                    correct += int((out.detach().argmax(1) == y).sum())
                seen += len(x)
                for cb in callbacks:
                    cb.on_step_end(state)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{state.loss:.4f}")
                if state.stop_training:
                    break
            row = {"epoch": epoch, "step": state.step, "train_loss": loss_sum / max(seen, 1)}
            if task == "classification":
                row["train_acc"] = correct / max(seen, 1)
            if test_loader is not None:
                row["test_loss"], acc = evaluate(model, test_loader, loss_fn, task)
                if task == "classification":
                    row["test_acc"] = acc
            row["lr"] = opt.param_groups[0]["lr"]
            rows.append(row)
            state.log_metrics(
                [(k.split("_")[0] if k != "lr" else "optim", "", k.split("_")[-1] if k != "lr" else "lr", v)
                 for k, v in row.items() if k not in ("epoch", "step")]
            )
            if sched is not None:
                sched.step(row["train_loss"]) if schedule == "plateau" else sched.step()
            for cb in callbacks:
                cb.on_epoch_end(state)
            if run.path is not None:
                _save_checkpoint(run, model, opt, sched, gen, callbacks, rows, epoch, state.step)
            if state.stop_training:
                break
        for cb in callbacks:
            cb.on_train_end(state)
    finally:
        if bar is not None:
            bar.close()
    return History(rows, run.events, run.metrics, time.perf_counter() - t0)


def _save_checkpoint(run, model, opt, sched, gen, callbacks, rows, epoch, step) -> None:
    ck = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "schedule": sched.state_dict() if sched is not None else None,
        "rng": torch.get_rng_state(),
        "data_rng": gen.get_state() if gen is not None else None,
        "callbacks": [cb.state_dict() for cb in callbacks],
        "rows": rows,
        "epoch": epoch,
        "step": step,
        "n_metrics": run.n_metrics,
        "n_events": run.n_events,
    }
    path = _checkpoint_path(run)
    tmp = path.with_suffix(".tmp")
    torch.save(ck, tmp)
    tmp.replace(path)  # atomic: a crash mid-save leaves the previous checkpoint intact
