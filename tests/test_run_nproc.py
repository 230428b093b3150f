"""``gradcond run --nproc N`` (issue 16 item 3): local DDP ranks (gloo on the CPU), one run directory written by rank 0,
bad input refused with exit code 2 and one sentence."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from gradcond import config, runner
from gradcond.cli import main
from gradcond.train import load_checkpoint, read_metrics


def _err(capsys) -> str:
    return capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3", "two", "1.5"])
def test_nproc_not_a_positive_integer(value, capsys, tmp_path):
    assert main(["run", "--set", "name=t", "--out", str(tmp_path), "--nproc", value, "--quiet"]) == 2
    assert _err(capsys) == (f"gradcond: error: --nproc must be an integer >= 1 (the number of local training "
                            f"processes); got '{value}'.\n")
    assert not any(tmp_path.iterdir())


def test_nproc_beyond_the_cpu_cores(capsys, tmp_path):
    n = (os.cpu_count() or 1) + 1
    assert main(["run", "--set", "name=t", "--out", str(tmp_path), "--nproc", str(n), "--quiet"]) == 2
    assert _err(capsys) == (f"gradcond: error: --nproc {n} is more than this machine's {n - 1} CPU core(s); pass "
                            f"--nproc {n - 1} or fewer (each rank is one training process).\n")


def test_nproc_resume_without_a_run_is_refused(capsys, tmp_path):
    assert main(["run", "--set", "name=t", "--out", str(tmp_path), "--nproc", "2", "--resume", "--quiet"]) == 2
    assert _err(capsys) == (f"gradcond: error: nothing to resume in {tmp_path}: no checkpoint for run 't'; run without "
                            "--resume first.\n")


def test_backend_unavailable(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    assert main(["run", "--set", "name=t", "--out", str(tmp_path), "--nproc", "2", "--quiet"]) == 2
    assert _err(capsys) == ("gradcond: error: --nproc > 1 on the CPU needs the gloo backend, which this PyTorch build "
                            "does not include; run with --nproc 1.\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_nproc_on_cuda_without_cuda(capsys, tmp_path):
    assert main(["run", "--set", "name=t", "--out", str(tmp_path), "--nproc", "2", "--device", "cuda",
                 "--quiet"]) == 2
    assert "CUDA is not available here" in _err(capsys)


def test_a_held_run_lock_keeps_the_ranks_from_starting(capsys, tmp_path):
    with runner.RunLock(tmp_path, "t"):
        assert main(["run", "--set", "name=t", "--out", str(tmp_path), "--nproc", "2", "--quiet"]) == 2
    assert "is being written by another process" in _err(capsys)
    assert not (tmp_path / ".t.partial").exists() and not (tmp_path / "t").exists()


def test_started_by_torchrun_is_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--set", "name=t", "--out", str(tmp_path), "--quiet"]) == 2
    assert _err(capsys) == ("gradcond: error: gradcond run was started by torchrun (WORLD_SIZE is set), which would "
                            "make every process train its own copy of the run; start it once with --nproc N instead.\n")


def test_two_ranks_train_like_one_process_on_the_union_of_their_batches(tmp_path, capsys):
    """Independent computation: DDP averages the two ranks' gradients, so the run equals one process stepping on
    the mean of the two ranks' batch losses (rank r: samples r, r+2, ... truncated to n // 2, shuffled by seed + r)."""
    sets = ["name=ddp", "train.epochs=2", "model.depth=2", "model.width=16", "data.batch_size=64"]
    args = ["run", "--out", str(tmp_path), "--nproc", "2", "--quiet"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0, capsys.readouterr().err
    run = tmp_path / "ddp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # published; no partial, no lock left behind
    cfg = config.resolve({}, sets)
    job = runner.build_job(cfg)  # the same initial weights as every rank
    model, train = job.model, job.bundle.train
    per = len(train) // 2
    loaders = [DataLoader(Subset(train, list(range(r, len(train), 2))[:per]), batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(cfg["seed"] + r)) for r in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=cfg["optim"]["lr"], momentum=cfg["optim"]["momentum"])
    losses = []
    for _ in range(2):
        total = 0.0
        for (x0, y0), (x1, y1) in zip(*loaders):
            opt.zero_grad()
            l0 = torch.nn.functional.cross_entropy(model(x0), y0)
            l1 = torch.nn.functional.cross_entropy(model(x1), y1)
            ((l0 + l1) / 2).backward()
            opt.step()
            total += float(l0.detach()) * len(x0)
        losses.append(total / per)
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["world_size"] == 2 and len(ck["ranks"]) == 2  # every rank's random streams, for --resume
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ck["model"][k], v, rtol=1e-4, atol=1e-5)
    rows = read_metrics(run / "metrics.csv")
    logged = [r["value"] for r in rows if r["probe"] == "train" and r["name"] == "loss"]
    assert logged == pytest.approx(losses, rel=1e-4)  # rank 0's shard, not a reduction
    assert (run / "report.html").exists() and (run / "config.toml").exists()
    # a run trained by several ranks is resumed with as many (each trains its own shard)
    assert main(["run", "--out", str(tmp_path), "--resume", "--quiet", "--set", "train.epochs=3"]
                + [a for s in sets[:1] for a in ("--set", s)]) == 2
    assert capsys.readouterr().err == ("gradcond: error: run 'ddp' was trained with --nproc 2; resume it with --nproc 2 "
                                       "(each process trains its own share of the data, so the number of processes "
                                       "cannot change).\n")


@pytest.mark.slow
def test_a_diverging_rank_is_exit_3_and_leaves_nothing(tmp_path, capsys):
    args = ["run", "--out", str(tmp_path), "--nproc", "2", "--quiet", "--set", "name=div", "--set", "optim.lr=1e12",
            "--set", "train.epochs=2"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("gradcond: error: training diverged: training loss became"), err
    assert not any(tmp_path.iterdir())
