"""``gradcond run``: resolve a config, build data/model/optimizer, train into a run directory, write the report.

Everything that can fail on bad input (names, options, shapes) is checked *before* the run directory is created.
Training writes into ``<out>/.<name>.partial/``; only a finished run is renamed to ``<out>/<name>/`` (replacing an
older finished run of that name), so a run directory is never half-written.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import config as cfgmod
from .utils import UserError, is_quiet

CNN_MODELS = {"vgg", "resnet", "densenet", "simple_cnn"}


def _auto_form(model_name: str) -> str:
    if model_name in CNN_MODELS:
        return "image"
    if model_name == "transformer":
        return "sequence"
    return "flat"


def model_kwargs_for(model_name: str, bundle) -> dict:
    """The size keywords of zoo model ``model_name`` that follow from the data (user values take precedence)."""
    shape, k = bundle.input_shape, bundle.num_outputs
    if model_name in ("mlp", "looks_linear_crelu_mlp", "resnet_mlp"):
        return {"in_features": int(math.prod(shape)), "out_features": k}
    if model_name in CNN_MODELS:
        kw = {"in_channels": shape[0], "num_classes": k}
        if model_name == "simple_cnn":
            kw["image_size"] = shape[-1]
        return kw
    if model_name == "transformer":
        return {"in_features": shape[-1], "seq_len": shape[0], "num_classes": k}
    return {}


@dataclass
class Job:
    """Everything a run needs, built and checked before anything is written."""

    cfg: dict
    bundle: object
    model: torch.nn.Module
    loss: str
    callbacks: list


def build_job(cfg: dict, model_state: dict | None = None) -> Job:
    from . import data, zoo
    from .train import get_loss, make_optimizer, make_schedule
    from .train.callbacks import build_callback

    dtype = torch.float64 if cfg["dtype"] == "float64" else torch.float32
    mcfg = dict(cfg["model"])
    mname = mcfg.pop("name", None)
    if mname is None:
        raise UserError(f"[model] needs a name; accepted: {', '.join(zoo.names())}.")
    dcfg = cfg["data"]
    form = _auto_form(mname) if dcfg["form"] == "auto" else dcfg["form"]
    try:
        bundle = data.load_dataset(dcfg["name"], form=form, seed=cfg["seed"], dtype=dtype, **dcfg.get("options", {}))
        kw = {**model_kwargs_for(mname, bundle), **mcfg}
        torch.manual_seed(cfg["seed"])
        model = zoo.build(mname, **kw).to(dtype)
        if model_state is not None:
            model.load_state_dict(model_state)
        loss = bundle.loss if cfg["train"]["loss"] == "auto" else cfg["train"]["loss"]
        loss_fn = get_loss(loss)
        ocfg = cfg["optim"]
        make_optimizer(ocfg["name"], [torch.nn.Parameter(torch.zeros(1))], lr=ocfg["lr"], momentum=ocfg["momentum"])
        scfg = cfg["schedule"]
        make_schedule(scfg["name"], torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
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
    return Job(cfg, bundle, model, loss, callbacks)


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
    run = RunLogger(run_path)
    return fit(
        job.model, train_loader, test_loader, loss=job.loss, optimizer=cfg["optim"]["name"], lr=cfg["optim"]["lr"],
        momentum=cfg["optim"]["momentum"], weight_decay=cfg["optim"]["weight_decay"], epochs=cfg["train"]["epochs"],
        schedule=cfg["schedule"]["name"],
        schedule_kwargs={k: v for k, v in cfg["schedule"].items() if k != "name" and (
            (cfg["schedule"]["name"] == "step" and k in ("step_size", "gamma"))
            or (cfg["schedule"]["name"] == "plateau" and k in ("patience", "factor")))},
        callbacks=list(job.callbacks) + list(extra_callbacks), seed=cfg["seed"], progress=not is_quiet(), run=run,
        resume=resume, task=job.bundle.task, config=cfg,
    )


def run(cfg: dict, out: str | Path = "runs", resume: bool = False) -> Path:
    """Run a resolved config into ``out/<name>/`` and return the path of its ``report.html``."""
    from .report.run_report import write_run_report

    out = Path(out)
    job = build_job(cfg)  # validates everything before the disk is touched
    _check_writable(out)
    name = cfg["name"]
    final, partial = out / name, out / f".{name}.partial"
    if resume:
        if not partial.exists() and final.exists():
            done = _epochs_done(final)
            if done >= cfg["train"]["epochs"] and _compare_done(final, cfg):
                return final / "report.html"
            shutil.copytree(final, partial)  # continue a finished run for more epochs; the old one stays until done
        if not (partial / "checkpoints" / "last.pt").exists():
            raise UserError(f"nothing to resume in {out}: no checkpoint for run {name!r}; run without --resume first.")
    else:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "config.toml").write_text(cfgmod.dumps(cfg))
    t0 = time.perf_counter()
    runs = {"plain": partial}
    hist = train_into(job, partial, resume)
    if len(hist.rows) < cfg["train"]["epochs"]:
        return partial / "report.html"  # stopped early (stop_after): stays partial and resumable
    if cfg.get("compare_teleport"):
        runs["teleport"] = _train_teleport_copy(cfg, partial, resume)
        if runs["teleport"] is None:
            return partial / "report.html"
    report = write_run_report(partial, cfg, runs, seconds=time.perf_counter() - t0)
    _publish(partial, final)
    return final / report.name


def _compare_done(final: Path, cfg: dict) -> bool:
    if not cfg.get("compare_teleport"):
        return True
    return _epochs_done(final / "teleport") >= cfg["train"]["epochs"]


def _train_teleport_copy(cfg: dict, partial: Path, resume: bool):
    """Train the same model from the same initial weights with one optimised teleport (the demo's comparison)."""
    from .train.callbacks import build_callback

    sub = partial / "teleport"
    job = build_job(cfg)
    job.callbacks.append(build_callback({"name": "teleport", "at_epoch": 1, "kind": "optimized"}))
    hist = train_into(job, sub, resume and (sub / "checkpoints" / "last.pt").exists())
    if len(hist.rows) < cfg["train"]["epochs"]:
        return None
    return sub


def _epochs_done(path: Path) -> int:
    ck = path / "checkpoints" / "last.pt"
    if not ck.exists():
        return 0
    return int(torch.load(ck, weights_only=False)["epoch"]) + 1


def _publish(partial: Path, final: Path) -> None:
    """Atomically move the finished run into place (an older finished run of the same name is replaced)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
