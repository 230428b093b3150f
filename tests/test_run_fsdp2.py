"""``gradcond run --nproc N`` with ``distributed.strategy = "fsdp2"`` (issue 24 §3): the ranks shard the model with
``fully_shard`` (gloo on the CPU) and train like DDP ranks; rank 0 writes one run directory whose checkpoint holds
the full (gathered) state and whose monitor rows are the whole model's; bad values are refused in one sentence."""

from __future__ import annotations

import pytest
import torch

from gradcond.cli import main
from gradcond.train import load_checkpoint, read_events, read_metrics

SETS = ["train.epochs=1", "model.depth=2", "model.width=16", "data.batch_size=64", "monitor.enabled=true",
        "monitor.budget=1.0"]


def _run(tmp_path, strategy):
    sets = SETS + [f"name={strategy}", f"distributed.strategy={strategy}"]
    args = ["run", "--out", str(tmp_path), "--nproc", "2", "--quiet"] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    return tmp_path / strategy


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {s: _run(out, s) for s in ("fsdp2", "ddp")}


def test_fsdp2_ranks_train_like_ddp_ranks(runs):
    f = load_checkpoint(runs["fsdp2"] / "checkpoints" / "last.pt")
    d = load_checkpoint(runs["ddp"] / "checkpoints" / "last.pt")
    assert f["strategy"] == "fsdp2" and f["world_size"] == 2 and d["strategy"] == "ddp"
    # the FSDP2 checkpoint holds whole tensors under the plain model's names (gathered for the checkpoint only)
    assert set(d["model"]) == set(f["model"])  # both hold the inner module's keys (no DDP "module." prefix)
    for k, v in f["model"].items():
        assert not hasattr(v, "placements") and v.shape == d["model"][k].shape
        torch.testing.assert_close(v, d["model"][k], rtol=1e-4, atol=1e-5)
    lf = [r["value"] for r in read_metrics(runs["fsdp2"] / "metrics.csv") if r["probe"] == "train"]
    ld = [r["value"] for r in read_metrics(runs["ddp"] / "metrics.csv") if r["probe"] == "train"]
    assert lf == pytest.approx(ld, rel=1e-4)


def test_fsdp2_run_measures_the_whole_model_and_says_what_it_left_out(runs):
    rows = read_metrics(runs["fsdp2"] / "metrics.csv")
    ref = {(r["step"], r["layer"]): r["value"] for r in read_metrics(runs["ddp"] / "metrics.csv")
           if r["probe"] == "grad_norm"}
    got = {(r["step"], r["layer"]): r["value"] for r in rows if r["probe"] == "grad_norm"}
    assert ref and set(got) == set(ref)
    assert all(got[k] == pytest.approx(v, rel=1e-4) for k, v in ref.items())
    assert any(r["probe"] == "gsc" for r in rows)
    ev = [e for e in read_events(runs["fsdp2"] / "events.jsonl") if e["kind"] == "probe_unavailable"]
    assert [e["probe"] for e in ev] == ["conditioning"]
    html = (runs["fsdp2"] / "report.html").read_text()
    assert "Probes not run under the distributed strategy" in html and "holds only a shard" in html


def test_bad_strategy_and_fsdp2_teleport_are_refused(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "--quiet", "--set", "distributed.strategy=zero3"]) == 2
    assert capsys.readouterr().err == ("gradcond: error: distributed.strategy must be \"ddp\" or \"fsdp2\" (how "
                                       "--nproc N ranks share the model) or \"dpl\" (partition-wise training), got "
                                       "'zero3'.\n")
    assert main(["run", "--out", str(tmp_path), "--quiet", "--nproc", "2", "--set", "distributed.strategy=fsdp2",
                 "--set", "compare_teleport=true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradcond: error: distributed.strategy = \"fsdp2\" cannot run teleports") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
