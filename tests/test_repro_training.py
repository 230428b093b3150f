"""The reproductions' training helper (``gradcond.experiments._training``): a fixed number of steps through the
library's trainer ``gradcond.train.fit`` on in-memory tensors (issue 12: reproductions exercise the trainer)."""

from __future__ import annotations

import math

import pytest
import torch

from gradcond.experiments._training import BatchStream, train_steps


def _data(n=50, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def _plain_loop(model, X, y, opt, steps, bs, gen, sampling):
    """An independent minibatch loop with the sampling schemes BatchStream documents."""
    losses, perm, pos = [], None, 0
    for _ in range(steps):
        if sampling == "replacement":
            idx = torch.randint(0, len(X), (bs,), generator=gen)
        else:
            if perm is None or pos + bs > len(X):
                perm, pos = torch.randperm(len(X), generator=gen), 0
            idx, pos = perm[pos:pos + bs], pos + bs
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sampling", ["permutation", "replacement"])
def test_train_steps_matches_a_plain_loop_and_continues_the_optimizer_state(sampling, dtype):
    X, y = _data(dtype=dtype)
    a, b = _net(dtype=dtype), _net(dtype=dtype)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    # two calls of 7 + 6 steps (16-row batches: a new permutation every 3 steps) with one optimizer ...
    la = train_steps(a, X, y, opt_a, 7, 16, ga, sampling=sampling)
    la += train_steps(a, X, y, opt_a, 6, 16, ga, sampling=sampling)
    # ... follow one plain loop of 13 steps (the data stream restarts per call, the generator continues)
    lb = _plain_loop(b, X, y, opt_b, 7, 16, gb, sampling) + _plain_loop(b, X, y, opt_b, 6, 16, gb, sampling)
    assert la == pytest.approx(lb, rel=1e-6 if dtype == torch.float32 else 1e-12)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_batch_stream_permutation_covers_every_row_once_per_pass():
    X = torch.arange(10.0).unsqueeze(1)
    stream = BatchStream(X, torch.arange(10), batch_size=5, steps=4, generator=torch.Generator().manual_seed(0))
    batches = [xb.squeeze(1).tolist() for xb, _ in stream]
    assert len(stream) == 4 and len(batches) == 4
    assert sorted(batches[0] + batches[1]) == list(range(10)) and sorted(batches[2] + batches[3]) == list(range(10))


def test_record_runs_every_k_steps_and_the_global_rng_is_left_alone():
    X, y = _data()
    model, seen = _net(), []
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    losses = train_steps(model, X, y, "sgd", 10, 8, torch.Generator().manual_seed(0), lr=0.05, record=seen.append,
                         every=4)
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert seen == [4, 8]
    torch.testing.assert_close(torch.rand(3), expected)  # fit seeds the global generator; it is restored after


def test_divergence_ends_the_losses_with_nan_and_keeps_the_last_finite_weights():
    X, y = _data()
    row = int(torch.randperm(50, generator=torch.Generator().manual_seed(0))[20])  # in the third batch of 8
    X[row] = float("nan")
    model = _net()
    losses = train_steps(model, X, y, "sgd", 20, 8, torch.Generator().manual_seed(0), lr=0.05)
    assert len(losses) == 3 and math.isnan(losses[-1])
    assert all(math.isfinite(v) for v in losses[:-1])
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was refused, not applied


def test_empty_training_is_a_no_op_and_bad_streams_are_refused():
    X, y = _data()
    model = _net()
    before = [p.clone() for p in model.parameters()]
    assert train_steps(model, X, y, "sgd", 0, 8, torch.Generator()) == []
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="unknown sampling 'bootstrap'; accepted: permutation, replacement."):
        BatchStream(X, y, 8, 1, torch.Generator(), sampling="bootstrap")
    with pytest.raises(ValueError, match=r"batch_size must be between 1 and the number of rows \(50\), got 51."):
        BatchStream(X, y, 51, 1, torch.Generator())
