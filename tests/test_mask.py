"""LayerwiseMask (seed 004 §1.6): per-layer ceil(fraction·numel) >= 1 coordinates, fixed by the seed."""

import math

import pytest
import torch
from torch import nn

from gradcond.probes.mask import LayerwiseMask


def model():
    return nn.Sequential(nn.Linear(10, 30), nn.LayerNorm(30), nn.Linear(30, 3))


def test_per_layer_counts_round_up_and_stay_in_layer():
    m = model()
    mask = LayerwiseMask(m, 0.05, seed=0)
    offset = 0
    for name, p in m.named_parameters():
        k = mask.layer_sizes[name]
        assert k == max(1, math.ceil(0.05 * p.numel()))
        inside = mask.indices[(mask.indices >= offset) & (mask.indices < offset + p.numel())]
        assert inside.numel() == k and inside.unique().numel() == k
        offset += p.numel()
    assert mask.total == offset and mask.size == sum(mask.layer_sizes.values())
    assert torch.all(mask.indices[1:] > mask.indices[:-1])


def test_fixed_by_seed_and_full_mask_is_identity():
    m = model()
    assert torch.equal(LayerwiseMask(m, 0.1, 3).indices, LayerwiseMask(m, 0.1, 3).indices)
    assert not torch.equal(LayerwiseMask(m, 0.1, 3).indices, LayerwiseMask(m, 0.1, 4).indices)
    full = LayerwiseMask(m, 1.0)
    v = torch.randn(2, full.total)
    assert torch.equal(full(v), v)


def test_apply_gathers_coordinates():
    m = model()
    mask = LayerwiseMask(m, 0.2, 1)
    v = torch.arange(mask.total, dtype=torch.float64)
    assert torch.equal(mask.apply(v), mask.indices.double())
    with pytest.raises(ValueError, match="last dimension"):
        mask.apply(torch.zeros(mask.total + 1))


def test_frozen_parameters_are_excluded():
    m = model()
    m[1].weight.requires_grad_(False)
    mask = LayerwiseMask(m, 0.5)
    assert "1.weight" not in mask.layer_sizes
    assert mask.total == sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True, "0.1", float("nan")])
def test_bad_fraction(bad):
    with pytest.raises(ValueError, match="fraction must be"):
        LayerwiseMask(model(), bad)


def test_layout_check():
    mask = LayerwiseMask(model(), 0.5)
    mask.check(model())
    with pytest.raises(ValueError, match="different parameter layout"):
        mask.check(nn.Linear(3, 3))
