"""The monitor's schedule does not depend on the machine's load (issue 26): the plan comes from counts
(:mod:`gradcond.monitor.costs`), never from a clock."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.monitor import SCHEDULE_FILE, Monitor, coverage_sentences
from gradcond.monitor.costs import Pass, estimate_costs, profile_model
from gradcond.monitor.schedule import PROBES
from gradcond.train import RunLogger, fit

# thinned under a 5% budget (grad_norm every step, gsc every 2 steps): under the clock-based plan of issue 20 the
# thinning factors moved with the machine's load
CONFIGURED = {"grad_norm": "every:1", "gsc": "every:2", "domain": "epoch", "conditioning": "epoch"}


def _run(path, monitor, epochs=2):
    d = load_dataset("digits")
    torch.manual_seed(0)
    model = zoo.mlp(64, 10, depth=4, width=32)
    return fit(model, *d.loaders(64), optimizer="sgd", lr=0.1, epochs=epochs, run=RunLogger(path), callbacks=[monitor])


def _step_probe(rows):
    return sorted({(r["step"], r["probe"]) for r in rows if r["probe"] in PROBES})


def test_runs_on_an_idle_and_on_a_saturated_machine_write_the_same_step_probe_rows(tmp_path):
    """Must show (issue 26): two monitored runs of one config, the second while busy subprocesses keep every core
    saturated, write the same set of (step, probe) rows and the same plan."""
    a = _run(tmp_path / "idle", Monitor(CONFIGURED, budget=0.05))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(min(2, os.cpu_count() or 1))]
    try:
        b = _run(tmp_path / "busy", Monitor(CONFIGURED, budget=0.05))
        still_busy = all(p.poll() is None for p in busy)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert still_busy  # the second run really ran beside the busy processes
    plan_a = json.loads((tmp_path / "idle" / SCHEDULE_FILE).read_text())
    plan_b = json.loads((tmp_path / "busy" / SCHEDULE_FILE).read_text())
    assert plan_a == plan_b
    thinned = [p["name"] for p in plan_a["probes"] if p["enabled"] and p["every_steps"] and
               p["configured"].startswith("every") and p["every_steps"] > int(p["configured"].split(":")[1])]
    assert thinned  # the budget did thin something, so a load-dependent plan would have had room to differ
    assert _step_probe(a.metrics) and _step_probe(a.metrics) == _step_probe(b.metrics)


def test_the_plan_reads_no_clock(tmp_path, monkeypatch):
    """With every clock the monitor could read returning random values, a fresh run plans exactly as before."""
    from gradcond.monitor import monitor as monitor_module

    a = _run(tmp_path / "a", Monitor(CONFIGURED, budget=0.05), epochs=1)
    rng = random.Random(0)
    real = monitor_module.time.perf_counter

    class ErraticTime:
        @staticmethod
        def perf_counter():
            return real() * rng.uniform(0.1, 10.0)

        process_time = perf_counter
        time = perf_counter
        monotonic = perf_counter

    monkeypatch.setattr(monitor_module, "time", ErraticTime)
    b = _run(tmp_path / "b", Monitor(CONFIGURED, budget=0.05), epochs=1)
    assert (tmp_path / "a" / SCHEDULE_FILE).read_text() == (tmp_path / "b" / SCHEDULE_FILE).read_text()
    assert _step_probe(a.metrics) == _step_probe(b.metrics)
    first = coverage_sentences(json.loads((tmp_path / "a" / SCHEDULE_FILE).read_text()))[0]
    assert "cost model" in first and "no clock" in first


def test_plans_agree_between_processes(tmp_path):
    """The counts behind the plan are the same in a fresh process (no cache or warm-up state enters them)."""
    here = _run(tmp_path / "here", Monitor(CONFIGURED, budget=0.05), epochs=1)
    code = ("import torch; from gradcond import zoo; from gradcond.data import load_dataset; "
            "from gradcond.monitor import Monitor; from gradcond.train import RunLogger, fit; "
            "d = load_dataset('digits'); torch.manual_seed(0); m = zoo.mlp(64, 10, depth=4, width=32); "
            f"fit(m, *d.loaders(64), optimizer='sgd', lr=0.1, epochs=1, run=RunLogger({str(tmp_path / 'there')!r}), "
            f"callbacks=[Monitor({CONFIGURED!r}, budget=0.05)])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "here" / SCHEDULE_FILE).read_text()) == \
        json.loads((tmp_path / "there" / SCHEDULE_FILE).read_text())
    assert here is not None


def test_profile_counts_match_an_independent_count_and_leave_the_model_unchanged():
    """Flops per sample of a bias-free Linear stack: forward 2·Σ C·O; forward+backward adds the weight gradients
    (2·Σ C·O per sample) and the input gradients of every layer but the first (2·C·O each). The model (parameters,
    buffers, .grad, modes) is unchanged, BatchNorm in train mode included."""
    torch.manual_seed(0)
    dims = [12, 20, 16, 5]
    layers = []
    for i in range(3):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1]), nn.Tanh()]
    model = nn.Sequential(*layers[:-2])
    model.train()
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = profile_model(model, nn.functional.cross_entropy, (x, y), train_batch=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and all(m.training for m in model.modules())
    co = [dims[i] * dims[i + 1] for i in range(3)]
    assert prof.fwd.flops == pytest.approx(2 * sum(co)) and prof.fwd.flops_fixed == pytest.approx(0)
    assert prof.fwd_bwd.flops == pytest.approx(2 * sum(co) + 2 * sum(co) + 2 * sum(co[1:]))
    assert prof.lin_layers == [(1, dims[i], dims[i + 1], 1) for i in range(3)]
    assert prof.weight_shapes == [(dims[i + 1], dims[i]) for i in range(3)]
    assert prof.params == sum(co) + 2 * (20 + 16) and prof.train_batch == 32 and prof.probe_batch == 8
    # the parameter gradients are written once per batch: a batch-independent part of the elements written
    assert prof.fwd_bwd.elements_fixed >= sum(co)
    again = profile_model(model, nn.functional.cross_entropy, (x, y), train_batch=32)
    assert again == prof


def test_cost_formulas_scale_with_the_batch_and_unknown_probes_get_the_default():
    p = Pass(ops=10, flops=100.0, elements=10.0, flops_fixed=1000.0, elements_fixed=50.0)
    assert p.seconds(4) - p.seconds(2) == pytest.approx(2 * (p.seconds(1) - p.seconds(0)))
    torch.manual_seed(0)
    model = zoo.mlp(64, 10, depth=3, width=32)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    small = profile_model(model, nn.functional.cross_entropy, (x[:8], y[:8]), train_batch=8)
    big = profile_model(model, nn.functional.cross_entropy, (x, y), train_batch=64)
    cs, steps, notes = estimate_costs(small, list(PROBES) + ["made_up"])
    cb, stepb, _ = estimate_costs(big, list(PROBES))
    assert stepb > steps and cb["conditioning"] > cs["conditioning"] and cb["gsc"] > cs["gsc"]
    assert cs["grad_norm"] == cb["grad_norm"]  # reads the gradients: no batch in it
    assert set(notes) == {"made_up"} and "two forward+backward" in notes["made_up"]
    assert cs["made_up"] == pytest.approx(2 * small.fwd_bwd.seconds(8))


def test_a_model_the_counter_cannot_run_gets_no_budget_and_the_plan_says_why(tmp_path):
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def forward(self, x):
            if torch._C._len_torch_dispatch_stack() > 0:  # e.g. a model that refuses tracing or counting modes
                raise RuntimeError("no dispatch modes here")
            return self.lin(x)

    d = load_dataset("digits")
    torch.manual_seed(0)
    mon = Monitor({"grad_norm": "every:1"}, budget=0.05)
    fit(Picky(), *d.loaders(64), optimizer="sgd", lr=0.1, epochs=1, callbacks=[mon])
    assert "no dispatch modes here" in mon.plan["cost_model"]["error"]
    gn = next(p for p in mon.plan["probes"] if p["name"] == "grad_norm")
    assert gn["every_steps"] == 1 and "could not be applied" in gn["reason"]
    assert "could not count this model" in coverage_sentences(mon.plan)[0]
