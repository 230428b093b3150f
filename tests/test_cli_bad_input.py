"""Every bad input at the command line (issue 20 §5): one line on stderr, a documented exit code, nothing
half-written (no ``.partial`` directory, no run directory)."""

import errno
import os
from pathlib import Path

import pytest
import torch

from gradcond.utils import EXIT_BAD_INPUT, EXIT_DIVERGED

QUICK = ["--quiet", "--set", "name=r", "--set", "train.epochs=2"]


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _nothing_left(out: Path) -> None:
    assert not list(out.glob(".*.partial")) and not (out / "r").exists()


BAD_VALUES = [
    (["--set", "optim.weight_decay=-1"], "optim.weight_decay must be a number >= 0, got -1."),
    (["--set", "schedule.name=step", "--set", "schedule.step_size=0"],
     "schedule.step_size must be a positive integer (epochs between decays), got 0."),
    (["--set", "optim.lr=abc"], "optim.lr must be a positive number, got 'abc'."),
    (["--set", "optim.lr=0"], "optim.lr must be a positive number, got 0."),
    (["--set", "optim.lr=nan"], "optim.lr must be a positive number, got nan."),
    (["--set", "optim.lr=true"], "optim.lr must be a positive number, got true."),
    (["--set", "optim.momentum=1.5"], "optim.momentum must be a number in [0, 1), got 1.5."),
    (["--set", "schedule.gamma=-0.1"], "schedule.gamma must be a positive number, got -0.1."),
    (["--set", "schedule.factor=2"], "schedule.factor must be a number in (0, 1), got 2."),
    (["--set", "schedule.patience=-1"], "schedule.patience must be an integer >= 0, got -1."),
    (["--set", "monitor.budget=0"], "monitor.budget must be a fraction in (0, 1], got 0."),
    (["--set", "monitor.enabled=yes"], "monitor.enabled must be true or false, got 'yes'."),
    (["--set", "seed=1.5"], "seed must be an integer in [0, 2147483647], got 1.5."),
    (["--set", "data.batch_size=0"], "data.batch_size must be a positive integer, got 0."),
    (["--set", "train.epochs=2.5"], "train.epochs must be a positive integer, got 2.5."),
]


@pytest.mark.parametrize("extra,message", BAD_VALUES)
def test_bad_config_value_one_line_exit_2_nothing_written(run_cli, tmp_path, extra, message):
    out = tmp_path / "out"
    rc, _, err = run_cli("run", "--out", str(out), *QUICK, *extra)
    assert rc == EXIT_BAD_INPUT == 2
    assert _one_line(err) == f"gradcond: error: {message}"
    assert not out.exists()  # checked before the disk is touched


def test_divergence_has_its_own_exit_code(run_cli, tmp_path):
    out = tmp_path / "out"
    rc, _, err = run_cli("run", "--out", str(out), *QUICK, "--set", "optim.lr=1e6")
    assert rc == EXIT_DIVERGED == 3
    line = _one_line(err)
    assert line.startswith("gradcond: error: training diverged: training loss became ")
    assert line.endswith("lower the learning rate or check the data.")
    _nothing_left(out)
    assert list(out.iterdir()) == []  # no lock files either
    rc, out_text, _ = run_cli("run", "--help")
    assert rc == 0 and "3 training diverged" in " ".join(out_text.split())


def _failing_write(fail_on_call: int):
    """The checkpoint writer, raising ENOSPC on its ``fail_on_call``-th call (1-based) after writing a few bytes."""
    from gradcond.train import trainer

    real, calls = trainer._write_file, {"n": 0}

    def write(path, data):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    return write


def test_disk_full_at_first_checkpoint_leaves_nothing(run_cli, tmp_path, monkeypatch):
    from gradcond.train import trainer

    out = tmp_path / "out"
    monkeypatch.setattr(trainer, "_write_file", _failing_write(1))
    rc, _, err = run_cli("run", "--out", str(out), *QUICK)
    assert rc == 2
    line = _one_line(err)
    assert line.startswith("gradcond: error: cannot write run 'r' into ") and "No space left on device" in line
    assert line.endswith("nothing was kept - free space and run again.")
    _nothing_left(out)


def test_disk_full_later_keeps_last_checkpoint_and_resumes_exactly(run_cli, tmp_path, monkeypatch):
    from gradcond.train import trainer

    assert run_cli("run", "--out", str(tmp_path / "ref"), *QUICK, "--set", "train.epochs=3")[0] == 0
    out = tmp_path / "out"
    monkeypatch.setattr(trainer, "_write_file", _failing_write(2))  # epoch 0 saved, epoch 1's hits a full disk
    rc, _, err = run_cli("run", "--out", str(out), *QUICK, "--set", "train.epochs=3")
    assert rc == 2
    line = _one_line(err)
    assert "No space left on device" in line and "after 1 epoch(s)" in line
    assert line.endswith("free space and continue with --resume.")
    ck = out / ".r.partial" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt"]  # the temporary file is gone, the last good one kept
    monkeypatch.undo()
    rc, _, err = run_cli("run", "--out", str(out), *QUICK, "--set", "train.epochs=3", "--resume")
    assert rc == 0, err
    assert (out / "r" / "metrics.csv").read_bytes() == (tmp_path / "ref" / "r" / "metrics.csv").read_bytes()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device whose writes fail with ENOSPC)")
def test_a_real_full_disk_during_torch_save_is_one_line_and_resumable(run_cli, tmp_path):
    """No mock: the checkpoint's temporary file is a link to /dev/full, so the kernel answers ENOSPC to the write of
    the bytes torch.save produced (torch.save straight into such a file raised a RuntimeError: traceback, exit 1)."""
    assert run_cli("run", "--out", str(tmp_path / "ref"), *QUICK, "--set", "train.epochs=3")[0] == 0
    out = tmp_path / "out"
    stop = ["--set", 'callbacks=[{name="stop_after", epochs=1}]']
    assert run_cli("run", "--out", str(out), *QUICK, "--set", "train.epochs=3", *stop)[0] == 0
    ck = out / ".r.partial" / "checkpoints"
    good = (ck / "last.pt").read_bytes()
    (ck / "last.tmp").symlink_to("/dev/full")
    rc, _, err = run_cli("run", "--out", str(out), *QUICK, "--set", "train.epochs=3", "--resume")
    assert rc == 2, err
    assert _one_line(err) == (f"gradcond: error: cannot write run 'r' (No space left on device); the last complete "
                              f"checkpoint (after 1 epoch(s)) is kept in {out / '.r.partial'}: free space and continue "
                              f"with --resume.")
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt"] and (ck / "last.pt").read_bytes() == good
    rc, _, err = run_cli("run", "--out", str(out), *QUICK, "--set", "train.epochs=3", "--resume")
    assert rc == 0, err
    assert (out / "r" / "metrics.csv").read_bytes() == (tmp_path / "ref" / "r" / "metrics.csv").read_bytes()


def test_repro_run_unwritable_out_is_bad_input(run_cli, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("a file, not a directory")
    rc, _, err = run_cli("repro", "run", "lli-linear-at-init", "--quick", "--out", str(afile / "out"))
    assert rc == 2  # not 1, which means "the claim does not hold"
    line = _one_line(err)
    assert line.startswith(f"gradcond: error: output directory {afile / 'out' / 'lli-linear-at-init'} cannot be created")
    assert line.endswith("pass a writable --out.")
    assert afile.read_text() == "a file, not a directory"


def test_callback_after_last_epoch_warns_at_start(run_cli, tmp_path):
    rc, _, err = run_cli("run", "--out", str(tmp_path), *QUICK,
                         "--set", 'callbacks=[{name="teleport", at_epoch=[1, 5], kind="random"}]')
    assert rc == 0, err
    assert err.strip().splitlines() == [
        "gradcond: warning: callback TeleportCallback is scheduled at epoch(s) 5 (0-based) but training runs "
        "2 epoch(s), 0-1; it will not fire there."]


def test_demo_teleport_copy_after_last_epoch_warns(run_cli, tmp_path):
    """The demo's comparison teleports at the start of epoch 1: a 1-epoch demo says that it cannot."""
    rc, _, err = run_cli("run", "--out", str(tmp_path), "--quiet", "--set", "train.epochs=1",
                         "--set", "monitor.enabled=false")
    assert rc == 0, err
    assert err.strip().splitlines() == [
        "gradcond: warning: compare_teleport: callback TeleportCallback is scheduled at epoch(s) 1 (0-based) but "
        "training runs 1 epoch(s), 0-0; it will not fire there."]


def test_repro_disk_full_mid_run_is_one_line(run_cli, tmp_path, monkeypatch):
    """A write that fails inside a reproduction (a full disk while saving its result) is exit 2, one line."""
    from gradcond.experiments import registry

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(registry, "atomic_write_text", full)
    rc, _, err = run_cli("repro", "run", "lli-linear-at-init", "--quick", "--out", str(tmp_path))
    assert rc == 2
    assert _one_line(err) == (f"gradcond: error: cannot write output: No space left on device "
                              f"({tmp_path / 'lli-linear-at-init' / 'result.json'}); free space or pass a writable --out.")
