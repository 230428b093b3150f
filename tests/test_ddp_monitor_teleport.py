"""The monitor and the teleports under DDP (issue 16 part 3): 2 gloo ranks on 127.0.0.1, one run directory written
by rank 0, probes measured by all ranks and logged by rank 0 only, a teleport computed on rank 0 and broadcast,
replicas checked identical.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from gradcond import distributed as D
from gradcond.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: DDP-wrapped zoo MLP on its shard of digits, Monitor("default"), a null-space teleport at
    epoch 0 and TeleportCallback(at_epoch=1)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradcond.callbacks import Callback
    from gradcond.data import load_dataset
    from gradcond.monitor import Monitor
    from gradcond.teleport.cob_callback import TeleportCallback
    from gradcond.teleport.nullspace import NullSpaceTeleportCallback
    from gradcond.train import RunLogger, fit
    from gradcond.zoo.models import mlp

    torch.set_num_threads(1)
    res: dict = {"rank": rank}
    try:
        from gradcond.distributed import init_local_group

        init_local_group("gloo", port, rank, WORLD, 30)  # torch._dynamo imported first: a clean gloo teardown
        bundle = load_dataset("digits")
        xtr, ytr = bundle.train.tensors
        shard = TensorDataset(xtr[rank::WORLD][:256], ytr[rank::WORLD][:256])  # data parallel: own shard
        train = DataLoader(shard, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(rank))
        test = DataLoader(bundle.test, batch_size=512)
        net = DDP(mlp(64, 10, depth=3, width=32, seed=0))
        snaps: dict = {}

        class Snap(Callback):  # runs after the teleport callbacks in the same hook
            def on_train_start(self, state):
                snaps["init"] = D.replica_digests(state.model, state.optimizer)

            def on_epoch_end(self, state):
                snaps[f"end{state.epoch}"] = D.replica_digests(state.model, state.optimizer)

            def on_epoch_start(self, state):
                snaps[f"start{state.epoch}"] = D.replica_digests(state.model, state.optimizer)

        run = RunLogger(Path(out) / "runs" / "ddp") if rank == 0 else None  # one writer
        hist = fit(net, train, test, optimizer="momentum", lr=0.05, epochs=2, progress=False, run=run,
                   callbacks=[NullSpaceTeleportCallback(schedule=[0], num_batches=2, batch_size=16, held_out_size=32),
                              TeleportCallback(at_epoch=1, kind="random", sigma=0.5), Monitor("default", budget=1.0),
                              Snap()])
        res.update(snaps=snaps, train_loss=[r["train_loss"] for r in hist.rows],
                   probes=sorted({m["probe"] for m in hist.metrics}), events=[e["kind"] for e in hist.events])
        # the check catches a replica that drifts: rank 1 nudges one weight, both ranks must raise naming it
        with torch.no_grad():
            if rank == 1:
                net.module[2].weight[0, 0] += 1e-3
        try:
            D.assert_replicas_identical(net)
            res["mismatch_error"] = None
        except D.ReplicaMismatchError as exc:
            res["mismatch_error"] = str(exc)
    except Exception:  # noqa: BLE001 -- reported to the test through the result file
        res["error"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    if dist.is_initialized():
        if "error" not in res:
            dist.barrier()  # waits with the GIL released: gloo's workers finish before the group goes
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(out)), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240  # bounded: a hung rank is terminated and the test fails
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    assert not hung, f"ranks {hung} did not finish within the timeout"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in ranks:
        assert "error" not in r, r["error"]
    return out, ranks


def test_teleport_is_broadcast_and_replicas_are_identical(ddp_run):
    _, (r0, r1) = ddp_run
    # independent of the helper's own check: compare each rank's digests (params, buffers, optimizer state)
    assert r0["snaps"]["start1"] == r1["snaps"]["start1"]  # right after the teleport (before epoch 1's steps)
    assert r0["snaps"]["end1"] == r1["snaps"]["end1"]
    # the teleport did change the parameters (and the transported momentum), so the equality above is not vacuous
    changed = [k for k in r0["snaps"]["end0"] if r0["snaps"]["end0"][k] != r0["snaps"]["start1"][k]]
    assert any(k.endswith("weight") and not k.startswith("optimizer:") for k in changed)
    assert any(k.startswith("optimizer:") and k.endswith("momentum_buffer") for k in changed)
    # the null-space teleport (level-set callback) at epoch 0, before any step: broadcast and identical too
    assert r0["snaps"]["start0"] == r1["snaps"]["start0"]
    assert any(r0["snaps"]["init"][k] != r0["snaps"]["start0"][k] for k in r0["snaps"]["init"] if k.endswith("weight"))
    assert r0["events"].count("teleport") == 2 and r0["events"].count("replicas_identical") == 2
    assert "teleport" not in r1["events"]  # computed on rank 0 only
    # the check itself detects a drifted replica, on every rank, naming the tensor
    for r in (r0, r1):
        assert r["mismatch_error"] is not None and "'2.weight' on rank 1" in r["mismatch_error"]


def test_one_run_directory_written_by_rank_0_with_rank_0_metrics(ddp_run):
    out, (r0, r1) = ddp_run
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["ddp"]
    from gradcond.train.run import read_events, read_metrics

    rows = read_metrics(out / "runs" / "ddp" / "metrics.csv")
    losses = [r["value"] for r in rows if r["probe"] == "train" and r["name"] == "loss"]
    assert losses == r0["train_loss"] and losses != r1["train_loss"]  # rank 0's shard, not a reduction
    ev = [e for e in read_events(out / "runs" / "ddp" / "events.jsonl") if e["kind"] == "replicas_identical"]
    assert [(e["epoch"], e["world_size"]) for e in ev] == [(0, WORLD), (1, WORLD)] and all(e["tensors"] > 0 for e in ev)
    # rank 0 alone logs the probes' rows: rank 1's monitor logged nothing
    probe_names = {r["probe"] for r in rows} - {"train", "test", "optim", "teleport"}
    assert probe_names and probe_names <= set(r0["probes"])
    assert set(r1["probes"]) <= {"train", "test", "optim"}


def test_docs_say_which_ranks_measure():
    text = (ROOT / "docs" / "methods" / "compression.md").read_text()
    assert "Monitor and teleports under DDP" in text and "measured on rank 0 only" in text
    assert "the whole model on the global probe batch" in text  # the reduced probes (issue 24)


def test_helpers_are_single_process_no_ops():
    assert not dist.is_initialized()
    model = torch.nn.Linear(3, 2)
    before = D.replica_digests(model)
    assert D.assert_replicas_identical(model) == 0 and D.sync_after_teleport(model) == 0
    D.broadcast_module_(model)
    assert D.replica_digests(model) == before
    assert (D.rank(), D.world_size(), D.is_main(), D.active()) == (0, 1, True, False)
    assert D.unwrap(model) is model and D.run_on_main(lambda: 5) == 5
