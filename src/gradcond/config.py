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
    compare_teleport = false   # also train a copy with one optimised teleport and compare (the demo does)
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

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
}

# sections whose keys are fixed here; [model], [data.options], [monitor] and callbacks take open keyword sets
_FIXED = {"data": {"name", "form", "batch_size", "options"}, "optim": set(DEFAULTS["optim"]) | {"name"},
          "monitor": set(DEFAULTS["monitor"]),
          "schedule": set(DEFAULTS["schedule"]), "train": set(DEFAULTS["train"])}
_TOP = set(DEFAULTS)


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass a TOML file or no config for the built-in default.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML ({exc}).") from None


def _parse_value(text: str):
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
        node[parts[-1]] = _parse_value(value.strip())
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
    for key, kind in (("seed", int), ("name", str)):
        if not isinstance(cfg[key], kind):
            raise UserError(f"config key {key!r} must be {kind.__name__}, got {cfg[key]!r}.")
    if "/" in cfg["name"] or cfg["name"].startswith("."):
        raise UserError(f"run name {cfg['name']!r} must be a plain directory name (no '/' and no leading '.').")
    epochs = cfg["train"]["epochs"]
    if not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"train.epochs must be a positive integer, got {epochs!r}.")
    bs = cfg["data"]["batch_size"]
    if not isinstance(bs, int) or bs < 1:
        raise UserError(f"data.batch_size must be a positive integer, got {bs!r}.")
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(cfg: dict) -> str:
    """Serialize a resolved config (scalars, tables, inline tables, arrays of tables) to TOML."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, (dict, list)) or (isinstance(v, list) and k != "callbacks")]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    for cb in cfg.get("callbacks", []):
        lines += ["", "[[callbacks]]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in cb.items()]
    return "\n".join(lines) + "\n"


# The built-in job of `gradcond run` with no config (what `make demo` runs): the default MLP on digits, trained
# plainly and with one optimised teleport, with the monitor on. Falls back gracefully while those parts are absent.
DEMO: dict = {"name": "demo", "compare_teleport": True, "monitor": {"enabled": True, "schedule": "default", "budget": 1.0}}
