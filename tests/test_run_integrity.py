"""Run directories (issue 20 §4): one writer at a time, resume only with the same config, and a resumed run's
``metrics.csv`` byte-identical to an uninterrupted one (timings live in ``timings.csv``)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradcond.runner import RunLock, config_differences
from gradcond.train import TIMING_NAMES, read_metrics

SRC = str(Path(__file__).parents[1] / "src")
# Child processes use this process's thread count: reductions split over a different number of threads round
# differently, and the byte-identity checks compare runs made here with runs made in a child.
_THREADS = str(torch.get_num_threads())
QUICK = ["--quiet", "--set", "name=r", "--set", "train.epochs=3"]  # default MLP on digits, monitor off


def _cli(*argv):
    """The console entry point in a fresh process (``python -m gradcond.cli``)."""
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS=_THREADS)
    return subprocess.Popen([sys.executable, "-m", "gradcond.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc, what: str, limit: float = 300.0) -> None:
    """Poll until ``path`` exists (a condition, not a timing assertion: ``limit`` only bounds a hung test)."""
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() - t0 > limit:
            proc.kill()
            pytest.fail(f"no {what} after {limit} s")
        time.sleep(0.02)


# ---- one writer --------------------------------------------------------------------------------------------------
def test_second_writer_refused_while_lock_held(run_cli, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    with RunLock(out, "r"):
        rc, _, err = run_cli("run", "--out", str(out), *QUICK)
        assert rc == 2
        line = err.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in err
        assert line.startswith(f"gradcond: error: run directory {out / 'r'} is being written by another process "
                               f"(pid {os.getpid()} on host ")
        assert line.endswith("wait for it or choose another --out.")
        assert not (out / "r").exists() and not (out / ".r.partial").exists()  # nothing touched
    assert not (out / ".r.lock").exists() and not (out / ".r.lock.json").exists()  # released and cleaned up
    rc, _, err = run_cli("run", "--out", str(out), *QUICK)
    assert rc == 0, err
    assert (out / "r" / "report.html").is_file() and not (out / ".r.lock").exists()


WAITER = """
import sys, time
from pathlib import Path
from gradcond.train import Callback
from gradcond.train.callbacks import register_callback


class WaitFor(Callback):
    # holds the run after its first epoch until the file `go` exists; logs nothing, so metrics are unchanged
    def __init__(self, go: str):
        self.go = Path(go)

    def on_epoch_end(self, state):
        if state.epoch == 0:
            (self.go.parent / "waiting").touch()
            t0 = time.monotonic()
            while not self.go.exists() and time.monotonic() - t0 < 300:
                time.sleep(0.02)


register_callback("wait_for", "__main__:WaitFor")
from gradcond.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_concurrent_runs_second_exits_2_first_intact(run_cli, tmp_path):
    """Process A holds run `r` (paused after epoch 0 by a callback); process B (here) tries the same run."""
    ref = tmp_path / "ref"
    assert run_cli("run", "--out", str(ref), *QUICK, "--set", "seed=1")[0] == 0
    out, go = tmp_path / "shared", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS=_THREADS)
    first = subprocess.Popen([sys.executable, "-c", WAITER, "run", "--out", str(out), *QUICK, "--set", "seed=1",
                              "--set", f'callbacks=[{{name="wait_for", go="{go}"}}]'],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(tmp_path / "waiting", first, "first epoch")  # A is mid-run, holding the lock
    rc, _, err = run_cli("run", "--out", str(out), *QUICK, "--set", "seed=2")
    assert first.poll() is None  # A was still running during B's attempt
    go.touch()
    f_out, f_err = first.communicate(timeout=600)
    assert first.returncode == 0, f_err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"is being written by another process (pid {first.pid} on host " in err
    # A's results are its own: config seed 1, metrics equal to an undisturbed run of the same config
    assert "seed = 1\n" in (out / "r" / "config.toml").read_text()
    assert (out / "r" / "metrics.csv").read_bytes() == (ref / "r" / "metrics.csv").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["r"]  # no partial, no stale lock files


# ---- resume only with the same config ----------------------------------------------------------------------------
def test_config_differences_lists_dotted_keys():
    a = {"optim": {"lr": 0.1, "name": "sgd"}, "train": {"epochs": 3}, "callbacks": [{"name": "stop_after", "epochs": 1}]}
    b = {"optim": {"lr": 0.2, "name": "sgd"}, "train": {"epochs": 9}, "callbacks": []}
    assert config_differences(a, b) == ["optim.lr"]  # epochs resumable, stop_after ignored
    assert config_differences(a, {**b, "optim": {"lr": 0.1, "name": "adam"}, "seed": 1}) == ["optim.name", "seed"]
    assert config_differences({"x": {"y": 1}}, {"x": {"y": 1.0}}) == []  # numbers by value


@pytest.mark.parametrize("change,key", [(["--set", "optim.lr=0.1"], "optim.lr"),
                                        (["--set", "model.width=32"], "model.width"),
                                        (["--set", "optim.name=adam"], "optim.name")])
def test_resume_with_changed_config_refused(run_cli, tmp_path, change, key):
    out = tmp_path / "o"
    rc, _, err = run_cli("run", "--out", str(out), *QUICK, "--set", 'callbacks=[{name="stop_after", epochs=1}]')
    assert rc == 0, err
    ck = out / ".r.partial" / "checkpoints" / "last.pt"
    before = {p.name: p.read_bytes() for p in (out / ".r.partial").iterdir() if p.is_file()} | {"ck": ck.read_bytes()}
    rc, _, err = run_cli("run", "--out", str(out), *QUICK, "--resume", *change)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("gradcond: error: --resume with a changed config (") and f"{key}:" in err
    assert "only train.epochs may change" in err
    after = {p.name: p.read_bytes() for p in (out / ".r.partial").iterdir() if p.is_file()} | {"ck": ck.read_bytes()}
    assert after == before  # the interrupted run is untouched and still resumable
    rc, _, err = run_cli("run", "--out", str(out), *QUICK, "--resume")
    assert rc == 0, err


def test_resume_may_extend_epochs(run_cli, tmp_path):
    """train.epochs is resumable: 2 epochs, then --resume with 4 == 4 epochs at once (byte for byte)."""
    assert run_cli("run", "--out", str(tmp_path / "full"), *QUICK, "--set", "train.epochs=4")[0] == 0
    assert run_cli("run", "--out", str(tmp_path / "ext"), *QUICK, "--set", "train.epochs=2")[0] == 0
    rc, _, err = run_cli("run", "--out", str(tmp_path / "ext"), *QUICK, "--set", "train.epochs=4", "--resume")
    assert rc == 0, err
    assert (tmp_path / "ext" / "r" / "metrics.csv").read_bytes() == (tmp_path / "full" / "r" / "metrics.csv").read_bytes()


# ---- byte-identical metrics after kill and resume (the demo: monitor on, teleport comparison) --------------------
DEMO3 = ["--quiet", "--set", "train.epochs=3"]


@pytest.fixture(scope="module")
def demo_reference(tmp_path_factory):
    from gradcond.cli import main

    out = tmp_path_factory.mktemp("demo_ref")
    assert main(["run", "--out", str(out), *DEMO3]) == 0
    return out / "demo"


def _assert_same_run(run: Path, ref: Path) -> None:
    for rel in ("metrics.csv", "teleport/metrics.csv"):
        assert (run / rel).read_bytes() == (ref / rel).read_bytes(), rel
    names = {r["name"] for r in read_metrics(run / "metrics.csv")}
    assert names & TIMING_NAMES == set()  # timings are kept out of metrics.csv ...
    assert "time_fraction" in {r["name"] for r in read_metrics(run / "timings.csv")}  # ... and kept here
    assert "seconds" in {r["name"] for r in read_metrics(run / "teleport" / "timings.csv")}
    assert {"gsc", "grad_norm"} & {r["probe"] for r in read_metrics(run / "metrics.csv")}  # the monitor was on


def test_stop_and_resume_demo_metrics_byte_identical(run_cli, tmp_path, demo_reference):
    """Cut the plain run after epoch 1, then the teleport copy after epoch 1, then finish: same bytes."""
    stop = ["--set", 'callbacks=[{name="stop_after", epochs=2}]']
    rc, out, err = run_cli("run", "--out", str(tmp_path), *DEMO3, *stop)
    assert rc == 0 and "continue with --resume" in err
    assert not (tmp_path / ".demo.partial" / "teleport").exists()
    rc, out, err = run_cli("run", "--out", str(tmp_path), *DEMO3, *stop, "--resume")  # plain ends, copy stops
    assert rc == 0 and "continue with --resume" in err
    assert (tmp_path / ".demo.partial" / "teleport" / "checkpoints" / "last.pt").exists()
    rc, out, err = run_cli("run", "--out", str(tmp_path), *DEMO3, "--resume")
    assert rc == 0, err
    _assert_same_run(tmp_path / "demo", demo_reference)


def test_sigkill_and_resume_demo_metrics_byte_identical(run_cli, tmp_path, demo_reference):
    proc = _cli("run", "--out", str(tmp_path), *DEMO3)
    _wait_for(tmp_path / ".demo.partial" / "checkpoints" / "last.pt", proc, "first checkpoint")
    proc.send_signal(signal.SIGKILL)  # no cleanup runs: the OS drops the lock, the files stay as they are
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (tmp_path / ".demo.partial").is_dir() and not (tmp_path / "demo").exists()
    rc, out, err = run_cli("run", "--out", str(tmp_path), *DEMO3, "--resume")
    assert rc == 0, err
    _assert_same_run(tmp_path / "demo", demo_reference)
    assert not (tmp_path / ".demo.partial").exists()
