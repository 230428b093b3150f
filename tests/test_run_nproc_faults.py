"""Faults in ``gradcond run --nproc 2`` (issue 25 item 2): a rank killed mid-run or Ctrl-C keeps the partial run with
its last complete checkpoint, prints one line naming the lost rank, exits 4 (130 for Ctrl-C), and
``--nproc 2 --resume`` continues to the uninterrupted ``metrics.csv``, byte for byte.

The kill happens at a known point, not after a delay: ``runner.FAULT_ENV`` makes a rank send itself a signal at
the start of a given epoch (after the checkpoint of the epoch before)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradcond.cli import main
from gradcond.runner import FAULT_ENV, TIMEOUT_ENV
from gradcond.train import read_metrics

SRC = str(Path(__file__).parents[1] / "src")
# the demo (monitor on, plain run and teleported copy), small: 3 epochs of an MLP 2 x 16
DEMO = ["--quiet", "--nproc", "2", "--set", "train.epochs=3", "--set", "model.depth=2", "--set", "model.width=16"]
PLAIN = ["--quiet", "--nproc", "2", "--set", "name=p", "--set", "train.epochs=3", "--set", "model.depth=2",
         "--set", "model.width=16"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert main(["run", "--out", str(out), *DEMO]) == 0
    return out / "demo"


def test_sigkill_of_a_rank_keeps_the_run_and_resume_is_byte_identical(reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "1:2:SIGKILL")  # rank 1 kills itself at the start of epoch 2 (0-based)
    assert main(["run", "--out", str(tmp_path), *DEMO]) == 4
    err = capsys.readouterr().err
    assert err == (f"gradcond: error: rank 1 of 2 was killed by SIGKILL; the last complete checkpoint (after 2 "
                   f"epoch(s)) is kept in {tmp_path / '.demo.partial'} - continue with --nproc 2 --resume.\n")
    assert (tmp_path / ".demo.partial" / "checkpoints" / "last.pt").is_file() and not (tmp_path / "demo").exists()
    monkeypatch.delenv(FAULT_ENV)
    # the run's own epoch count is kept: no --set train.epochs needed (nor the other --set, taken from the run)
    assert main(["run", "--out", str(tmp_path), "--quiet", "--nproc", "2", "--resume"]) == 0, capsys.readouterr().err
    run = tmp_path / "demo"
    for rel in ("metrics.csv", "teleport/metrics.csv"):
        assert (run / rel).read_bytes() == (reference / rel).read_bytes(), rel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # published; no partial, no lock left
    # resumed with another number of processes: refused, the run untouched
    capsys.readouterr()
    assert main(["run", "--out", str(tmp_path), "--quiet", "--resume", "--set", "train.epochs=4"]) == 2
    assert capsys.readouterr().err.startswith("gradcond: error: run 'demo' was trained with --nproc 2; resume it "
                                              "with --nproc 2")


def test_sigkill_of_rank_0_is_named_and_resumable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "0:1:SIGKILL")
    assert main(["run", "--out", str(tmp_path), *PLAIN]) == 4
    err = capsys.readouterr().err
    assert err.startswith("gradcond: error: rank 0 of 2 was killed by SIGKILL; the last complete checkpoint (after 1 "
                          "epoch(s)) is kept in") and len(err.splitlines()) == 1
    monkeypatch.delenv(FAULT_ENV)
    assert main(["run", "--out", str(tmp_path), *PLAIN, "--resume"]) == 0
    rows = read_metrics(tmp_path / "p" / "metrics.csv")
    assert [r["epoch"] for r in rows if r["probe"] == "train" and r["name"] == "loss"] == [0, 1, 2]


def test_ctrl_c_keeps_the_partial_run_and_exits_130(tmp_path):
    """Rank 1 stops itself (SIGSTOP) at the start of epoch 1, after the first checkpoint; then the parent gets
    SIGINT, as from Ctrl-C: it stops the ranks, keeps the partial run and says how to continue."""
    env = dict(os.environ, PYTHONPATH=SRC, **{FAULT_ENV: "1:1:SIGSTOP"})
    proc = subprocess.Popen([sys.executable, "-m", "gradcond.cli", "run", "--out", str(tmp_path), *PLAIN],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # Ctrl-C's SIGINT handled as in a terminal even when this suite runs with SIGINT ignored
                            # (a background job of a shell without job control inherits SIG_IGN, which Python keeps)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ck = tmp_path / ".p.partial" / "checkpoints" / "last.pt"
    t0 = time.monotonic()
    while not ck.exists():  # a condition, not a timing assertion (the limit only bounds a hung test)
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 600, "no checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err == (f"gradcond: interrupted; the last complete checkpoint (after 1 epoch(s)) is kept in "
                   f"{tmp_path / '.p.partial'} - continue with --nproc 2 --resume.\n")
    assert ck.is_file()
    assert main(["run", "--out", str(tmp_path), *PLAIN, "--resume"]) == 0
    assert (tmp_path / "p" / "report.html").is_file()


@pytest.mark.parametrize("value", ["0", "-5", "abc", "inf"])
def test_a_bad_group_timeout_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys, value):
    monkeypatch.setenv(TIMEOUT_ENV, value)
    assert main(["run", "--out", str(tmp_path), *PLAIN]) == 2
    assert capsys.readouterr().err == (f"gradcond: error: GRADCOND_DDP_TIMEOUT_S must be a positive number of seconds, "
                                       f"got {value!r}.\n")
    assert not any(tmp_path.iterdir())
