"""One measurement for the whole model under FSDP2 and DDP (issue 24 §3): 2 gloo ranks on the CPU train on their
halves of a global batch; the monitor's per-layer gradient and weight norms, relative update sizes, GSC and domain
statistics equal those of one process training on the whole batch (float32, <= 1e-5 relative), computed from
shard-local values reduced across ranks. The distributed noise-scale estimator equals the two-batch formula on the
two halves' gradients computed in one process; under FSDP2 the full-model probes are left out with the reason."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WORLD, N, D_IN, CLASSES = 2, 16, 6, 3
PROBES = {"grad_norm": "every:1", "weight_norm": "every:1", "update_size": "every:1", "gsc": "every:1",
          "domain": "every:1", "noise_scale": "every:1", "conditioning": "every:2"}
COMPARED = ("grad_norm", "weight_norm", "update_size", "gsc", "domain")
STEPS = 3


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, D_IN, generator=g)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return x, y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 10), nn.Tanh(), nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, CLASSES))


def _train(model, x, y, world=1):
    """fit() for STEPS steps of one full-shard batch each, with the monitor; returns (rows, events)."""
    from gradcond.monitor import Monitor
    from gradcond.train import fit

    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))  # one step per epoch: the whole (local) batch
    mon = Monitor(PROBES, budget=1.0, probe_batch_size=N)
    h = fit(model, loader, None, optimizer="sgd", lr=0.5, epochs=STEPS, callbacks=[mon], progress=False)
    return h.metrics, h.events


def _worker(rank, world, port, cfg, out_dir):
    res = {"rank": rank}
    try:
        torch.set_num_threads(1)
        from gradcond.distributed import init_local_group

        init_local_group("gloo", port, rank, world, 60)  # torch._dynamo imported first: a clean gloo teardown
        from gradcond.distributed import rank_slice

        x, y = _data()
        sl = rank_slice(N, rank, world)
        model = _model()
        if cfg["strategy"] == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for m in model:
                if isinstance(m, nn.Linear):
                    fully_shard(m)
            fully_shard(model)
        else:
            model = nn.parallel.DistributedDataParallel(model)
        rows, events = _train(model, x[sl], y[sl], world)
        res.update(rows=rows, events=[{k: v for k, v in e.items() if k != "time"} for e in events])
        from gradcond.distributed import refuse_sharded

        try:
            refuse_sharded(model, "TeleportCallback")
            res["refusal"] = None
        except ValueError as exc:
            res["refusal"] = str(exc)
    except Exception:  # noqa: BLE001 -- reported through the result file
        res["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    model = None  # the FSDP2 model's DTensors hold the group's mesh: freed before the group goes
    if torch.distributed.is_initialized():
        if "error" not in res:
            torch.distributed.barrier()  # waits with the GIL released: gloo's workers finish before the group goes
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from gradcond.experiments._launch import launch_ranks

    out = {}
    for strategy in ("fsdp2", "ddp"):
        d = tmp_path_factory.mktemp(strategy)
        codes, _, ranks = launch_ranks(_worker, WORLD, {"strategy": strategy}, d, join_timeout=240)
        for r in ranks:
            assert "error" not in r, r.get("error")
        assert codes == [0] * WORLD, codes
        out[strategy] = ranks
    x, y = _data()
    out["single"] = _train(_model(), x, y)
    return out


def _table(rows, probe):
    return {(r["step"], r["layer"], r["name"]): r["value"] for r in rows if r["probe"] == probe}


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
@pytest.mark.parametrize("probe", COMPARED)
def test_two_ranks_measure_what_one_process_measures_on_the_global_batch(runs, strategy, probe):
    ref = _table(runs["single"][0], probe)
    got = _table(runs[strategy][0]["rows"], probe)
    assert ref and set(got) == set(ref)
    assert {s for s, _, _ in ref} == set(range(1, STEPS + 1))
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-12), (k, got[k], v)
    # rank 1 measured too (it took part in every reduction) but rank 0 alone logs
    assert not [r for r in runs[strategy][1]["rows"] if r["probe"] == probe]


def test_gsc_rows_cover_every_layer_and_the_explosion_fit(runs):
    got = _table(runs["fsdp2"][0]["rows"], "gsc")
    layers = {layer for _, layer, name in got if name == "gsc"}
    assert {"0", "2", "4"} <= layers  # the three Linear layers, sharded across the ranks
    assert any(name == "explosion_rate" for _, _, name in got)


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_distributed_noise_scale_is_the_two_batch_formula_on_the_two_halves(runs, strategy):
    """Independent computation in one process: the two ranks' mean gradients g_0, g_1 (batch 8 each) give
    |G_small|² = (|g_0|² + |g_1|²)/2 and |G_big|² = |(g_0 + g_1)/2|² (McCandlish et al. 2018, App. A.1)."""
    from gradcond.distributed import rank_slice

    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    got = _table(runs[strategy][0]["rows"], "noise_scale")
    for step in range(1, STEPS + 1):
        gs = []
        for r in range(WORLD):
            sl = rank_slice(N, r, WORLD)
            model.zero_grad()
            nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
            gs.append(torch.cat([p.grad.double().reshape(-1) for p in model.parameters()]))
        small = float(sum(g @ g for g in gs)) / WORLD
        mean = sum(gs) / WORLD
        big = float(mean @ mean)
        bs, bb = N // WORLD, N
        gsq = (bb * big - bs * small) / (bb - bs)
        trace = (small - big) / (1 / bs - 1 / bb)
        assert got[(step, "", "b_small")] == bs and got[(step, "", "b_big")] == bb
        assert got[(step, "", "batch_size")] == N
        assert got[(step, "", "grad_sq")] == pytest.approx(gsq, rel=1e-4)
        assert got[(step, "", "trace_sigma")] == pytest.approx(trace, rel=1e-4)
        # the training step both computations share (the same SGD update on the global batch)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_fsdp2_leaves_out_the_full_model_probes_with_the_reason(runs):
    ev = [e for e in runs["fsdp2"][0]["events"] if e["kind"] == "probe_unavailable"]
    assert [e["probe"] for e in ev] == ["conditioning"] and ev[0]["strategy"] == "fsdp2"
    assert "under FSDP2 each rank holds only a shard" in ev[0]["reason"]
    assert not _table(runs["fsdp2"][0]["rows"], "conditioning")
    # under DDP it runs on rank 0's full replica on the gathered global probe batch: the single-process values
    ref, got = _table(runs["single"][0], "conditioning"), _table(runs["ddp"][0]["rows"], "conditioning")
    assert ref and set(got) == set(ref)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-7), k


def test_teleports_are_refused_on_a_sharded_model_in_one_sentence(runs):
    assert runs["ddp"][0]["refusal"] is None
    assert runs["fsdp2"][0]["refusal"] == (
        "TeleportCallback cannot run on an FSDP2 (fully_shard) model: it needs every parameter in one process, and "
        "each rank holds only a shard; teleport before sharding, or train with DDP.")


def test_update_size_is_the_sgd_step_over_the_weights_before_it(runs):
    """Independent identity for plain SGD (lr 0.5): ||W_s - W_{s-1}|| / ||W_{s-1}|| = 0.5 ||g_s|| / ||W_{s-1}||, with
    ||g_s|| the grad_norm row of step s and ||W_{s-1}|| the weight_norm row of step s-1."""
    rows = runs["single"][0]
    up, gn, wn = _table(rows, "update_size"), _table(rows, "grad_norm"), _table(rows, "weight_norm")
    checked = 0
    for (s, layer, name), v in up.items():
        if s > 1:
            expected = 0.5 * gn[(s, layer, "grad_norm")] / wn[(s - 1, layer, "weight_norm")]
            assert v == pytest.approx(expected, rel=1e-5), (s, layer)
            checked += 1
    assert checked == 3 * (STEPS - 1)
