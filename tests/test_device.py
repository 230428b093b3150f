"""Devices, seeds and progress bars (issue 12 §3).

The CPU tests run everywhere; the tests marked ``gpu`` need CUDA and are skipped without it (run them on a GPU
machine with ``pytest -m gpu tests/test_device.py``). A missing CUDA is simulated on any machine by patching
``torch.cuda.is_available``.
"""

import copy
import io
import sys

import pytest
import torch
import torch.nn.functional as F

from gradcond import utils, zoo
from gradcond.data import load_dataset
from gradcond.train import Callback, RunLogger, fit
from gradcond.utils import UserError, progress, progress_enabled, resolve_device, set_quiet

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (torch.cuda.is_available() is False)")

NO_CUDA_MSG = ("--device cuda was requested but CUDA is not available here (torch.cuda.is_available() is False); "
               "use --device cpu or auto.")


class FakeTTY(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def loud(monkeypatch):
    """Bars drawn at once (no 1 s delay); the global quiet switch restored afterwards."""
    monkeypatch.setattr(utils, "PROGRESS_DELAY_S", 0.0)
    set_quiet(False)
    yield
    set_quiet(False)


class BatchSpy(Callback):
    def __init__(self):
        self.seen = []

    def on_step_start(self, s):
        x, y = s.batch
        self.seen.append((x.dtype, x.device, y.dtype, y.device, s.device))


def _digits_model(dtype=torch.float32, seed=0):
    d = load_dataset("digits", dtype=torch.float32)  # the data stay float32 on the CPU
    torch.manual_seed(seed)
    return d, zoo.mlp(64, 10, depth=3, width=32).to(dtype)


# ---- resolve_device ---------------------------------------------------------------------------------------------
def test_resolve_device_names(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the decision is tested: no CUDA call
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_resolve_device_refuses_missing_cuda(no_cuda):
    with pytest.raises(UserError) as e:
        resolve_device("cuda")
    assert str(e.value) == NO_CUDA_MSG
    with pytest.raises(UserError, match=r"^--device cuda:1 was requested but CUDA is not available here"):
        resolve_device("cuda:1")
    with pytest.raises(UserError, match=r"^device cuda was requested .*; use device cpu or auto\.$"):
        resolve_device("cuda", flag="device")


def test_resolve_device_refuses_an_index_beyond_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"^--device cuda:3 was requested but this machine has 1 CUDA device\(s\) "
                                        r"\(cuda:0 to cuda:0\)"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("bad", ["gpu", "mps", "cuda:x", "", 3, None])
def test_resolve_device_unknown_names(bad):
    with pytest.raises(UserError, match="accepted: cpu, cuda, cuda:N"):
        resolve_device(bad)


@pytest.mark.parametrize("argv", [["run", "--set", "train.epochs=1"], ["diagnose", "mlp"],
                                  ["repro", "run", "lli-linear-at-init", "--quick"]])
def test_cli_device_cuda_without_cuda_is_one_line_exit_2(run_cli, no_cuda, tmp_path, argv):
    out = tmp_path / "out"
    rc, stdout, err = run_cli(*argv, "--out", str(out), "--quiet", "--device", "cuda")
    assert rc == 2
    assert err.strip() == f"gradcond: error: {NO_CUDA_MSG}"
    assert stdout == "" and not out.exists()  # refused before any work


def test_cli_device_unknown_name(run_cli, tmp_path):
    rc, _, err = run_cli("run", "--out", str(tmp_path / "o"), "--device", "tpu")
    assert rc == 2 and err.startswith("gradcond: error: unknown --device 'tpu'; accepted: cpu, cuda")
    assert len(err.strip().splitlines()) == 1


def test_repro_passes_the_device_to_reproductions_that_take_one(tmp_path, monkeypatch):
    import json

    from gradcond.experiments import registry

    got = []

    def fn(quick, out_dir, device):
        got.append(device)
        return [registry.Row("a claim", "a source", "ours", True)]

    monkeypatch.setitem(registry._REGISTRY, "zz-device-test", registry.Experiment("zz-device-test", "c", "s", fn))
    rows, out = registry.run_experiment("zz-device-test", tmp_path, quick=True, device="auto")
    assert got == [torch.device("cuda" if HAS_CUDA else "cpu")]
    assert json.loads((out / "result.json").read_text())["device"] == str(got[0])


def test_repro_device_for_a_cpu_only_reproduction_warns_and_uses_the_cpu(run_cli, monkeypatch, tmp_path):
    import json

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the warning comes before any CUDA work
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rc, _, err = run_cli("repro", "run", "lli-linear-at-init", "--quick", "--out", str(tmp_path), "--quiet",
                         "--device", "cuda")
    assert rc == 0, err
    assert ("gradcond: warning: reproduction 'lli-linear-at-init' computes on the CPU only; --device cuda is not "
            "used for it.") in err
    assert json.loads((tmp_path / "lli-linear-at-init" / "result.json").read_text())["device"] == "cpu"


# ---- fit on the model's device ----------------------------------------------------------------------------------
def test_fit_casts_floating_batches_to_the_model_dtype_on_its_device():
    """A float64 model on float32 data: inputs are cast to float64 (the trainer's documented behaviour), integer
    labels keep int64, everything on the model's device; the model itself is not converted."""
    d, model = _digits_model(torch.float64)
    spy = BatchSpy()
    h = fit(model, *d.loaders(128), epochs=1, lr=0.1, callbacks=[spy])
    assert spy.seen and set(spy.seen) == {(torch.float64, torch.device("cpu"), torch.int64, torch.device("cpu"),
                                           torch.device("cpu"))}
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x, y = d.test.tensors  # evaluation casts the float32 test inputs the same way
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x.double()), y))
    assert h.rows[0]["test_loss"] == pytest.approx(expected, rel=1e-12)


def test_fit_device_argument_gives_the_same_training_as_none():
    d, m1 = _digits_model()
    m2 = copy.deepcopy(m1)
    h1 = fit(m1, *d.loaders(64), epochs=2, lr=0.1)
    h2 = fit(m2, *d.loaders(64), epochs=2, lr=0.1, device="cpu")
    assert h1.rows == h2.rows
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    if not HAS_CUDA:  # "auto" is the CPU here
        d, m3 = _digits_model()
        assert fit(m3, *d.loaders(64), epochs=2, lr=0.1, device="auto").rows == h1.rows


def test_fit_refuses_cuda_without_cuda_and_leaves_the_model_unchanged(no_cuda):
    d, model = _digits_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spy = BatchSpy()
    with pytest.raises(UserError) as e:
        fit(model, *d.loaders(64), epochs=1, device="cuda", callbacks=[spy])
    assert str(e.value) == ("device cuda was requested but CUDA is not available here (torch.cuda.is_available() is "
                            "False); use device cpu or auto.")
    assert spy.seen == []
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in model.state_dict().items())


# ---- progress bars ----------------------------------------------------------------------------------------------
def test_progress_bar_only_on_a_terminal_and_not_quiet(loud):
    tty, pipe = FakeTTY(), io.StringIO()
    for stream in (tty, pipe):
        for _ in progress(range(7), desc="work", file=stream):
            pass
    assert "work:" in tty.getvalue() and "/7 [" in tty.getvalue()
    assert pipe.getvalue() == ""
    assert progress_enabled(tty) and not progress_enabled(pipe)
    set_quiet(True)
    quiet = FakeTTY()
    for _ in progress(range(7), desc="work", file=quiet):
        pass
    assert quiet.getvalue() == "" and not progress_enabled(quiet)


def test_progress_bar_waits_for_slow_work(monkeypatch):
    """The default delay keeps a bar off the screen for work that ends before it (none of it is measured)."""
    set_quiet(False)
    monkeypatch.setattr(utils, "PROGRESS_DELAY_S", 3600.0)
    tty = FakeTTY()
    for _ in progress(range(3), desc="quick", file=tty):
        pass
    assert tty.getvalue() == ""


def test_fit_bar_on_a_terminal_by_default(loud, monkeypatch):
    d, model = _digits_model()
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    fit(model, *d.loaders(256), epochs=1, lr=0.1)
    assert "train" in tty.getvalue() and "loss=" in tty.getvalue()
    for kw in ({"progress": False}, {"progress_bar": False}):
        tty = FakeTTY()
        monkeypatch.setattr(sys, "stderr", tty)
        fit(model, *d.loaders(256), epochs=1, lr=0.1, **kw)
        assert tty.getvalue() == ""
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    fit(model, *d.loaders(256), epochs=1, lr=0.1)
    assert pipe.getvalue() == ""


def test_diagnose_bar_over_its_sections(loud, monkeypatch):
    from gradcond.diagnose import diagnose

    torch.manual_seed(0)
    model = zoo.mlp(12, 4, depth=3, width=8)
    x, y = _tiny_batch(torch.float32, n=16)
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    r = diagnose(model, "cross_entropy", [(x, y)], cob_steps=2)
    assert "diagnose:" in tty.getvalue() and "/5 [" in tty.getvalue()
    assert r["gsc"] is not None
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    diagnose(model, "cross_entropy", [(x, y)], cob_steps=2)
    assert pipe.getvalue() == ""


def test_optimised_teleport_bar(loud, monkeypatch):
    from gradcond.teleport import optimize_cob

    torch.manual_seed(0)
    model = zoo.mlp(12, 4, depth=3, width=8).double()
    batch = _tiny_batch(n=16)
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    cob, log = optimize_cob(model, F.cross_entropy, [batch], steps=5)
    assert "optimize_cob:" in tty.getvalue() and "/6 [" in tty.getvalue()
    set_quiet(True)
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    cob2, _ = optimize_cob(model, F.cross_entropy, [batch], steps=5)
    assert tty.getvalue() == "" and torch.equal(cob2.tau, cob.tau)  # the bar changes nothing of the result


def test_cli_quiet_turns_the_bars_off(loud, monkeypatch, tmp_path):
    from gradcond.cli import main

    common = ["run", "--set", "train.epochs=1", "--set", "name=bar", "--set", "monitor.enabled=false"]
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert "train" in tty.getvalue() and "step/s" in tty.getvalue()
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main([*common, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert tty.getvalue() == ""
    assert (tmp_path / "a" / "bar" / "metrics.csv").read_text() == (tmp_path / "b" / "bar" / "metrics.csv").read_text()


# ---- on a GPU (skipped without CUDA) ------------------------------------------------------------------------------
@gpu
@needs_cuda
def test_fit_on_cuda_matches_cpu_in_float64():
    """fit(model.to("cuda"), cpu loaders): batches go to the GPU, the model stays there, and the float64 training
    curve equals the CPU one (same data order, same initial weights) to rounding."""
    d, cpu_model = _digits_model(torch.float64, seed=1)
    cuda_model = copy.deepcopy(cpu_model).to("cuda")
    spy = BatchSpy()
    h_gpu = fit(cuda_model, *d.loaders(64, seed=3), epochs=2, optimizer="momentum", lr=0.05, callbacks=[spy], seed=3)
    h_cpu = fit(cpu_model, *d.loaders(64, seed=3), epochs=2, optimizer="momentum", lr=0.05, seed=3)
    assert {s[1].type for s in spy.seen} == {"cuda"} and {s[3].type for s in spy.seen} == {"cuda"}
    assert {s[4].type for s in spy.seen} == {"cuda"}
    assert all(p.device.type == "cuda" for p in cuda_model.parameters())
    for a, b in zip(h_gpu.rows, h_cpu.rows):
        for k in ("train_loss", "test_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-9)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=2 / 360)
    assert h_gpu.rows[-1]["train_loss"] < h_gpu.rows[0]["train_loss"]


@gpu
@needs_cuda
def test_fit_device_cuda_moves_the_model_in_place_and_resumes(tmp_path):
    class Crash(Callback):
        def on_epoch_end(self, s):
            if s.epoch == 1 and self.armed:
                raise KeyboardInterrupt

        def __init__(self, armed):
            self.armed = armed

    def go(path, armed=False, resume=False):
        d, model = _digits_model(seed=2)
        h = fit(model, *d.loaders(64, seed=2), epochs=3, optimizer="adam", lr=0.003, device="cuda", seed=2,
                run=RunLogger(path), resume=resume, callbacks=[Crash(armed)])
        assert next(model.parameters()).device.type == "cuda"  # the caller's model object was moved
        return h

    go(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "cut", armed=True)
    go(tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "metrics.csv").read_bytes() == (tmp_path / "full" / "metrics.csv").read_bytes()


def _tiny_batch(dtype=torch.float64, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


@gpu
@needs_cuda
def test_probes_on_cuda_match_cpu():
    from gradcond.probes import domain_stats, gradient_coherence, gsc_profile, relative_gradient_rank

    torch.manual_seed(0)
    cpu = zoo.mlp(12, 4, depth=4, width=16).double()
    gpu_m = copy.deepcopy(cpu).cuda()
    x, y = _tiny_batch()
    xg, yg = x.cuda(), y.cuda()
    p_cpu = gsc_profile(cpu, "cross_entropy", (x, y), per_sample=False)
    p_gpu = gsc_profile(gpu_m, "cross_entropy", (xg, yg), per_sample=False)
    assert p_gpu.layers == p_cpu.layers
    assert p_gpu.gsc == pytest.approx(p_cpu.gsc, rel=1e-6)
    d_cpu, d_gpu = domain_stats(cpu, (x, y)), domain_stats(gpu_m, (xg, yg))
    assert d_gpu.std == pytest.approx(d_cpu.std, rel=1e-6)
    assert d_gpu.sign_diversity == pytest.approx(d_cpu.sign_diversity, rel=1e-6)
    for fn, kw in ((gradient_coherence, {}), (relative_gradient_rank, {"wrt": "weight"})):
        a = float(fn(cpu, F.cross_entropy, (x, y), **kw).value)
        b = float(fn(gpu_m, F.cross_entropy, (xg, yg), **kw).value)
        assert b == pytest.approx(a, rel=1e-5), fn.__name__
    assert all(p.device.type == "cuda" for p in gpu_m.parameters())


@gpu
@needs_cuda
def test_optimised_teleport_on_cuda_keeps_the_function():
    from gradcond.graph import analyze
    from gradcond.teleport import teleport
    from gradcond.teleport.optimize import optimize_cob

    torch.manual_seed(0)
    model = zoo.mlp(12, 4, depth=3, width=16).double().cuda()
    x, y = (t.cuda() for t in _tiny_batch())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st = analyze(model, x[:2])
    cob, _ = optimize_cob(model, F.cross_entropy, [(x, y)], structure=st, steps=10)
    tp = teleport(model, cob, inplace=False, check_inputs=x)
    assert all(p.device.type == "cuda" for p in tp.parameters())
    with torch.no_grad():
        f0, f1 = model(x), tp(x)
    assert (f0 - f1).abs().max() <= 1e-9 * f0.abs().max()
    assert any(not torch.allclose(a, b) for a, b in zip(model.parameters(), tp.parameters()))  # it did teleport
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched


@gpu
@needs_cuda
def test_cli_run_and_diagnose_on_cuda(run_cli, tmp_path):
    """The demo (monitor probes, teleport comparison run) and diagnose on the GPU: every probe and section runs
    (a probe or section that fails on CUDA is recorded, not raised, so the records are checked)."""
    import json

    rc, out, err = run_cli("run", "--out", str(tmp_path / "runs"), "--quiet", "--device", "cuda", "--set",
                           "train.epochs=2")
    assert rc == 0, err
    demo = tmp_path / "runs" / "demo"
    for events in (demo / "events.jsonl", demo / "teleport" / "events.jsonl"):
        assert "probe_failed" not in events.read_text()
    assert '"kind": "teleport"' in (demo / "teleport" / "events.jsonl").read_text()
    rc, out, err = run_cli("diagnose", "mlp", "--out", str(tmp_path / "diag"), "--quiet", "--device", "cuda",
                           "--set", "depth=4")
    assert rc == 0, err
    assert json.loads((tmp_path / "diag" / "report.json").read_text())["errors"] == {}
