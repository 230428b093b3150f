import math

import pytest
import torch

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.monitor import Monitor, Schedule
from gradcond.train import Callback, RunLogger, fit, get_loss


def _setup(depth=4):
    d = load_dataset("digits")
    torch.manual_seed(0)
    return d, zoo.mlp(64, 10, depth=depth, width=32)


def test_schedule_parsing_and_due_steps():
    assert [s for s in range(1, 20) if Schedule.parse("every:5").due_at_step(s)] == [5, 10, 15]
    assert [s for s in range(1, 20) if Schedule.parse("log").due_at_step(s)] == [1, 2, 4, 8, 16]
    assert not any(Schedule.parse("epoch").due_at_step(s) for s in range(1, 20))
    with pytest.raises(ValueError, match="accepted: every:N, epoch, log"):
        Schedule.parse("hourly")
    with pytest.raises(ValueError, match="unknown probe"):
        Monitor({"nope": "epoch"})
    with pytest.raises(ValueError, match="unknown monitor preset"):
        Monitor("everything")


def test_monitor_rows_match_independent_grad_norms():
    d, model = _setup()
    tr, te = d.loaders(64)

    class Check(Callback):
        """Independently records ||grad|| of each Linear weight after every 3rd step (accumulated in float64, as the
        monitor accumulates its sums of squares)."""

        def __init__(self):
            self.expected = {}

        def on_step_end(self, s):
            if s.step % 3 == 0:
                for name, m in s.model.named_modules():
                    if isinstance(m, torch.nn.Linear):
                        self.expected[(s.step, name)] = float(m.weight.grad.double().norm())

    chk = Check()
    mon = Monitor({"grad_norm": "every:3", "gsc": "epoch", "domain": "epoch"}, budget=1.0)
    h = fit(model, tr, te, optimizer="sgd", lr=0.1, epochs=2, callbacks=[chk, mon])
    got = {(r["step"], r["layer"]): r["value"] for r in h.metrics if r["probe"] == "grad_norm"}
    assert got.keys() == chk.expected.keys()
    assert all(math.isclose(got[k], chk.expected[k], rel_tol=1e-12) for k in got)
    gsc_rows = [r for r in h.metrics if r["probe"] == "gsc" and r["name"] == "gsc"]
    assert {r["epoch"] for r in gsc_rows} == {0, 1} and all(r["value"] > 0 for r in gsc_rows)
    assert any(r["probe"] == "domain" and r["name"] == "sign_diversity" for r in h.metrics)


def test_monitor_does_not_change_training():
    """Probes are pure: the monitored run has exactly the losses of the unmonitored one."""
    losses = []
    for cbs in ([], [Monitor("full", budget=1.0)]):
        d, model = _setup()
        h = fit(model, *d.loaders(64), optimizer="momentum", lr=0.05, epochs=2, callbacks=cbs)
        losses.append([r["train_loss"] for r in h.rows])
    assert losses[0] == losses[1]


def test_budget_skips_and_logs():
    d, model = _setup()
    mon = Monitor({"gsc": "every:1"}, budget=0.01)
    h = fit(model, *d.loaders(64), optimizer="sgd", lr=0.1, epochs=1, callbacks=[mon])
    n_gsc_steps = len({r["step"] for r in h.metrics if r["probe"] == "gsc"})
    skipped = sum(r["value"] for r in h.metrics if r["probe"] == "monitor" and r["name"] == "skipped")
    assert skipped > 0 and n_gsc_steps + skipped == len(d.loaders(64)[0])


def test_failing_probe_is_logged_and_training_continues(monkeypatch):
    from gradcond.monitor import schedule as probes

    def broken(*a, **k):
        raise RuntimeError("probe exploded")

    monkeypatch.setitem(probes.PROBES, "gsc", broken)
    d, model = _setup()
    h = fit(model, *d.loaders(64), optimizer="sgd", lr=0.1, epochs=2, callbacks=[Monitor({"gsc": "every:2"}, budget=1.0)])
    fails = [e for e in h.events if e["kind"] == "probe_failed"]
    assert len(fails) == 1 and "probe exploded" in fails[0]["error"] and len(h.rows) == 2


def test_plain_loop_step():
    d, model = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor({"grad_norm": "every:2", "weight_norm": "epoch"}, budget=1.0)
    loss_fn = get_loss("cross_entropy")
    for i, (x, y) in enumerate(d.loaders(64)[0]):
        if i == 6:
            break
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        mon.step(model, "cross_entropy", (x, y), opt)
    mon.end_epoch()
    steps = sorted({r["step"] for r in mon.rows if r["probe"] == "grad_norm"})
    assert steps == [2, 4, 6]
    assert any(r["probe"] == "weight_norm" for r in mon.rows)



def _monitored(path, crash=False, resume=False):
    class Crash(Callback):
        def on_epoch_end(self, s):
            if crash and s.epoch == 1:
                raise KeyboardInterrupt

    d, model = _setup()
    return fit(model, *d.loaders(64), optimizer="sgd", lr=0.1, epochs=3, run=RunLogger(path), resume=resume,
               callbacks=[Monitor({"grad_norm": "every:4", "gsc": "epoch"}, budget=1.0), Crash()])


def test_monitored_resume_appends_without_duplicates(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _monitored(tmp_path / "run", crash=True)
    _monitored(tmp_path / "run", resume=True)
    from gradcond.train import read_metrics

    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    keys = [(r["step"], r["probe"], r["layer"], r["name"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing duplicated
    gn_steps = sorted({r["step"] for r in rows if r["probe"] == "grad_norm"})
    n = len(load_dataset("digits").loaders(64)[0])
    assert gn_steps == [s for s in range(1, 3 * n + 1) if s % 4 == 0]  # nothing lost
    assert sorted({r["epoch"] for r in rows if r["probe"] == "gsc"}) == [0, 1, 2]


def test_probe_failure_shows_in_the_run_report(run_cli, tmp_path, monkeypatch):
    from gradcond.monitor import schedule as probes

    def broken(*a, **k):
        raise RuntimeError("probe exploded")

    monkeypatch.setitem(probes.PROBES, "domain", broken)
    rc, out, err = run_cli("run", "--out", str(tmp_path), "--quiet", "--set", "train.epochs=2", "--set", "compare_teleport=false",
                           "--set", "monitor.enabled=true")
    assert rc == 0, err
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "Probe failures" in html and "probe exploded" in html


def test_tensorboard_scalars_or_clear_error(tmp_path):
    import importlib.util

    d, model = _setup()
    mon = Monitor({"grad_norm": "every:5"}, budget=1.0, tensorboard_dir=str(tmp_path / "tb"))
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match=r"needs the optional 'tensorboard' package"):
            fit(model, *d.loaders(64), optimizer="sgd", lr=0.1, epochs=1, callbacks=[mon])
    else:
        fit(model, *d.loaders(64), optimizer="sgd", lr=0.1, epochs=1, callbacks=[mon])
        assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


# ---- the deterministic plan (issue 20 §4) -------------------------------------------------------------------
import json
import re

from gradcond.monitor import SCHEDULE_FILE, coverage_sentences, plan_schedule
from gradcond.monitor.schedule import PROBES

CONTRACT_KEYS = {"name", "enabled", "every_steps", "planned_measurements", "cost_s", "skipped", "reason"}


def _simulated_counts(configured: dict, plan: dict) -> dict:
    """Measurements per probe by walking every step / epoch end with the plan's rule (independent of the planner's
    closed-form counting)."""
    spe, epochs, calib = plan["steps_per_epoch"], plan["epochs"], plan["calibration_steps"]
    out = {}
    for p in plan["probes"]:
        if not p["enabled"]:
            continue
        sch = Schedule.parse(configured[p["name"]])
        n = 0
        cm = plan.get("calibration_measurement") and calib > 0
        if not p["skipped"]:
            if sch.kind == "epoch":
                # with a calibration measurement, epoch 0 is measured at the calibration step, not at its end
                n = (1 if cm else 0) + sum(1 for e in range(1 if cm else 0, epochs)
                                           if (e + 1) % p["every_epochs"] == 0 or e == epochs - 1)
            else:
                for s in range(1, spe * epochs + 1):
                    if sch.due_at_step(s) and (s <= calib or sch.kind == "log" or s % p["every_steps"] == 0):
                        n += 1
                if cm and not any(sch.due_at_step(s) for s in range(1, calib + 1)):
                    n += 1  # not measured during calibration: measured once at its end
        out[p["name"]] = n
    return out


def _suggested_budget(reason: str):
    m = re.search(r"set monitor\.budget = ([0-9.]+)", reason)
    return float(m.group(1)) if m else None


@pytest.mark.parametrize("budget", [0.01, 0.05, 0.2])
def test_plan_keeps_the_budget_guarantees_the_minimum_and_names_the_setting(budget):
    configured = {"grad_norm": "every:1", "weight_norm": "every:2", "gsc": "every:5", "domain": "epoch",
                  "conditioning": "epoch", "representation": "epoch", "update_size": "every:4", "noise_scale": "epoch"}
    # costs in seconds; a training step takes 1 ms; 10 epochs of 40 steps
    costs = {"grad_norm": 2e-5, "weight_norm": 1e-4, "gsc": 2e-3, "domain": 1e-3, "conditioning": 0.04,
             "representation": 5e-3, "update_size": 1e-4, "noise_scale": 8e-3}
    plan = plan_schedule(configured, costs, 1e-3, budget, 40, 10, min_measurements=3, calibration_steps=3)
    assert {"budget", "steps_per_epoch", "probes"} <= set(plan) and plan["budget"] == budget
    assert [p["name"] for p in plan["probes"]] == list(PROBES)
    assert all(CONTRACT_KEYS <= set(p) for p in plan["probes"])
    sim = _simulated_counts(configured, plan)
    configured_counts = _simulated_counts(configured, plan_schedule(configured, costs, 1e-3, 1.0, 40, 10, 3, 3))
    total_time = 400 * 1e-3
    capped = False
    for p in plan["probes"]:
        assert p["planned_measurements"] == sim[p["name"]]  # the closed form agrees with walking the steps
        assert p["fraction"] == pytest.approx(costs[p["name"]] * sim[p["name"]] / total_time)
        assert not p["skipped"] and p["planned_measurements"] >= 3  # the guaranteed minimum
        assert p["reason"] and "." not in p["reason"][-1:]
        if p["planned_measurements"] < configured_counts[p["name"]]:  # thinned: the reason names the budget to use
            b = _suggested_budget(p["reason"])
            assert b is not None and b > budget
            again = {q["name"]: q for q in plan_schedule(configured, costs, 1e-3, b, 40, 10, 3, 3)["probes"]}
            assert again[p["name"]]["planned_measurements"] == configured_counts[p["name"]]
        capped |= "guaranteed minimum" in p["reason"]
    if not capped:
        assert sum(p["fraction"] for p in plan["probes"]) <= budget + 1e-12
    else:
        assert "over the budget" in coverage_sentences(plan)[0]


def test_plan_leaves_out_a_probe_only_when_its_minimum_outlasts_the_training_and_says_why():
    configured = {"grad_norm": "every:1", "conditioning": "epoch"}
    # 3 conditioning measurements take 3 s; the whole training 200 steps x 1 ms = 0.2 s
    plan = plan_schedule(configured, {"grad_norm": 1e-5, "conditioning": 1.0}, 1e-3, 0.05, 20, 10, 3, 3)
    cond = next(p for p in plan["probes"] if p["name"] == "conditioning")
    assert cond["skipped"] and cond["planned_measurements"] == 0 and cond["every_steps"] is None
    assert cond["reason"].startswith("not run: one measurement costs 1 s") and "monitor.budget = 1" in cond["reason"]
    no_budget = plan_schedule(configured, {"grad_norm": 1e-5, "conditioning": 1.0}, 1e-3, 1.0, 20, 10, 3, 3)
    assert next(p for p in no_budget["probes"] if p["name"] == "conditioning")["planned_measurements"] == 10
    sentences = coverage_sentences(plan)
    assert len(sentences) == 1 + len(PROBES)
    assert any(s.startswith("conditioning: not run") for s in sentences)
    assert any(s.startswith("gsc: not enabled") for s in sentences)


def test_plan_is_a_pure_function_and_the_minimums_are_reserved_first():
    configured = {"grad_norm": "every:1", "gsc": "every:2", "conditioning": "epoch"}
    costs = {"grad_norm": 3e-5, "gsc": 2.5e-3, "conditioning": 0.02}
    a = plan_schedule(configured, costs, 1e-3, 0.05, 50, 20, 3)
    assert a == plan_schedule(configured, dict(costs), 1e-3, 0.05, 50, 20, 3)
    # conditioning at its minimum (3 of 20 epochs, 1.2 s of the 1 s budget) eats the 5% budget: the others are thinned
    # to their minimum too instead of keeping their shares on top of it
    p = {q["name"]: q for q in a["probes"]}
    assert p["conditioning"]["planned_measurements"] == 3 and "guaranteed minimum" in p["conditioning"]["reason"]
    assert p["grad_norm"]["planned_measurements"] == 3 and p["gsc"]["planned_measurements"] == 3
    # with room left after the minimums, the rest is shared: grad_norm keeps more than its minimum
    roomy = {q["name"]: q for q in plan_schedule(configured, costs, 1e-3, 0.3, 50, 20, 3)["probes"]}
    assert roomy["grad_norm"]["planned_measurements"] > 3


def _mlp_run(run=None, monitor=None, epochs=3, crash_at=None, resume=False):
    class Crash(Callback):
        def on_epoch_end(self, s):
            if crash_at is not None and s.epoch == crash_at:
                raise KeyboardInterrupt

    d, model = _setup()
    return fit(model, *d.loaders(64), optimizer="sgd", lr=0.1, epochs=epochs, run=run, resume=resume,
               callbacks=[monitor, Crash()])


def _keys(rows):
    return sorted((r["step"], r["probe"], r["layer"], r["name"]) for r in rows if r["name"] != "time_fraction")


def test_measurements_match_the_written_plan_and_every_probe_gets_its_minimum(tmp_path):
    configured = {"grad_norm": "every:1", "weight_norm": "every:2", "gsc": "every:3", "domain": "epoch",
                  "conditioning": "epoch"}
    h = _mlp_run(RunLogger(tmp_path / "a"), Monitor(configured, budget=0.02), epochs=4)
    plan = json.loads((tmp_path / "a" / SCHEDULE_FILE).read_text())
    assert plan["budget"] == 0.02 and plan["calibration_steps"] == 0 and plan["epochs"] == 4
    assert plan["cost_source"] == "model" and plan["cost_model"]["profile"]["probe_batch"] == 64
    for p in plan["probes"]:
        steps = {(r["step"], r["epoch"]) for r in h.metrics if r["probe"] == p["name"]}
        assert len(steps) == p["planned_measurements"], p
        if p["enabled"] and not p["skipped"]:
            assert p["planned_measurements"] >= 3
        elif p["enabled"]:
            assert p["reason"].startswith("not run")
    # the configured-but-thinned measurements are counted, deterministically given the plan
    n = len(load_dataset("digits").loaders(64)[0])
    gn_skipped = sum(r["value"] for r in h.metrics if r["probe"] == "monitor" and r["layer"] == "grad_norm")
    gn_planned = next(p for p in plan["probes"] if p["name"] == "grad_norm")["planned_measurements"]
    assert gn_skipped + gn_planned == 4 * n
    assert not any(r["name"] == "time_fraction" for r in h.metrics)  # timings never go to the metric rows


def test_given_a_plan_the_rows_do_not_depend_on_the_clock(tmp_path, monkeypatch):
    """Two runs with the same plan write the same rows, even when the second run's clock is erratic."""
    import random

    from gradcond.monitor import monitor as monitor_module

    configured = {"grad_norm": "every:1", "gsc": "every:2", "domain": "epoch"}
    a = _mlp_run(RunLogger(tmp_path / "a"), Monitor(configured, budget=0.01))
    plan_path = tmp_path / "a" / SCHEDULE_FILE
    rng = random.Random(0)
    real = monitor_module.time.perf_counter

    class ErraticTime:
        @staticmethod
        def perf_counter():
            return real() * rng.uniform(0.1, 10.0)

    monkeypatch.setattr(monitor_module, "time", ErraticTime)
    b = _mlp_run(RunLogger(tmp_path / "b"), Monitor(configured, budget=0.01, plan=plan_path))
    assert _keys(a.metrics) == _keys(b.metrics)
    assert json.loads((tmp_path / "b" / SCHEDULE_FILE).read_text()) == json.loads(plan_path.read_text())


def test_resume_reuses_the_written_plan(tmp_path):
    configured = {"grad_norm": "every:1", "gsc": "every:2", "domain": "epoch"}
    with pytest.raises(KeyboardInterrupt):
        _mlp_run(RunLogger(tmp_path / "r"), Monitor(configured, budget=0.01), crash_at=1)
    written = (tmp_path / "r" / SCHEDULE_FILE).read_text()
    h = _mlp_run(RunLogger(tmp_path / "r"), Monitor(configured, budget=0.01), resume=True)
    assert (tmp_path / "r" / SCHEDULE_FILE).read_text() == written  # not re-planned
    # the resumed run measured exactly what an uninterrupted run with that plan measures
    from gradcond.train import read_metrics

    full = _mlp_run(None, Monitor(configured, budget=0.01, plan=json.loads(written)))
    assert _keys(read_metrics(tmp_path / "r" / "metrics.csv")) == _keys(full.metrics)
    assert h is not None


def test_monitor_bad_input_messages(tmp_path):
    with pytest.raises(ValueError, match=r"min_measurements must be an integer >= 1, got 0\."):
        Monitor(min_measurements=0)
    with pytest.raises(ValueError, match=r"monitor budget must be a fraction in \(0, 1\], got 2"):
        Monitor(budget=2)
    plan = plan_schedule({"gsc": "epoch"}, {}, None, 1.0, 10, 2)
    with pytest.raises(ValueError, match=r"the monitor plan covers probes \['gsc'\] but this monitor measures "
                                         r"\['grad_norm'\]; pass a plan written for the same probes\."):
        Monitor({"grad_norm": "every:1"}, plan=plan)
    with pytest.raises(ValueError, match=r"the monitor plan schedules gsc as 'epoch' but this monitor configures "
                                         r"'every:2'; pass a matching plan\."):
        Monitor({"gsc": "every:2"}, plan=plan)
    with pytest.raises(ValueError, match=r"cannot be read"):
        Monitor({"gsc": "epoch"}, plan=tmp_path / "missing.json")


def test_plain_loop_keeps_the_plan_in_memory():
    d, model = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor({"grad_norm": "every:1", "gsc": "every:1"}, budget=0.05)
    loss_fn = get_loss("cross_entropy")
    for i, (x, y) in enumerate(d.loaders(64)[0]):
        if i == 12:
            break
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        mon.step(model, "cross_entropy", (x, y), opt)
    assert mon.plan is not None and mon.plan["steps_per_epoch"] is None and mon.plan["calibration_steps"] == 0
    gsc = next(p for p in mon.plan["probes"] if p["name"] == "gsc")
    assert gsc["every_steps"] > 1  # thinned by rate: the budget applies without knowing the run's length
    got = sorted({r["step"] for r in mon.rows if r["probe"] == "gsc"})
    assert got == [s for s in range(1, 13) if s % gsc["every_steps"] == 0]


def test_use_plan_pins_a_comparison_run_to_the_same_steps(tmp_path):
    configured = {"grad_norm": "every:1", "gsc": "every:2"}
    a = _mlp_run(RunLogger(tmp_path / "a"), Monitor(configured, budget=0.01), epochs=2)
    mon = Monitor(configured, budget=0.01)
    mon.use_plan(tmp_path / "a" / SCHEDULE_FILE)
    b = _mlp_run(None, mon, epochs=2)
    assert _keys(a.metrics) == _keys(b.metrics)
    with pytest.raises(ValueError, match="pass a plan written for the same probes"):
        Monitor({"gsc": "every:2"}, budget=0.01).use_plan(tmp_path / "a" / SCHEDULE_FILE)


def test_a_plan_written_with_calibration_steps_is_still_followed(tmp_path):
    """Plans written before issue 26 timed the probes during 3 calibration steps and logged that measurement of an
    epoch probe at step 3 (epoch 0's measurement). Given or resumed, such a plan is followed exactly."""
    configured = {"grad_norm": "every:1", "domain": "epoch"}
    n = len(load_dataset("digits").loaders(64)[0])
    old = plan_schedule(configured, {"grad_norm": 1e-5, "domain": 1e-4}, 1e-3, 0.5, n, 2, 3, calibration_steps=3)
    assert old["calibration_measurement"] is True and "cost_source" not in old
    h = _mlp_run(RunLogger(tmp_path / "c"), Monitor(configured, budget=0.5, plan=old), epochs=2)
    dom = sorted({(r["step"], r["epoch"]) for r in h.metrics if r["probe"] == "domain"})
    assert dom[0] == (3, 0) and (n, 0) not in dom  # epoch 0: at the calibration step only
    assert len(dom) == next(p for p in old["probes"] if p["name"] == "domain")["planned_measurements"]
    gn = [(r["step"], r["layer"], r["name"]) for r in h.metrics if r["probe"] == "grad_norm"]
    assert len(gn) == len(set(gn))  # no step measured twice


def test_epoch_of_two_steps_plans_at_the_first_step_and_a_given_plan_repeats_it():
    from torch.utils.data import DataLoader, TensorDataset

    def run(plan=None):
        torch.manual_seed(0)
        x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
        tr = DataLoader(TensorDataset(x, y), batch_size=32)  # 2 steps per epoch
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        mon = Monitor({"grad_norm": "every:5", "domain": "epoch"}, budget=0.05, plan=plan)
        return mon, fit(model, tr, tr, optimizer="sgd", lr=0.1, epochs=4, callbacks=[mon])

    mon, h = run()
    assert mon.plan["calibration_steps"] == 0 and mon.plan["cost_model"]["profile"]["train_batch"] == 32
    planned = {p["name"]: p["planned_measurements"] for p in mon.plan["probes"] if p["enabled"]}
    for name in planned:
        rows = [(r["step"], r["epoch"], r["layer"], r["name"]) for r in h.metrics if r["probe"] == name]
        assert len(rows) == len(set(rows))
        assert len({r[:2] for r in rows}) == planned[name]
    _, again = run(plan=mon.plan)
    assert _keys(again.metrics) == _keys(h.metrics)
