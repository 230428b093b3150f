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
    full = (tmp_path / "full" / "metrics.csv").read_text()
    assert (tmp_path / "cut" / "metrics.csv").read_text() == full  # no lost, no duplicated row, same values
    assert (tmp_path / "cut" / "events.jsonl").read_text().count('"seen"') == 4
    rows = read_metrics(tmp_path / "full" / "metrics.csv")
    assert {r["epoch"] for r in rows} == {0, 1, 2, 3}
