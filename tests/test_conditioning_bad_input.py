"""Bad input for the conditioning metrics: clear ValueError/TypeError, never a silent NaN, and the model's parameters
and buffers bit-identical (and training flags restored) after every metric, whether it succeeds or fails."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond.probes import conditioning as C


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12, 3)).double()


def batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


LOSS = F.cross_entropy
ZERO = lambda o, t: (o * 0).sum()  # noqa: E731  zero gradients everywhere
NAN = lambda o, t: (o * float("nan")).sum()  # noqa: E731


def state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def identical(m, s):
    return all(torch.equal(v, s[k]) for k, v in m.state_dict().items())


def loader(k=3, b=6):
    return [batch(b, seed=i) for i in range(k)]


# name -> callable(model, loss, data); data: "batch" or "loader"
METRICS = {
    "step_consistency": (lambda m, l, d: C.step_consistency(m, l, d), "batch"),
    "step_consistency_jvp": (lambda m, l, d: C.step_consistency(m, l, d, mode="jvp"), "batch"),
    "step_consistency_targeted": (lambda m, l, d: C.step_consistency(m, l, d, sampler="targeted", n=2), "batch"),
    "step_consistency_random": (lambda m, l, d: C.step_consistency(m, l, d, sampler="random", n=2), "batch"),
    "step_metrics": (lambda m, l, d: C.step_metrics(m, l, d), "batch"),
    "batch_dissonance": (lambda m, l, d: C.batch_dissonance(m, l, d, n=2), "batch"),
    "batch_dissonance_jvp": (lambda m, l, d: C.batch_dissonance(m, l, d, n=2, mode="jvp"), "batch"),
    "rank_input": (lambda m, l, d: C.relative_gradient_rank(m, l, d), "batch"),
    "rank_weight": (lambda m, l, d: C.relative_gradient_rank(m, l, d, wrt="weight"), "batch"),
    "confusion": (lambda m, l, d: C.gradient_confusion(m, l, d), "loader"),
    "diversity": (lambda m, l, d: C.gradient_diversity(m, l, d), "loader"),
    "diversity_per_sample": (lambda m, l, d: C.gradient_diversity(m, l, d, per_sample=True), "batch"),
    "coherence": (lambda m, l, d: C.gradient_coherence(m, l, d), "batch"),
    "efficiency": (lambda m, l, d: C.batch_efficiency_ratio(m, l, d), "loader"),
    "consecutive": (lambda m, l, d: C.consecutive_step_consistency(
        m, l, d, optimizer=torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)), "loader"),
}


@pytest.mark.parametrize("name", list(METRICS))
def test_state_bit_identical_and_value_finite(name):
    f, kind = METRICS[name]
    m = cnn()
    s = state(m)
    out = f(m, LOSS, batch() if kind == "batch" else loader())
    vals = [r.value for r in out.values()] if isinstance(out, dict) else [out.value]
    assert all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in vals)
    d = (next(iter(out.values())) if isinstance(out, dict) else out).to_dict()
    assert set(d) >= {"value", "details", "n", "b", "eta", "mask", "seconds"}
    assert identical(m, s) and m.training and m[1].training


@pytest.mark.parametrize("name", [n for n in METRICS if n != "consecutive"])
def test_zero_gradients_raise(name):
    f, kind = METRICS[name]
    m = cnn()
    s = state(m)
    with pytest.raises(ValueError, match="zero"):
        f(m, ZERO, batch() if kind == "batch" else loader())
    assert identical(m, s) and m.training


@pytest.mark.parametrize("name", list(METRICS))
def test_nonfinite_gradients_raise(name):
    f, kind = METRICS[name]
    m = cnn()
    s = state(m)
    with pytest.raises(ValueError, match="NaN or inf"):
        f(m, NAN, batch() if kind == "batch" else loader())
    assert identical(m, s) and m.training


@pytest.mark.parametrize("name", ["rank_input", "rank_weight", "diversity_per_sample", "coherence", "efficiency"])
def test_single_sample_rejected(name):
    f, _ = METRICS[name]
    m = cnn()
    m.eval()  # a single sample is fine for BN statistics frozen from running buffers; the metric must still refuse
    with pytest.raises(ValueError, match="at least 2 samples"):
        f(m, LOSS, batch(b=1))


@pytest.mark.parametrize("name", ["confusion", "diversity"])
def test_single_batch_rejected(name):
    f, _ = METRICS[name]
    with pytest.raises(ValueError, match="at least 2 batches"):
        f(cnn(), LOSS, batch())
    with pytest.raises(ValueError, match="at least 2 batches"):
        f(cnn(), LOSS, loader(k=1))


def test_argument_errors():
    m, d = cnn(), batch()
    with pytest.raises(ValueError, match="sampler must be one of"):
        C.step_consistency(m, LOSS, d, sampler="adversarial")
    with pytest.raises(ValueError, match="norm must be one of"):
        C.step_consistency(m, LOSS, d, norm="1")
    with pytest.raises(ValueError, match="mode must be one of"):
        C.batch_dissonance(m, LOSS, d, mode="exact")
    with pytest.raises(ValueError, match="eta must be a positive"):
        C.step_consistency(m, LOSS, d, eta=0.0)
    with pytest.raises(ValueError, match="at most 2 directions"):
        C.step_consistency(m, LOSS, d, n=3)
    with pytest.raises(ValueError, match="at least 7 samples"):
        C.step_consistency(m, LOSS, d, sampler="targeted", n=7)
    with pytest.raises(ValueError, match="wrt must be one of"):
        C.relative_gradient_rank(m, LOSS, d, wrt="output")
    with pytest.raises(ValueError, match="floating-point inputs"):
        C.batch_dissonance(m, LOSS, (d[0].long(), d[1]))
    with pytest.raises(TypeError, match="optimizer"):
        C.consecutive_step_consistency(m, LOSS, d, optimizer="sgd")
    with pytest.raises(TypeError, match="Module"):
        C.gradient_coherence("model", LOSS, d)


def test_nan_weights_leave_model_unchanged():
    m = cnn()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
    s = state(m)
    with pytest.raises(ValueError, match="NaN or inf"):
        C.gradient_coherence(m, LOSS, batch())
    assert all(torch.equal(v, s[k]) or (torch.isnan(v) == torch.isnan(s[k])).all() for k, v in m.state_dict().items())
