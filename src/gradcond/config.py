"""Run configuration: TOML in, validated and resolved dict out.

Sections and their keys (every fixed key, its default, type and range: :data:`SCHEMA`)::

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
    [distributed]  strategy ("ddp" | "fsdp2": how the ranks of `gradcond run --nproc N` share the model; "dpl": deep
                   partition-wise learning, seed 002 §6.8), dpl = {...} (see :data:`DPL_KEYS`)
    compare_teleport = false   # also train a copy with one optimised teleport and compare (the demo does)

A ``[monitor]`` table given without ``enabled`` turns the monitor on: setting its budget or probes means the user
wants it (``enabled = false`` keeps it off).

Validation (why the standard library and not pydantic/attrs): the resolved config stays a plain dict of TOML values
(it is written to ``config.toml`` and into checkpoints, compared key by key on ``--resume``, and other code indexes
it), and every message is one sentence of ours naming the key, the value and what is accepted; a table of
:class:`Key` records with explicit checks gives exactly that without a model layer or a new dependency. Every key
of :data:`SCHEMA` is checked for type and range in :func:`resolve`, before anything is built or written; a bad one
is a one-line :class:`~gradcond.utils.UserError`. The options of ``[model]`` belong to the zoo factory and are
checked by :func:`gradcond.zoo.check_options` (from the factory's signature and ``zoo.OPTION_RANGES``) before the
model is built. ``--resume`` accepts a config that differs from the run's only in ``train.epochs`` and
``stop_after`` callbacks (``gradcond.runner.RESUMABLE_KEYS``).

Adding a key: append one :class:`Key` to :data:`SCHEMA`, e.g.
``Key("distributed.strategy", "ddp", str, choices=("ddp", "fsdp2"))``; its section (``[distributed]``) becomes a
known table, the default goes into :data:`DEFAULTS`, and :func:`resolve` checks it. Document it in docs/cli.md.
"""

from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from .utils import UserError

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "adamw")
SCHEDULES = ("constant", "step", "plateau")
DATA_FORMS = ("auto", "flat", "image", "sequence")
# seeds seed torch (64-bit) and numpy (32-bit) generators; ranks of --nproc add their rank to it
SEED_MAX = 2**31 - 1
STRATEGIES = ("ddp", "fsdp2", "dpl")  # distributed.strategy


@dataclass(frozen=True)
class Key:
    """One fixed config key: dotted ``path``, ``default``, Python ``type`` (``int``, ``float`` = any finite number,
    ``bool``, ``str``, ``dict`` = a table, ``list``) and its allowed range: ``choices``, or bounds ``ge``/``gt`` and
    ``le``/``lt`` for numbers (``ge=1`` for a string: not empty). ``accepted`` overrides the generated wording."""

    path: str
    default: object
    type: type
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    accepted: str = ""

    def ok(self, v) -> bool:
        if self.type is int:
            good = isinstance(v, int) and not isinstance(v, bool)
        elif self.type is float:
            good = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:
            good = isinstance(v, self.type) and not (self.type is not bool and isinstance(v, bool))
        if not good:
            return False
        if self.choices and v not in self.choices:
            return False
        size = len(v) if isinstance(v, str) else v
        if not isinstance(size, (int, float)) or isinstance(v, bool):
            return True
        return ((self.ge is None or size >= self.ge) and (self.gt is None or size > self.gt)
                and (self.le is None or size <= self.le) and (self.lt is None or size < self.lt))

    def describe(self) -> str:
        """What is accepted, in words: ``an integer >= 1``, ``a number in [0, 1)``, ``one of: sgd, adam``."""
        if self.accepted:
            return self.accepted
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        noun = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a table",
                list: "an array"}[self.type]
        lo = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None)
        hi = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None)
        if self.type is str:
            return "a non-empty string" if self.ge else noun
        if lo and hi:
            return f"{noun} in {lo}, {hi}"
        if lo in ("[1", "(0") and self.type is int or lo == "(0":
            return f"a positive {'integer' if self.type is int else 'number'}"
        if lo:
            return f"{noun} {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
        if hi:
            return f"{noun} {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
        return noun


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(v)


# Every fixed key of a run's config: one line per key (path, default, type, range). [model] options, [data.options]
# entries, [monitor.probes] entries and callbacks' keywords are open sets checked by their owners (zoo, data, monitor,
# callbacks) before any work.
SCHEMA: tuple[Key, ...] = (
    Key("name", "default", str, accepted="a plain directory name (a non-empty string without '/' that does not "
                                         "start with '.')"),
    Key("seed", 0, int, ge=0, le=SEED_MAX),
    Key("dtype", "float32", str, choices=("float32", "float64")),
    Key("compare_teleport", False, bool),
    Key("data.name", "digits", str, ge=1, accepted="a dataset name (a non-empty string)"),
    Key("data.form", "auto", str, choices=DATA_FORMS),
    Key("data.batch_size", 64, int, ge=1),
    Key("data.options", {}, dict, accepted="a table of dataset options"),
    Key("model.name", "mlp", str, ge=1, accepted="a zoo model name (a non-empty string)"),
    Key("optim.name", "momentum", str, choices=OPTIMIZERS),
    Key("optim.lr", 0.05, float, gt=0),
    Key("optim.momentum", 0.9, float, ge=0, lt=1),
    Key("optim.weight_decay", 0.0, float, ge=0),
    Key("schedule.name", "constant", str, choices=SCHEDULES),
    Key("schedule.step_size", 10, int, ge=1, accepted="a positive integer (epochs between decays)"),
    Key("schedule.gamma", 0.1, float, gt=0),
    Key("schedule.patience", 2, int, ge=0),
    Key("schedule.factor", 0.5, float, gt=0, lt=1),
    Key("train.epochs", 8, int, ge=1),
    Key("train.loss", "auto", str, ge=1, accepted='a loss name (a non-empty string) or "auto"'),
    Key("monitor.enabled", False, bool),
    Key("monitor.schedule", "default", str, ge=1, accepted="a monitor preset name (default, full, off)"),
    Key("monitor.budget", 0.05, float, gt=0, le=1, accepted="a fraction in (0, 1]"),
    Key("monitor.probe_batch_size", 64, int, ge=1),
    Key("monitor.probes", {}, dict, accepted='a table probe = "every:N"|"epoch"|"log"'),
    Key("distributed.strategy", "ddp", str, choices=STRATEGIES,
        accepted='"ddp" or "fsdp2" (how --nproc N ranks share the model) or "dpl" (partition-wise training)'),
    Key("distributed.dpl", {}, dict, accepted="a table of partition-wise options ([distributed.dpl])"),
    Key("callbacks", [], list, accepted="an array of tables, each with a name ([[callbacks]] name = ...)"),
)
KEYS: dict[str, Key] = {k.path: k for k in SCHEMA}
# tables whose keys are all in SCHEMA (others, such as [model], take open keyword sets besides their fixed keys)
OPEN_SECTIONS = frozenset({"model"})


def _defaults() -> dict:
    out: dict = {}
    for k in SCHEMA:
        node = out
        *parents, leaf = k.path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = copy.deepcopy(k.default)
    # the default MLP's options (zoo.mlp keywords) come with the default model only
    out["model"].update({"depth": 4, "width": 64, "act": "relu"})
    return out


DEFAULTS: dict = _defaults()
_SECTIONS = {k.path.split(".")[0] for k in SCHEMA if "." in k.path}
_FIXED = {s: {k.path.split(".", 1)[1] for k in SCHEMA if k.path.startswith(s + ".")} for s in _SECTIONS}

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
    """Merge ``user`` (from TOML) and ``overrides`` over :data:`DEFAULTS` and check every key (:data:`SCHEMA`).

    The first bad key raises :class:`UserError` with one sentence: the key, the value given and what is accepted.
    A ``[monitor]`` table without ``enabled`` enables the monitor."""
    user = apply_overrides(user or {}, overrides or [])
    unknown = sorted(set(user) - _TOP)
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_TOP))}.")
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in user.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise UserError(f"config key {key!r} must be a table ([{key}]), got {value!r}.")
            if key not in OPEN_SECTIONS:
                bad = sorted(set(value) - _FIXED[key])
                if bad:
                    raise UserError(
                        f"unknown key(s) {', '.join(bad)} in [{key}]; accepted: {', '.join(sorted(_FIXED[key]))}."
                    )
            if key == "model" and "name" in value and value["name"] != DEFAULTS["model"]["name"]:
                cfg["model"] = {}  # the default MLP's options do not apply to another model
            cfg[key].update(value)
        else:
            cfg[key] = value
    if isinstance(user.get("monitor"), dict) and user["monitor"] and "enabled" not in user["monitor"]:
        cfg["monitor"]["enabled"] = True  # a [monitor] table (budget, probes, ...) asks for the monitor
    check(cfg)
    return cfg


def check(cfg: dict) -> None:
    """Check the type and range of every :data:`SCHEMA` key of a resolved config; the first bad one raises a
    one-line :class:`UserError` naming the key, the value and what is accepted."""
    for k in SCHEMA:
        node = cfg
        for part in k.path.split("."):
            node = node[part] if isinstance(node, dict) and part in node else _MISSING
        if node is _MISSING:
            node = copy.deepcopy(k.default)
        if not k.ok(node) or (k.path == "name" and not _plain_name(node)):
            raise UserError(f"{k.path} must be {k.describe()}, got {_show(node)}.")
    for i, cb in enumerate(cfg.get("callbacks") or []):
        if not isinstance(cb, dict) or not isinstance(cb.get("name"), str) or not cb["name"]:
            raise UserError(f"callbacks[{i}] must be a table with a name ([[callbacks]] name = ...), got {_show(cb)}.")
    if not all(isinstance(k, str) and k for k in cfg["model"]):
        raise UserError(f"[model] keys must be non-empty names, got {sorted(map(repr, cfg['model']))}.")
    _check_dpl(cfg)


_MISSING = object()


def _plain_name(v: str) -> bool:
    return bool(v) and "/" not in v and not v.startswith(".") and "\0" not in v


def _show(v) -> str:
    """A value as the user wrote it (TOML-ish), shortened to one line."""
    text = "true" if v is True else "false" if v is False else repr(v)
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


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
