"""Composite ``torch.nn`` modules inside a model are traced into (issue 20 §1), stochastic depth commutes with
channel taus, torch's own copy bug for ``nn.TransformerDecoderLayer`` is repaired, and a failing torch.export
fallback gives one clear error without torch's graph dump on stderr (issue 20 §5)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx
from torch import nn

from gradcond.graph import analyze
from gradcond.graph._modules import repair_deepcopy
from gradcond.teleport import functional_teleport, random_cob, teleport

E, FF, S = 8, 16, 5  # d_model, dim_feedforward, sequence length


def _composite(kind: str, act="relu", batch_first=True, norm_first=False) -> nn.Module:
    kw = dict(dim_feedforward=FF, dropout=0.0, batch_first=batch_first, activation=act, norm_first=norm_first)
    if kind == "encoder_layer":
        return nn.TransformerEncoderLayer(E, 2, **kw)
    if kind == "decoder_layer":
        return nn.TransformerDecoderLayer(E, 2, **kw)
    if kind == "encoder":
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 2, **kw), 2, enable_nested_tensor=False)
    if kind == "decoder":
        return nn.TransformerDecoder(nn.TransformerDecoderLayer(E, 2, **kw), 2)
    return nn.Transformer(E, 2, 1, 1, **kw)


class _Wrapped(nn.Module):
    """Linear -> composite -> Linear: the composite is a submodule, not the root."""

    def __init__(self, kind: str, **kw):
        super().__init__()
        self.two_inputs = kind in ("decoder_layer", "decoder", "transformer")
        self.inp = nn.Linear(E, E)
        self.body = _composite(kind, **kw)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.body(h, 0.5 * h) if self.two_inputs else self.body(h)
        return self.head(h)


def _check_preserved(m: nn.Module, tp: nn.Module, x: torch.Tensor) -> None:
    """f(x) == f_tp(x) (float64, relative 1e-12) in train and eval mode, with and without grad (eval without grad
    takes the fused fast path of nn.TransformerEncoderLayer / nn.MultiheadAttention)."""
    for train in (True, False):
        for grad in (True, False):
            m.train(train)
            tp.train(train)
            with torch.set_grad_enabled(grad):
                ya, yb = m(x).detach(), tp(x).detach()
            err = float((ya - yb).abs().max())
            assert err <= 1e-12 * float(ya.abs().max()), (train, grad, err)


def _moved(m: nn.Module, tp: nn.Module) -> float:
    """Largest relative change of a parameter (parameters matched by name)."""
    new = dict(tp.named_parameters())
    with torch.no_grad():
        return max(float((p - new[n]).norm() / p.norm()) for n, p in m.named_parameters())


KINDS = ["encoder_layer", "decoder_layer", "encoder", "decoder", "transformer"]


@pytest.mark.parametrize("kind", KINDS)
def test_nested_composite_is_traced_and_teleport_preserves_function(kind):
    torch.manual_seed(0)
    m = _Wrapped(kind).double()
    x = torch.randn(3, S, E, dtype=torch.float64)
    s = analyze(m, x[:2])
    assert s.num_free > 0
    assert sum(g.free for g in s.groups if g.node.startswith("body")) > 2 * E  # free taus inside the composite
    assert not [f for f in s.frozen if f.node == "body" or "Transformer" in f.op], s.frozen
    for mode in ("intra", "inter"):
        tp = teleport(m, random_cob(s, 0.9, mode, torch.Generator().manual_seed(1)))
        _check_preserved(m, tp, x)
        assert _moved(m, tp) > 0.1


@pytest.mark.parametrize("kind", ["encoder_layer", "transformer"])
def test_nested_composite_float32(kind):
    torch.manual_seed(0)
    m = _Wrapped(kind).eval()
    x = torch.randn(3, S, E)
    s = analyze(m, x[:2])
    assert s.num_free > 0 and s.tau_dtype == torch.float32
    tp = teleport(m, random_cob(s, 0.5, "intra", torch.Generator().manual_seed(1)))
    with torch.no_grad():
        ya, yb = m(x), tp(x)
    assert yb.dtype == torch.float32
    assert float((ya - yb).abs().max()) <= 1e-4 * float(ya.abs().max())
    assert _moved(m, tp) > 0.05


def test_nested_encoder_layer_free_count_by_hand():
    # post-norm layer between two Linears: q/k dims (E), v dims (E), linear1 output (FF, relu site) and norm2's
    # affine output (E, absorbed by the head) are free; attention output, norm1 and linear2 are tied into the
    # pinned LayerNorm inputs.  3E + FF.  As the root model, norm2's output is the model output (pinned): 2E + FF.
    torch.manual_seed(0)
    x = torch.randn(2, S, E, dtype=torch.float64)
    nested = analyze(_Wrapped("encoder_layer").double(), x)
    root = analyze(_composite("encoder_layer").double(), x)
    assert nested.num_free == 3 * E + FF
    assert root.num_free == 2 * E + FF


def test_nested_decoder_layer_free_count_by_hand():
    # self- and cross-attention q/k and v dims (4E), linear1 output (FF), norm3 affine output (E): 5E + FF
    torch.manual_seed(0)
    s = analyze(_Wrapped("decoder_layer").double(), torch.randn(2, S, E, dtype=torch.float64))
    assert s.num_free == 5 * E + FF


@pytest.mark.parametrize("norm_first", [False, True])
def test_nested_encoder_layer_seq_first_and_pre_norm(norm_first):
    torch.manual_seed(1)
    m = _Wrapped("encoder_layer", batch_first=False, norm_first=norm_first).double()
    x = torch.randn(S, 3, E, dtype=torch.float64)  # (seq, batch, feature)
    s = analyze(m, x[:, :2])
    assert s.num_free > 0
    tp = teleport(m, random_cob(s, 0.9, "inter", torch.Generator().manual_seed(2)))
    _check_preserved(m, tp, x)
    assert _moved(m, tp) > 0.1


@pytest.mark.parametrize("kind", ["encoder_layer", "encoder"])
@pytest.mark.parametrize("act", [nn.GELU, nn.Tanh])
def test_activation_module_inside_encoder_layer_survives_fast_path(kind, act):
    # In eval mode without grad, nn.TransformerEncoderLayer runs a fused kernel that applies relu/gelu from a flag
    # and never calls self.activation: a wrapped activation module would be ignored there.
    torch.manual_seed(2)
    m = _Wrapped(kind, act=act()).double()
    x = torch.randn(3, S, E, dtype=torch.float64)
    s = analyze(m, x[:2])
    tp = teleport(m, random_cob(s, 0.9, "inter", torch.Generator().manual_seed(3)))
    _check_preserved(m, tp, x)
    assert _moved(m, tp) > 0.1


def test_root_encoder_layer_with_gelu_module_survives_fast_path():
    torch.manual_seed(3)
    m = _composite("encoder_layer", act=nn.GELU()).double()
    x = torch.randn(3, S, E, dtype=torch.float64)
    s = analyze(m, x[:2])
    tp = teleport(m, random_cob(s, 0.9, "inter", torch.Generator().manual_seed(4)))
    _check_preserved(m, tp, x)


@pytest.mark.parametrize("kind", ["decoder_layer", "decoder"])
def test_decoder_layer_with_activation_module(kind):
    # torch's TransformerDecoderLayer.__setstate__ shadows a module activation with F.relu on deepcopy; teleport
    # must still return the same function (the tanh, not a relu)
    torch.manual_seed(4)
    m = _Wrapped(kind, act=nn.Tanh()).double()
    x = torch.randn(3, S, E, dtype=torch.float64)
    s = analyze(m, x[:2])
    tp = teleport(m, random_cob(s, 0.9, "inter", torch.Generator().manual_seed(5)))
    _check_preserved(m, tp, x)


def test_functional_teleport_of_decoder_layer_with_activation_module():
    torch.manual_seed(4)
    m = _Wrapped("decoder_layer", act=nn.Tanh()).double().eval()
    x = torch.randn(3, S, E, dtype=torch.float64)
    s = analyze(m, x[:2])
    ft = functional_teleport(m, s)
    cob = random_cob(s, 0.9, "inter", torch.Generator().manual_seed(5))
    with torch.no_grad():
        ya, yb = m(x), ft(cob, x)
    assert float((ya - yb).abs().max()) <= 1e-12 * float(ya.abs().max())


def test_repair_deepcopy_restores_shadowed_activation_module():
    layer = nn.TransformerDecoderLayer(E, 2, FF, dropout=0.0, batch_first=True, activation=nn.Tanh())
    fixed = repair_deepcopy(layer, copy.deepcopy(layer))
    assert isinstance(fixed.activation, nn.Tanh)
    assert fixed.activation is fixed._modules["activation"]
    x, mem = torch.randn(2, S, E), torch.randn(2, S, E)
    torch.testing.assert_close(fixed(x, mem), layer(x, mem), rtol=0, atol=0)
    # attributes the source itself holds in its instance dict are kept
    enc = nn.TransformerEncoderLayer(E, 2, FF, dropout=0.0)
    enc_copy = repair_deepcopy(enc, copy.deepcopy(enc))
    assert enc_copy.activation is enc.activation  # F.relu, a function in the instance dict


class _Masked(nn.Module):
    """Linear -> ReLU -> Linear -> composite called with a causal mask and a key padding mask -> Linear."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.pre = nn.Sequential(nn.Linear(E, 12), nn.ReLU(), nn.Linear(12, E))
        self.body = _composite(kind)
        self.head = nn.Linear(E, 3)

    def forward(self, x, pad):
        h = self.pre(x)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        if self.kind == "encoder_layer":
            h = self.body(h, src_mask=causal, src_key_padding_mask=pad)
        elif self.kind == "encoder":
            h = self.body(h, mask=causal, src_key_padding_mask=pad)
        else:
            h = self.body(h, h, tgt_mask=causal, tgt_key_padding_mask=pad, memory_key_padding_mask=pad)
        return self.head(h)


def _masked_inputs():
    x = torch.randn(3, S, E, dtype=torch.float64)
    pad = torch.zeros(3, S, dtype=torch.float64)  # additive, like the causal mask (mixed mask types are deprecated)
    pad[0, 3:] = -math.inf
    pad[1, 4:] = -math.inf
    return x, pad


@pytest.mark.parametrize("kind", ["encoder_layer", "decoder_layer"])
def test_nested_layer_with_masks_traced_into(kind):
    torch.manual_seed(7)
    m = _Masked(kind).double()
    x, pad = _masked_inputs()
    s = analyze(m, (x[:2], pad[:2]))
    assert not [f for f in s.frozen if f.node == "body"]
    assert s.num_free > 12  # more than the 12 hidden units of `pre`
    tp = teleport(m, random_cob(s, 0.9, "inter", torch.Generator().manual_seed(8)))
    _check_preserved_masked(m, tp, x, pad)


@pytest.mark.parametrize("kind,tracer", [("encoder", "auto"), ("encoder", "fx"), ("transformer", "auto")])
def test_composite_that_cannot_be_traced_into_is_kept_as_frozen_leaf(kind, tracer):
    # nn.TransformerEncoder compares a given mask with a causal one (data-dependent): neither fx nor torch.export
    # can trace into it, so it is kept as a frozen leaf, as before composites were traced into -- and said so
    torch.manual_seed(7)
    m = _Masked(kind).double()
    x, pad = _masked_inputs()
    s = analyze(m, (x[:2], pad[:2]), tracer=tracer)
    assert [f.reason for f in s.frozen if f.node == "body"] == [
        "torch.nn composite kept as a leaf (leaf_modules, or tracing into it failed: see the tracer line); "
        "inputs/outputs pinned"]
    assert s.tracer.startswith("torch.fx symbolic tracing; nested torch.nn composites kept as frozen leaves: "
                               "tracing into them failed at ")
    assert s.num_free == 12  # the ReLU units of `pre`; its output feeds the frozen composite (pinned)
    tp = teleport(m, random_cob(s, 0.9, "inter", torch.Generator().manual_seed(8)))
    _check_preserved_masked(m, tp, x, pad)
    assert _moved(m, tp) > 0.1


def _check_preserved_masked(m, tp, x, pad):
    for train in (True, False):
        for grad in (True, False):
            m.train(train)
            tp.train(train)
            with torch.set_grad_enabled(grad):
                ya, yb = m(x, pad).detach(), tp(x, pad).detach()
            assert float((ya - yb).abs().max()) <= 1e-12 * float(ya.abs().max()), (train, grad)


def test_composite_kept_as_leaf_on_request():
    torch.manual_seed(5)
    m = _Wrapped("encoder_layer").double()
    s = analyze(m, torch.randn(2, S, E, dtype=torch.float64), leaf_modules=(nn.TransformerEncoderLayer,))
    assert [(f.node, f.op) for f in s.frozen] == [("body", "TransformerEncoderLayer")]


def test_mha_fast_path_setting_restored():
    assert torch.backends.mha.get_fastpath_enabled()
    analyze(_Wrapped("encoder").double(), torch.randn(2, S, E, dtype=torch.float64))
    assert torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        analyze(_Wrapped("encoder_layer").double(), torch.randn(2, S, E, dtype=torch.float64))
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


# ---------------------------------------------------------------------------------------------------------
# stochastic depth (torchvision is not a dependency: a faithful copy, recognised by module and name)

def stochastic_depth(input, p, mode, training=True):
    """Copy of ``torchvision.ops.stochastic_depth``."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")  # as torchvision does


def _not_torchvision(input, p, mode, training=True):
    return stochastic_depth(input, p, mode, training)


_not_torchvision.__name__ = "stochastic_depth"  # same name, wrong module: not recognised
torch.fx.wrap("_not_torchvision")


class StochasticDepth(nn.Module):
    """Copy of ``torchvision.ops.StochasticDepth``."""

    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input):
        return stochastic_depth(input, self.p, self.mode, self.training)


StochasticDepth.__module__ = "torchvision.ops.stochastic_depth"


class _SDNet(nn.Module):
    """Conv stem, two residual blocks with stochastic depth (function or module), pooled head."""

    def __init__(self, how: str, mode: str, p: float = 0.5):
        super().__init__()
        self.how, self.mode, self.p = how, mode, p
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 1)) for _ in range(2))
        self.sd = nn.ModuleList(StochasticDepth(p, mode) for _ in range(2))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        for blk, sd in zip(self.blocks, self.sd):
            r = blk(h)
            if self.how == "function":
                r = stochastic_depth(r, self.p, self.mode, self.training)
            elif self.how == "other":
                r = _not_torchvision(r, self.p, self.mode, self.training)
            elif self.how == "module":
                r = sd(r)
            h = h + r
        return self.head(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("how,leaf", [("function", ()), ("module", ()), ("module", (StochasticDepth,))])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_commutes_with_taus(how, leaf, mode):
    torch.manual_seed(6)
    m = _SDNet(how, mode).double().train()
    x = torch.randn(8, 2, 6, 6, dtype=torch.float64)
    s = analyze(m, x[:2], leaf_modules=leaf)
    assert s.frozen == []
    base = analyze(_SDNet("none", mode).double(), x[:2])  # no stochastic depth at all: same free taus
    assert s.num_free == base.num_free > 0
    tp = teleport(m, random_cob(s, 0.9, "inter", torch.Generator().manual_seed(7)))
    assert type(tp) is _SDNet and _moved(m, tp) > 0.1
    for train in (True, False):
        m.train(train)
        tp.train(train)
        with torch.no_grad():
            torch.manual_seed(11)
            ya = m(x)
            torch.manual_seed(11)
            yb = tp(x)
            torch.manual_seed(12)
            yc = m(x)
        assert float((ya - yb).abs().max()) <= 1e-12 * float(ya.abs().max())
        if train:  # the noise is live: another seed gives another output, so the agreement above is not vacuous
            assert float((ya - yc).abs().max()) > 1e-3


def test_stochastic_depth_lookalike_from_another_module_is_frozen():
    torch.manual_seed(6)
    m = _SDNet("other", "row").double().train()
    s = analyze(m, torch.randn(2, 2, 6, 6, dtype=torch.float64))
    assert [f.op for f in s.frozen] == ["stochastic_depth", "stochastic_depth"]


def test_analyze_does_not_draw_from_the_rng_for_stochastic_depth():
    m = _SDNet("function", "row").double().train()  # traced in train mode: graph holds training=True
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    torch.manual_seed(13)
    analyze(m, x)
    after = torch.rand(4)
    torch.manual_seed(13)
    assert torch.equal(after, torch.rand(4))


# ---------------------------------------------------------------------------------------------------------
# data-dependent control flow: one clear error, no graph dump

class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # depends on values: neither fx nor export can trace it
            h = torch.relu(h)
        return self.b(h)


def test_data_dependent_control_flow_one_clear_error(capfd):
    with pytest.raises(ValueError) as info:
        analyze(_DataDependent(), torch.randn(2, 4))
    msg = str(info.value)
    assert msg.startswith("analyze could not trace _DataDependent with torch.fx symbolic tracing at ")
    assert "(if h.sum() > 0:  # depends on values" in msg
    assert "the torch.export fallback (non-strict export on example_input) failed too: " \
           "GuardOnDataDependentSymNode: Could not guard on data-dependent expression" in msg
    out, err = capfd.readouterr()
    assert "def forward" not in err and "Unable to find user code" not in err
    assert len(err.splitlines()) <= 2, err


def test_export_output_replayed_on_success(capfd):
    # the quiet context only drops torch's output when export fails; a successful export prints as before
    import sys

    from gradcond.graph import _export

    with _export._quiet():
        print("kept", file=sys.stderr)
    assert capfd.readouterr().err == "kept\n"
    with pytest.raises(RuntimeError):
        with _export._quiet():
            print("dropped", file=sys.stderr)
            raise RuntimeError("boom")
    assert capfd.readouterr().err == ""
