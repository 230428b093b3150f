"""Data filters (seed 002 §5.4, §6.8): k_filter, KFilter, LossFilter against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradcond.callbacks import Callback
from gradcond.train import KFilter, LossFilter, fit, k_filter
from gradcond.train.callbacks import build_callback


def _naive_keep(X, y, k):
    X = np.asarray(X, dtype=np.float64)
    keep = []
    for i in range(len(X)):
        d = ((X - X[i]) ** 2).sum(1)
        j = np.arange(len(X))
        m = j != i
        nn = j[m][np.lexsort((j[m], d[m]))][:k]
        keep.append(not (y[nn] == y[i]).all())
    return np.array(keep)


def _blobs(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]], dtype=torch.float64)
    X = centers[y] + 0.6 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return X, y


class _Seen(Callback):
    """Records, per epoch, the number of samples trained on and the input features at the epoch start."""

    def __init__(self):
        self.seen, self.first = {}, {}

    def on_step_end(self, state):
        self.seen[state.epoch] = self.seen.get(state.epoch, 0) + len(state.batch[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k_filter_matches_naive_loop(dtype):
    X, y = _blobs()
    for k in (1, 5, 12):
        keep = k_filter(X.to(dtype), y, k)
        np.testing.assert_array_equal(keep.numpy(), _naive_keep(X.numpy(), y.numpy(), k))
    # integer grid with ties
    g = torch.Generator().manual_seed(1)
    Xi = torch.randint(0, 4, (60, 2), generator=g)
    yi = torch.arange(60) % 2
    np.testing.assert_array_equal(k_filter(Xi.to(dtype), yi, 3, chunk_size=5).numpy(),
                                  _naive_keep(Xi.numpy(), yi.numpy(), 3))


def test_k_filter_bad_input():
    X, y = _blobs(30)
    with pytest.raises(ValueError, match="k = 30 but there are 30 samples"):
        k_filter(X, y, 30)
    with pytest.raises(ValueError, match=r"^k_filter: class 0 has 10 samples, fewer than k \+ 1 = 11"):
        k_filter(X, y, 10)
    with pytest.raises(ValueError, match="hard labels"):
        k_filter(X, torch.nn.functional.one_hot(y, 3).float(), 3)
    with pytest.raises(ValueError, match="all 30 samples have label 1"):
        k_filter(X, torch.ones(30, dtype=torch.long), 3)


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(dtype)


def test_kfilter_trains_on_kept_samples_and_logs():
    X, y = _blobs()
    loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = _Seen()
    kf = KFilter(k=5, warmup_epochs=1)
    hist = fit(_model(), loader, epochs=3, lr=0.05, callbacks=[seen, kf])
    keep = _naive_keep(X.numpy(), y.numpy(), 5)  # input-space filter: independent of the model
    assert 0 < keep.sum() < len(keep)
    assert seen.seen == {0: 120, 1: int(keep.sum()), 2: int(keep.sum())}
    ev = [e for e in hist.events if e["kind"] == "data_filter"]
    assert [e["epoch"] for e in ev] == [1, 2]
    removed = torch.as_tensor(~keep)
    for e in ev:
        assert e["filter"] == "k_filter" and e["kept"] == int(keep.sum()) and e["total"] == 120
        assert e["removed_per_class"] == {str(c): int((y[removed] == c).sum()) for c in range(3)}
        assert e["capped"] is False
    kept_rows = [r["value"] for r in hist.metrics if r["probe"] == "data_filter"]
    assert kept_rows == [1.0, keep.mean(), keep.mean()]
    assert kf.history[1]["kept"] == int(keep.sum())


def test_kfilter_cap_blocks_and_layer_features():
    X, y = _blobs(200, seed=2)
    loader = DataLoader(TensorDataset(X, y), batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = _Seen()
    hist = fit(_model(), loader, epochs=1, lr=0.05,
               callbacks=[seen, KFilter(k=3, filter_batch=50, max_removed=0.2, seed=1)])
    ev = [e for e in hist.events if e["kind"] == "data_filter"][0]
    assert ev["removed"] == math.floor(0.2 * 200) and ev["capped"] is True and seen.seen[0] == 160

    # features of a hidden layer: the kept set equals k_filter of that layer's output at the epoch start
    class Snap(Callback):
        def on_epoch_start(self, state):
            with torch.no_grad():
                self.F = state.model[1](state.model[0](X))

    snap = Snap()
    loader = DataLoader(TensorDataset(X, y), batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = _Seen()
    fit(_model(), loader, epochs=1, lr=0.05, callbacks=[snap, seen, KFilter(k=4, layer="1")])
    assert seen.seen[0] == int(k_filter(snap.F, y, 4).sum())


def test_loss_filter_drops_lowest_losses():
    X, y = _blobs()

    class Snap(Callback):
        def on_epoch_start(self, state):
            with torch.no_grad():
                self.losses = torch.nn.functional.cross_entropy(state.model(X), y, reduction="none")

    snap, seen = Snap(), _Seen()
    loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    lf = LossFilter(fraction=0.25, from_epoch=1)
    hist = fit(_model(), loader, epochs=2, lr=0.05, callbacks=[snap, seen, lf])
    assert seen.seen == {0: 120, 1: 90}
    ev = [e for e in hist.events if e["kind"] == "data_filter"]
    assert len(ev) == 1 and ev[0]["removed"] == 30 and ev[0]["filter"] == "loss_filter"
    thr = float(torch.sort(snap.losses).values[29])
    assert ev[0]["loss_threshold"] == pytest.approx(thr, rel=1e-12)
    lowest = torch.argsort(snap.losses)[:30]
    assert ev[0]["removed_per_class"] == {str(c): int((y[lowest] == c).sum()) for c in range(3)}


def test_filter_bad_options_and_config():
    with pytest.raises(ValueError, match=r"LossFilter fraction must be a number in \[0, 1\), got 1.0"):
        LossFilter(fraction=1.0)
    with pytest.raises(ValueError, match=r"KFilter max_removed must be a number in \[0, 1\], got 1.5"):
        KFilter(max_removed=1.5)
    with pytest.raises(ValueError, match="KFilter k must be an integer >= 1, got 0"):
        KFilter(k=0)
    kf = build_callback({"name": "k_filter", "k": 10, "warmup_epochs": 30, "filter_batch": 6148, "max_removed": 0.6})
    assert isinstance(kf, KFilter) and kf.filter_batch == 6148
    with pytest.raises(ValueError, match="needs the train loader to be a torch DataLoader"):
        fit(_model(), [(torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long))], epochs=1,
            callbacks=[KFilter(k=1)])


@pytest.mark.parametrize("make", [lambda: KFilter(k=5, warmup_epochs=1, filter_batch=40, max_removed=0.5),
                                  lambda: LossFilter(fraction=0.3, from_epoch=1)])
def test_filters_resume_exactly(tmp_path, make):
    from gradcond.train import RunLogger, read_events

    X, y = _blobs()

    def run(path, epochs, resume):
        loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        return fit(_model(), loader, epochs=epochs, lr=0.05, callbacks=[make()], run=RunLogger(path), resume=resume)

    straight = run(tmp_path / "a", 3, False)
    run(tmp_path / "b", 2, False)
    resumed = run(tmp_path / "b", 3, True)
    assert resumed.rows == straight.rows
    ev = [[{k: v for k, v in e.items() if k != "time"} for e in read_events(tmp_path / d / "events.jsonl")]
          for d in ("a", "b")]
    assert ev[0] == ev[1] and len(ev[0]) == 2  # filtered epochs 1 and 2, the second one after the resume
    assert (tmp_path / "a" / "metrics.csv").read_bytes() == (tmp_path / "b" / "metrics.csv").read_bytes()
