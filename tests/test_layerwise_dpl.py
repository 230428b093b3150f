"""Deep partition-wise learning on torch.distributed (issue 15 item 4): :func:`fit_partitionwise`.

Multi-rank tests spawn gloo ranks on 127.0.0.1 (loopback only) through the reproduction's launcher
(:func:`gradcond.experiments.dpl_repro.run_dpl`).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradcond.distributed import free_port
from gradcond.experiments.dpl_repro import DPL_DEFAULTS, build, digest, fit_local, run_dpl
from gradcond.train import LossFilter
from gradcond.train.layerwise.dpl import PartitionwiseResult, fit_partitionwise, make_partitions
from gradcond.utils import UserError


@contextmanager
def one_thread():
    """The ranks run with one thread; a bit-identical comparison needs the same here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _toy(seed=0, n=96, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _parts(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    parts = [nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.Tanh())]
    heads = [nn.Linear(8, 3), nn.Linear(8, 3)]
    return [p.to(dtype) for p in parts], [h.to(dtype) for h in heads]


def _loader(x, y, bs=32):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_concurrent_equals_a_hand_written_pipeline(dtype):
    """Independent computation: per batch, partition 0 + head 0 take one SGD step, and partition 1 + head 1 take one
    step on partition 0's output of that same forward pass (detached: no gradient reaches partition 0)."""
    x, y = _toy(dtype=dtype)
    parts, heads = _parts(dtype)
    ref_p, ref_h = copy.deepcopy(parts), copy.deepcopy(heads)
    res = fit_partitionwise(parts, heads, _loader(x, y), epochs=2, optimizer="sgd", lr=0.1, lr_scale=0.5,
                            lr_drops=[0.5])
    opts = [torch.optim.SGD([*ref_p[i].parameters(), *ref_h[i].parameters()], lr=0.1 * 0.5 ** i) for i in range(2)]
    for epoch in range(2):
        for i in range(2):  # lr_drops=[0.5]: the second epoch runs at 0.1x
            opts[i].param_groups[0]["lr"] = 0.1 * 0.5 ** i * (0.1 if epoch == 1 else 1.0)
        for s in range(0, len(x), 32):
            h, t = x[s:s + 32], y[s:s + 32]
            for i in range(2):
                z = ref_p[i](h)
                loss = nn.functional.cross_entropy(ref_h[i](z), t)
                opts[i].zero_grad()
                loss.backward()
                opts[i].step()
                h = z.detach()
    for got, want in zip([*parts, *heads], [*ref_p, *ref_h]):
        for a, b in zip(got.parameters(), want.parameters()):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert isinstance(res, PartitionwiseResult) and res.world_size == 1 and res.schedule == "concurrent"
    assert [(r["partition"], r["epoch"]) for r in res.history] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["samples"] == len(x) for r in res.history)
    assert isinstance(res.model, nn.Sequential) and len(res.model) == 3 and res.model[2] is heads[1]
    assert math.isnan(res.accuracy[0])  # no test loader: no accuracy


def test_sequential_is_bottom_up_on_frozen_eval_features():
    """Partition 0 trains alone for all epochs (the same steps as in the concurrent schedule); partition 1 then
    trains on the frozen partition 0's eval-mode outputs; test accuracy per depth comes from each head."""
    x, y = _toy()
    parts, heads = _parts()
    cparts, cheads = copy.deepcopy(parts), copy.deepcopy(heads)
    ref_p1, ref_h1 = copy.deepcopy(parts[1]), copy.deepcopy(heads[1])
    res = fit_partitionwise(parts, heads, _loader(x, y), _loader(x, y), epochs=2, optimizer="sgd", lr=0.1,
                            schedule="sequential")
    fit_partitionwise(cparts, cheads, _loader(x, y), epochs=2, optimizer="sgd", lr=0.1)
    assert digest([parts[0], heads[0]]) == digest([cparts[0], cheads[0]])
    opt = torch.optim.SGD([*ref_p1.parameters(), *ref_h1.parameters()], lr=0.1)
    with torch.no_grad():
        feats = parts[0](x)  # the frozen partition 0 after its training
    for _ in range(2):
        for s in range(0, len(x), 32):
            loss = nn.functional.cross_entropy(ref_h1(ref_p1(feats[s:s + 32])), y[s:s + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert digest([parts[1], heads[1]]) == digest([ref_p1, ref_h1])
    with torch.no_grad():
        acc = [float((heads[0](parts[0](x)).argmax(1) == y).double().mean()),
               float((heads[1](parts[1](parts[0](x))).argmax(1) == y).double().mean())]
    assert res.accuracy == pytest.approx(acc, abs=1e-12)
    assert res.best_partition == (0 if acc[0] >= acc[1] else 1)
    assert res.model_at(0)[1] is heads[0]


def test_loss_filter_drops_the_lowest_loss_quarter_of_each_batch():
    x, y = _toy(n=100)
    parts, heads = _parts()
    seen = []
    parts[1].register_forward_pre_hook(lambda m, inp: seen.append(len(inp[0])) if m.training else None)
    res = fit_partitionwise(parts, heads, _loader(x, y, bs=30), epochs=3, optimizer="sgd", lr=0.1,
                            loss_filter=LossFilter(fraction=0.25, from_epoch=1))
    per_epoch = [30, 30, 30, 10]
    kept = [b - math.floor(0.25 * b) for b in per_epoch]  # 23, 23, 23, 8
    assert seen == per_epoch + kept + kept
    rec = {(r["partition"], r["epoch"]): r for r in res.history}
    assert rec[(0, 0)]["kept_fraction"] == 1.0
    assert rec[(0, 1)]["kept_fraction"] == rec[(0, 2)]["kept_fraction"] == sum(kept) / 100
    assert rec[(1, 2)]["samples"] == sum(kept)


def test_loss_filter_keeps_the_high_loss_samples():
    """On one batch: the samples forwarded are exactly those outside the lowest-loss quarter under head 0 (losses
    of the training forward pass, before the step)."""
    x, y = _toy(n=40)
    parts, heads = _parts()
    p0, h0 = copy.deepcopy(parts[0]), copy.deepcopy(heads[0])
    got = []
    parts[1].register_forward_pre_hook(lambda m, inp: got.append(inp[0].detach().clone()) if m.training else None)
    fit_partitionwise(parts, heads, _loader(x, y, bs=40), epochs=1, optimizer="sgd", lr=0.1,
                      loss_filter=LossFilter(fraction=0.25, from_epoch=0))
    with torch.no_grad():
        z = p0(x)
        losses = nn.functional.cross_entropy(h0(z), y, reduction="none")
    keep = torch.ones(40, dtype=torch.bool)
    keep[torch.sort(losses, stable=True).indices[:10]] = False
    torch.testing.assert_close(got[0], z[keep], rtol=0, atol=0)


def test_bad_input_one_clear_sentence_each():
    parts, heads = _parts()
    x, y = _toy()
    dl = _loader(x, y)
    with pytest.raises(UserError, match=r"^heads must be a list of nn.Module with one head per partition \(2\); "
                                        r"got 1\.$"):
        fit_partitionwise(parts, heads[:1], dl)
    with pytest.raises(UserError, match=r"^partitions must be a non-empty list of nn.Module"):
        fit_partitionwise([], [], dl)
    with pytest.raises(UserError, match=r"^partition 1 has no trainable parameters; fold parameter-free layers"):
        fit_partitionwise([parts[0], nn.ReLU()], heads, dl)
    with pytest.raises(UserError, match=r"^epochs must be an integer >= 1; got 0\.$"):
        fit_partitionwise(parts, heads, dl, epochs=0)
    with pytest.raises(UserError, match=r"^unknown schedule 'pipeline'; accepted: concurrent, sequential, "
                                        r"round_robin, random_robin\.$"):
        fit_partitionwise(parts, heads, dl, schedule="pipeline")
    with pytest.raises(UserError, match=r"^loss_filter must be a gradcond.train.LossFilter"):
        fit_partitionwise(parts, heads, dl, loss_filter=0.25)
    with pytest.raises(UserError, match=r"^lr_drops must be a list of fractions of the epochs in \(0, 1\)"):
        fit_partitionwise(parts, heads, dl, lr_drops=[1.5])
    with pytest.raises(UserError, match=r"^lr must be a positive finite number; got -1"):
        fit_partitionwise(parts, heads, dl, lr=-1)
    with pytest.raises(UserError, match=r"^every partition and head must hold float32 or float64 parameters of one"):
        fit_partitionwise([parts[0].float(), parts[1]], heads, dl)
    with pytest.raises(UserError, match=r"^sizes must be a positive int or a list of positive block counts summing "
                                        r"to 3"):
        make_partitions([nn.Linear(2, 2)] * 3, [1, 1])
    assert [len(p) for p in make_partitions(nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)]), 2)] == [3, 2]


def test_world_size_not_matching_the_partition_count_is_one_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        parts, heads = _parts()
        x, y = _toy()
        before = digest([*parts, *heads])
        with pytest.raises(UserError, match=r"^fit_partitionwise got 2 partition\(s\) but torch.distributed has 1 "
                                            r"rank\(s\); DPL trains one partition per process: start 2 process\(es\) "
                                            r"\(torchrun --nproc-per-node 2\) or pass 1 partition\(s\)\.$"):
            fit_partitionwise(parts, heads, _loader(x, y))
        assert digest([*parts, *heads]) == before  # refused before anything trained
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- 2 and 3 real ranks

SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpl")
    cfg = dict(DPL_DEFAULTS, seeds=SEEDS, out=str(out / "outputs"))
    res = run_dpl(cfg, out / "ranks", world=2, join_timeout=240)
    assert res["exitcodes"] == [0, 0], [r.get("traceback", r.get("error")) for r in res["ranks"]]
    return cfg, out, res


@pytest.fixture(scope="module")
def local_refs(two_ranks):
    """The same seeds in this process: the concurrent schedule (the ranks' computation, simulated) and the
    sequential one (single-process DLL over the same partitions)."""
    cfg, _, _ = two_ranks
    with one_thread():
        return {sched: [fit_local(dict(cfg, seed=s, out=None), sched) for s in SEEDS]
                for sched in ("concurrent", "sequential")}


def test_two_ranks_are_bit_identical_to_the_single_process_schedule(two_ranks, local_refs):
    cfg, _, res = two_ranks
    r0, r1 = res["ranks"]
    for got, ref in zip(r0["per_seed"], local_refs["concurrent"]):
        assert got["digest"] == digest([*ref.partitions, *ref.heads])  # the wire carries the features exactly
        assert got["accuracy"] == ref.accuracy
    assert all(p["has_model"] for p in r0["per_seed"]) and not any(p["has_model"] for p in r1["per_seed"])
    # rank 0 gathered rank 1's records: one per (partition, epoch)
    assert [(h["partition"], h["epoch"]) for h in r0["per_seed"][0]["history"]] == \
        [(p, e) for p in (0, 1) for e in range(cfg["epochs"])]


def test_two_ranks_reach_single_process_dll_accuracy_within_one_point(two_ranks, local_refs):
    _, _, res = two_ranks
    dpl = [p["accuracy"][-1] for p in res["ranks"][0]["per_seed"]]
    dll = [r.accuracy[-1] for r in local_refs["sequential"]]
    mean_dpl, mean_dll = sum(dpl) / len(dpl), sum(dll) / len(dll)
    assert mean_dll > 0.9  # both schedules actually learned the task
    assert abs(mean_dpl - mean_dll) <= 0.01, (dpl, dll)


def test_only_rank_0_writes_and_its_model_file_loads_safely(two_ranks, local_refs):
    cfg, out, res = two_ranks
    files = sorted(p.relative_to(out / "outputs").as_posix() for p in (out / "outputs").rglob("*") if p.is_file())
    assert files == [f"seed{s}/{f}" for s in SEEDS for f in ("model.pt", "partitionwise.json")]
    state = torch.load(out / "outputs" / "seed2" / "model.pt", weights_only=True)
    parts, heads = build(dict(cfg, seed=2))
    model = nn.Sequential(*parts, heads[-1])
    model.load_state_dict(state)
    ref = local_refs["concurrent"][2]  # the saved network is the trained one (partitions and the last head)
    want = nn.Sequential(*ref.partitions, ref.heads[-1]).state_dict()
    assert list(state) == list(want) and all(torch.equal(state[k], want[k]) for k in want)


def test_killed_partition_ends_its_neighbours_with_an_error_naming_it(tmp_path):
    cfg = dict(DPL_DEFAULTS, sizes=[1, 2, 1], epochs=10_000, progress_at=20, seed=0)
    res = run_dpl(cfg, tmp_path, world=3, join_timeout=150, kill_rank=1)
    assert res["killed_at"] is not None, res
    assert res["exitcodes"][1] == -9  # SIGKILL
    for r in (0, 2):
        assert res["exitcodes"][r] == 1, res
        assert res["exit_after_kill"][r] is not None and res["exit_after_kill"][r] < 60
        err = res["ranks"][r]["error"]
        assert err.startswith(f"PartitionPeerLost: partition-wise training: rank {r} (partition {r}) lost rank 1 "
                              "(partition 1) while "), err
    assert "while sending to it" in res["ranks"][0]["error"]
    assert "while receiving" in res["ranks"][2]["error"]


@pytest.mark.slow
def test_hung_partition_makes_its_neighbours_time_out(tmp_path):
    cfg = dict(DPL_DEFAULTS, sizes=[1, 2, 1], epochs=10_000, progress_at=20, hang_rank=1, hang_seconds=90,
               timeout_s=5, seed=0)
    res = run_dpl(cfg, tmp_path, world=3, join_timeout=60)
    for r in (0, 2):
        assert res["exitcodes"][r] == 1, res
        assert "lost rank 1 (partition 1)" in res["ranks"][r]["error"] and "within 5 s" in res["ranks"][r]["error"]
    assert res["exitcodes"][1] is None  # still sleeping when the launcher gave up on it


@pytest.mark.slow
def test_repro_dpl_partitions_quick(tmp_path):
    from gradcond.experiments.registry import run_experiment

    rows, _ = run_experiment("dpl-partitions", tmp_path, quick=True)
    assert sum(r.judged for r in rows) == 2  # accuracy and the killed partition; throughput is only reported
    assert rows[0].holds, rows[0].ours  # accuracy within 1 pp
    assert rows[1].verdict == "reported" and "samples/s" in rows[1].ours
    assert rows[-1].holds, rows[-1].ours  # the killed partition


def test_dpl_throughput_is_reported_never_judged_and_accuracy_needs_a_learning_reference():
    """Throughput compares 2 processes with 1 by wall-clock: reported whatever the ratio (a slow machine must not
    turn it into a 'no', a fast one into a 'yes')."""
    from gradcond.experiments.dpl_repro import dpl_accuracy_row, dpl_throughput_row

    for dpl, seq in (([100.0], [300.0]), ([300.0], [100.0])):
        assert dpl_throughput_row(dpl, seq).verdict == "reported"
    assert dpl_accuracy_row([0.96, 0.97], [0.962, 0.965], [0, 1]).verdict == "yes"
    assert dpl_accuracy_row([0.93, 0.94], [0.962, 0.965], [0, 1]).verdict == "no"
    assert dpl_accuracy_row([0.11, 0.1], [0.1, 0.12], [0, 1]).verdict == "untestable"


@pytest.mark.slow
def test_docs_example_runs_under_torchrun(tmp_path):
    """The torchrun example of docs/methods/efficient-training.md (2 epochs): fit_partitionwise starts the group
    from torchrun's environment, rank 0 alone writes its outputs."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods" / "efficient-training.md").read_text()
    code = re.search(r"```py\n(# dpl.py -- run with: torchrun.*?)```", text, re.S).group(1)
    (tmp_path / "dpl.py").write_text(code.replace("epochs=20", "epochs=2"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "dpl.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "dpl").iterdir()) == ["model.pt", "partitionwise.json"]
    accs = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(accs) == 1  # printed by rank 0 only
