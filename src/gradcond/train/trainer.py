"""A plain PyTorch training loop with callbacks, evaluation each epoch, checkpoints and exact resume."""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..callbacks import Callback  # noqa: F401  (the protocol lives in gradcond.callbacks; re-exported here)
from ..distributed import active as _dist_active, is_main, rank as _dist_rank, unwrap, world_size as _world_size
from ..utils import TrainingDiverged, UserError, module_device, resolve_device
from ..utils import progress as progress_bar_factory
from .losses import get_loss
from .run import RunLogger

from ..config import OPTIMIZERS, SCHEDULES  # noqa: E402  (the names a config accepts are the ones fit accepts)


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
    epochs: int | None = None  # epochs fit() was asked to train (None outside fit); the monitor plans with it
    device: torch.device | None = None  # where fit() puts the batches (the model's device); None outside fit

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
        """Append many ``(probe, layer, name, value)`` tuples at once (names in ``TIMING_NAMES`` go to timings)."""
        self.run.metric_rows(
            [{"step": self.step, "epoch": self.epoch, "probe": p, "layer": l, "name": n, "value": float(v)} for p, l, n, v in rows]
        )

    def log_timings(self, rows) -> None:
        """Append ``(probe, layer, name, value)`` timing tuples (wall seconds, time shares) to ``timings.csv``.

        Timings vary between executions, so they never go to ``metrics.csv`` (which a resumed run reproduces
        byte for byte)."""
        self.run.timing_rows(
            [{"step": self.step, "epoch": self.epoch, "probe": p, "layer": l, "name": n, "value": float(v)} for p, l, n, v in rows]
        )


@dataclass
class History:
    rows: list[dict]
    events: list[dict]
    metrics: list[dict]
    seconds: float = 0.0
    timings: list[dict] = field(default_factory=list)

    def column(self, key: str) -> list[float]:
        return [r[key] for r in self.rows]


def make_optimizer(name, params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0):
    """Build an optimizer by name: sgd, momentum (SGD with ``momentum``), adagrad, adam, adamw."""
    if isinstance(name, torch.optim.Optimizer):
        return name
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}.")
    if not (_is_number(lr) and lr > 0):
        raise ValueError(f"learning rate must be a positive finite number, got {lr!r}.")
    if not (_is_number(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}.")
    if name == "momentum" and not (_is_number(momentum) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}.")
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
        if not (isinstance(step_size, numbers.Integral) and not isinstance(step_size, bool) and step_size >= 1):
            raise ValueError(f"step schedule needs step_size a positive integer (epochs), got {step_size!r}.")
        if not (_is_number(gamma) and gamma > 0):
            raise ValueError(f"step schedule needs gamma a positive number, got {gamma!r}.")
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if not (_is_number(factor) and 0 < factor < 1):
        raise ValueError(f"plateau schedule needs factor a number in (0, 1), got {factor!r}.")
    if not (isinstance(patience, numbers.Integral) and not isinstance(patience, bool) and patience >= 0):
        raise ValueError(f"plateau schedule needs patience an integer >= 0, got {patience!r}.")
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=factor, patience=patience)


def _is_number(v) -> bool:
    """A finite real number (Python or numpy scalar; not a bool, not a string)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn, task: str) -> tuple[float, float]:
    """Mean loss and accuracy (NaN for regression) over ``loader`` in eval mode; restores the model's mode.

    Accuracy is the share of *targets* predicted right (``argmax`` over dim 1): one per sample for ``(N,)`` targets,
    one per position for per-position targets (``(N, C, T)`` logits and ``(N, T)`` targets, e.g. a language model)."""
    was_training = model.training
    model.eval()
    dtype, device = next(model.parameters()).dtype, module_device(model)
    total, loss_sum, correct, targets = 0, 0.0, 0, 0
    try:
        for x, y in loader:
            x, y = to_model(x, dtype, device), to_model(y, dtype, device)
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * len(x)
            if task == "classification":
                correct += int((out.argmax(1) == y).sum())
                targets += y.numel()
            total += len(x)
    finally:
        model.train(was_training)
    return loss_sum / max(total, 1), (correct / max(targets, 1) if task == "classification" else float("nan"))


def to_model(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a floating tensor is also cast to the model's floating ``dtype`` (integer labels keep
    theirs). A no-op when already there. Copies *to* a GPU are ``non_blocking`` (from pinned host memory they
    overlap with GPU work; CUDA orders them before the kernels that read them); a copy to the CPU blocks, because a
    non-blocking device-to-host copy may be read before it has landed."""
    nb = device.type == "cuda"
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype, non_blocking=nb)
    return t.to(device=device, non_blocking=nb)


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
    progress_bar: bool | None = None,
    run: RunLogger | None = None,
    resume: bool = False,
    task: str | None = None,
    config: dict | None = None,
    progress: bool | None = None,
    device=None,
) -> History:
    """Train ``model`` for ``epochs`` epochs and evaluate after each one.

    Per epoch it logs long-format rows ``train/loss``, ``train/acc``, ``test/loss``, ``test/acc`` and ``lr`` (probe
    ``train``/``test``/``optim``); with a run directory it saves ``checkpoints/last.pt`` after every epoch (model,
    optimizer, schedule, RNG and data-order state, callback states, row counts) so that ``resume=True``
    continues bit-exactly. Assumes the model's parameters share one floating dtype (float32 or float64); floating
    inputs are cast to it. Returns a :class:`History`.

    Device: training runs where the model is. ``device=None`` keeps the model where it is (the device of its first
    parameter); ``device="cpu" | "cuda" | "cuda:N" | "auto"`` (or a ``torch.device``) first moves the model there
    **in place**, like ``model.to(device)`` (the caller's model object ends up on that device), and refuses CUDA
    when there is none (:class:`~gradcond.utils.UserError`). Every batch (inputs and targets) is moved to that
    device with ``.to(device, non_blocking=True)``, so loaders may yield CPU tensors; callbacks see the moved batch
    in ``state.batch`` and the device in ``state.device``.

    DDP (``torch.distributed`` initialised, more than one rank; ``model`` may be wrapped in
    ``DistributedDataParallel``): only rank 0 writes ``run`` (metrics, events, checkpoints); other ranks log in
    memory (give them ``run=None``: a ``RunLogger`` with a path creates its directory when built). The logged
    ``train/*`` rows are rank 0's shard; ``test/*`` rows are evaluated on rank 0's replica. Every epoch the ranks'
    random streams (global RNG, data-loader generator) are gathered and rank 0's checkpoint holds all of them
    (``ranks``, ``world_size``); ``resume=True`` makes rank 0 read the checkpoint and send it to every rank, each
    rank restoring its own streams, so a resumed DDP run continues exactly -- with the same number of ranks (another
    number is a :class:`~gradcond.utils.UserError`). Callbacks see the wrapped model; the monitor and teleports
    work on ``model.module`` (:mod:`gradcond.distributed`). Checkpoints hold the inner module's state dict.

    Progress: a bar over the optimizer steps (epoch and loss in its postfix) on stderr when stderr is a terminal,
    not :func:`~gradcond.utils.set_quiet`, and training lasts over a second (:func:`gradcond.utils.progress`);
    ``progress=False`` (or the older ``progress_bar=False``) turns it off.
    """
    if progress is None:
        progress = True if progress_bar is None else bool(progress_bar)
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}.")
    if device is not None:
        model.to(resolve_device(device, flag="device"))  # before the optimizer is built on its parameters
    device = module_device(model)
    loss_fn = get_loss(loss)
    if task is None:
        task = ("classification" if loss in ("cross_entropy",) or loss_fn is get_loss("cross_entropy")
                or getattr(loss_fn, "task", None) == "classification" else "regression")  # GA losses say so
    opt = make_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = make_schedule(schedule, opt, **(schedule_kwargs or {}))
    run = run if run is not None else RunLogger(None)
    if _dist_active() and not is_main():
        run = RunLogger(None)  # one writer: ranks other than 0 log in memory only (pass run=None there)
    callbacks = list(callbacks)
    state = TrainState(model, opt, loss_fn, train_loader, test_loader, run, dict(config or {}), task=task, epochs=epochs,
                       device=device)
    dtype = next(model.parameters()).dtype
    rows: list[dict] = []
    start_epoch = 0
    torch.manual_seed(seed)
    gen = getattr(train_loader, "generator", None)

    if resume and _sharded(model):
        raise UserError("resume=True is not supported for an FSDP2 (fully_shard) model: its checkpoint holds the "
                        "gathered full state, which this loop does not re-shard; resume under DDP or in one process, "
                        "or start a fresh run.")
    ck = _resume_checkpoint(run) if resume else None
    if ck is not None:
        _check_world(ck)
        unwrap(model).load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None and ck.get("schedule") is not None:
            sched.load_state_dict(ck["schedule"])
        own = ck["ranks"][_dist_rank()] if ck.get("ranks") else ck  # each rank's own random streams
        torch.set_rng_state(own["rng"])
        if device.type == "cuda" and own.get("cuda_rng") is not None:  # dropout etc. on the GPU draw from this one
            torch.cuda.set_rng_state(own["cuda_rng"], device)
        if gen is not None and own.get("data_rng") is not None:
            gen.set_state(own["data_rng"])
        for cb, cs in _match_callback_states(callbacks, ck.get("callbacks", [])):
            cb.load_state_dict(cs)
        run.truncate(ck["n_metrics"], ck["n_events"], ck.get("n_timings"))
        rows = ck["rows"]
        start_epoch, state.step = ck["epoch"] + 1, ck["step"]
    elif run.path is not None and (run.n_metrics or run.n_events or run.n_timings):
        run.truncate(0, 0, 0)  # a fresh (non-resumed) run starts from empty files

    n_batches = len(train_loader) if hasattr(train_loader, "__len__") else None
    for msg in unreachable_schedules(callbacks, epochs, n_batches):
        warnings.warn(msg, UnreachableCallbackWarning, stacklevel=2)
    t0 = time.perf_counter()
    model.train()
    if start_epoch == 0:
        for cb in callbacks:
            cb.on_train_start(state)
    total = None if n_batches is None else n_batches * (epochs - start_epoch)
    bar = progress_bar_factory(total=total, desc="train", unit="step") if progress else None
    try:
        for epoch in range(start_epoch, epochs):
            state.epoch = epoch
            for cb in callbacks:
                cb.on_epoch_start(state)
            loss_sum, correct, seen, targets = 0.0, 0, 0, 0
            for x, y in state.train_loader:  # a data filter (train.filters) may swap it at on_epoch_start
                x, y = to_model(x, dtype, device), to_model(y, dtype, device)
                state.batch = (x, y)
                for cb in callbacks:
                    cb.on_step_start(state)
                opt.zero_grad(set_to_none=True)
                out = model(x)
                batch_loss = loss_fn(out, y)
                if not torch.isfinite(batch_loss):
                    raise TrainingDiverged(
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
                    targets += y.numel()  # per-position targets: accuracy over positions, not samples
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
                row["train_acc"] = correct / max(targets, 1)
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
            ranks = _gather_rank_streams(gen, device)  # collective under DDP/FSDP2: every rank, every epoch
            if run.path is not None or _sharded(model):  # FSDP2: every rank takes part in gathering the state
                _save_checkpoint(run, model, opt, sched, gen, callbacks, rows, epoch, state.step, config, device,
                                 ranks)
            if state.stop_training:
                break
        for cb in callbacks:
            cb.on_train_end(state)
    finally:
        if bar is not None:
            bar.close()
    return History(rows, run.events, run.metrics, time.perf_counter() - t0, run.timings)


class UnreachableCallbackWarning(RuntimeWarning):
    """A callback is scheduled at an epoch or step that the training never reaches."""


def unreachable_schedules(callbacks, epochs: int, steps_per_epoch: int | None) -> list[str]:
    """One sentence per callback whose schedule lies (partly) after the last epoch/step, so it would silently never
    fire. Reads the schedule attributes the built-in callbacks use: ``at_epoch`` / ``schedule`` (0-based epochs)
    and ``at_step`` (fires when ``state.step == s``, i.e. needs ``s < epochs * steps_per_epoch``)."""
    out = []
    for cb in callbacks:
        name = type(cb).__name__
        for attr in ("at_epoch", "schedule"):
            vals = getattr(cb, attr, None)
            if isinstance(vals, (set, list, tuple, range)) and all(isinstance(v, int) for v in vals):
                late = sorted(v for v in vals if v >= epochs)
                if late:
                    out.append(f"callback {name} is scheduled at epoch(s) {', '.join(map(str, late))} (0-based) but "
                               f"training runs {epochs} epoch(s), 0-{epochs - 1}; it will not fire there.")
        vals = getattr(cb, "at_step", None)
        if steps_per_epoch is not None and isinstance(vals, (set, list, tuple)) and all(isinstance(v, int) for v in vals):
            total = epochs * steps_per_epoch
            late = sorted(v for v in vals if v >= total)
            if late:
                out.append(f"callback {name} is scheduled at step(s) {', '.join(map(str, late))} but training makes "
                           f"{total} optimizer steps ({epochs} epochs x {steps_per_epoch}); it will not fire there.")
    return out


def _callback_key(cb) -> str:
    return f"{type(cb).__module__}.{type(cb).__qualname__}"


# Checkpoints written before a callback's module was renamed store its old key: map old -> current key on resume.
_RENAMED_CALLBACKS = {"gradcond.teleport.callback.TeleportCallback": "gradcond.teleport.cob_callback.TeleportCallback"}


def _match_callback_states(callbacks, saved) -> list:
    """Pair each callback with its saved state: by class, in order (a ``stop_after`` added or dropped on resume
    does not shift the others). Checkpoints of older versions store bare states: paired by position."""
    if saved and not all(isinstance(s, dict) and set(s) == {"type", "state"} for s in saved):
        return list(zip(callbacks, saved))
    pairs, used = [], set()
    for cb in callbacks:
        key = _callback_key(cb)
        for i, s in enumerate(saved):
            if i not in used and _RENAMED_CALLBACKS.get(s["type"], s["type"]) == key:
                used.add(i)
                pairs.append((cb, s["state"]))
                break
    return pairs


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`fit` without executing code, or refuse it in one sentence.

    First every member's CRC-32 is checked (``zipfile.testzip``: a checkpoint is a zip archive), so a truncated or
    bit-flipped file is reported as "corrupt or truncated" before anything is unpickled; then
    ``torch.load(weights_only=True)`` admits only tensors, containers and plain scalars. A file that needs anything
    else (e.g. a pickle whose ``__reduce__`` calls a function) is refused, naming what it holds; nothing in it runs,
    and the message never suggests loading it less safely. Both are :class:`~gradcond.utils.UserError`."""
    import pickle
    import re
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        problem = None if bad is None else f"member {bad} fails its CRC check"
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist.") from None
    except PermissionError as exc:
        raise UserError(f"checkpoint {path} cannot be read ({exc.strerror}).") from None
    except Exception as exc:  # BadZipFile, EOFError, a damaged header read as an unknown compression method, ...
        problem = f"not a readable zip archive: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if problem is not None:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({problem}); delete it (or the run) and train "
                        "again without --resume.")
    try:
        ck = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        what = re.search(r"GLOBAL ([\w.]+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if what:  # the pickle asks for a function or class: what a crafted file does to run code
            raise UserError(f"checkpoint {path} was refused: it holds a reference to {what.group(1)}, which loading "
                            "could execute; gradcond only loads checkpoints of tensors and plain values - delete it "
                            "unless you wrote it with gradcond.") from None
        # else a damaged pickle inside an archive whose checksums pass (e.g. a damaged directory entry)
        first = "damaged pickle" if isinstance(exc, pickle.UnpicklingError) else \
            (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {first}); delete it (or "
                        "the run) and train again without --resume.") from None
    if not isinstance(ck, dict) or not {"model", "optimizer", "epoch", "step"} <= set(ck):
        raise UserError(f"checkpoint {path} is not a gradcond training checkpoint (missing model/optimizer/epoch/step).")
    digest = ck.pop("digest", None)  # checkpoints of older versions have none
    if digest is not None and digest != content_digest(ck):
        raise UserError(f"checkpoint {path} is corrupt or truncated (its content does not match the digest saved with "
                        "it); delete it (or the run) and train again without --resume.")
    return ck


def content_digest(obj) -> str:
    """SHA-256 of a checkpoint's content (nested dicts, lists, tuples, tensors and plain scalars, in order): saved
    in the checkpoint and checked on load, so damage that the zip checksums miss (a corrupted directory entry that
    makes a reader take its bytes from the wrong place) is found too. Cost: one pass over the tensors' bytes."""
    import hashlib

    h = hashlib.sha256()

    def walk(o):
        if torch.is_tensor(o):
            t = o.detach().contiguous().cpu()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(f"D{len(o)}".encode())
            for k, v in o.items():
                walk(k)
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"{'L' if isinstance(o, list) else 'U'}{len(o)}".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"S{type(o).__name__}:{o!r};".encode())

    walk(obj)
    return h.hexdigest()


def _plain_config(config):
    """``config`` as plain JSON values (what ``weights_only`` loading admits), or None when it holds anything else."""
    if not config:
        return None
    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError):
        return None


def _sharded(model) -> bool:
    """True for an FSDP2 model (``DTensor`` parameters) in an active process group."""
    from ..distributed import strategy

    return _dist_active() and strategy(model) == "fsdp2"


def _full_state(model, opt):
    """Model and optimizer state dicts with whole tensors: under FSDP2 gathered from the shards to every rank's CPU
    with ``torch.distributed.checkpoint.state_dict`` (collective: every rank calls it; a checkpoint, unlike a
    measurement, needs the full parameters), keyed like the unsharded model's; otherwise the plain state dicts."""
    if not _sharded(model):
        return unwrap(model).state_dict(), opt.state_dict()  # the inner module's keys (no DDP "module.")
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)


def _rank_streams(gen, device) -> dict:
    """This process's random streams: the global torch RNG, the GPU's, the data loader's generator."""
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None,
            "data_rng": gen.get_state() if gen is not None else None}


def _gather_rank_streams(gen, device) -> list[dict] | None:
    """Under DDP: every rank's :func:`_rank_streams`, in rank order (one ``all_gather_object`` per epoch; each rank
    shuffles its own shard with its own generator, so a resume needs all of them). None in one process."""
    if not _dist_active():
        return None
    everyone: list = [None] * _world_size()
    torch.distributed.all_gather_object(everyone, {k: (v.cpu() if torch.is_tensor(v) else v)
                                                   for k, v in _rank_streams(gen, device).items()})
    return everyone


def _resume_checkpoint(run) -> dict | None:
    """The checkpoint to resume from, or None for a fresh start. Under DDP rank 0 reads it (only rank 0 has the run
    directory) and sends it to every rank; a checkpoint rank 0 cannot read raises on every rank."""
    def read():
        path = _checkpoint_path(run) if run.path is not None else None
        return load_checkpoint(path) if path is not None and path.exists() else None

    if not _dist_active():
        return read()
    from ..distributed import run_on_main

    box = [run_on_main(read)]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _check_world(ck: dict) -> None:
    """A checkpoint is resumed with the number of ranks that wrote it (each rank trains its own shard)."""
    saved = int(ck.get("world_size") or (0 if any(str(k).startswith("module.") for k in ck["model"]) else 1))
    if saved != _world_size():
        how = "in one process" if saved == 1 else f"with --nproc {saved}" if saved else "with an unknown number " \
              "of processes (an older checkpoint)"
        raise UserError(f"the checkpoint was written by a run trained {how}; resume it with the same number of "
                        f"processes (this run has {_world_size()}).")


def _save_checkpoint(run, model, opt, sched, gen, callbacks, rows, epoch, step, config=None, device=None,
                     ranks=None) -> None:
    from ..distributed import strategy

    model_state, opt_state = _full_state(model, opt)
    if run.path is None:  # FSDP2 ranks other than 0: they only took part in gathering the state
        return
    ck = {
        "model": model_state,
        "optimizer": opt_state,
        "strategy": strategy(model),
        "schedule": sched.state_dict() if sched is not None else None,
        **_rank_streams(gen, device),
        "ranks": ranks,  # under DDP: every rank's streams, in rank order
        "world_size": _world_size(),
        "callbacks": [{"type": _callback_key(cb), "state": cb.state_dict()} for cb in callbacks],
        "rows": rows,
        "epoch": epoch,
        "step": step,
        "n_metrics": run.n_metrics,
        "n_events": run.n_events,
        "n_timings": run.n_timings,
        "config": _plain_config(config),
    }
    path = _checkpoint_path(run)
    tmp = path.with_suffix(".tmp")
    ck["digest"] = content_digest(ck)  # checked by load_checkpoint
    # torch.save into memory first: writing its bytes ourselves turns a full disk into OSError(ENOSPC) (torch.save
    # straight to a file raises a RuntimeError from its zip writer instead), which the runner reports in one line
    buf = io.BytesIO()
    torch.save(ck, buf)
    try:
        _write_file(tmp, buf.getbuffer())
        tmp.replace(path)  # atomic: a crash (or a full disk) mid-save leaves the previous checkpoint intact
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_file(path: Path, data) -> None:
    """Write ``data`` to ``path`` and flush it to the disk (OSError on a full disk, not later at close)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
