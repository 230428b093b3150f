"""Run configuration: TOML in, validated and resolved dict out.

Sections and their keys (defaults in :data:`DEFAULTS`)::

    name = "default"      # run directory name under --out
    seed = 0
    dtype = "float32"     # or "float64"
    [data]     name, form ("auto" picks image for CNNs, sequence for transformers), batch_size, options = {...}
    [model]    name, then any keyword of that zoo factory (in/out sizes are filled from the data)
    [optim]    name (sgd|momentum|adagrad|adam|adamw), lr, momentum, weight_decay
    [schedule] name (constant|step|plateau), step_size, gamma, patience, factor
    [train]    epochs, loss ("auto" = the dataset's default)
    [monitor]  enabled, schedule (preset "default"|"full"|"off"), budget (fraction of training time),
               probe_batch_size, probes = {probe = "every:N"|"epoch"|"log", ...} (overrides the preset)
    [[callbacks]]  name = "...", plus that callback's keywords
    [distributed]  strategy ("ddp": data-parallel ranks of the whole model under --nproc; "dpl": deep
                   partition-wise learning, seed 002 §6.8), dpl = {...} (see :data:`DPL_KEYS`)
    compare_teleport = false   # also train a copy with one optimised teleport and compare (the demo does)

Every fixed value is checked for type and range before anything is built or written (e.g. ``optim.lr`` a positive
number, ``optim.weight_decay`` >= 0, ``schedule.step_size`` a positive integer; see ``_VALUE_RULES``); a bad one is a
one-line :class:`~gradcond.utils.UserError`. ``--resume`` accepts a config that differs from the run's only in
``train.epochs`` and ``stop_after`` callbacks (``gradcond.runner.RESUMABLE_KEYS``).
"""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path

import tomli_w

from .utils import UserError

DEFAULTS: dict = {
    "name": "default",
    "seed": 0,
    "dtype": "float32",
    "compare_teleport": False,
    "data": {"name": "digits", "form": "auto", "batch_size": 64, "options": {}},
    "model": {"name": "mlp", "depth": 4, "width": 64, "act": "relu"},
    "optim": {"name": "momentum", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    "schedule": {"name": "constant", "step_size": 10, "gamma": 0.1, "patience": 2, "factor": 0.5},
    "train": {"epochs": 8, "loss": "auto"},
    "monitor": {"enabled": False, "schedule": "default", "budget": 0.05, "probe_batch_size": 64, "probes": {}},
    "callbacks": [],
    "distributed": {"strategy": "ddp", "dpl": {}},
}

# [distributed.dpl]: the arguments of gradcond.train.fit_partitionwise that a run config may set (and what each
# accepts); `partitions` is the number of partitions (default: one per process) or a list of block counts
DPL_KEYS = {
    "partitions": "a positive integer or a list of positive block counts",
    "replicas": "a list of positive process counts, one per partition",
    "schedule": "\"concurrent\", \"sequential\", \"round_robin\" or \"random_robin\"",
    "epochs_per_round": "a positive integer",
    "feature_checkpoint": "\"auto\", \"device\" or \"cpu\"",
    "filter_links": "\"every\" or \"first\"",
    "k_filter": "a table {k, warmup_epochs, filter_batch, max_removed}",
    "loss_filter": "a table {fraction, from_epoch}",
    "lr_scale": "a positive number",
    "wd_scale": "a positive number",
    "lr_drops": "a list of fractions in (0, 1)",
    "max_decision_convs": "an integer >= 0",
    "timeout_s": "a positive number",
    "preset": "a preset name of fit_partitionwise (\"thesis\", \"thesis-imagenet\")",
}

# sections whose keys are fixed here; [model], [data.options], [monitor] and callbacks take open keyword sets
_FIXED = {"data": {"name", "form", "batch_size", "options"}, "optim": set(DEFAULTS["optim"]) | {"name"},
          "monitor": set(DEFAULTS["monitor"]),
          "schedule": set(DEFAULTS["schedule"]), "train": set(DEFAULTS["train"]),
          "distributed": {"strategy", "dpl"}}
_TOP = set(DEFAULTS)


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass a TOML file or no config for the built-in default.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML ({exc}).") from None


def parse_value(text: str):
    """A ``--set``/``--model-arg`` value: parsed as a TOML literal (``0.1``, ``true``, ``[1, 2]``, ``"x"``), else
    taken as the bare string (``tanh``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare words are strings: --set model.act=tanh


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (value parsed as a TOML literal, else taken as a string)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set takes key=value (e.g. optim.lr=0.1), got {item!r}.")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"--set key {key!r} is malformed; use dotted names such as model.width.")
        node = cfg
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set key {key!r} goes through a non-table value.")
        node[parts[-1]] = parse_value(value.strip())
    return cfg


def resolve(user: dict | None, overrides: list[str] | None = None) -> dict:
    """Merge ``user`` (from TOML) and ``overrides`` over :data:`DEFAULTS` and check every key."""
    user = apply_overrides(user or {}, overrides or [])
    unknown = sorted(set(user) - _TOP)
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_TOP))}.")
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in user.items():
        if isinstance(DEFAULTS[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"config key {key!r} must be a table, got {type(value).__name__}.")
            if key in _FIXED:
                bad = sorted(set(value) - _FIXED[key])
                if bad:
                    raise UserError(
                        f"unknown key(s) {', '.join(bad)} in [{key}]; accepted: {', '.join(sorted(_FIXED[key]))}."
                    )
            if key == "model" and "name" in value and value["name"] != DEFAULTS["model"]["name"]:
                cfg["model"] = {}  # the default MLP's options do not apply to another model
            cfg[key].update(value)
        elif key == "callbacks":
            if not isinstance(value, list) or not all(isinstance(c, dict) and "name" in c for c in value):
                raise UserError("callbacks must be an array of tables, each with a name ([[callbacks]] name = ...).")
            cfg[key] = value
        else:
            cfg[key] = value
    if cfg["dtype"] not in ("float32", "float64"):
        raise UserError(f"dtype must be 'float32' or 'float64', got {cfg['dtype']!r}.")
    if not isinstance(cfg["name"], str):
        raise UserError(f"config key 'name' must be str, got {cfg['name']!r}.")
    if "/" in cfg["name"] or cfg["name"].startswith("."):
        raise UserError(f"run name {cfg['name']!r} must be a plain directory name (no '/' and no leading '.').")
    _check_values(cfg)
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# (dotted key, test, what is accepted): the values every run uses, checked before anything is built or written
_VALUE_RULES = (
    ("seed", _is_int, "an integer"),
    ("compare_teleport", lambda v: isinstance(v, bool), "true or false"),
    ("data.name", lambda v: isinstance(v, str), "a dataset name (string)"),
    ("data.form", lambda v: isinstance(v, str), "a string (auto, flat, image or sequence)"),
    ("data.batch_size", lambda v: _is_int(v) and v >= 1, "a positive integer"),
    ("data.options", lambda v: isinstance(v, dict), "a table of dataset options"),
    ("optim.name", lambda v: isinstance(v, str), "an optimizer name (string)"),
    ("optim.lr", lambda v: _is_num(v) and v > 0, "a positive number"),
    ("optim.momentum", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("schedule.name", lambda v: isinstance(v, str), "a schedule name (string)"),
    ("schedule.step_size", lambda v: _is_int(v) and v >= 1, "a positive integer (epochs between decays)"),
    ("schedule.gamma", lambda v: _is_num(v) and v > 0, "a positive number"),
    ("schedule.patience", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("schedule.factor", lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    ("train.epochs", lambda v: _is_int(v) and v >= 1, "a positive integer"),
    ("train.loss", lambda v: isinstance(v, str), "a loss name (string) or \"auto\""),
    ("monitor.enabled", lambda v: isinstance(v, bool), "true or false"),
    ("monitor.schedule", lambda v: isinstance(v, str), "a preset name (string)"),
    ("monitor.budget", lambda v: _is_num(v) and 0 < v <= 1, "a fraction in (0, 1]"),
    ("monitor.probe_batch_size", lambda v: _is_int(v) and v >= 1, "a positive integer"),
    ("monitor.probes", lambda v: isinstance(v, dict), "a table probe = \"every:N\"|\"epoch\"|\"log\""),
    ("distributed.strategy", lambda v: v in ("ddp", "dpl"), "\"ddp\" or \"dpl\""),
    ("distributed.dpl", lambda v: isinstance(v, dict), "a table of partition-wise options"),
)


def _check_values(cfg: dict) -> None:
    """Check the type and range of every fixed config value; the first bad one raises a one-line UserError."""
    if not isinstance(cfg["model"].get("name", ""), str):
        raise UserError(f"model.name must be a zoo model name (string), got {cfg['model']['name']!r}.")
    for key, ok, accepted in _VALUE_RULES:
        node = cfg
        for part in key.split("."):
            node = node[part]
        if not ok(node):
            raise UserError(f"{key} must be {accepted}, got {node!r}.")
    _check_dpl(cfg)


def _check_dpl(cfg: dict) -> None:
    """The ``[distributed.dpl]`` table: known keys with values of the accepted kind (their ranges are checked by
    ``fit_partitionwise`` before anything is written); DPL runs take no callbacks, monitor or teleport copy."""
    dpl = cfg["distributed"]["dpl"]
    bad = sorted(set(dpl) - set(DPL_KEYS))
    if bad:
        raise UserError(f"unknown key(s) {', '.join(bad)} in [distributed.dpl]; accepted: {', '.join(DPL_KEYS)}.")
    kinds = {"partitions": (int, list), "replicas": list, "schedule": str, "epochs_per_round": int,
             "feature_checkpoint": str, "filter_links": str, "k_filter": dict, "loss_filter": dict,
             "lr_scale": (int, float), "wd_scale": (int, float), "lr_drops": list, "max_decision_convs": int,
             "timeout_s": (int, float), "preset": str}
    for key, value in dpl.items():
        if isinstance(value, bool) or not isinstance(value, kinds[key]):
            raise UserError(f"distributed.dpl.{key} must be {DPL_KEYS[key]}, got {value!r}.")
    if cfg["distributed"]["strategy"] == "dpl":
        for key, on in (("compare_teleport", cfg["compare_teleport"]), ("monitor.enabled", cfg["monitor"]["enabled"]),
                        ("callbacks", bool(cfg["callbacks"]))):
            if on:
                raise UserError(f"{key} is not supported with distributed.strategy = \"dpl\" (partition-wise "
                                "training runs its own loop); turn it off or use strategy \"ddp\".")


def dumps(cfg: dict) -> str:
    """Serialize a resolved config to TOML with ``tomli_w`` (keys that need it are quoted, strings escaped).

    Round trip: ``tomllib.loads(dumps(cfg)) == cfg`` for any config of TOML-able values (tuples come back as lists;
    ``None`` has no TOML form and is a TypeError).  ``runner`` writes it as a run's ``config.toml``.
    """
    return tomli_w.dumps(cfg)


# The built-in job of `gradcond run` with no config (what `make demo` runs): the default MLP on digits, trained
# plainly and with one optimised teleport, with the monitor on. Falls back gracefully while those parts are absent.
DEMO: dict = {"name": "demo", "compare_teleport": True, "monitor": {"enabled": True, "schedule": "default", "budget": 1.0}}
