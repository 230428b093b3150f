import json

import pytest

from gradcond import zoo
from gradcond.diagnose import REPORT_KEYS

ZOO_DATA = {
    "mlp": "digits", "resnet_mlp": "digits", "looks_linear_crelu_mlp": "digits", "vgg": "digits", "resnet": "digits",
    "densenet": "digits", "simple_cnn": "digits", "transformer": "digits",
}
SMALL = {"resnet_mlp": ["--set", "blocks=3", "--set", "width=32"], "resnet": ["--set", "width=8"]}


@pytest.mark.parametrize("name", sorted(ZOO_DATA))
def test_diagnose_every_zoo_model(run_cli, tmp_path, name):
    rc, out, err = run_cli("diagnose", name, "--data", ZOO_DATA[name], "--batches", "1", "--batch-size", "16",
                           "--out", str(tmp_path), *SMALL.get(name, []))
    assert rc == 0, err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert set(REPORT_KEYS) <= set(rep)
    assert rep["n_samples"] == 16 and rep["model"] == name
    assert rep["gsc"] is not None and len(rep["gsc"]["layers"]) == len(rep["gsc"]["gsc"]) > 0
    assert rep["cob"] is not None and rep["cob"]["num_free"] >= 0
    assert 1 <= len(rep["findings"])
    printed = out.strip().splitlines()
    # every finding is printed (a healthy model's GSC verdict ranks low and used to be cut off)
    assert printed[-1].endswith("report.html") and [l[4:] for l in printed if l.startswith("  - ")] == rep["findings"]
    assert any("GSC" in f or "gradient scale" in f or "gradients" in f for f in rep["findings"])
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") >= 1
    assert set(rep["errors"]) <= {"cob_optimization"} or not rep["errors"], rep["errors"]


def test_diagnose_user_factory(run_cli, tmp_path):
    f = tmp_path / "net.py"
    f.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make():\n    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))\n\n"
        "example_input = torch.randn(2, 64)\n"
    )
    rc, out, err = run_cli("diagnose", f"{f}:make", "--data", "digits", "--batches", "2", "--batch-size", "16",
                           "--out", str(tmp_path / "o"))
    assert rc == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert set(REPORT_KEYS) <= set(rep) and rep["n_samples"] == 32
    assert rep["cob"]["num_free"] > 0


@pytest.mark.parametrize("body,spec,message", [
    (None, "missing.py:make", "does not exist"),
    ("raise RuntimeError('boom')\n", "f.py:make", "raised RuntimeError on import: boom"),
    ("def make():\n    raise ValueError('bad width')\n", "f.py:make", "make() in"),
    ("def make():\n    return 42\n", "f.py:make", "returned int, not a torch.nn.Module"),
    ("x = 1\n", "f.py:make", "has no callable 'make'"),
    ("import torch\ndef make():\n    return torch.nn.Linear(3, 2)\n", "f.py:make", "does not fit dataset 'digits'"),
])
def test_diagnose_bad_factories(run_cli, tmp_path, body, spec, message):
    if body is not None:
        (tmp_path / "f.py").write_text(body)
    rc, _, err = run_cli("diagnose", str(tmp_path / spec), "--data", "digits", "--out", str(tmp_path / "o"))
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_diagnose_unknown_model_and_data(run_cli, tmp_path):
    rc, _, err = run_cli("diagnose", "alexnet", "--out", str(tmp_path / "o"))
    assert rc == 2 and "unknown model 'alexnet'" in err
    rc, _, err = run_cli("diagnose", "mlp", "--data", "imagenet", "--out", str(tmp_path / "o"))
    assert rc == 2 and "unknown dataset 'imagenet'" in err


def test_findings_name_explosion_in_plain_words_with_their_evidence():
    from gradcond.diagnose import findings

    f = findings({"gsc": {"explosion_rate": 1.19, "fit_layers": 10, "layers": ["a"] * 20, "lowest": 1e3, "r2": 0.97,
                          "rate_low": 1.15, "rate_high": 1.23}, "errors": {}, "n_samples": 64})
    assert f[0].startswith("gradients explode: the GSC grows by a factor 1.19 per linear layer towards the input "
                           "(95% interval [1.15, 1.23]; fit through 10 layers, r² = 0.97)"), f[0]
    assert f[0].endswith("on 64 samples")


@pytest.mark.parametrize("k", [2, None])
def test_explosion_rate_through_fewer_than_three_layers_is_no_finding(k):
    from gradcond.diagnose import findings

    f = findings({"gsc": {"explosion_rate": 1.19, "fit_layers": k, "layers": ["a", "b"], "lowest": 1e3}, "errors": {}})
    assert not any(x.startswith("gradients explode") for x in f)
    assert len(f) == 1 and f[0].startswith("not enough evidence")


def test_a_flat_noisy_gsc_profile_is_not_called_stable():
    """The issue's case: "stable across depth" from a fit with r² = 0.027 -- now withheld unless the rate's interval
    lies inside the stable band."""
    from gradcond.diagnose import findings

    g = {"explosion_rate": 0.99, "fit_layers": 12, "layers": ["a"] * 12, "lowest": 1.0, "r2": 0.027}
    wide = findings({"gsc": {**g, "rate_low": 0.8, "rate_high": 1.2}, "errors": {}, "n_samples": 8})
    assert wide[0].startswith("not enough evidence for a verdict") and "r² = 0.03" in wide[0]
    narrow = findings({"gsc": {**g, "rate_low": 0.98, "rate_high": 1.01}, "errors": {}, "n_samples": 8})
    assert narrow[0].startswith("the gradient scale is stable across depth: 0.99 per linear layer (95% interval "
                                "[0.98, 1.01]; fit through 12 layers, r² = 0.03)")


def test_failed_sections_come_first_and_feed_no_finding():
    from gradcond.diagnose import findings

    r = {"gsc": None, "conditioning": None, "cob_optimization": None, "n_samples": 64,
         "domain": {"layers": ["1"], "std": [1.0], "sign_diversity": [0.3]},
         "cob": {"num_free": 8, "frozen": [], "parameters": 100, "teleportable_parameters": 70, "tensors": 4,
                 "teleportable_tensors": 3},
         "errors": {"gsc": "RuntimeError: shapes", "conditioning.coherence": "RuntimeError: shapes",
                    "cob_optimization": "RuntimeError: shapes"}}
    f = findings(r)
    assert f[0].startswith("every section that needs the loss failed (gsc, conditioning, cob_optimization)")
    assert f[1] == "section gsc failed: RuntimeError: shapes; no finding below uses it"
    assert f[3] == "section cob_optimization failed: RuntimeError: shapes; no finding below uses it"
    rest = " | ".join(f[4:])
    assert "teleport raises" not in rest and "gradients" not in rest and "coherence" not in rest
    assert "part of the model is teleportable: a change of basis reaches 70 of 100 parameter values (70.0%) in 3 " \
           "of 4 tensors, 8 free change-of-basis factors" in rest
    assert "whole model" not in rest


def test_domain_collapse_needs_enough_samples():
    from gradcond.diagnose import MIN_DOMAIN_SAMPLES, findings

    d = {"layers": ["3"], "std": [1.0], "sign_diversity": [0.02]}
    few = findings({"domain": d, "errors": {}, "n_samples": MIN_DOMAIN_SAMPLES - 1})
    assert few == [f"not enough evidence on a collapsing domain: sign diversity 0.020 at '3' (lowest of 1 "
                   f"nonlinearities, over {MIN_DOMAIN_SAMPLES - 1} samples; at least {MIN_DOMAIN_SAMPLES} samples are "
                   "needed)"]
    many = findings({"domain": d, "errors": {}, "n_samples": 64})
    assert many[0].startswith("the domain collapses at '3': sign diversity 0.020 (lowest of 1 nonlinearities, over "
                              "64 samples; collapse below 0.1)")


def test_teleport_coverage_counts_the_values_a_cob_changes():
    """Independent computation: apply a random CoB and compare every parameter value."""
    import torch

    from gradcond.diagnose import teleport_coverage
    from gradcond.graph import analyze
    from gradcond.teleport import random_cob, teleport

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4), torch.nn.LayerNorm(4),
                            torch.nn.Linear(4, 3))
    with torch.no_grad():  # no zero values (LayerNorm's bias starts at 0): a scaled zero would look unchanged
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
    st = analyze(m, torch.randn(2, 6))
    cov = teleport_coverage(m, st)
    tp = teleport(m, random_cob(st, sigma=0.5))
    changed = sum(int((p0 != p1).sum()) for p0, p1 in zip(m.parameters(), tp.parameters()))
    assert cov["teleportable_parameters"] == changed and 0 < changed < cov["parameters"]
    assert cov["parameters"] == sum(p.numel() for p in m.parameters()) and cov["tensors"] == 8


def test_plain_mlp_shows_its_gsc_verdict_among_all_findings(run_cli, tmp_path):
    rc, out, err = run_cli("diagnose", "mlp", "--data", "digits", "--batches", "1", "--batch-size", "32",
                           "--out", str(tmp_path))
    assert rc == 0, err
    rep = json.loads((tmp_path / "report.json").read_text())
    k = rep["gsc"]["fit_layers"]
    assert k == sum(kind == "linear" for kind in rep["gsc"]["kinds"]) >= 3  # every linear layer enters the fit
    verdict = [f for f in rep["findings"] if f"fit through {k} layers" in f]
    assert len(verdict) == 1 and f"  - {verdict[0]}" in out.splitlines()
    html = (tmp_path / "report.html").read_text()
    assert html.count("<li>") >= len(rep["findings"]) > 3


def test_nothing_teleportable_has_no_teleport_caption(run_cli, tmp_path):
    f = tmp_path / "net.py"
    f.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    rc, out, err = run_cli("diagnose", f"{f}:make", "--data", "digits", "--batches", "1", "--batch-size", "16",
                           "--out", str(tmp_path / "o"))
    assert rc == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["cob"]["num_free"] == 0
    html = (tmp_path / "o" / "report.html").read_text()
    assert "Same function, larger gradient" not in html and "cob_optimization.png" not in html
    assert not any("teleportable" in x or "optimised teleport raises" in x for x in rep["findings"])
    assert any(x.startswith("nothing can be teleported") for x in rep["findings"])


def test_gsc_figure_is_titled_and_not_clipped():
    import torch

    from gradcond.diagnose import _figures, diagnose

    torch.manual_seed(0)
    m = zoo.mlp(in_features=8, out_features=3, depth=4, width=16)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    result = diagnose(m, "cross_entropy", [(x, y)], cob_steps=2)
    figs = {f.name: f for f in _figures(result)}
    fig = figs["gsc_profile"].fig
    ax = fig.axes[0]
    assert "GSC(l, 0) per measured layer" in ax.get_title() and "fit through 4 layers" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["Linear 1", "ReLU 1", "Linear 2"]
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches: everything drawn, labels and title included
    w, h = fig.get_size_inches()
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= w + 1e-6 and box.y1 <= h + 1e-6, (box, w, h)


def test_diagnose_does_not_change_the_model():
    import torch

    from gradcond.data import load_dataset
    from gradcond.diagnose import diagnose

    m = zoo.vgg()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = load_dataset("digits", form="image").train.tensors
    diagnose(m, "cross_entropy", [(x[:16], y[:16])])
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
