"""Per-sample gradient norms and Gram matrices from layer identities (gradcond.probes.per_sample.identities, issue 18).

Every identity is checked against per-sample gradients materialised by an explicit per-sample autograd loop (no
torch.func, no engine) in float64 to 1e-10, both ghost and materialised branches and their chunking are exercised, the
fallback is taken and reported for parameters without an identity, and memory does not grow with b × P.
"""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond.probes import per_sample_stats
from gradcond.probes.per_sample.identities import _lin_gram, _lin_sq_norms
from gradcond.probes.per_sample import Engine


def loop_grads(model, loss_fn, x, y):
    """(b, m) per-sample gradients of the eval-mode model, one autograd call per sample."""
    mc = copy.deepcopy(model).eval()
    params = [p for p in mc.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(loss_fn(mc(x[i:i + 1]), y[i:i + 1]), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for p, gi in zip(params, g)]))
    return torch.stack(rows)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def unchanged(model, snap):
    state, flags = snap
    return (all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
            and flags == [m.training for m in model.modules()])


def check(model, x, y, loss_fn=F.cross_entropy, *, bn="eval", fallback=(), identity=None):
    """Ghost norms and Gram equal the materialised loop to 1e-10 (float64); the reported fallback is exactly
    ``fallback``; every other parameter has an identity (whose label contains ``identity`` when given)."""
    ref = loop_grads(model, loss_fn, x, y)
    snap = snapshot(model)
    st = per_sample_stats(model, loss_fn, (x, y), bn=bn)
    assert unchanged(model, snap)
    scale = float((ref ** 2).sum(1).max())
    assert st.sq_norms.dtype == torch.float64 and st.gram.shape == (x.shape[0], x.shape[0])
    assert torch.allclose(st.sq_norms, (ref ** 2).sum(1), rtol=1e-10, atol=1e-12 * scale)
    assert torch.allclose(st.gram, ref @ ref.T, rtol=1e-10, atol=1e-12 * scale)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(st.fallback) == set(fallback), st.fallback
    assert set(st.identities) == set(names) - set(fallback), st.identities
    if identity is not None:
        assert any(identity in v for v in st.identities.values()), st.identities
    # the Engine's methods give the same numbers (one way for the metrics)
    with Engine(model, loss_fn, x, y, bn=bn) as e:
        assert torch.allclose(e.per_sample_sq_norms().double(), st.sq_norms, rtol=1e-12)
        assert torch.allclose(e.per_sample_gram(), st.gram, rtol=1e-12, atol=1e-14 * scale)
    return st


def xy(shape, b=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b,) + shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (b,), generator=g)


class Pool(nn.Module):
    def forward(self, x):
        return x.mean(1)


def test_linear_flat_and_sequence_inputs():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    check(mlp, *xy((5,)), identity="Linear")
    seq = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 6, bias=False), Pool(), nn.Linear(6, 3)).double()
    check(seq, *xy((9, 5)))  # positions: the per-sample gradient sums outer products over the 9 positions


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=1),
    lambda: nn.Conv1d(3, 4, 2, padding="same", dilation=2, padding_mode="circular"),
    lambda: nn.Conv2d(3, 4, 3, padding=1),
    lambda: nn.Conv2d(3, 6, (2, 3), stride=(2, 1), dilation=(1, 2), padding=(1, 2), bias=False),
    lambda: nn.Conv2d(3, 4, 2, padding="same", padding_mode="reflect"),
    lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4, padding_mode="replicate"),  # depthwise with multiplier 2
    # 4+ input channels per group: patches from the channels-last strided view (identities._patches_channels_last)
    lambda: nn.Conv1d(5, 4, 3, stride=2, padding=1, dilation=2),
    lambda: nn.Conv1d(4, 3, 2, padding="same", dilation=2, padding_mode="circular"),
    lambda: nn.Conv2d(4, 6, (2, 3), stride=(2, 1), dilation=(1, 2), padding=(1, 2), bias=False),
    lambda: nn.Conv2d(5, 4, 2, padding="same", padding_mode="reflect"),
    lambda: nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2),
    lambda: nn.Conv2d(4, 3, 3),
])
def test_conv_layers(conv):
    torch.manual_seed(1)
    c = conv()
    one_d = isinstance(c, nn.Conv1d)
    cin = c.in_channels
    model = nn.Sequential(c, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    x, y = xy((cin, 7) if one_d else (cin, 6, 5))
    with torch.no_grad():
        model(x)  # materialise the lazy head
    label = "Conv1d" if one_d else "Conv2d"
    st = check(model, x, y, identity=label + (f" groups={c.groups}" if c.groups > 1 else ""))
    assert st.identities["0.weight"].startswith(label)


def test_embedding_with_padding_idx_and_repeated_tokens():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(11, 5, padding_idx=0), nn.Tanh(), Pool(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 11, (7, 6), generator=g)
    x[0, :3] = 0  # padding tokens get no gradient
    x[1] = 4  # one token repeated: its gradients add up
    y = torch.randint(0, 3, (7,), generator=g)
    st = check(model, x, y, identity="Embedding")
    assert st.identities["0.weight"] == "Embedding"


def test_norm_layers_affine():
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.gn = nn.GroupNorm(2, 4)
            self.lin = nn.Linear(4 * 16, 6)
            self.bn1 = nn.BatchNorm1d(6)
            self.ln = nn.LayerNorm(6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.gn(self.bn(self.conv(x))))
            return self.head(torch.tanh(self.ln(self.bn1(self.lin(h.flatten(1))))))

    model = Net().double()
    with torch.no_grad():  # non-trivial running statistics (eval-mode BN is what the measurement differentiates)
        for m in (model.bn, model.bn1):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
    st = check(model, *xy((2, 4, 4)))
    assert {st.identities[f"{n}.weight"] for n in ("bn", "bn1", "gn", "ln")} == {
        "BatchNorm2d", "BatchNorm1d", "GroupNorm", "LayerNorm"}


def test_batch_statistics_policy_matches_vmap_reference():
    """bn='batch' (statistics frozen from the batch): the identities equal the engine's generic vmap(grad) path."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(48, 3)).double().train()
    x, y = xy((1, 4, 4))
    snap = snapshot(model)
    with Engine(model, F.cross_entropy, x, y, bn="batch", backend="func") as e:
        ref = e.per_sample_matrix()
    st = per_sample_stats(model, F.cross_entropy, (x, y), bn="batch")
    assert unchanged(model, snap)  # running statistics untouched, training flags restored
    assert torch.allclose(st.gram, ref @ ref.T, rtol=1e-10, atol=1e-12 * float((ref ** 2).sum(1).max()))
    assert not st.fallback


class TwiceBN(nn.Module):
    """One BatchNorm1d called twice (its frozen statistics are those of the last call), one BN left in eval mode."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)
        self.bn_eval = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.b(self.bn(torch.tanh(self.bn(self.bn_eval(self.a(x))))))


@pytest.mark.parametrize("build", ["conv_bn", "twice_bn"])
def test_batch_statistics_recorded_by_the_capture_forward_match_the_separate_pass(build):
    """per_sample_stats records bn='batch' statistics in its capture forward (one forward fewer): a fresh model (first
    use: the validation checks run on those statistics) gives the same Gram as the engine's separate statistics pass
    with vmap(grad), and the buffers and flags are untouched. A BN module called twice takes the separate pass."""
    torch.manual_seed(6)
    if build == "conv_bn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3),
                              nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3)).double().train()
        x, y = xy((2, 4, 4), b=7)
    else:
        model = TwiceBN().double().train()
        model.bn_eval.eval()
        with torch.no_grad():
            model.bn_eval.running_mean.uniform_(-1, 1)
            model.bn_eval.running_var.uniform_(0.5, 2)
        x, y = xy((4,), b=7)
    snap = snapshot(model)
    with Engine(model, F.cross_entropy, x, y, bn="batch", backend="func") as e:
        ref = e.per_sample_matrix()
    st = per_sample_stats(model, F.cross_entropy, (x, y), bn="batch")
    assert unchanged(model, snap)
    scale = float((ref ** 2).sum(1).max())
    assert torch.allclose(st.gram, ref @ ref.T, rtol=1e-10, atol=1e-12 * scale)
    assert torch.allclose(st.sq_norms, (ref ** 2).sum(1), rtol=1e-10, atol=1e-12 * scale)
    assert not st.fallback
    # norms alone and a second (validated) call give the same numbers
    again = per_sample_stats(model, F.cross_entropy, (x, y), bn="batch", gram=False)
    assert torch.allclose(again.sq_norms, st.sq_norms, rtol=1e-10, atol=1e-12 * scale)
    assert unchanged(model, snap)


def test_deferred_batch_statistics_when_the_layer_path_gives_up_mid_capture():
    """A train-mode BN model whose capture fails (a keyword-argument call) falls back to vmap(grad) with statistics
    from the separate pass: same Gram as the reference, fallback reported, buffers untouched."""

    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(input=torch.tanh(self.bn(self.a(x))))

    torch.manual_seed(7)
    model = KW().double().train()
    x, y = xy((4,), b=7)
    snap = snapshot(model)
    with Engine(model, F.cross_entropy, x, y, bn="batch", backend="func") as e:
        ref = e.per_sample_matrix()
    st = per_sample_stats(model, F.cross_entropy, (x, y), bn="batch")
    assert unchanged(model, snap)
    assert set(st.fallback) == {n for n, _ in model.named_parameters()}
    assert "called with keyword" in next(iter(st.fallback.values()))
    assert torch.allclose(st.gram, ref @ ref.T, rtol=1e-10, atol=1e-12 * float((ref ** 2).sum(1).max()))


def test_module_called_twice_adds_its_gradients():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.c = nn.Conv1d(1, 1, 3, padding=1)
            self.out = nn.Linear(5, 3)

        def forward(self, x):
            h = torch.tanh(self.a(torch.tanh(self.a(x))))
            h = self.c(self.c(h.unsqueeze(1))).squeeze(1)
            return self.out(h)

    torch.manual_seed(5)
    check(Tied().double(), *xy((5,)))


class Scale(nn.Module):
    """A custom parameter in a bespoke op: no identity, the fallback must be taken."""

    def __init__(self, n):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.s + torch.sin(self.s)


class MaskedLinear(nn.Linear):
    """A Linear subclass with its own forward: the Linear identity would be wrong, so it must not be used."""

    def forward(self, x):
        return F.linear(x, self.weight * torch.tril(torch.ones_like(self.weight)), self.bias)


def test_fallback_is_taken_and_reported_for_layers_without_identity():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), MaskedLinear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    st = check(model, *xy((4,)), fallback={"1.s", "3.weight", "3.bias"})
    assert "Scale" in st.fallback["1.s"] and "materialised" in st.fallback["1.s"]
    assert "MaskedLinear" in st.fallback["3.weight"]


def test_whole_model_fallback_for_root_parameters():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
            self.head = nn.Linear(3, 3).double()

        def forward(self, x):
            return self.head(x @ self.w)

    torch.manual_seed(7)
    st = check(Root(), *xy((4,)), fallback={"w", "head.weight", "head.bias"})
    assert "root" in st.fallback["w"] and "vmap(grad)" in st.fallback["w"]


@pytest.mark.parametrize("c,G,T,C,O", [(5, 1, 1, 7, 3), (5, 1, 2, 30, 40), (5, 2, 9, 4, 3), (4, 3, 6, 50, 2),
                                       (6, 1, 40, 3, 2)])
@pytest.mark.parametrize("budget", [1, 10 ** 9])
def test_reductions_ghost_and_materialised_branches_with_chunking(c, G, T, C, O, budget):
    """Both branches of the Linear/Conv reductions (ghost Σ_{t,s} and materialised), with and without chunking
    (budget 1 element: one sample or one output row at a time), equal the explicit per-sample gradients."""
    g = torch.Generator().manual_seed(c * 100 + T)
    A = torch.randn(c, G, T, C, generator=g, dtype=torch.float64)
    E = torch.randn(c, G, T, O, generator=g, dtype=torch.float64)
    W = torch.einsum("kgto,kgtc->kgoc", E, A).reshape(c, -1)
    Wb = torch.cat([W, E.sum(2).reshape(c, -1)], 1)  # with the bias gradient Σ_t E_t
    for bias, ref in ((False, W), (True, Wb)):
        assert torch.allclose(_lin_sq_norms(A, E, budget, bias), (ref ** 2).sum(1), rtol=1e-12)
        assert torch.allclose(_lin_gram(A, E, budget, bias), ref @ ref.T, rtol=1e-12,
                              atol=1e-12 * float((ref ** 2).sum(1).max()))


def test_float32_agrees_with_float64():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    x, y = xy((1, 4, 4))
    st32 = per_sample_stats(model, F.cross_entropy, (x.float(), y))
    st64 = per_sample_stats(copy.deepcopy(model).double(), F.cross_entropy, (x, y))
    assert st32.gram.dtype == torch.float64
    assert torch.allclose(st32.gram, st64.gram, rtol=1e-4, atol=1e-5 * float(st64.gram.diagonal().max()))
    assert torch.allclose(st32.norms, st64.norms, rtol=1e-4)


def test_bad_arguments():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="needs gram=True or norms=True"):
        per_sample_stats(model, F.cross_entropy, (x, y), gram=False, norms=False)
    with pytest.raises(ValueError, match="bn must be"):
        per_sample_stats(model, F.cross_entropy, (x, y), bn="train")
    st = per_sample_stats(model, F.cross_entropy, (x, y), gram=False)
    assert st.gram is None and st.sq_norms.shape == (4,)


def test_memory_does_not_grow_with_batch_times_parameters():
    """b × P float32 here is 4.3 GB; the identities must measure it within a small fraction of that (peak RSS of a
    fresh process, above the same process's peak after one plain forward+backward)."""
    code = textwrap.dedent("""
        import resource, torch, torch.nn.functional as F
        from torch import nn
        from gradcond.probes import per_sample_stats
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
        x, y = torch.randn(128, 2048), torch.randint(0, 10, (128,))
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        st = per_sample_stats(model, F.cross_entropy, (x, y))
        st = per_sample_stats(model, F.cross_entropy, (x, y))  # after the first-use check
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        P = sum(p.numel() for p in model.parameters())
        print(P * 128 * 4 // 1024, peak - base, not st.fallback)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    bxp_kb, grew_kb, no_fallback = out.stdout.split()
    assert no_fallback == "True"
    # a few parameter-sized temporaries (the first-use check) are fine; b × P (or a fraction of it) is not
    assert int(grew_kb) < int(bxp_kb) / 8, (grew_kb, bxp_kb)


@pytest.mark.parametrize("objective", ["grad_norm", "normalized_grad_norm"])
def test_reduced_cob_objective_equals_the_elementwise_one(objective):
    """optimize_cob's per-step objective (sums of g² over the dimensions a CoB factor broadcasts along, issue 18's
    diagnose speed-up) equals cob_objective's elementwise evaluation on random CoBs, gradient included."""
    from gradcond import zoo
    from gradcond.graph import analyze
    from gradcond.teleport import random_cob
    from gradcond.teleport.optimize import _reduced_objective, cob_objective, gradient_at

    torch.manual_seed(9)
    model = zoo.build("resnet", in_channels=1, num_classes=3, depth=10, width=4).double()
    x, y = xy((1, 8, 8))
    st = analyze(model, x[:2])
    _, grads = gradient_at(model, F.cross_entropy, [(x, y)])
    weights = {n: p.detach() for n, p in model.named_parameters()}
    fast = _reduced_objective(st, weights, grads, objective)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        cob = random_cob(st, 0.5, "intra", gen)
        th = cob.log_abs.detach().clone().requires_grad_(True)
        th2 = th.detach().clone().requires_grad_(True)
        from gradcond.teleport.cob import CoB

        a = fast(CoB.from_vector(st, th, cob.signs))
        b = cob_objective(st, CoB.from_vector(st, th2, cob.signs), weights, grads, objective)
        a.backward()
        b.backward()
        assert torch.allclose(a, b, rtol=1e-12)
        assert torch.allclose(th.grad, th2.grad, rtol=1e-9, atol=1e-12 * float(th2.grad.abs().max()))


def test_sequence_first_layout_with_length_equal_to_batch_is_not_split_wrongly():
    """A layer whose dimension 0 is the sequence, not the sample, passes every shape check when the sequence length
    equals the batch size, and the per-sample gradients of a wrong split still sum to the batch gradient; the
    first-use check against sample 0 evaluated alone must catch it (whole-model fallback, correct values)."""

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):  # x (b, T, 3) -> (T, b, 3): the Linear sees the sequence on dimension 0
            h = torch.tanh(self.lin(x.transpose(0, 1)))
            return self.head(h.mean(0))

    torch.manual_seed(10)
    st = check(SeqFirst().double(), *xy((6, 3), b=6), fallback={"lin.weight", "lin.bias", "head.weight", "head.bias"})
    assert "sample evaluated alone" in st.fallback["lin.weight"]
