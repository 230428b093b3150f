"""conditioning_summary (issue 26): coherence, step-consistency and the weight-gradient rank from one per-sample
engine equal the three metrics computed one by one."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond import zoo
from gradcond.probes import conditioning as C


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).double()


@pytest.mark.parametrize("case", ["mlp", "bn_cnn_batch", "bn_cnn_eval"])
def test_summary_equals_the_three_metrics_one_by_one(case):
    g = torch.Generator().manual_seed(1)
    if case == "mlp":
        torch.manual_seed(0)
        model = zoo.mlp(10, 3, depth=3, width=16).double()
        x = torch.randn(12, 10, generator=g, dtype=torch.float64)
        bn = "batch"
    else:
        model = _cnn()
        model.train()
        x = torch.randn(12, 1, 6, 6, generator=g, dtype=torch.float64)
        bn = case.rsplit("_", 1)[1]
    y = torch.randint(0, 3, (12,), generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = C.conditioning_summary(model, F.cross_entropy, (x, y), bn=bn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN buffers untouched
    coh = C.gradient_coherence(model, F.cross_entropy, (x, y), bn=bn)
    sc = C.step_consistency(model, F.cross_entropy, (x, y), bn=bn)
    rr = C.relative_gradient_rank(model, F.cross_entropy, (x, y), wrt="weight", bn=bn)
    for name, ref in (("coherence", coh), ("step_consistency", sc), ("relative_rank_weight", rr)):
        got = s[name]
        assert isinstance(got, C.Result) and got.name == ref.name
        assert got.value == pytest.approx(ref.value, rel=1e-9), name
    assert s["step_consistency"].details["ratios"] == pytest.approx(sc.details["ratios"], rel=1e-9)
    assert s["relative_rank_weight"].details["rank"] == pytest.approx(rr.details["rank"], rel=1e-9)


def test_a_metric_that_cannot_be_computed_leaves_the_others():
    """At a minimum of a loss with zero batch gradient (two samples with opposite gradients) coherence is 0 and
    step-consistency divides by the zero gradient: it reports its error, the rank is still computed."""
    lin = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
    x = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    y = torch.tensor([[0.0], [-2.0]], dtype=torch.float64)  # residuals 1 and 1: per-sample grads 2x, summing to 0
    model = nn.Sequential(lin)
    s = C.conditioning_summary(model, F.mse_loss, (x, y))
    assert isinstance(s["step_consistency"], str) and "zero" in s["step_consistency"]
    assert isinstance(s["coherence"], C.Result) and s["coherence"].value == pytest.approx(0.0, abs=1e-12)
    assert isinstance(s["relative_rank_weight"], C.Result)


def test_bad_input():
    model = zoo.mlp(4, 2, depth=2, width=4)
    x, y = torch.randn(3, 4), torch.randint(0, 2, (3,))
    with pytest.raises(ValueError, match=r"bn must be 'batch' or 'eval', got 'train'"):
        C.conditioning_summary(model, F.cross_entropy, (x, y), bn="train")
    with pytest.raises(ValueError, match=r"needs a batch of at least 2 samples, got 1"):
        C.conditioning_summary(model, F.cross_entropy, (x[:1], y[:1]))
    with pytest.raises(ValueError, match=r"eta must be a positive finite number"):
        C.conditioning_summary(model, F.cross_entropy, (x, y), eta=0)
