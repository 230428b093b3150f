"""``gradcond run``: resolve a config, build data/model/optimizer, train into a run directory, write the report.

Everything that can fail on bad input (names, options, shapes) is checked *before* the run directory is created.
Training writes into ``<out>/.<name>.partial/``; only a finished run is renamed to ``<out>/<name>/`` (replacing an
older finished run of that name), so a run directory is never half-written.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import config as cfgmod
from .callbacks import Callback
from . import distributed as _dist
from .utils import TrainingDiverged, UserError, atomic_write_text, is_quiet, resolve_device
# which data form and size keywords a zoo model takes live with the zoo (gradcond.diagnose uses them too)
from .zoo import CNN_MODELS, input_form, model_kwargs_for  # noqa: F401  (CNN_MODELS re-exported)


@dataclass
class Job:
    """Everything a run needs, built and checked before anything is written."""

    cfg: dict
    bundle: object
    model: torch.nn.Module
    loss: str
    callbacks: list
    device: torch.device = torch.device("cpu")  # where the model is and where fit() moves the batches


def build_job(cfg: dict, model_state: dict | None = None, device="cpu") -> Job:
    """Build and check everything a run needs (data, model on ``device``, loss, optimizer/schedule options,
    callbacks) without writing anything; bad input raises :class:`UserError`. The data stay on the CPU (the
    trainer moves each batch); ``device`` is checked first (:func:`~gradcond.utils.resolve_device`)."""
    from . import data, zoo
    from .train import get_loss, make_optimizer, make_schedule
    from .train.callbacks import build_callback

    device = resolve_device(device)
    dtype = torch.float64 if cfg["dtype"] == "float64" else torch.float32
    mcfg = dict(cfg["model"])
    mname = mcfg.pop("name", None)
    if mname is None:
        raise UserError(f"[model] needs a name; accepted: {', '.join(zoo.names())}.")
    # init = "platonic": build with the default init, then fit the weights in closed form (gradcond.closedform);
    # model.platonic = {alpha = ..., ...} are fit_platonic options
    platonic = None
    if mcfg.get("init") == "platonic":
        mcfg.pop("init")
        platonic = mcfg.pop("platonic", {})
        if not isinstance(platonic, dict):
            raise UserError("model.platonic must be a table of fit_platonic options, e.g. {alpha = 0.1, beta = 10.0}.")
    dcfg = cfg["data"]
    form = input_form(mname) if dcfg["form"] == "auto" else dcfg["form"]
    try:
        zoo.check_options(mname, mcfg, prefix="model.")  # types and ranges of the [model] options, before any work
        bundle = data.load_dataset(dcfg["name"], form=form, seed=cfg["seed"], dtype=dtype, **dcfg.get("options", {}))
        kw = {**model_kwargs_for(mname, bundle), **mcfg}
        torch.manual_seed(cfg["seed"])
        model = zoo.build(mname, **kw).to(dtype)
        if platonic is not None and model_state is None:  # a resumed run loads its saved weights instead
            from .closedform import platonic_init_

            platonic = {"generator": torch.Generator().manual_seed(cfg["seed"]), **platonic}
            platonic_init_(model, *bundle.train.tensors, **platonic)
        if model_state is not None:
            model.load_state_dict(model_state)
        loss = bundle.loss if cfg["train"]["loss"] == "auto" else cfg["train"]["loss"]
        loss_fn = get_loss(loss)
        ocfg = cfg["optim"]
        make_optimizer(ocfg["name"], [torch.nn.Parameter(torch.zeros(1))], lr=ocfg["lr"], momentum=ocfg["momentum"],
                       weight_decay=ocfg["weight_decay"])
        scfg = cfg["schedule"]
        make_schedule(scfg["name"], torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
                      **_schedule_kwargs(scfg))
        callbacks = [build_callback(c) for c in cfg["callbacks"]]
        if cfg["monitor"]["enabled"]:
            callbacks.append(make_monitor(cfg["monitor"]))
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    # one forward + loss on a small batch: shape mismatches surface here, not mid-training
    x, y = bundle.train.tensors[0][:2], bundle.train.tensors[1][:2]
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            loss_fn(model(x), y)
        model.train(was)
    except Exception as exc:
        raise UserError(
            f"model {mname!r} does not fit dataset {dcfg['name']!r} (input shape {tuple(bundle.input_shape)}, "
            f"{bundle.num_outputs} outputs, loss {loss!r}): {str(exc).splitlines()[0]}"
        ) from None
    model.to(device)  # after the CPU shape check: the same error text wherever the run goes
    return Job(cfg, bundle, model, loss, callbacks, device)


def _schedule_kwargs(scfg: dict) -> dict:
    """The keywords of ``make_schedule`` that the ``[schedule]`` table's named schedule uses."""
    used = {"step": ("step_size", "gamma"), "plateau": ("patience", "factor")}.get(scfg["name"], ())
    return {k: scfg[k] for k in used if k in scfg}


def make_monitor(mcfg: dict):
    """The :class:`~gradcond.monitor.Monitor` of a run's ``[monitor]`` table."""
    from .monitor import PRESETS, Monitor

    if mcfg["schedule"] not in PRESETS:
        raise ValueError(f"unknown monitor schedule {mcfg['schedule']!r}; accepted: {', '.join(PRESETS)}.")
    probes = {**PRESETS[mcfg["schedule"]], **mcfg.get("probes", {})}
    return Monitor(probes, budget=mcfg["budget"], probe_batch_size=mcfg["probe_batch_size"])


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output directory {out} cannot be created ({exc.strerror}); pass a writable --out.") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out} is not writable; pass a writable --out.")


def train_into(job: Job, run_path: Path, resume: bool, extra_callbacks=(), desc: str = "train"):
    """Train ``job`` into ``run_path`` (a partial directory); returns the History."""
    from .train import RunLogger, fit

    cfg = job.cfg
    train_loader, test_loader = job.bundle.loaders(cfg["data"]["batch_size"], seed=cfg["seed"])
    model, run = job.model, None
    if _dist.active():  # a rank of `gradcond run --nproc N`: DDP or FSDP2 on this rank's shard, rank 0 writes the run
        train_loader = _shard_loader(job.bundle.train, cfg, _dist.rank(), _dist.world_size())
        model = wrap_for_strategy(job.model, cfg["distributed"]["strategy"], job.device)
    if _dist.is_main():
        run = RunLogger(run_path)
    return fit(
        model, train_loader, test_loader, loss=job.loss, optimizer=cfg["optim"]["name"], lr=cfg["optim"]["lr"],
        momentum=cfg["optim"]["momentum"], weight_decay=cfg["optim"]["weight_decay"], epochs=cfg["train"]["epochs"],
        schedule=cfg["schedule"]["name"], schedule_kwargs=_schedule_kwargs(cfg["schedule"]),
        callbacks=list(job.callbacks) + list(extra_callbacks), seed=cfg["seed"], progress=not is_quiet(), run=run,
        resume=resume, task=job.bundle.task, config=cfg, device=job.device,
    )


# Keys that may differ between a run and its --resume: more (or fewer) epochs extend (or end) the same run
# identically. `stop_after` callbacks only slice a run in time and are ignored when comparing callback lists.
# The device is not a config key (`run(..., device=)`, `--device`): a run may be resumed on another device.
RESUMABLE_KEYS = frozenset({"train.epochs"})


class NothingToResumeWarning(UserWarning):
    """``--resume`` of a run that has already trained its epochs: nothing was changed."""


def run(cfg: dict, out: str | Path = "runs", resume: bool = False, device="cpu", nproc=1, force: bool = False,
        given: set[str] | None = None) -> Path:
    """Run a resolved config into ``out/<name>/`` and return the path of its ``report.html``.

    One writer per run: an exclusive lock on ``out/.<name>.lock`` is held from before the partial directory is
    touched until the run is published; a second ``run`` of the same name into the same ``out`` raises
    :class:`UserError` naming the holder. A run is never replaced silently: a fresh run whose ``out/<name>/``
    holds a finished run, or whose ``out/.<name>.partial/`` holds an interrupted run with a checkpoint, raises
    :class:`UserError` unless ``force=True`` (which discards them); use another ``name`` to keep both.

    ``resume=True`` continues the run's partial directory (else its finished directory, for more epochs) from its
    last checkpoint. ``given``: the dotted keys the user set (the CLI passes the keys of the TOML file and of every
    ``--set``); keys not given are taken from the run's own config, so a resume keeps the run's epoch count unless
    ``train.epochs`` is given. ``given=None`` means every key of ``cfg`` was given. A given key that differs from
    the run's (except :data:`RESUMABLE_KEYS`; ``stop_after`` callbacks are ignored) raises :class:`UserError`
    listing the keys; fewer epochs than the checkpoint has trained raises :class:`UserError`; a finished run asked
    for no more epochs is left as it is, with a :class:`NothingToResumeWarning` saying so.

    A training loss that becomes NaN/inf raises :class:`~gradcond.utils.TrainingDiverged` (a fresh run's partial
    directory is removed); a write that fails (full disk, ...) raises :class:`UserError` and keeps the partial
    directory only when it holds a complete checkpoint to resume from (checkpoints are written to a temporary file
    and renamed, so the last one is intact).

    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``): where the model trains (both runs of a
    ``compare_teleport``); CUDA on a machine without it raises :class:`UserError` before anything is written. It is
    not part of the config, so ``resume=True`` may continue on another device (results then differ in the last
    bits, as between any two devices).

    ``nproc`` > 1 trains with that many local DDP ranks (:func:`run_ranks`); 1 (the default) is this process alone.
    """
    nproc = check_nproc(nproc, device)
    if _is_dpl(cfg):
        _dpl_plan(cfg, nproc)
        if resume:
            raise UserError("--resume is not supported with distributed.strategy = \"dpl\" (partition-wise runs "
                            "keep no checkpoint); run without --resume.")
    if nproc > 1:
        return run_ranks(cfg, out, nproc, resume=resume, device=device, force=force, given=given)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and not _dist.active():
        raise UserError("gradcond run was started by torchrun (WORLD_SIZE is set), which would make every process "
                        "train its own copy of the run; start it once with --nproc N instead.")
    out = Path(out)
    job = build_job(cfg, device=device)  # validates everything before the disk is touched
    _check_writable(out)
    name = cfg["name"]
    final, partial = out / name, out / f".{name}.partial"
    with RunLock(out, name):
        if resume:
            cfg, done = _prepare_resume(cfg, final, partial, given, world=1)
            if done:
                return final / "report.html"
            if cfg != job.cfg:
                job = build_job(cfg, device=device)
        else:
            _prepare_fresh(final, partial, force)
        try:
            return _run_locked(job, cfg, partial, final, resume)
        except TrainingDiverged:
            if not resume:
                shutil.rmtree(partial, ignore_errors=True)  # a diverged fresh run leaves nothing behind
            raise
        except OSError as exc:
            raise UserError(_write_failure(exc, partial, name, out, fresh=not resume)) from None
        except KeyboardInterrupt:
            from .utils import Interrupted

            raise Interrupted(f"interrupted; {_kept(partial, name, 1, fresh=not resume)}") from None


def _prepare_fresh(final: Path, partial: Path, force: bool) -> None:
    """Before a fresh run: refuse to replace a finished run, or an interrupted one that can be resumed, unless
    ``force``; remove a partial directory that holds nothing to resume from."""
    name = final.name
    if not force:
        if (final / "checkpoints" / "last.pt").exists() or (final / "report.html").exists():
            raise UserError(f"run directory {final} already holds a finished run; pass --force to replace it, "
                            f"--resume to continue it, or choose another name (--set name=...).")
        if (partial / "checkpoints" / "last.pt").exists():
            raise UserError(f"an interrupted run {name!r} is kept in {partial} (after {_epochs_done(partial)} "
                            f"epoch(s)); continue it with --resume, or pass --force to start over.")
    shutil.rmtree(partial, ignore_errors=True)


def _prepare_resume(cfg: dict, final: Path, partial: Path, given: set[str] | None, world: int):
    """Before a resume (lock held): the config to continue with (the run's own, with the given keys checked and
    ``train.epochs`` taken from ``cfg`` when given) and whether there is nothing to do. Copies a finished run into
    the partial directory when it gets more epochs (the old one stays until the extension is published)."""
    import warnings

    from .train import load_checkpoint

    name = final.name
    source = partial if (partial / "checkpoints" / "last.pt").exists() else final
    ck_path = source / "checkpoints" / "last.pt"
    if not ck_path.exists():
        raise UserError(f"nothing to resume in {final.parent}: no checkpoint for run {name!r}; run without --resume "
                        "first.")
    saved = saved_config(source)
    check_resume_config(saved, cfg, source, given)
    merged = copy.deepcopy(saved)
    if given is None or "train.epochs" in given:
        merged["train"]["epochs"] = cfg["train"]["epochs"]
    if given is None or "callbacks" in given:
        merged["callbacks"] = cfg["callbacks"]
    else:  # the run's own callbacks; a stop_after only cut the earlier session short
        merged["callbacks"] = [c for c in merged.get("callbacks") or [] if c.get("name") != "stop_after"]
    merged = cfgmod.resolve(merged)  # the saved config, checked like any other
    ck = load_checkpoint(ck_path)
    _refuse_other_world(ck, name, world)
    trained, epochs = int(ck["epoch"]) + 1, merged["train"]["epochs"]
    if trained > epochs:
        raise UserError(f"run {name!r} has already trained {trained} epoch(s); --resume cannot shorten it to "
                        f"{epochs} (pass train.epochs >= {trained}, or start a new run with another name).")
    if source == final:
        if trained == epochs and _compare_done(final, merged):
            warnings.warn(f"nothing to resume: run {name!r} in {final} has already trained its {trained} epoch(s) "
                          f"and is unchanged; pass --set train.epochs=N with N > {trained} to extend it.",
                          NothingToResumeWarning, stacklevel=3)
            return merged, True
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(final, partial)  # continue a finished run for more epochs; the old one stays until done
    return merged, False


def _start_partial(job: Job, cfg: dict, partial: Path, n_train: int) -> None:
    """Warn once, before any training, about callbacks that would silently never fire (the teleport copy
    included), with ``n_train`` samples per process; then create ``partial`` and write its ``config.toml``."""
    import warnings

    from .train.callbacks import build_callback
    from .train.trainer import UnreachableCallbackWarning, unreachable_schedules

    steps = math.ceil(n_train / cfg["data"]["batch_size"])
    msgs = unreachable_schedules(job.callbacks, cfg["train"]["epochs"], steps)
    if cfg.get("compare_teleport"):
        msgs += [f"compare_teleport: {m}" for m in
                 unreachable_schedules([build_callback(_TELEPORT_COPY)], cfg["train"]["epochs"], steps)]
    for msg in msgs:
        warnings.warn(msg, UnreachableCallbackWarning, stacklevel=3)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_text(partial / "config.toml", cfgmod.dumps(cfg))


def _run_locked(job: Job, cfg: dict, partial: Path, final: Path, resume: bool) -> Path:
    import warnings

    from .report.run_report import write_run_report
    from .train.trainer import UnreachableCallbackWarning

    if _is_dpl(cfg):
        report = _dpl_body(job, cfg, partial)
        _publish(partial, final)
        return final / report
    _start_partial(job, cfg, partial, len(job.bundle.train))
    t0 = time.perf_counter()
    runs = {"plain": partial}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreachableCallbackWarning)  # already reported above
        hist = train_into(job, partial, resume)
        if len(hist.rows) < cfg["train"]["epochs"]:
            return partial / "report.html"  # stopped early (stop_after): stays partial and resumable
        if cfg.get("compare_teleport"):
            runs["teleport"] = _train_teleport_copy(cfg, partial, resume, job.device)
            if runs["teleport"] is None:
                return partial / "report.html"
    report = write_run_report(partial, cfg, runs, seconds=time.perf_counter() - t0)
    _publish(partial, final)
    return final / report.name


def _write_failure(exc: OSError, partial: Path, name: str, out: Path, fresh: bool) -> str:
    """The one-line message of a failed write (disk full, permissions, ...); removes a partial run that holds no
    complete checkpoint (nothing to resume from), keeps one that does."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f" writing {exc.filename}" if exc.filename else ""
    if (partial / "checkpoints" / "last.pt").exists():
        done = _epochs_done(partial)
        return (f"cannot write run {name!r} ({what}{where}); the last complete checkpoint (after {done} epoch(s)) is "
                f"kept in {partial}: free space and continue with --resume.")
    if fresh:
        shutil.rmtree(partial, ignore_errors=True)
    return f"cannot write run {name!r} into {out} ({what}{where}); nothing was kept - free space and run again."


def flatten_config(cfg: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``; lists (callbacks) stay whole values."""
    flat = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(flatten_config(v, key + "."))
        else:
            flat[key] = v
    return flat


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, minus :data:`RESUMABLE_KEYS`; ``stop_after``
    callbacks are left out of the comparison of the callback lists. Numbers compare by value (1 == 1.0)."""
    def norm(c):
        c = dict(c)  # config.toml leaves an empty callback list out: missing and [] are the same
        c.setdefault("distributed", {"strategy": "ddp"})  # saved before the key existed: the default strategy
        c["callbacks"] = [cb for cb in c.get("callbacks") or [] if not (isinstance(cb, dict) and cb.get("name") == "stop_after")]
        return flatten_config(c)

    a, b = norm(old), norm(new)
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE_KEYS and a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def saved_config(run_dir: Path) -> dict | None:
    """The resolved config a run was trained with: the checkpoint's copy, else the run's ``config.toml``."""
    import tomllib

    from .train import load_checkpoint

    ck = run_dir / "checkpoints" / "last.pt"
    if ck.exists():
        stored = load_checkpoint(ck).get("config")
        if isinstance(stored, dict):
            return stored
    path = run_dir / "config.toml"
    if path.exists():
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError:
            return None
    return None


def check_resume_config(old: dict | None, new: dict, run_dir: Path, given: set[str] | None = None) -> None:
    """Refuse (UserError) to resume ``run_dir`` with a config that differs in a non-resumable key; with ``given``,
    only those dotted keys (and the keys below them) are compared."""
    if old is None:
        raise UserError(f"cannot resume {run_dir}: its config is missing or unreadable; run without --resume to start over.")
    diff = config_differences(old, new)
    if given is not None:
        diff = [k for k in diff if any(k == g or k.startswith(g + ".") or g.startswith(k + ".") for g in given)]
    if diff:
        flat_old, flat_new = flatten_config(old), flatten_config(new)
        shown = "; ".join(f"{k}: {flat_old.get(k, '(unset)')!r} -> {flat_new.get(k, '(unset)')!r}" for k in diff[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise UserError(
            f"--resume with a changed config ({shown}{more}); only {', '.join(sorted(RESUMABLE_KEYS))} may change when "
            f"resuming {run_dir} - use the original values, or run without --resume (or with another name) to start over."
        )


class RunLock:
    """Exclusive lock on ``out/.<name>.lock``: an OS lock (``fcntl.flock``; ``filelock`` where there is no fcntl),
    so it is released even when the holder is killed.

    While held, ``out/.<name>.lock.json`` names the holder (pid, host, start time) for the error message of a
    second writer, which fails at once (no waiting) with :class:`UserError`. Both files are removed on release;
    the lock is only taken on a lock file that is still the one at the path (inode check), so removing it cannot
    let two writers in.
    """

    def __init__(self, out: Path, name: str):
        self.out, self.name = Path(out), name
        self.path = self.out / f".{name}.lock"
        self.info = self.out / f".{name}.lock.json"
        self._fd = None
        self._filelock = None

    def __enter__(self) -> "RunLock":
        import json
        import socket

        try:
            acquired = self._acquire()
        except OSError as exc:
            raise UserError(f"cannot lock run {self.name!r} in {self.out} ({exc.strerror or exc}); pass a writable --out.") from None
        if not acquired:
            raise UserError(
                f"run directory {self.out / self.name} is being written by another process ({self._holder()}); "
                "wait for it or choose another --out."
            )
        try:
            atomic_write_text(self.info, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                     "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        except OSError:
            pass  # the lock holds without its description; a second writer then says less about the holder
        return self

    def _acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            from filelock import FileLock, Timeout

            self._filelock = FileLock(str(self.path), timeout=0)
            try:
                self._filelock.acquire()
            except Timeout:
                return False
            return True
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # the holder released and removed this file between our open and flock: try the new one
        return False

    def _holder(self) -> str:
        import json

        try:
            h = json.loads(self.info.read_text())
            return f"pid {h['pid']} on host {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def __exit__(self, *exc) -> None:
        self.info.unlink(missing_ok=True)
        if self._filelock is not None:  # pragma: no cover - not POSIX
            self._filelock.release()
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting writer's inode check then fails and retries
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None


def _compare_done(final: Path, cfg: dict) -> bool:
    if not cfg.get("compare_teleport"):
        return True
    return _epochs_done(final / "teleport") >= cfg["train"]["epochs"]


def _train_teleport_copy(cfg: dict, partial: Path, resume: bool, device="cpu"):
    """Train the same model from the same initial weights with one optimised teleport (the demo's comparison).

    The copy's monitor repeats the plain run's schedule plan (``monitor_schedule.json``), so both runs measure the
    same probes at the same steps and their curves compare point by point."""
    from .monitor import SCHEDULE_FILE, Monitor
    from .train.callbacks import build_callback

    sub = partial / "teleport"
    job = build_job(cfg, device=device)
    plan = partial / SCHEDULE_FILE
    if plan.exists():
        for cb in job.callbacks:
            if isinstance(cb, Monitor):
                cb.use_plan(plan)
    job.callbacks.append(build_callback(_TELEPORT_COPY))
    # resume=True with no checkpoint in `sub` yet starts the copy afresh (under DDP rank 0 decides for every rank)
    hist = train_into(job, sub, resume)
    if len(hist.rows) < cfg["train"]["epochs"]:
        return None
    return sub


_TELEPORT_COPY = {"name": "teleport", "at_epoch": 1, "kind": "optimized"}  # the demo's comparison run


def _epochs_done(path: Path) -> int:
    from .train import load_checkpoint

    ck = path / "checkpoints" / "last.pt"
    if not ck.exists():
        return 0
    return int(load_checkpoint(ck)["epoch"]) + 1


def _publish(partial: Path, final: Path) -> None:
    """Atomically move the finished run into place (an older finished run of the same name is replaced)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ gradcond run --nproc N
# Local ranks are started with torch.multiprocessing (spawn) + init_process_group on a free loopback port rather
# than with torch.distributed.run's elastic agent: `gradcond run` has already validated the config, holds the run's
# lock and owns the partial directory in this (parent) process, and it needs each rank's exception as data (to keep
# the CLI's one-line errors and exit codes); the elastic agent's rendezvous, restarts and log redirection add nothing
# for ranks on one machine. `ProcessContext.join` ends the other ranks as soon as one fails, so nothing is left
# waiting; collectives are bounded by the group's timeout (DDP_TIMEOUT_S).

DDP_TIMEOUT_S = 60  # process-group timeout of `gradcond run --nproc`: a hung rank ends the run within a minute
TIMEOUT_ENV = "GRADCOND_DDP_TIMEOUT_S"  # overrides DDP_TIMEOUT_S (seconds), e.g. on a heavily loaded machine


def ddp_timeout_s() -> float:
    """The process-group timeout of `gradcond run --nproc`: :data:`DDP_TIMEOUT_S`, or the environment variable
    ``GRADCOND_DDP_TIMEOUT_S`` (a positive number of seconds; anything else is a :class:`UserError`)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return float(DDP_TIMEOUT_S)
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise UserError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}.")
    return v


def check_nproc(nproc, device="cpu") -> int:
    """``nproc`` as an int, or :class:`UserError` (one sentence) when it is not an integer >= 1, exceeds the CPU
    cores (gloo on the CPU) or the GPUs (NCCL: one GPU per rank), or when the backend is unavailable. Cheap."""
    try:
        n = int(nproc) if isinstance(nproc, (int, str)) and not isinstance(nproc, bool) else None
    except ValueError:
        n = None
    if n is None or n < 1:
        raise UserError(f"--nproc must be an integer >= 1 (the number of local training processes); got {nproc!r}.")
    if n == 1:
        return 1
    dev = resolve_device(device)
    dist = torch.distributed
    if not dist.is_available():
        raise UserError("--nproc > 1 needs torch.distributed, which this PyTorch build does not include; run with "
                        "--nproc 1.")
    if dev.type == "cuda":
        if not dist.is_nccl_available():
            raise UserError("--nproc > 1 on CUDA needs the NCCL backend, which this PyTorch build does not include; "
                            "use --device cpu (gloo) or --nproc 1.")
        gpus = torch.cuda.device_count()
        if n > gpus:
            raise UserError(f"--nproc {n} on CUDA needs one GPU per rank but this machine has {gpus}; pass --nproc "
                            f"{gpus}{' or fewer' if gpus > 1 else ''}, or --device cpu.")
    else:
        if not dist.is_gloo_available():
            raise UserError("--nproc > 1 on the CPU needs the gloo backend, which this PyTorch build does not "
                            "include; run with --nproc 1.")
        cores = os.cpu_count() or 1
        if n > cores:
            raise UserError(f"--nproc {n} is more than this machine's {cores} CPU core(s); pass --nproc {cores} or "
                            "fewer (each rank is one training process).")
    return n


STRATEGIES = ("ddp", "fsdp2")  # distributed.strategy of `gradcond run --nproc N`


def wrap_for_strategy(model: torch.nn.Module, strategy: str, device=None) -> torch.nn.Module:
    """This rank's training model under ``strategy``: ``"ddp"`` wraps it in ``DistributedDataParallel``;
    ``"fsdp2"`` shards it in place with ``torch.distributed.fsdp.fully_shard`` -- every top-level child that holds
    parameters is one FSDP unit, then the root (parameters become ``DTensor`` shards; gloo on the CPU, NCCL on
    CUDA). Needs an active process group."""
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device(device) if device is not None else torch.device("cpu")
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def _shard_loader(train, cfg: dict, rank: int, world: int):
    """This rank's training loader: samples ``rank, rank + world, ...`` truncated to ``len(train) // world`` (every
    rank then makes the same number of steps, which DDP needs), shuffled by ``seed + rank``; ``data.batch_size`` is
    per rank."""
    from torch.utils.data import DataLoader, Subset, TensorDataset

    per = len(train) // world
    idx = list(range(rank, len(train), world))[:per]
    # a tensor dataset stays one (the shard's tensors): the monitor then probes the shard's first samples at every
    # measurement, in a resumed run too, instead of whatever batch came first
    shard = (TensorDataset(*(t[idx] for t in train.tensors)) if hasattr(train, "tensors") else Subset(train, idx))
    return DataLoader(shard, batch_size=cfg["data"]["batch_size"], shuffle=True,
                      generator=torch.Generator().manual_seed(cfg["seed"] + rank))


def _checkpoint_world(ck: dict) -> int:
    """The number of ranks that wrote a checkpoint (0: unknown, an older multi-rank checkpoint)."""
    if ck.get("world_size"):
        return int(ck["world_size"])
    return 0 if any(str(k).startswith("module.") for k in ck["model"]) else 1


def _refuse_other_world(ck: dict, name: str, world: int) -> None:
    """A run is resumed with the number of ranks it was trained with (each rank trains its own shard)."""
    saved = _checkpoint_world(ck)
    if saved == world:
        return
    if saved == 0:
        raise UserError(f"run {name!r} was trained with several processes by an older gradcond whose checkpoints "
                        "cannot be resumed; run it again without --resume.")
    how = "without --nproc (one process)" if saved == 1 else f"with --nproc {saved}"
    raise UserError(f"run {name!r} was trained {how}; resume it {how} (each process trains its own share of the "
                    "data, so the number of processes cannot change).")


def run_ranks(cfg: dict, out: str | Path, nproc: int, resume: bool = False, device="cpu", force: bool = False,
              given: set[str] | None = None) -> Path:
    """``gradcond run --nproc N``: train ``cfg`` with ``nproc`` local DDP ranks into ``out/<name>/``.

    This process validates everything first (bad input is :class:`UserError` before anything is written), takes the
    run's lock (:class:`RunLock`: exactly one writer), then spawns the ranks (gloo on the CPU, NCCL with one GPU
    per rank on CUDA; ``tcp://127.0.0.1:<free port>``, timeout :func:`ddp_timeout_s`). Every rank builds the same
    model (same seed), wraps it in ``DistributedDataParallel`` and trains on its shard of the training set
    (``data.batch_size`` per rank: the global batch is ``nproc`` times larger); **rank 0 alone writes** the partial
    run directory, its metrics (rank 0's shard; test metrics on rank 0's replica), the checkpoints (holding every
    rank's random streams) and the report; the monitor and teleports follow :mod:`gradcond.distributed`. When every
    rank has finished this process publishes the run. ``force``, ``resume`` and ``given`` as in :func:`run`; a run
    is resumed with the ``nproc`` it was trained with and continues exactly (the same ``metrics.csv`` bytes as an
    uninterrupted run).

    Faults (:func:`_wait_ranks`): when a rank dies (killed by a signal, or exits without recording an error) the
    others are stopped and :class:`~gradcond.utils.RankLost` names it (``rank 1 of 2 was killed by SIGKILL``); a
    rank's own error is re-raised here (:class:`UserError`, :class:`~gradcond.utils.TrainingDiverged`, else
    ``RuntimeError`` naming the rank); Ctrl-C stops every rank and raises :class:`~gradcond.utils.Interrupted`. In
    every case the partial directory is kept when it holds a complete checkpoint (rank 0 writes checkpoints
    atomically, so the last one is whole) and the message says how to continue (``--nproc N --resume``); a fresh
    run without a checkpoint (or one that diverged) leaves nothing behind.
    """
    import json
    import tempfile

    import torch.multiprocessing as mp

    from .utils import Interrupted, is_quiet

    nproc = check_nproc(nproc, device)
    ddp_timeout_s()  # a bad GRADCOND_DDP_TIMEOUT_S is bad input, before anything is written
    if cfg["distributed"]["strategy"] == "fsdp2" and (cfg.get("compare_teleport") or any(
            isinstance(c, dict) and "teleport" in str(c.get("name", "")) for c in cfg.get("callbacks") or [])):
        raise UserError("distributed.strategy = \"fsdp2\" cannot run teleports (compare_teleport or a teleport "
                        "callback): a teleport needs every parameter in one process and FSDP2 shards them; use "
                        "distributed.strategy = \"ddp\".")
    if resume and cfg["distributed"]["strategy"] == "fsdp2":
        raise UserError("--resume is not supported with distributed.strategy = \"fsdp2\" (its checkpoint holds the "
                        "gathered full state, which is not re-sharded); resume runs trained with \"ddp\", or run "
                        "again without --resume.")
    out = Path(out)
    dev = resolve_device(device)
    job = build_job(cfg, device="cpu")  # the same checks as a single-process run, before the disk is touched
    if _is_dpl(cfg):
        _dpl_partitions(job, cfg, nproc)  # the model splits into the partitions asked for
    if len(job.bundle.train) < nproc:
        raise UserError(f"--nproc {nproc} exceeds the {len(job.bundle.train)} training samples; every rank needs at "
                        "least one.")
    del job
    _check_writable(out)
    name = cfg["name"]
    final, partial = out / name, out / f".{name}.partial"
    with RunLock(out, name), tempfile.TemporaryDirectory(prefix="gradcond-ranks-") as errdir:
        if resume:
            cfg, done = _prepare_resume(cfg, final, partial, given, world=nproc)
            if done:
                return final / "report.html"
        else:
            _prepare_fresh(final, partial, force)
        port = _dist.free_port()
        ctx = mp.start_processes(_rank_main, args=(nproc, port, cfg, str(partial), str(dev), is_quiet(), errdir,
                                                   resume, os.getpid()),
                                 nprocs=nproc, join=False, start_method="spawn")
        try:
            failure = _wait_ranks(ctx.processes)
        except KeyboardInterrupt:
            _stop_ranks(ctx.processes)
            raise Interrupted(f"interrupted; {_kept(partial, name, nproc, fresh=not resume)}") from None
        if failure is not None:
            raise _rank_failure(Path(errdir), failure, partial, name, nproc, fresh=not resume) from None
        if not (partial / "report.html").exists():  # stopped early (stop_after): kept partial
            return partial / "report.html"
        report = json.loads((Path(errdir) / "report.json").read_text())["report"]
        _publish(partial, final)
        return final / report


# how long the other ranks get to exit on their own after one failed (they normally fail at once on the lost peer)
# before they are terminated; then how long after SIGTERM before SIGKILL
RANK_GRACE_S, RANK_TERM_S = 5.0, 10.0


def _wait_ranks(procs) -> dict | None:
    """Wait until every rank exits. None when all exit 0; else the first failure ``{"rank", "exitcode", "signal",
    "others"}`` -- the rank whose exit was seen first (among ranks seen exiting together, one killed by a signal
    first: the others' errors are usually about the lost peer). The other ranks get :data:`RANK_GRACE_S` to exit on
    their own, then are stopped (:func:`_stop_ranks`)."""
    import signal as _signal
    from multiprocessing.connection import wait

    pending = {p.sentinel: r for r, p in enumerate(procs)}
    while pending:
        ready = wait(list(pending))
        exited = sorted((pending.pop(s) for s in ready), key=lambda r: (procs[r].exitcode is None
                                                                        or procs[r].exitcode >= 0, r))
        for r in exited:
            procs[r].join()
        bad = [r for r in exited if procs[r].exitcode != 0]
        if bad:
            r = bad[0]
            code = procs[r].exitcode
            sig = _signal.Signals(-code).name if code < 0 and -code in _signal.valid_signals() else None
            deadline = time.monotonic() + RANK_GRACE_S
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            _stop_ranks(procs)
            return {"rank": r, "exitcode": code, "signal": sig}
    return None


def _stop_ranks(procs) -> None:
    """Terminate (SIGTERM, then SIGKILL after :data:`RANK_TERM_S`) every rank still alive, and reap them all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + RANK_TERM_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _kept(partial: Path, name: str, nproc: int, fresh: bool) -> str:
    """What is left of an interrupted or failed run, in words; removes a fresh partial run without a checkpoint."""
    if (partial / "checkpoints" / "last.pt").exists():
        try:
            done = f" (after {_epochs_done(partial)} epoch(s))"
        except UserError:
            done = ""
        again = f" --nproc {nproc}" if nproc > 1 else ""
        return f"the last complete checkpoint{done} is kept in {partial} - continue with{again} --resume."
    if fresh:
        shutil.rmtree(partial, ignore_errors=True)
        return f"no epoch of run {name!r} was complete, so nothing was kept - run it again."
    return f"nothing new was kept for run {name!r}."


def _rank_failure(errdir: Path, failure: dict, partial: Path, name: str, nproc: int, fresh: bool) -> BaseException:
    """The error to raise in the parent for a failed rank: the lost rank (:class:`RankLost`) when one died without
    recording an error of its own; else the earliest error a rank recorded (the cause; the other ranks' errors
    are usually about the lost peer), mapped back to its kind. Decides what of the partial run is kept."""
    import json

    from .utils import RankLost

    errs = {}
    for f in errdir.glob("rank*.json"):
        try:
            e = json.loads(f.read_text())
            errs[int(e["rank"])] = e
        except (OSError, ValueError, KeyError, TypeError):
            pass
    r = failure["rank"]
    if r not in errs or failure["signal"] is not None:
        how = (f"was killed by {failure['signal']}" if failure["signal"] else
               f"exited with code {failure['exitcode']} without reporting an error")
        return RankLost(f"rank {r} of {nproc} {how}; {_kept(partial, name, nproc, fresh)}")
    e = min(errs.values(), key=lambda e: e["time"])
    if e["kind"] == "diverged":
        if fresh:
            shutil.rmtree(partial, ignore_errors=True)  # a diverged fresh run leaves nothing behind
        return TrainingDiverged(e["message"])
    had_checkpoint = (partial / "checkpoints" / "last.pt").exists()
    kept = _kept(partial, name, nproc, fresh)
    if e["kind"] == "user":  # bad input found by a rank: its sentence, plus what was kept when there is something
        return UserError(f"{e['message'].rstrip('.')}; {kept}" if had_checkpoint or not fresh else e["message"])
    if e["kind"] == "interrupted":
        from .utils import Interrupted

        return Interrupted(f"rank {e['rank']} of {nproc} was interrupted; {kept}")
    return RuntimeError(f"rank {e['rank']} of {e['world']} failed: {e['type']}: {e['message']}; {kept}\n"
                        f"{e['traceback']}")


# Test hook (fault injection): "RANK:EPOCH:SIGNAL" makes that rank send itself SIGNAL at the start of that
# (0-based) epoch of the plain run, i.e. after the checkpoint of the epoch before; tests use it to kill a rank at a
# known point instead of after a delay.
FAULT_ENV = "GRADCOND_TEST_RANK_FAULT"


class _SelfSignal(Callback):
    """The :data:`FAULT_ENV` hook as a callback (nothing is logged; its state is empty)."""

    def __init__(self, epoch: int, sig: int):
        self.epoch, self.sig = epoch, sig

    def on_epoch_start(self, state) -> None:
        if state.epoch == self.epoch:
            os.kill(os.getpid(), self.sig)


def _fault_hook(rank: int):
    import signal as _signal

    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    r, epoch, sig = spec.split(":")
    return _SelfSignal(int(epoch), getattr(_signal, sig)) if int(r) == rank else None


def _die_with_parent(parent: int) -> None:
    """Linux: this rank gets SIGKILL when the ``gradcond`` process that started it dies (so no rank keeps writing a
    run whose lock is gone). Best effort elsewhere."""
    import signal as _signal

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(_signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _rank_main(rank: int, world: int, port: int, cfg: dict, partial: str, device: str, quiet: bool,
               errdir: str, resume: bool = False, parent: int | None = None) -> None:
    """One rank of :func:`run_ranks` (runs in a spawned process). Errors are recorded in ``errdir`` for the parent
    and re-raised (a non-zero exit ends the other ranks)."""
    import json
    import warnings

    from .utils import set_quiet

    if parent is not None:
        _die_with_parent(parent)
    set_quiet(quiet)
    if rank != 0:
        warnings.simplefilter("ignore")  # rank 0 reports the warnings once
    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            dev = torch.device("cuda", rank)
            torch.cuda.set_device(dev)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        _dist.init_local_group("nccl" if dev.type == "cuda" else "gloo", port, rank, world, ddp_timeout_s())
        job = build_job(cfg, device=dev)
        report = _rank_body(job, cfg, Path(partial), resume, _fault_hook(rank))
        if rank == 0 and report is not None:
            atomic_write_text(Path(errdir) / "report.json", json.dumps({"report": report}))
        torch.distributed.barrier()  # waits with the GIL released: gloo's workers finish before the group goes
    except BaseException as exc:
        kind = ("user" if isinstance(exc, UserError) else "diverged" if isinstance(exc, TrainingDiverged)
                else "interrupted" if isinstance(exc, KeyboardInterrupt) else "other")
        import traceback

        atomic_write_text(Path(errdir) / f"rank{rank}.json", json.dumps(
            {"rank": rank, "world": world, "time": time.time(), "kind": kind, "type": type(exc).__name__,
             "message": " ".join(str(exc).split()), "traceback": traceback.format_exc()}))
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _rank_body(job: Job, cfg: dict, partial: Path, resume: bool = False, fault=None) -> str | None:
    """What every rank runs (the DDP counterpart of ``_run_locked``): rank 0 writes ``config.toml``, its run files
    and the report into ``partial``; the others train with in-memory logs. Returns the report's file name on rank 0
    (None when stopped early or on other ranks)."""
    import warnings

    from .report.run_report import write_run_report
    from .train.trainer import UnreachableCallbackWarning

    if _is_dpl(cfg):
        return _dpl_body(job, cfg, partial)
    main = _dist.is_main()
    if main:
        _start_partial(job, cfg, partial, len(job.bundle.train) // _dist.world_size())
    t0 = time.perf_counter()
    runs = {"plain": partial}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreachableCallbackWarning)
        hist = train_into(job, partial, resume, extra_callbacks=[fault] if fault is not None else ())
        if len(hist.rows) < cfg["train"]["epochs"]:
            return None
        if cfg.get("compare_teleport"):
            runs["teleport"] = _train_teleport_copy(cfg, partial, resume, job.device)
            if runs["teleport"] is None:
                return None
    if not main:
        return None
    return write_run_report(partial, cfg, runs, seconds=time.perf_counter() - t0).name


# ------------------------------------------------------------------------- distributed.strategy = "dpl" (seed 002)
def _is_dpl(cfg: dict) -> bool:
    return cfg.get("distributed", {}).get("strategy") == "dpl"


def _dpl_plan(cfg: dict, nproc: int) -> tuple[object, int]:
    """``(partition sizes for make_partitions, number of partitions)`` of a DPL run on ``nproc`` processes; bad
    combinations are one-sentence :class:`UserError` s before anything starts."""
    dpl = cfg["distributed"]["dpl"]
    reps, sizes = dpl.get("replicas"), dpl.get("partitions")
    n = len(sizes) if isinstance(sizes, list) else sizes
    if reps is not None:
        if n is not None and n != len(reps):
            raise UserError(f"distributed.dpl.replicas lists {len(reps)} partition(s) but distributed.dpl.partitions "
                            f"asks for {n}; give one process count per partition.")
        n = len(reps)
        if nproc > 1 and sum(reps) != nproc:
            raise UserError(f"distributed.dpl.replicas {reps} needs {sum(reps)} processes but --nproc is {nproc}; pass "
                            f"--nproc {sum(reps)} or change replicas to sum to {nproc}.")
    elif n is None:
        n = nproc if nproc > 1 else 2
    elif nproc > 1 and n != nproc:
        raise UserError(f"distributed.dpl.partitions is {n} but --nproc is {nproc}: DPL runs one process per partition; "
                        f"pass --nproc {n}, or set distributed.dpl.replicas (processes per partition) to sum to "
                        f"{nproc}.")
    schedule = dpl.get("schedule", "concurrent")
    if nproc > 1 and schedule not in ("concurrent", "round_robin"):
        raise UserError(f"distributed.dpl.schedule {schedule!r} runs in one process; with --nproc {nproc} use "
                        "\"concurrent\" or \"round_robin\".")
    return (sizes if isinstance(sizes, list) else n), n


def _dpl_partitions(job: Job, cfg: dict, nproc: int):
    """The job's model as ``(partitions, heads)`` (:func:`~gradcond.train.layerwise.dpl.partition_model`)."""
    from .train.layerwise.dpl import partition_model

    sizes, _ = _dpl_plan(cfg, nproc)
    x = job.bundle.train.tensors[0][:2]
    try:
        return partition_model(job.model, sizes, x, job.bundle.num_outputs,
                               max_decision_convs=cfg["distributed"]["dpl"].get("max_decision_convs", 2),
                               seed=cfg["seed"])
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def _dpl_body(job: Job, cfg: dict, partial: Path) -> str | None:
    """Partition-wise training of a run (``distributed.strategy = "dpl"``, seed 002 §6.8): the job's model cut into
    partitions with decision heads, trained by :func:`~gradcond.train.fit_partitionwise` with the
    ``[distributed.dpl]`` options -- one process per partition under ``--nproc`` (or ``sum(replicas)``), the
    single-process schedules otherwise.  Rank 0 writes ``config.toml``, ``partitionwise.json``, ``model.pt`` (the
    trained network), ``metrics.csv`` (per epoch: the full network's ``train``/``test`` loss and accuracy -- the
    last partition's head -- and per partition ``dpl/<partition>`` rows) and the report.  Returns the report's file
    name on rank 0, else None."""
    from .report.run_report import write_run_report
    from .train import RunLogger
    from .train.layerwise.dpl import fit_partitionwise

    main = _dist.is_main()
    t0 = time.perf_counter()
    parts, heads = _dpl_partitions(job, cfg, _dist.world_size())
    if main:
        _start_partial(job, cfg, partial, len(job.bundle.train))
    opts = {k: v for k, v in cfg["distributed"]["dpl"].items() if k not in ("partitions", "max_decision_convs")}
    train_loader, test_loader = job.bundle.loaders(cfg["data"]["batch_size"], seed=cfg["seed"])
    o = cfg["optim"]
    try:
        res = fit_partitionwise(parts, heads, train_loader, test_loader, epochs=cfg["train"]["epochs"], loss=job.loss,
                                optimizer=o["name"], lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"],
                                task=job.bundle.task, seed=cfg["seed"], out=partial if main else None, **opts)
    except ValueError as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(str(exc)) from None
    if not main:
        return None
    run = RunLogger(partial)
    last = len(parts) - 1
    steps = math.ceil(len(job.bundle.train) / cfg["data"]["batch_size"])
    for rec in res.history:
        e, p = rec["epoch"], rec["partition"]
        rows = [("dpl", f"partition {p}", k, rec[k]) for k in ("train_loss", "train_acc", "test_loss", "test_acc",
                                                                  "kept_fraction", "samples") if rec[k] == rec[k]]
        if p == last:
            rows += [("train", "", "loss", rec["train_loss"]), ("test", "", "loss", rec["test_loss"])]
            rows += [(w, "", "acc", rec[f"{w}_acc"]) for w in ("train", "test") if rec[f"{w}_acc"] == rec[f"{w}_acc"]]
        run.metric_rows([{"step": (e + 1) * steps, "epoch": e, "probe": pr, "layer": la, "name": na,
                          "value": float(v)} for pr, la, na, v in rows])
    run.event({"kind": "dpl", "schedule": res.schedule, "world_size": res.world_size, "accuracy": res.accuracy,
               "best_partition": res.best_partition, **{k: v for k, v in res.extra.items() if k != "seconds_per_rank"}})
    return write_run_report(partial, cfg, {"plain": partial}, seconds=time.perf_counter() - t0).name
