"""Property-based tests: teleportation preserves the function of randomly generated architectures (depths,
widths, activations, norms, residual skips, concatenations, nested transformer encoder layers, conv stacks), for
any CoB (intra and inter, sigma in [0.1, 0.95]), in train and eval mode (float64, max|f - f_tp| / max|f| <
1e-12), and it really moves the weights: some parameter entry changes by a relative amount of the order of the
CoB's largest |tau - 1|."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from gradcond.graph import analyze
from gradcond.teleport import CoB, random_cob, teleport

ACTS = [nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.GELU, nn.SELU, nn.ELU, nn.SiLU, nn.Sigmoid, nn.PReLU, nn.Softplus]
NORMS = ["none", "batch", "layer", "group"]


class _Block(nn.Module):
    """One random block: Linear -> [norm] -> act, optionally with a residual skip, a concatenated branch or a
    nested ``nn.TransformerEncoderLayer`` (2 heads, the block's activation class, the rows of the batch as one
    sequence; in eval mode without grad it runs torch's fused fast path)."""

    def __init__(self, width, out, act, norm, kind):
        super().__init__()
        self.kind = kind
        if kind == "encoder":
            out = 2 * ((out + 1) // 2)  # even: 2 heads
        self.lin = nn.Linear(width, out if kind != "residual" else width)
        w = out if kind != "residual" else width
        self.norm = {"none": nn.Identity(), "batch": nn.BatchNorm1d(w), "layer": nn.LayerNorm(w),
                     "group": nn.GroupNorm(1, w)}[norm]
        self.act = act()
        if kind == "concat":
            self.side = nn.Linear(width, 3)
        if kind == "encoder":
            self.enc = nn.TransformerEncoderLayer(w, 2, dim_feedforward=w + 1, dropout=0.0, activation=act(),
                                                  batch_first=True)

    def forward(self, x):
        h = self.act(self.norm(self.lin(x)))
        if self.kind == "residual":
            return x + h
        if self.kind == "concat":
            return torch.cat([h, torch.relu(self.side(x))], dim=-1)
        if self.kind == "encoder":
            return self.enc(h.unsqueeze(0)).squeeze(0)
        return h

    def out_width(self, width, out):
        return {"residual": width, "concat": out + 3, "plain": out, "encoder": 2 * ((out + 1) // 2)}[self.kind]


class _RandomNet(nn.Module):
    def __init__(self, d_in, spec, d_out):
        super().__init__()
        blocks, w = [], d_in
        for out, act, norm, kind in spec:
            b = _Block(w, out, act, norm, kind)
            blocks.append(b)
            w = b.out_width(w, out)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(w, d_out)

    def forward(self, x):
        return self.head(self.blocks(x))


def _assert_moved(m: nn.Module, tp: nn.Module, cob, sigma: float) -> None:
    """Teleport is not a no-op: the largest elementwise relative change of a parameter is at least
    max|tau - 1| / (1 + sigma) / 2.  Why: every free tau class contains the output of a layer with a bias (Linear,
    Conv, the attention in-projection) or an affine norm -- the only places atoms are created here -- whose bias
    entry is multiplied by tau or, through an inverted tie (attention q = 1/k), 1 / tau, and
    |1/tau - 1| >= |tau - 1| / (1 + sigma)."""
    if cob.structure.num_free == 0:
        return
    dev = float((cob.tau.double() - 1).abs().max())
    new = dict(tp.named_parameters())
    moved = 0.0
    with torch.no_grad():
        for name, p in m.named_parameters():
            owner, _, leaf = name.rpartition(".")
            q = new[name] if name in new else new[f"{owner}.inner.{leaf}"]  # a wrapped PReLU's slope
            nz = p != 0
            if bool(nz.any()):
                moved = max(moved, float((q[nz] / p[nz] - 1).abs().max()))
    assert moved >= 0.5 * dev / (1 + sigma) - 1e-12, (moved, dev)


def _bn_cancellation(model: nn.Module, x: torch.Tensor) -> float:
    """Rounding amplification of train-mode BatchNorm on this batch: the product over BN layers of
    max_c max|x_c| / sqrt(var_c + eps).  Why: BN subtracts the batch mean, so when a channel's inputs nearly agree
    (a 6-sample batch through width-2 ReLU layers often collapses to one value) the rounding error of x, about
    eps*|x|, is divided by the tiny batch std; the teleport is exact, its rounding is not.  Measured on a copy, so
    the running statistics of the models compared are untouched."""
    probe, amp = copy.deepcopy(model).train(), [1.0]

    def hook(mod, inp, out):
        z = inp[0].transpose(0, 1).reshape(inp[0].shape[1], -1)
        ratio = z.abs().amax(1) / (z.var(1, unbiased=False) + mod.eps).sqrt()
        amp[0] *= max(1.0, float(ratio.max()))

    for mod in probe.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        probe(x)
    return amp[0]


block_spec = st.tuples(st.integers(2, 9), st.sampled_from(ACTS), st.sampled_from(NORMS),
                       st.sampled_from(["plain", "residual", "concat", "encoder"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(block_spec, min_size=1, max_size=5), d_in=st.integers(1, 6), d_out=st.integers(1, 4),
       sigma=st.floats(0.1, 0.95), mode=st.sampled_from(["intra", "inter"]), seed=st.integers(0, 2**16),
       train=st.booleans())
def test_random_mlps_function_preserved(spec, d_in, d_out, sigma, mode, seed, train):
    torch.manual_seed(seed)
    m = _RandomNet(d_in, spec, d_out).double()
    x = torch.randn(6, d_in, dtype=torch.float64)
    s = analyze(m, x[:2])
    cob = random_cob(s, sigma, mode, torch.Generator().manual_seed(seed))
    tp = teleport(m, cob)
    a, b = copy.deepcopy(m).train(train), copy.deepcopy(tp).train(train)
    amp = _bn_cancellation(a, x) if train else 1.0
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert float((ya - yb).abs().max()) <= 1e-12 * amp * float(ya.abs().max()) + 1e-300
    _assert_moved(m, tp, cob, sigma)
    # the analysis never leaves a hidden Linear/BN output unaccounted: free + tied + pinned = size
    assert all(g.free + g.tied + g.pinned == g.size for g in s.groups)


class _RandomCNN(nn.Module):
    def __init__(self, chans, pools, acts, bns, groups):
        super().__init__()
        layers, c = [], 2
        for co, pool, act, bn, g in zip(chans, pools, acts, bns, groups):
            g = g if (c % g == 0 and co % g == 0) else 1
            layers.append(nn.Conv2d(c, co, 3, padding=1, groups=g))
            if bn:
                layers.append(nn.BatchNorm2d(co))
            layers.append(act())
            if pool == "max":
                layers.append(nn.MaxPool2d(2))
            elif pool == "avg":
                layers.append(nn.AvgPool2d(2))
            c = co
        size = 8 // 2 ** sum(p != "none" for p in pools)
        layers += [nn.Flatten(), nn.Linear(c * size * size, 3)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), data=st.data(), sigma=st.floats(0.1, 0.95), mode=st.sampled_from(["intra", "inter"]),
       seed=st.integers(0, 2**16), train=st.booleans())
def test_random_cnns_function_preserved(n, data, sigma, mode, seed, train):
    chans = data.draw(st.lists(st.sampled_from([2, 4, 6]), min_size=n, max_size=n))
    pools = data.draw(st.lists(st.sampled_from(["none", "max", "avg"]), min_size=n, max_size=n))
    acts = data.draw(st.lists(st.sampled_from(ACTS[:5]), min_size=n, max_size=n))
    bns = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    groups = data.draw(st.lists(st.sampled_from([1, 2]), min_size=n, max_size=n))
    torch.manual_seed(seed)
    m = _RandomCNN(chans, pools, acts, bns, groups).double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    s = analyze(m, x[:2])
    cob = random_cob(s, sigma, mode, torch.Generator().manual_seed(seed))
    tp = teleport(m, cob)
    a, b = copy.deepcopy(m).train(train), copy.deepcopy(tp).train(train)
    amp = _bn_cancellation(a, x) if train else 1.0
    with torch.no_grad():
        ya, yb = a(x), b(x)
    assert float((ya - yb).abs().max()) <= 1e-12 * amp * float(ya.abs().max()) + 1e-300
    _assert_moved(m, tp, cob, sigma)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), sigma=st.floats(0.01, 0.99))
def test_inverse_undoes_teleport(seed, sigma):
    torch.manual_seed(seed)
    m = _RandomNet(3, [(5, nn.Tanh, "batch", "plain"), (4, nn.ReLU, "none", "residual")], 2).double()
    s = analyze(m, torch.randn(2, 3, dtype=torch.float64))
    c = random_cob(s, sigma, "inter", torch.Generator().manual_seed(seed))
    back = teleport(teleport(m, c), c.inverse())
    assert type(back) is type(m)
    for p, q in zip(m.parameters(), back.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=0)
    assert isinstance(CoB.identity(s).compose(c), CoB)
