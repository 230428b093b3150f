"""Every callback registered for TOML configs builds with its defaults and runs inside `gradcond run`."""

import pytest

from gradcond.train.callbacks import build_callback, callback_names

CHEAP_OPTIONS = {
    "nullspace_teleport": {"schedule": 1, "num_batches": 2, "batch_size": 16},
    "symmetry_teleport": {"schedule": 1, "num_batches": 2, "batch_size": 16},
}


def test_registry_names_and_errors():
    names = callback_names()
    for n in ("teleport", "monitor", "nullspace_teleport", "symmetry_teleport", "effective_depth", "residual_tracker"):
        assert n in names
    with pytest.raises(ValueError, match="unknown callback 'x'; accepted: "):
        build_callback({"name": "x"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) bogus for callback 'stop_after'"):
        build_callback({"name": "stop_after", "bogus": 1})


@pytest.mark.parametrize("name", [n for n in callback_names() if n != "stop_after"])
def test_each_callback_runs_in_a_configured_run(run_cli, tmp_path, name):
    opts = CHEAP_OPTIONS.get(name, {})
    spec = "{" + ", ".join([f'name="{name}"'] + [f"{k}={v!r}".replace("'", '"') for k, v in opts.items()]) + "}"
    act = "leaky_relu" if name == "symmetry_teleport" else "relu"
    rc, out, err = run_cli("run", "--out", str(tmp_path), "--quiet", "--set", "train.epochs=2", "--set", f"model.act={act}",
                           "--set", "model.width=32", "--set", f"callbacks=[{spec}]", "--set", f"name={name}")
    assert rc == 0, err
    assert (tmp_path / name / "report.html").exists()
