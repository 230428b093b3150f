"""Measurements never change the model (issue 20 §3).

Every monitor probe, every generically callable diagnostic of ``gradcond.probes`` and every ``diagnose`` section
runs on a model with BatchNorm; afterwards each state_dict tensor (parameters and running statistics, including
``num_batches_tracked``), each ``.grad`` and each module's ``training`` flag must be bit-identical to before.
"""

import math

import pytest
import torch

import gradcond.probes as P
from gradcond import zoo
from gradcond.monitor import PROBES
from gradcond.diagnose import diagnose
from gradcond.train import get_loss


def _bn_model(dtype):
    torch.manual_seed(0)
    model = zoo.resnet(in_channels=1, num_classes=10, depth=10, width=2).to(dtype)
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(12, 1, 8, 8, dtype=dtype)
    y = torch.randint(0, 10, (12,))
    loss = get_loss("cross_entropy")
    # one real training step so that running statistics are not at their initial values and .grad is populated
    model.train()
    loss(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    model.train()
    loss(model(x), y).backward()
    return model, loss, (x, y)


class _Snapshot:
    def __init__(self, model):
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
        self.training = {n: m.training for n, m in model.named_modules()}

    def differences(self) -> list[str]:
        out = []
        now = self.model.state_dict()
        if set(now) != set(self.state):
            out.append(f"state_dict keys changed: {sorted(set(now) ^ set(self.state))}")
        out += [f"state_dict[{k!r}]" for k in self.state if k in now and not torch.equal(now[k], self.state[k])]
        for n, p in self.model.named_parameters():
            g0 = self.grads[n]
            if (g0 is None) != (p.grad is None) or (g0 is not None and not torch.equal(g0, p.grad)):
                out.append(f"{n}.grad")
        out += [f"training flag of {n!r}" for n, m in self.model.named_modules() if m.training != self.training[n]]
        return out


def _generic_probe_calls(model, loss, batch):
    """(name, thunk) for every public diagnostic in ``gradcond.probes`` that can be called on any model + batch."""
    x, y = batch
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    layer = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    calls = [
        ("gsc_profile", lambda: P.gsc_profile(model, loss, batch)),
        ("gsc_profile(per_sample=False)", lambda: P.gsc_profile(model, loss, batch, per_sample=False)),
        ("gsc", lambda: P.gsc(model, loss, batch, layer, probes=2)),
        ("domain_stats", lambda: P.domain_stats(model, batch, correlation=True)),
        ("dilution_profile", lambda: P.dilution_profile(model, batch, loss_fn=loss)),
    ]
    for bn in ("batch", "eval"):
        calls += [
            (f"gradient_coherence[{bn}]", lambda bn=bn: P.gradient_coherence(model, loss, batch, bn=bn)),
            (f"step_consistency[{bn}]", lambda bn=bn: P.step_consistency(model, loss, batch, bn=bn)),
            (f"step_metrics[{bn}]", lambda bn=bn: P.step_metrics(model, loss, batch, bn=bn)),
            (f"batch_dissonance[{bn}]", lambda bn=bn: P.batch_dissonance(model, loss, batch, n=2, bn=bn)),
            (f"relative_gradient_rank(weight)[{bn}]",
             lambda bn=bn: P.relative_gradient_rank(model, loss, batch, wrt="weight", bn=bn)),
            (f"relative_gradient_rank(input)[{bn}]",
             lambda bn=bn: P.relative_gradient_rank(model, loss, batch, wrt="input", bn=bn)),
            (f"gradient_diversity[{bn}]", lambda bn=bn: P.gradient_diversity(model, loss, loader, n_batches=2, bn=bn)),
            (f"gradient_confusion[{bn}]", lambda bn=bn: P.gradient_confusion(model, loss, loader, n_batches=2, bn=bn)),
            (f"batch_efficiency_ratio[{bn}]",
             lambda bn=bn: P.batch_efficiency_ratio(model, loss, loader, n_batches=2, bn=bn)),
        ]
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_probe_and_diagnose_section_leaves_a_bn_model_bit_identical(dtype, mode):
    model, loss, batch = _bn_model(dtype)
    model.train(mode == "train")
    snap = _Snapshot(model)
    ran, changed = [], {}

    def check(name):
        diff = snap.differences()
        if diff:
            changed[name] = diff
            model.load_state_dict(snap.state)  # restore so the next measurement is judged on its own
        ran.append(name)

    for name, probe in PROBES.items():
        if name == "update_size":  # the relative update needs the weights kept before a step (here: the same)
            probe(model, loss, batch, None, before=P.snapshot_weights(model))
        else:
            probe(model, loss, batch, None)
        check(f"monitor probe {name}")
    for name, call in _generic_probe_calls(model, loss, batch):
        call()
        check(f"gradcond.probes.{name}")
    result = diagnose(model, loss, [batch, (batch[0][:6], batch[1][:6])], cob_steps=3)
    check("diagnose")
    assert changed == {}
    assert len(ran) == len(PROBES) + len(_generic_probe_calls(model, loss, batch)) + 1
    # every diagnose section really ran (a section that raised would not have measured anything)
    assert result["errors"] == {}, result["errors"]
    for section in ("gsc", "domain", "conditioning", "cob", "cob_optimization"):
        assert result[section] is not None


def test_cob_optimization_reports_the_teleport_error_not_running_statistics_drift():
    """The teleport on a BN model is exact to rounding: the reported function change must say so (it used to be
    ~0.1 because a train-mode gradient pass updated the copy's running statistics before the comparison)."""
    model, loss, batch = _bn_model(torch.float64)
    result = diagnose(model, loss, [batch], cob_steps=5)
    c = result["cob_optimization"]
    assert c is not None, result["errors"]
    assert c["ratio"] is not None and math.isfinite(c["ratio"])
    # independent check of the "before" value: autograd on a fresh copy (its buffers may change; it is a copy)
    import copy

    ref = copy.deepcopy(model)
    params = [p for p in ref.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss(ref(batch[0]), batch[1]), params)
    assert c["grad_norm_before"] == pytest.approx(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)), rel=1e-12)
    assert c["max_function_change"] < 1e-10
