"""TeleportCallback (issue 9 item 5): in-place teleports inside gradcond.train.fit, logged, optimizer state handled."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradcond.data import load_dataset
from gradcond.teleport.cob_callback import TeleportCallback
from gradcond.train import Callback, TrainState, fit
from gradcond.train.callbacks import build_callback
from gradcond.train.run import RunLogger
from gradcond.zoo import mlp

F = torch.nn.functional


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    return d


def _loaders(d, n=256, bs=32, dtype=torch.float32):
    X, y = d.train.tensors
    ds = torch.utils.data.TensorDataset(X[:n].to(dtype), y[:n])
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, generator=g)


class Recorder(Callback):
    """Snapshots parameters and optimizer state at every epoch start / step start."""

    def __init__(self):
        self.snaps = []

    def _snap(self, state, where):
        p = {n: t.detach().clone() for n, t in state.model.named_parameters()}
        opt = {n: {k: v.clone() for k, v in state.optimizer.state[t].items() if torch.is_tensor(v)}
               for n, t in state.model.named_parameters() if t in state.optimizer.state}
        self.snaps.append((where, state.epoch, state.step, p, opt, id(state.model)))

    def on_epoch_start(self, state):
        self._snap(state, "epoch")

    def on_step_start(self, state):
        self._snap(state, "step")


def test_demo_spec_teleports_once_at_start_of_epoch_1_and_transports_momentum(digits):
    # what the demo does: build_callback({"name": "teleport", "at_epoch": 1, "kind": "optimized"}), zoo mlp, float32
    torch.manual_seed(0)
    model = mlp(64, 10)
    loader = _loaders(digits)
    before, after = Recorder(), Recorder()
    cb = build_callback({"name": "teleport", "at_epoch": 1, "kind": "optimized"})
    assert isinstance(cb, TeleportCallback)
    params0 = [id(p) for p in model.parameters()]
    hist = fit(model, loader, optimizer="momentum", lr=0.01, epochs=2, callbacks=[before, cb, after])
    assert [id(p) for p in model.parameters()] == params0  # same parameter objects throughout
    ev = [e for e in hist.events if e["kind"] == "teleport"]
    assert len(ev) == 1 and ev[0]["epoch"] == 1 and ev[0]["step"] == len(loader)
    e = ev[0]
    assert e["method"] == "optimized" and e["optimizer_state"] == "transport" and e["transport_exact"]
    assert abs(e["loss_after"] - e["loss_before"]) <= 1e-5 * abs(e["loss_before"])  # float32
    assert e["max_output_change"] < 1e-5
    assert e["objective_after"] > 1.5 * e["objective_before"]
    assert {"objective_before", "objective_after", "loss_before", "loss_after", "seconds"} <= {
        m["name"] for m in hist.metrics + hist.timings if m["probe"] == "teleport"}  # wall seconds: timings
    # independent check of the in-place teleport and the transport: the snapshots taken just before and just
    # after the teleport callback at the start of epoch 1 satisfy V = f * W and buf_V = buf_W / f, entrywise
    b = [s for s in before.snaps if s[0] == "epoch" and s[1] == 1][0]
    a = [s for s in after.snaps if s[0] == "epoch" and s[1] == 1][0]
    changed = 0
    for n in b[3]:
        W, V = b[3][n].double(), a[3][n].double()
        mw, mv = b[4][n]["momentum_buffer"].double(), a[4][n]["momentum_buffer"].double()
        nz = W.abs() > 1e-3
        f = V[nz] / W[nz]
        assert torch.allclose(mv[nz] * f, mw[nz], rtol=1e-5, atol=1e-7)
        changed += int((f - 1).abs().gt(1e-3).sum())
    assert changed > 0


def test_at_step_every_and_default_schedule(digits):
    loader = _loaders(digits, n=128)  # 4 steps per epoch
    cb = TeleportCallback(at_step=[2, 5], every=4, kind="random", sigma=0.5)
    hist = fit(mlp(64, 10), loader, epochs=3, callbacks=[cb])
    assert sorted(e["step"] for e in hist.events if e["kind"] == "teleport") == [2, 4, 5, 8]
    cb = TeleportCallback()  # nothing given: once, at the start of training
    hist = fit(mlp(64, 10), loader, epochs=2, callbacks=[cb])
    assert [(e["epoch"], e["step"]) for e in hist.events if e["kind"] == "teleport"] == [(0, 0)]


def test_resume_state_prevents_a_second_teleport(digits):
    loader = _loaders(digits, n=64)
    cb = TeleportCallback(at_epoch=0)
    fit(mlp(64, 10), loader, epochs=1, callbacks=[cb])
    cb2 = TeleportCallback(at_epoch=0)
    cb2.load_state_dict(cb.state_dict())
    hist = fit(mlp(64, 10), loader, epochs=1, callbacks=[cb2])
    assert not [e for e in hist.events if e["kind"] == "teleport"]


@pytest.mark.parametrize("opt", ["sgd", "adam", "adagrad", "adamw"])
def test_inter_random_teleport_in_place_keeps_function_float64(digits, opt):
    torch.manual_seed(1)
    model = mlp(64, 10, depth=3, width=32).double()
    loader = _loaders(digits, n=128, dtype=torch.float64)
    snap = {}

    class Grab(Callback):
        def on_epoch_start(self, state):
            snap["model"] = copy.deepcopy(state.model)

    cb = TeleportCallback(at_epoch=1, kind="random", mode="inter", sigma=0.9)
    fit(model, loader, optimizer=opt, lr=1e-3, epochs=2, callbacks=[Grab(), cb])
    e = cb.events[0]
    assert e["max_output_change"] < 1e-12 and abs(e["loss_after"] - e["loss_before"]) < 1e-12
    # ReLUs with negative taus were rewritten in place (the same Sequential object holds the wrappers)
    assert any(type(m).__name__ == "TeleportedActivation" for m in model.modules())


def test_unsupported_optimizer_leaves_model_and_optimizer_unchanged(digits):
    model = mlp(64, 10)
    loader = _loaders(digits, n=64)
    opt = torch.optim.Adamax(model.parameters(), lr=0.01)
    x, y = next(iter(loader))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sd = copy.deepcopy(model.state_dict())
    ost = copy.deepcopy(opt.state_dict())
    state = TrainState(model, opt, F.cross_entropy, loader, run=RunLogger(None))
    cb = TeleportCallback(at_epoch=0, kind="optimized")
    with pytest.raises(TypeError, match="Adamax is not supported"):
        cb.on_epoch_start(state)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    new = opt.state_dict()
    for k, st in ost["state"].items():
        assert all(torch.equal(v, new["state"][k][kk]) for kk, v in st.items())
    assert not state.events
    # with optimizer_state="keep" any optimizer works
    TeleportCallback(at_epoch=0, optimizer_state="keep").on_epoch_start(state)
    assert len(state.events) == 1


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 16)
        self.b = nn.Linear(16, 10)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_inter_on_function_call_activation_refused_model_unchanged(digits):
    model = FunctionalReLU()
    loader = _loaders(digits, n=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sd = copy.deepcopy(model.state_dict())
    state = TrainState(model, opt, F.cross_entropy, loader, run=RunLogger(None))
    with pytest.raises(ValueError, match=r"in place and could not.*function calls.*mode='intra' with rewrite=False"):
        TeleportCallback(at_epoch=0, mode="inter").on_epoch_start(state)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # intra (no rewrite needed, tau > 0 at the ReLU) works on the same model
    TeleportCallback(at_epoch=0, mode="intra", kind="optimized").on_epoch_start(state)
    assert state.events[-1]["max_output_change"] < 1e-5


def test_tanh_intra_default_pins_rewritten_sites_keeps_plain_state_dict(digits):
    model = mlp(64, 10, act="tanh")
    keys = list(model.state_dict())
    loader = _loaders(digits, n=64)
    cb = TeleportCallback(at_epoch=0, kind="optimized")
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning, match="no free change-of-basis factor"):
        cb.teleport_now(TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   loss_fn=nn.CrossEntropyLoss(), train_loader=loader, run=RunLogger(None)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fit(model, loader, epochs=1, callbacks=[cb])
    assert list(model.state_dict()) == keys  # no activation rewritten: a plain instance of the user's class
    # tanh neurons pinned with rewrite=False: nothing to teleport, logged as skipped (issue 20 §2)
    assert cb.events[0]["num_free"] == 0 and cb.events[0]["kind"] == "teleport_skipped"
    cb = TeleportCallback(at_epoch=0, kind="optimized", rewrite=True)
    model2 = mlp(64, 10, act="tanh")
    fit(model2, loader, epochs=1, callbacks=[cb])
    assert cb.events[0]["num_free"] > 0 and cb.events[0]["max_output_change"] < 1e-5


@pytest.mark.parametrize("kw,msg", [
    (dict(kind="best"), "kind must be 'random' or 'optimized'"),
    (dict(sigma=1.0), "sigma must be in"),
    (dict(mode="both"), "mode must be 'intra' or 'inter'"),
    (dict(optimizer_state="transfer"), "optimizer_state must be one of transport, reset, keep"),
    (dict(at_epoch=-1), "at_epoch must be a non-negative int"),
    (dict(at_step=[1, "2"]), "at_step must be a non-negative int"),
    (dict(every=0), "every must be a positive int"),
    (dict(objective="loss"), "objective must be one of"),
    (dict(mode="inter", rewrite=False), "needs rewrite=True"),
])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TeleportCallback(**kw)
    with pytest.raises(ValueError, match="unknown option"):
        build_callback({"name": "teleport", "at_epochs": 1})
