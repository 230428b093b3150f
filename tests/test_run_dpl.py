"""DPL from ``gradcond run`` (issue 28 item 2): ``distributed.strategy = "dpl"`` with the online k-filter and round
robin, on ``--nproc 2`` ranks and in one process; bad input refused with exit code 2 before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from gradcond.cli import main
from gradcond.train import read_metrics

CONFIG = """
name = "dpl"
[train]
epochs = 4
[optim]
name = "adam"
lr = 0.003
[distributed]
strategy = "dpl"
[distributed.dpl]
schedule = "round_robin"
epochs_per_round = 2
feature_checkpoint = "device"
lr_scale = 0.5
wd_scale = 0.5
k_filter = {k = 5, warmup_epochs = 1, filter_batch = 512, max_removed = 0.6}
"""


def _write(tmp_path, text=CONFIG):
    path = tmp_path / "dpl.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("nproc", ["2", "1"])
def test_dpl_with_k_filter_and_round_robin_runs_from_gradcond_run(tmp_path, capsys, nproc):
    out = tmp_path / "runs"
    rc = main(["run", _write(tmp_path), "--out", str(out), "--nproc", nproc, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    run = out / "dpl"
    assert {"config.toml", "partitionwise.json", "model.pt", "metrics.csv", "events.jsonl",
            "report.html"} <= {p.name for p in run.iterdir()}
    summary = json.loads((run / "partitionwise.json").read_text())
    assert summary["schedule"] == "round_robin" and summary["world_size"] == int(nproc)
    assert summary["rounds"] == 2 and summary["epochs_per_round"] == 2
    hist = summary["history"]
    kept = [h["kept_fraction"] for h in hist if h["partition"] == 0]
    assert kept[0] == 1.0 and min(kept[1:]) < 1.0  # the k-filter removed samples after its one warm-up epoch
    sent = [round(h["kept_fraction"] * h["samples"]) for h in hist if h["partition"] == 0]
    samples = [h["samples"] for h in hist if h["partition"] == 1]
    # round robin with checkpoints: partition 1's turn replays what partition 0 sent in the last epoch of its turn
    assert samples == [sent[1], sent[1], sent[3], sent[3]] and sent[1] < hist[0]["samples"]
    rows = read_metrics(run / "metrics.csv")
    test_acc = [r for r in rows if r["probe"] == "test" and r["name"] == "acc"]
    assert len(test_acc) == 4 and test_acc[-1]["value"] == pytest.approx(summary["accuracy"][-1])
    assert test_acc[-1]["value"] > 0.5  # ten digits: the network learned something in 4 epochs
    state = torch.load(run / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("dpl, message", [
    ('partitions = 3', "distributed.dpl.partitions is 3 but --nproc is 2: DPL runs one process per partition; pass "
                       "--nproc 3, or set distributed.dpl.replicas (processes per partition) to sum to 2."),
    ('replicas = [2, 1]', "distributed.dpl.replicas [2, 1] needs 3 processes but --nproc is 2; pass --nproc 3 or "
                          "change replicas to sum to 2."),
    ('schedule = "random_robin"', "distributed.dpl.schedule 'random_robin' runs in one process; with --nproc 2 use "
                                  "\"concurrent\" or \"round_robin\"."),
    ('k_filter = {k = 0}', "k_filter {'k': 0} is not a valid KFilter (KFilter k must be an integer >= 1, got 0.)."),
    ('steps = 3', "unknown key(s) steps in [distributed.dpl]; accepted: partitions, replicas, schedule, "
                  "epochs_per_round, feature_checkpoint, filter_links, k_filter, loss_filter, lr_scale, wd_scale, "
                  "lr_drops, max_decision_convs, timeout_s, preset."),
])
def test_bad_dpl_config_is_one_sentence_exit_2_and_nothing_written(tmp_path, capsys, dpl, message):
    text = f'name = "dpl"\n[distributed]\nstrategy = "dpl"\n[distributed.dpl]\n{dpl}\n'
    out = tmp_path / "runs"
    rc = main(["run", _write(tmp_path, text), "--out", str(out), "--nproc", "2", "--quiet"])
    assert rc == 2
    assert capsys.readouterr().err == f"gradcond: error: {message}\n"
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith(".dpl.lock"))


def test_dpl_refuses_a_model_with_fewer_blocks_than_partitions(tmp_path, capsys):
    text = ('name = "dpl"\n[model]\nname = "mlp"\ndepth = 2\n[distributed]\nstrategy = "dpl"\n'
            '[distributed.dpl]\npartitions = 3\n')
    rc = main(["run", _write(tmp_path, text), "--out", str(tmp_path / "runs"), "--quiet"])
    assert rc == 2
    assert capsys.readouterr().err == ("gradcond: error: cannot make 3 partitions of 2 blocks; pass a number in "
                                       "1..2.\n")
