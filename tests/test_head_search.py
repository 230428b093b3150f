"""Decision-block search with a memory target (issue 28 item 3; seed 002 §6.2.2, Table 6.3: 30 +- 0.5 %)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradcond import zoo
from gradcond.train.layerwise import MemoryReport, NoHeadFits, fit_layerwise, make_head, memory_accounting, search_head


def _params(head: nn.Module) -> int:
    return sum(p.numel() for p in head.parameters())


def test_search_lands_in_the_band_with_the_deepest_widest_head_on_a_synthetic_cost():
    """Memory = parameters of the head (bytes, as a MemoryReport): the search must find, for every depth, the widest
    head under the band's top, and pick a head inside the band (independent check: the parameter count)."""
    shape = (8, 8, 8)

    def measure(head):
        return MemoryReport(_params(head), 0, 0, 0)

    ref = 10_000
    head, cfg, rep, log = search_head(shape, 5, measure, ref, target=0.30, tolerance=0.005, max_decision_convs=2)
    assert 0.295 <= rep.total / ref <= 0.305
    assert rep.total == _params(head) == _params(make_head(shape, 5, cfg))
    choice = log[-1]
    assert choice["in_band"] and choice["chosen"] == cfg and "in the band" in choice["reason"]
    measured = log[:-1]
    # the choice is the deepest head in the band, and among equals the least pooled and the widest
    in_band = [e for e in measured if 0.295 <= e["ratio"] <= 0.305]
    best = max(in_band, key=lambda e: (e["config"]["convs"], -e["config"].get("down_pool", 0),
                                       e["config"].get("width") or 0))
    assert (best["config"]["convs"], best["config"].get("down_pool", 0)) == (cfg["convs"], cfg.get("down_pool", 0))
    # for the chosen depth/pooling, one channel more would leave the band
    wider = make_head(shape, 5, {**cfg, "width": cfg["width"] + 1})
    assert _params(wider) / ref > 0.305
    assert all({"config", "bytes", "ratio"} <= set(e) for e in measured)


def test_search_misses_a_target_below_every_head_clearly_and_reports_a_miss():
    shape = (4, 4, 4)

    def measure(head):
        return MemoryReport(_params(head) + 1000, 0, 0, 0)  # a fixed 1,000 bytes of block and feednet

    with pytest.raises(NoHeadFits, match=r"^no decision head meets the memory target of 1 \+- 0\.5 % of full "
                                         r"backprop: the cheapest \(.*\) needs \d+\.\d %; raise the target or lower "
                                         r"the batch size\.$"):
        search_head(shape, 3, measure, 10_000, target=0.01, tolerance=0.005)
    # a target above every head: the largest head is taken and the log says the target was missed
    head, cfg, rep, log = search_head(shape, 3, measure, 10_000, target=0.9, tolerance=0.005, max_decision_convs=1)
    assert not log[-1]["in_band"] and "target missed" in log[-1]["reason"]
    assert rep.total / 10_000 < 0.895 and rep.total == max(e["bytes"] for e in log[:-1])


def test_fit_layerwise_memory_target_on_a_cnn_logs_and_measures_its_choice():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    tr = DataLoader(TensorDataset(x, y), batch_size=32)
    torch.manual_seed(0)
    model = zoo.simple_cnn(in_channels=1, num_classes=2, channels=(4, 8), image_size=8)
    res = fit_layerwise(model, tr, tr, epochs=1, memory_target=0.8, memory_tolerance=0.02, max_decision_convs=2,
                        progress_bar=False)
    assert len(res.head_search) == len(res.memory)
    for i, log in enumerate(res.head_search):
        assert log and "chosen" in log[-1]
        choice = log[-1]
        assert choice["chosen"] == res.head_configs[i]
        # the ratio the search logged is the step's memory over full backprop's, recomputed here
        assert choice["ratio"] == pytest.approx(res.memory[i].total / res.backprop_memory.total, rel=1e-12)
        assert choice["ratio"] <= 0.82
        if choice["in_band"]:
            assert 0.78 <= choice["ratio"]
    assert "head search, depth 1:" in res.summary()
    with pytest.raises(ValueError, match=r"^pass memory_budget \(a cap\) or memory_target \(a target to land on\), "
                                         r"not both\.$"):
        fit_layerwise(model, tr, tr, memory_budget=0.5, memory_target=0.3, progress_bar=False)
    with pytest.raises(ValueError, match=r"^memory_tolerance must be a number in \[0, memory_target\), got 0\.5\.$"):
        fit_layerwise(model, tr, tr, memory_target=0.3, memory_tolerance=0.5, progress_bar=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NoHeadFits, match=r"^block 0: no decision head meets the memory target of 0\.1 \+- 0\.05 %"):
        fit_layerwise(model, tr, tr, memory_target=0.001, memory_tolerance=0.0005, progress_bar=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused, model untouched


def test_flat_features_search_hidden_width_and_depth():
    def measure(head):
        return MemoryReport(_params(head), 0, 0, 0)

    head, cfg, rep, log = search_head((32,), 4, measure, 4_000, target=0.5, tolerance=0.01, max_decision_convs=2)
    assert cfg["kind"] == "linear" and log[-1]["in_band"] and 0.49 <= _params(head) / 4_000 <= 0.51
    in_band = [e["config"] for e in log[:-1] if 0.49 <= e["ratio"] <= 0.51]
    assert cfg["convs"] == max(c["convs"] for c in in_band)  # the deepest head in the band
    # hand count: depth 2 of width w has w^2 + 38 w + 4 parameters (1,947 at w = 29, 2,044 at 30: both outside the
    # band 1,960-2,040), depth 1 has 37 w + 4 (2,039 at w = 55: inside; 2,076 at 56: above): the widest is 55
    assert (cfg["convs"], cfg["width"]) == (1, 55)
    assert [type(m) for m in head] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    # memory_accounting of a real step agrees with the parameter count plus what it adds (a consistency check)
    rep2 = memory_accounting(head, (torch.zeros(8, 32), torch.zeros(8, dtype=torch.long)), optimizer="sgd")
    assert rep2.parameters == _params(head) * 4
