"""k-dilution, Theorem 3 and Prop. 7 (seed 003 §7, F.3, E.7) on residual MLPs."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gradcond.probes.dilution import composed_dilution, dilution_profile, find_blocks
from gradcond.probes.scale import gsc_profile
from gradcond.zoo import resnet_mlp


def _xy(n=2000, d=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    return x, torch.randn(n, d, generator=g, dtype=dtype) / math.sqrt(d)


def test_find_blocks_on_zoo_resnet():
    res = resnet_mlp(32, None, 32, blocks=4, act="tanh", norm="layer", skip="identity", seed=0)
    blocks = find_blocks(res)
    assert [b.name for b in blocks] == ["1", "2", "3", "4"]
    assert all(b.skip_modules == ["%d.skip" % (i + 1)] for i, b in enumerate(blocks))  # nn.Identity modules
    gs = resnet_mlp(32, None, 32, blocks=2, skip="gaussian", seed=0)
    assert find_blocks(gs)[1].skip_modules == ["2.skip"]
    assert find_blocks(nn.Sequential(nn.Linear(3, 3), nn.ReLU())) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_match_manual_computation(dtype):
    res = resnet_mlp(16, None, 16, blocks=3, act="relu", norm="batch", skip="gaussian", seed=1).to(dtype)
    x, y = _xy(n=300, d=16, dtype=dtype)
    before = {k: v.clone() for k, v in res.state_dict().items()}
    dp = dilution_profile(res, (x, y))
    assert all(torch.equal(before[k], v) for k, v in res.state_dict().items())
    # manual: run the blocks by hand, backprop the summed dot error
    u = res[0](x)
    ins, skips, rhos, outs = [], [], [], []
    h = u
    for blk in list(res)[1:4]:
        ins.append(h)
        s, r = blk.skip(h), blk.branch(h)
        o = s + r
        skips.append(s), rhos.append(r), outs.append(o)
        h = o
    f = res[4](h)
    f0 = -(f * y).sum(1)
    q = lambda t: float(t.detach().double().norm(dim=1).pow(2).mean().sqrt())  # noqa: E731
    ql = q(f0[:, None])
    grads = torch.autograd.grad(f0.sum(), outs + ins, retain_graph=True)
    g_out, g_in = grads[:3], grads[3:]
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for b in range(3):
        (gr,) = torch.autograd.grad(rhos[b], ins[b], g_out[b], retain_graph=True)
        k = q(skips[b]) / q(rhos[b])
        r = q(gr) * q(ins[b]) / (q(g_out[b]) * q(rhos[b]))
        growth = (q(g_in[b]) * q(ins[b])) / (q(g_out[b]) * q(outs[b]))
        assert dp.k[b] == pytest.approx(k, rel=tol)
        assert dp.r[b] == pytest.approx(r, rel=tol)
        assert dp.growth[b] == pytest.approx(growth, rel=tol)
        assert dp.gsc_in[b] == pytest.approx(q(g_in[b]) / 4 * q(ins[b]) / ql, rel=tol)
        assert dp.predicted[b] == pytest.approx(math.sqrt((k * k + r * r) / (k * k + 1)), rel=tol)
    # corrected GSC: product of (1 + (k^2+1)(growth-1)) / growth over blocks, applied to the input GSC
    fac = np.prod([(1 + (k * k + 1) * (g - 1)) / g for k, g in zip(dp.k, dp.growth)])
    assert dp.corrected_lowest == pytest.approx(dp.raw_lowest * fac, rel=1e-10)
    # measured composed dilution of all blocks: S_total = product of the skip matrices
    with torch.no_grad():
        st = u
        for blk in list(res)[1:4]:
            st = blk.skip(st)
        km = q(st) / q(outs[-1] - st)
    assert dp.composed_k_measured[-1] == pytest.approx(km, rel=tol)


def test_theorem3_prediction_on_identity_resnet():
    """Theorem 3 per block within 0.03 (notes/003 §4.8: errors 0.001-0.023 on width 100; here width 48)."""
    res = resnet_mlp(48, None, 48, blocks=6, act="tanh", norm="layer", skip="identity", seed=2)
    x, y = _xy(n=3000, d=48, seed=2)
    dp = dilution_profile(res, (x, y))
    assert max(dp.abs_error) <= 0.03
    assert all(g > 1 for g in dp.r)  # layer-tanh branches alone explode
    assert dp.k[-1] > dp.k[0]  # dilution grows along the identity skip path
    # the raw profile agrees with gsc_profile at the first block's input (the first Linear's output)
    assert dp.raw_lowest == pytest.approx(gsc_profile(res, "dot", (x, y))["0"], rel=1e-5)


def test_composed_dilution_formula():
    assert composed_dilution([2.0]) == pytest.approx(2.0)
    # equal k: ((1 + 1/k^2)^B - 1)^(-1/2) ~ k / sqrt(B) for large k (Prop. 7 discussion)
    assert composed_dilution([30.0] * 9) == pytest.approx(30 / 3, rel=0.01)
    assert composed_dilution([1.0, 1.0]) == pytest.approx(1 / math.sqrt(3))


def test_bad_block_names_and_missing_targets():
    res = resnet_mlp(8, None, 8, blocks=2, seed=0)
    x, y = _xy(n=20, d=8)
    with pytest.raises(ValueError, match="unknown block"):
        dilution_profile(res, (x, y), blocks=["7"])
    with pytest.raises(ValueError, match="targets"):
        dilution_profile(res, x)
    with pytest.raises(ValueError, match="no residual block"):
        dilution_profile(nn.Sequential(nn.Linear(8, 8)), (x, y))
    one = dilution_profile(res, (x, y), blocks="2")
    assert one.blocks == ["2"]
