"""The typed config schema (issue 25 item 4): every documented key's type and range is checked before any work;
a bad value is one line naming the key, the value and what is accepted, exit code 2, and nothing is written.

The property test feeds random wrong types and out-of-range values to every key of ``config.SCHEMA`` and to the
default model's options (checked against the zoo factory's signature, ``zoo.check_options``)."""

from __future__ import annotations

import math

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcond import config, zoo
from gradcond.cli import main

# values of each TOML kind, used as "wrong type" for keys of another kind
_INTS = st.integers(-10**6, 10**6)
_FLOATS = st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not float(v).is_integer() or
                                                                 not math.isfinite(v))
_WORDS = st.text("abcxyz-_ ", min_size=0, max_size=8)
_ARRAYS = st.lists(st.integers(-3, 3), max_size=3)
_TABLES = st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2)
_BOOLS = st.booleans()


def _bad_values(key: config.Key):
    """Values that violate ``key``'s type or range."""
    t = key.type
    wrong_type = {int: st.one_of(_FLOATS, _BOOLS, _WORDS, _ARRAYS, _TABLES),
                  float: st.one_of(_BOOLS, _WORDS, _ARRAYS, _TABLES, st.sampled_from([math.nan, math.inf, -math.inf])),
                  bool: st.one_of(_INTS, _FLOATS, _WORDS, _ARRAYS, _TABLES),
                  str: st.one_of(_INTS, _FLOATS, _BOOLS, _ARRAYS, _TABLES),
                  dict: st.one_of(_INTS, _FLOATS, _BOOLS, _WORDS, _ARRAYS),
                  list: st.one_of(_INTS, _FLOATS, _BOOLS, _WORDS, st.lists(_INTS, min_size=1, max_size=2),
                                  st.lists(_TABLES.filter(lambda d: "name" not in d), min_size=1, max_size=2))}[t]
    out = [wrong_type]
    if t in (int, float):
        low = key.ge if key.ge is not None else key.gt
        high = key.le if key.le is not None else key.lt
        num = st.integers if t is int else (lambda a, b: st.floats(a, b, allow_nan=False))
        if low is not None:
            below = low - 1 if key.ge is not None and t is int else low
            out.append(num(below - 1000, below) if t is int else
                       st.floats(low - 1000, low, exclude_max=key.ge is not None))
        if high is not None:
            above = high + 1 if key.le is not None and t is int else high
            out.append(num(above, above + 1000) if t is int else
                       st.floats(high, high + 1000, exclude_min=key.le is not None))
    if t is str and key.choices:
        out.append(_WORDS.filter(lambda w: w not in key.choices))
    if t is str and key.ge:
        out.append(st.just(""))
    if key.path == "name":
        out.append(st.sampled_from(["", ".hidden", "a/b", "../up"]))
    return st.one_of(out)


# the default model's options (zoo.mlp): wrong types, and sizes below their minimum
_MODEL_KEYS = {
    "model.depth": st.one_of(st.integers(-100, 0), _FLOATS, _BOOLS, _WORDS),
    "model.width": st.one_of(st.integers(-100, 0), _FLOATS, _BOOLS, _WORDS, st.just([]), st.just([8, 0])),
    "model.in_features": st.one_of(st.integers(-100, 0), _FLOATS, _BOOLS, _WORDS),
    "model.out_features": st.one_of(st.integers(-100, 0), _FLOATS, _BOOLS, _WORDS),
    "model.bias": st.one_of(_INTS, _WORDS, _ARRAYS),
    "model.act": st.one_of(_INTS, _BOOLS, _ARRAYS),
    "model.seed": st.one_of(st.integers(-100, -1), _FLOATS, _BOOLS, _WORDS),
}
CASES = st.one_of(*[st.tuples(st.just(k.path), _bad_values(k)) for k in config.SCHEMA],
                  *[st.tuples(st.just(k), s) for k, s in _MODEL_KEYS.items()])


def _literal(value) -> str:
    """``value`` as the TOML literal a user would type after ``--set key=``."""
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip() if not isinstance(value, dict) else \
        "{" + ", ".join(f"{k} = {v}" for k, v in value.items()) + "}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=CASES)
def test_every_key_refuses_wrong_types_and_ranges(case, tmp_path_factory, capsys):
    key, value = case
    out = tmp_path_factory.mktemp("o") / "runs"
    rc = main(["run", "--out", str(out), "--quiet", "--set", f"{key}={_literal(value)}"])
    err = capsys.readouterr().err
    assert rc == 2, (key, value, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradcond: error: ") and "Traceback" not in err, err
    assert key.split(".", 1)[-1] in lines[0] or key in lines[0], (key, lines[0])
    assert not out.exists()  # nothing written, not even the output directory


@pytest.mark.parametrize("setting,message", [
    # the commands of the issue, each one line and exit 2 now
    ("model.width=-5", "model.width must be a positive integer or a non-empty array of positive integers, got -5."),
    ("model.width=0", "model.width must be a positive integer or a non-empty array of positive integers, got 0."),
    ("model.depth=true", "model.depth must be a positive integer, got true."),
    ("model.depth=2.5", "model.depth must be a positive integer, got 2.5."),
    ("optim.lr=0", "optim.lr must be a positive number, got 0."),
    ("data.form=square", "data.form must be one of auto, flat, image, sequence, got 'square'."),
    ("seed=-1", "seed must be an integer in [0, 2147483647], got -1."),
    ("name=''", "name must be a plain directory name (a non-empty string without '/' that does not start with "
                "'.'), got ''."),
    ("callbacks=[{at_epoch=1}]", "callbacks[0] must be a table with a name ([[callbacks]] name = ...), got "
                                 "{'at_epoch': 1}."),
])
def test_reported_values_are_one_line_exit_2(setting, message, run_cli, tmp_path):
    rc, out, err = run_cli("run", "--out", str(tmp_path / "runs"), "--quiet", "--set", setting)
    assert (rc, err) == (2, f"gradcond: error: {message}\n")
    assert not (tmp_path / "runs").exists()


def test_diagnose_set_is_checked_against_the_zoo_factory(run_cli, tmp_path):
    rc, out, err = run_cli("diagnose", "mlp", "--set", "depth=abc", "--out", str(tmp_path / "d"), "--quiet")
    assert (rc, err) == (2, "gradcond: error: depth must be a positive integer, got 'abc'.\n")
    assert not (tmp_path / "d").exists()


def test_check_options_accepts_every_factory_default():
    """The schema of the zoo options is the factories' own: their defaults pass it (and build)."""
    import inspect

    for name in zoo.names():
        defaults = {k: p.default for k, p in inspect.signature(zoo.factory(name)).parameters.items()
                    if p.default is not inspect.Parameter.empty and p.default is not None}
        zoo.check_options(name, defaults)


def test_schema_defaults_pass_their_own_checks():
    config.check(config.resolve({}))
    for key in config.SCHEMA:
        assert key.ok(key.default), key.path


def test_a_monitor_table_turns_the_monitor_on():
    assert config.resolve({"monitor": {"budget": 0.05}})["monitor"]["enabled"] is True
    assert config.resolve({}, ["monitor.budget=0.05"])["monitor"]["enabled"] is True
    assert config.resolve({"monitor": {"budget": 0.05, "enabled": False}})["monitor"]["enabled"] is False
    assert config.resolve({})["monitor"]["enabled"] is False


def test_a_monitor_budget_in_a_user_config_runs_the_monitor(tmp_path, run_cli):
    """The issue's case: a TOML with ``[monitor] budget = 0.05`` and no ``enabled`` measures gradients."""
    from gradcond.train import read_metrics

    toml = tmp_path / "m.toml"
    toml.write_text('name = "m"\n[train]\nepochs = 1\n[monitor]\nbudget = 0.05\n')
    rc, out, err = run_cli("run", str(toml), "--out", str(tmp_path / "runs"), "--quiet")
    assert rc == 0, err
    probes = {r["probe"] for r in read_metrics(tmp_path / "runs" / "m" / "metrics.csv")}
    assert probes & {"grad_norm", "gsc"}, probes
