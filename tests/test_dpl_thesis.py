"""DPL as the thesis runs it (issue 28 item 2, seed 002 §6.8): the online k-filter on each link, round robin over
partitions with feature checkpoints, the filter-links choice beyond two partitions, round robin across ranks and
data-parallel replicas inside a partition.  References are computed here by hand (hooks record what each partition
actually trained on)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradcond.experiments.dpl_repro import DPL_DEFAULTS, digest, fit_local, run_dpl
from gradcond.probes.representation import knn_indices
from gradcond.train import KFilter, LossFilter
from gradcond.train.layerwise.dpl import fit_partitionwise
from gradcond.utils import UserError

from test_layerwise_dpl import one_thread


def _toy(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def _parts(n=2, seed=0):
    torch.manual_seed(seed)
    parts = [nn.Sequential(nn.Linear(6 if i == 0 else 8, 8), nn.Tanh()).double() for i in range(n)]
    heads = [nn.Linear(8, 2).double() for _ in range(n)]
    return parts, heads


def _loader(x, y, bs=32):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


class Recorder:
    """Forward hooks: every training-mode input of each partition, tagged with a global call counter."""

    def __init__(self, parts):
        self.inputs = {i: [] for i in range(len(parts))}
        self.outputs = {i: [] for i in range(len(parts))}
        for i, p in enumerate(parts):
            p.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def hook(mod, inp, out):
            if mod.training:
                self.inputs[i].append(inp[0].detach().clone())
                self.outputs[i].append(out.detach().clone())
        return hook


def _redundant(z, y, k):
    """Reference k-redundancy inside one window, written out: all k nearest neighbours share the label."""
    if len(y) <= k:
        return torch.zeros(len(y), dtype=torch.bool)
    if bool((y == y[0]).all()):
        return torch.ones(len(y), dtype=torch.bool)
    nn_idx = knn_indices(z, k)
    return (y[nn_idx] == y[:, None]).all(1)


@pytest.mark.parametrize("window", [None, 64])
def test_online_k_filter_drops_the_k_redundant_samples_of_each_window(window):
    x, y = _toy()
    parts, heads = _parts()
    rec = Recorder(parts)
    res = fit_partitionwise(parts, heads, _loader(x, y), epochs=2, optimizer="sgd", lr=0.05,
                            k_filter=KFilter(k=3, warmup_epochs=1, filter_batch=window, max_removed=1.0))
    outs0, ins1 = rec.outputs[0], rec.inputs[1]
    # epoch 0: warm-up, partition 1 sees partition 0's outputs unchanged
    for a, b in zip(outs0[:4], ins1[:4]):
        assert torch.equal(a, b)
    # epoch 1: each window of partition 0's outputs (with its labels) minus its k-redundant samples
    zs, ys = torch.cat(outs0[4:8]), y.repeat(1)
    w = window or 32
    expected = []
    for s in range(0, 128, w):
        keep = ~_redundant(zs[s:s + w], ys[s:s + w], 3)
        expected.append(zs[s:s + w][keep])
    expected = torch.cat(expected)
    got = torch.cat(ins1[4:])
    assert torch.equal(got, expected)
    assert all(len(b) <= 32 for b in ins1[4:])  # re-batched at the incoming batch size
    rec1 = [r for r in res.history if r["partition"] == 0]
    assert rec1[0]["kept_fraction"] == 1.0 and rec1[1]["kept_fraction"] == pytest.approx(len(got) / 128)
    assert len(got) < 128  # the filter removed something on this data


def test_k_filter_cap_removes_at_most_the_fraction_of_each_window():
    x, y = _toy()
    parts, heads = _parts()
    rec = Recorder(parts)
    fit_partitionwise(parts, heads, _loader(x, y), epochs=1, optimizer="sgd", lr=0.05,
                      k_filter=KFilter(k=1, warmup_epochs=0, filter_batch=64, max_removed=0.25))
    zs = torch.cat(rec.outputs[0])
    for s in (0, 64):
        assert int(_redundant(zs[s:s + 64], y[s:s + 64], 1).sum()) > 16  # more redundant than the cap allows
    assert sum(len(b) for b in rec.inputs[1]) == 128 - 2 * 16  # floor(0.25 * 64) removed per window


@pytest.mark.parametrize("links, kept", [("every", [24 / 32, 18 / 32]), ("first", [24 / 32, 24 / 32])])
def test_loss_filter_across_three_partitions_compounds_or_not_as_stated(links, kept):
    x, y = _toy()
    parts, heads = _parts(3)
    res = fit_partitionwise(parts, heads, _loader(x, y), epochs=1, optimizer="sgd", lr=0.05, filter_links=links,
                            loss_filter=LossFilter(fraction=0.25, from_epoch=0))
    samples = {r["partition"]: r["samples"] for r in res.history}
    assert [samples[1] / 128, samples[2] / 128] == kept
    assert res.extra["filter_links"] == links


def test_round_robin_without_checkpoints_over_the_whole_run_is_the_sequential_schedule():
    x, y = _toy()
    with one_thread():
        a = fit_partitionwise(*_parts(), _loader(x, y), _loader(x, y), epochs=3, optimizer="sgd", lr=0.05,
                              schedule="sequential")
        b = fit_partitionwise(*_parts(), _loader(x, y), _loader(x, y), epochs=3, optimizer="sgd", lr=0.05,
                              schedule="round_robin", epochs_per_round=3)
    assert digest([*a.partitions, *a.heads]) == digest([*b.partitions, *b.heads])
    assert [r["test_acc"] for r in a.history] == [r["test_acc"] for r in b.history]


def test_round_robin_with_checkpoints_replays_the_last_epoch_of_the_turn():
    x, y = _toy()
    parts, heads = _parts()
    rec = Recorder(parts)
    res = fit_partitionwise(parts, heads, _loader(x, y), _loader(x, y), epochs=4, optimizer="sgd", lr=0.05,
                            schedule="round_robin", epochs_per_round=2, feature_checkpoint="device")
    outs0, ins1 = rec.outputs[0], rec.inputs[1]
    assert len(outs0) == 16 and len(ins1) == 16  # 4 epochs x 4 batches each
    last_of_turn = {0: outs0[4:8], 1: outs0[12:16]}  # partition 0's epochs 1 and 3
    for turn in (0, 1):
        for e in (0, 1):  # both epochs of partition 1's turn replay the same batches, in the recorded order
            got = ins1[8 * turn + 4 * e: 8 * turn + 4 * e + 4]
            assert all(torch.equal(a, b) for a, b in zip(got, last_of_turn[turn]))
    assert res.extra["checkpoints"] == ["device"] and res.extra["rounds"] == 2
    assert [(r["partition"], r["epoch"]) for r in res.history] == [(p, e) for p in (0, 1) for e in range(4)]


def test_random_robin_uses_the_feednet_before_any_checkpoint_exists():
    x, y = _toy()
    # find a seed whose first round visits partition 1 first
    seed = next(s for s in range(50) if torch.randperm(2, generator=torch.Generator().manual_seed(s)).tolist()[0] == 1)
    parts, heads = _parts()
    init0 = copy.deepcopy(parts[0])
    rec = Recorder(parts)
    fit_partitionwise(parts, heads, _loader(x, y), epochs=2, optimizer="sgd", lr=0.05, seed=seed,
                      schedule="random_robin", epochs_per_round=1, feature_checkpoint="cpu")
    with torch.no_grad():  # partition 1's first epoch: partition 0 at initialisation, frozen (eval mode)
        want = [init0.eval()(x[s:s + 32]) for s in range(0, 128, 32)]
    assert all(torch.equal(a, b) for a, b in zip(rec.inputs[1][:4], want))


def test_bad_input_for_the_new_arguments():
    x, y = _toy()
    parts, heads = _parts()
    dl = _loader(x, y)
    cases = [
        (dict(k_filter=3), r"^k_filter must be a gradcond.train.KFilter \(k, warmup_epochs, filter_batch, max_removed\) "
                           r"or None; got int\.$"),
        (dict(k_filter=KFilter(k=2), loss_filter=LossFilter(0.25)), r"^pass loss_filter or k_filter, not both"),
        (dict(filter_links="some"), r"^unknown filter_links 'some'; accepted: every, first\.$"),
        (dict(schedule="round_robin", epochs_per_round=0), r"^epochs_per_round must be an integer >= 1; got 0\.$"),
        (dict(feature_checkpoint="gpu", schedule="round_robin"), r"^unknown feature_checkpoint 'gpu'; accepted: "
                                                                 r"None, auto, device, cpu\.$"),
        (dict(feature_checkpoint="device"), r"^feature_checkpoint applies to the round-robin schedules"),
        (dict(replicas=[2]), r"^replicas must list one positive process count per partition \(2\); got \[2\]\.$"),
        (dict(replicas=[2, 1], schedule="sequential"), r"^replicas \(data-parallel processes per partition\) need "
                                                       r"schedule 'concurrent'; got 'sequential'\.$"),
        (dict(replicas=[2, 1]), r"^replicas \[2, 1\] need 3 processes under torch.distributed; in one process pass "
                                r"replicas=None\.$"),
        (dict(k_filter={"k": 0}), r"^k_filter \{'k': 0\} is not a valid KFilter \(KFilter k must be an integer >= 1"),
        (dict(preset="fast"), r"^unknown preset 'fast' for fit_partitionwise; accepted: thesis, thesis-imagenet\.$"),
    ]
    before = digest([*parts, *heads])
    for kw, msg in cases:
        with pytest.raises((UserError, ValueError), match=msg):
            fit_partitionwise(parts, heads, dl, **kw)
    assert digest([*parts, *heads]) == before


# --------------------------------------------------------------------------------------------- real ranks

def test_round_robin_on_two_ranks_equals_the_single_process_round_robin(tmp_path):
    cfg = dict(DPL_DEFAULTS, epochs=4, seed=0, schedule="round_robin", epochs_per_round=2,
               k_filter={"k": 5, "warmup_epochs": 1, "filter_batch": 256, "max_removed": 0.6})
    res = run_dpl(cfg, tmp_path, world=2, join_timeout=240)
    assert res["exitcodes"] == [0, 0], [r.get("traceback", r.get("error")) for r in res["ranks"]]
    with one_thread():
        ref = fit_local(dict(cfg, feature_checkpoint="device"), "round_robin")
    r0 = res["ranks"][0]
    assert r0["digest"] == digest([*ref.partitions, *ref.heads])  # the same computation, turn for turn
    assert r0["accuracy"] == ref.accuracy
    kept = [h["kept_fraction"] for h in r0["history"] if h["partition"] == 0]
    assert kept[0] == 1.0 and any(k < 1.0 for k in kept[1:])  # the k-filter worked after its warm-up


def test_replicas_two_one_equal_a_hand_written_data_parallel_pipeline(tmp_path):
    """Partition 0 on 2 DDP ranks (batches dealt in turn, gradients averaged), partition 1 on one rank that trains
    on both replicas' outputs in turn."""
    cfg = dict(DPL_DEFAULTS, epochs=2, seed=0, replicas=[2, 1], optimizer="sgd", lr=0.05, lr_drops=[])
    res = run_dpl(cfg, tmp_path, world=3, join_timeout=240)
    assert res["exitcodes"] == [0, 0, 0], [r.get("traceback", r.get("error")) for r in res["ranks"]]
    from gradcond.experiments.dpl_repro import build, loaders

    parts, heads = build(cfg)
    train, test = loaders(cfg)
    opt0 = torch.optim.SGD([*parts[0].parameters(), *heads[0].parameters()], lr=0.05)
    opt1 = torch.optim.SGD([*parts[1].parameters(), *heads[1].parameters()], lr=0.05)
    with one_thread():
        for _ in range(2):
            batches = list(train)  # this epoch's shuffled order (the loader's own generator, as on rank 0)
            steps = len(batches) // 2
            for t in range(steps + len(batches) % 2):
                pair = batches[2 * t:2 * t + 2]
                zs = []
                opt0.zero_grad()
                for xb, yb in pair:
                    z = parts[0](xb)
                    loss = nn.functional.cross_entropy(heads[0](z), yb) / 2
                    loss.backward()  # DDP: the average of the replicas' gradients
                    zs.append((z.detach(), yb))
                # an odd last batch has one replica: the other has joined (Join) and DDP still divides by the
                # initial world size, so the step takes half that batch's gradient -- as the loss / 2 above does
                opt0.step()
                for z, yb in zs:
                    opt1.zero_grad()
                    nn.functional.cross_entropy(heads[1](parts[1](z)), yb).backward()
                    opt1.step()
    r0 = res["ranks"][0]
    assert r0["has_model"]
    assert r0["digest"] == digest([*parts, *heads])  # bit for bit: halving a gradient is exact in binary floats
    samples = {(h["partition"], h["epoch"]): h["samples"] for h in r0["history"]}
    n = len(train.dataset)
    assert samples[(0, 0)] == n and samples[(1, 1)] == n  # every sample trained once per epoch, merged over replicas
