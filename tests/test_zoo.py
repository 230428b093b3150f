import math

import pytest
import torch
from torch import nn

from gradcond import zoo
from gradcond.zoo.layers import LONorm

# (name, kwargs, input builder, output shape)
CASES = [
    ("mlp", {}, lambda d: torch.randn(5, 64, dtype=d), (5, 10)),
    ("resnet_mlp", {"blocks": 3, "width": 32, "in_features": 20, "out_features": 7}, lambda d: torch.randn(5, 20, dtype=d), (5, 7)),
    ("looks_linear_crelu_mlp", {"norm": "batch"}, lambda d: torch.randn(5, 64, dtype=d), (5, 10)),
    ("vgg", {}, lambda d: torch.randn(5, 1, 8, 8, dtype=d), (5, 10)),
    ("vgg", {"batch_norm": False, "in_channels": 3, "cfg": (8, "M", 16)}, lambda d: torch.randn(5, 3, 16, 16, dtype=d), (5, 10)),
    ("resnet", {"depth": 10}, lambda d: torch.randn(5, 1, 8, 8, dtype=d), (5, 10)),
    ("resnet", {"depth": 18, "in_channels": 3, "width": 8}, lambda d: torch.randn(5, 3, 16, 16, dtype=d), (5, 10)),
    ("densenet", {}, lambda d: torch.randn(5, 1, 8, 8, dtype=d), (5, 10)),
    ("simple_cnn", {}, lambda d: torch.randn(5, 1, 8, 8, dtype=d), (5, 10)),
    ("simple_cnn", {"image_size": 28}, lambda d: torch.randn(5, 1, 28, 28, dtype=d), (5, 10)),
    ("transformer", {}, lambda d: torch.randn(5, 8, 8, dtype=d), (5, 10)),
    ("transformer", {"attention": "qkv"}, lambda d: torch.randn(5, 8, 8, dtype=d), (5, 10)),
    ("transformer", {"vocab_size": 11, "in_features": None}, lambda d: torch.randint(0, 11, (5, 8)), (5, 10)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,kw,make_x,shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_forward_shapes(name, kw, make_x, shape, dtype):
    model = zoo.build(name, **kw).to(dtype)
    out = model(make_x(dtype))
    assert out.shape == shape and out.dtype == dtype and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "selu", "elu", "gelu", "crelu"])
@pytest.mark.parametrize("norm", ["none", "batch", "layer", "lo"])
def test_mlp_family(act, norm):
    for dtype in (torch.float32, torch.float64):
        m = zoo.mlp(12, 3, depth=4, width=[6, 8, 10], act=act, norm=norm, init="gaussian", final_norm=True).to(dtype)
        lins = [l for l in m if isinstance(l, nn.Linear)]
        assert len(lins) == 4
        mult = 2 if act == "crelu" else 1
        assert [l.in_features for l in lins] == [12, 6 * mult, 8 * mult, 10 * mult]
        norms = [l for l in m if isinstance(l, (nn.BatchNorm1d, nn.LayerNorm, LONorm))]
        assert len(norms) == (0 if norm == "none" else 4)
        assert m(torch.randn(4, 12, dtype=dtype)).shape == (4, 3)


def test_gaussian_init_variance():
    m = zoo.mlp(400, 400, depth=3, width=400, act="relu", init="gaussian", seed=0)
    lins = [l for l in m if isinstance(l, nn.Linear)]
    # seed 003 I.1: variance 1/fan_in for the first layer, 2/fan_in after a ReLU; 4% tolerance (160k samples)
    assert abs(lins[0].weight.var().item() * 400 - 1.0) < 0.04
    assert abs(lins[1].weight.var().item() * 400 - 2.0) < 0.08
    t = zoo.mlp(400, 400, depth=3, width=400, act="tanh", init="gaussian", seed=0)
    assert abs([l for l in t if isinstance(l, nn.Linear)][1].weight.var().item() * 400 - 1.0) < 0.04


def test_orthogonal_init_is_orthogonal():
    m = zoo.mlp(50, 50, depth=3, width=50, init="orthogonal", seed=1).double()
    for lin in (l for l in m if isinstance(l, nn.Linear)):
        torch.testing.assert_close(lin.weight @ lin.weight.T, torch.eye(50, dtype=torch.float64), atol=1e-6, rtol=0)  # built in float32


def _linearity_error(model, n_in, dtype):
    with torch.no_grad():
        a = model(torch.eye(n_in, dtype=dtype)).T
        x = torch.randn(32, n_in, dtype=dtype)
        fx = model(x)
        return float(((fx - x @ a.T).norm(dim=1) / fx.norm(dim=1)).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("widths", [(20, 30, 40), (100, 100, 100), (8, 64, 6)])
def test_looks_linear_relu_mlp_is_linear_at_init(dtype, widths):
    m = zoo.mlp(10, 5, depth=4, width=list(widths), init="looks_linear", bias=False, seed=2).to(dtype)
    assert _linearity_error(m, 10, dtype) < 1e-5
    # and it is not trivially linear: a Gaussian init of the same net is far from linear
    g = zoo.mlp(10, 5, depth=4, width=list(widths), init="gaussian", bias=False, seed=2).to(dtype)
    assert _linearity_error(g, 10, dtype) > 0.05


def test_looks_linear_pairs_are_mirrored():
    m = zoo.mlp(6, 4, depth=3, width=8, init="looks_linear", bias=False, seed=0)
    w0, w1, w2 = (l.weight for l in m if isinstance(l, nn.Linear))
    torch.testing.assert_close(w0[0::2], -w0[1::2])  # lowest: rows 2i, 2i+1 mirrored
    torch.testing.assert_close(w1[0::2, 0::2], w1[1::2, 1::2])
    torch.testing.assert_close(w1[0::2, 0::2], -w1[0::2, 1::2])
    torch.testing.assert_close(w2[:, 0::2], -w2[:, 1::2])  # highest: columns mirrored


def test_looks_linear_crelu_is_linear_and_mirrored():
    for dtype in (torch.float32, torch.float64):
        m = zoo.looks_linear_crelu_mlp(16, 4, depth=6, width=24, seed=0).to(dtype)
        assert _linearity_error(m, 16, dtype) < 1e-5
    w = [l for l in m if isinstance(l, nn.Linear)][1].weight
    torch.testing.assert_close(w[:, :24], -w[:, 24:])


def test_lonorm_definition():
    x = torch.randn(7, 9, dtype=torch.float64)
    y = LONorm(9)(x)
    torch.testing.assert_close(y.pow(2).mean(1), torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close(LONorm(9)(3.5 * x), y)  # length-only: scale-invariant


def test_resnet_mlp_structure_and_skip():
    m = zoo.resnet_mlp(10, None, width=16, blocks=4, norm="batch", skip="gaussian")
    blocks = [b for b in m if isinstance(b, zoo.ResidualBlock)]
    assert len(blocks) == 4 and all(isinstance(b.skip, nn.Linear) for b in blocks)
    assert sum(isinstance(l, nn.Linear) for l in m.modules()) == 1 + 4 * 2 + 4
    ident = zoo.resnet_mlp(10, None, width=16, blocks=2)
    b = [b for b in ident if isinstance(b, zoo.ResidualBlock)][0]
    x = torch.randn(3, 16)
    torch.testing.assert_close(b(x), x + b.branch(x))


def test_build_errors():
    with pytest.raises(ValueError, match=r"unknown model 'alexnet'; accepted: densenet, .*vgg"):
        zoo.build("alexnet")
    with pytest.raises(ValueError, match=r"unknown option\(s\) colour for model 'mlp'; accepted: in_features"):
        zoo.build("mlp", colour=1)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        zoo.mlp(act="swish")
    with pytest.raises(ValueError, match="even hidden widths"):
        zoo.mlp(width=7, init="looks_linear")
    with pytest.raises(ValueError, match="resnet depth must be one of 10, 18"):
        zoo.resnet(depth=34)
    with pytest.raises(ValueError, match="too small"):
        zoo.simple_cnn(image_size=4)


def test_models_are_plain_torch_and_traceable():
    import torch.fx as fx

    for name in zoo.names():
        m = zoo.build(name)
        fx.symbolic_trace(m)
        assert isinstance(m, nn.Module)
        assert math.isfinite(sum(float(p.sum()) for p in m.parameters()))
