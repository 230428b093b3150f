"""The per-sample subpackage reads in one direction (issue 26 item 6), and the pieces made faster for it keep their
results: weights swapped in for a perturbed gradient (tied parameters included), outputs modified in place after
their module returned them, the per-sample losses of the known losses."""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradcond.probes.per_sample as PS
from gradcond.probes.per_sample import Engine, per_sample_stats

ORDER = ["plan", "capture", "identities", "engine"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_files_import_only_the_files_before_them():
    """plan -> capture -> identities -> engine: each file may import the ones before it, never one after it, and no
    other gradcond.probes module imports a private name of the subpackage."""
    root = Path(PS.__file__).parent
    assert sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__") == sorted(ORDER)
    for i, stem in enumerate(ORDER):
        mods = _imports(root / f"{stem}.py")
        inside = {m.rsplit(".", 1)[-1] for m in mods if m.startswith("gradcond.probes.per_sample.")}
        assert inside <= set(ORDER[:i]), (stem, inside)
    # the other probes use the subpackage's public names only
    probes = root.parent
    for path in list(probes.glob("*.py")) + list((probes / "conditioning").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradcond.probes.per_sample"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, (path.name, private)


def test_perturbed_gradient_with_tied_weights_matches_autograd():
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    with Engine(model, F.cross_entropy, x, y) as e:
        omega = torch.randn(e.m, dtype=torch.float64) * 1e-2
        got = e.batch_grad(omega)
    assert all(p.grad is None for p in model.parameters())
    ref_model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), None, nn.Tanh(), nn.Linear(5, 3)).double()
    ref_model[2] = ref_model[0]
    with torch.no_grad():
        flat = torch.cat([p.reshape(-1) for p in model.parameters()]) + omega
        i = 0
        for p in ref_model.parameters():
            p.copy_(flat[i:i + p.numel()].reshape(p.shape))
            i += p.numel()
    F.cross_entropy(ref_model(x), y).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in ref_model.parameters()])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # the model's own tensors are back in place
    assert model[0] is lin and model[2].weight is lin.weight


def test_outputs_modified_in_place_are_detected_and_copied():
    """A Linear whose output a ReLU(inplace=True) overwrites: the capture notices (version counter) and repeats with
    copies; the norms equal the per-sample loop."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    st = per_sample_stats(model, F.cross_entropy, (x, y))
    ref = []
    for i in range(5):
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        ref.append(torch.cat([t.reshape(-1) for t in g]))
    R = torch.stack(ref)
    torch.testing.assert_close(st.gram, R @ R.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["ce", "ce_module_smoothing", "ce_probabilities", "ce_spatial", "mse", "mse_module"])
def test_known_per_sample_losses_equal_the_vmapped_loss(case):
    from gradcond.probes._hooks import _known_per_sample

    g = torch.Generator().manual_seed(2)
    out = torch.randn(6, 4, dtype=torch.float64, generator=g)
    cases = {
        "ce": (F.cross_entropy, torch.randint(0, 4, (6,), generator=g)),
        "ce_module_smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), torch.randint(0, 4, (6,), generator=g)),
        "ce_probabilities": (F.cross_entropy, torch.softmax(torch.randn(6, 4, dtype=torch.float64, generator=g), 1)),
        "ce_spatial": (F.cross_entropy, torch.randint(0, 4, (6, 3), generator=g)),
        "mse": (F.mse_loss, torch.randn(6, 4, dtype=torch.float64, generator=g)),
        "mse_module": (nn.MSELoss(), torch.randn(6, 4, dtype=torch.float64, generator=g)),
    }
    loss_fn, y = cases[case]
    if case == "ce_spatial":
        out = torch.randn(6, 4, 3, dtype=torch.float64, generator=g)
    fast = _known_per_sample(loss_fn, out, y)
    ref = torch.stack([loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-14)
    assert _known_per_sample(lambda o, t: F.cross_entropy(o, t), out, y) is None  # unknown losses: vmapped


@pytest.mark.parametrize("c", [8, 33, 64, 70])
def test_block_triangular_gram_equals_the_full_product(c):
    from gradcond.probes.per_sample.identities import _sym_gram

    g = torch.Generator().manual_seed(c)
    M = torch.randn(c, 5 * c, dtype=torch.float64, generator=g)
    torch.testing.assert_close(_sym_gram(M), M @ M.T, rtol=1e-13, atol=1e-12)
