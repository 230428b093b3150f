"""Mixed precision (issue 24 §4): the monitor's per-layer gradient norms under bf16 autocast and under fp16 autocast
with a ``torch.amp.GradScaler`` match a float32 run of the same steps, and a step the scaler skips is logged as
skipped, not measured.

Tolerances (relative, on per-layer gradient norms of the same weights and batch): bf16 keeps 8 significant bits
(unit roundoff u = 2^-8 ≈ 3.9e-3 for its rounding of the matmul inputs, products accumulated in float32); the
errors seen are about 2u, and 3e-2 (≈ 8u) leaves room for a few layers of accumulation. fp16 keeps 11 bits
(u = 2^-11 ≈ 4.9e-4); 5e-3 (≈ 10u). The monitor itself accumulates in float64 and reads the gradients unscaled,
so it adds nothing to these differences; probes that run forward passes run outside autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradcond.monitor import Monitor

BF16_RTOL, FP16_RTOL = 3e-2, 5e-3
STEPS = 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(STEPS)]


def _run(mode: str, batches=None, init_scale: float = 2.0 ** 16):
    """STEPS steps of SGD with the monitor after each; ``mode``: "fp32", "bf16" (autocast) or "fp16" (autocast +
    GradScaler). Returns the monitor's rows and events."""
    model, ce = _model(), nn.functional.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if mode == "fp16" else None
    mon = Monitor({"grad_norm": "every:1", "gsc": "every:2"}, budget=1.0, probe_batch_size=32)
    for x, y in batches or _batches():
        opt.zero_grad()
        if mode == "fp32":
            ce(model(x), y).backward()
            opt.step()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16 if mode == "bf16" else torch.float16):
                loss = ce(model(x), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        mon.step(model, ce, (x, y), opt, scaler=scaler)
    return mon.rows, mon.events


def _norms(rows, probe="grad_norm", name="grad_norm"):
    return {(r["step"], r["layer"]): r["value"] for r in rows if r["probe"] == probe and r["name"] == name}


@pytest.mark.parametrize("mode,rtol", [("bf16", BF16_RTOL), ("fp16", FP16_RTOL)])
def test_gradient_norms_under_autocast_match_float32(mode, rtol):
    ref, got = _norms(_run("fp32")[0]), _norms(_run(mode)[0])
    assert ref and set(got) == set(ref)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=rtol), (k, got[k], v)
    # and the difference is real (autocast did run in reduced precision): not bit-identical
    assert any(got[k] != v for k, v in ref.items())
    # GSC on the probe batch runs outside autocast, on weights that moved by slightly different steps
    gref, ggot = _norms(_run("fp32")[0], "gsc", "gsc"), _norms(_run(mode)[0], "gsc", "gsc")
    assert gref and set(ggot) == set(gref)
    assert all(ggot[k] == pytest.approx(v, rel=rtol) for k, v in gref.items())


def test_a_step_the_scaler_skips_is_logged_as_skipped_not_measured():
    batches = _batches()
    x, y = batches[1]
    batches[1] = (x * 1e6, y)  # overflows in fp16: the scaled gradients are inf, GradScaler skips step 2
    rows, events = _run("fp16", batches)
    skipped = [e for e in events if e["kind"] == "optimizer_step_skipped"]
    assert [e["step"] for e in skipped] == [2] and "skipped this step" in skipped[0]["reason"]
    assert [(r["step"], r["value"]) for r in rows if r["name"] == "skipped_step"] == [(2, 1.0)]
    measured = {s for s, _ in _norms(rows)}
    assert measured == {1, 3, 4}  # nothing (no inf, no NaN) recorded for the skipped step
    assert 2 not in {s for s, _ in _norms(rows, "gsc", "gsc")}


def test_hf_trainer_bf16_matches_float32(tmp_path):
    """The real Trainer with bf16=True (accelerate's CPU autocast) against the same Trainer in float32: the first
    optimizer step's per-layer gradient norms (same weights, same batch) within the bf16 tolerance."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from gradcond.integrations import GradcondCallback

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=61, n_positions=12, bos_token_id=None,
                                  eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(1)
    ids = (torch.randint(0, 61, (8, 1), generator=g) + torch.arange(12)) % 61
    data = [{"input_ids": r, "labels": r.clone()} for r in ids]
    out = {}
    for bf16 in (False, True):
        cb = GradcondCallback({"grad_norm": "every:1"}, budget=1.0, probe_batch_size=4)
        args = TrainingArguments(output_dir=str(tmp_path / f"bf16{bf16}"), max_steps=1, per_device_train_batch_size=8,
                                 report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, bf16=bf16,
                                 max_grad_norm=0.0)
        Trainer(model=copy.deepcopy(base), args=args, train_dataset=data, callbacks=[cb]).train()
        out[bf16] = _norms(cb.rows)
    assert out[False] and set(out[True]) == set(out[False])
    for k, v in out[False].items():
        assert out[True][k] == pytest.approx(v, rel=BF16_RTOL), k
    assert any(out[True][k] != v for k, v in out[False].items())
