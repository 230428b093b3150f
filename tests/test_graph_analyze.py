"""CoB structure analysis (gradcond.graph.analyze): free taus, ties, pins, frozen nodes, and exactness on
operations beyond the zoo (grouped/depthwise/dilated/transposed convs, reshapes, splits, padding, pooling...)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond import zoo
from gradcond.graph import analyze
from gradcond.teleport import random_cob, teleport


def _rel(y, y2):
    return float((y - y2).abs().max() / y.abs().max()) if not y.requires_grad else _rel(y.detach(), y2.detach())


def _exact(model, x, sigma=0.95, modes=("intra", "inter"), seeds=(0, 1)):
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    s = analyze(model, x[:2])
    for mode in modes:
        for seed in seeds:
            tp = teleport(model, random_cob(s, sigma, mode, torch.Generator().manual_seed(seed)))
            for train in (False, True):
                a, b = copy.deepcopy(model).train(train), copy.deepcopy(tp).train(train)
                torch.manual_seed(0)
                ya = a(x)
                torch.manual_seed(0)
                yb = b(x)
                assert _rel(ya, yb) < 1e-12, (mode, seed, train, _rel(ya, yb))
    return s


def test_mlp_counts_every_hidden_neuron():
    m = zoo.build("mlp", in_features=5, out_features=3, depth=3, width=[7, 11])
    s = analyze(m, torch.randn(2, 5))
    assert s.num_free == 18  # hidden neurons; input and output neurons have tau = 1
    assert [g.free for g in s.groups] == [7, 11, 0] and s.groups[-1].pinned == 3
    assert set(s.rules) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight"}  # 4.bias: tau_out = 1
    assert not s.frozen and int(s.positive.sum()) == 0


def test_batchnorm_input_pinned_output_free():
    m = zoo.build("mlp", in_features=5, out_features=3, depth=3, width=[7, 11], norm="batch")
    s = analyze(m, torch.randn(2, 5))
    # Linear outputs feed BN (pinned, seed 000 appendix); BN gamma/beta carry the free taus
    assert s.num_free == 18
    assert [(g.name.split(":")[1].strip(), g.free, g.pinned) for g in s.groups] == [
        ("Linear output", 0, 7), ("BatchNorm1d affine output", 7, 0), ("Linear output", 0, 11),
        ("BatchNorm1d affine output", 11, 0), ("Linear output", 0, 3)]
    assert any("BatchNorm input pinned" in p.reason for p in s.pins)
    m2 = zoo.build("mlp", in_features=5, out_features=3, depth=3, width=[7, 11], norm="batch", affine=False)
    assert analyze(m2, torch.randn(2, 5)).num_free == 0


def test_residual_ties_and_skip_matrices():
    w, blocks = 6, 3
    m = zoo.build("resnet_mlp", in_features=4, width=w, blocks=blocks, norm="none", out_features=2)
    s = analyze(m, torch.randn(2, 4))
    assert s.num_free == w * (1 + blocks)  # residual stream (tied across blocks) + one hidden layer per block
    assert sum(g.tied for g in s.groups) == w * blocks
    m = zoo.build("resnet_mlp", in_features=4, width=w, blocks=blocks, norm="none", skip="gaussian", out_features=2)
    assert analyze(m, torch.randn(2, 4)).num_free == w * (1 + 2 * blocks)


def test_attention_ties_q_and_k():
    m = zoo.build("transformer", attention="qkv", d_model=8, nhead=2, num_layers=1, dim_ff=16)
    s = analyze(m, torch.randn(2, 8, 8))
    k_group = [g for g in s.groups if g.node.endswith("attn_k")][0]
    assert k_group.tied == 8 and k_group.free == 0  # tau_k = 1 / tau_q per head dim
    m2 = zoo.build("transformer", attention="mha", d_model=8, nhead=2, num_layers=1, dim_ff=16)
    s2 = analyze(m2, torch.randn(2, 8, 8))
    assert s.num_free == s2.num_free
    # in_proj rows of k scale by 1/tau_q: check on the factors (input = LayerNorm output tau)
    from gradcond.teleport import weight_scale_factors
    c = random_cob(s2, 0.9, "inter", torch.Generator().manual_seed(0))
    f = weight_scale_factors(s2, c)["blocks.0.attn.attn.in_proj_weight"].expand(24, 8)
    # q row r scales by tau_q[r] / tau_in[c], k row r by (1 / tau_q[r]) / tau_in[c]: the product depends on the
    # column only (tau_q * tau_k = 1 per head dim)
    prod = f[:8] * f[8:16]
    torch.testing.assert_close(prod, prod[:1].expand(8, 8), rtol=1e-12, atol=0)
    assert float((f[:8] - f[:8][:1]).abs().max()) > 1e-3  # while q rows do differ


def test_analysis_leaves_model_untouched():
    m = zoo.build("resnet", width=4).train()
    x = torch.randn(4, 1, 8, 8)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    analyze(m, x)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())  # no BN statistics update
    assert all(mod.training for mod in m.modules())
    m.eval()
    analyze(m, x)
    assert not any(mod.training for mod in m.modules())


def test_summary_lists_groups_sites_and_frozen():
    class WithLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.act = nn.Tanh()
            self.fc2 = nn.Linear(6, 6)
            self.rnn = nn.GRU(6, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            h, _ = self.rnn(self.fc2(self.act(self.fc(x))))
            return self.head(torch.einsum("btf->bf", h))

    m = WithLSTM()
    s = analyze(m, torch.randn(2, 3, 4))
    text = str(s)
    assert "rnn (GRU): unsupported module" in text
    assert "einsum" in text and "unsupported function" in text
    assert "tau*f(x/tau)" in text and "act (Tanh)" in text
    assert s.num_free == 6  # fc's outputs; fc2 feeds the frozen GRU, head output is the model output
    assert s.to_dict()["num_free"] == 6 and len(s.to_dict()["frozen"]) == 2
    _exact(m, torch.randn(3, 3, 4))


def test_rewrite_false_pins_or_constrains():
    m = zoo.build("mlp", act="tanh", width=8)
    assert analyze(m, torch.randn(2, 64), rewrite=False).num_free == 0
    m = zoo.build("simple_cnn", channels=(4, 8))
    s = analyze(m, torch.randn(2, 1, 8, 8), rewrite=False)
    assert s.num_free == 12 and bool(s.positive.all()) and not s.sites
    tp = teleport(m, random_cob(s, 0.9, "inter"))
    assert type(tp) is nn.Sequential


class _Kitchen(nn.Module):
    """Operations beyond the zoo: grouped / depthwise / dilated / strided / transposed convs, Conv1d/3d, padding
    modes, reshapes, chunk/split/slicing, cat, avg-pool, upsampling, dropout, PReLU/LeakyReLU/ELU/SiLU/sigmoid
    (module and function forms), GroupNorm, InstanceNorm, embedding + positional parameter, F.linear with a
    parameter, explicit scaled_dot_product_attention, mul by a learned scale, reductions."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.gc = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
        self.prelu = nn.PReLU(12)
        self.ct = nn.ConvTranspose2d(12, 6, 2, stride=2, groups=2)
        self.gn = nn.GroupNorm(3, 6)
        self.lrelu = nn.LeakyReLU(0.1)
        self.c1d = nn.Conv1d(6, 4, 3, padding=1)
        self.c3d = nn.Conv3d(2, 2, 1)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.drop = nn.Dropout(0.3)
        self.w = nn.Parameter(torch.randn(10, 4 * 16))
        self.b = nn.Parameter(torch.randn(10))
        self.emb = nn.Embedding(5, 10)
        self.pos = nn.Parameter(torch.randn(1, 10))
        self.scale = nn.Parameter(torch.rand(10) + 0.5)
        self.q, self.k, self.v = nn.Linear(10, 8), nn.Linear(10, 8), nn.Linear(10, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x, tok):
        h = F.elu(self.c1(x))                                  # (B, 8, 8, 8)
        h = h + self.dw(h)                                      # residual tie through a depthwise conv
        h = self.prelu(self.gc(h))                              # (B, 12, 4, 4)
        a, b = torch.chunk(h, 2, dim=1)
        h = torch.cat([b, F.silu(a)], dim=1)                    # permuted channels
        h = self.lrelu(self.ct(h))                              # (B, 6, 8, 8)
        h = F.avg_pool2d(self.gn(h), 2)                         # (B, 6, 4, 4)
        h = F.interpolate(h, scale_factor=2, mode="nearest")    # (B, 6, 8, 8)
        h = h.flatten(2)                                        # (B, 6, 64)
        h = self.c1d(F.pad(h, (1, 1)))[..., 1:-1]               # (B, 4, 64)
        h3 = self.c3d(h.reshape(h.shape[0], 2, 2, 8, 8))        # Conv3d over a reshaped view
        h = torch.relu(h3.reshape(h.shape[0], 4, 64))
        h = self.inorm(h)[:, :, ::4]                            # (B, 4, 16)
        h = self.drop(h.transpose(1, 2).contiguous().view(h.shape[0], -1))
        z = F.linear(h, self.w, self.b)                         # (B, 10)
        e = self.emb(tok) + self.pos                            # (B, T, 10)
        e = torch.sigmoid(e) * self.scale
        seq = torch.cat([z.unsqueeze(1), e], dim=1)             # (B, 1 + T, 10)
        q = self.q(seq).view(seq.shape[0], -1, 2, 4).transpose(1, 2)
        k = self.k(seq).view(seq.shape[0], -1, 2, 4).transpose(1, 2)
        v = self.v(seq).view(seq.shape[0], -1, 2, 4).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(seq.shape[0], -1, 8)
        return self.out(o.mean(dim=1))


def test_kitchen_sink_exact():
    torch.manual_seed(0)
    m = _Kitchen()
    x = torch.randn(4, 3, 8, 8)
    tok = torch.randint(0, 5, (4, 3))
    m = m.double()
    x = x.double()
    s = analyze(m, (x[:2], tok[:2]))
    assert not s.frozen, str(s)
    assert s.num_free > 50
    for mode in ("intra", "inter"):
        for train in (False, True):
            tp = teleport(m, random_cob(s, 0.95, mode, torch.Generator().manual_seed(1)))
            a, b = copy.deepcopy(m).train(train), copy.deepcopy(tp).train(train)
            torch.manual_seed(0)
            ya = a(x, tok)
            torch.manual_seed(0)
            yb = b(x, tok)
            assert _rel(ya, yb) < 1e-12, (mode, train)


def test_shared_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 6)
            self.shared = nn.Linear(6, 6)
            self.act = nn.Tanh()
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            h = self.act(self.inp(x))
            h = self.act(self.shared(h))
            h = self.act(self.shared(h))  # same weights, same activation module at two sites
            return self.head(h)

    m = Twice()
    s = _exact(m, torch.randn(5, 3))
    # applying `shared` twice ties its input taus to its output taus: one set of 6 taus remains
    assert s.num_free == 6
    tp = teleport(m.double(), random_cob(s, 0.9, "inter"))
    assert isinstance(tp, torch.fx.GraphModule)  # the shared Tanh needs different taus per call site


def test_untraceable_leaf_fallback():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.br = nn.Linear(3, 4), nn.Linear(4, 2), Branchy()

        def forward(self, x):
            return self.b(self.br(torch.relu(self.a(x))))

    with pytest.raises(ValueError, match=r"could not trace Net.*x.sum\(\) > 0.*leaf_modules"):
        analyze(Net(), torch.randn(2, 3))
    s = analyze(Net(), torch.randn(2, 3), leaf_modules=(Branchy,))
    assert s.num_free == 0 and any("br" in f.node for f in s.frozen)


# ------------------------------------------------------------------------------------------------------------
# torch.export fallback (issue 9: "fall back to or offer torch.export where fx fails")
class _ShapeBranchy(nn.Module):
    """fx cannot trace it (Python control flow on shapes); non-strict torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn2 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc1, self.bn, self.act = nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh()
        self.gelu, self.mid = nn.GELU(), nn.Linear(16, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.pos = nn.Parameter(torch.randn(16))
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        if x.dim() == 4:  # shape-dependent control flow
            x = F.avg_pool2d(F.relu(self.bn2(self.conv(x))), 2).flatten(1)
        h = self.gelu(self.bn(self.fc1(x))) + self.pos
        for _ in range(x.shape[1] // 8):  # loop over a shape: `mid` is called twice (a shared residual branch)
            h = h + self.mid(h)
        a, _ = self.mha(h[:, None], h[:, None], h[:, None])
        h = torch.cat([h[:, :8] + a[:, 0, :8], self.act(self.act(a[:, 0, 8:]))], 1)
        return self.fc2(F.relu(h))


def test_export_fallback_shape_control_flow():
    torch.manual_seed(0)
    m = _ShapeBranchy().double()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"torch.fx symbolic tracing.*x.dim\(\) == 4.*tracer='auto'"):
        analyze(m, x[:2], tracer="fx")
    before = _sd(m.train())
    s = _exact(m, x)  # float64, sigma 0.95, intra + inter, train + eval: rel < 1e-12
    assert _same(before, _sd(m)) and m.training  # no BN statistics touched, modes restored
    assert s.tracer.startswith("torch.export") and "x.dim() == 4" in s.tracer
    assert "traced with torch.export (non-strict) fallback" in str(s) and s.to_dict()["tracer"] == s.tracer
    # the leaf calls were collapsed back into modules (mid and act twice each: mid, mid@1, act, act@1): BN affine
    # outputs, the learned position `pos` (a bias), the shared residual Linear, MHA, cat and fc2 are teleported;
    # conv's output feeds a BatchNorm (pinned); the GELU is rewritten; the Tanh called twice is pinned instead
    assert {"bn2.weight", "bn2.bias", "fc1.weight", "bn.weight", "bn.bias", "pos", "mid.weight", "mid.bias",
            "mha.in_proj_weight", "mha.out_proj.weight", "fc2.weight"} <= set(s.rules)
    assert "conv.weight" not in s.rules and not s.frozen
    assert [x.module_path for x in s.sites if x.kind == "scale"] == ["gelu"]
    assert sum("exported (torch.export) graph" in p.reason for p in s.pins) == 2
    # the teleported model is the user's class (GELU wrapped in place), with the same function, also in place
    cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(3))
    tp = teleport(m, cob)
    assert type(tp) is _ShapeBranchy and type(tp.gelu).__name__ == "TeleportedActivation"
    m2 = copy.deepcopy(m).eval()
    y = m2(x)
    teleport(m2, cob, inplace=True)
    assert _rel(y, m2(x)) < 1e-12


@pytest.mark.parametrize("name,kw", [("vgg", dict(batch_norm=True)), ("densenet", dict()),
                                     ("transformer", dict(attention="mha")), ("mlp", dict(act="crelu", norm="lo"))])
def test_export_structure_matches_fx(name, kw):
    """On traceable models, tracer="export" finds the same symmetry as fx: same groups, same teleported params."""
    torch.manual_seed(0)
    m = zoo.build(name, **kw).double()
    x = torch.randn(4, 8, 8) if name == "transformer" else (
        torch.randn(4, 64) if name == "mlp" else torch.randn(4, 1, 8, 8))
    s_fx = analyze(m, x[:2].double())
    s_ex = analyze(m, x[:2].double(), tracer="export")
    stats = lambda s: [(g.size, g.free, g.tied, g.pinned) for g in s.groups]  # noqa: E731
    assert s_ex.num_free == s_fx.num_free and set(s_ex.rules) == set(s_fx.rules) and stats(s_ex) == stats(s_fx)
    assert s_ex.tracer == "torch.export (non-strict), as requested" and not s_ex.frozen
    if kw.get("act") == "crelu":
        # CReLU's F.relu calls are functions: fx rewrites them in a GraphModule when tau < 0; an exported structure
        # is never rewritten, so it keeps those taus positive instead (documented decision)
        assert int(s_fx.positive.sum()) == 0 and int(s_ex.positive.sum()) == s_ex.num_free
    else:
        assert torch.equal(s_ex.positive.sort().values, s_fx.positive.sort().values)
    cob = random_cob(s_ex, 0.9, "inter", torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(m(x.double()), teleport(m, cob)(x.double())) < 1e-12


def test_untraceable_by_both_names_construct_and_fallback():
    class ValueBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: neither fx nor export can follow it
                return self.fc(x)
            return x

    m = ValueBranch()
    before = _sd(m)
    with pytest.raises(ValueError, match=r"could not trace ValueBranch with torch.fx symbolic tracing at .*"
                                         r"x.sum\(\) > 0.*torch.export fallback .* failed too: \w+.*leaf_modules"):
        analyze(m, torch.randn(2, 3))
    assert _same(before, _sd(m))
    with pytest.raises(ValueError, match="could not export ValueBranch with torch.export"):
        analyze(m, torch.randn(2, 3), tracer="export")
    with pytest.raises(ValueError, match="tracer must be 'auto', 'fx' or 'export'"):
        analyze(m, torch.randn(2, 3), tracer="jit")


def _sd(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
