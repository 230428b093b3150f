"""The run report tells the story in words, labels layers by module, and never touches matplotlib's backend."""

import csv
import json
import re
import subprocess
import sys
import textwrap

import pytest
from torch import nn

from gradcond import config
from gradcond.report import figures
from gradcond.report.run_report import epochs_saved, gsc_verdict, write_run_report

FIELDS = ("step", "epoch", "probe", "layer", "name", "value")


def test_building_report_figures_keeps_the_process_backend():
    # a fresh process whose backend was set to something other than Agg (as a notebook sets its inline backend)
    code = textwrap.dedent("""
        import sys, tempfile, pathlib
        import matplotlib
        matplotlib.use("svg")
        from gradcond.report import Figure, Section, write_report
        from gradcond.report import figures
        from gradcond.experiments import conditioning_repro, layerwise_repro
        rows = [{"step": s, "epoch": s, "probe": "train", "layer": "", "name": "loss", "value": 1.0 / (s + 1)}
                for s in range(3)]
        fig = figures.curves({"plain": rows}, [("train", "loss", "train")], "t", "loss")
        fig2, ax = conditioning_repro._plt().subplots(1, 2, figsize=(4, 2))
        out = pathlib.Path(tempfile.mkdtemp())
        write_report(out / "r.html", "t", [Section("s", figures=[Figure("a", fig), Figure("b", fig2)])])
        layerwise_repro._figure(out / "l.png", {"dll": [0.5, 0.7]}, "accuracy", "t")  # a reproduction's figure
        png = (out / "figures" / "a.png").read_bytes()
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules, png[:4] == b"\\x89PNG")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["svg", "False", "True"]


def test_layer_labels_name_modules_not_sequential_indices():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
            self.head = nn.Linear(4, 2)

    assert figures.layer_labels(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))) == {
        "<root>": "Sequential", "0": "Linear 1", "1": "ReLU 1", "2": "Linear 2"}
    labels = figures.layer_labels(Net())
    assert labels["body.0"] == "body.0 (Linear)" and labels["body.3"] == "body.3 (ReLU)" and labels["head"] == "head"


def test_event_legend_says_teleport_once():
    rows = {k: [{"step": 10 * e, "epoch": e, "probe": "train", "layer": "", "name": "loss", "value": 1.0}
                for e in range(3)] for k in ("plain", "teleport")}
    events = {"plain": [], "teleport": [{"kind": "teleport", "step": 10, "epoch": 1}]}
    fig = figures.curves(rows, [("train", "loss", "train")], "t", "loss", events=events)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts == ["train (plain run)", "train (teleport run)", "teleport"]


@pytest.mark.parametrize("rate,k,verdict,words", [
    (1.3, 4, "exploding", "fit through 4 layers"),
    (0.7, 3, "vanishing", "fit through 3 layers"),
    (1.0, 5, "stable", "fit through 5 layers"),
    (1.3, 2, None, "not enough for a verdict"),
    (1.3, None, None, "no verdict"),
    (None, 3, None, "no explosion rate could be fitted"),
])
def test_gsc_verdict_needs_three_layers(rate, k, verdict, words):
    v, sentence = gsc_verdict(rate, k)
    assert v == verdict and words in sentence


def _rows(losses, step_per_epoch=10):
    return [{"step": step_per_epoch * (e + 1), "epoch": e, "probe": "train", "layer": "", "name": "loss", "value": v}
            for e, v in enumerate(losses)]


def test_epochs_saved_is_first_epoch_reaching_the_plain_final_loss():
    es = epochs_saved(_rows([2.0, 1.0, 0.5, 0.4]), _rows([2.0, 0.6, 0.38, 0.3]))
    assert es == {"target_loss": 0.4, "epochs": 4, "plain_epoch": 4, "teleport_epoch": 3, "saved": 1}
    never = epochs_saved(_rows([2.0, 1.0, 0.5, 0.4]), _rows([2.0, 1.5, 0.9, 0.8]))
    assert never["teleport_epoch"] is None and never["saved"] is None
    # the plain run reached its final loss early: the comparison uses the first epoch, not the last
    early = epochs_saved(_rows([2.0, 0.4, 0.5, 0.4]), _rows([2.0, 0.9, 0.3, 0.3]))
    assert early["plain_epoch"] == 2 and early["teleport_epoch"] == 3 and early["saved"] == -1


def _write_run(d, rows, events=(), schedule=None):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, FIELDS)
        w.writeheader()
        w.writerows(rows)
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if schedule is not None:
        (d / "monitor_schedule.json").write_text(json.dumps(schedule))


def _probe_rows(fit_layers):
    out = []
    for step, epoch in ((10, 0), (20, 1)):
        for i, layer in enumerate(("0", "1", "2", "3", "4")):
            out.append({"step": step, "epoch": epoch, "probe": "gsc", "layer": layer, "name": "gsc", "value": 3.0 - 0.5 * i})
        out.append({"step": step, "epoch": epoch, "probe": "gsc", "layer": "", "name": "explosion_rate", "value": 1.4})
        out.append({"step": step, "epoch": epoch, "probe": "gsc", "layer": "", "name": "explosion_fit_layers",
                    "value": float(fit_layers)})
        out.append({"step": step, "epoch": epoch, "probe": "domain", "layer": "1", "name": "sign_diversity",
                    "value": 0.3 if step == 10 else 0.05})
    return out


@pytest.fixture
def synthetic_runs(tmp_path):
    cfg = config.resolve(config.DEMO, ["train.epochs=4", "model.depth=3"])
    plain, tele = tmp_path / "run", tmp_path / "run" / "teleport"
    schedule = {"budget": 0.05, "steps_per_epoch": 10, "probes": [
        {"name": "gsc", "enabled": True, "every_steps": 10, "planned_measurements": 2, "cost_s": 0.01,
         "skipped": False, "reason": "measured every 10 steps"},
        {"name": "conditioning", "enabled": True, "every_steps": None, "planned_measurements": 0, "cost_s": 3.0,
         "skipped": True, "reason": "one measurement costs more than the time budget allows"}]}
    _write_run(plain, _rows([2.0, 1.0, 0.5, 0.4]) + _probe_rows(4), schedule=schedule)
    tp_event = {"kind": "teleport", "step": 10, "epoch": 1, "time": 1796071233.97, "method": "optimized",
                "objective": "grad_norm", "objective_before": 0.1, "objective_after": 0.5, "loss_before": 2.25,
                "loss_after": 2.25, "max_output_change": 3e-7, "seconds": 0.0547}
    _write_run(tele, _rows([2.0, 0.6, 0.38, 0.3]) + _probe_rows(2), events=[tp_event], schedule=schedule)
    path = write_run_report(plain, cfg, {"plain": plain, "teleport": tele})
    return path, json.loads((plain / "report.json").read_text())["story"]


def test_summary_tells_the_story(synthetic_runs):
    path, story = synthetic_runs
    assert list(story) == ["Training outcome", "Exploding or vanishing gradients", "Collapsing domain",
                           "Conditioning trends", "Teleport", "Monitor coverage"]
    gsc = " ".join(story["Exploding or vanishing gradients"])
    # the plain run's fit went through 4 layers: a verdict; the teleport run's through 2: none
    assert "Plain run, GSC at step 20: gradients explode: the GSC grows by a factor 1.40" in gsc
    assert "(fit through 4 layers)" in gsc
    assert "Teleport run, GSC at step 20: the explosion-rate fit went through only 2 layers" in gsc
    assert "not enough for a verdict" in gsc
    assert "domain collapses at ReLU 1: sign diversity 0.050 at step 20" in " ".join(story["Collapsing domain"])
    tele = " ".join(story["Teleport"])
    assert "step 10, at the start of epoch 2 of 4" in tele
    assert "raised the gradient norm from 0.1 to 0.5 (5.00x)" in tele
    assert "the loss went from 2.25 to 2.25 (unchanged: same function)" in tele
    assert "at epoch 4 by the plain run and at epoch 3 by the teleport run: 1 epoch saved" in tele
    cov = " ".join(story["Monitor coverage"])
    assert "GSC was measured twice (steps 10, 20)" in cov
    assert "Gradient conditioning was not measured: one measurement costs more than the time budget allows" in cov
    html = path.read_text()
    assert html.index('id="summary"') < html.index("Training curves</h2>")  # the summary comes first


def test_report_links_events_of_the_run_that_has_them_and_readable_times(synthetic_runs):
    path, _ = synthetic_runs
    html = path.read_text()
    assert '<a href="teleport/events.jsonl">events.jsonl (teleport run)</a>' in html
    assert 'href="events.jsonl"' not in html  # the plain run's events file is empty
    assert "2026-11-30" in html and "1796071233" not in html  # wall-clock time as a date, not a Unix timestamp
    assert "0.055 s" in html
    # GSC table rows carry the module label next to the logged name (model rebuilt from the config: mlp, depth 3)
    assert "<td>Linear 1</td><td>0</td>" in html and "<td>ReLU 1</td><td>1</td>" in html


def test_summary_without_schedule_file_counts_rows(tmp_path):
    cfg = config.resolve(config.DEMO, ["train.epochs=2", "compare_teleport=false"])
    rows = _rows([1.0, 0.5]) + [{"step": 5, "epoch": 0, "probe": "grad_norm", "layer": "0", "name": "grad_norm",
                                 "value": 0.1}]
    _write_run(tmp_path, rows, events=[{"kind": "probe_failed", "step": 7, "epoch": 0, "probe": "gsc",
                                        "error": "ValueError: boom"}])
    write_run_report(tmp_path, cfg, {"plain": tmp_path})
    story = json.loads((tmp_path / "report.json").read_text())["story"]
    cov = " ".join(story["Monitor coverage"])
    assert "The per-layer gradient norm was measured once (step 5)" in cov
    assert "GSC was not measured: it failed at step 7 (ValueError: boom)" in cov
    assert story["Teleport"] == ["No teleport in this run."]
    text = re.sub("<[^>]+>", "", (tmp_path / "report.html").read_text())
    assert "No teleport in this run." in text
