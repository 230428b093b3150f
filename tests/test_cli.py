import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gradcond import __version__


def test_version_and_help(run_cli):
    rc, out, _ = run_cli("--version")
    assert rc == 0 and __version__ in out
    for argv in (["--help"], ["run", "--help"], ["repro", "--help"], ["repro", "run", "--help"], ["repro", "list", "--help"],
                 ["diagnose", "--help"]):
        rc, out, _ = run_cli(*argv)
        assert rc == 0 and "usage:" in out


def test_run_default(run_cli, tmp_path):
    rc, out, err = run_cli("run", "--out", str(tmp_path), "--quiet", "--set", "train.epochs=2")
    assert rc == 0, err
    report = Path(out.strip().splitlines()[-1])
    assert report.name == "report.html" and report.is_file()
    run = report.parent
    for f in ("config.toml", "metrics.csv", "timings.csv", "events.jsonl", "checkpoints/last.pt", "report.html"):
        assert (run / f).exists(), f
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 2 and "Training curves" in html
    assert not list(tmp_path.glob(".*partial"))  # finished: nothing left half-written


def test_run_with_config_and_overrides(run_cli, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "mine"\nseed = 3\n[data]\nname = "spirals"\n[model]\nname = "mlp"\ndepth = 3\nwidth = 16\n'
                   '[optim]\nname = "adam"\nlr = 0.01\n[train]\nepochs = 2\n')
    rc, out, err = run_cli("run", str(cfg), "--out", str(tmp_path), "--quiet", "--set", "model.width=24",
                           "--set", "dtype=float64")
    assert rc == 0, err
    resolved = tomllib.loads((tmp_path / "mine" / "config.toml").read_text())
    assert resolved["model"]["width"] == 24 and resolved["model"]["depth"] == 3 and resolved["dtype"] == "float64"
    assert resolved["optim"]["name"] == "adam" and resolved["data"]["name"] == "spirals" and resolved["seed"] == 3
    lines = (tmp_path / "mine" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,probe,layer,name,value" and len(lines) > 8


def test_cli_resume_matches_uninterrupted(run_cli, tmp_path):
    common = ["--quiet", "--set", "train.epochs=3", "--set", "name=r"]
    assert run_cli("run", "--out", str(tmp_path / "a"), *common)[0] == 0
    cut = tmp_path / "b"
    rc, out, err = run_cli("run", "--out", str(cut), *common, "--set", 'callbacks=[{name="stop_after", epochs=2}]')
    assert rc == 0, err
    assert not (cut / "r").exists() and (cut / ".r.partial" / "checkpoints" / "last.pt").exists()
    assert "continue with --resume" in err and out.strip().endswith(".r.partial")
    rc, out, err = run_cli("run", "--out", str(cut), *common, "--resume")
    assert rc == 0, err
    assert (cut / "r" / "metrics.csv").read_text() == (tmp_path / "a" / "r" / "metrics.csv").read_text()


BAD = [
    (["--set", "data.name=imagenet"], "unknown dataset 'imagenet'; accepted:"),
    (["--set", "model.name=alexnet"], "unknown model 'alexnet'; accepted:"),
    (["--set", "optim.name=lbfgs"], "unknown optimizer 'lbfgs'; accepted:"),
    (["--set", "colour=red"], "unknown config key(s) colour; accepted:"),
    (["--set", "optim.beta=1"], "unknown key(s) beta in [optim]; accepted:"),
    (["--set", "model.colour=1"], "unknown option(s) colour for model 'mlp'"),
    (["--set", "data.name=mnist", "--set", "data.options={root=\"/nonexistent/mnist\"}"], "data directory /nonexistent/mnist does not exist"),
    (["--set", "model.name=simple_cnn", "--set", "data.form=flat"], "does not fit dataset 'digits'"),
    (["--set", "callbacks=[{name=\"nope\"}]"], "unknown callback 'nope'"),
    (["--set", "train.epochs=0"], "train.epochs must be a positive integer"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_one_line_exit_2_no_run_dir(run_cli, tmp_path, extra, message):
    out_dir = tmp_path / "out"
    rc, out, err = run_cli("run", "--out", str(out_dir), "--quiet", *extra)
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_malformed_toml_and_missing_config(run_cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname = 'mlp'\n")
    rc, _, err = run_cli("run", str(bad), "--out", str(tmp_path / "o"))
    assert rc == 2 and "is not valid TOML" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli("run", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_unwritable_output_directory(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run_cli("run", "--out", str(blocker / "runs"), "--quiet", "--set", "train.epochs=1")
    assert rc == 2 and "cannot be created" in err and len(err.strip().splitlines()) == 1


def test_repro_list_and_run(run_cli, tmp_path):
    rc, out, _ = run_cli("repro", "list")
    assert rc == 0 and "lli-linear-at-init" in out
    rc, out, err = run_cli("repro", "run", "lli-linear-at-init", "--quick", "--out", str(tmp_path))
    assert rc == 0, err
    assert "| claim | source | paper | ours | criterion | tolerance | preconditions | verdict |" in out
    assert "0 no, 0 untestable, 0 reported; HOLDS: all" in out
    import json

    res = json.loads((tmp_path / "lli-linear-at-init" / "result.json").read_text())
    assert res["holds"] and all(r["holds"] for r in res["rows"])
    assert all(r["judged"] and r["paper"] and r["criterion"] and r["tolerance"] for r in res["rows"])
    assert (tmp_path / "lli-linear-at-init" / "lli_linear_at_init.png").stat().st_size > 1000
    rc, _, err = run_cli("repro", "run", "nope")
    assert rc == 2 and "unknown reproduction 'nope'" in err


def test_console_script_entry_point(tmp_path):
    """The installed `gradcond` entry point (or `python -m gradcond.cli`) exits 2 with one line on bad input."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    p = subprocess.run([sys.executable, "-m", "gradcond.cli", "run", "--set", "optim.name=foo", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.strip().startswith("gradcond: error: unknown optimizer 'foo'")


def test_run_with_progress_bar(run_cli, tmp_path):
    rc, out, err = run_cli("run", "--out", str(tmp_path), "--set", "train.epochs=1", "--set", "compare_teleport=false")
    assert rc == 0, err
    assert out.strip().endswith("report.html")


# ---- seeds, devices, the teleport comparison's monitor plan (issue 12 §3) -----------------------------------------
def test_run_seed_option_is_set_seed(run_cli, tmp_path):
    common = ["--quiet", "--set", "train.epochs=1", "--set", "name=s", "--set", "monitor.enabled=false"]
    runs = {"seed": ["--seed", "5"], "set": ["--set", "seed=5"], "both": ["--set", "seed=9", "--seed", "5"],
            "default": []}
    for key, extra in runs.items():
        rc, _, err = run_cli("run", "--out", str(tmp_path / key), *common, *extra)
        assert rc == 0, err
    metrics = {k: (tmp_path / k / "s" / "metrics.csv").read_text() for k in runs}
    seeds = {k: tomllib.loads((tmp_path / k / "s" / "config.toml").read_text())["seed"] for k in runs}
    assert seeds == {"seed": 5, "set": 5, "both": 5, "default": 0}  # --seed wins over an earlier --set seed=
    assert metrics["seed"] == metrics["set"] == metrics["both"]
    assert metrics["seed"] != metrics["default"]  # the seed reaches the run (other initial weights, other order)


def test_run_device_cpu_and_auto_give_the_same_run_on_a_cpu_machine(run_cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("auto is cuda on this machine")
    common = ["--quiet", "--set", "train.epochs=1", "--set", "name=d", "--set", "monitor.enabled=false"]
    for dev in ("cpu", "auto"):
        rc, _, err = run_cli("run", "--out", str(tmp_path / dev), *common, "--device", dev)
        assert rc == 0, err
    assert (tmp_path / "cpu" / "d" / "metrics.csv").read_text() == (tmp_path / "auto" / "d" / "metrics.csv").read_text()


def test_teleport_copy_measures_at_the_plain_runs_steps(run_cli, tmp_path):
    """The demo's teleport comparison run reuses the plain run's monitor plan: same probes at the same steps."""
    import csv
    import json

    from gradcond.monitor import PROBES, SCHEDULE_FILE

    rc, _, err = run_cli("run", "--out", str(tmp_path), "--quiet", "--set", "train.epochs=2",
                         "--set", "monitor.budget=0.05")
    assert rc == 0, err
    plain, copy = tmp_path / "demo", tmp_path / "demo" / "teleport"
    assert json.loads((copy / SCHEDULE_FILE).read_text()) == json.loads((plain / SCHEDULE_FILE).read_text())

    def measured(run):
        with open(run / "metrics.csv") as fh:
            return {(r["step"], r["probe"]) for r in csv.DictReader(fh) if r["probe"] in PROBES}

    a, b = measured(plain), measured(copy)
    assert a and a == b
