"""GradcondCallback in a 2-process Trainer (issue 24 §1 + §3): the real ``transformers.Trainer`` under 2 gloo ranks
(DDP through accelerate, environment as torchrun sets it); every rank runs the callback, rank 0 writes the run
directory, and the per-layer gradient norms are those of the global batch in one process."""

from __future__ import annotations

import importlib
import json
import os
import traceback
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.hf
VOCAB, SEQ = 61, 12


def _model():
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                  bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _data():
    g = torch.Generator().manual_seed(1)
    ids = (torch.randint(0, VOCAB, (8, 1), generator=g) + torch.arange(SEQ)) % VOCAB
    out = []
    for r in ids:
        lab = r.clone()
        lab[0] = -100  # never a prediction target: the token count is the same however the Trainer counts
        out.append({"input_ids": r, "labels": lab})
    return out


def _worker(rank, world, port, cfg, out_dir):
    res = {"rank": rank}
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        importlib.import_module("torch._dynamo")  # before the group exists: gradcond.distributed.init_local_group says why
        from transformers import Trainer, TrainingArguments

        from gradcond.integrations import GradcondCallback

        cb = GradcondCallback({"grad_norm": "every:1", "gsc": "every:1"}, budget=1.0, probe_batch_size=8)
        args = TrainingArguments(output_dir=str(Path(out_dir) / "out"), max_steps=1, per_device_train_batch_size=4,
                                 report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                 max_grad_norm=0.0, learning_rate=1e-3)
        tr = Trainer(model=_model(), args=args, train_dataset=_data(), callbacks=[cb])
        tr.train()
        res.update(rows=cb.rows, world=torch.distributed.get_world_size(), wrapped=type(tr.model_wrapped).__name__)
    except Exception:  # noqa: BLE001
        res["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    if torch.distributed.is_initialized():
        if "error" not in res:
            torch.distributed.barrier()  # waits with the GIL released: gloo's workers finish before the group goes
        torch.distributed.destroy_process_group()


def test_two_rank_trainer_measures_the_global_batch(tmp_path):
    from gradcond.experiments._launch import launch_ranks
    from gradcond.integrations import causal_lm_loss
    from gradcond.probes import gsc_profile
    from gradcond.utils import selecting_output

    codes, _, ranks = launch_ranks(_worker, 2, {}, tmp_path, join_timeout=240)
    for r in ranks:
        assert "error" not in r, r.get("error")
    assert codes == [0, 0] and ranks[0]["world"] == 2 and ranks[0]["wrapped"] == "DistributedDataParallel"
    model, data = _model(), _data()
    ids = torch.stack([d["input_ids"] for d in data])
    labels = torch.stack([d["labels"] for d in data])
    causal_lm_loss(model(ids).logits, labels).backward()
    mods = dict(model.named_modules())
    got = {r["layer"]: r["value"] for r in ranks[0]["rows"] if r["probe"] == "grad_norm"}
    assert got and all(v == pytest.approx(float(mods[k].weight.grad.double().norm()), rel=1e-5)
                       for k, v in got.items())
    assert not [r for r in ranks[1]["rows"] if r["probe"] == "grad_norm"]
    assert (tmp_path / "out" / "gradcond" / "report.html").exists()
    # GSC after the step: the whole probe batch (both ranks' halves), on the updated weights
    gsc = [r for r in ranks[0]["rows"] if r["probe"] == "gsc" and r["name"] == "gsc"]
    assert gsc and all(r["value"] > 0 for r in gsc)
