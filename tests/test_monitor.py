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
        """Independently records ||grad|| of each Linear weight after every 3rd step."""

        def __init__(self):
            self.expected = {}

        def on_step_end(self, s):
            if s.step % 3 == 0:
                for name, m in s.model.named_modules():
                    if isinstance(m, torch.nn.Linear):
                        self.expected[(s.step, name)] = float(m.weight.grad.norm())

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
    from gradcond.monitor import probes

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
    from gradcond.monitor import probes

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
