"""Accelerate (issue 24 §2): the Monitor and ``diagnose`` take what ``accelerator.prepare`` returns -- the module
with accelerate's autocast wrapper (bf16 on the CPU), and under 2 processes a DistributedDataParallel wrapper --
through the documented five-line recipe; probes measure outside autocast (the float32 reference) and the wrapper is
left in place for training."""

from __future__ import annotations

import copy
import importlib
import json
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("accelerate")

from gradcond.monitor import Monitor  # noqa: E402
from gradcond.probes import gsc_profile  # noqa: E402

pytestmark = pytest.mark.hf


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _data(n=64):
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_five_line_recipe_with_a_prepared_bf16_model():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model, optimizer = _model(), None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(_data(), batch_size=16)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    wrapper = model.__dict__.get("forward")
    assert wrapper is not None  # accelerate's autocast wrapper: what the monitor must look through
    monitor = Monitor({"grad_norm": "every:1", "gsc": "every:2"}, budget=1.0, probe_batch_size=16)
    expected, weights, first = {}, {}, None
    for x, y in loader:  # the recipe
        optimizer.zero_grad(); loss = F.cross_entropy(model(x), y); accelerator.backward(loss); optimizer.step()  # noqa: E702
        monitor.step(model, "cross_entropy", (x, y), optimizer)
        first = first or (x, y)
        step = monitor._plain_state.step
        expected.update({(step, n): float(m.weight.grad.double().norm()) for n, m in model.named_modules()
                         if isinstance(m, nn.Linear)})
        weights[step] = copy.deepcopy(model.state_dict())
    assert loss.dtype == torch.float32 and model.__dict__.get("forward") is wrapper  # still autocast-wrapped
    got = {(r["step"], r["layer"]): r["value"] for r in monitor.rows if r["probe"] == "grad_norm"}
    assert got.keys() == expected.keys() and all(got[k] == pytest.approx(v, rel=1e-12) for k, v in expected.items())
    # GSC in float32 outside autocast: the same as on an unprepared copy with the same weights
    plain = _model()
    plain.load_state_dict(weights[2])
    ref = gsc_profile(plain, "cross_entropy", first, per_sample=False)
    gsc = [r["value"] for r in monitor.rows if r["probe"] == "gsc" and r["name"] == "gsc" and r["step"] == 2]
    assert gsc == pytest.approx(ref.gsc, rel=1e-10)


def test_diagnose_takes_the_prepared_model():
    from accelerate import Accelerator

    from gradcond.diagnose import diagnose

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    plain = _model()
    model = accelerator.prepare(copy.deepcopy(plain))
    x, y = _data(16).tensors
    a = diagnose(model, "cross_entropy", [(x, y)], cob_steps=2)
    b = diagnose(plain, "cross_entropy", [(x, y)], cob_steps=2)
    assert a["gsc"]["gsc"] == pytest.approx(b["gsc"]["gsc"], rel=1e-10)
    assert "forward" in model.__dict__  # the training wrapper is back


def _worker(rank, world, port, cfg, out_dir):
    res = {"rank": rank}
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        from accelerate import Accelerator

        importlib.import_module("torch._dynamo")  # before the group exists: gradcond.distributed.init_local_group says why

        accelerator = Accelerator(cpu=True)
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(_data(), batch_size=16)  # accelerate shards it: 8 samples per rank and step
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        res["wrapped"] = type(model).__name__
        monitor = Monitor({"grad_norm": "every:1", "gsc": "every:2"}, budget=1.0, probe_batch_size=16)
        for x, y in loader:
            optimizer.zero_grad(); loss = F.cross_entropy(model(x), y); accelerator.backward(loss); optimizer.step()  # noqa: E702
            monitor.step(model, "cross_entropy", (x, y), optimizer)
        res["rows"] = monitor.rows
    except Exception:  # noqa: BLE001
        res["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    if torch.distributed.is_initialized():
        if "error" not in res:
            torch.distributed.barrier()  # waits with the GIL released: gloo's workers finish before the group goes
        torch.distributed.destroy_process_group()


def test_two_process_accelerate_ddp_measures_the_global_gradient(tmp_path):
    from gradcond.experiments._launch import launch_ranks

    codes, _, ranks = launch_ranks(_worker, 2, {}, tmp_path, join_timeout=180)
    for r in ranks:
        assert "error" not in r, r.get("error")
    assert codes == [0, 0] and ranks[0]["wrapped"] == "DistributedDataParallel"
    # one process on the global batches (accelerate gives rank r the r-th half of each global batch of 16x2)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data().tensors
    expected = {}
    for step, i in enumerate(range(0, 64, 32), start=1):
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
        expected.update({(step, n): float(m.weight.grad.double().norm()) for n, m in model.named_modules()
                         if isinstance(m, nn.Linear)})
    got = {(r["step"], r["layer"]): r["value"] for r in ranks[0]["rows"] if r["probe"] == "grad_norm"}
    assert got.keys() == expected.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-5) for k, v in expected.items())
    assert ranks[1]["rows"] == []  # rank 0 alone logs
    assert any(r["probe"] == "gsc" for r in ranks[0]["rows"])
