import json

import pytest

from gradcond import zoo
from gradcond.monitor.diagnose import REPORT_KEYS

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
    assert printed[-1].endswith("report.html") and sum(l.startswith("  - ") for l in printed) == min(3, len(rep["findings"]))
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


def test_findings_name_explosion_in_plain_words():
    from gradcond.monitor.diagnose import findings

    f = findings({"gsc": {"explosion_rate": 1.19, "layers": ["a"] * 20, "lowest": 1e3}, "errors": {}})
    assert f[0].startswith("gradients explode at rate 1.19 per linear layer")


def test_diagnose_does_not_change_the_model():
    import torch

    from gradcond.data import load_dataset
    from gradcond.monitor.diagnose import diagnose

    m = zoo.vgg()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = load_dataset("digits", form="image").train.tensors
    diagnose(m, "cross_entropy", [(x[:16], y[:16])])
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
