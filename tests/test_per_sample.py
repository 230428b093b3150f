"""Per-sample engine (gradcond.probes.per_sample) against explicit autograd loops (no torch.func)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond.probes.flat_vectors import flatten, unflatten
from gradcond.probes.per_sample import Engine
from gradcond.utils import as_batch


def mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def cnn(dtype):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12, 3)).to(dtype)


def data(model, b=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    shape = (b, 6) if isinstance(model[0], nn.Linear) else (b, 1, 4, 4)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, 3, (b,), generator=g)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def frozen_copy(model, x):
    """Independent reference for bn='batch': BN with momentum 1 copies the batch statistics into the running
    buffers during one train-mode forward; the unbiased variance is converted to the biased one BN normalizes with."""
    mc = copy.deepcopy(model)
    if model.training:
        bns = [m for m in mc.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.momentum = 1.0
        with torch.no_grad():
            mc(x)
        # elements per channel of each BN input (b*H*W), to turn the unbiased variance into the biased one
        acts = {}
        hs = [m.register_forward_hook(lambda mod, a, o: acts.__setitem__(mod, a[0].numel() / a[0].shape[1]))
              for m in bns]
        mc.eval()
        with torch.no_grad():
            mc(x)
        for h in hs:
            h.remove()
        for m in bns:
            k = acts[m]
            m.running_var.mul_((k - 1) / k)
    mc.eval()
    return mc


def naive_per_sample(model, loss_fn, x, y):
    mc = frozen_copy(model, x)
    rows = []
    for i in range(x.shape[0]):
        mc.zero_grad()
        loss_fn(mc(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in mc.parameters()]).clone())
    return torch.stack(rows)


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_per_sample_weight_grads_match_loop(make, dtype, tol):
    model = make(dtype)
    x, y = data(model, dtype=dtype)
    snap = snapshot(model)
    ref = naive_per_sample(model, F.cross_entropy, x, y)
    with Engine(model, F.cross_entropy, x, y, chunk_size=3) as e:
        G = e.per_sample_matrix()
        sq = e.per_sample_sq_norms()
        gbar = e.batch_grad()
    assert torch.allclose(G, ref, rtol=tol, atol=tol * ref.abs().max())
    assert torch.allclose(sq, (ref ** 2).sum(1), rtol=tol * 10)
    assert torch.allclose(gbar, ref.mean(0), rtol=tol, atol=tol * ref.abs().max())
    assert same_state(model, snap) and model.training


def test_chunk_size_does_not_change_result():
    model = cnn(torch.float64)
    x, y = data(model, b=9)
    with Engine(model, F.cross_entropy, x, y, chunk_size=2) as e:
        a = e.per_sample_matrix()
    with Engine(model, F.cross_entropy, x, y, memory_bytes=10**9) as e:
        assert e.chunk_size >= 9
        b = e.per_sample_matrix()
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_input_grads_match_loop(make):
    model = make(torch.float64)
    x, y = data(model)
    mc = frozen_copy(model, x)
    ref = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone().requires_grad_(True)
        ref.append(torch.autograd.grad(F.cross_entropy(mc(xi), y[i:i + 1]), xi)[0].reshape(-1))
    with Engine(model, F.cross_entropy, x, y) as e:
        H = e.per_sample_matrix(wrt="input")
    assert torch.allclose(H, torch.stack(ref), rtol=1e-10, atol=1e-14)


def test_frozen_batch_statistics_reproduce_train_mode_outputs():
    # bn="batch": per-sample forward equals the train-mode forward of the whole batch.
    model = cnn(torch.float64)
    x, y = data(model)
    train_out = copy.deepcopy(model)(x)
    with Engine(model, F.cross_entropy, x, y) as e:
        from torch.func import functional_call
        per = torch.cat([functional_call(model, ({**e.fixed, **e.w}, e.buffers), (x[i:i + 1],)) for i in range(7)])
    assert torch.allclose(per, train_out, rtol=1e-10, atol=1e-12)


def test_bn_eval_policy_uses_running_statistics():
    model = cnn(torch.float64)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x, y = data(model)
    mc = copy.deepcopy(model).eval()
    ref = []
    for i in range(x.shape[0]):
        mc.zero_grad()
        F.cross_entropy(mc(x[i:i + 1]), y[i:i + 1]).backward()
        ref.append(torch.cat([p.grad.reshape(-1) for p in mc.parameters()]).clone())
    snap = snapshot(model)
    with Engine(model, F.cross_entropy, x, y, bn="eval") as e:
        G = e.per_sample_matrix()
    assert torch.allclose(G, torch.stack(ref), rtol=1e-10, atol=1e-14)
    assert same_state(model, snap)


def test_bn_without_running_stats_is_rejected():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="track_running_stats"):
        with Engine(model, F.cross_entropy, x, y):
            pass
    assert model.training


def test_hvp_matches_double_backward():
    model = mlp(torch.float64)
    x, y = data(model)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    loss = sum(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) for i in range(7)) / 7
    gs = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    g = torch.cat([t.reshape(-1) for t in gs])
    ref = torch.cat([t.reshape(-1) for t in torch.autograd.grad(g @ v, list(model.parameters()))])
    with Engine(model, F.cross_entropy, x, y) as e:
        hv = e.hvp(v)
    assert torch.allclose(hv, ref, rtol=1e-10, atol=1e-13)


def test_flatten_roundtrip_and_bad_length():
    model = mlp(torch.float64)
    w = dict(model.named_parameters())
    names = list(w)
    v = flatten(w, names)
    back = unflatten(v, w, names)
    assert all(torch.equal(back[n], w[n]) for n in names)
    with pytest.raises(ValueError, match="trainable parameters"):
        unflatten(torch.zeros(v.numel() + 1), w, names)


def test_bad_batches_and_arguments():
    model = mlp(torch.float64)
    with pytest.raises(ValueError, match="leading batch dimension"):
        as_batch((torch.zeros(3, 6), torch.zeros(4)))
    with pytest.raises(ValueError, match="batch"):
        as_batch(42)
    with pytest.raises(ValueError, match="bn must be"):
        Engine(model, F.cross_entropy, torch.zeros(2, 6), torch.zeros(2, dtype=torch.long), bn="train")
    with pytest.raises(TypeError, match="loss_fn"):
        Engine(model, None, torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))
    assert as_batch([(torch.zeros(2, 6), torch.zeros(2))])[0].shape == (2, 6)


# ---------------------------------------------------------------------------------------------- layer fast path
class _Seq(nn.Module):
    """Linear on a sequence (T = 4 positions per sample), LayerNorm, GroupNorm (generic vmap(vjp) path), Conv1d."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 6)
        self.ln = nn.LayerNorm(6)
        self.conv = nn.Conv1d(6, 4, 3, padding=1, stride=2, bias=True)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x (b, 4, 3)
        h = self.ln(torch.tanh(self.lin(x)))  # (b, 4, 6)
        h = self.gn(self.conv(h.transpose(1, 2)))  # (b, 4, 2)
        return self.head(h.flatten(1))


class _Tied(nn.Module):
    """The same Linear called twice (per-sample gradients add up over calls)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))


class _ParentReadsChild(nn.Module):
    """A parent that calls its child AND reads the child's weight directly: the fast path must notice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(x) + 0.5 * x[:, :3] @ self.lin.weight[:, :3].T


def _fast_models():
    torch.manual_seed(5)
    strided_cnn = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1), nn.BatchNorm2d(4), nn.ReLU(),
                                nn.Conv2d(4, 3, 2, dilation=2, bias=False), nn.Flatten(), nn.Linear(3, 3))
    return [
        ("mlp", mlp(torch.float64), (6,)),
        ("cnn_bn", cnn(torch.float64), (1, 4, 4)),
        ("strided_cnn", strided_cnn.double(), (2, 6, 6)),
        ("seq", _Seq().double(), (4, 3)),
        ("tied", _Tied().double(), (5,)),
    ]


def _xy(shape, b=6, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b,) + shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


@pytest.mark.parametrize("bn", ["batch", "eval"])
@pytest.mark.parametrize("case", range(5))
def test_fast_path_equals_generic_vmap_grad(case, bn):
    name, model, shape = _fast_models()[case]
    x, y = _xy(shape)
    snap = snapshot(model)
    g = torch.Generator().manual_seed(1)
    with Engine(model, F.cross_entropy, x, y, bn=bn, backend="func") as e:
        ref = e.per_sample_matrix()
        ref_in = e.per_sample_matrix(wrt="input")
        m = e.m
    select = torch.randperm(m, generator=g)[: m // 3]  # unsorted: output order must follow `select`
    for chunk in (None, 4):
        with Engine(model, F.cross_entropy, x, y, bn=bn, chunk_size=chunk) as e:
            assert e.plan.ok, e.plan.reason
            G = e.per_sample_matrix()
            Gs = e.per_sample_matrix(select=select)
            sq = e.per_sample_sq_norms()
            gram = e.per_sample_gram()
            gram_s = e.per_sample_gram(select=select)
            H = e.per_sample_matrix(wrt="input")
        scale = ref.abs().max()
        assert (G - ref).abs().max() <= 1e-10 * scale, name
        assert (Gs - ref[:, select]).abs().max() <= 1e-10 * scale, name
        assert torch.allclose(sq, (ref ** 2).sum(1), rtol=1e-10), name
        assert torch.allclose(gram, ref @ ref.T, rtol=1e-10, atol=1e-12 * float(scale) ** 2), name
        assert torch.allclose(gram_s, ref[:, select] @ ref[:, select].T, rtol=1e-10, atol=1e-12 * float(scale) ** 2)
        assert torch.allclose(H, ref_in, rtol=1e-10, atol=1e-12 * float(ref_in.abs().max()))
    assert same_state(model, snap)


def test_fast_path_falls_back_when_a_parameter_is_used_outside_its_module():
    torch.manual_seed(2)
    model = _ParentReadsChild().double()
    x, y = _xy((5,))
    ref = naive_per_sample(model, F.cross_entropy, x, y)
    with Engine(model, F.cross_entropy, x, y) as e:
        assert e.plan.ok  # structurally fine; the sum check on first use must catch it
        G = e.per_sample_matrix()
        assert not e.plan.ok and "outside" in e.plan.reason
    assert torch.allclose(G, ref, rtol=1e-10, atol=1e-12)
    with Engine(model, F.cross_entropy, x, y) as e:  # remembered for this model
        assert not e.plan.ok


def test_fast_path_falls_back_for_root_parameters_and_bad_backend():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))

        def forward(self, x):
            return x @ self.w

    model = Root()
    x, y = _xy((4,))
    ref = naive_per_sample(model, F.cross_entropy, x, y)
    with Engine(model, F.cross_entropy, x, y) as e:
        assert not e.plan.ok and "root" in e.plan.reason
        assert torch.allclose(e.per_sample_matrix(), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="backend must be"):
        Engine(model, F.cross_entropy, x, y, backend="opacus")


def _dot(o, t):
    from gradcond.train.losses import dot_error
    return dot_error(o, t)


@pytest.mark.parametrize("name", ["F.cross_entropy", "CrossEntropyLoss(label_smoothing)", "ce_probabilities",
                                  "F.mse_loss", "MSELoss", "train.mse", "train.dot", "ce_weighted",
                                  "ce_ignore_index_present", "ce_sum", "lambda"])
def test_batch_mean_loss_shortcut_matches_loop(name):
    """Known batch-mean losses use Σ_i ℓ_i = b·loss_fn(out, y) in the engine's batched pass; everything else is
    evaluated per sample. Both must equal the explicit per-sample loop (float64, rel. 1e-10)."""
    from gradcond.probes.per_sample.plan import is_batch_mean_loss as _is_batch_mean_loss
    from gradcond.train import losses as L

    model = mlp(torch.float64)
    x, yc = data(model)
    g = torch.Generator().manual_seed(5)
    yf = torch.randn(x.shape[0], 3, generator=g, dtype=torch.float64)
    probs = torch.softmax(yf, 1)
    yi = yc.clone()
    yi[2] = 1  # ignore_index=1 below drops sample 2 from the batch mean: not a plain mean
    cases = {
        "F.cross_entropy": (F.cross_entropy, yc, True),
        "CrossEntropyLoss(label_smoothing)": (nn.CrossEntropyLoss(label_smoothing=0.1), yc, True),
        "ce_probabilities": (F.cross_entropy, probs, True),
        "F.mse_loss": (F.mse_loss, yf, True),
        "MSELoss": (nn.MSELoss(), yf, True),
        "train.mse": (L.mse, yf, True),
        "train.dot": (L.dot_error, yf, True),
        "ce_weighted": (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), yc, False),
        "ce_ignore_index_present": (nn.CrossEntropyLoss(ignore_index=1), yi, False),
        "ce_sum": (nn.CrossEntropyLoss(reduction="sum"), yc, False),
        "lambda": (lambda o, t: F.cross_entropy(o, t), yc, False),
    }
    loss_fn, y, shortcut = cases[name]
    with torch.no_grad():
        assert _is_batch_mean_loss(loss_fn, model(x), y) is shortcut
    if name == "ce_ignore_index_present":
        return  # the per-sample loss of an ignored sample is 0/0 (NaN): nothing to compare
    ref = naive_per_sample(model, loss_fn, x, y)
    for backend in ("auto", "func"):
        with Engine(model, loss_fn, x, y, backend=backend) as e:
            G = e.per_sample_matrix()
            gx = e.per_sample_matrix(wrt="input")
        assert torch.allclose(G, ref, rtol=1e-10, atol=1e-10 * ref.abs().max()), backend
    xr = x.clone().requires_grad_(True)
    rows = [torch.autograd.grad(loss_fn(model(xr[i:i + 1]), y[i:i + 1]), xr)[0][i] for i in range(x.shape[0])]
    ref_x = torch.stack(rows)
    assert torch.allclose(gx, ref_x, rtol=1e-10, atol=1e-10 * ref_x.abs().max())


def test_wide_conv_written_in_place_matches_loop():
    """A conv whose per-sample weight block (O·C = 48·18·9) exceeds the in-place threshold takes
    the direct-bmm branch; the narrow first conv takes the batched-bmm-plus-copy branch. Both equal the loop."""
    from gradcond.probes.per_sample import identities as PS

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 18, 3, padding=1), nn.ReLU(), nn.Conv2d(18, 48, 3, padding=1), nn.Flatten(),
                          nn.Linear(48 * 9, 3)).double()
    assert 48 * 18 * 9 > PS._BMM_DIRECT_MIN >= 18 * 2 * 9
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    ref = naive_per_sample(model, F.cross_entropy, x, y)
    with Engine(model, F.cross_entropy, x, y) as e:
        G = e.per_sample_matrix()
    assert torch.allclose(G, ref, rtol=1e-10, atol=1e-10 * ref.abs().max())


def test_direct_path_leaves_grads_and_matches_functional_path():
    """The base-weight capture calls the model directly (no functional_call): same gradients, no .grad written."""
    import torch.nn.functional as F

    from gradcond import zoo
    from gradcond.probes.per_sample import Engine

    torch.manual_seed(0)
    m = zoo.simple_cnn().double()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    with Engine(m, F.cross_entropy, x, y) as e:
        assert e._direct(e.w)
        direct = e.per_sample_matrix()
        zero = torch.zeros(e.m, dtype=torch.float64)
        functional = e.per_sample_matrix(omega=zero)  # a perturbed (here: by zero) weight goes through functional_call
    assert all(p.grad is None for p in m.parameters())
    torch.testing.assert_close(direct, functional, rtol=1e-12, atol=1e-14)
