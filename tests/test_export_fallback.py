"""The torch.export fallback of ``analyze`` carries everything the exported program reads (issue 19, item 1), and
models returning something other than a tensor, or called with keyword inputs, work everywhere (item 2).

Small hand-written models, no optional dependency: forwards that build tensors from Python values (lifted
constants), read non-persistent buffers and constant tensor attributes, and branch on shapes (so torch.fx fails and
the export fallback is used).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond.graph import analyze
from gradcond.teleport import TeleportError, random_cob, teleport
from gradcond.utils import output_tensors, select_output, selecting_output, split_inputs


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


class ConstantsAndBranches(nn.Module):
    """fx cannot trace it (``if x.shape[1] > 3``); export lifts ``torch.tensor([...])`` to a constant, reads the
    non-persistent buffer and the plain tensor attribute."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 3)
        self.register_buffer("offset", torch.linspace(-1, 1, 6), persistent=False)
        self.gain = torch.linspace(0.5, 1.5, 6)  # a constant tensor attribute (not a buffer, not a parameter)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if x.shape[1] > 3:  # shape-dependent control flow: torch.fx fails here
            h = h * torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0], dtype=x.dtype)  # a lifted tensor constant
        h = self.fc2(h) * self.gain.to(x.dtype)
        h = torch.tanh(h + self.offset.to(x.dtype))  # the offset pins fc2's output (a non-zero constant is added)
        return self.fc3(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_export_fallback_carries_constants_buffers_attributes(dtype):
    torch.manual_seed(0)
    m = ConstantsAndBranches().to(dtype)
    x = torch.randn(4, 5, dtype=dtype)
    attrs = set(m.__dict__)
    s = analyze(m, x)
    assert "torch.export" in s.tracer and "torch.fx failed" in s.tracer
    assert set(m.__dict__) == attrs  # nothing was set on the user's model (no constants, no forward)
    consts = [n for n, _ in s.graph_module.named_buffers() if n.startswith("_export_const_")]
    assert consts  # the lifted torch.tensor([...]) constant travels with the rebuilt graph
    # fc1's output taus survive (ReLU passes them, the constant multiply commutes); fc2's are pinned by the offset
    assert s.num_free == 6 and "fc1.weight" in s.rules and "fc3.weight" not in s.rules
    tp = teleport(m, random_cob(s, 0.9, "inter", generator=torch.Generator().manual_seed(0)))
    x2 = torch.randn(7, 5, dtype=dtype)
    with torch.no_grad():
        assert _rel(m(x2), tp(x2)) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert not torch.equal(tp.fc1.weight, m.fc1.weight)
    assert torch.equal(tp.offset, m.offset)


def test_rebuilt_graph_runs_like_the_model():
    """The module-level graph of the fallback computes the model's function (constants, buffers, attributes)."""
    torch.manual_seed(1)
    m = ConstantsAndBranches().double()
    x = torch.randn(3, 5, dtype=torch.float64)
    s = analyze(m, x)
    with torch.no_grad():
        torch.testing.assert_close(s.graph_module(x), m(x), rtol=0, atol=1e-14)


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    logits: torch.Tensor


class DictNet(nn.Module):
    """Returns a dict / dataclass / tuple: the first tensor is a hidden state, 'logits' the prediction."""

    def __init__(self, kind="dict"):
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, scale=1.0):
        h = self.b(torch.relu(self.a(x))) * scale
        logits = self.head(torch.relu(h))
        if self.kind == "dict":
            return {"hidden": h, "logits": logits}
        if self.kind == "dataclass":
            return Out(h, logits)
        return (h, logits)


@pytest.mark.parametrize("kind", ["dict", "dataclass", "tuple"])
def test_non_tensor_outputs_default_and_selector(kind):
    torch.manual_seed(2)
    m = DictNet(kind).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    s = analyze(m, x)
    if kind == "tuple":  # no logits field: every tensor is preserved, so the hidden state pins b's outputs
        assert "b.bias" not in s.rules and s.num_free == 8
    else:  # the logits field only: b's outputs are free too
        assert "b.bias" in s.rules and s.num_free == 16
    tp = teleport(m, random_cob(s, 0.9, "inter", generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        a, b = select_output(m(x)), select_output(tp(x))
    assert _rel(a, b) < 1e-12
    # an explicit selector: only the logits (index 1 / name / callable)
    sel = 1 if kind == "tuple" else "logits"
    s2 = analyze(m, x, output=sel)
    assert s2.num_free == 16
    tp2 = teleport(m, random_cob(s2, 0.9, "inter", generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        assert _rel(select_output(m(x), sel), select_output(tp2(x), sel)) < 1e-12
        # the hidden state is not preserved by that structure, and it did change
        assert _rel(select_output(m(x), 0), select_output(tp2(x), 0)) > 1e-3


def test_self_check_compares_only_the_preserved_output():
    """A structure that preserves the logits only passes the self-check although the hidden output changes; a
    structure that preserves everything refuses a CoB taken from the looser one (the model is left unchanged)."""
    torch.manual_seed(3)
    m = DictNet("dict").double()
    x = torch.randn(3, 4, dtype=torch.float64)
    loose = analyze(m, x)
    strict = analyze(m, x, output=lambda o: torch.cat([o["hidden"], o["logits"]], 1))
    assert strict.num_free == 8 < loose.num_free
    cob = random_cob(loose, 0.9, "intra", generator=torch.Generator().manual_seed(0))
    teleport(m, cob)  # fine: the logits are preserved
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    strict.rules, strict.sites = loose.rules, loose.sites  # a structure that claims more than it should
    strict.num_free, strict.positive, strict._cache = loose.num_free, loose.positive, {}
    with pytest.raises(TeleportError, match="deviates by"):
        teleport(m, random_cob(strict, 0.9, "intra", generator=torch.Generator().manual_seed(0)), inplace=True)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_keyword_example_input_fx_and_export():
    torch.manual_seed(4)
    m = DictNet("dict").double()
    x = torch.randn(3, 4, dtype=torch.float64)
    scale = torch.rand(8, dtype=torch.float64) + 0.5
    for tracer in ("fx", "export"):
        s = analyze(m, {"x": x, "scale": scale}, tracer=tracer)
        assert s.example_kwargs is not None and set(s.example_kwargs) == {"x", "scale"}
        tp = teleport(m, random_cob(s, 0.9, "inter", generator=torch.Generator().manual_seed(0)),
                      check_inputs={"x": x, "scale": scale})
        with torch.no_grad():
            assert _rel(m(x, scale=scale)["logits"], tp(x, scale=scale)["logits"]) < 1e-12
    with pytest.raises(ValueError, match="keyword inputs the model's forward does not take: bogus"):
        analyze(m, {"x": x, "bogus": x}, tracer="fx")


def test_select_output_rules_and_errors():
    t = torch.ones(2)
    assert select_output(t) is t
    assert select_output({"a": 1, "b": t}) is t  # first tensor
    assert select_output({"hidden": torch.zeros(1), "logits": t}) is t  # the logits field first
    assert select_output(Out(torch.zeros(1), t)) is t
    assert select_output((torch.zeros(1), t), 1) is t
    assert select_output([torch.zeros(1), t], -1) is t
    assert select_output({"x": t}, lambda o: o["x"] * 2).sum() == 4
    with pytest.raises(ValueError, match=r"the model returned a dict that holds no tensor; pass output="):
        select_output({"a": 1})
    with pytest.raises(ValueError, match=r"output='z' is not a field of the model's dict; its fields are a, b"):
        select_output({"a": t, "b": t}, "z")
    with pytest.raises(ValueError, match=r"output=3 is out of range: the model's tuple holds 2 entries"):
        select_output((t, t), 3)
    with pytest.raises(ValueError, match=r"output='a' selects a int, not a tensor"):
        select_output({"a": 1}, "a")
    with pytest.raises(TypeError, match=r"output must be None \(the 'logits' field"):
        select_output({"a": t}, 1.5)
    with pytest.raises(ValueError, match=r"returned a str, not a tensor"):
        select_output({"a": t}, lambda o: "nope")
    assert [n for n, _ in output_tensors({"h": t, "c": (t, 3)})] == ["output['h']", "output['c'][0]"]
    assert split_inputs({"input_ids": t}) == ((), {"input_ids": t})
    assert split_inputs((t, t)) == ((t, t), {})


def test_selecting_output_context_restores_and_gsc_probe_accepts_dicts():
    from gradcond.probes.scale import gsc_profile

    torch.manual_seed(5)
    m = DictNet("dict").double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with selecting_output(m, "logits"):
        assert isinstance(m(x), torch.Tensor)
    assert "forward" not in m.__dict__ and isinstance(m(x), dict)
    prof = gsc_profile(m, F.cross_entropy, (x, y), output="logits")
    ref = gsc_profile(_LogitsOnly(m), F.cross_entropy, (x, y))  # the same model returning the logits tensor
    assert prof.gsc == pytest.approx(ref.gsc, rel=1e-12)
    assert "forward" not in m.__dict__


class _LogitsOnly(nn.Module):
    """Reference for the probe test: the same submodules, the logits as a tensor (what output='logits' selects)."""

    def __init__(self, inner):
        super().__init__()
        self.a, self.b, self.head = inner.a, inner.b, inner.head

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def test_monitor_probes_accept_a_dict_output():
    """The Monitor's probes see the selected tensor (output=): the same rows as for the tensor-returning twin."""
    from gradcond.monitor import Monitor

    torch.manual_seed(6)
    m = DictNet("dict").double()
    twin = _LogitsOnly(m)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    rows = {}
    for name, model, kw in (("dict", m, {"output": "logits"}), ("tensor", twin, {})):
        mon = Monitor({"gsc": "every:1", "conditioning": "every:1"}, budget=1.0, **kw)
        for _ in range(2):
            mon.step(model, "cross_entropy", (x, y))
        rows[name] = [(r["probe"], r.get("name"), r.get("layer"), r.get("value")) for r in mon.rows]
        assert not [e for e in mon.events if e["kind"] == "probe_failed"]
    assert rows["dict"] and [r[:3] for r in rows["dict"]] == [r[:3] for r in rows["tensor"]]
    assert [r[3] for r in rows["dict"]] == pytest.approx([r[3] for r in rows["tensor"]], rel=1e-9, nan_ok=True)
    assert "forward" not in m.__dict__


class ToyDecoder(nn.Module):
    """A LLaMA-style decoder written by hand (no transformers): hand-written RMSNorm, rotary embeddings from
    non-persistent cos/sin buffers, grouped-query attention (repeat_interleave of k, v), a causal mask applied with
    masked_fill (``sdpa=False``) or ``F.scaled_dot_product_attention(is_causal=True)``, a SwiGLU MLP and an output
    head tied to the input embedding."""

    def __init__(self, vocab=23, d=16, heads=4, kv_heads=2, seq=6, sdpa=False):
        super().__init__()
        self.h, self.kv, self.hd, self.sdpa = heads, kv_heads, d // heads, sdpa
        self.emb = nn.Embedding(vocab, d)
        self.norm_w = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.norm2_w = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.gate = nn.Linear(d, 2 * d, bias=False)
        self.up = nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.norm3_w = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        ang = torch.outer(torch.arange(seq).float(), inv)
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).triu(1), persistent=False)

    @staticmethod
    def rms(x, w, eps=1e-6):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(self, x):
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, ids):
        B, S = ids.shape
        x = self.emb(ids)
        h = self.rms(x, self.norm_w)
        q = self.q(h).view(B, S, self.h, self.hd).transpose(1, 2)
        k = self.k(h).view(B, S, self.kv, self.hd).transpose(1, 2)
        v = self.v(h).view(B, S, self.kv, self.hd).transpose(1, 2)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)  # sequences of the buffers' length
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        k = k.repeat_interleave(self.h // self.kv, dim=1)
        v = v.repeat_interleave(self.h // self.kv, dim=1)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / self.hd ** 0.5
            a = torch.softmax(scores.masked_fill(self.causal, float("-inf")), -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(B, S, -1))
        h = self.rms(x, self.norm2_w)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(self.rms(x, self.norm3_w))


@pytest.mark.parametrize("sdpa", [False, True])
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_decoder_rules_are_exact_without_freezing(tracer, sdpa):
    torch.manual_seed(7)
    m = ToyDecoder(sdpa=sdpa).double()
    ids = torch.randint(0, 23, (2, 6))
    s = analyze(m, ids, tracer=tracer)
    assert s.frozen == []  # every op of the decoder has a rule
    assert s.num_free > 0
    for p in ("q.weight", "k.weight", "v.weight", "o.weight", "norm_w", "norm2_w", "gate.weight"):
        assert p in s.rules, p
    # the tied embedding feeds the residual stream, which the RMSNorms pin: the head side (norm3's output) is pinned
    assert "norm3_w" not in s.rules and any(n.node == "emb.weight" and "tied" in n.reason for n in s.pins)
    assert any("x ** p" in n.reason for n in s.pins)  # RMSNorm's mean(x**2) pins the normalised input
    tp = teleport(m, random_cob(s, 0.9, "inter", generator=torch.Generator().manual_seed(0)))
    ids2 = torch.randint(0, 23, (3, 6))
    with torch.no_grad():
        assert _rel(m(ids2), tp(ids2)) < 1e-12
    assert not torch.equal(tp.q.weight, m.q.weight) and not torch.equal(tp.norm_w, m.norm_w)
