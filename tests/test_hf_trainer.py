"""The Hugging Face Trainer integration (issue 24 §1): a tiny GPT-2 built from a config (nothing downloaded) trains
with the real ``transformers.Trainer`` and ``GradcondCallback``; the run directory holds per-layer gradient norms,
GSC and the noise scale, the report shows them, the Trainer's loggers receive the scalars, gradient accumulation is
measured once per optimizer step on the accumulated gradient, and bad options are refused with one sentence."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradcond.integrations import GradcondCallback, causal_lm_loss  # noqa: E402
from gradcond.train.run import read_events, read_metrics  # noqa: E402

pytestmark = pytest.mark.hf
VOCAB, SEQ = 61, 12


def gpt2(dropout: float = 0.0):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                  bos_token_id=None, eos_token_id=None, resid_pdrop=dropout, embd_pdrop=dropout,
                                  attn_pdrop=dropout)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(cfg)


def dataset(n=32, seed=1):
    """Counting sequences (next token = this token + 1, mod VOCAB) from random starts: a signal the gradient shares
    across examples, so the |G|² estimate of the noise scale is positive."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(SEQ)) % VOCAB
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                max_grad_norm=0.0)
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """A stand-in for a reporting integration (TensorBoard, W&B): keeps every logs dict it is given."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    rec = Recorder()
    cb = GradcondCallback({"grad_norm": "every:1", "gsc": "every:3", "noise_scale": "every:3", "domain": "epoch"},
                          budget=1.0, probe_batch_size=8)
    tr = Trainer(model=gpt2(), args=args(tmp, gradient_accumulation_steps=2), train_dataset=dataset(),
                 callbacks=[rec, cb])
    tr.train()
    return tmp, cb, rec, tr


def test_trainer_run_writes_grad_norms_gsc_and_noise_scale_into_the_run_directory_and_report(trained):
    tmp, cb, rec, tr = trained
    run = tmp / "out" / "gradcond"
    assert cb.run_path == run and not (tmp / "out" / ".gradcond.partial").exists()
    rows = read_metrics(run / "metrics.csv")
    gn = {(r["step"], r["layer"]) for r in rows if r["probe"] == "grad_norm"}
    layers = {layer for _, layer in gn}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "lm_head"} <= layers
    assert {s for s, _ in gn} == set(range(1, 7))  # every optimizer step, not every micro-batch
    gsc = [r for r in rows if r["probe"] == "gsc" and r["name"] == "gsc"]
    assert {r["step"] for r in gsc} == {3, 6} and all(math.isfinite(r["value"]) and r["value"] > 0 for r in gsc)
    ns = {(r["step"], r["name"]): r["value"] for r in rows if r["probe"] == "noise_scale"}
    assert {s for s, _ in ns} == {3, 6} and ns[(3, "batch_size")] == 8  # 4 per device x 2 accumulation steps
    assert ns[(3, "b_small")] == 1 and ns[(3, "b_big")] == 8 and ns[(3, "trace_sigma")] > 0
    assert ns[(3, "grad_sq")] > 0 and ns[(3, "b_simple")] == pytest.approx(ns[(3, "trace_sigma")] / ns[(3, "grad_sq")])
    assert any(r["probe"] == "domain" for r in rows)
    html = (run / "report.html").read_text()
    for title in ("Gradient norms per layer", "Gradient scale coefficient", "Gradient noise scale"):
        assert title in html
    ev = read_events(run / "events.jsonl")
    att = [e for e in ev if e["kind"] == "monitor_attached"]
    assert att and att[0]["gradient_accumulation_steps"] == 2 and "unscaled" in att[0]["measured_at"]


def test_scalars_reach_the_trainers_loggers_and_log_history(trained):
    _, cb, rec, tr = trained
    # the recorder was listed before the callback; the callback moved itself ahead so the recorder sees them
    keys = set().union(*rec.logs)
    assert "gradcond/gsc/explosion_rate" in keys or "gradcond/noise_scale/b_simple" in keys
    assert "gradcond/noise_scale/trace_sigma" in keys
    assert not any(k.startswith("gradcond/grad_norm/") for k in keys)  # per-layer values only with log_layers
    hist = [h for h in tr.state.log_history if "gradcond/noise_scale/trace_sigma" in h]
    assert hist and all("loss" in h for h in hist)


def test_accumulated_gradient_is_measured_once_per_optimizer_step(tmp_path):
    """Independent computation: with 8 examples, batch 4 and 2 accumulation steps the first optimizer step uses all
    8; its gradient is that of the token-mean next-token loss over the 8 (dropout off, no clipping). Label 0 of each
    row is -100 (it is never a prediction target), so the Trainer's token count is the same whether or not it
    counts the shifted labels."""
    model = gpt2()
    ref = copy.deepcopy(model)
    data = dataset(8)
    for d in data:
        d["labels"][0] = -100
    cb = GradcondCallback({"grad_norm": "every:1"}, budget=1.0, probe_batch_size=4)
    Trainer(model=model, args=args(tmp_path, max_steps=1, gradient_accumulation_steps=2), train_dataset=data,
            callbacks=[cb]).train()
    ids = torch.stack([d["input_ids"] for d in data])
    labels = torch.stack([d["labels"] for d in data])
    causal_lm_loss(ref(ids).logits, labels).backward()
    got = {r["layer"]: r["value"] for r in cb.rows if r["probe"] == "grad_norm"}
    assert got
    mods = dict(ref.named_modules())
    for layer, v in got.items():
        expected = float(mods[layer].weight.grad.double().norm())
        assert v == pytest.approx(expected, rel=1e-5), layer


def test_probe_that_never_fires_within_max_steps_is_refused(tmp_path):
    cb = GradcondCallback({"gsc": "every:50"}, budget=1.0)
    tr = Trainer(model=gpt2(), args=args(tmp_path, max_steps=4), train_dataset=dataset(), callbacks=[cb])
    with pytest.raises(ValueError, match=r"^GradcondCallback probe gsc is scheduled every 50 steps but the Trainer "
                                         r"makes 4 optimizer steps \(max_steps\), so it would never be measured; use "
                                         r"every:N with N <= 4, or \"epoch\"\.$"):
        tr.train()


def test_teleport_through_the_callback_is_refused_with_one_sentence():
    with pytest.raises(ValueError, match=r"^GradcondCallback does not teleport: .* teleport the model with "
                                         r"gradcond\.teleport before trainer\.train\(\) instead\.$"):
        GradcondCallback(teleport="optimized")
