import time

import pytest
import torch

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.train import Callback, RunLogger, fit, get_loss, read_metrics


def _digits_setup(seed=0, dtype=torch.float32):
    d = load_dataset("digits", dtype=dtype)
    torch.manual_seed(seed)
    model = zoo.mlp(64, 10, depth=3, width=32).to(dtype)
    return d, model


@pytest.mark.parametrize("opt,lr", [("sgd", 0.5), ("momentum", 0.05), ("adagrad", 0.05), ("adam", 0.003), ("adamw", 0.003)])
def test_loss_decreases_on_digits_within_3_epochs(opt, lr):
    d, model = _digits_setup()
    tr, te = d.loaders(32, seed=0)
    before = get_loss("cross_entropy")(model(d.train.tensors[0]), d.train.tensors[1]).item()
    h = fit(model, tr, te, optimizer=opt, lr=lr, epochs=3)
    losses = h.column("train_loss")
    assert len(h.rows) == 3 and losses[-1] < losses[0] < before * 1.05
    assert h.rows[-1]["test_loss"] < before
    assert h.rows[-1]["test_acc"] > 0.5


def test_float64_training_and_schedules():
    d, model = _digits_setup(dtype=torch.float64)
    tr, te = d.loaders(64)
    h = fit(model, tr, te, optimizer="sgd", lr=0.1, epochs=3, schedule="step", schedule_kwargs={"step_size": 1, "gamma": 0.5})
    assert [r["lr"] for r in h.rows] == [0.1, 0.05, 0.025]
    assert all(p.dtype == torch.float64 for p in model.parameters())
    d, model = _digits_setup()
    h = fit(model, *d.loaders(64), optimizer="sgd", lr=0.1, epochs=2, schedule="plateau")
    assert len(h.rows) == 2


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_start(self, s):
        self.calls.append(("train_start", s.step))

    def on_epoch_start(self, s):
        self.calls.append(("epoch_start", s.epoch))

    def on_step_start(self, s):
        assert s.batch is not None
        self.calls.append(("step_start", s.step))

    def on_step_end(self, s):
        s.log_metric("rec", "loss", s.loss)
        self.calls.append(("step_end", s.step))

    def on_epoch_end(self, s):
        s.log_event("epoch_done", n=s.epoch)
        self.calls.append(("epoch_end", s.epoch))

    def on_train_end(self, s):
        self.calls.append(("train_end", s.step))


def test_callback_hooks_order_and_logging():
    d, model = _digits_setup()
    x, y = d.train.tensors
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:100], y[:100]), batch_size=50)
    rec = Recorder()
    h = fit(model, loader, epochs=2, callbacks=[rec])
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["train_start", "epoch_start", "step_start", "step_end", "step_start", "step_end", "epoch_end",
                     "epoch_start", "step_start", "step_end", "step_start", "step_end", "epoch_end", "train_end"]
    assert [c[1] for c in rec.calls if c[0] == "step_end"] == [1, 2, 3, 4]
    assert [e["n"] for e in h.events if e["kind"] == "epoch_done"] == [0, 1]
    assert len([m for m in h.metrics if m["probe"] == "rec"]) == 4


def test_nan_loss_is_a_clear_error():
    d, model = _digits_setup()
    with pytest.raises(FloatingPointError, match="training loss became"):
        fit(model, d.loaders(64)[0], optimizer="sgd", lr=1e6, epochs=3)


def test_bad_optimizer_and_schedule_names():
    d, model = _digits_setup()
    with pytest.raises(ValueError, match=r"unknown optimizer 'lbfgs'; accepted: sgd, momentum, adagrad, adam, adamw"):
        fit(model, d.loaders(64)[0], optimizer="lbfgs")
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        fit(model, d.loaders(64)[0], schedule="cosine")
    with pytest.raises(ValueError, match="unknown loss"):
        fit(model, d.loaders(64)[0], loss="hinge")


class Crash(Callback):
    """Raises at the end of epoch ``at`` (after its metric rows were written, before its checkpoint)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, s):
        s.log_metric("probe", "loss", s.loss, layer="all")

    def on_epoch_end(self, s):
        s.log_event("seen", e=s.epoch)
        if s.epoch == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_resume_reproduces_uninterrupted_metrics_exactly(tmp_path, opt):
    def go(path, crash_at=None, resume=False):
        d, model = _digits_setup(seed=4)
        tr, te = d.loaders(64, seed=4)
        cbs = [Crash(crash_at if crash_at is not None else -1)]
        return fit(model, tr, te, optimizer=opt, lr=0.01, epochs=4, run=RunLogger(path), resume=resume, callbacks=cbs, seed=4)

    go(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "cut", crash_at=2)  # epoch 2's rows are written, its checkpoint is not
    rows_cut = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert len(rows_cut) > len((tmp_path / "full" / "metrics.csv").read_text().splitlines()) * 0.5
    go(tmp_path / "cut", resume=True)
    full = (tmp_path / "full" / "metrics.csv").read_bytes()
    assert (tmp_path / "cut" / "metrics.csv").read_bytes() == full  # no lost, no duplicated row, same bytes
    assert (tmp_path / "cut" / "events.jsonl").read_text().count('"seen"') == 4
    rows = read_metrics(tmp_path / "full" / "metrics.csv")
    assert {r["epoch"] for r in rows} == {0, 1, 2, 3}


# ---- timings, safe checkpoints, schedules that cannot fire, bad optimizer values (issue 20) ----------------------
class Timed(Callback):
    """Logs one deterministic metric and one wall-clock timing per epoch; crashes once at ``crash_at``."""

    def __init__(self, crash_at=-1):
        self.crash_at = crash_at

    def on_epoch_end(self, s):
        s.log_metric("probe", "weight_sum", sum(float(p.detach().sum()) for p in s.model.parameters()))
        s.log_timings([("probe", "", "wall", time.perf_counter())])
        s.log_metric("probe", "seconds", time.perf_counter())  # a timing name: routed to timings.csv as well
        if s.epoch == self.crash_at:
            raise KeyboardInterrupt


def test_timings_in_their_own_file_and_truncated_on_resume(tmp_path):
    def go(path, crash_at=-1, resume=False):
        d, model = _digits_setup(seed=2)
        return fit(model, *d.loaders(64, seed=2), optimizer="momentum", lr=0.02, epochs=3, run=RunLogger(path),
                   resume=resume, callbacks=[Timed(crash_at)], seed=2)

    h = go(tmp_path / "full")
    assert [r["name"] for r in h.timings] == ["wall", "seconds"] * 3
    assert "seconds" not in {r["name"] for r in h.metrics} and "weight_sum" in {r["name"] for r in h.metrics}
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "cut", crash_at=1)  # epoch 1's rows and timings are written, its checkpoint is not
    assert len(read_metrics(tmp_path / "cut" / "timings.csv")) == 4
    go(tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "metrics.csv").read_bytes() == (tmp_path / "full" / "metrics.csv").read_bytes()
    cut, full = read_metrics(tmp_path / "cut" / "timings.csv"), read_metrics(tmp_path / "full" / "timings.csv")
    assert [(r["epoch"], r["name"]) for r in cut] == [(r["epoch"], r["name"]) for r in full]  # no loss, no duplicate
    assert [r["value"] for r in cut] != [r["value"] for r in full]  # wall times of different executions
    go(tmp_path / "full")  # a fresh run into a used directory starts all files afresh
    assert len(read_metrics(tmp_path / "full" / "timings.csv")) == 6
    assert (tmp_path / "full" / "metrics.csv").read_bytes() == (tmp_path / "cut" / "metrics.csv").read_bytes()


def test_callback_states_follow_their_class_when_the_list_changes(tmp_path):
    """A stop_after dropped on resume must not hand its state to the next callback (positions shift)."""
    from gradcond.train.callbacks import StopAfterEpochs

    class Counter(Callback):
        def __init__(self):
            self.n = 0

        def on_epoch_end(self, s):
            self.n += 1

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, st):
            self.n = st["n"]

    d, model = _digits_setup()
    fit(model, *d.loaders(64), epochs=3, run=RunLogger(tmp_path), callbacks=[StopAfterEpochs(2), Counter()])
    d, model = _digits_setup()
    c = Counter()
    fit(model, *d.loaders(64), epochs=3, run=RunLogger(tmp_path), callbacks=[c], resume=True)
    assert c.n == 3


def test_fit_warns_about_callbacks_scheduled_after_the_end():
    from gradcond.train.trainer import UnreachableCallbackWarning, unreachable_schedules

    class Sched(Callback):
        def __init__(self, at_epoch=(), at_step=()):
            self.at_epoch, self.at_step = set(at_epoch), set(at_step)

    d, model = _digits_setup()
    tr, te = d.loaders(256)  # 6 steps per epoch
    assert len(tr) == 6
    with pytest.warns(UnreachableCallbackWarning) as rec:
        fit(model, tr, epochs=2, callbacks=[Sched(at_epoch=[0, 2, 7]), Sched(at_step=[11, 12])])
    assert [str(w.message) for w in rec] == [
        "callback Sched is scheduled at epoch(s) 2, 7 (0-based) but training runs 2 epoch(s), 0-1; it will not fire there.",
        "callback Sched is scheduled at step(s) 12 but training makes 12 optimizer steps (2 epochs x 6); "
        "it will not fire there."]
    assert unreachable_schedules([Sched(at_epoch=[1], at_step=[11])], 2, 6) == []


@pytest.mark.parametrize("kw,message", [
    ({"lr": "abc"}, "learning rate must be a positive finite number, got 'abc'."),
    ({"weight_decay": -1}, "weight_decay must be a finite number >= 0, got -1."),
    ({"momentum": 1.0}, "momentum must be a number in [0, 1), got 1.0."),
])
def test_make_optimizer_rejects_bad_values(kw, message):
    from gradcond.train import make_optimizer

    with pytest.raises(ValueError) as info:
        make_optimizer("momentum", [torch.nn.Parameter(torch.zeros(1))], **{"lr": 0.1, **kw})
    assert str(info.value) == message


def test_make_schedule_rejects_bad_values():
    from gradcond.train import make_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"step_size a positive integer \(epochs\), got 0"):
        make_schedule("step", opt, step_size=0)
    with pytest.raises(ValueError, match=r"factor a number in \(0, 1\), got 1.5"):
        make_schedule("plateau", opt, factor=1.5)


def test_accuracy_counts_targets_for_per_position_labels():
    """(N, C, T) logits with (N, T) targets (a language model): accuracy is the share of positions predicted right,
    in [0, 1], for both the training rows and evaluate -- not positions right per sample (it used to read 4.8)."""
    from torch.utils.data import DataLoader, TensorDataset

    from gradcond.train import evaluate

    class PerPosition(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 5)

        def forward(self, x):
            return self.emb(x).transpose(1, 2)  # (N, C=5, T)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40, 6), generator=g)
    y = torch.randint(0, 5, (40, 6), generator=g)
    torch.manual_seed(0)
    model = PerPosition()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    loss, acc = evaluate(model, loader, get_loss("cross_entropy"), "classification")
    with torch.no_grad():
        expected = float((model(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(expected) and 0.0 <= acc <= 1.0
    h = fit(model, loader, loader, lr=1e-12, epochs=1, progress=False)  # (a step of 1e-12 moves no argmax)
    assert h.rows[-1]["train_acc"] == pytest.approx(expected) and h.rows[-1]["test_acc"] == pytest.approx(expected)
